//! `App::build(config)` and `App::spawn()`: the real segmentation service,
//! runnable in-process on `127.0.0.1:0` by tests and the launcher.

use tessera_runtime::{GrpcServer, RunningServer, ServerConfig, ServerError, StartError};
use tessera_tls::CallerAllowList;

use crate::config::{ALLOWED_CALLERS, Config};
use crate::service::{Limits, SegmentationService, policy};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The gRPC server failed to start.
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl From<AppError> for StartError {
    fn from(e: AppError) -> Self {
        match e {
            AppError::Server(e) => e.into(),
        }
    }
}

/// A built (not yet listening) service.
pub struct App {
    service: SegmentationService,
    server: ServerConfig,
    admin: Option<tessera_runtime::AdminConfig>,
}

/// A listening service: the server itself (bound address, health,
/// graceful shutdown).
pub type RunningApp = RunningServer;

impl App {
    /// Prepares the service from a validated config.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        let s = &config.segmentation;
        let service = SegmentationService::new(
            Limits {
                stream_idle: config.server.stream_idle_timeout(),
                allowed_callers: CallerAllowList::new(ALLOWED_CALLERS, s.allowed_callers.clone()),
                max_image_bytes: s.max_image_bytes,
            },
            s.max_concurrent_jobs as usize,
        );
        Ok(Self {
            service,
            server: config.server.clone(),
            admin: config.admin.clone(),
        })
    }

    /// Binds and serves (mTLS, authz, health, reflection, limits).
    pub async fn spawn(self) -> Result<RunningApp, AppError> {
        // No upstreams, no database: ready while serving.
        Ok(GrpcServer::new(&self.server, policy())?
            .with_admin(self.admin.as_ref())
            .add_service(self.service.into_server())
            .spawn()
            .await?)
    }
}
