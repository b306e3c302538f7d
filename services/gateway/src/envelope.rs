//! Envelope encryption of DICOM metadata (paper 002's "encrypted twice"):
//! the data is sealed with AES-256-GCM under a fresh random data key, and
//! that data key is sealed once more under a key-encryption key the
//! keyserver derives for the study (purpose `dicom-metadata`). Both seals
//! bind the object and the part they belong to (associated data), so a part
//! moved to another object or slot does not open.
//!
//! ```text
//! "TSEV" 0x01 | nonce_k (12) | sealed data key (32 + 16) | nonce_d (12) | sealed data (n + 16)
//! ```

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

const MAGIC: &[u8; 5] = b"TSEV\x01";
const TAG_LEN: usize = 16;
const WRAPPED_LEN: usize = 32 + TAG_LEN;
const OVERHEAD: usize = MAGIC.len() + NONCE_LEN + WRAPPED_LEN + NONCE_LEN + TAG_LEN;

/// Why an envelope does not open (deliberately vague about which key).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("sealed part is malformed ({0})")]
    Malformed(&'static str),
    #[error("sealed part does not open: wrong key, wrong object, or altered bytes")]
    Forged,
    #[error("no randomness available")]
    Rng,
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // A 32-byte slice is always a valid AES-256 key.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key"))
}

fn aad(slot: &str, context: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(32 + context.len());
    a.extend_from_slice(b"tessera/envelope/v1|");
    a.extend_from_slice(slot.as_bytes());
    a.push(b'|');
    a.extend_from_slice(context.as_bytes());
    a
}

/// Seals `plain` for `context` (e.g. `<object id>|identifying`).
pub fn seal(
    kek: &[u8; 32],
    context: &str,
    plain: &[u8],
    rng: &SystemRandom,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut dek = [0u8; 32];
    let mut nk = [0u8; NONCE_LEN];
    let mut nd = [0u8; NONCE_LEN];
    rng.fill(&mut dek).map_err(|_| EnvelopeError::Rng)?;
    rng.fill(&mut nk).map_err(|_| EnvelopeError::Rng)?;
    rng.fill(&mut nd).map_err(|_| EnvelopeError::Rng)?;
    let mut wrapped = dek.to_vec();
    key(kek)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nk),
            Aad::from(aad("key", context)),
            &mut wrapped,
        )
        .map_err(|_| EnvelopeError::Forged)?;
    let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&nk);
    out.extend_from_slice(&wrapped);
    out.extend_from_slice(&nd);
    let at = out.len();
    out.extend_from_slice(plain);
    let tag = key(&dek)
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nd),
            Aad::from(aad("data", context)),
            &mut out[at..],
        )
        .map_err(|_| EnvelopeError::Forged)?;
    out.extend_from_slice(tag.as_ref());
    dek.fill(0);
    Ok(out)
}

/// Opens what [`seal`] produced for the same key and context.
pub fn open(kek: &[u8; 32], context: &str, sealed: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    if sealed.len() < OVERHEAD {
        return Err(EnvelopeError::Malformed("too short"));
    }
    let (magic, rest) = sealed.split_at(MAGIC.len());
    if magic != MAGIC {
        return Err(EnvelopeError::Malformed("not an envelope"));
    }
    let (nk, rest) = rest.split_at(NONCE_LEN);
    let (wrapped, rest) = rest.split_at(WRAPPED_LEN);
    let (nd, data) = rest.split_at(NONCE_LEN);
    let nonce = |n: &[u8]| Nonce::try_assume_unique_for_key(n).map_err(|_| EnvelopeError::Forged);
    let mut w = wrapped.to_vec();
    let dek = key(kek)
        .open_in_place(nonce(nk)?, Aad::from(aad("key", context)), &mut w)
        .map_err(|_| EnvelopeError::Forged)?;
    let mut dek_bytes = [0u8; 32];
    dek_bytes.copy_from_slice(dek);
    w.fill(0);
    let mut d = data.to_vec();
    let plain_len = key(&dek_bytes)
        .open_in_place(nonce(nd)?, Aad::from(aad("data", context)), &mut d)
        .map_err(|_| EnvelopeError::Forged)?
        .len();
    dek_bytes.fill(0);
    d.truncate(plain_len);
    Ok(d)
}

/// Frames several sealed parts into one object: "TSMO" 0x01, count, then
/// (length u64 LE, bytes) per part.
pub fn frame(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum::<usize>() + 9);
    out.extend_from_slice(b"TSMO\x01");
    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// Reads exactly `n` parts written by [`frame`].
pub fn unframe(bytes: &[u8], n: usize) -> Result<Vec<&[u8]>, EnvelopeError> {
    let rest = bytes
        .strip_prefix(b"TSMO\x01")
        .ok_or(EnvelopeError::Malformed("not a metadata object"))?;
    if rest.len() < 4 {
        return Err(EnvelopeError::Malformed("truncated"));
    }
    let (count, mut rest) = rest.split_at(4);
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count != n {
        return Err(EnvelopeError::Malformed("unexpected number of parts"));
    }
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 8 {
            return Err(EnvelopeError::Malformed("truncated"));
        }
        let (len, tail) = rest.split_at(8);
        let mut l = [0u8; 8];
        l.copy_from_slice(len);
        let len = u64::from_le_bytes(l);
        if len > tail.len() as u64 {
            return Err(EnvelopeError::Malformed("part longer than the object"));
        }
        let (part, tail) = tail.split_at(len as usize);
        parts.push(part);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(EnvelopeError::Malformed("trailing bytes"));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_binding_holds() {
        let rng = SystemRandom::new();
        let k = [7u8; 32];
        let s = seal(&k, "in-1|identifying", b"PATIENT^NAME", &rng).unwrap();
        assert_eq!(s.len(), 12 + OVERHEAD);
        assert_eq!(open(&k, "in-1|identifying", &s).unwrap(), b"PATIENT^NAME");
        // Fresh data key and nonces every time.
        let s2 = seal(&k, "in-1|identifying", b"PATIENT^NAME", &rng).unwrap();
        assert_ne!(s, s2);
        // Wrong key, wrong context, any flipped byte: refused.
        assert_eq!(
            open(&[8u8; 32], "in-1|identifying", &s),
            Err(EnvelopeError::Forged)
        );
        assert_eq!(open(&k, "in-2|identifying", &s), Err(EnvelopeError::Forged));
        for i in MAGIC.len()..s.len() {
            let mut t = s.clone();
            t[i] ^= 1;
            assert_eq!(
                open(&k, "in-1|identifying", &t),
                Err(EnvelopeError::Forged),
                "byte {i}"
            );
        }
        assert!(matches!(
            open(&k, "in-1|identifying", &s[..OVERHEAD - 1]),
            Err(EnvelopeError::Malformed(_))
        ));
        // The plaintext never appears in the sealed bytes.
        assert!(!s.windows(6).any(|w| w == b"PATIEN"));
    }

    #[test]
    fn frames_round_trip_and_refuse_lies() {
        let f = frame(&[b"abc", b"", b"defg"]);
        assert_eq!(unframe(&f, 3).unwrap(), vec![&b"abc"[..], b"", b"defg"]);
        assert!(unframe(&f, 2).is_err());
        assert!(unframe(&f[..f.len() - 1], 3).is_err());
        let mut lie = f.clone();
        lie[9] = 0xff; // first length: huge
        assert!(unframe(&lie, 3).is_err());
        let mut extra = f.clone();
        extra.push(0);
        assert!(unframe(&extra, 3).is_err());
    }
}
