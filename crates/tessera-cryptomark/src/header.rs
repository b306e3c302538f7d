//! The small public header that travels with the two shares: what is needed
//! to lay the shares out again (geometry, format, ROI, profile) and nothing
//! about the pixels. Its digest is bound into every share.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tessera_image::{ImageSpec, Rect};

use crate::{CryptomarkError, Profile};

/// Current header and share format version.
pub const VERSION: u8 = 1;

/// Largest object id, in bytes.
pub const MAX_OBJECT_ID: usize = 256;

/// How the bits above the payload are rebuilt on restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HighBits {
    /// The payload is the whole word (8-bit images, or 16-bit words whose
    /// high bits are not canonical, e.g. overlay bits).
    None,
    /// Bits above the payload are zero (unsigned, canonical).
    Zero,
    /// Bits above the payload repeat the payload's top bit (signed, canonical).
    SignExtend,
}

/// The public header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u8,
    pub profile: Profile,
    pub object_id: String,
    pub spec: ImageSpec,
    pub roi: Rect,
    /// Side of the square ROI blocks and tiles (16, as in the paper).
    pub block: u32,
    /// Bits per sample that go through the S-box and the plane split.
    pub payload_bits: u8,
    pub high_bits: HighBits,
    /// Random per-protect salt (secure profile key derivation), hex.
    #[serde(with = "hex32")]
    pub salt: [u8; 32],
}

impl Header {
    /// Checks internal consistency; a header read from outside goes through
    /// this before any buffer is sized from it.
    pub fn validate(&self) -> Result<(), CryptomarkError> {
        let bad = |m: String| Err(CryptomarkError::HeaderCorrupt(m));
        if self.version != VERSION {
            return bad(format!("unsupported version {}", self.version));
        }
        if self.object_id.is_empty() || self.object_id.len() > MAX_OBJECT_ID {
            return bad(format!("object id must be 1..={MAX_OBJECT_ID} bytes"));
        }
        self.spec
            .validate()
            .map_err(|e| CryptomarkError::HeaderCorrupt(e.to_string()))?;
        if !self.roi.is_empty() && !self.roi.fits(self.spec.width, self.spec.height) {
            return bad(format!("ROI {} outside the image", self.roi));
        }
        if self.block != crate::BLOCK {
            return bad(format!(
                "block size {} (only {} is defined)",
                self.block,
                crate::BLOCK
            ));
        }
        let f = self.spec.format;
        let ok_bits = match self.high_bits {
            HighBits::None => self.payload_bits == f.bits_allocated,
            HighBits::Zero | HighBits::SignExtend => {
                f.bits_allocated == 16
                    && self.payload_bits >= f.bits_stored.max(2)
                    && self.payload_bits < 16
            }
        };
        if !ok_bits || (self.high_bits == HighBits::SignExtend && !f.signed) {
            return bad(format!(
                "payload of {} bits with {:?} high bits does not match format {f}",
                self.payload_bits, self.high_bits
            ));
        }
        Ok(())
    }

    /// SHA-256 over a canonical binary encoding of every field.
    pub fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"tessera-cryptomark-header");
        h.update([self.version, self.profile as u8]);
        h.update((self.object_id.len() as u32).to_be_bytes());
        h.update(self.object_id.as_bytes());
        let s = &self.spec;
        for v in [s.width, s.height, s.frames] {
            h.update(v.to_be_bytes());
        }
        let f = s.format;
        h.update([f.bits_allocated, f.bits_stored, f.signed as u8, f.channels]);
        for v in [
            self.roi.x,
            self.roi.y,
            self.roi.width,
            self.roi.height,
            self.block,
        ] {
            h.update(v.to_be_bytes());
        }
        h.update([self.payload_bits, self.high_bits as u8]);
        h.update(self.salt);
        h.finalize().into()
    }

    /// The header as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("header serializes")
    }

    /// Parses and validates a JSON header.
    pub fn from_json(text: &str) -> Result<Header, CryptomarkError> {
        if text.len() > 64 * 1024 {
            return Err(CryptomarkError::HeaderCorrupt(
                "header larger than 64 KiB".into(),
            ));
        }
        let h: Header = serde_json::from_str(text)
            .map_err(|e| CryptomarkError::HeaderCorrupt(e.to_string()))?;
        h.validate()?;
        Ok(h)
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        crate::unhex(&text)
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| D::Error::custom("salt must be 64 hex digits"))
    }
}
