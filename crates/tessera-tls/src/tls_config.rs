//! rustls server configs from PEM files: ring provider, TLS 1.2/1.3 safe
//! defaults, client certificates required and verified against our CA only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;

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

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what: "certificate",
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

pub(crate) fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A server's TLS setup: the rustls config plus our own identity.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    identity: Identity,
    trust_domain: String,
}

impl ServerTls {
    /// Loads the CA, our certificate and key; requires and verifies client
    /// certificates against that CA alone. Our own certificate must carry a
    /// valid identity in `trust_domain`, so misissued material fails at start.
    pub fn from_files(files: &TlsFiles, trust_domain: &str) -> Result<Self, TlsError> {
        let roots = load_roots(&files.ca)?;
        let certs = load_certs(&files.cert)?;
        let key = load_key(&files.key)?;
        let identity = Identity::from_cert_der(&certs[0], trust_domain).map_err(|source| {
            TlsError::OwnIdentity {
                path: files.cert.clone(),
                source,
            }
        })?;
        let provider = crate::provider();
        // Client certificates are mandatory: no allow_unauthenticated().
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        // gRPC speaks HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            identity,
            trust_domain: trust_domain.to_owned(),
        })
    }

    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.clone()
    }

    /// The same server for HTTP/1.1 clients (the gateway's DICOMweb
    /// listener): ALPN `http/1.1`, everything else unchanged.
    pub fn for_http1(&self) -> Self {
        let mut config = (*self.config).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            config: Arc::new(config),
            identity: self.identity.clone(),
            trust_domain: self.trust_domain.clone(),
        }
    }

    /// Who this server is (its certificate's URI SAN).
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}
