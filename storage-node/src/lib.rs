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
            self.store,
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
        GrpcServer::new(&self.config.server, policy())?
            .add_service(grpc)
            .spawn()
            .await
    }
}
