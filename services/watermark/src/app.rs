//! `App::build(config)` and `App::spawn()`: the real watermark service,
//! runnable in-process on `127.0.0.1:0` by tests and the launcher.

use tessera_runtime::{
    AdminConfig, GrpcServer, Readiness, RunningServer, ServerConfig, ServerError, StartError,
};
use tessera_tls::CallerAllowList;

use crate::config::{ALLOWED_CALLERS, Config};
use crate::keys::KeyClient;
use crate::service::{Limits, WatermarkService, policy};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The keyserver client TLS material is unusable.
    #[error("keyserver client: {0}")]
    KeyserverTls(#[from] tessera_tls::TlsError),
    /// The identity expected at the keyserver is not a valid identity.
    #[error("{0}")]
    KeyserverIdentity(String),
    /// The gRPC server failed to start.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// Unreadable client TLS material is a configuration error (exit 64).
impl From<AppError> for StartError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::KeyserverTls(_) | AppError::KeyserverIdentity(_) => StartError::config(e),
            AppError::Server(_) => StartError::other(e),
        }
    }
}

/// A built (not yet listening) service.
pub struct App {
    service: WatermarkService,
    server: ServerConfig,
    admin: Option<AdminConfig>,
    readiness: Readiness,
}

/// A listening service: the server itself (bound address, health,
/// graceful shutdown).
pub type RunningApp = RunningServer;

impl App {
    /// Loads the keyserver client TLS material and prepares the server. The
    /// keyserver is dialled on first use, so it need not be up yet; it must
    /// then present the configured (or default) keyserver identity.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        let identity = config
            .keyserver_identity()
            .map_err(AppError::KeyserverIdentity)?;
        let tls = tessera_tls::ClientTls::from_files(&config.keyserver.tls)?;
        // A renewed certificate or CA bundle reaches new connections.
        if let Some(every) = config.server.tls_reload() {
            let _watching = tls.watch(every);
        }
        let keys = KeyClient::new(&config.keyserver, &tls, &identity)?;
        // Its own channel for the keyserver's health check (the key
        // client does not expose its channel).
        let health = tls
            .expecting(&identity)
            .connect_lazy(&config.keyserver.address)?;
        let readiness: Readiness = std::sync::Arc::new(move || {
            let channel = health.clone();
            Box::pin(tessera_runtime::admin::upstream_serving(
                "keyserver",
                channel,
                "",
            ))
        });
        let w = &config.watermark;
        let service = WatermarkService::new(
            keys,
            Limits {
                stream_idle: config.server.stream_idle_timeout(),
                allowed_callers: CallerAllowList::new(ALLOWED_CALLERS, w.allowed_callers.clone()),
                max_image_bytes: w.max_image_bytes,
            },
            w.max_concurrent_jobs as usize,
        );
        Ok(Self {
            service,
            server: config.server.clone(),
            admin: config.admin.clone(),
            readiness,
        })
    }

    /// Binds and serves (mTLS, authz, health, reflection, limits).
    pub async fn spawn(self) -> Result<RunningApp, AppError> {
        Ok(GrpcServer::new(&self.server, policy())?
            .with_admin(self.admin.as_ref())
            .with_readiness(self.readiness)
            .add_service(self.service.into_server())
            .spawn()
            .await?)
    }
}
