//! [`Channel`]: the gRPC channel every Tessera client uses. It is tonic's
//! channel plus one thing done in this one place for every outgoing call:
//! the W3C trace context of the current span (`traceparent`,
//! `tracestate`) goes into the request headers, so the server continues
//! the caller's trace (gateway -> keyserver, watermark, segmentation,
//! storage nodes; watermark -> keyserver; CLI -> gateway).

use std::task::{Context, Poll};

use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A mutual-TLS gRPC channel (see [`crate::ClientTls::connect`]) that
/// propagates the trace context on every call. Cheap to clone, like
/// tonic's.
#[derive(Clone, Debug)]
pub struct Channel {
    inner: tonic::transport::Channel,
}

impl Channel {
    /// Wraps a tonic channel: its calls carry the trace context from now on.
    pub fn new(inner: tonic::transport::Channel) -> Self {
        Self { inner }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        inject_trace_context(req.headers_mut());
        self.inner.call(req)
    }
}

/// Writes the current span's trace context into `headers` with the
/// global propagator (W3C trace context once telemetry is installed; a
/// no-op before, or when the current span belongs to no trace).
pub fn inject_trace_context(headers: &mut http::HeaderMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}
