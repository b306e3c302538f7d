//! Prometheus metrics of one service: the RPC counters and latency
//! histogram every server records in one tower layer ([`RpcMetricsLayer`]),
//! authorization denials by reason, and whatever the service adds through
//! [`Metrics::register`] / [`Metrics::gauge_fn`]. Served as text on the
//! admin listener's `/metrics` (see [`crate::admin`]).
//!
//! Labels are bounded: the method label is the gRPC path only for services
//! the server registered (anything else is `unknown`), so a client sending
//! random paths cannot grow the registry.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// The `method` label of paths outside the server's registered services.
pub const UNKNOWN_METHOD: &str = "unknown";

/// Labels of `tessera_rpc_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

/// Labels of `tessera_rpc_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// Labels of `tessera_authz_denials_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    reason: String,
    caller_kind: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// One service's metrics registry. Cheap to clone (a handle).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Mutex<Registry>,
    requests: Family<RpcLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
    denials: Family<DenialLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the RPC and authorization metrics, every name
    /// prefixed `tessera_`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let requests = Family::<RpcLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC requests served, by method and gRPC status code",
            requests.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC request latency (until the response ends), by method",
            latency.clone(),
        );
        registry.register(
            "authz_denials",
            "RPCs refused by the authorization layer, by reason and caller kind",
            denials.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(registry),
                requests,
                latency,
                denials,
            }),
        }
    }

    /// Adds a service metric (a counter, gauge, histogram or family the
    /// service keeps and updates); `name` gets the `tessera_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// Adds a gauge read at scrape time from `read` (state the service
    /// already keeps: object counts, queue lengths).
    pub fn gauge_fn(&self, name: &str, help: &str, read: impl Fn() -> i64 + Send + Sync + 'static) {
        self.collector(name, help, MetricType::Gauge, read);
    }

    /// Adds a counter read at scrape time from `read` (a monotonic count
    /// the service already keeps); exposed as `tessera_NAME_total`.
    pub fn counter_fn(
        &self,
        name: &str,
        help: &str,
        read: impl Fn() -> u64 + Send + Sync + 'static,
    ) {
        self.collector(name, help, MetricType::Counter, move || {
            i64::try_from(read()).unwrap_or(i64::MAX)
        });
    }

    fn collector(
        &self,
        name: &str,
        help: &str,
        kind: MetricType,
        read: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        self.registry().register_collector(Box::new(FnCollector {
            name: name.to_owned(),
            help: help.to_owned(),
            counter: matches!(kind, MetricType::Counter),
            read: Box::new(read),
        }));
    }

    /// Adds a counter read at scrape time: the RPCs of `methods`
    /// (`package.Service/Method`) answered OK so far (a service's own
    /// count of derivations, stores, ... without touching its handlers).
    pub fn rpc_ok_counter(&self, name: &str, help: &str, methods: &[&str]) {
        let requests = self.inner.requests.clone();
        let labels: Vec<RpcLabels> = methods
            .iter()
            .map(|m| RpcLabels {
                method: (*m).to_owned(),
                code: (tonic::Code::Ok as i32).to_string(),
            })
            .collect();
        self.counter_fn(name, help, move || {
            labels
                .iter()
                .map(|l| requests.get(l).map_or(0, |c| c.get()))
                .sum()
        });
    }

    /// Requests of `method` (`package.Service/Method`) answered with gRPC
    /// status `code` so far.
    pub fn rpc_count(&self, method: &str, code: tonic::Code) -> u64 {
        self.inner
            .requests
            .get(&RpcLabels {
                method: method.to_owned(),
                code: (code as i32).to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, method: &str, code: &str, started: Instant) {
        self.inner
            .requests
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.inner
            .latency
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts one refusal of the authorization layer.
    fn denied(&self, reason: &str, caller: &str) {
        let caller_kind = match tessera_tls::Identity::parse_uri(caller) {
            Ok(id) if id.is_user() => "user",
            Ok(id) if id.is_service() => "service",
            Ok(_) => "other",
            Err(_) => "none",
        }
        .to_owned();
        self.inner
            .denials
            .get_or_create(&DenialLabels {
                reason: reason.to_owned(),
                caller_kind,
            })
            .inc();
    }
}

/// A metric read at scrape time.
struct FnCollector {
    name: String,
    help: String,
    counter: bool,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for FnCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnCollector")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Collector for FnCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let value = (self.read)();
        if self.counter {
            let metric =
                encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Counter)?;
            ConstCounter::new(u64::try_from(value).unwrap_or(0)).encode(metric)
        } else {
            let metric =
                encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(metric)
        }
    }
}

/// Counts the authorization layer's refusals, then hands them to the
/// service's own sink (the keyserver's audit chain), if any.
pub(crate) struct CountingSink {
    pub(crate) metrics: Metrics,
    pub(crate) next: Option<Arc<dyn tessera_tls::RefusalSink>>,
}

impl tessera_tls::RefusalSink for CountingSink {
    fn record(&self, refusal: tessera_tls::Refusal) -> tessera_tls::BoxFuture<()> {
        self.metrics.denied(refusal.reason, &refusal.caller);
        match &self.next {
            Some(next) => next.record(refusal),
            None => Box::pin(std::future::ready(())),
        }
    }
}

/// The tower layer that records every RPC: count by method and final
/// gRPC status, latency until the response body ends.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Metrics,
    services: Arc<BTreeSet<String>>,
}

impl RpcMetricsLayer {
    /// Records into `metrics`; paths of `services` (gRPC service names)
    /// keep their method label, others count as [`UNKNOWN_METHOD`].
    pub fn new(metrics: Metrics, services: impl IntoIterator<Item = String>) -> Self {
        Self {
            metrics,
            services: Arc::new(services.into_iter().collect()),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    layer: RpcMetricsLayer,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body + Send + 'static,
{
    type Response = http::Response<StatusBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/');
        let known = path
            .split_once('/')
            .is_some_and(|(service, _)| self.layer.services.contains(service));
        let method = if known { path } else { UNKNOWN_METHOD }.to_owned();
        let metrics = self.layer.metrics.clone();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            Ok(StatusBody::watch(res, move |code| {
                metrics.record(&method, code, started);
            }))
        })
    }
}

/// A response body watched for its final gRPC status: `on_status` gets
/// the code (as sent, e.g. `"0"`) once, from the headers of a
/// trailers-only response or from the trailers; `"13"` (INTERNAL) when the
/// body fails, `"1"` (CANCELLED) when it is dropped before its end.
pub struct StatusBody<B> {
    inner: Pin<Box<B>>,
    on_status: Option<OnStatus>,
}

/// Called once with a response's final gRPC status code.
type OnStatus = Box<dyn FnOnce(&str) + Send>;

/// The body the metrics layer answers with.
pub type MetricsBody<B> = StatusBody<B>;

impl<B> StatusBody<B> {
    /// Wraps the body of `res`, calling `on_status` with its final status.
    pub fn watch(
        res: http::Response<B>,
        on_status: impl FnOnce(&str) + Send + 'static,
    ) -> http::Response<Self> {
        let (parts, body) = res.into_parts();
        let mut on_status: Option<OnStatus> = Some(Box::new(on_status));
        // Trailers-only responses (errors before any message) carry the
        // status in the headers.
        if let Some(code) = parts.headers.get("grpc-status")
            && let Some(f) = on_status.take()
        {
            f(code.to_str().unwrap_or("unknown"));
        }
        http::Response::from_parts(
            parts,
            StatusBody {
                inner: Box::pin(body),
                on_status,
            },
        )
    }

    fn finish(&mut self, code: &str) {
        if let Some(f) = self.on_status.take() {
            f(code);
        }
    }
}

impl<B> Drop for StatusBody<B> {
    fn drop(&mut self) {
        // The client went away before the response ended.
        self.finish(&(tonic::Code::Cancelled as i32).to_string());
    }
}

impl<B: http_body::Body> http_body::Body for StatusBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    let code = code.to_str().unwrap_or("unknown").to_owned();
                    self.finish(&code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                self.finish(&(tonic::Code::Internal as i32).to_string());
            }
            Poll::Ready(None) => self.finish("unknown"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_has_rpc_denial_and_service_metrics() {
        let m = Metrics::new();
        m.record("tessera.gateway.v1.Gateway/Store", "0", Instant::now());
        m.denied(
            "no role of the caller is admitted",
            "spiffe://tessera.local/user/bob",
        );
        m.counter_fn("keyserver_derivations", "keys derived", || 7);
        m.gauge_fn("storage_objects", "objects held", || 3);
        assert_eq!(
            m.rpc_count("tessera.gateway.v1.Gateway/Store", tonic::Code::Ok),
            1
        );
        let text = m.encode();
        for line in [
            "tessera_rpc_requests_total{method=\"tessera.gateway.v1.Gateway/Store\",code=\"0\"} 1",
            "tessera_rpc_duration_seconds_count{method=\"tessera.gateway.v1.Gateway/Store\"} 1",
            "tessera_authz_denials_total{reason=\"no role of the caller is admitted\",caller_kind=\"user\"} 1",
            "tessera_keyserver_derivations_total 7",
            "tessera_storage_objects 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
