//! `storage-node`: an untrusted cloud's object store. redb-backed, objects by
//! id, streamed in chunks, SHA-256 checked on every read, idempotent put,
//! capacity limits, durable commits, served over mutual-TLS gRPC
//! (`tessera.storage.v1.StorageNode`). It knows nothing of patients.
//!
//! It also processes one region's fragment of an image at a time (`Process`,
//! paper 000: each region is processed on a different cloud): the operation
//! runs in memory on the plaintext fragment (scattered blocks plus a halo)
//! and the processed cores stream back; nothing is stored or logged.
//!
//! `App::build(config)` opens the store; `App::spawn()` serves it and returns
//! the running server (bound address, graceful shutdown).
#![forbid(unsafe_code)]

pub mod config;
mod error;
pub mod service;
pub mod store;

use std::sync::Arc;

use tessera_proto::storage::v1::storage_node_server::StorageNodeServer;
use tessera_runtime::{GrpcServer, MAX_MESSAGE_BYTES, RunningServer, ServerError};
use tessera_tls::Policy;

pub use config::{Config, ProcessSection};
pub use error::Error;
pub use service::StorageService;
pub use store::{Limits, ObjectMeta, Store};

/// Who may call the storage node: the gateway alone places, fetches, lists
/// and deletes objects and has fragments processed; operators may ask
/// `NodeInfo`. No storage identity may call anything on another node, and
/// users never reach a node (they fetch ciphertext through the gateway's
/// `FetchShare`). The rows live in [`tessera_tls::matrix::MATRIX`].
pub fn policy() -> Policy {
    Policy::for_service("tessera.storage.v1.StorageNode")
}

/// The gRPC path of `Process`.
pub const PROCESS_PATH: &str = "/tessera.storage.v1.StorageNode/Process";

/// A storage node, built and ready to serve.
pub struct App {
    config: Config,
    store: Arc<Store>,
}

impl App {
    /// Opens (or creates, or repairs after a crash) the node's database.
    pub fn build(config: Config) -> Result<Self, Error> {
        let limits = Limits {
            capacity_bytes: config.capacity_bytes,
            max_object_bytes: config.max_object_bytes,
        };
        let store = Arc::new(Store::open(&config.db_path(), limits)?);
        Ok(Self { config, store })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Serves the node (mTLS, health, reflection, authz) in a task.
    pub async fn spawn(self) -> Result<RunningServer, ServerError> {
        let svc = StorageService::new(
            self.store.clone(),
            self.config.node_id.clone(),
            self.config.max_concurrent_puts,
        )
        .with_gets(
            self.config.max_concurrent_gets,
            std::time::Duration::from_millis(self.config.get_wait_ms),
        )
        .with_idle_timeout(self.config.server.stream_idle_timeout())
        .with_process(&self.config.process);
        let grpc = StorageNodeServer::new(svc)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let server = GrpcServer::new(&self.config.server, policy())?
            .with_admin(self.config.admin.as_ref())
            .with_readiness(readiness(self.store.clone()));
        register_metrics(&server.metrics(), &self.store);
        server.add_service(grpc).spawn().await
    }
}

/// Ready while the database answers a read. Metrics and readiness hold
/// the store weakly: a stopped node's database closes as before.
fn readiness(store: Arc<Store>) -> tessera_runtime::Readiness {
    let store = Arc::downgrade(&store);
    Arc::new(move || {
        let store = store.clone();
        Box::pin(async move {
            let store = store.upgrade().ok_or("the store is closed")?;
            tokio::task::spawn_blocking(move || store.usage())
                .await
                .map_err(|e| format!("usage check: {e}"))?
                .map(|_| ())
                .map_err(|e| format!("database: {e}"))
        })
    })
}

/// Objects and bytes held, read at scrape time (-1: the store is closed
/// or unreadable).
fn register_metrics(metrics: &tessera_runtime::Metrics, store: &Arc<Store>) {
    let read = |f: fn(&Store) -> Option<u64>| {
        let s = Arc::downgrade(store);
        move || {
            s.upgrade()
                .and_then(|s| f(&s))
                .map_or(-1, |v| i64::try_from(v).unwrap_or(i64::MAX))
        }
    };
    metrics.gauge_fn(
        "storage_objects",
        "Objects held by this node",
        read(|s| s.usage().ok().map(|u| u.object_count)),
    );
    metrics.gauge_fn(
        "storage_bytes",
        "Bytes of objects held by this node",
        read(|s| s.usage().ok().map(|u| u.used_bytes)),
    );
    metrics.gauge_fn(
        "storage_capacity_bytes",
        "Configured capacity of this node",
        read(|s| Some(s.limits().capacity_bytes)),
    );
}
