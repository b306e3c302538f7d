//! Plain HTTPS, outside the mutual-TLS mesh: the keyserver's owner webhooks
//! (issue 19). [`HttpsClient`] POSTs one small JSON body over HTTP/1.1 and
//! reads back the status, the server verified against a configured CA
//! bundle (no client certificate: the receiver is a hospital system, not a
//! Tessera service). [`https_acceptor`] is the receiving side for tests and
//! demos.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::TlsError;
use crate::tls_config::{load_certs, load_key, load_roots};

/// Longest URL accepted.
pub const URL_MAX: usize = 2048;
/// Most bytes of the answer read to find its status line.
const HEAD_MAX: usize = 8192;

/// An `https://host[:port]/path` URL, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpsUrl {
    host: String,
    port: u16,
    path: String,
}

impl HttpsUrl {
    /// Parses `text`: `https` only, a host, an optional port, a path (and
    /// query); no user info, no fragment, printable ASCII, at most
    /// [`URL_MAX`] bytes.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > URL_MAX {
            return Err(format!("at most {URL_MAX} bytes"));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("printable ASCII without spaces only".into());
        }
        let rest = text
            .strip_prefix("https://")
            .ok_or("must start with https:// (plain http is refused)")?;
        if rest.contains('#') {
            return Err("no fragment".into());
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err("no user info (user:password@) in the URL".into());
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [ in host")?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        ServerName::try_from(host.to_owned()).map_err(|_| format!("bad host {host:?}"))?;
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("bad port {p:?}"))?,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            path,
        })
    }

    /// The host (no brackets around an IPv6 address).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (443 unless given).
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// Why a POST did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("I/O: {0}")]
    Io(std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("not an HTTP answer")]
    BadAnswer,
}

/// An HTTPS client for small JSON POSTs.
#[derive(Clone)]
pub struct HttpsClient {
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for HttpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpsClient")
    }
}

impl HttpsClient {
    /// Trusts the CA certificates of the PEM bundle `ca_file` (and nothing
    /// else: no system roots).
    pub fn from_ca_file(ca_file: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(ca_file)?;
        let config = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// POSTs `body` as `application/json` to `url` and returns the HTTP
    /// status; the whole exchange within `timeout`.
    pub async fn post_json(
        &self,
        url: &HttpsUrl,
        body: &[u8],
        timeout: Duration,
    ) -> Result<u16, PostError> {
        tokio::time::timeout(timeout, self.post(url, body))
            .await
            .map_err(|_| PostError::Timeout(timeout))?
    }

    async fn post(&self, url: &HttpsUrl, body: &[u8]) -> Result<u16, PostError> {
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(PostError::Connect)?;
        let name = ServerName::try_from(url.host.clone()).map_err(|_| PostError::BadAnswer)?;
        let mut tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(PostError::Tls)?;
        let host = if url.host.contains(':') {
            format!("[{}]:{}", url.host, url.port)
        } else {
            format!("{}:{}", url.host, url.port)
        };
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tessera-keyserver\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            url.path,
            body.len()
        );
        tls.write_all(head.as_bytes())
            .await
            .map_err(PostError::Io)?;
        tls.write_all(body).await.map_err(PostError::Io)?;
        tls.flush().await.map_err(PostError::Io)?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 512];
        while !buf.contains(&b'\n') && buf.len() < HEAD_MAX {
            let n = tls.read(&mut chunk).await.map_err(PostError::Io)?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        status_of(&buf).ok_or(PostError::BadAnswer)
    }
}

/// The status code of an HTTP/1.x status line.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.trim();
    (code.len() == 3)
        .then(|| code.parse::<u16>().ok())
        .flatten()
        .filter(|c| (100..600).contains(c))
}

/// A TLS acceptor for a plain HTTPS receiver (no client certificates):
/// the certificate chain and key from PEM files. For tests and demos that
/// stand in for a hospital's webhook receiver.
pub fn https_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_https_only_and_checked() {
        let u = HttpsUrl::parse("https://hooks.example.org/tessera?x=1").unwrap();
        assert_eq!((u.host(), u.port()), ("hooks.example.org", 443));
        assert_eq!(u.path, "/tessera?x=1");
        let u = HttpsUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (u.host(), u.port(), u.path.as_str()),
            ("127.0.0.1", 8443, "/")
        );
        let u = HttpsUrl::parse("https://[::1]:9?a").unwrap();
        assert_eq!((u.host(), u.port(), u.path.as_str()), ("::1", 9, "/?a"));
        for bad in [
            "http://hooks.example.org/",
            "https://",
            "https://user:pw@hooks.example.org/",
            "https://hooks.example.org:0/",
            "https://hooks.example.org:99999/",
            "https://hooks example.org/",
            "https://hooks.example.org/#frag",
            "ftp://x",
        ] {
            assert!(HttpsUrl::parse(bad).is_err(), "{bad}");
        }
        assert!(HttpsUrl::parse(&format!("https://h/{}", "a".repeat(URL_MAX))).is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(status_of(b"HTTP/1.0 503 x\r\n"), Some(503));
        assert_eq!(status_of(b"SSH-2.0\r\n"), None);
        assert_eq!(status_of(b"HTTP/1.1 2000 x\r\n"), None);
        assert_eq!(status_of(b""), None);
    }
}
