//! Shared server plumbing for every Tessera binary: typed config (TOML plus
//! environment, injectable), telemetry (tracing, optional OTLP, a span per
//! RPC with the trace context from gRPC metadata) and the mutual-TLS gRPC
//! server with health, reflection, authorization and message limits, the
//! admin listener (Prometheus `/metrics`, `/live`, `/ready`), and
//! [`Service`], the `main` every service binary shares.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod files;
mod limits;
pub mod memory;
pub mod metrics;
pub mod server;
pub mod service_main;
pub mod snapshot;
pub mod stream;
pub mod telemetry;

pub use admin::{AdminConfig, Readiness};
pub use config::{
    ConfigError, ConfigSource, EXIT_CONFIG, Validate, load_config, validate_service_sections,
};
pub use files::{check_key_file_mode, connection_string, private_db_file};
pub use metrics::Metrics;
pub use server::{GrpcServer, MAX_MESSAGE_BYTES, RunningServer, ServerConfig, ServerError};
pub use service_main::{SHUTDOWN_GRACE, Service, Serving, StartError};
pub use stream::{DEFAULT_IDLE_TIMEOUT, IdleStream, idle_status};
pub use telemetry::TelemetryConfig;

/// Waits for SIGINT or SIGTERM (SIGINT only where SIGTERM does not exist).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
