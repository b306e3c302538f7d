//! TLS material that follows its files: certificate renewal without a
//! restart.
//!
//! A [`TlsSource`] holds what one set of [`TlsFiles`] says (our certificate
//! and key, the CA bundle) and re-reads the files when asked
//! ([`TlsSource::reload`]) or on a timer ([`TlsSource::watch`]). The rustls
//! configs built on a source never hold the material themselves: they ask
//! the source at every handshake (a certificate resolver, a client
//! certificate verifier, a server certificate verifier), so new connections
//! use the new material and connections already open finish on theirs.
//!
//! A reload is all or nothing and fails safe: files that do not parse, a key
//! that does not match its certificate, or a certificate naming another
//! identity than the one the process started with leave the current
//! material in place (logged; retried at the next tick). A process never
//! changes who it is by a file change: that needs a restart.
//!
//! The server's session cache belongs to the material, so a session opened
//! under the old CA bundle is never resumed after a rotation (resumption
//! skips the certificate checks).

use std::path::Path;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::{Identity, TlsError, TlsFiles};

/// Sessions a server keeps for resumption (rustls' default size).
const SESSION_CACHE: usize = 256;

/// The default interval of [`TlsSource::watch`] in the services.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// One reading of the files, parsed.
struct Material {
    /// The files' bytes as read: a reload with the same bytes is a no-op.
    raw: [Vec<u8>; 3],
    certified: Arc<CertifiedKey>,
    identity: Option<Identity>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    server_verifier: Arc<WebPkiServerVerifier>,
    sessions: Arc<ServerSessionMemoryCache>,
    generation: u64,
    /// When our certificate expires (Unix seconds).
    not_after: Option<i64>,
}

/// Our certificate, key and CA bundle, re-read from their files on demand.
pub struct TlsSource {
    files: TlsFiles,
    /// Servers: our own certificate must carry an identity of this domain.
    trust_domain: Option<String>,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Material>>,
}

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSource")
            .field("files", &self.files)
            .field("generation", &self.generation())
            .finish()
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_certs(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
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

pub(crate) fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        detail: e.to_string(),
    })
}

pub(crate) fn parse_roots(pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(pem, path)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

impl TlsSource {
    /// Reads the files once. `trust_domain`: a server's own certificate
    /// must carry a valid identity of it, so misissued material fails at
    /// start; `None` (clients): any identity, or none.
    pub fn load(files: &TlsFiles, trust_domain: Option<&str>) -> Result<Arc<Self>, TlsError> {
        let provider = crate::provider();
        let material = Self::parse(files, trust_domain, &provider, Self::read_all(files)?, 1)?;
        Ok(Arc::new(Self {
            files: files.clone(),
            trust_domain: trust_domain.map(str::to_owned),
            provider,
            current: RwLock::new(Arc::new(material)),
        }))
    }

    fn read_all(files: &TlsFiles) -> Result<[Vec<u8>; 3], TlsError> {
        Ok([read(&files.ca)?, read(&files.cert)?, read(&files.key)?])
    }

    fn parse(
        files: &TlsFiles,
        trust_domain: Option<&str>,
        provider: &Arc<CryptoProvider>,
        raw: [Vec<u8>; 3],
        generation: u64,
    ) -> Result<Material, TlsError> {
        let roots = parse_roots(&raw[0], &files.ca)?;
        let certs = parse_certs(&raw[1], &files.cert)?;
        let key = parse_key(&raw[2], &files.key)?;
        let identity = match trust_domain {
            Some(td) => Some(Identity::from_cert_der(&certs[0], td).map_err(|source| {
                TlsError::OwnIdentity {
                    path: files.cert.clone(),
                    source,
                }
            })?),
            None => Identity::from_cert_der_any_domain(&certs[0]).ok(),
        };
        let not_after = x509_parser::parse_x509_certificate(&certs[0])
            .ok()
            .map(|(_, c)| c.validity().not_after.timestamp());
        // Parses the key and checks it matches the certificate.
        let certified = CertifiedKey::from_der(certs, key, provider)?;
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| TlsError::ServerVerifier(e.to_string()))?;
        Ok(Material {
            raw,
            certified: Arc::new(certified),
            identity,
            client_verifier,
            server_verifier,
            sessions: ServerSessionMemoryCache::new(SESSION_CACHE),
            generation,
            not_after,
        })
    }

    fn current(&self) -> Arc<Material> {
        // A poisoned lock only means a panic elsewhere mid-swap; the Arc
        // inside is always whole.
        match self.current.read() {
            Ok(m) => m.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The files this source reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// 1 at start, one more for every reload that changed the material.
    pub fn generation(&self) -> u64 {
        self.current().generation
    }

    /// When the certificate in use expires (Unix seconds), for alerts.
    pub fn not_after(&self) -> Option<i64> {
        self.current().not_after
    }

    /// Our identity (the URI SAN of our certificate), if it has one.
    pub fn identity(&self) -> Option<Identity> {
        self.current().identity.clone()
    }

    /// Re-reads the files. `Ok(true)`: new material is in use for new
    /// connections; `Ok(false)`: the files did not change. On an error the
    /// current material stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let raw = Self::read_all(&self.files)?;
        let current = self.current();
        if raw == current.raw {
            return Ok(false);
        }
        let next = Self::parse(
            &self.files,
            self.trust_domain.as_deref(),
            &self.provider,
            raw,
            current.generation + 1,
        )?;
        if next.identity != current.identity {
            return Err(TlsError::IdentityChanged {
                path: self.files.cert.clone(),
                was: current.identity.as_ref().map(ToString::to_string),
                now: next.identity.as_ref().map(ToString::to_string),
            });
        }
        let generation = next.generation;
        match self.current.write() {
            Ok(mut m) => *m = Arc::new(next),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(next),
        }
        tracing::info!(
            cert = %self.files.cert.display(),
            generation,
            "TLS material reloaded: new connections use the new certificate and CA bundle"
        );
        Ok(true)
    }

    /// Re-reads the files every `every` until the source is dropped (the
    /// task holds it weakly). Failures are logged and retried.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(source) = weak.upgrade() else { break };
                if let Err(e) = source.reload() {
                    tracing::warn!(
                        cert = %source.files.cert.display(),
                        error = %e,
                        "TLS material not reloaded; keeping the current certificate"
                    );
                }
            }
        })
    }

    /// The current server verifier (chain, validity, host name).
    pub(crate) fn server_verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.current().server_verifier.clone()
    }
}

/// Our current certificate for every handshake, both directions.
#[derive(Debug)]
pub(crate) struct CurrentCert(pub(crate) Arc<TlsSource>);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Client certificates verified against the current CA bundle; always
/// mandatory. It names no acceptable CAs in the handshake (the list may
/// change under it): clients send their certificate anyway.
#[derive(Debug)]
pub(crate) struct CurrentClientVerifier(pub(crate) Arc<TlsSource>);

impl ClientCertVerifier for CurrentClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

/// The server's session cache of the current material.
#[derive(Debug)]
pub(crate) struct CurrentSessions(pub(crate) Arc<TlsSource>);

impl StoresServerSessions for CurrentSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.current().sessions.put(key, value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.current().sessions.get(key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.current().sessions.take(key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}
