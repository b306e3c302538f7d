//! The TLS accept loop for `tonic::transport::Server::serve_with_incoming`.
//!
//! Handshakes run in their own tasks so one slow or hostile client cannot
//! stall the accept loop. A connection is handed to tonic only after the
//! handshake verified the client certificate against our CA and its URI SAN
//! parsed into an [`Identity`]; everything else (plaintext, another CA, no
//! or several URI SANs, another trust domain) is dropped before HTTP/2.
//!
//! [`AcceptLimits`] bound what unauthenticated peers can hold: handshakes in
//! progress (a TCP connection that never speaks TLS holds one until the
//! handshake timeout), and connections overall. A connection over either
//! cap is closed at once, before any TLS work.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{Identity, ServerTls};

const ACCEPT_QUEUE: usize = 64;

/// Caps of one listener on what peers may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Open connections (handshaking or established); more are closed.
    pub max_connections: usize,
    /// TLS handshakes in progress; more are closed.
    pub max_handshakes: usize,
    /// A handshake not finished within this is abandoned.
    pub handshake_timeout: Duration,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_handshakes: 128,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// What tonic puts in every request's extensions for a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub identity: Identity,
    pub remote_addr: SocketAddr,
}

/// An authenticated mutual-TLS connection.
#[derive(Debug)]
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
    /// Held while the connection lives (`max_connections`).
    _slot: OwnedSemaphorePermit,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    remote_addr: SocketAddr,
    trust_domain: &str,
    timeout: Duration,
    slot: OwnedSemaphorePermit,
) -> Result<TlsConn, String> {
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake failed: {e}"))?;
    let (_, conn) = stream.get_ref();
    // The verifier already required a chain to our CA; no leaf means a bug
    // in that promise, so refuse rather than trust.
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| "no client certificate".to_owned())?;
    let identity = Identity::from_cert_der(leaf, trust_domain).map_err(|e| e.to_string())?;
    Ok(TlsConn {
        stream,
        peer: PeerInfo {
            identity,
            remote_addr,
        },
        _slot: slot,
    })
}

/// [`incoming_with`] the default [`AcceptLimits`].
pub fn incoming(
    listener: TcpListener,
    tls: &ServerTls,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    incoming_with(listener, tls, AcceptLimits::default())
}

/// Accepts TCP connections on `listener`, completes mutual TLS and yields
/// authenticated connections, within `limits`. The accept task ends when
/// the stream is dropped (tonic drops it on shutdown).
pub fn incoming_with(
    listener: TcpListener,
    tls: &ServerTls,
    limits: AcceptLimits,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes));
    let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
    let acceptor = TlsAcceptor::from(tls.config());
    let trust_domain = tls.trust_domain().to_owned();
    tokio::spawn(async move {
        loop {
            let (tcp, remote_addr) = tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Transient (e.g. EMFILE): back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Over a cap: dropping `tcp` closes it before any TLS work.
            let Ok(slot) = connections.clone().try_acquire_owned() else {
                tracing::debug!(%remote_addr, max = limits.max_connections, "connection limit reached; closing");
                continue;
            };
            let Ok(handshaking) = handshakes.clone().try_acquire_owned() else {
                tracing::debug!(%remote_addr, max = limits.max_handshakes, "handshake limit reached; closing");
                continue;
            };
            let tx = tx.clone();
            let acceptor = acceptor.clone();
            let trust_domain = trust_domain.clone();
            tokio::spawn(async move {
                let done = handshake(
                    acceptor,
                    tcp,
                    remote_addr,
                    &trust_domain,
                    limits.handshake_timeout,
                    slot,
                )
                .await;
                drop(handshaking);
                match done {
                    Ok(conn) => {
                        tracing::debug!(peer = %conn.peer.identity, %remote_addr, "mTLS connection");
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(reason) => {
                        tracing::info!(%remote_addr, %reason, "refused connection");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
