//! The admin listener: plain HTTP on its own address (loopback by
//! default), off the mutual-TLS port, for what Prometheus and the kubelet
//! ask: `/metrics` (Prometheus text format), `/live` (200 while the process
//! serves) and `/ready` (200 when the service's own readiness check passes,
//! 503 with the reason otherwise, and 503 once shutdown began).
//!
//! It serves nothing secret: counters by method and status code, never an
//! identifier of a patient or a study.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// How long `/ready` waits for the service's check before answering 503.
pub const READY_TIMEOUT: Duration = Duration::from_secs(3);

/// The optional `[admin]` section of every service's config.
///
/// ```toml
/// [admin]
/// listen = "127.0.0.1:9464"   # plain HTTP: /metrics, /live, /ready
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (plain HTTP); port 0 picks a free
    /// port. Default `127.0.0.1:0`: loopback only. In a cluster, listen on
    /// the pod address so the kubelet and Prometheus reach it.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

impl AdminConfig {
    /// The admin listener must not take the gRPC port.
    pub fn validate(&self, grpc_listen: SocketAddr) -> Result<(), String> {
        if self.listen.port() != 0 && self.listen.port() == grpc_listen.port() {
            return Err(format!(
                "admin.listen {} uses the port of server.listen {grpc_listen}",
                self.listen
            ));
        }
        Ok(())
    }
}

/// What a readiness check returns: `Err(reason)` when not ready.
pub type ReadyFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A service's readiness check: its database opened, its upstreams
/// answer. Called on every `/ready`, bounded by [`READY_TIMEOUT`].
pub type Readiness = Arc<dyn Fn() -> ReadyFuture + Send + Sync>;

/// A check that always passes (services without dependencies).
pub fn always_ready() -> Readiness {
    Arc::new(|| Box::pin(std::future::ready(Ok(()))))
}

/// Asks `grpc.health.v1.Health/Check` of `service` ("" for the whole
/// server) over `channel`; `Err` names `what` and why.
pub async fn upstream_serving(
    what: &str,
    channel: tessera_tls::Channel,
    service: &str,
) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.to_owned(),
    };
    match tokio::time::timeout(READY_TIMEOUT, client.check(request)).await {
        Err(_) => Err(format!("{what}: no answer within {READY_TIMEOUT:?}")),
        Ok(Err(s)) => Err(format!("{what}: {:?}: {}", s.code(), s.message())),
        Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => Ok(()),
        Ok(Ok(r)) => Err(format!("{what}: health status {}", r.get_ref().status)),
    }
}

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    ready: Readiness,
    draining: Arc<AtomicBool>,
}

/// A running admin listener.
pub struct AdminServer {
    addr: SocketAddr,
    draining: Arc<AtomicBool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `config.listen` and serves in a task.
    pub async fn spawn(
        config: &AdminConfig,
        metrics: Metrics,
        ready: Readiness,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let draining = Arc::new(AtomicBool::new(false));
        let state = AdminState {
            metrics,
            ready,
            draining: draining.clone(),
        };
        let app = axum::Router::new()
            .route("/metrics", axum::routing::get(metrics_handler))
            .route("/live", axum::routing::get(|| async { "live\n" }))
            .route("/ready", axum::routing::get(ready_handler))
            .with_state(state);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "admin listener stopped");
            }
        });
        tracing::info!(%addr, "serving /metrics, /live and /ready over plain HTTP");
        Ok(Self {
            addr,
            draining,
            stop: Some(stop),
            task,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on `/ready` answers 503 (the gRPC server is draining).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Stops the listener.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.abort();
    }
}

async fn metrics_handler(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn ready_handler(State(state): State<AdminState>) -> (StatusCode, String) {
    if state.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match tokio::time::timeout(READY_TIMEOUT, (state.ready)()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".into()),
        Ok(Err(why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: readiness check took over {READY_TIMEOUT:?}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_to_loopback_and_rejects_the_grpc_port() {
        let c: AdminConfig = toml::from_str("").unwrap();
        assert_eq!(c.listen, "127.0.0.1:0".parse().unwrap());
        assert!(c.validate("127.0.0.1:7000".parse().unwrap()).is_ok());
        let c: AdminConfig = toml::from_str("listen = \"0.0.0.0:7000\"").unwrap();
        assert!(c.validate("0.0.0.0:7000".parse().unwrap()).is_err());
        assert!(toml::from_str::<AdminConfig>("bogus = 1").is_err());
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let code = out[9..12].parse().unwrap();
        let body = out.split_once("\r\n\r\n").unwrap().1.to_owned();
        (code, body)
    }

    #[tokio::test]
    async fn serves_metrics_live_and_ready() {
        let ok = Arc::new(AtomicBool::new(true));
        let flag = ok.clone();
        let ready: Readiness = Arc::new(move || {
            let ok = flag.load(Ordering::SeqCst);
            Box::pin(async move {
                if ok {
                    Ok(())
                } else {
                    Err("database closed".into())
                }
            })
        });
        let metrics = Metrics::new();
        metrics.gauge_fn("test_gauge", "a test gauge", || 42);
        let admin = AdminServer::spawn(&AdminConfig::default(), metrics, ready)
            .await
            .unwrap();
        let addr = admin.local_addr();
        assert_eq!(get(addr, "/live").await.0, 200);
        assert_eq!(get(addr, "/ready").await.0, 200);
        let (code, text) = get(addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(text.contains("tessera_test_gauge 42"), "{text}");
        ok.store(false, Ordering::SeqCst);
        let (code, why) = get(addr, "/ready").await;
        assert_eq!((code, why.as_str()), (503, "not ready: database closed\n"));
        ok.store(true, Ordering::SeqCst);
        admin.set_draining();
        assert_eq!(get(addr, "/ready").await.0, 503);
        assert_eq!(get(addr, "/nope").await.0, 404);
        admin.shutdown().await;
    }
}
