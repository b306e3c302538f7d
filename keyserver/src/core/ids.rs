//! Identifiers and small validated strings: study ids, request ids,
//! SPIFFE identities (checked on top of the suite's one grammar,
//! [`tessera_tls::Identity`]), purpose labels and free text.

use ring::rand::{SecureRandom, SystemRandom};
use tessera_tls::Identity;

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

/// An identity named in a message or the config (owner, on_behalf_of,
/// delegate, gateway): parsed by [`Identity::parse_uri`], plus the
/// keyserver's rules: in the configured `trust_domain`, kind `user` or
/// `service`.
pub fn parse_identity(field: &str, s: &str, trust_domain: &str) -> Result<Identity> {
    let id = Identity::parse_uri(s)
        .map_err(|e| KeyServerError::InvalidArgument(format!("{field}: {e}")))?;
    if id.trust_domain() != trust_domain {
        return Err(KeyServerError::InvalidArgument(format!(
            "{field}: not in trust domain {trust_domain}"
        )));
    }
    match id.kind() {
        "user" | "service" => Ok(id),
        _ => Err(KeyServerError::InvalidArgument(format!(
            "{field}: expected spiffe://{trust_domain}/<user|service>/<name>"
        ))),
    }
}

/// Like [`parse_identity`] but the kind must be `user`.
pub fn parse_user_identity(field: &str, s: &str, trust_domain: &str) -> Result<Identity> {
    let id = parse_identity(field, s, trust_domain)?;
    if id.kind() == "user" {
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
