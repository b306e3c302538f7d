//! `App::build(config)` and `App::spawn()`: the real segmentation service,
//! runnable in-process on `127.0.0.1:0` by tests and the launcher.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_runtime::{GrpcServer, RunningServer, ServerConfig, ServerError};

use crate::config::Config;
use crate::service::{Limits, SegmentationService, policy};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The gRPC server failed to start.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// A built (not yet listening) service.
pub struct App {
    service: SegmentationService,
    server: ServerConfig,
}

/// A listening service.
pub struct RunningApp {
    server: RunningServer,
}

impl App {
    /// Prepares the service from a validated config.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        let s = &config.segmentation;
        let service = SegmentationService::new(
            Limits {
                allowed_callers: s.allowed_callers.clone(),
                max_image_bytes: s.max_image_bytes,
            },
            s.max_concurrent_jobs as usize,
        );
        Ok(Self {
            service,
            server: config.server.clone(),
        })
    }

    /// Binds and serves (mTLS, authz, health, reflection, limits).
    pub async fn spawn(self) -> Result<RunningApp, AppError> {
        let server = GrpcServer::new(&self.server, policy())?
            .add_service(self.service.into_server())
            .spawn()
            .await?;
        Ok(RunningApp { server })
    }
}

impl RunningApp {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops accepting and drains for at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.server.shutdown(grace).await;
    }
}
