//! ROI crypto-watermarking (paper 003): protect an image into two shares
//! that each reveal nothing, restore it bit for bit, verify it, and localize
//! tampering.
//!
//! Structure (both profiles, per 16x16 tile on a lattice aligned with the ROI):
//! 1. SHA-256 of each ROI block's original words, folded to 128 bits (eq. 4);
//! 2. ROI samples through an S-box (the Rijndael S-box for 8-bit payloads,
//!    a cycle-walked bijection for other widths);
//! 3. split into a high and a low bit-plane image;
//! 4. each block's hash embedded in its own samples by histogram shifting
//!    where every occupied bin is a peak and its emptied neighbour the zero
//!    (capacity: one bit per sample per plane, always enough);
//! 5. each plane becomes one share:
//!    - `secure` (default): bit-packed, each tile sealed with AES-256-GCM
//!      under a per-share key from HKDF(caller key, random salt), with the
//!      header digest, share index and tile index as associated data;
//!    - `paper`: the chaotic diffusion of eq. 5-10, keys taken from the
//!      block hashes as the paper does (or given), fed to the maps through
//!      a key schedule that keeps every orbit chaotic (`chaos`, issue 16).
//!      Not for production.
//!
//! Pure: no async, no network, no file I/O.
#![forbid(unsafe_code)]

mod bits;
pub mod chaos;
pub mod header;
pub mod layout;
pub mod sbox;
mod scheme;

use serde::{Deserialize, Serialize};
use tessera_image::{Image, ImageError, Rect};

pub use header::{Header, HighBits};
pub use scheme::{
    default_threads, protect, protect_with_threads, restore, restore_with_threads,
    share_metric_view, verify,
};

/// Side of the ROI blocks and tiles, as in the paper.
pub const BLOCK: u32 = 16;

/// Bytes before the payload in every share.
pub const SHARE_PREAMBLE: usize = 56;

/// Which primitives protect the shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// AES-256-GCM tiles under caller keys. The default.
    Secure = 0,
    /// The paper's equations exactly, for comparison with its tables.
    Paper = 1,
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "secure" => Ok(Profile::Secure),
            "paper" => Ok(Profile::Paper),
            other => Err(format!("unknown profile {other:?} (secure or paper)")),
        }
    }
}

/// A 256-bit study key (later released by the keyserver).
#[derive(Clone, PartialEq, Eq)]
pub struct StudyKey([u8; 32]);

/// Wiped when dropped (every clone too): a released key lives no longer in
/// memory than its use.
impl Drop for StudyKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl StudyKey {
    pub fn from_bytes(bytes: [u8; 32]) -> StudyKey {
        StudyKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for StudyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StudyKey(..)")
    }
}

/// The paper profile's two 128-bit share keys, derived from the image's own
/// block hashes. The owner hands them to authorized users.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PaperKeys {
    pub share1: [u8; 16],
    pub share2: [u8; 16],
}

impl PaperKeys {
    /// `hex(share1):hex(share2)`.
    pub fn to_text(&self) -> String {
        format!("{}:{}", hex(&self.share1), hex(&self.share2))
    }

    pub fn from_text(text: &str) -> Result<PaperKeys, CryptomarkError> {
        let bad = || {
            CryptomarkError::KeyFormat(
                "paper keys are two 32-hex-digit halves joined by ':'".into(),
            )
        };
        let (a, b) = text.trim().split_once(':').ok_or_else(bad)?;
        let a = unhex(a)
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .ok_or_else(bad)?;
        let b = unhex(b)
            .and_then(|v| <[u8; 16]>::try_from(v).ok())
            .ok_or_else(bad)?;
        Ok(PaperKeys {
            share1: a,
            share2: b,
        })
    }
}

impl std::fmt::Debug for PaperKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PaperKeys(..)")
    }
}

/// Key input of [`protect`].
#[derive(Clone, Copy, Debug)]
pub enum ProtectKey<'a> {
    /// Secure profile: the study key and a fresh random salt (never reuse a
    /// salt with the same key and object id).
    Secure { key: &'a StudyKey, salt: [u8; 32] },
    /// Paper profile: keys derived from the image, as in the paper.
    Paper,
    /// Paper profile with given keys (`tessera image protect --paper-key`,
    /// and to measure key sensitivity).
    PaperWithKeys(&'a PaperKeys),
}

/// Key input of [`restore`].
#[derive(Clone, Copy, Debug)]
pub enum RestoreKey<'a> {
    Secure(&'a StudyKey),
    Paper(&'a PaperKeys),
}

/// The output of [`protect`].
#[derive(Clone, Debug)]
pub struct Protected {
    pub header: Header,
    /// Share 1 (high planes) and share 2 (low planes), each for a different cloud.
    pub shares: [Vec<u8>; 2],
    /// Present in the paper profile.
    pub paper_keys: Option<PaperKeys>,
}

/// A tampered 16x16 ROI block (section 4.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TamperedBlock {
    /// Global ROI block index (raster order, frame after frame).
    pub index: u64,
    pub frame: u32,
    pub rect: Rect,
}

/// A tile whose share data failed authentication or decoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TamperedTile {
    /// Global tile index (raster order, frame after frame).
    pub index: u64,
    pub frame: u32,
    pub rect: Rect,
    /// Which shares (1, 2) failed for this tile.
    pub shares: Vec<u8>,
}

/// What [`restore`] and [`verify`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerificationReport {
    pub roi_blocks: u64,
    pub tiles: u64,
    pub tampered_blocks: Vec<TamperedBlock>,
    pub tampered_tiles: Vec<TamperedTile>,
}

impl VerificationReport {
    /// True when every ROI block hash matched and every tile decoded.
    pub fn is_intact(&self) -> bool {
        self.tampered_blocks.is_empty() && self.tampered_tiles.is_empty()
    }
}

/// A restored image and its verification. When the report is not intact,
/// pixels of tiles that failed authentication are zero.
#[derive(Clone, Debug)]
pub struct Restored {
    pub image: Image,
    pub report: VerificationReport,
}

/// Everything that can go wrong, each naming what is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptomarkError {
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("ROI {roi} lies outside the {width}x{height} image")]
    RoiOutside { roi: Rect, width: u32, height: u32 },
    #[error("object id must be 1..=256 bytes")]
    ObjectId,
    #[error("corrupt header: {0}")]
    HeaderCorrupt(String),
    #[error("share {share}: {reason}")]
    ShareFormat { share: u8, reason: String },
    #[error("share {share} is {actual} bytes, the header requires {expected}")]
    ShareLength {
        share: u8,
        expected: u64,
        actual: u64,
    },
    #[error("share {share} belongs to another object or protect run (header digest differs)")]
    WrongObject { share: u8 },
    #[error("the shares are swapped: share 1 was given where share 2 belongs")]
    SharesSwapped,
    #[error(
        "share {share} does not authenticate under this key: wrong key, or a share of another object"
    )]
    KeyRejected { share: u8 },
    #[error("the header says profile {header:?} but the key is for {key:?}")]
    ProfileMismatch { header: Profile, key: Profile },
    #[error("key: {0}")]
    KeyFormat(String),
    #[error("random number generator failed")]
    Random,
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses hex; `None` on odd length or a non-hex digit.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A fresh random salt for [`ProtectKey::Secure`].
pub fn random_salt() -> Result<[u8; 32], CryptomarkError> {
    let mut salt = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| CryptomarkError::Random)?;
    Ok(salt)
}
