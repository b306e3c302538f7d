//! [`Channel`]: the gRPC channel every Tessera client uses. It is tonic's
//! channel plus one thing done in this one place for every outgoing call:
//! the W3C trace context of the current span (`traceparent`,
//! `tracestate`) goes into the request headers, so the server continues
//! the caller's trace (gateway -> keyserver, watermark, segmentation,
//! storage nodes; watermark -> keyserver; CLI -> gateway).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::Injector;
use tracing_opentelemetry::OpenTelemetrySpanExt;

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;

/// What a call through a [`Channel`] returns: tonic's transport errors,
/// boxed (a balanced channel adds its own), with their source chain kept
/// so `tonic::Status::from_error` and [`crate::timed_out`] still see them.
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response, tower::BoxError>> + Send + 'static>>;

/// The balancer of a channel over every address its name resolves to
/// ([`crate::ClientTls::connect_balanced`]), behind a buffer so clones
/// share it.
pub(crate) type Balanced = tower::buffer::Buffer<
    Request,
    Pin<Box<dyn Future<Output = Result<Response, tower::BoxError>> + Send + 'static>>,
>;

/// A mutual-TLS gRPC channel (see [`crate::ClientTls::connect`]) that
/// propagates the trace context on every call. Cheap to clone, like
/// tonic's. Either one tonic channel to one address, or a balancer over
/// one such channel per address of a name (each with its own TLS
/// handshake and identity check).
#[derive(Clone, Debug)]
pub struct Channel {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    One(tonic::transport::Channel),
    Balanced(Balanced),
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inner::One(c) => c.fmt(f),
            Inner::Balanced(_) => f.write_str("Balanced"),
        }
    }
}

impl Channel {
    /// Wraps a tonic channel: its calls carry the trace context from now on.
    pub fn new(inner: tonic::transport::Channel) -> Self {
        Self {
            inner: Inner::One(inner),
        }
    }

    pub(crate) fn balanced(inner: Balanced) -> Self {
        Self {
            inner: Inner::Balanced(inner),
        }
    }
}

impl tower::Service<Request> for Channel {
    type Response = Response;
    type Error = tower::BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        match &mut self.inner {
            Inner::One(c) => tower::Service::poll_ready(c, cx).map_err(Into::into),
            Inner::Balanced(b) => tower::Service::poll_ready(b, cx),
        }
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        inject_trace_context(req.headers_mut());
        match &mut self.inner {
            Inner::One(c) => {
                let f = c.call(req);
                Box::pin(async move { f.await.map_err(Into::into) })
            }
            Inner::Balanced(b) => Box::pin(b.call(req)),
        }
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
