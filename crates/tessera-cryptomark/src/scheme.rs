//! Protect, restore and verify.

use std::sync::OnceLock;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use sha2::{Digest, Sha256};
use tessera_image::{Image, ImageSpec, Rect};

use crate::bits::{BitReader, BitWriter, packed_len};
use crate::chaos;
use crate::header::{HighBits, MAX_OBJECT_ID, VERSION};
use crate::layout::{Layout, Tile};
use crate::sbox::SBox;
use crate::{
    BLOCK, CryptomarkError, Header, PaperKeys, Profile, ProtectKey, Protected, RestoreKey,
    Restored, SHARE_PREAMBLE, TamperedBlock, TamperedTile, VerificationReport,
};

const MAGIC: &[u8; 4] = b"TCMS";
const TAG_LEN: usize = 16;
/// Tile index used for the per-share key check (never a real tile).
const CHECK_TILE: u64 = u64::MAX;

fn sbox(bits: u8) -> &'static SBox {
    static TABLES: [OnceLock<SBox>; 17] = [const { OnceLock::new() }; 17];
    TABLES[bits as usize].get_or_init(|| SBox::new(bits))
}

/// Which payload width and high-bit rule an image needs (see [`HighBits`]).
fn payload_rule(image: &Image) -> (u8, HighBits) {
    let f = image.format();
    if f.bits_allocated == 8 || f.bits_stored >= 16 {
        return (f.bits_allocated, HighBits::None);
    }
    if f.signed {
        let b = f.bits_stored.max(2);
        let canonical = image.samples().iter().all(|&w| sign_extend(w, b) == w);
        if canonical {
            (b, HighBits::SignExtend)
        } else {
            (16, HighBits::None)
        }
    } else {
        let max = image.samples().iter().copied().max().unwrap_or(0);
        let used = (16 - max.leading_zeros()) as u8;
        let b = f.bits_stored.max(used).max(2);
        if b < 16 {
            (b, HighBits::Zero)
        } else {
            (16, HighBits::None)
        }
    }
}

#[inline]
fn sign_extend(w: u16, b: u8) -> u16 {
    let mask = ((1u32 << b) - 1) as u16;
    let v = w & mask;
    if (v >> (b - 1)) & 1 == 1 { v | !mask } else { v }
}

#[inline]
fn rebuild(p: u16, rule: HighBits, b: u8) -> u16 {
    match rule {
        HighBits::None | HighBits::Zero => p,
        HighBits::SignExtend => sign_extend(p, b),
    }
}

/// SHA-256 of a block's original words (little-endian, one byte per 8-bit
/// sample), folded to 128 bits by eq. 4: h'_i = h_i XOR h_{i+128}.
fn block_hash(frame: &[u16], spec: &ImageSpec, part: &Rect, scratch: &mut Vec<u8>) -> [u8; 16] {
    scratch.clear();
    let c = spec.format.channels as usize;
    let wide = spec.format.bits_allocated == 16;
    for y in part.y..part.y + part.height {
        let start = (y as usize * spec.width as usize + part.x as usize) * c;
        let row = &frame[start..start + part.width as usize * c];
        if wide {
            for &w in row {
                scratch.extend_from_slice(&w.to_le_bytes());
            }
        } else {
            scratch.extend(row.iter().map(|&w| w as u8));
        }
    }
    let full: [u8; 32] = Sha256::digest(&scratch[..]).into();
    let mut folded = [0u8; 16];
    for i in 0..16 {
        folded[i] = full[i] ^ full[i + 16];
    }
    folded
}

#[inline]
fn hash_bit(hash: &[u8; 16], k: usize) -> u16 {
    ((hash[k / 8] >> (7 - k % 8)) & 1) as u16
}

/// How many hash bits a block of `samples` samples carries: 128, or two per
/// sample for blocks too small to hold 128 (edge blocks of tiny ROIs).
fn hash_bits(samples: usize) -> usize {
    128.min(2 * samples)
}

/// Per-block embedding plan: which plane carries the block's first bits.
struct Carrier {
    hash: [u8; 16],
    bits: usize,
    samples: usize,
    /// True when the high plane is primary (first half of the blocks, as
    /// the paper puts H_1..H_t into the MSB image).
    high_first: bool,
}

impl Carrier {
    /// The two embedded bits (high plane, low plane) of carrier sample `k`.
    #[inline]
    fn bits_for(&self, k: usize) -> (u16, u16) {
        let first = if k < self.bits { hash_bit(&self.hash, k) } else { 0 };
        let j = k + self.samples;
        let second = if j < self.bits { hash_bit(&self.hash, j) } else { 0 };
        if self.high_first { (first, second) } else { (second, first) }
    }
}

fn share_key(key: &crate::StudyKey, header: &Header, digest: &[u8; 32], share: u8) -> LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &header.salt).extract(key.as_bytes());
    let info: [&[u8]; 3] = [b"tessera/cryptomark/v1/share", &[share], digest];
    let okm = prk
        .expand(&info, &aead::AES_256_GCM)
        .expect("HKDF output length fits AES-256");
    LessSafeKey::new(UnboundKey::from(okm))
}

fn nonce(tile: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&tile.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(digest: &[u8; 32], share: u8, tile: u64) -> [u8; 41] {
    let mut a = [0u8; 41];
    a[..32].copy_from_slice(digest);
    a[32] = share;
    a[33..].copy_from_slice(&tile.to_be_bytes());
    a
}

fn check_tag(key: &LessSafeKey, digest: &[u8; 32], share: u8) -> [u8; TAG_LEN] {
    let mut empty: [u8; 0] = [];
    let tag = key
        .seal_in_place_separate_tag(nonce(CHECK_TILE), Aad::from(aad(digest, share, CHECK_TILE)), &mut empty)
        .expect("sealing an empty message cannot fail");
    tag.as_ref().try_into().expect("16-byte tag")
}

fn check_matches(key: &LessSafeKey, digest: &[u8; 32], share: u8, tag: &[u8]) -> bool {
    let mut buf = tag.to_vec();
    key.open_in_place(nonce(CHECK_TILE), Aad::from(aad(digest, share, CHECK_TILE)), &mut buf)
        .is_ok()
}

/// Container width of the paper profile's plane images.
fn paper_container(b: u8) -> u8 {
    if b <= 8 { 8 } else { 16 }
}

/// Exact payload length of share `share` (1 or 2).
fn payload_len(header: &Header, layout: &Layout, share: u8) -> u64 {
    let width = if share == 1 {
        layout.high_plane_bits + 1
    } else {
        layout.low_plane_bits + 1
    };
    match header.profile {
        Profile::Secure => {
            let per_frame: u64 = layout
                .tiles
                .iter()
                .map(|t| {
                    packed_len(t.rect.area() as usize * layout.channels, width) as u64
                        + TAG_LEN as u64
                })
                .sum();
            per_frame * layout.frames as u64
        }
        Profile::Paper => {
            header.spec.sample_count() as u64 * (paper_container(header.payload_bits) / 8) as u64
        }
    }
}

fn preamble(header_digest: &[u8; 32], profile: Profile, share: u8, tag: [u8; TAG_LEN]) -> Vec<u8> {
    let mut p = Vec::with_capacity(SHARE_PREAMBLE);
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&[VERSION, profile as u8, share, 0]);
    p.extend_from_slice(header_digest);
    p.extend_from_slice(&tag);
    p
}

/// Protects `image` into two shares. `roi` may be empty (no blocks) or any
/// rectangle inside the image.
pub fn protect(
    image: &Image,
    roi: Rect,
    object_id: &str,
    key: ProtectKey<'_>,
) -> Result<Protected, CryptomarkError> {
    if object_id.is_empty() || object_id.len() > MAX_OBJECT_ID {
        return Err(CryptomarkError::ObjectId);
    }
    let spec = *image.spec();
    let roi = if roi.is_empty() { Rect::default() } else { roi };
    if !roi.fits(spec.width, spec.height) {
        return Err(CryptomarkError::RoiOutside {
            roi,
            width: spec.width,
            height: spec.height,
        });
    }
    let (payload_bits, high_bits) = payload_rule(image);
    let (profile, salt) = match key {
        ProtectKey::Secure { salt, .. } => (Profile::Secure, salt),
        ProtectKey::Paper | ProtectKey::PaperWithKeys(_) => (Profile::Paper, [0u8; 32]),
    };
    let header = Header {
        version: VERSION,
        profile,
        object_id: object_id.to_owned(),
        spec,
        roi,
        block: BLOCK,
        payload_bits,
        high_bits,
        salt,
    };
    header.validate()?;
    let digest = header.digest();
    let layout = Layout::new(&header);
    let sb = sbox(payload_bits);
    let (hb, lb) = (layout.high_plane_bits, layout.low_plane_bits);
    let lmask = ((1u32 << lb) - 1) as u16;
    let pmask = ((1u32 << payload_bits) - 1) as u16;
    let c = layout.channels;
    let m = layout.roi_blocks();
    let t = m.div_ceil(2);

    let secure_keys = match key {
        ProtectKey::Secure { key, .. } => Some([
            share_key(key, &header, &digest, 1),
            share_key(key, &header, &digest, 2),
        ]),
        ProtectKey::Paper | ProtectKey::PaperWithKeys(_) => None,
    };
    let mut shares: [Vec<u8>; 2] = [1u8, 2].map(|s| {
        let tag = secure_keys
            .as_ref()
            .map(|k| check_tag(&k[s as usize - 1], &digest, s))
            .unwrap_or([0; TAG_LEN]);
        let mut v = preamble(&digest, profile, s, tag);
        v.reserve(payload_len(&header, &layout, s) as usize);
        v
    });
    // Paper profile: whole plane images, diffused at the end.
    let mut planes: Option<[Vec<u16>; 2]> = match profile {
        Profile::Paper => Some([vec![0u16; spec.sample_count()], vec![0u16; spec.sample_count()]]),
        Profile::Secure => None,
    };
    let mut key_acc = [[0u8; 16]; 2];
    let mut key_seen = [false; 2];
    let mut scratch = Vec::with_capacity((BLOCK * BLOCK) as usize * c * 2);

    for frame in 0..spec.frames {
        let words = image.frame(frame);
        let frame_base = frame as usize * spec.frame_samples();
        for tile in &layout.tiles {
            let carrier = tile.roi_block.map(|local| {
                let global = frame as u64 * layout.roi_blocks_per_frame as u64 + local as u64;
                let hash = block_hash(words, &spec, &tile.roi_part, &mut scratch);
                let high_first = global < t;
                let slot = usize::from(!high_first);
                for (a, h) in key_acc[slot].iter_mut().zip(hash) {
                    *a ^= h;
                }
                key_seen[slot] = true;
                let samples = tile.roi_part.area() as usize * c;
                Carrier {
                    hash,
                    bits: hash_bits(samples),
                    samples,
                    high_first,
                }
            });
            let starts = [shares[0].len(), shares[1].len()];
            {
                let [s1, s2] = &mut shares;
                let mut w1 = BitWriter::new(s1);
                let mut w2 = BitWriter::new(s2);
                let r = &tile.rect;
                let part = &tile.roi_part;
                for y in r.y..r.y + r.height {
                    let row_in_roi = !part.is_empty() && y >= part.y && y < part.y + part.height;
                    let row_start = (y as usize * spec.width as usize + r.x as usize) * c;
                    for dx in 0..r.width as usize {
                        let x = r.x + dx as u32;
                        let in_roi = row_in_roi && x >= part.x && x < part.x + part.width;
                        for ch in 0..c {
                            let idx = row_start + dx * c + ch;
                            let p = words[idx] & pmask;
                            let (v, (e1, e2)) = if in_roi {
                                let k = (((y - part.y) * part.width + (x - part.x)) as usize) * c + ch;
                                let carrier = carrier.as_ref().expect("ROI tile has a carrier");
                                (sb.forward(p), carrier.bits_for(k))
                            } else {
                                (p, (0, 0))
                            };
                            let (h, l) = (v >> lb, v & lmask);
                            match planes.as_mut() {
                                None => {
                                    w1.put((h << 1) | e1, hb + 1);
                                    w2.put((l << 1) | e2, lb + 1);
                                }
                                Some([p1, p2]) => {
                                    p1[frame_base + idx] = (h << lb) + e1;
                                    p2[frame_base + idx] = (l << 1) | e2;
                                }
                            }
                        }
                    }
                }
                w1.finish();
                w2.finish();
            }
            if let Some(keys) = &secure_keys {
                let global_tile = frame as u64 * layout.tiles.len() as u64 + tile.index as u64;
                for s in 0..2 {
                    let share = s as u8 + 1;
                    let tag = keys[s]
                        .seal_in_place_separate_tag(
                            nonce(global_tile),
                            Aad::from(aad(&digest, share, global_tile)),
                            &mut shares[s][starts[s]..],
                        )
                        .expect("AES-GCM seal of a small tile cannot fail");
                    shares[s].extend_from_slice(tag.as_ref());
                }
            }
        }
    }

    let paper_keys = match (planes, key) {
        (Some(mut planes), key) => {
            let keys = match key {
                ProtectKey::PaperWithKeys(k) => *k,
                ProtectKey::Paper | ProtectKey::Secure { .. } => {
                    let mut k = [key_acc[0], key_acc[1]];
                    for (i, seen) in key_seen.iter().enumerate() {
                        if !seen {
                            k[i] = fallback_paper_key(image, i as u8 + 1);
                        }
                    }
                    PaperKeys {
                        share1: k[0],
                        share2: k[1],
                    }
                }
            };
            let container = paper_container(payload_bits);
            let modulus = 1u64 << container;
            for (s, plane) in planes.iter_mut().enumerate() {
                let k = if s == 0 { &keys.share1 } else { &keys.share2 };
                chaos::diffuse_stream(plane, k, modulus);
                let out = &mut shares[s];
                if container == 8 {
                    out.extend(plane.iter().map(|&v| v as u8));
                } else {
                    out.extend(plane.iter().flat_map(|v| v.to_le_bytes()));
                }
            }
            Some(keys)
        }
        (None, _) => None,
    };
    Ok(Protected {
        header,
        shares,
        paper_keys,
    })
}

/// The paper derives share keys from ROI block hashes; with no ROI block
/// for a share (empty or one-block ROI) we fall back to the folded SHA-256
/// of the whole image, labelled by share (documented in docs/CRYPTOMARK.md).
fn fallback_paper_key(image: &Image, share: u8) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"tessera-paper-profile-key");
    h.update([share]);
    h.update(image.to_le_bytes());
    let full: [u8; 32] = h.finalize().into();
    let mut k = [0u8; 16];
    for i in 0..16 {
        k[i] = full[i] ^ full[i + 16];
    }
    k
}

struct ParsedShare<'a> {
    payload: &'a [u8],
}

fn parse_share<'a>(
    header: &Header,
    digest: &[u8; 32],
    expected_index: u8,
    bytes: &'a [u8],
) -> Result<(ParsedShare<'a>, u8, &'a [u8]), CryptomarkError> {
    let fmt = |reason: &str| CryptomarkError::ShareFormat {
        share: expected_index,
        reason: reason.to_owned(),
    };
    if bytes.len() < SHARE_PREAMBLE {
        return Err(fmt("shorter than the 56-byte preamble"));
    }
    if &bytes[..4] != MAGIC {
        return Err(fmt("not a Tessera share (bad magic)"));
    }
    if bytes[4] != VERSION {
        return Err(fmt(&format!("unsupported share version {}", bytes[4])));
    }
    if bytes[5] != header.profile as u8 {
        return Err(fmt("share profile differs from the header's"));
    }
    let index = bytes[6];
    if index != 1 && index != 2 {
        return Err(fmt(&format!("invalid share index {index}")));
    }
    if &bytes[8..40] != digest {
        return Err(CryptomarkError::WrongObject {
            share: expected_index,
        });
    }
    Ok((
        ParsedShare {
            payload: &bytes[SHARE_PREAMBLE..],
        },
        index,
        &bytes[40..56],
    ))
}

/// Restores the image from its two shares and verifies it.
pub fn restore(
    header: &Header,
    share1: &[u8],
    share2: &[u8],
    key: RestoreKey<'_>,
) -> Result<Restored, CryptomarkError> {
    header.validate()?;
    let key_profile = match key {
        RestoreKey::Secure(_) => Profile::Secure,
        RestoreKey::Paper(_) => Profile::Paper,
    };
    if key_profile != header.profile {
        return Err(CryptomarkError::ProfileMismatch {
            header: header.profile,
            key: key_profile,
        });
    }
    let digest = header.digest();
    let layout = Layout::new(header);
    let (p1, i1, tag1) = parse_share(header, &digest, 1, share1)?;
    let (p2, i2, tag2) = parse_share(header, &digest, 2, share2)?;
    if i1 == 2 && i2 == 1 {
        return Err(CryptomarkError::SharesSwapped);
    }
    if i1 != 1 || i2 != 2 {
        return Err(CryptomarkError::ShareFormat {
            share: if i1 != 1 { 1 } else { 2 },
            reason: "both shares carry the same index".into(),
        });
    }
    let secure_keys = match key {
        RestoreKey::Secure(k) => {
            let keys = [share_key(k, header, &digest, 1), share_key(k, header, &digest, 2)];
            for (s, tag) in [(1u8, tag1), (2u8, tag2)] {
                if !check_matches(&keys[s as usize - 1], &digest, s, tag) {
                    let other = 3 - s;
                    if check_matches(&keys[other as usize - 1], &digest, other, tag) {
                        return Err(CryptomarkError::SharesSwapped);
                    }
                    return Err(CryptomarkError::KeyRejected { share: s });
                }
            }
            Some(keys)
        }
        RestoreKey::Paper(_) => None,
    };
    for (s, p) in [(1u8, &p1), (2u8, &p2)] {
        let expected = payload_len(header, &layout, s);
        if p.payload.len() as u64 != expected {
            return Err(CryptomarkError::ShareLength {
                share: s,
                expected: expected + SHARE_PREAMBLE as u64,
                actual: (p.payload.len() + SHARE_PREAMBLE) as u64,
            });
        }
    }

    let spec = header.spec;
    let b = header.payload_bits;
    let container = paper_container(b);
    let planes = match key {
        RestoreKey::Paper(keys) => {
            let modulus = 1u64 << container;
            let mut out = [Vec::new(), Vec::new()];
            for (s, p) in [&p1, &p2].into_iter().enumerate() {
                let mut plane: Vec<u16> = if container == 8 {
                    p.payload.iter().map(|&v| v as u16).collect()
                } else {
                    p.payload
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect()
                };
                let k = if s == 0 { &keys.share1 } else { &keys.share2 };
                chaos::undiffuse_stream(&mut plane, k, modulus);
                out[s] = plane;
            }
            Some(out)
        }
        RestoreKey::Secure(_) => None,
    };

    let sb = sbox(b);
    let (hb, lb) = (layout.high_plane_bits, layout.low_plane_bits);
    let lmask = ((1u32 << lb) - 1) as u16;
    let c = layout.channels;
    let m = layout.roi_blocks();
    let t = m.div_ceil(2);
    let mut samples = vec![0u16; spec.sample_count()];
    let mut report = VerificationReport {
        roi_blocks: m,
        tiles: layout.tile_count(),
        ..VerificationReport::default()
    };
    let mut offsets = [0usize; 2];
    let mut tile_buf: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut scratch = Vec::new();
    let mut extracted = [0u8; 16];
    let payloads = [p1.payload, p2.payload];

    for frame in 0..spec.frames {
        let frame_base = frame as usize * spec.frame_samples();
        for tile in &layout.tiles {
            let n = tile.rect.area() as usize * c;
            let global_tile = frame as u64 * layout.tiles.len() as u64 + tile.index as u64;
            let mut failed: Vec<u8> = Vec::new();
            if let Some(keys) = &secure_keys {
                for s in 0..2 {
                    let width = if s == 0 { hb + 1 } else { lb + 1 };
                    let len = packed_len(n, width) + TAG_LEN;
                    let src = &payloads[s][offsets[s]..offsets[s] + len];
                    offsets[s] += len;
                    tile_buf[s].clear();
                    tile_buf[s].extend_from_slice(src);
                    let share = s as u8 + 1;
                    let ok = keys[s]
                        .open_in_place(
                            nonce(global_tile),
                            Aad::from(aad(&digest, share, global_tile)),
                            &mut tile_buf[s],
                        )
                        .is_ok();
                    if !ok {
                        failed.push(share);
                    }
                }
            }
            let roi_global = tile
                .roi_block
                .map(|local| frame as u64 * layout.roi_blocks_per_frame as u64 + local as u64);
            if !failed.is_empty() {
                // Unauthenticated data is never decoded: the tile's pixels
                // stay zero and the tile (and its ROI block) are reported.
                report_tile(&mut report, frame, global_tile, tile, failed);
                if let Some(g) = roi_global {
                    report.tampered_blocks.push(TamperedBlock {
                        index: g,
                        frame,
                        rect: tile.roi_part,
                    });
                }
                continue;
            }
            let carrier_samples = tile.roi_part.area() as usize * c;
            let bits = hash_bits(carrier_samples);
            let high_first = roi_global.is_some_and(|g| g < t);
            extracted.fill(0);
            let mut invalid = false;
            let mut r1 = BitReader::new(&tile_buf[0]);
            let mut r2 = BitReader::new(&tile_buf[1]);
            let r = &tile.rect;
            let part = &tile.roi_part;
            for y in r.y..r.y + r.height {
                let row_in_roi = !part.is_empty() && y >= part.y && y < part.y + part.height;
                let row_start = (y as usize * spec.width as usize + r.x as usize) * c;
                for dx in 0..r.width as usize {
                    let x = r.x + dx as u32;
                    let in_roi = row_in_roi && x >= part.x && x < part.x + part.width;
                    for ch in 0..c {
                        let idx = row_start + dx * c + ch;
                        let (h, e1, l, e2) = match &planes {
                            None => {
                                let v1 = r1.get(hb + 1);
                                let v2 = r2.get(lb + 1);
                                (v1 >> 1, v1 & 1, v2 >> 1, v2 & 1)
                            }
                            Some([q1, q2]) => {
                                let v1 = q1[frame_base + idx];
                                let v2 = q2[frame_base + idx];
                                if (v1 & lmask) > 1 || (v1 >> lb) >> hb != 0 || (v2 >> (lb + 1)) != 0 {
                                    invalid = true;
                                }
                                (v1 >> lb, v1 & 1, v2 >> 1, v2 & 1)
                            }
                        };
                        let v = ((h << lb) | l) & (((1u32 << b) - 1) as u16);
                        let p = if in_roi { sb.inverse(v) } else { v };
                        samples[frame_base + idx] = rebuild(p, header.high_bits, b);
                        // Collect the embedded bits; bits beyond the hash
                        // must be zero, which also catches tampering.
                        let (first, second) = if high_first { (e1, e2) } else { (e2, e1) };
                        if in_roi {
                            let k = (((y - part.y) * part.width + (x - part.x)) as usize) * c + ch;
                            for (pos, bit) in [(k, first), (k + carrier_samples, second)] {
                                if pos < bits {
                                    extracted[pos / 8] |= (bit as u8) << (7 - pos % 8);
                                } else if bit != 0 {
                                    invalid = true;
                                }
                            }
                        } else if e1 != 0 || e2 != 0 {
                            invalid = true;
                        }
                    }
                }
            }
            if invalid {
                report_tile(&mut report, frame, global_tile, tile, vec![1, 2]);
            }
            if let Some(g) = roi_global {
                let frame_words = &samples[frame_base..frame_base + spec.frame_samples()];
                let actual = block_hash(frame_words, &spec, part, &mut scratch);
                if !prefix_bits_equal(&actual, &extracted, bits) {
                    report.tampered_blocks.push(TamperedBlock {
                        index: g,
                        frame,
                        rect: *part,
                    });
                }
            }
        }
    }
    let image = Image::new(spec, samples)?;
    Ok(Restored { image, report })
}

fn report_tile(report: &mut VerificationReport, frame: u32, index: u64, tile: &Tile, shares: Vec<u8>) {
    report.tampered_tiles.push(TamperedTile {
        index,
        frame,
        rect: tile.rect,
        shares,
    });
}

fn prefix_bits_equal(a: &[u8; 16], b: &[u8; 16], bits: usize) -> bool {
    (0..bits).all(|k| hash_bit(a, k) == hash_bit(b, k))
}

/// Verifies two shares: the report of [`restore`] without keeping the image.
pub fn verify(
    header: &Header,
    share1: &[u8],
    share2: &[u8],
    key: RestoreKey<'_>,
) -> Result<VerificationReport, CryptomarkError> {
    restore(header, share1, share2, key).map(|r| r.report)
}

/// A share's payload as an image for the paper's statistics (NPCR, UACI,
/// correlation): the paper profile's diffused plane image as it is
/// (`width` x `height x frames`, one channel per column for RGB), or the
/// secure profile's ciphertext bytes (tags excluded) laid out in rows of
/// the packed tile width. Returns (samples, width, height, max value).
pub fn share_metric_view(header: &Header, share: &[u8]) -> Option<(Vec<u16>, usize, usize, u16)> {
    header.validate().ok()?;
    let layout = Layout::new(header);
    let payload = share.get(SHARE_PREAMBLE..)?;
    let index = *share.get(6)?;
    match header.profile {
        Profile::Paper => {
            let container = paper_container(header.payload_bits);
            let values: Vec<u16> = if container == 8 {
                payload.iter().map(|&v| v as u16).collect()
            } else {
                payload
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect()
            };
            let w = header.spec.width as usize * layout.channels;
            let h = values.len() / w;
            Some((values, w, h, ((1u32 << container) - 1) as u16))
        }
        Profile::Secure => {
            let width = if index == 1 {
                layout.high_plane_bits + 1
            } else {
                layout.low_plane_bits + 1
            };
            let mut bytes = Vec::with_capacity(payload.len());
            let mut off = 0usize;
            for _ in 0..layout.frames {
                for tile in &layout.tiles {
                    let len = packed_len(tile.rect.area() as usize * layout.channels, width);
                    bytes.extend_from_slice(payload.get(off..off + len)?);
                    off += len + TAG_LEN;
                }
            }
            let row = packed_len(header.spec.width as usize * layout.channels, width).max(1);
            let h = bytes.len() / row;
            bytes.truncate(h * row);
            Some((bytes.into_iter().map(u16::from).collect(), row, h, 255))
        }
    }
}
