//! Key-encryption key, secret wrapping, HKDF derivation, attribute
//! commitments and the audit signing key. All primitives come from `ring`.

use std::path::Path;

use ring::hkdf::{HKDF_SHA256, KeyType, Salt};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use tessera_envelope::{EnvelopeError, Purpose};
use zeroize::Zeroizing;

use crate::core::attrs::CanonicalAttributes;
use crate::error::{KeyServerError, Result};

/// Length of every symmetric secret and derived key.
pub const KEY_LEN: usize = 32;

/// 32 bytes that are not secret on their own (study salt, commitment).
pub type Secret = [u8; KEY_LEN];

/// 32 bytes of key material (master secret, derived key, KEK bytes): wiped
/// from memory when dropped. The `ring` key objects built from them
/// (`LessSafeKey`, `hmac::Key`) live inside `ring`, which offers no wiping.
pub type SecretKey = Zeroizing<[u8; KEY_LEN]>;

fn crypto(msg: &str) -> KeyServerError {
    KeyServerError::Crypto(msg.to_owned())
}

/// Fills a fresh 32-byte secret from the system RNG.
pub fn random_secret(rng: &SystemRandom) -> Result<SecretKey> {
    let mut s = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(&mut s[..])
        .map_err(|_| crypto("random generator failed"))?;
    Ok(s)
}

/// The key-encryption key: wraps the master secrets, the audit signing key
/// and pending grant keys in the one envelope format (`tessera-envelope`).
/// Never stored in the database; wiped on drop.
pub struct Kek {
    key: SecretKey,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(<redacted>)")
    }
}

impl Kek {
    /// Builds a KEK from raw bytes.
    pub fn from_bytes(bytes: &Secret) -> Result<Self> {
        Ok(Self {
            key: Zeroizing::new(*bytes),
        })
    }

    /// Reads the KEK from a file holding 32 raw bytes or 64 hex digits
    /// (surrounding whitespace ignored). On Unix the file must not be
    /// readable or writable by group or others (0600 or 0400).
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display();
        let meta =
            std::fs::metadata(path).map_err(|e| KeyServerError::Kek(format!("{shown}: {e}")))?;
        if !meta.is_file() {
            return Err(KeyServerError::Kek(format!("{shown}: not a regular file")));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyServerError::Kek(format!(
                    "{shown}: permissions {mode:04o} are too open; use 0600 or 0400"
                )));
            }
        }
        let raw = Zeroizing::new(
            std::fs::read(path).map_err(|e| KeyServerError::Kek(format!("{shown}: {e}")))?,
        );
        let mut key: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
        let trimmed = raw.trim_ascii();
        if trimmed.len() == 2 * KEY_LEN && trimmed.iter().all(u8::is_ascii_hexdigit) {
            hex::decode_to_slice(trimmed, &mut key[..])
                .map_err(|_| KeyServerError::Kek(format!("{shown}: bad hex")))?;
        } else if raw.len() == KEY_LEN {
            key.copy_from_slice(&raw);
        } else {
            return Err(KeyServerError::Kek(format!(
                "{shown}: expected 32 raw bytes or 64 hex digits"
            )));
        }
        Self::from_bytes(&key)
    }

    /// Seals `plaintext` in the one envelope format (`tessera-envelope`,
    /// purpose `KeyserverSecret`): header, random nonce, AES-256-GCM
    /// ciphertext and tag. `aad` (the envelope's context) binds the blob to
    /// its slot (e.g. master version), so blobs cannot be swapped between
    /// slots.
    pub fn wrap(&self, rng: &SystemRandom, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        tessera_envelope::seal(&self.key, Purpose::KeyserverSecret, aad, plaintext, rng)
            .map_err(|e| crypto(&format!("seal failed: {e}")))
    }

    /// Decrypts a blob made by [`Kek::wrap`] with the same `aad`. The
    /// plaintext is wiped when dropped.
    pub fn unwrap(&self, aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        tessera_envelope::open(&self.key, Purpose::KeyserverSecret, aad, blob).map_err(
            |e| match e {
                EnvelopeError::Truncated => KeyServerError::Kek("wrapped secret too short".into()),
                EnvelopeError::Forged => KeyServerError::Kek(
                    "stored secret does not decrypt: wrong key-encryption key or edited database"
                        .into(),
                ),
                EnvelopeError::BadMagic
                | EnvelopeError::UnsupportedVersion(_)
                | EnvelopeError::WrongPurpose { .. }
                | EnvelopeError::Rng => KeyServerError::Kek(format!("stored secret: {e}")),
            },
        )
    }

    /// Unwraps a blob that must hold exactly one 32-byte secret.
    pub fn unwrap_secret(&self, aad: &[u8], blob: &[u8]) -> Result<SecretKey> {
        let v = self.unwrap(aad, blob)?;
        if v.len() != KEY_LEN {
            return Err(KeyServerError::Kek(
                "wrapped secret has the wrong length".into(),
            ));
        }
        let mut out: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
        out.copy_from_slice(&v);
        Ok(out)
    }
}

/// AAD of master secret `version`.
pub fn master_aad(version: u32) -> Vec<u8> {
    format!("tessera-keyserver/master/v{version}").into_bytes()
}

/// AAD of the audit signing key.
pub const SIGNING_KEY_AAD: &[u8] = b"tessera-keyserver/audit-signing-key";

/// AAD of the key held for an approved (or pending) request.
pub fn grant_aad(request_id: &str) -> Vec<u8> {
    format!("tessera-keyserver/grant/{request_id}").into_bytes()
}

struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn lp(n: usize) -> [u8; 4] {
    u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes()
}

/// One master secret version, with the commitment key derived from it.
pub struct Master {
    /// Version number (1, 2, ...).
    pub version: u32,
    secret: SecretKey,
    commit_key: hmac::Key,
}

impl std::fmt::Debug for Master {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Master(v{}, <redacted>)", self.version)
    }
}

impl Master {
    /// Wraps a raw master secret.
    pub fn new(version: u32, secret: SecretKey) -> Result<Self> {
        let mut ck: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
        Salt::new(HKDF_SHA256, b"tessera-keyserver/commit-salt")
            .extract(&secret[..])
            .expand(
                &[b"tessera/v1/attribute-commitment", &version.to_be_bytes()],
                Len(KEY_LEN),
            )
            .map_err(|_| crypto("hkdf expand"))?
            .fill(&mut ck[..])
            .map_err(|_| crypto("hkdf fill"))?;
        Ok(Self {
            version,
            secret,
            commit_key: hmac::Key::new(hmac::HMAC_SHA256, &ck[..]),
        })
    }

    /// The raw secret, only for wrapping at rest.
    pub fn secret(&self) -> &SecretKey {
        &self.secret
    }

    /// HKDF-SHA256: extract with the study salt over the master secret, then
    /// expand with info = domain | master version | study id | purpose |
    /// canonical attributes (each length-prefixed).
    pub fn derive_study_key(
        &self,
        salt: &Secret,
        study_id: &str,
        attrs: &CanonicalAttributes,
        purpose: &str,
    ) -> Result<SecretKey> {
        let mut out: SecretKey = Zeroizing::new([0u8; KEY_LEN]);
        let version = self.version.to_be_bytes();
        let (sl, pl, al) = (
            lp(study_id.len()),
            lp(purpose.len()),
            lp(attrs.as_bytes().len()),
        );
        let info: [&[u8]; 8] = [
            b"tessera/v1/study-key",
            &version,
            &sl,
            study_id.as_bytes(),
            &pl,
            purpose.as_bytes(),
            &al,
            attrs.as_bytes(),
        ];
        Salt::new(HKDF_SHA256, salt)
            .extract(&self.secret[..])
            .expand(&info, Len(KEY_LEN))
            .map_err(|_| crypto("hkdf expand"))?
            .fill(&mut out[..])
            .map_err(|_| crypto("hkdf fill"))?;
        Ok(out)
    }

    // The study id and salt make equal attributes of two studies commit to
    // unrelated values, so commitments do not link studies.
    fn commitment_input(study_id: &str, salt: &Secret, attrs: &CanonicalAttributes) -> Vec<u8> {
        let mut msg = Vec::with_capacity(4 + study_id.len() + KEY_LEN + attrs.as_bytes().len());
        msg.extend_from_slice(&lp(study_id.len()));
        msg.extend_from_slice(study_id.as_bytes());
        msg.extend_from_slice(salt);
        msg.extend_from_slice(attrs.as_bytes());
        msg
    }

    /// Keyed commitment: HMAC-SHA256(commit key, len | study id | salt | attrs).
    pub fn commitment(&self, study_id: &str, salt: &Secret, attrs: &CanonicalAttributes) -> Secret {
        let tag = hmac::sign(
            &self.commit_key,
            &Self::commitment_input(study_id, salt, attrs),
        );
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Constant-time check of a commitment.
    pub fn verify_commitment(
        &self,
        study_id: &str,
        salt: &Secret,
        attrs: &CanonicalAttributes,
        expected: &Secret,
    ) -> bool {
        let msg = Self::commitment_input(study_id, salt, attrs);
        hmac::verify(&self.commit_key, &msg, expected).is_ok()
    }
}

/// The Ed25519 key that signs audit checkpoints and the chain head.
pub struct AuditSigner {
    pair: Ed25519KeyPair,
}

impl AuditSigner {
    /// Generates a new key pair; returns the signer and its PKCS#8 document.
    pub fn generate(rng: &SystemRandom) -> Result<(Self, Zeroizing<Vec<u8>>)> {
        let doc = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| crypto("ed25519 keygen"))?;
        let pkcs8 = Zeroizing::new(doc.as_ref().to_vec());
        Ok((Self::from_pkcs8(&pkcs8)?, pkcs8))
    }

    /// Loads a key pair from PKCS#8.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| crypto("bad ed25519 key"))?;
        Ok(Self { pair })
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.pair.sign(msg).as_ref().to_vec()
    }

    /// The 32-byte public key.
    pub fn public_key(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }
}

/// Verifies an Ed25519 signature.
pub fn verify_signature(public_key: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(msg, sig)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(v: &str) -> CanonicalAttributes {
        CanonicalAttributes::new(&[("patient_id", v)]).unwrap()
    }

    #[test]
    fn wrap_round_trip_and_aad_binding() {
        let rng = SystemRandom::new();
        let kek = Kek::from_bytes(&[7u8; 32]).unwrap();
        let blob = kek.wrap(&rng, b"slot-a", b"secret").unwrap();
        assert_eq!(kek.unwrap(b"slot-a", &blob).unwrap().as_slice(), b"secret");
        assert!(kek.unwrap(b"slot-b", &blob).is_err());
        let other = Kek::from_bytes(&[8u8; 32]).unwrap();
        assert!(other.unwrap(b"slot-a", &blob).is_err());
        let mut flipped = blob.clone();
        flipped[20] ^= 1;
        assert!(kek.unwrap(b"slot-a", &flipped).is_err());
        assert!(kek.unwrap(b"slot-a", &blob[..10]).is_err());
    }

    #[test]
    fn derivation_depends_on_every_input() {
        let m1 = Master::new(1, [1u8; 32].into()).unwrap();
        let m2 = Master::new(2, [1u8; 32].into()).unwrap();
        let salt = [9u8; 32];
        let base = m1
            .derive_study_key(&salt, "st-a", &attrs("P1"), "pixels")
            .unwrap();
        assert_eq!(
            base,
            m1.derive_study_key(&salt, "st-a", &attrs("P1"), "pixels")
                .unwrap()
        );
        for other in [
            m2.derive_study_key(&salt, "st-a", &attrs("P1"), "pixels")
                .unwrap(),
            m1.derive_study_key(&[8u8; 32], "st-a", &attrs("P1"), "pixels")
                .unwrap(),
            m1.derive_study_key(&salt, "st-b", &attrs("P1"), "pixels")
                .unwrap(),
            m1.derive_study_key(&salt, "st-a", &attrs("P2"), "pixels")
                .unwrap(),
            m1.derive_study_key(&salt, "st-a", &attrs("P1"), "metadata")
                .unwrap(),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn commitment_verifies_only_the_right_attributes() {
        let m = Master::new(1, [3u8; 32].into()).unwrap();
        let salt = [4u8; 32];
        let c = m.commitment("st-a", &salt, &attrs("P1"));
        assert!(m.verify_commitment("st-a", &salt, &attrs("P1"), &c));
        assert!(!m.verify_commitment("st-a", &salt, &attrs("P2"), &c));
        assert!(!m.verify_commitment("st-b", &salt, &attrs("P1"), &c));
        // Same attributes, other study: unrelated commitment.
        assert_ne!(c, m.commitment("st-b", &[5u8; 32], &attrs("P1")));
    }

    #[test]
    fn kek_file_permissions_and_formats() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        std::fs::write(&p, format!("{}\n", hex::encode([1u8; 32]))).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Kek::load(&p), Err(KeyServerError::Kek(m)) if m.contains("too open")));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        Kek::load(&p).unwrap();
        std::fs::write(&p, [2u8; 32]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        Kek::load(&p).unwrap();
        let q = dir.path().join("short");
        std::fs::write(&q, b"abc").unwrap();
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Kek::load(&q).is_err());
        assert!(Kek::load(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn signatures_verify() {
        let rng = SystemRandom::new();
        let (s, pkcs8) = AuditSigner::generate(&rng).unwrap();
        let again = AuditSigner::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(s.public_key(), again.public_key());
        let sig = s.sign(b"head");
        assert!(verify_signature(&s.public_key(), b"head", &sig));
        assert!(!verify_signature(&s.public_key(), b"heaD", &sig));
    }

    #[test]
    fn key_material_types_wipe_on_drop() {
        // The types that hold key material are `Zeroizing`: wiped on drop.
        fn wipes<T: zeroize::Zeroize>(_: &Zeroizing<T>) {}
        let rng = SystemRandom::new();
        let s = random_secret(&rng).unwrap();
        wipes(&s);
        let m = Master::new(1, s).unwrap();
        wipes(m.secret());
        let k = m
            .derive_study_key(
                &[0; 32],
                "st-x",
                &CanonicalAttributes::new(&[("a", "b")]).unwrap(),
                "pixels",
            )
            .unwrap();
        wipes(&k);
        let mut copy = k.clone();
        zeroize::Zeroize::zeroize(&mut *copy);
        assert_eq!(*copy, [0u8; 32]);
    }
}
