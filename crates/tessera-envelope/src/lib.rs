//! `tessera-envelope`: the one sealed-envelope format of Tessera (issue 13).
//! Every secret Tessera keeps at rest is sealed with it: the keyserver's
//! master secrets, audit signing key and grant keys under its KEK, the
//! gateway's identity-vault records under the vault key, and the DICOM
//! metadata and sealed pixels under per-study keys (two layers: a fresh data
//! key, itself sealed under the study key; see [`seal_layered`]).
//!
//! ```text
//! sealed = header (6) | nonce (12) | AES-256-GCM ciphertext (n) | tag (16)
//! header = "TSEL" | version 0x01 | purpose id (1)
//! AAD    = header | context
//! ```
//!
//! * The header is authenticated (it is part of the AAD), so a sealed value
//!   cannot be re-labelled with another purpose or version.
//! * The purpose ([`Purpose`]) says what the bytes are; [`open`] refuses a
//!   value sealed for another purpose before trying the key.
//! * The context is the caller's binding (a study id, an object id and part,
//!   a master-secret version): a value moved to another slot does not open.
//! * The nonce is 96 random bits from the caller's `SecureRandom` per seal.
//!   With random nonces, NIST SP 800-38D bounds one key to 2^32 seals; every
//!   key here seals far fewer (one vault, one KEK, one study).
//!
//! Pure: no I/O, no async, no global state. Key bytes are taken by
//! reference and every copy this crate makes (data keys, decrypted
//! plaintext) is wiped on drop ([`zeroize`]). ring's expanded AES key
//! schedule is built per call and dropped without wiping (ring offers no
//! hook for it without `unsafe`, which the workspace forbids).
#![forbid(unsafe_code)]

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use zeroize::Zeroizing;

/// First bytes of every sealed value.
pub const MAGIC: [u8; 4] = *b"TSEL";
/// The format version this crate writes and reads.
pub const VERSION: u8 = 1;
/// Bytes of the header: magic, version, purpose.
pub const HEADER_LEN: usize = MAGIC.len() + 2;
/// Bytes of the random nonce.
pub const NONCE_BYTES: usize = NONCE_LEN;
/// Bytes of the GCM tag.
pub const TAG_LEN: usize = 16;
/// What sealing adds to the plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_BYTES + TAG_LEN;
/// Bytes of a key (AES-256).
pub const KEY_LEN: usize = 32;
/// What [`seal_layered`] adds to the plaintext: a sealed data key, then the
/// sealed data.
pub const LAYERED_OVERHEAD: usize = OVERHEAD + KEY_LEN + OVERHEAD;

/// What a sealed value is; its id is the header's last byte. Ids are never
/// reused for another meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// Keyserver: a secret wrapped under the KEK (master secret, audit
    /// signing key, grant key); the context names the slot.
    KeyserverSecret,
    /// Gateway: a study record of the identity vault; context = study id.
    VaultStudy,
    /// Gateway: a DICOM instance record of the identity vault; context =
    /// `<study id>/<instance id>`.
    VaultInstance,
    /// A fresh data key sealed under a key-encryption key ([`seal_layered`]).
    DataKey,
    /// Gateway: a DICOM metadata part (identifying elements, container).
    DicomMetadata,
    /// Gateway: stored (compressed or unusual) DICOM pixels.
    DicomPixels,
}

impl Purpose {
    /// Every purpose, in id order.
    pub const ALL: [Purpose; 6] = [
        Purpose::KeyserverSecret,
        Purpose::VaultStudy,
        Purpose::VaultInstance,
        Purpose::DataKey,
        Purpose::DicomMetadata,
        Purpose::DicomPixels,
    ];

    /// The header byte.
    pub const fn id(self) -> u8 {
        match self {
            Purpose::KeyserverSecret => 1,
            Purpose::VaultStudy => 2,
            Purpose::VaultInstance => 3,
            Purpose::DataKey => 4,
            Purpose::DicomMetadata => 5,
            Purpose::DicomPixels => 6,
        }
    }

    /// The purpose of a header byte.
    pub fn from_id(id: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.id() == id)
    }
}

/// Why a value cannot be sealed or opened. Deliberately silent about which
/// key was tried or which byte was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum EnvelopeError {
    /// Shorter than a header, nonce and tag.
    #[error("sealed value is truncated")]
    Truncated,
    /// Does not start with the magic bytes.
    #[error("not a sealed value (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("sealed value has unsupported version {0}")]
    UnsupportedVersion(u8),
    /// Sealed for another purpose than the one asked for.
    #[error("sealed for {found:?}, expected {expected:?}")]
    WrongPurpose {
        expected: Purpose,
        found: Option<Purpose>,
    },
    /// The tag does not verify: wrong key, wrong context, or altered bytes.
    #[error("sealed value does not open: wrong key, wrong context, or altered bytes")]
    Forged,
    /// The random generator failed.
    #[error("no randomness available")]
    Rng,
}

fn header(purpose: Purpose) -> [u8; HEADER_LEN] {
    [
        MAGIC[0],
        MAGIC[1],
        MAGIC[2],
        MAGIC[3],
        VERSION,
        purpose.id(),
    ]
}

fn aad(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + context.len());
    a.extend_from_slice(header);
    a.extend_from_slice(context);
    a
}

fn aes(key: &[u8; KEY_LEN]) -> LessSafeKey {
    // AES-256 accepts every 32-byte key: the length is fixed by the type.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"))
}

/// Seals `plaintext` under `key` for `purpose`, bound to `context`.
pub fn seal(
    key: &[u8; KEY_LEN],
    purpose: Purpose,
    context: &[u8],
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, EnvelopeError> {
    let header = header(purpose);
    let mut nonce = [0u8; NONCE_BYTES];
    rng.fill(&mut nonce).map_err(|_| EnvelopeError::Rng)?;
    let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
    out.extend_from_slice(&header);
    out.extend_from_slice(&nonce);
    let at = out.len();
    out.extend_from_slice(plaintext);
    match aes(key).seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad(&header, context)),
        &mut out[at..],
    ) {
        Ok(tag) => {
            out.extend_from_slice(tag.as_ref());
            Ok(out)
        }
        Err(_) => {
            // Never leave a plaintext copy behind.
            zeroize::Zeroize::zeroize(&mut out);
            Err(EnvelopeError::Forged)
        }
    }
}

/// Reads the purpose a sealed value claims (not authenticated until it
/// opens).
pub fn purpose_of(sealed: &[u8]) -> Result<Option<Purpose>, EnvelopeError> {
    check_header(sealed).map(Purpose::from_id)
}

fn check_header(sealed: &[u8]) -> Result<u8, EnvelopeError> {
    if sealed.len() < OVERHEAD {
        return Err(EnvelopeError::Truncated);
    }
    if sealed[..MAGIC.len()] != MAGIC {
        return Err(EnvelopeError::BadMagic);
    }
    if sealed[MAGIC.len()] != VERSION {
        return Err(EnvelopeError::UnsupportedVersion(sealed[MAGIC.len()]));
    }
    Ok(sealed[MAGIC.len() + 1])
}

/// Opens what [`seal`] made with the same key, purpose and context. The
/// plaintext is wiped when dropped.
pub fn open(
    key: &[u8; KEY_LEN],
    purpose: Purpose,
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let id = check_header(sealed)?;
    if id != purpose.id() {
        return Err(EnvelopeError::WrongPurpose {
            expected: purpose,
            found: Purpose::from_id(id),
        });
    }
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (nonce, body) = rest.split_at(NONCE_BYTES);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Truncated)?;
    let mut buf = Zeroizing::new(body.to_vec());
    let n = aes(key)
        .open_in_place(nonce, Aad::from(aad(header, context)), &mut buf[..])
        .map_err(|_| EnvelopeError::Forged)?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// Two layers ("encrypted twice", paper 002): `plaintext` is sealed under a
/// fresh random data key for `purpose`, and the data key is sealed under
/// `kek` ([`Purpose::DataKey`]); both bound to `context`.
///
/// ```text
/// seal(kek, DataKey, context, data key) (82) | seal(data key, purpose, context, plaintext)
/// ```
pub fn seal_layered(
    kek: &[u8; KEY_LEN],
    purpose: Purpose,
    context: &[u8],
    plaintext: &[u8],
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, EnvelopeError> {
    let mut dek = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(&mut dek[..]).map_err(|_| EnvelopeError::Rng)?;
    let mut out = seal(kek, Purpose::DataKey, context, &dek[..], rng)?;
    out.reserve(plaintext.len() + OVERHEAD);
    out.extend_from_slice(&seal(&dek, purpose, context, plaintext, rng)?);
    Ok(out)
}

/// Opens what [`seal_layered`] made with the same key-encryption key,
/// purpose and context.
pub fn open_layered(
    kek: &[u8; KEY_LEN],
    purpose: Purpose,
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    const WRAPPED: usize = OVERHEAD + KEY_LEN;
    if sealed.len() < LAYERED_OVERHEAD {
        return Err(EnvelopeError::Truncated);
    }
    let (wrapped, data) = sealed.split_at(WRAPPED);
    let dek = open(kek, Purpose::DataKey, context, wrapped)?;
    let dek: Zeroizing<[u8; KEY_LEN]> = Zeroizing::new(
        <[u8; KEY_LEN]>::try_from(dek.as_slice()).map_err(|_| EnvelopeError::Forged)?,
    );
    open(&dek, purpose, context, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    fn layout_is_header_nonce_ciphertext_tag() {
        let s = seal(
            &[1; 32],
            Purpose::VaultStudy,
            b"st-1",
            b"abc",
            &SystemRandom::new(),
        )
        .unwrap();
        assert_eq!(s.len(), 3 + OVERHEAD);
        assert_eq!(&s[..4], b"TSEL");
        assert_eq!(s[4], VERSION);
        assert_eq!(s[5], Purpose::VaultStudy.id());
        assert_eq!(purpose_of(&s).unwrap(), Some(Purpose::VaultStudy));
    }

    #[test]
    fn purpose_ids_are_distinct_and_round_trip() {
        for p in Purpose::ALL {
            assert_eq!(Purpose::from_id(p.id()), Some(p));
        }
        let mut ids: Vec<u8> = Purpose::ALL.iter().map(|p| p.id()).collect();
        ids.dedup();
        assert_eq!(ids.len(), Purpose::ALL.len());
        assert_eq!(Purpose::from_id(0), None);
    }

    #[test]
    fn header_errors_are_named() {
        let rng = SystemRandom::new();
        let s = seal(&[1; 32], Purpose::DataKey, b"", b"", &rng).unwrap();
        assert_eq!(
            open(&[1; 32], Purpose::DataKey, b"", &s[..OVERHEAD - 1]),
            Err(EnvelopeError::Truncated)
        );
        let mut m = s.clone();
        m[0] ^= 1;
        assert_eq!(
            open(&[1; 32], Purpose::DataKey, b"", &m),
            Err(EnvelopeError::BadMagic)
        );
        let mut v = s.clone();
        v[4] = 2;
        assert_eq!(
            open(&[1; 32], Purpose::DataKey, b"", &v),
            Err(EnvelopeError::UnsupportedVersion(2))
        );
        assert_eq!(
            open(&[1; 32], Purpose::DicomPixels, b"", &s),
            Err(EnvelopeError::WrongPurpose {
                expected: Purpose::DicomPixels,
                found: Some(Purpose::DataKey)
            })
        );
        assert_eq!(
            open(&[2; 32], Purpose::DataKey, b"", &s),
            Err(EnvelopeError::Forged)
        );
        assert_eq!(
            open(&[1; 32], Purpose::DataKey, b"", &s)
                .unwrap()
                .as_slice(),
            b""
        );
    }

    #[test]
    fn opened_plaintext_and_data_keys_wipe_on_drop() {
        fn wipes<T: zeroize::Zeroize>(_: &Zeroizing<T>) {}
        let rng = SystemRandom::new();
        let s = seal_layered(
            &[3; 32],
            Purpose::DicomMetadata,
            b"o|identifying",
            b"PN",
            &rng,
        )
        .unwrap();
        let p = open_layered(&[3; 32], Purpose::DicomMetadata, b"o|identifying", &s).unwrap();
        wipes(&p);
        assert_eq!(p.as_slice(), b"PN");
    }
}
