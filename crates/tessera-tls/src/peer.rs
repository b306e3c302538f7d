//! Verified peers: a client accepts a server only when its certificate
//! chains to our CA, names the host we dialled (the standard webpki checks)
//! *and* carries the one SPIFFE identity we expect at that upstream. Every
//! service certificate names `localhost`, so the host check alone would let
//! a storage node answer as the keyserver.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::reload::TlsSource;
use crate::{Identity, IdentityError};

/// Who a client accepts at the other end of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Exactly this identity: every service-to-service channel.
    Exactly(Identity),
    /// Any `service` identity (of this trust domain when known): tools and
    /// tests that dial an address without naming who answers there. Still
    /// fails closed on a certificate without exactly one valid URI SAN.
    AnyService { trust_domain: Option<String> },
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedPeer::Exactly(id) => write!(f, "{id}"),
            ExpectedPeer::AnyService {
                trust_domain: Some(td),
            } => write!(f, "spiffe://{td}/service/<any>"),
            ExpectedPeer::AnyService { trust_domain: None } => {
                write!(f, "spiffe://<any>/service/<any>")
            }
        }
    }
}

/// Why a server certificate was refused after the webpki checks passed.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("wrong server identity: expected {expected}, the server presented {presented}")]
    Wrong {
        expected: ExpectedPeer,
        presented: Identity,
    },
    #[error(
        "wrong server identity: expected {expected}, the server certificate has none: {source}"
    )]
    NoIdentity {
        expected: ExpectedPeer,
        source: IdentityError,
    },
}

/// rustls shows a custom certificate error with `Debug`: make that the
/// sentence naming both identities.
impl fmt::Debug for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl ExpectedPeer {
    /// Checks the server's end-entity certificate against what we expect.
    pub fn check(&self, end_entity: &[u8]) -> Result<Identity, Box<PeerError>> {
        let presented = Identity::from_cert_der_any_domain(end_entity).map_err(|source| {
            PeerError::NoIdentity {
                expected: self.clone(),
                source,
            }
        })?;
        let ok = match self {
            ExpectedPeer::Exactly(id) => *id == presented,
            ExpectedPeer::AnyService { trust_domain } => {
                presented.kind() == "service"
                    && trust_domain
                        .as_deref()
                        .is_none_or(|td| td == presented.trust_domain())
            }
        };
        if ok {
            Ok(presented)
        } else {
            Err(Box::new(PeerError::Wrong {
                expected: self.clone(),
                presented,
            }))
        }
    }
}

/// The standard webpki verifier (chain, validity, host name) followed by
/// the identity check.
/// The CA bundle is the source's current one at every handshake.
#[derive(Debug)]
pub(crate) struct PeerVerifier {
    source: Arc<TlsSource>,
    expected: ExpectedPeer,
}

impl PeerVerifier {
    pub(crate) fn new(source: Arc<TlsSource>, expected: ExpectedPeer) -> Self {
        Self { source, expected }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.source.server_verifier().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.expected.check(end_entity).map_err(|e| {
            tracing::warn!(error = %e, server = ?server_name, "refusing the server");
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(*e))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.source
            .server_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.source
            .server_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.source.server_verifier().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use tessera_pki::Ca;

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn verifier(ca: &Ca, expected: ExpectedPeer) -> PeerVerifier {
        let dir = tempfile::tempdir().unwrap();
        let me = ca.issue_service("gateway").unwrap();
        let files = crate::TlsFiles::from_pki_dir(dir.path(), "gateway");
        std::fs::write(&files.ca, ca.cert_pem()).unwrap();
        std::fs::write(&files.cert, &me.cert_pem).unwrap();
        std::fs::write(&files.key, &me.key_pem).unwrap();
        PeerVerifier::new(TlsSource::load(&files, None).unwrap(), expected)
    }

    fn verify(v: &PeerVerifier, leaf: &str) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("localhost").unwrap();
        v.verify_server_cert(&der(leaf), &[], &name, &[], UnixTime::now())
    }

    fn keyserver() -> ExpectedPeer {
        ExpectedPeer::Exactly(
            Identity::parse_uri("spiffe://tessera.local/service/keyserver").unwrap(),
        )
    }

    #[test]
    fn accepts_only_the_expected_identity() {
        let ca = Ca::new("tessera.local").unwrap();
        let v = verifier(&ca, keyserver());
        assert!(verify(&v, &ca.issue_service("keyserver").unwrap().cert_pem).is_ok());

        // A valid certificate of the same CA, for `localhost`, but another service.
        let e = verify(&v, &ca.issue_service("storage-2").unwrap().cert_pem)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("expected spiffe://tessera.local/service/keyserver, the server presented spiffe://tessera.local/service/storage-2"),
            "{e}"
        );

        // No URI SAN, several URI SANs, a user, another trust domain: refused.
        for (name, uris) in [
            ("no-uri", vec![]),
            (
                "two-uris",
                vec![
                    "spiffe://tessera.local/service/keyserver".to_owned(),
                    "spiffe://tessera.local/service/storage-1".to_owned(),
                ],
            ),
            (
                "other-domain",
                vec!["spiffe://evil.example/service/keyserver".to_owned()],
            ),
            (
                "not-spiffe",
                vec!["https://tessera.local/service/keyserver".to_owned()],
            ),
        ] {
            let leaf = ca.issue_custom(name, &uris, true).unwrap();
            let e = verify(&v, &leaf.cert_pem).unwrap_err().to_string();
            assert!(
                e.contains("expected spiffe://tessera.local/service/keyserver"),
                "{name}: {e}"
            );
        }

        // The right identity from another CA fails the chain check first.
        let foreign = Ca::new("tessera.local").unwrap();
        let e = verify(&v, &foreign.issue_service("keyserver").unwrap().cert_pem).unwrap_err();
        assert!(
            matches!(
                e,
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature
                )
            ),
            "{e:?}"
        );
    }

    #[test]
    fn any_service_still_fails_closed() {
        let ca = Ca::new("tessera.local").unwrap();
        let v = verifier(
            &ca,
            ExpectedPeer::AnyService {
                trust_domain: Some("tessera.local".into()),
            },
        );
        assert!(verify(&v, &ca.issue_service("storage-1").unwrap().cert_pem).is_ok());
        for uris in [
            vec![],
            vec![
                "spiffe://tessera.local/service/a".to_owned(),
                "spiffe://tessera.local/service/b".to_owned(),
            ],
            vec!["spiffe://tessera.local/user/owner".to_owned()],
            vec!["spiffe://evil.example/service/keyserver".to_owned()],
        ] {
            let leaf = ca.issue_custom("x", &uris, true).unwrap();
            assert!(verify(&v, &leaf.cert_pem).is_err(), "{uris:?}");
        }
    }
}
