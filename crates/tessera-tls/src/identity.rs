//! Identity: the single URI SAN `spiffe://<trust-domain>/<kind>/<name>` of a
//! certificate. Small and unit-tested because every authorization decision
//! starts here.

use std::fmt;

use x509_parser::extensions::GeneralName;

/// The trust domain of the development PKI.
pub const DEFAULT_TRUST_DOMAIN: &str = "tessera.local";

/// The kind of a person's identity (`spiffe://<td>/user/<name>`).
pub const USER_KIND: &str = "user";
/// The kind of a service's identity (`spiffe://<td>/service/<name>`).
pub const SERVICE_KIND: &str = "service";

const MAX_URI_LEN: usize = 255;

/// A verified caller (or server): who a certificate says it is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    trust_domain: String,
    kind: String,
    name: String,
}

/// Why a certificate or URI does not name a Tessera identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate does not parse: {0}")]
    Certificate(String),
    #[error("certificate has no subjectAltName URI")]
    NoUriSan,
    #[error("certificate has {0} subjectAltName URIs; exactly one is required")]
    SeveralUriSans(usize),
    #[error("not a spiffe URI of the form spiffe://<trust-domain>/<kind>/<name>: {0:?}")]
    Malformed(String),
    #[error("trust domain {found:?} is not {expected:?}")]
    WrongTrustDomain { found: String, expected: String },
}

impl Identity {
    /// Builds an identity from its parts, validating each.
    pub fn new(trust_domain: &str, kind: &str, name: &str) -> Result<Self, IdentityError> {
        Self::parse_uri(&format!("spiffe://{trust_domain}/{kind}/{name}"))
    }

    /// The identity a client expects at an upstream: `configured` when the
    /// config names one, else `spiffe://<trust_domain>/service/<name>`.
    pub fn upstream(
        configured: Option<&str>,
        trust_domain: &str,
        name: &str,
    ) -> Result<Self, IdentityError> {
        match configured {
            Some(uri) => Self::parse_uri(uri),
            None => Self::new(trust_domain, "service", name),
        }
    }

    /// Parses `spiffe://<trust-domain>/<kind>/<name>`.
    ///
    /// Strict on purpose: lower-case DNS-like trust domain, kind of
    /// `[a-z]+`, name of `[a-z0-9._-]+` not starting with '.', no query,
    /// fragment, port, user info or extra path segments.
    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::Malformed(uri.chars().take(MAX_URI_LEN).collect());
        if uri.len() > MAX_URI_LEN {
            return Err(bad());
        }
        let rest = uri.strip_prefix("spiffe://").ok_or_else(bad)?;
        let mut parts = rest.split('/');
        let (Some(td), Some(kind), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && !td.starts_with(['.', '-'])
            && !td.ends_with(['.', '-']);
        let kind_ok = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase());
        let name_ok = !name.is_empty()
            && !name.starts_with('.')
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
            });
        if !(td_ok && kind_ok && name_ok) {
            return Err(bad());
        }
        Ok(Self {
            trust_domain: td.to_owned(),
            kind: kind.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Parses `uri` ([`Identity::parse_uri`]) and requires it to be in
    /// `trust_domain`, as a certificate must be ([`Identity::from_cert_der`]):
    /// for identities named in messages and configuration.
    pub fn parse_in_domain(uri: &str, trust_domain: &str) -> Result<Self, IdentityError> {
        Self::parse_uri(uri)?.in_domain(trust_domain)
    }

    /// `self` if it is in `trust_domain`, else [`IdentityError::WrongTrustDomain`].
    fn in_domain(self, trust_domain: &str) -> Result<Self, IdentityError> {
        if self.trust_domain != trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                found: self.trust_domain,
                expected: trust_domain.to_owned(),
            });
        }
        Ok(self)
    }

    /// `spiffe://<trust_domain>/<kind>/<name>`, not checked (a configured
    /// default, say; parse the result to check it).
    pub fn format_uri(trust_domain: &str, kind: &str, name: &str) -> String {
        format!("spiffe://{trust_domain}/{kind}/{name}")
    }

    /// Parses the identity out of a DER certificate: exactly one URI SAN,
    /// in `expected_trust_domain`.
    pub fn from_cert_der(der: &[u8], expected_trust_domain: &str) -> Result<Self, IdentityError> {
        Self::from_cert_der_any_domain(der)?.in_domain(expected_trust_domain)
    }

    /// The identity of a DER certificate (exactly one URI SAN, well formed)
    /// in whatever trust domain it names: for a client that compares it
    /// with the one identity it expects.
    pub fn from_cert_der_any_domain(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| IdentityError::Certificate(e.to_string()))?
            .ok_or(IdentityError::NoUriSan)?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|n| {
                if let GeneralName::URI(u) = n {
                    Some(*u)
                } else {
                    None
                }
            })
            .collect();
        let uri = match uris.as_slice() {
            [] => return Err(IdentityError::NoUriSan),
            [one] => *one,
            many => return Err(IdentityError::SeveralUriSans(many.len())),
        };
        Self::parse_uri(uri)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `service` or `user` in the development PKI.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// True for a person's identity (kind [`USER_KIND`]).
    pub fn is_user(&self) -> bool {
        self.kind == USER_KIND
    }

    /// True for a service's identity (kind [`SERVICE_KIND`]).
    pub fn is_service(&self) -> bool {
        self.kind == SERVICE_KIND
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URI SAN, `spiffe://<trust-domain>/<kind>/<name>`.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&Self::format_uri(
            &self.trust_domain,
            &self.kind,
            &self.name,
        ))
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse_uri(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_uris() {
        let id = Identity::parse_uri("spiffe://tessera.local/service/storage-1").unwrap();
        assert_eq!(id.trust_domain(), "tessera.local");
        assert_eq!(id.kind(), "service");
        assert_eq!(id.name(), "storage-1");
        assert_eq!(id.uri(), "spiffe://tessera.local/service/storage-1");
        assert_eq!(
            Identity::new("tessera.local", "user", "owner")
                .unwrap()
                .name(),
            "owner"
        );
    }

    #[test]
    fn upstream_identity_defaults_from_the_name() {
        let id = Identity::upstream(None, "tessera.local", "keyserver").unwrap();
        assert_eq!(id.uri(), "spiffe://tessera.local/service/keyserver");
        let id = Identity::upstream(
            Some("spiffe://prod.example/service/ks-a"),
            "tessera.local",
            "keyserver",
        )
        .unwrap();
        assert_eq!(id.uri(), "spiffe://prod.example/service/ks-a");
        assert!(Identity::upstream(Some("keyserver"), "tessera.local", "keyserver").is_err());
        assert!(Identity::upstream(None, "tessera.local", "Storage_1").is_err());
    }

    #[test]
    fn rejects_malformed_uris() {
        for uri in [
            "",
            "spiffe://",
            "https://tessera.local/user/owner",
            "spiffe://tessera.local/user",
            "spiffe://tessera.local/user/owner/extra",
            "spiffe://tessera.local/user/",
            "spiffe:///user/owner",
            "spiffe://tessera.local/User/owner",
            "spiffe://tessera.local/user/Owner",
            "spiffe://tessera.local/user/.hidden",
            "spiffe://tessera.local/user/owner?x=1",
            "spiffe://tessera.local:443/user/owner",
            "spiffe://user@tessera.local/user/owner",
            "spiffe://-bad.local/user/owner",
            "spiffe://tessera.local/user/own%20er",
        ] {
            assert!(
                matches!(Identity::parse_uri(uri), Err(IdentityError::Malformed(_))),
                "{uri:?} should be rejected"
            );
        }
        let long = format!("spiffe://tessera.local/user/{}", "a".repeat(300));
        assert!(Identity::parse_uri(&long).is_err());
    }

    #[test]
    fn identities_in_a_trust_domain_and_their_kinds() {
        let id =
            Identity::parse_in_domain("spiffe://hospital.example/user/owner", "hospital.example")
                .unwrap();
        assert!(id.is_user() && !id.is_service());
        assert_eq!(
            Identity::parse_in_domain("spiffe://tessera.local/user/owner", "hospital.example"),
            Err(IdentityError::WrongTrustDomain {
                found: "tessera.local".into(),
                expected: "hospital.example".into(),
            })
        );
        assert!(matches!(
            Identity::parse_in_domain("spiffe://tessera.local/User/owner", DEFAULT_TRUST_DOMAIN),
            Err(IdentityError::Malformed(_))
        ));
        let svc = Identity::parse_uri(&Identity::format_uri(
            DEFAULT_TRUST_DOMAIN,
            SERVICE_KIND,
            "gateway",
        ))
        .unwrap();
        assert!(svc.is_service() && !svc.is_user());
        assert_eq!(svc.uri(), "spiffe://tessera.local/service/gateway");
        // The grammar admits any lower-case kind; neither predicate does.
        let other = Identity::parse_uri("spiffe://tessera.local/admin/x").unwrap();
        assert!(!other.is_user() && !other.is_service());
    }

    #[test]
    fn garbage_der_is_an_error_not_a_panic() {
        for der in [&b""[..], b"\x30", b"\x30\x82\xff\xff", &[0u8; 64]] {
            assert!(matches!(
                Identity::from_cert_der(der, DEFAULT_TRUST_DOMAIN),
                Err(IdentityError::Certificate(_))
            ));
        }
    }
}
