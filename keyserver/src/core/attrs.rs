//! Canonical encoding of patient attributes.
//!
//! The key of a study is bound to its patient attributes, so the same set of
//! attributes must always encode to the same bytes whatever order a caller
//! sends them in. Encoding (all integers big-endian u32):
//!
//! ```text
//! "tessera-attrs-v1" | count | (len(name) | name | len(value) | value)*
//! ```
//!
//! with pairs sorted by name (bytewise). Names are unique labels
//! (`[a-z0-9_.-]{1,64}`); values are UTF-8, taken byte for byte: no Unicode
//! normalization, no trimming, no case folding. Callers (the gateway) must
//! present values exactly as they were at registration.

use crate::core::ids::validate_label;
use crate::error::{KeyServerError, Result};

/// Most attributes one study may be bound to.
pub const MAX_ATTRIBUTES: usize = 32;
/// Longest attribute value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024;

const DOMAIN: &[u8] = b"tessera-attrs-v1";

/// The canonical byte encoding of a validated attribute set.
#[derive(Clone, PartialEq, Eq)]
pub struct CanonicalAttributes(Vec<u8>);

impl std::fmt::Debug for CanonicalAttributes {
    // Never print patient data, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CanonicalAttributes(<{} bytes redacted>)", self.0.len())
    }
}

impl CanonicalAttributes {
    /// Validates and canonicalizes `(name, value)` pairs.
    pub fn new<N: AsRef<str>, V: AsRef<str>>(pairs: &[(N, V)]) -> Result<Self> {
        if pairs.is_empty() {
            return Err(KeyServerError::InvalidArgument(
                "attributes: at least one patient attribute is required".into(),
            ));
        }
        if pairs.len() > MAX_ATTRIBUTES {
            return Err(KeyServerError::InvalidArgument(format!(
                "attributes: more than {MAX_ATTRIBUTES}"
            )));
        }
        let mut sorted: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(n, v)| (n.as_ref(), v.as_ref()))
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut out = Vec::with_capacity(DOMAIN.len() + 4 + sorted.len() * 24);
        out.extend_from_slice(DOMAIN);
        push_len(&mut out, sorted.len());
        let mut prev: Option<&str> = None;
        for (name, value) in sorted {
            validate_label("attribute name", name)?;
            if prev == Some(name) {
                return Err(KeyServerError::InvalidArgument(format!(
                    "attributes: duplicate name {name:?}"
                )));
            }
            if value.len() > MAX_VALUE_BYTES {
                return Err(KeyServerError::InvalidArgument(format!(
                    "attributes: value of {name:?} longer than {MAX_VALUE_BYTES} bytes"
                )));
            }
            prev = Some(name);
            push_len(&mut out, name.len());
            out.extend_from_slice(name.as_bytes());
            push_len(&mut out, value.len());
            out.extend_from_slice(value.as_bytes());
        }
        Ok(Self(out))
    }

    /// The canonical bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

fn push_len(out: &mut Vec<u8>, n: usize) {
    // Lengths are bounded by the limits above, far below u32::MAX.
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_does_not_matter_but_values_do() {
        let a =
            CanonicalAttributes::new(&[("patient_id", "P1"), ("birth_date", "19700101")]).unwrap();
        let b =
            CanonicalAttributes::new(&[("birth_date", "19700101"), ("patient_id", "P1")]).unwrap();
        assert_eq!(a, b);
        let c =
            CanonicalAttributes::new(&[("birth_date", "19700101"), ("patient_id", "P2")]).unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn length_prefixes_prevent_ambiguity() {
        // "ab"+"c" and "a"+"bc" must differ.
        let a = CanonicalAttributes::new(&[("x", "ab"), ("y", "c")]).unwrap();
        let b = CanonicalAttributes::new(&[("x", "a"), ("y", "bc")]).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_bad_sets() {
        let empty: [(&str, &str); 0] = [];
        assert!(CanonicalAttributes::new(&empty).is_err());
        assert!(CanonicalAttributes::new(&[("a", "1"), ("a", "2")]).is_err());
        assert!(CanonicalAttributes::new(&[("Bad Name", "1")]).is_err());
        let long = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(CanonicalAttributes::new(&[("a", long.as_str())]).is_err());
        let many: Vec<(String, String)> = (0..=MAX_ATTRIBUTES)
            .map(|i| (format!("a{i}"), "v".to_string()))
            .collect();
        assert!(CanonicalAttributes::new(&many).is_err());
    }

    #[test]
    fn debug_never_prints_values() {
        let a = CanonicalAttributes::new(&[("name", "Jane Doe")]).unwrap();
        assert!(!format!("{a:?}").contains("Jane"));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn canonical_form_ignores_order(mut pairs in proptest::collection::btree_map("[a-z]{1,8}", ".{0,20}", 1..8)
            .prop_map(|m| m.into_iter().collect::<Vec<_>>())) {
            let a = CanonicalAttributes::new(&pairs).unwrap();
            pairs.reverse();
            let b = CanonicalAttributes::new(&pairs).unwrap();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn arbitrary_input_never_panics(pairs in proptest::collection::vec((".{0,70}", ".{0,40}"), 0..40)) {
            let _ = CanonicalAttributes::new(&pairs);
        }

        #[test]
        fn id_parsing_never_panics(s in ".{0,80}") {
            let _ = crate::core::ids::StudyId::parse(&s);
            let _ = crate::core::ids::RequestId::parse(&s);
            let _ = crate::core::ids::parse_identity("x", &s, "tessera.local");
        }
    }
}
