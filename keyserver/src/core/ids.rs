//! Identifiers and small validated strings: study ids, request ids,
//! SPIFFE identities (the suite's one grammar and trust-domain rule,
//! [`tessera_tls::Identity::parse_in_domain`], plus the keyserver's
//! stricter kind rule), purpose labels and free text.

use ring::rand::{SecureRandom, SystemRandom};
use tessera_tls::{Identity, IdentityError};

use crate::error::{KeyServerError, Result};

/// Longest free-text field (justification, reason), in bytes.
pub const MAX_TEXT_BYTES: usize = 512;

const ID_HEX_LEN: usize = 32;

fn parse_prefixed(kind: &str, prefix: &str, s: &str) -> Result<String> {
    let ok = s.len() == prefix.len() + ID_HEX_LEN
        && s.starts_with(prefix)
        && s[prefix.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(KeyServerError::InvalidArgument(format!(
            "malformed {kind} id: expected {prefix} followed by {ID_HEX_LEN} lowercase hex digits"
        )))
    }
}

/// 32 random lowercase hex digits (a replica's name among its peers).
pub fn random_hex(rng: &SystemRandom) -> Result<String> {
    random_prefixed(rng, "")
}

fn random_prefixed(rng: &SystemRandom, prefix: &str) -> Result<String> {
    let mut b = [0u8; ID_HEX_LEN / 2];
    rng.fill(&mut b)
        .map_err(|_| KeyServerError::Crypto("random generator failed".into()))?;
    Ok(format!("{prefix}{}", hex::encode(b)))
}

/// A pseudonymous study id: `st-` and 32 lowercase hex digits, random,
/// never derived from patient data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StudyId(String);

impl StudyId {
    /// Parses a study id, `InvalidArgument` if malformed.
    pub fn parse(s: &str) -> Result<Self> {
        parse_prefixed("study", "st-", s).map(Self)
    }
    /// Draws a fresh random study id.
    pub fn random(rng: &SystemRandom) -> Result<Self> {
        random_prefixed(rng, "st-").map(Self)
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A key request id: `rq-` and 32 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(String);

impl RequestId {
    /// Parses a request id, `InvalidArgument` if malformed.
    pub fn parse(s: &str) -> Result<Self> {
        parse_prefixed("request", "rq-", s).map(Self)
    }
    /// Draws a fresh random request id.
    pub fn random(rng: &SystemRandom) -> Result<Self> {
        random_prefixed(rng, "rq-").map(Self)
    }
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A standing approval id: `sa-` + 32 lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalId(String);

impl ApprovalId {
    /// Parses an id from a message.
    pub fn parse(s: &str) -> Result<Self> {
        parse_prefixed("approval", "sa-", s).map(Self)
    }
    /// A fresh random id.
    pub fn random(rng: &SystemRandom) -> Result<Self> {
        random_prefixed(rng, "sa-").map(Self)
    }
    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An identity named in a message or the config (owner, on_behalf_of,
/// delegate, gateway): [`Identity::parse_in_domain`] in the configured
/// `trust_domain` (grammar and domain: the suite's rules), then the
/// keyserver's stricter rule: the kind is `user` or `service` (the suite's
/// grammar admits any lower-case kind). Errors name `field`.
pub fn parse_identity(field: &str, s: &str, trust_domain: &str) -> Result<Identity> {
    let id = Identity::parse_in_domain(s, trust_domain).map_err(|e| {
        KeyServerError::InvalidArgument(match e {
            IdentityError::WrongTrustDomain { .. } => {
                format!("{field}: not in trust domain {trust_domain}")
            }
            e @ (IdentityError::Malformed(_)
            | IdentityError::Certificate(_)
            | IdentityError::NoUriSan
            | IdentityError::SeveralUriSans(_)) => format!("{field}: {e}"),
        })
    })?;
    if id.is_user() || id.is_service() {
        Ok(id)
    } else {
        Err(KeyServerError::InvalidArgument(format!(
            "{field}: expected spiffe://{trust_domain}/<user|service>/<name>"
        )))
    }
}

/// Like [`parse_identity`] but the kind must be `user`.
pub fn parse_user_identity(field: &str, s: &str, trust_domain: &str) -> Result<Identity> {
    let id = parse_identity(field, s, trust_domain)?;
    if id.is_user() {
        Ok(id)
    } else {
        Err(KeyServerError::InvalidArgument(format!(
            "{field}: must be a user identity (spiffe://{trust_domain}/user/<name>)"
        )))
    }
}

/// A label: 1..=64 chars of `[a-z0-9_.-]` (purposes, attribute names).
pub fn validate_label(field: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.' || b == b'-'
        });
    if ok {
        Ok(())
    } else {
        Err(KeyServerError::InvalidArgument(format!(
            "{field}: expected 1..64 characters of [a-z0-9_.-]"
        )))
    }
}

/// Free text (justification, reason): at most [`MAX_TEXT_BYTES`] bytes and no
/// control characters, so audit records stay printable.
pub fn validate_text(field: &str, s: &str) -> Result<()> {
    if s.len() > MAX_TEXT_BYTES {
        return Err(KeyServerError::InvalidArgument(format!(
            "{field}: longer than {MAX_TEXT_BYTES} bytes"
        )));
    }
    if s.chars().any(char::is_control) {
        return Err(KeyServerError::InvalidArgument(format!(
            "{field}: control characters are not allowed"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn study_ids_round_trip_and_reject_malformed() {
        let rng = SystemRandom::new();
        let id = StudyId::random(&rng).unwrap();
        assert_eq!(StudyId::parse(id.as_str()).unwrap(), id);
        for bad in [
            "",
            "st-",
            "st-0123",
            "rq-0123456789abcdef0123456789abcdef",
            "st-0123456789ABCDEF0123456789abcdef",
            "st-0123456789abcdef0123456789abcdeg",
            "st-0123456789abcdef0123456789abcdef0",
            "st-0123456789abcdef0123456789abcdé",
        ] {
            assert!(
                matches!(StudyId::parse(bad), Err(KeyServerError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(RequestId::parse("rq-0123456789abcdef0123456789abcdef").is_ok());
    }

    #[test]
    fn identities_are_checked() {
        const TD: &str = "tessera.local";
        assert_eq!(
            parse_identity("x", "spiffe://tessera.local/user/owner", TD)
                .unwrap()
                .kind(),
            "user"
        );
        assert_eq!(
            parse_identity("x", "spiffe://tessera.local/service/storage-1", TD)
                .unwrap()
                .name(),
            "storage-1"
        );
        for bad in [
            "spiffe://tessera.local/user/",
            "spiffe://tessera.local/admin/x",
            "spiffe://other/user/x",
            "spiffe://tessera.local/user/Owner",
            "spiffe://tessera.local/user/a/b",
        ] {
            assert!(parse_identity("x", bad, TD).is_err(), "{bad}");
        }
        assert!(parse_user_identity("x", "spiffe://tessera.local/service/gateway", TD).is_err());
        // The trust domain is the configured one, not a constant.
        assert!(parse_identity("x", "spiffe://hospital.example/user/owner", TD).is_err());
        assert!(
            parse_identity(
                "x",
                "spiffe://hospital.example/user/owner",
                "hospital.example"
            )
            .is_ok()
        );
    }

    /// Where the keyserver's rule and the suite's grammar differ: the
    /// keyserver is stricter (kind, trust domain) and never looser.
    #[test]
    fn the_keyserver_rule_is_the_grammar_and_stricter() {
        const TD: &str = "tessera.local";
        let invalid = |r: Result<Identity>, want: &str| matches!(r, Err(KeyServerError::InvalidArgument(ref m)) if m.starts_with("owner: ") && m.contains(want));
        // Admitted by tessera-tls, refused here: a kind other than user or
        // service, and another trust domain than the configured one.
        for (uri, want) in [
            ("spiffe://tessera.local/admin/x", "<user|service>"),
            ("spiffe://tessera.local/node/storage-1", "<user|service>"),
            (
                "spiffe://hospital.example/user/owner",
                "not in trust domain tessera.local",
            ),
        ] {
            assert!(Identity::parse_uri(uri).is_ok(), "{uri}");
            assert!(invalid(parse_identity("owner", uri, TD), want), "{uri}");
        }
        // Refused by the grammar: refused here with the grammar's message.
        for uri in [
            "",
            "spiffe://tessera.local/user/Owner",
            "spiffe://tessera.local/user/.hidden",
            "spiffe://tessera.local:443/user/owner",
            "spiffe://tessera.local/user/owner?x=1",
            "https://tessera.local/user/owner",
        ] {
            assert!(Identity::parse_uri(uri).is_err(), "{uri:?}");
            assert!(
                invalid(parse_identity("owner", uri, TD), "not a spiffe URI"),
                "{uri:?}"
            );
        }
        // A service where a person is meant.
        assert!(matches!(
            parse_user_identity("owner", "spiffe://tessera.local/service/gateway", TD),
            Err(KeyServerError::InvalidArgument(m)) if m.contains("must be a user identity")
        ));
    }

    #[test]
    fn labels_and_text() {
        assert!(validate_label("p", "pixels.v1").is_ok());
        assert!(validate_label("p", "").is_err());
        assert!(validate_label("p", "Pixels").is_err());
        assert!(validate_label("p", &"a".repeat(65)).is_err());
        assert!(validate_text("t", "for a second opinion").is_ok());
        assert!(validate_text("t", "line\nbreak").is_err());
        assert!(validate_text("t", &"a".repeat(MAX_TEXT_BYTES + 1)).is_err());
    }
}
