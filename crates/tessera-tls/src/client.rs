//! gRPC client channels over mutual TLS: our certificate, the CA as the only
//! root, the server name checked against the server certificate's SANs and
//! the server's SPIFFE identity against the one we expect there
//! ([`ClientTls::expecting`]); every channel has a connect timeout and,
//! when configured, a per-call timeout.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};

use crate::Channel;

use crate::peer::{ExpectedPeer, PeerVerifier};
use crate::reload::{CurrentCert, TlsSource};
use crate::{Identity, TlsError, TlsFiles};

/// How long a channel waits for its upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelTimeouts {
    /// TCP connect plus the TLS handshake.
    pub connect: Duration,
    /// Each call, until the answer starts (tonic `Endpoint::timeout`): a
    /// whole unary call, a whole client-streamed upload, the first answer of
    /// a streaming call. `None`: unbounded.
    pub call: Option<Duration>,
}

impl Default for ChannelTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            call: None,
        }
    }
}

/// HTTP/2 pings on a busy connection, so a peer that vanished (no FIN, no
/// RST) fails its calls instead of holding them.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A client's TLS setup, shared by every channel it opens. Narrow it to
/// one upstream with [`ClientTls::expecting`].
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    source: Arc<TlsSource>,
    own: Option<Identity>,
    expected: ExpectedPeer,
    timeouts: ChannelTimeouts,
}

/// True when `status` is a client-side timeout of a channel (tonic reports
/// those as CANCELLED "Timeout expired"): callers map it to
/// DEADLINE_EXCEEDED.
pub fn timed_out(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The status a caller passes on for an upstream's answer: a channel
/// timeout becomes DEADLINE_EXCEEDED, anything else is returned as it is.
pub fn deadline_status(status: tonic::Status) -> tonic::Status {
    if timed_out(&status) {
        tonic::Status::deadline_exceeded("no answer within the configured call timeout")
    } else {
        status
    }
}

impl ClientTls {
    /// Loads the CA (the only trusted root), our certificate and key. The
    /// channels follow the files once [`ClientTls::watch`] runs.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        Self::from_source(TlsSource::load(files, None)?)
    }

    /// A client on `source`: every handshake presents the source's current
    /// certificate and checks the server against its current CA bundle.
    pub fn from_source(source: Arc<TlsSource>) -> Result<Self, TlsError> {
        let provider = crate::provider();
        // Without an expected identity a server must still present one
        // valid service identity (of our trust domain when we have one).
        let own = source.identity();
        let expected = ExpectedPeer::AnyService {
            trust_domain: own.as_ref().map(|id| id.trust_domain().to_owned()),
        };
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier::new(
                source.clone(),
                expected.clone(),
            )))
            .with_client_cert_resolver(Arc::new(CurrentCert(source.clone())));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            source,
            own,
            expected,
            timeouts: ChannelTimeouts::default(),
        })
    }

    /// Re-reads the files every `every` (see [`TlsSource::watch`]).
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        self.source.watch(every)
    }

    /// The material behind this client.
    pub fn source(&self) -> &Arc<TlsSource> {
        &self.source
    }

    /// The same client that accepts only `expected` at the other end: the
    /// chain and host name checks stay, then the server certificate's
    /// single URI SAN must equal `expected`. A handshake with any other
    /// server fails naming both identities.
    ///
    /// The clone shares the session cache, which is safe: rustls resumes a
    /// session only under the very verifier (same `Arc`) that checked the
    /// certificate first, so a ticket from one upstream never stands in for
    /// the identity check of another.
    pub fn expecting(&self, expected: &Identity) -> Self {
        let expected = ExpectedPeer::Exactly(expected.clone());
        let mut config = (*self.config).clone();
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(PeerVerifier::new(
                self.source.clone(),
                expected.clone(),
            )));
        Self {
            config: Arc::new(config),
            source: self.source.clone(),
            own: self.own.clone(),
            expected,
            timeouts: self.timeouts,
        }
    }

    /// The same client with these timeouts on the channels it opens.
    pub fn with_timeouts(&self, timeouts: ChannelTimeouts) -> Self {
        Self {
            timeouts,
            ..self.clone()
        }
    }

    /// Our own identity (the URI SAN of our certificate), if it has one.
    pub fn identity(&self) -> Option<&Identity> {
        self.own.as_ref()
    }

    /// Who this client accepts at the other end.
    pub fn expected(&self) -> &ExpectedPeer {
        &self.expected
    }

    pub fn timeouts(&self) -> ChannelTimeouts {
        self.timeouts
    }

    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    fn endpoint(&self, addr: &str) -> Result<(Endpoint, String), TlsError> {
        let bad = |detail: &str| TlsError::Endpoint {
            endpoint: addr.to_owned(),
            detail: detail.to_owned(),
        };
        // Accept "host:port", "https://host:port" or "http://host:port";
        // the transport is always our mutual TLS.
        let authority = addr
            .strip_prefix("https://")
            .or_else(|| addr.strip_prefix("http://"))
            .unwrap_or(addr)
            .trim_end_matches('/');
        let uri: Uri = format!("http://{authority}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if uri.port_u16().is_none() {
            return Err(bad("no port"));
        }
        let mut endpoint = Endpoint::from(uri)
            .connect_timeout(self.timeouts.connect)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024)
            .max_frame_size(MAX_FRAME_BYTES);
        if let Some(call) = self.timeouts.call {
            endpoint = endpoint.timeout(call);
        }
        Ok((endpoint, host))
    }

    /// Dials `to` when given (one resolved address of a balanced channel),
    /// else the URI's host; the TLS server name is `server_name` either way.
    fn connector(
        &self,
        server_name: ServerName<'static>,
        to: Option<SocketAddr>,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
        Error = std::io::Error,
        Future = impl Send,
    > + Send
    + Clone
    + 'static {
        let connector = TlsConnector::from(self.config.clone());
        tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            async move {
                let tcp = match to {
                    Some(addr) => TcpStream::connect(addr).await?,
                    None => {
                        let host = uri.host().unwrap_or_default();
                        let host = host.trim_start_matches('[').trim_end_matches(']');
                        let port = uri.port_u16().unwrap_or(443);
                        TcpStream::connect((host, port)).await?
                    }
                };
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        })
    }

    fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
    }

    /// Connects now to `addr` (`host:port`, e.g. `127.0.0.1:7001` or
    /// `localhost:7001`); the server certificate must name that host and
    /// carry the identity this client expects.
    pub async fn connect(&self, addr: &str) -> Result<Channel, TlsError> {
        let (endpoint, host) = self.endpoint(addr)?;
        let name = Self::server_name(&host)?;
        Ok(Channel::new(
            endpoint
                .connect_with_connector(self.connector(name, None))
                .await?,
        ))
    }

    /// A TLS stream to `addr` (`host:port`) offering HTTP/1.1 only (ALPN
    /// `http/1.1`), for the gateway's DICOMweb listener; the server is
    /// checked as by [`ClientTls::connect`], within the connect timeout.
    pub async fn connect_http1(
        &self,
        addr: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, TlsError> {
        let (endpoint, host) = self.endpoint(addr)?;
        let port = endpoint.uri().port_u16().unwrap_or(443);
        let name = Self::server_name(&host)?;
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let failed = |e: std::io::Error| TlsError::Endpoint {
            endpoint: addr.to_owned(),
            detail: e.to_string(),
        };
        let connect = async {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
        };
        tokio::time::timeout(self.timeouts.connect, connect)
            .await
            .map_err(|_| failed(std::io::ErrorKind::TimedOut.into()))?
            .map_err(failed)
    }

    /// Like [`ClientTls::connect`] but connects on first use (and reconnects).
    pub fn connect_lazy(&self, addr: &str) -> Result<Channel, TlsError> {
        let (endpoint, host) = self.endpoint(addr)?;
        let name = Self::server_name(&host)?;
        Ok(Channel::new(
            endpoint.connect_with_connector_lazy(self.connector(name, None)),
        ))
    }

    /// A lazy channel that balances calls over every address `addr`'s host
    /// resolves to (DNS, every `every`): a headless Kubernetes Service
    /// names each replica. Each address gets its own connection, TLS
    /// handshake and identity check under the configured host name; calls
    /// go to the less loaded of two members picked at random (tower's
    /// power of two choices over pending requests). A resolution that
    /// fails or finds nothing keeps the members already known; with none
    /// known, the channel dials the name itself, as [`Self::connect_lazy`]
    /// does. Needs a Tokio runtime (it spawns the resolver).
    pub fn connect_balanced(&self, addr: &str, every: Duration) -> Result<Channel, TlsError> {
        self.connect_balanced_with(addr, every, dns_resolver())
    }

    /// The channel a service's `resolve_secs` setting asks for: 0 gives
    /// [`Self::connect_lazy`] (one connection to the name), more gives
    /// [`Self::connect_balanced_with`] looked up again that often.
    pub fn connect_resolving(
        &self,
        addr: &str,
        resolve_secs: u64,
        resolve: Resolver,
    ) -> Result<Channel, TlsError> {
        match resolve_secs {
            0 => self.connect_lazy(addr),
            secs => self.connect_balanced_with(addr, Duration::from_secs(secs), resolve),
        }
    }

    /// [`Self::connect_balanced`] with another resolver (tests inject
    /// theirs).
    pub fn connect_balanced_with(
        &self,
        addr: &str,
        every: Duration,
        resolve: Resolver,
    ) -> Result<Channel, TlsError> {
        use tokio_stream::StreamExt;
        let (endpoint, host) = self.endpoint(addr)?;
        let name = Self::server_name(&host)?;
        let port = endpoint.uri().port_u16().unwrap_or(443);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let changes = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, TlsError>);
        let balance = tower::balance::p2c::Balance::new(tower::load::PendingRequestsDiscover::new(
            changes,
            tower::load::CompleteOnResponse::default(),
        ));
        let boxed = tower::ServiceExt::map_future(balance, |f| {
            Box::pin(f) as crate::channel::ResponseFuture
        });
        let (svc, worker) = tower::buffer::Buffer::pair(boxed, BALANCE_BUFFER);
        tokio::spawn(worker);
        let this = self.clone();
        let member = move |to: Member| {
            let to = match to {
                Member::Addr(a) => Some(a),
                Member::ByName => None,
            };
            tonic::transport::Channel::new(this.connector(name.clone(), to), endpoint.clone())
        };
        tokio::spawn(discover(tx, resolve, host, port, every, member));
        Ok(Channel::balanced(svc))
    }
}

/// Requests waiting for a balanced channel's members (tonic's default).
const BALANCE_BUFFER: usize = 1024;

/// Largest HTTP/2 frame every Tessera endpoint accepts (client and server
/// alike; HTTP/2's default is 16 KiB). A 1 MiB chunk message then crosses
/// a hop as 4 DATA frames instead of 64, each handed to TLS and the socket
/// in one write of many records: fewer writes, wake-ups and frame headers
/// per object, the same bytes. A receiver holds at most one frame per
/// connection while decoding it.
pub const MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Longest `resolve_secs` a service accepts: a replica added later waits
/// at most this long for its first call.
pub const MAX_RESOLVE_SECS: u64 = 3600;

/// Checks a `resolve_secs` setting (`what` names it in the refusal).
pub fn check_resolve_secs(what: &str, secs: u64) -> Result<(), String> {
    if secs > MAX_RESOLVE_SECS {
        return Err(format!(
            "{what} must be at most {MAX_RESOLVE_SECS} (0: no balancing)"
        ));
    }
    Ok(())
}

/// Resolves `host`, `port` to the addresses to balance over.
pub type Resolver = Arc<
    dyn Fn(
            String,
            u16,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>,
        > + Send
        + Sync,
>;

/// The system resolver (`getaddrinfo` through Tokio).
pub fn dns_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((host.as_str(), port))
                .await?
                .collect())
        })
    })
}

/// One member of a balanced channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Member {
    Addr(SocketAddr),
    /// The name itself, dialled at connect time (nothing resolved yet).
    ByName,
}

type MemberChange = tower::discover::Change<Member, tonic::transport::Channel>;

/// Re-resolves the name every `every` and tells the balancer what came and
/// went, until the balancer is gone.
async fn discover(
    tx: tokio::sync::mpsc::Sender<MemberChange>,
    resolve: Resolver,
    host: String,
    port: u16,
    every: Duration,
    member: impl Fn(Member) -> tonic::transport::Channel,
) {
    use tower::discover::Change;
    let mut current = BTreeSet::new();
    loop {
        let found: BTreeSet<Member> = match resolve(host.clone(), port).await {
            Ok(addrs) => addrs.into_iter().map(Member::Addr).collect(),
            Err(e) => {
                tracing::warn!(%host, error = %e, "resolving an upstream failed; keeping its known addresses");
                BTreeSet::new()
            }
        };
        let next = if !found.is_empty() {
            found
        } else if current.is_empty() {
            BTreeSet::from([Member::ByName])
        } else {
            current.clone()
        };
        if next != current {
            tracing::debug!(%host, members = ?next, "upstream members");
        }
        for gone in current.difference(&next) {
            if tx.send(Change::Remove(*gone)).await.is_err() {
                return;
            }
        }
        for new in next.difference(&current) {
            if tx.send(Change::Insert(*new, member(*new))).await.is_err() {
                return;
            }
        }
        current = next;
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = tx.closed() => return,
        }
    }
}
