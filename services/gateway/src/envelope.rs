//! Envelope encryption of DICOM metadata and sealed pixels (paper 002's
//! "encrypted twice"): the data is sealed under a fresh random data key,
//! and that data key under a key-encryption key the keyserver derives for
//! the study (purpose `dicom-metadata` or `dicom-pixels`). Both layers are
//! the one sealed-envelope format of `tessera-envelope`
//! ([`tessera_envelope::seal_layered`]) and bind the object and the part
//! they belong to (the context), so a part moved to another object or slot
//! does not open. This module adds the framing of several sealed parts
//! into one metadata object.

use ring::rand::SecureRandom;
pub use tessera_envelope::{EnvelopeError, Purpose};

/// Why a metadata object does not unframe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("sealed object is malformed ({0})")]
pub struct FrameError(&'static str);

/// Seals `plain` for `purpose` and `context` (e.g. `<object id>|identifying`).
pub fn seal(
    kek: &[u8; 32],
    purpose: Purpose,
    context: &str,
    plain: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, EnvelopeError> {
    tessera_envelope::seal_layered(kek, purpose, context.as_bytes(), plain, rng)
}

/// Opens what [`seal`] produced for the same key, purpose and context.
pub fn open(
    kek: &[u8; 32],
    purpose: Purpose,
    context: &str,
    sealed: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let mut plain = tessera_envelope::open_layered(kek, purpose, context.as_bytes(), sealed)?;
    // The caller owns the plaintext from here (it leaves as a file).
    Ok(std::mem::take(&mut *plain))
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
pub fn unframe(bytes: &[u8], n: usize) -> Result<Vec<&[u8]>, FrameError> {
    let rest = bytes
        .strip_prefix(b"TSMO\x01")
        .ok_or(FrameError("not a metadata object"))?;
    if rest.len() < 4 {
        return Err(FrameError("truncated"));
    }
    let (count, mut rest) = rest.split_at(4);
    let count = u32::from_le_bytes([count[0], count[1], count[2], count[3]]) as usize;
    if count != n {
        return Err(FrameError("unexpected number of parts"));
    }
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 8 {
            return Err(FrameError("truncated"));
        }
        let (len, tail) = rest.split_at(8);
        let mut l = [0u8; 8];
        l.copy_from_slice(len);
        let len = u64::from_le_bytes(l);
        if len > tail.len() as u64 {
            return Err(FrameError("part longer than the object"));
        }
        let (part, tail) = tail.split_at(len as usize);
        parts.push(part);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(FrameError("trailing bytes"));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    const META: Purpose = Purpose::DicomMetadata;

    #[test]
    fn round_trip_and_every_binding_holds() {
        let rng = SystemRandom::new();
        let k = [7u8; 32];
        let s = seal(&k, META, "in-1|identifying", b"PATIENT^NAME", &rng).unwrap();
        assert_eq!(s.len(), 12 + tessera_envelope::LAYERED_OVERHEAD);
        assert_eq!(
            open(&k, META, "in-1|identifying", &s).unwrap(),
            b"PATIENT^NAME"
        );
        // Fresh data key and nonces every time.
        let s2 = seal(&k, META, "in-1|identifying", b"PATIENT^NAME", &rng).unwrap();
        assert_ne!(s, s2);
        // Wrong key, wrong context, wrong purpose, any flipped byte: refused.
        assert_eq!(
            open(&[8u8; 32], META, "in-1|identifying", &s),
            Err(EnvelopeError::Forged)
        );
        assert_eq!(
            open(&k, META, "in-2|identifying", &s),
            Err(EnvelopeError::Forged)
        );
        assert!(open(&k, Purpose::DicomPixels, "in-1|identifying", &s).is_err());
        for i in 0..s.len() {
            let mut t = s.clone();
            t[i] ^= 1;
            assert!(open(&k, META, "in-1|identifying", &t).is_err(), "byte {i}");
        }
        assert_eq!(
            open(
                &k,
                META,
                "in-1|identifying",
                &s[..tessera_envelope::LAYERED_OVERHEAD - 1]
            ),
            Err(EnvelopeError::Truncated)
        );
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
