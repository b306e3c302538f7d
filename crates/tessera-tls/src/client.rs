//! gRPC client channels over mutual TLS: our certificate, the CA as the only
//! root, the server name checked against the server certificate's SANs.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls_config::{load_certs, load_key, load_roots};
use crate::{TlsError, TlsFiles};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client's TLS setup, shared by every channel it opens.
#[derive(Clone, Debug)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl ClientTls {
    /// Loads the CA (the only trusted root), our certificate and key.
    pub fn from_files(files: &TlsFiles) -> Result<Self, TlsError> {
        let roots = load_roots(&files.ca)?;
        let certs = load_certs(&files.cert)?;
        let key = load_key(&files.key)?;
        let mut config = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    fn endpoint(addr: &str) -> Result<(Endpoint, String), TlsError> {
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
        let endpoint = Endpoint::from(uri)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(8 * 1024 * 1024);
        Ok((endpoint, host))
    }

    fn connector(
        &self,
        server_name: ServerName<'static>,
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
                let host = uri.host().unwrap_or_default();
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let port = uri.port_u16().unwrap_or(443);
                let tcp = TcpStream::connect((host, port)).await?;
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
    /// `localhost:7001`); the server certificate must name that host.
    pub async fn connect(&self, addr: &str) -> Result<Channel, TlsError> {
        let (endpoint, host) = Self::endpoint(addr)?;
        let name = Self::server_name(&host)?;
        Ok(endpoint
            .connect_with_connector(self.connector(name))
            .await?)
    }

    /// Like [`ClientTls::connect`] but connects on first use (and reconnects).
    pub fn connect_lazy(&self, addr: &str) -> Result<Channel, TlsError> {
        let (endpoint, host) = Self::endpoint(addr)?;
        let name = Self::server_name(&host)?;
        Ok(endpoint.connect_with_connector_lazy(self.connector(name)))
    }
}
