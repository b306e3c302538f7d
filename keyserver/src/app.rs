//! `App::build(config)` and `App::spawn()`: the real keyserver, runnable
//! in-process on `127.0.0.1:0` by tests, the bench and the launcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_runtime::{
    AdminConfig, GrpcServer, Metrics, Readiness, RunningServer, ServerConfig, ServerError, Serving,
    StartError,
};

use crate::config::Config;
use crate::core::clock::{Clock, SystemClock};
use crate::core::crypto::Kek;
use crate::core::{Core, CoreConfig};
use crate::error::KeyServerError;
use crate::limits::OversizeAsResourceExhausted;
use crate::service::{KeyServerService, policy};

/// Why the keyserver could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Core (KEK, database) failed to open.
    #[error(transparent)]
    Core(#[from] KeyServerError),
    /// The gRPC server failed to start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// `[keyserver.webhook] ca_file` could not be loaded.
    #[error("keyserver.webhook.ca_file: {0}")]
    Webhook(#[from] tessera_tls::TlsError),
    /// `[keyserver.store]`: the connection string could not be read.
    #[error("{0}")]
    Store(String),
}

/// A missing, too-open or wrong KEK is a configuration error (exit 64).
impl From<AppError> for StartError {
    fn from(e: AppError) -> Self {
        if matches!(e, AppError::Core(KeyServerError::Kek(_)))
            || matches!(e, AppError::Server(ServerError::KeyPermissions(_)))
            || matches!(e, AppError::Webhook(_))
            || matches!(e, AppError::Store(_))
        {
            StartError::config(e)
        } else {
            StartError::other(e)
        }
    }
}

/// A built (not yet listening) keyserver.
pub struct App {
    core: Core,
    server: ServerConfig,
    admin: Option<AdminConfig>,
}

/// A listening keyserver.
pub struct RunningApp {
    server: RunningServer,
    core: Core,
}

impl App {
    /// Loads the KEK, opens the database and prepares the server.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        Self::build_with_clock(config, Arc::new(SystemClock))
    }

    /// Like [`App::build`] with an injected clock (tests).
    pub fn build_with_clock(config: &Config, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        let k = &config.keyserver;
        let td = &config.server.access.trust_domain;
        let mut access = k.access.core_config(config.server.access.role_map());
        access.webhook = k.webhook.as_ref().map(|w| w.core_config()).transpose()?;
        let core = Core::open(
            CoreConfig {
                store: k.store_at().map_err(AppError::Store)?,
                kek: Kek::load(&k.kek_file)?,
                trust_domain: td.clone(),
                gateway_identity: k.gateway(td),
                derivers: k.derivers(td),
                checkpoint_every: k.checkpoint_every,
                max_grant_ttl_secs: k.max_grant_ttl_secs,
                max_grant_uses: k.max_grant_uses,
                access,
            },
            clock,
        )?;
        Ok(Self {
            core,
            server: config.server.clone(),
            admin: config.admin.clone(),
        })
    }

    /// The core, for in-process callers.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Binds and serves (mTLS, authz, health, reflection, limits).
    pub async fn spawn(self) -> Result<RunningApp, AppError> {
        let server = GrpcServer::new(&self.server, policy())?
            .with_admin(self.admin.as_ref())
            .with_readiness(readiness(self.core.clone()));
        register_metrics(&server.metrics(), &self.core);
        let server = server
            .with_refusal_sink(std::sync::Arc::new(AuditSink(self.core.clone())))
            .add_service(OversizeAsResourceExhausted::new(
                KeyServerService::new(self.core.clone()).into_server(),
            ))
            .spawn()
            .await?;
        Ok(RunningApp {
            server,
            core: self.core,
        })
    }
}

impl RunningApp {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The core, for in-process callers.
    pub fn core(&self) -> &Core {
        &self.core
    }

    /// Where the admin listener serves, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.admin_addr()
    }

    /// Stops accepting, drains for at most `grace`, then lets the core close
    /// the database (pending audit appends are committed first).
    pub async fn shutdown(self, grace: Duration) {
        self.server.shutdown(grace).await;
        drop(self.core);
    }
}

impl Serving for RunningApp {
    fn local_addr(&self) -> SocketAddr {
        RunningApp::local_addr(self)
    }

    fn shutdown(self, grace: Duration) -> impl Future<Output = ()> + Send {
        RunningApp::shutdown(self, grace)
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        RunningApp::admin_addr(self)
    }
}

/// Ready while the database is open (it is, once built) and the audit
/// chain verifies: a broken chain refuses every key operation.
fn readiness(core: Core) -> Readiness {
    Arc::new(move || {
        let broken = core.chain_break();
        Box::pin(async move {
            match broken {
                None => Ok(()),
                Some(b) => Err(format!(
                    "audit chain broken at entry {}: {}",
                    b.seq, b.problem
                )),
            }
        })
    })
}

/// The keyserver's own metrics, read at scrape time.
fn register_metrics(metrics: &Metrics, core: &Core) {
    const KS: &str = "tessera.keyserver.v1.KeyServer";
    metrics.rpc_ok_counter(
        "keyserver_derivations",
        "Study keys derived (DeriveKey answered OK)",
        &[&format!("{KS}/DeriveKey")],
    );
    metrics.rpc_ok_counter(
        "keyserver_releases",
        "Keys released to researchers (FetchKey and RedeemGrant answered OK)",
        &[&format!("{KS}/FetchKey"), &format!("{KS}/RedeemGrant")],
    );
    let c = core.clone();
    metrics.counter_fn(
        "keyserver_audit_commits",
        "Audit-logged jobs committed by the group-commit writer",
        move || c.writer_stats().1,
    );
    let c = core.clone();
    metrics.counter_fn(
        "keyserver_audit_batches",
        "Group commits of the audit writer",
        move || c.writer_stats().0,
    );
    let c = core.clone();
    metrics.gauge_fn(
        "keyserver_audit_chain_broken",
        "1 while the audit chain does not verify (key operations refused)",
        move || i64::from(c.chain_break().is_some()),
    );
    // Read at scrape time; a failed read shows as -1.
    let gauge = |name: &str, help: &str, read: fn(&crate::core::gauges::Gauges) -> i64| {
        let c = core.clone();
        metrics.gauge_fn(name, help, move || c.gauges().map_or(-1, |g| read(&g)));
    };
    gauge(
        "keyserver_pending_requests",
        "Key requests waiting for the owner's decision",
        |g| i64::try_from(g.pending_requests).unwrap_or(i64::MAX),
    );
    gauge(
        "keyserver_audit_chain_length",
        "Entries in the audit chain",
        |g| i64::try_from(g.audit_chain_length).unwrap_or(i64::MAX),
    );
    gauge(
        "keyserver_audit_checkpoint_age_seconds",
        "Seconds since the last signed audit checkpoint (since the first entry before the first checkpoint; -1: empty log)",
        |g| {
            g.checkpoint_age_secs
                .map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX))
        },
    );
}

/// Puts the authorization layer's refusals into the audit chain (awaited
/// before the layer answers).
struct AuditSink(Core);

impl tessera_tls::RefusalSink for AuditSink {
    fn record(&self, r: tessera_tls::Refusal) -> tessera_tls::BoxFuture<()> {
        let core = self.0.clone();
        Box::pin(async move {
            core.audit_access_refusal(&r.caller, &r.rpc, r.reason).await;
        })
    }
}
