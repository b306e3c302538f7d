//! Tracing and OpenTelemetry: logs to stderr (text or JSON lines), OTLP/gRPC
//! span export when an endpoint is configured (off by default), W3C trace
//! context carried in gRPC metadata, and a span per RPC.
//!
//! Every process has a tracer, export or not: each RPC span belongs to a
//! trace (the caller's, from its `traceparent`, or a new one), its
//! `trace_id` field puts the id on every log line written inside the
//! request, and [`tessera_tls::Channel`] passes the context on to every
//! upstream call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Deserialize;
use tracing::Instrument;

use crate::metrics::StatusBody;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The `[telemetry]` section of every binary's config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `tracing` filter (EnvFilter syntax); `RUST_LOG` wins when set.
    pub log: String,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. None: no export.
    pub otlp_endpoint: Option<String>,
    /// `"json"`: one JSON object per log line (with the current span's
    /// fields: `trace_id` inside a request); `"text"`: human-readable.
    /// Unset: `text`, or `json` when the older `json = true` is set.
    pub log_format: Option<LogFormat>,
    /// Older spelling of `log_format = "json"`.
    pub json: bool,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log: "info".to_owned(),
            otlp_endpoint: None,
            log_format: None,
            json: false,
        }
    }
}

impl TelemetryConfig {
    /// The log format in effect.
    pub fn format(&self) -> LogFormat {
        match (self.log_format, self.json) {
            (Some(f), _) => f,
            (None, true) => LogFormat::Json,
            (None, false) => LogFormat::Text,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        EnvFilter::try_new(&self.log).map_err(|e| format!("telemetry.log: {e}"))?;
        if let Some(ep) = &self.otlp_endpoint
            && !(ep.starts_with("http://") || ep.starts_with("https://"))
        {
            return Err(format!(
                "telemetry.otlp_endpoint {ep:?}: use http(s)://host:port"
            ));
        }
        Ok(())
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("log filter: {0}")]
    Filter(String),
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("a global subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// Flushes and shuts down span export when dropped.
#[must_use = "dropping the guard stops span export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes pending spans now (also done on drop).
    pub fn shutdown(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("telemetry: shutdown: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber and propagator. Call once, from `main`,
/// inside the tokio runtime (the OTLP exporter needs it).
pub fn init(service_name: &str, cfg: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => EnvFilter::try_new(v),
        _ => EnvFilter::try_new(&cfg.log),
    }
    .map_err(|e| TelemetryError::Filter(e.to_string()))?;
    let provider = tracer_provider(service_name, cfg.otlp_endpoint.as_deref())?;
    // The log filter applies to log lines only: spans of INFO and above
    // are traced whatever the log level (`log = "warn"` keeps its traces).
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name.to_owned()))
        .with_filter(LevelFilter::INFO);
    let fmt_layer = log_layer(cfg.format(), std::io::stderr);
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// The log-line layer: text, or JSON objects that carry the spans each
/// line is in (the RPC span's `trace_id` inside a request).
fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    }
}

/// For a client process (the CLI): a tracer and the propagator, no log
/// output (the command's own output stays as it is). Its spans get trace
/// ids, so the calls it makes inside a span carry `traceparent`; they are
/// exported only with `otlp_endpoint`. Call inside the tokio runtime.
pub fn init_client(
    service_name: &str,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    let provider = tracer_provider(service_name, otlp_endpoint)?;
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name.to_owned()))
        .with_filter(LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// Sets the W3C trace-context propagator and builds the tracer provider:
/// spans exported over OTLP/gRPC to `otlp_endpoint` when given (batched),
/// otherwise kept local (ids for propagation and log lines, no export).
/// [`init`] uses it; so can a process that installs its own subscriber
/// (a test with an in-process collector).
pub fn tracer_provider(
    service_name: &str,
    otlp_endpoint: Option<&str>,
) -> Result<SdkTracerProvider, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let builder = match otlp_endpoint {
        None => builder,
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.to_owned())
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            builder.with_batch_exporter(exporter)
        }
    };
    Ok(builder.build())
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The tower layer that opens a span per RPC, parented on the caller's
/// trace context from the metadata.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcSpanLayer;

impl<S> tower::Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcSpan { inner }
    }
}

/// See [`RpcSpanLayer`].
#[derive(Clone, Debug)]
pub struct RpcSpan<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcSpan<S>
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
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let peer = req
            .extensions()
            .get::<tessera_tls::PeerInfo>()
            .map(|p| p.identity.uri())
            .unwrap_or_default();
        // Attributes: the method and the caller's service identity only,
        // never a request field (patient attributes stay out of traces).
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
            peer = %peer,
            trace_id = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        // No valid parent in the metadata just means a new trace.
        let _ = span.set_parent(parent);
        let trace_id = span.context().span().span_context().trace_id();
        if trace_id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        let fut = {
            let _enter = span.enter();
            self.inner.call(req)
        };
        let record = span.clone();
        Box::pin(
            async move {
                let mut res = fut.await?;
                crate::limits::normalize_limit_headers(res.headers_mut());
                // The span stays open until the status is known (the
                // trailers, after a streamed answer).
                Ok(StatusBody::watch(res, move |code| {
                    let numeric: i64 = code.parse().unwrap_or(-1);
                    record.record("rpc.grpc.status_code", numeric);
                    if numeric != 0 {
                        record.record("otel.status_code", "ERROR");
                    }
                }))
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::Injector;

    struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

    impl Injector for MetadataInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(k), Ok(v)) = (
                tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value.as_str()),
            ) {
                self.0.insert(k, v);
            }
        }
    }

    #[test]
    fn config_validation() {
        assert!(TelemetryConfig::default().validate().is_ok());
        let bad_ep = TelemetryConfig {
            otlp_endpoint: Some("127.0.0.1:4317".into()),
            ..TelemetryConfig::default()
        };
        assert!(bad_ep.validate().is_err());
        let bad_filter = TelemetryConfig {
            log: "=[".into(),
            ..TelemetryConfig::default()
        };
        assert!(bad_filter.validate().is_err());
    }

    #[test]
    fn injects_traceparent_of_a_sampled_context() {
        use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceState};
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let sc = SpanContext::new(
            opentelemetry::trace::TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            opentelemetry::trace::SpanId::from(0xb7ad6b7169203331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = opentelemetry::Context::new().with_remote_span_context(sc);
        let mut md = tonic::metadata::MetadataMap::new();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut MetadataInjector(&mut md));
        });
        assert_eq!(
            md.get("traceparent").unwrap().to_str().unwrap(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        // And the server side reads it back.
        let headers = md.into_headers();
        let back = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(&headers))
        });
        assert_eq!(
            back.span().span_context().trace_id(),
            opentelemetry::trace::TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128)
        );
    }

    #[test]
    fn log_format_json_or_text() {
        let json: TelemetryConfig = toml::from_str("log_format = \"json\"").unwrap();
        assert_eq!(json.format(), LogFormat::Json);
        let legacy: TelemetryConfig = toml::from_str("json = true").unwrap();
        assert_eq!(legacy.format(), LogFormat::Json);
        assert_eq!(TelemetryConfig::default().format(), LogFormat::Text);
        assert!(toml::from_str::<TelemetryConfig>("log_format = \"xml\"").is_err());
    }

    /// A JSON log line written inside an RPC carries the caller's trace id.
    #[tokio::test]
    async fn json_lines_inside_an_rpc_carry_the_trace_id() {
        use std::sync::{Arc, Mutex};
        use tower::{Layer as _, Service, ServiceExt};

        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let provider = tracer_provider("test", None).unwrap();
        let subscriber = tracing_subscriber::registry()
            .with(log_layer(LogFormat::Json, move || writer.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _default = tracing::subscriber::set_default(subscriber);

        let mut svc = RpcSpanLayer.layer(tower::service_fn(|_req: http::Request<()>| async {
            tracing::info!("inside the handler");
            Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
        }));
        let req = http::Request::builder()
            .uri("/tessera.keyserver.v1.KeyServer/DeriveKey")
            .header(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .body(())
            .unwrap();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        drop(res);
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let line = out
            .lines()
            .find(|l| l.contains("inside the handler"))
            .unwrap_or_else(|| panic!("no log line in {out:?}"));
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let spans = v["spans"].as_array().unwrap();
        assert_eq!(
            spans[0]["trace_id"], "0af7651916cd43dd8448eb211c80319c",
            "{line}"
        );
        assert_eq!(
            spans[0]["otel.name"],
            "tessera.keyserver.v1.KeyServer/DeriveKey"
        );
    }
}
