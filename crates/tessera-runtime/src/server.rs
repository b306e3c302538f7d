//! The mutual-TLS gRPC server every Tessera service runs: health,
//! reflection, authorization, a span per RPC and explicit limits.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tessera_tls::{AccessConfig, Authz, AuthzLayer, Policy, Role, ServerTls, TlsFiles};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::{AdminConfig, AdminServer, Readiness};
pub use crate::limits::normalize_limit_status;
use crate::metrics::{CountingSink, Metrics, RpcMetricsLayer};
use crate::telemetry::RpcSpanLayer;

/// The largest gRPC message any Tessera server or client accepts or sends.
/// Large payloads are streamed in chunks well below it.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";
const HEALTH: &str = "grpc.health.v1.Health";

/// Longest configurable stream idle timeout (one hour).
const MAX_IDLE_TIMEOUT_SECS: u64 = 3600;

/// The `[server]` section of every binary's config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port.
    pub listen: SocketAddr,
    pub tls: TlsFiles,
    #[serde(default)]
    pub access: AccessConfig,
    /// In-flight RPCs allowed per connection.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_streams: u32,
    /// A client stream (upload) that sends no message for this long ends
    /// with DEADLINE_EXCEEDED, releasing what it held (upload slots, job
    /// permits); a download whose reader takes nothing for this long ends
    /// too. See [`crate::IdleStream`].
    #[serde(default = "default_idle_timeout")]
    pub stream_idle_timeout_secs: u64,
    /// Open connections (handshaking or established) on this listener;
    /// more are closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// TLS handshakes in progress at once; more connections are closed at
    /// once, so peers that connect and never speak cannot starve the rest
    /// for longer than `handshake_timeout_secs`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// A TLS handshake not finished within this is abandoned.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// How often the TLS files (this section's and the service's client
    /// ones) are checked for a renewed certificate or CA bundle; new
    /// connections use what changed, open ones finish. 0: never (restart
    /// to renew).
    #[serde(default = "default_tls_reload")]
    pub tls_reload_secs: u64,
}

fn default_tls_reload() -> u64 {
    tessera_tls::DEFAULT_RELOAD_INTERVAL.as_secs()
}

fn default_max_connections() -> usize {
    tessera_tls::AcceptLimits::default().max_connections
}
fn default_max_handshakes() -> usize {
    tessera_tls::AcceptLimits::default().max_handshakes
}
fn default_handshake_timeout() -> u64 {
    tessera_tls::AcceptLimits::default()
        .handshake_timeout
        .as_secs()
}

fn default_concurrency() -> u32 {
    256
}
fn default_idle_timeout() -> u64 {
    crate::stream::DEFAULT_IDLE_TIMEOUT.as_secs()
}

impl ServerConfig {
    /// Checks what can be checked without touching the network.
    pub fn validate(&self) -> Result<(), String> {
        self.access.validate()?;
        for (what, path) in [
            ("server.tls.ca", &self.tls.ca),
            ("server.tls.cert", &self.tls.cert),
            ("server.tls.key", &self.tls.key),
        ] {
            if !path.is_file() {
                return Err(format!("{what}: {} is not a readable file", path.display()));
            }
        }
        if self.max_concurrent_streams == 0 {
            return Err("server.max_concurrent_streams must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_handshakes == 0 {
            return Err(
                "server.max_connections and server.max_handshakes must be at least 1".into(),
            );
        }
        if !(1..=300).contains(&self.handshake_timeout_secs) {
            return Err("server.handshake_timeout_secs must be in 1..=300".into());
        }
        if self.tls_reload_secs > 3600 {
            return Err("server.tls_reload_secs must be in 0..=3600 (0: never)".into());
        }
        if !(1..=MAX_IDLE_TIMEOUT_SECS).contains(&self.stream_idle_timeout_secs) {
            return Err(format!(
                "server.stream_idle_timeout_secs must be in 1..={MAX_IDLE_TIMEOUT_SECS}"
            ));
        }
        Ok(())
    }

    /// How often TLS files are re-read; `None`: never.
    pub fn tls_reload(&self) -> Option<Duration> {
        (self.tls_reload_secs > 0).then(|| Duration::from_secs(self.tls_reload_secs))
    }

    /// How long a client stream may send (or a download's reader take)
    /// nothing before the call ends.
    pub fn stream_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.stream_idle_timeout_secs)
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The private key file is readable by group or others (a config
    /// error: exit 64).
    #[error("{0}")]
    KeyPermissions(String),
    #[error("TLS: {0}")]
    Tls(#[from] tessera_tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A server being assembled; see the crate README.
pub struct GrpcServer {
    listen: SocketAddr,
    tls: ServerTls,
    authz: Authz,
    refusal_sink: Option<std::sync::Arc<dyn tessera_tls::RefusalSink>>,
    max_concurrent_streams: u32,
    accept: tessera_tls::AcceptLimits,
    tls_reload: Option<Duration>,
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    metrics: Metrics,
    admin: Option<AdminConfig>,
    readiness: Readiness,
}

impl GrpcServer {
    /// Loads TLS material and builds the authorization decision from
    /// `policy` (plus reflection for every role) and `config.access`.
    pub fn new(config: &ServerConfig, policy: Policy) -> Result<Self, ServerError> {
        crate::files::check_key_file_mode("server.tls.key", &config.tls.key)
            .map_err(ServerError::KeyPermissions)?;
        let tls = ServerTls::from_files(&config.tls, &config.access.trust_domain)?;
        let policy = policy
            .allow(&format!("/{REFLECTION_V1}/*"), Role::ALL)
            .allow(&format!("/{REFLECTION_V1ALPHA}/*"), Role::ALL);
        let authz = Authz::new(policy, config.access.role_map());
        let metrics = Metrics::new();
        let source = tls.source().clone();
        metrics.gauge_fn(
            "tls_generation",
            "TLS material in use: 1 at start, one more per reload that changed it",
            move || i64::try_from(source.generation()).unwrap_or(i64::MAX),
        );
        let source = tls.source().clone();
        metrics.gauge_fn(
            "tls_cert_not_after_seconds",
            "When the server certificate in use expires (Unix time): alert well before it",
            move || source.not_after().unwrap_or(0),
        );
        Ok(Self {
            listen: config.listen,
            tls,
            authz,
            refusal_sink: None,
            max_concurrent_streams: config.max_concurrent_streams,
            tls_reload: config.tls_reload(),
            accept: tessera_tls::AcceptLimits {
                max_connections: config.max_connections,
                max_handshakes: config.max_handshakes,
                handshake_timeout: Duration::from_secs(config.handshake_timeout_secs),
            },
            routes: RoutesBuilder::default(),
            names: Vec::new(),
            metrics,
            admin: None,
            readiness: crate::admin::always_ready(),
        })
    }

    /// The server's metrics registry: the RPC layer records into it; the
    /// service adds its own metrics (a handle, cheap to clone).
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// Also serves `/metrics`, `/live` and `/ready` on the admin listener
    /// when `admin` is configured (the `[admin]` section).
    pub fn with_admin(mut self, admin: Option<&AdminConfig>) -> Self {
        self.admin = admin.cloned();
        self
    }

    /// The check behind `/ready` (default: always ready while serving).
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Hands every refusal of the authorization layer to `sink` too (the
    /// keyserver audits them in its chain), awaited before the reply.
    pub fn with_refusal_sink(mut self, sink: std::sync::Arc<dyn tessera_tls::RefusalSink>) -> Self {
        self.refusal_sink = Some(sink);
        self
    }

    /// Adds a generated tonic server (set its message limits first).
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(svc);
        self
    }

    /// Binds, registers health and reflection, and serves in a task.
    pub async fn spawn(self) -> Result<RunningServer, ServerError> {
        let listener =
            TcpListener::bind(self.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: self.listen,
                    source,
                })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: self.listen,
            source,
        })?;

        let (health, health_svc) = tonic_health::server::health_reporter();
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH)
            .with_service_name(REFLECTION_V1);
        let mut reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH)
            .with_service_name(REFLECTION_V1ALPHA);
        for name in &self.names {
            reflection = reflection.with_service_name(*name);
            reflection_alpha = reflection_alpha.with_service_name(*name);
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        let mut routes = self.routes;
        routes
            .add_service(health_svc)
            .add_service(reflection.build_v1()?)
            .add_service(reflection_alpha.build_v1alpha()?);

        let admin = match &self.admin {
            None => None,
            Some(config) => Some(
                AdminServer::spawn(config, self.metrics.clone(), self.readiness.clone())
                    .await
                    .map_err(|source| ServerError::Bind {
                        addr: config.listen,
                        source,
                    })?,
            ),
        };
        let known = self
            .names
            .iter()
            .map(|n| (*n).to_owned())
            .chain([HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA].map(str::to_owned));
        let metrics_layer = RpcMetricsLayer::new(self.metrics.clone(), known);
        let sink = CountingSink {
            metrics: self.metrics.clone(),
            next: self.refusal_sink,
        };

        let incoming = tessera_tls::incoming_with(listener, &self.tls, self.accept);
        // Renewed certificates and CA bundles reach new connections (the
        // task ends with the server's TLS material).
        if let Some(every) = self.tls_reload {
            let _watching = self.tls.watch(every);
        }
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_max_header_list_size(64 * 1024)
            // Windows above one chunk message, so a streamed object does not
            // stall on WINDOW_UPDATE round trips.
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_frame_size(tessera_tls::MAX_FRAME_BYTES)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Outermost: it sees the final (normalized) status of every
            // RPC, refusals of the authorization layer included.
            .layer(metrics_layer)
            .layer(RpcSpanLayer)
            .layer(AuthzLayer::new(self.authz).with_sink(std::sync::Arc::new(sink)))
            .add_routes(routes.routes());
        let identity = self.tls.identity().uri();
        tracing::info!(%local_addr, %identity, services = ?self.names, "serving gRPC over mutual TLS");
        let task = tokio::spawn(async move {
            server
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await
        });
        Ok(RunningServer {
            local_addr,
            admin,
            metrics: self.metrics,
            health,
            names: self.names,
            stop: Some(stop_tx),
            task,
        })
    }
}

/// A server running in a task.
pub struct RunningServer {
    local_addr: SocketAddr,
    admin: Option<AdminServer>,
    metrics: Metrics,
    health: HealthReporter,
    names: Vec<&'static str>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the admin listener serves, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// The server's metrics registry.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn health(&self) -> &HealthReporter {
        &self.health
    }

    /// Marks every service NOT_SERVING, stops accepting, lets in-flight RPCs
    /// finish for at most `grace`, then aborts what is left.
    pub async fn shutdown(mut self, grace: Duration) {
        if let Some(admin) = &self.admin {
            admin.set_draining();
        }
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for name in &self.names {
            self.health
                .set_service_status(*name, ServingStatus::NotServing)
                .await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(grace, &mut self.task).await {
            Ok(Ok(Ok(()))) => tracing::info!("server drained"),
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server ended with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!(?grace, "grace period over; aborting in-flight RPCs");
                self.task.abort();
                // Wait for the abort, so everything the services held
                // (databases, files) is released when shutdown returns.
                let _ = (&mut self.task).await;
            }
        }
        if let Some(admin) = self.admin.take() {
            admin.shutdown().await;
        }
    }

    /// Waits until the server stops by itself (it normally does not).
    pub async fn wait(mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Dropping without shutdown (e.g. a test ending) must not leak a
        // listening server.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> (tempfile::TempDir, ServerConfig) {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.crt", "s.crt", "s.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let d = dir.path().display();
        let text = format!(
            "listen = \"127.0.0.1:0\"\n{extra}\n[tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/s.crt\"\nkey = \"{d}/s.key\"\n"
        );
        let cfg: ServerConfig = toml::from_str(&text).unwrap();
        (dir, cfg)
    }

    #[test]
    fn tls_reload_interval_defaults_switches_off_and_is_bounded() {
        let (_d, c) = config("");
        assert_eq!(c.tls_reload(), Some(tessera_tls::DEFAULT_RELOAD_INTERVAL));
        assert!(c.validate().is_ok());
        let (_d, c) = config("tls_reload_secs = 0");
        assert_eq!(c.tls_reload(), None);
        assert!(c.validate().is_ok());
        let (_d, c) = config("tls_reload_secs = 3601");
        let e = c.validate().unwrap_err();
        assert!(e.contains("server.tls_reload_secs"), "{e}");
    }
}
