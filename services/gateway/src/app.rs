//! `App::build(config)` and `App::spawn()`: the real gateway, runnable
//! in-process on `127.0.0.1:0` by tests and the launcher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tessera_runtime::{GrpcServer, RunningServer, ServerConfig, ServerError};

use crate::config::Config;
use crate::error::GatewayError;
use crate::service::{GatewayService, Limits, policy};
use crate::upstream::Upstreams;
use crate::vault::{Vault, load_key_file};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Client TLS material or the vault key is unusable: a configuration
    /// error.
    #[error("client TLS: {0}")]
    ClientTls(#[from] tessera_tls::TlsError),
    #[error("vault key: {0}")]
    VaultKey(String),
    #[error("vault: {0}")]
    Vault(GatewayError),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl AppError {
    /// True when fixing the configuration fixes the error (exit 64).
    pub fn is_config(&self) -> bool {
        matches!(self, AppError::ClientTls(_) | AppError::VaultKey(_))
    }
}

/// A built (not yet listening) gateway.
pub struct App {
    service: GatewayService,
    server: ServerConfig,
}

/// A listening gateway.
pub struct RunningApp {
    server: RunningServer,
}

impl App {
    /// Opens the vault and prepares lazy clients of every peer.
    pub fn build(config: &Config) -> Result<Self, AppError> {
        let up = Upstreams::new(config)?;
        let key = load_key_file(&config.vault.key_file).map_err(AppError::VaultKey)?;
        let vault = Vault::open(&config.vault.path, &key).map_err(AppError::Vault)?;
        let g = &config.gateway;
        let service = GatewayService::new(
            up,
            Arc::new(vault),
            Limits {
                max_image_bytes: g.max_image_bytes,
                reidentify_roles: g.reidentify_roles.clone(),
                temporal: config.dicom.temporal,
            },
            g.max_concurrent_jobs as usize,
            g.max_inflight_mib,
        );
        Ok(Self {
            service,
            server: config.server.clone(),
        })
    }

    /// Binds and serves (mTLS, authz, health, reflection, limits), then
    /// finishes in the background whatever a crash left half-done.
    pub async fn spawn(self) -> Result<RunningApp, AppError> {
        let sweeper = self.service.clone();
        let server = GrpcServer::new(&self.server, policy())?
            .add_service(self.service.into_server())
            .spawn()
            .await?;
        tokio::spawn(async move { sweeper.sweep_unfinished().await });
        Ok(RunningApp { server })
    }
}

impl RunningApp {
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Stops accepting and drains for at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.server.shutdown(grace).await;
    }
}
