//! rustls server configs from PEM files: ring provider, TLS 1.2/1.3 safe
//! defaults, client certificates required and verified against our CA only;
//! the material follows its files ([`crate::TlsSource`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::Duration;

use serde::Deserialize;

use crate::reload::{CurrentCert, CurrentClientVerifier, CurrentSessions, TlsSource};
use crate::{Identity, TlsError};

/// Where a process finds its TLS material (all PEM).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA that signs every peer we accept (and every server we call).
    pub ca: PathBuf,
    /// Our certificate (chain), leaf first.
    pub cert: PathBuf,
    /// Our private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl TlsFiles {
    /// `DIR/ca.crt`, `DIR/<name>.crt`, `DIR/<name>.key`: the layout written
    /// by `tessera pki init`.
    pub fn from_pki_dir(dir: &Path, name: &str) -> Self {
        Self {
            ca: dir.join("ca.crt"),
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        }
    }
}

pub(crate) fn load_certs(
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    crate::reload::parse_certs(&crate::reload::read(path)?, path)
}

pub(crate) fn load_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    crate::reload::parse_key(&crate::reload::read(path)?, path)
}

pub(crate) fn load_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    crate::reload::parse_roots(&crate::reload::read(path)?, path)
}

/// A server's TLS setup: the rustls config plus our own identity.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    identity: Identity,
    trust_domain: String,
    source: Arc<TlsSource>,
}

impl ServerTls {
    /// Loads the CA, our certificate and key; requires and verifies client
    /// certificates against that CA alone. Our own certificate must carry a
    /// valid identity in `trust_domain`, so misissued material fails at start.
    /// The config follows the files once [`ServerTls::watch`] runs.
    pub fn from_files(files: &TlsFiles, trust_domain: &str) -> Result<Self, TlsError> {
        Self::from_source(TlsSource::load(files, Some(trust_domain))?, trust_domain)
    }

    /// A server on `source` (loaded with this `trust_domain`): every
    /// handshake takes the source's current certificate and CA bundle.
    pub fn from_source(source: Arc<TlsSource>, trust_domain: &str) -> Result<Self, TlsError> {
        let own_identity = |e| TlsError::OwnIdentity {
            path: source.files().cert.clone(),
            source: e,
        };
        let identity = source
            .identity()
            .ok_or_else(|| own_identity(crate::IdentityError::NoUriSan))?;
        if identity.trust_domain() != trust_domain {
            return Err(own_identity(crate::IdentityError::WrongTrustDomain {
                found: identity.trust_domain().to_owned(),
                expected: trust_domain.to_owned(),
            }));
        }
        let provider = crate::provider();
        // Client certificates are mandatory (CurrentClientVerifier never
        // offers them as optional).
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(CurrentClientVerifier(source.clone())))
            .with_cert_resolver(Arc::new(CurrentCert(source.clone())));
        config.session_storage = Arc::new(CurrentSessions(source.clone()));
        // gRPC speaks HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            identity,
            trust_domain: trust_domain.to_owned(),
            source,
        })
    }

    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// The same server for HTTP/1.1 clients (the gateway's DICOMweb
    /// listener): ALPN `http/1.1`, everything else unchanged (the same
    /// source: it follows the files as this one does).
    pub fn for_http1(&self) -> Self {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            config: Arc::new(config),
            identity: self.identity.clone(),
            trust_domain: self.trust_domain.clone(),
            source: self.source.clone(),
        }
    }

    /// Who this server is (its certificate's URI SAN).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The material behind this config.
    pub fn source(&self) -> &Arc<TlsSource> {
        &self.source
    }

    /// Re-reads the files every `every` (see [`TlsSource::watch`]).
    pub fn watch(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        self.source.watch(every)
    }
}
