//! Inbound client streams with an idle timeout.
//!
//! A client that opens an upload, sends its header and then stalls would
//! otherwise hold whatever the handler took for it (an upload slot, a job
//! permit, buffered bytes) for as long as the connection lives; HTTP/2
//! keepalive only detects dead peers, not idle streams. Every handler that
//! reads a client stream reads it through [`IdleStream`].

use std::time::Duration;

use tonic::{Status, Streaming};

/// Default of `server.stream_idle_timeout_secs`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The status a call ends with when its client sent nothing for `idle`.
pub fn idle_status(idle: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "the client sent nothing for {} s (server.stream_idle_timeout_secs); the call is ended",
        idle.as_secs_f64()
    ))
}

/// A `tonic::Streaming<T>` whose [`message`](Self::message) fails with
/// DEADLINE_EXCEEDED ([`idle_status`]) when no message arrives for `idle`.
#[derive(Debug)]
pub struct IdleStream<T> {
    inner: Streaming<T>,
    idle: Duration,
}

impl<T> IdleStream<T> {
    pub fn new(inner: Streaming<T>, idle: Duration) -> Self {
        Self { inner, idle }
    }

    /// The next message, `None` at the end of the stream, or the stream's
    /// own error; DEADLINE_EXCEEDED after `idle` without a message.
    pub async fn message(&mut self) -> Result<Option<T>, Status> {
        match tokio::time::timeout(self.idle, self.inner.message()).await {
            Ok(r) => r,
            Err(_) => {
                tracing::info!(idle = ?self.idle, "client stream idle; ending the call");
                Err(idle_status(self.idle))
            }
        }
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }
}
