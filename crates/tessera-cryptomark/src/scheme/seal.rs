//! The secure profile's AES-256-GCM: per-share keys (HKDF over the study
//! key), per-tile nonces and AAD, and the per-share key check tag.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use crate::Header;

pub(super) const TAG_LEN: usize = 16;
/// Tile index used for the per-share key check (never a real tile).
pub(super) const CHECK_TILE: u64 = u64::MAX;

pub(super) fn share_key(
    key: &crate::StudyKey,
    header: &Header,
    digest: &[u8; 32],
    share: u8,
) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &header.salt).extract(key.as_bytes());
    let info: [&[u8]; 3] = [b"tessera/cryptomark/v1/share", &[share], digest];
    let okm = prk
        .expand(&info, &aead::AES_256_GCM)
        .expect("HKDF output length fits AES-256");
    LessSafeKey::new(UnboundKey::from(okm))
}

pub(super) fn nonce(tile: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&tile.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

pub(super) fn aad(digest: &[u8; 32], share: u8, tile: u64) -> [u8; 41] {
    let mut a = [0u8; 41];
    a[..32].copy_from_slice(digest);
    a[32] = share;
    a[33..].copy_from_slice(&tile.to_be_bytes());
    a
}

pub(super) fn check_tag(key: &LessSafeKey, digest: &[u8; 32], share: u8) -> [u8; TAG_LEN] {
    let mut empty: [u8; 0] = [];
    let tag = key
        .seal_in_place_separate_tag(
            nonce(CHECK_TILE),
            Aad::from(aad(digest, share, CHECK_TILE)),
            &mut empty,
        )
        .expect("sealing an empty message cannot fail");
    tag.as_ref().try_into().expect("16-byte tag")
}

pub(super) fn check_matches(key: &LessSafeKey, digest: &[u8; 32], share: u8, tag: &[u8]) -> bool {
    let mut buf = tag.to_vec();
    key.open_in_place(
        nonce(CHECK_TILE),
        Aad::from(aad(digest, share, CHECK_TILE)),
        &mut buf,
    )
    .is_ok()
}
