//! Oversized messages must answer `RESOURCE_EXHAUSTED` (as gRPC's own
//! implementations do), but tonic's decoder reports a message over the limit
//! as `OUT_OF_RANGE`. This wrapper rewrites exactly that status, and nothing
//! else, on the trailers-only response tonic sends for a refused request.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::HeaderValue;
use tonic::body::Body;
use tonic::server::NamedService;

/// Wraps a generated tonic server.
#[derive(Clone, Debug)]
pub struct OversizeAsResourceExhausted<S> {
    inner: S,
}

impl<S> OversizeAsResourceExhausted<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for OversizeAsResourceExhausted<S> {
    const NAME: &'static str = S::NAME;
}

fn is_oversize(resp: &http::Response<Body>) -> bool {
    let h = resp.headers();
    h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.windows(9).any(|w| w == b"too large") || m.windows(11).any(|w| w == b"too%20large")
        })
}

impl<S> tower::Service<http::Request<Body>> for OversizeAsResourceExhausted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut resp = fut.await?;
            if is_oversize(&resp) {
                resp.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("8"));
            }
            Ok(resp)
        })
    }
}
