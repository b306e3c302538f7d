//! `App::build(config)` and `App::spawn()`: the real watermark service,
//! runnable in-process on `127.0.0.1:0` by tests and the launcher.

use std::net::SocketAddr;
use std::time::Duration;

use tessera_runtime::{GrpcServer, RunningServer, ServerConfig, ServerError};

use crate::config::Config;
use crate::keys::KeyClient;
use crate::service::{Limits, WatermarkService, policy};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The keyserver client TLS material is unusable.
    #[error("keyserver client: {0}")]
    KeyserverTls(#[from] tessera_tls::TlsError),
    /// The gRPC server failed to start.
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// A built (not yet listening) service.
pub struct App {
    service: WatermarkService,
    server: ServerConfig,
}

/// A listening service.
pub struct RunningApp {
    server: RunningServer,
}

impl App {
    /// Loads the keyserver client TLS material and prepares the server. The
    /// keyserver is dialled on first use, so it need not be up yet.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        let keys = KeyClient::new(&config.keyserver)?;
        let w = &config.watermark;
        let service = WatermarkService::new(
            keys,
            Limits {
                allowed_callers: w.allowed_callers.clone(),
                max_image_bytes: w.max_image_bytes,
            },
            w.max_concurrent_jobs as usize,
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
