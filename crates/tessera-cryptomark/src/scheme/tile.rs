//! The per-tile kernels of protect and restore: block hashes, the carrier
//! bit streams, and the sample transform that splits a tile into its two
//! plane values and back.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use tessera_image::{Image, ImageSpec, Rect};

use crate::BLOCK;
use crate::header::HighBits;
use crate::layout::Tile;
use crate::sbox::SBox;

pub(super) fn sbox(bits: u8) -> &'static SBox {
    static TABLES: [OnceLock<SBox>; 17] = [const { OnceLock::new() }; 17];
    TABLES[bits as usize].get_or_init(|| SBox::new(bits))
}

/// Which payload width and high-bit rule an image needs (see [`HighBits`]).
pub(super) fn payload_rule(image: &Image) -> (u8, HighBits) {
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
pub(super) fn sign_extend(w: u16, b: u8) -> u16 {
    let mask = ((1u32 << b) - 1) as u16;
    let v = w & mask;
    if (v >> (b - 1)) & 1 == 1 {
        v | !mask
    } else {
        v
    }
}

/// SHA-256 of a block's original words (little-endian, one byte per 8-bit
/// sample), folded to 128 bits by eq. 4: h'_i = h_i XOR h_{i+128}.
/// `buf[frame_base + i - offset]` is sample `i` of the frame. The bytes are
/// laid out in `bytes` (every byte hashed is written first).
pub(super) fn block_hash(
    buf: &[u16],
    frame_base: usize,
    offset: usize,
    spec: &ImageSpec,
    part: &Rect,
    bytes: &mut [u8; BLOCK_BYTES],
) -> [u8; 16] {
    let c = spec.format.channels as usize;
    let bytes_per = spec.format.bytes_per_sample();
    let row_len = part.width as usize * c;
    let row_bytes = row_len * bytes_per;
    let len = row_bytes * part.height as usize;
    for (y, dst) in (part.y..part.y + part.height).zip(bytes[..len].chunks_exact_mut(row_bytes)) {
        let start = frame_base + (y as usize * spec.width as usize + part.x as usize) * c - offset;
        let row = &buf[start..start + row_len];
        if bytes_per == 2 {
            // Eight words at a time: fixed-size copies the compiler keeps
            // inline (a whole-row loop became a memcpy call per row).
            let (dh, dt) = dst.split_at_mut(row_len / 8 * 16);
            let (rh, rt) = row.split_at(row_len / 8 * 8);
            for (d, w) in dh.chunks_exact_mut(16).zip(rh.chunks_exact(8)) {
                let mut b = [0u8; 16];
                for (pair, &w) in b.chunks_exact_mut(2).zip(w) {
                    pair.copy_from_slice(&w.to_le_bytes());
                }
                d.copy_from_slice(&b);
            }
            for (d, &w) in dt.chunks_exact_mut(2).zip(rt) {
                d.copy_from_slice(&w.to_le_bytes());
            }
        } else {
            for (d, &w) in dst.iter_mut().zip(row) {
                *d = w as u8;
            }
        }
    }
    let full: [u8; 32] = Sha256::digest(&bytes[..len]).into();
    let mut folded = [0u8; 16];
    for i in 0..16 {
        folded[i] = full[i] ^ full[i + 16];
    }
    folded
}

/// Bytes of the largest block: 16 x 16 pixels x 3 channels x 2 bytes.
pub(super) const BLOCK_BYTES: usize = MAX_TILE * 2;

/// How many hash bits a block of `samples` samples carries: 128, or two per
/// sample for blocks too small to hold 128 (edge blocks of tiny ROIs).
pub(super) fn hash_bits(samples: usize) -> usize {
    128.min(2 * samples)
}

/// Largest tile: 16 x 16 pixels x 3 channels.
pub(super) const MAX_TILE: usize = (BLOCK * BLOCK) as usize * 3;

/// The embedding bit streams of one ROI block, most significant bit first:
/// `(high plane, low plane)`. The primary plane (high for the first half of
/// the blocks, as the paper puts H_1..H_t into the MSB image) carries hash
/// bits 0.. one per carrier sample; the other plane carries what is left
/// when the block has fewer samples than hash bits. Bits past the hash are 0.
pub(super) fn carrier_streams(hash: &[u8; 16], samples: usize, high_first: bool) -> (u128, u128) {
    let bits = hash_bits(samples);
    let h = u128::from_be_bytes(*hash);
    let top = if bits >= 128 {
        h
    } else {
        h & (!0u128 << (128 - bits))
    };
    let primary = top;
    let secondary = if samples >= 128 { 0 } else { top << samples };
    if high_first {
        (primary, secondary)
    } else {
        (secondary, primary)
    }
}

/// Constants of the per-sample transform.
#[derive(Clone, Copy)]
pub(super) struct Planes {
    /// Low-plane bits floor(b/2).
    pub(super) lb: u8,
    pub(super) lmask: u16,
    pub(super) pmask: u16,
}

/// Per-worker buffers of the tile kernels, allocated once per worker (not
/// per tile); every entry a kernel reads it has written for that tile.
pub(super) struct TileScratch {
    /// Protect: the ROI samples after the S-box; restore: the S-box
    /// indices of a row's ROI samples (or of a whole tile in the ROI), or
    /// the rebuilt samples of a tile outside the ROI.
    sub: [u16; MAX_TILE],
    /// Protect: the carrier bit of each ROI sample (0 or 1), per plane.
    carried: [[u16; MAX_TILE]; 2],
    /// Restore: the embedded bits of the ROI samples, one per byte.
    extracted: [[u8; MAX_TILE]; 2],
}

impl TileScratch {
    pub(super) fn new() -> Box<TileScratch> {
        Box::new(TileScratch {
            sub: [0; MAX_TILE],
            carried: [[0; MAX_TILE]; 2],
            extracted: [[0; MAX_TILE]; 2],
        })
    }
}

/// Protect kernel for one tile: gathers the tile's samples in raster order
/// (channels interleaved), substitutes ROI samples, splits them into plane
/// values and embeds one bit per plane: `hv = h << 1 | e1`, `lv = l << 1 | e2`.
/// Returns the number of samples.
#[allow(clippy::too_many_arguments)]
pub(super) fn encode_tile(
    words: &[u16],
    spec: &ImageSpec,
    tile: &Tile,
    sb: &SBox,
    k: Planes,
    streams: (u128, u128),
    hv: &mut [u16; MAX_TILE],
    lv: &mut [u16; MAX_TILE],
    scratch: &mut TileScratch,
) -> usize {
    let c = spec.format.channels as usize;
    let r = &tile.rect;
    let part = &tile.roi_part;
    let (a, b) = if part.is_empty() {
        (0, 0)
    } else {
        (
            ((part.x - r.x) as usize) * c,
            ((part.x - r.x + part.width) as usize) * c,
        )
    };
    let (lb, lmask, pmask) = (k.lb, k.lmask, k.pmask);
    let roi_samples = part.area() as usize * c;
    if roi_samples > 0 {
        // The S-box lookups (scalar) of the whole ROI part first, in ROI
        // raster order, so the vector loop below reads them from memory
        // they were written to long before (not from pending stores).
        let m = b - a;
        let mut kk = 0;
        for y in part.y..part.y + part.height {
            let start = (y as usize * spec.width as usize + part.x as usize) * c;
            for (s, &wd) in scratch.sub[kk..kk + m]
                .iter_mut()
                .zip(&words[start..start + m])
            {
                *s = sb.forward(wd & pmask);
            }
            kk += m;
        }
        // Carrier bit k of a plane is bit k (most significant first) of
        // its stream; past the stream's 128 bits, 0.
        let bytes = [streams.0.to_be_bytes(), streams.1.to_be_bytes()];
        for (e, bytes) in scratch.carried.iter_mut().zip(&bytes) {
            let len = roi_samples.next_multiple_of(8);
            for (j, chunk) in e[..len].chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&SPREAD[bytes.get(j).copied().unwrap_or(0) as usize]);
            }
        }
    }
    let n_all = r.area() as usize * c;
    if roi_samples == n_all {
        // The whole tile is in the ROI: the ROI's sample order is the
        // tile's, one vector loop over the whole tile.
        for ((((h, l), &v), &x), &y) in hv[..n_all]
            .iter_mut()
            .zip(lv[..n_all].iter_mut())
            .zip(&scratch.sub[..n_all])
            .zip(&scratch.carried[0][..n_all])
            .zip(&scratch.carried[1][..n_all])
        {
            *h = ((v >> lb) << 1) | x;
            *l = ((v & lmask) << 1) | y;
        }
        return n_all;
    }
    let mut n = 0;
    let mut kk = 0;
    // Outside the ROI: split only (vectorizes).
    let plain = |row: &[u16], hv: &mut [u16], lv: &mut [u16]| {
        for ((h, l), &wd) in hv.iter_mut().zip(lv.iter_mut()).zip(row) {
            let v = wd & pmask;
            *h = (v >> lb) << 1;
            *l = (v & lmask) << 1;
        }
    };
    for y in r.y..r.y + r.height {
        let start = (y as usize * spec.width as usize + r.x as usize) * c;
        let row = &words[start..start + r.width as usize * c];
        let len = row.len();
        let (hrow, lrow) = (&mut hv[n..n + len], &mut lv[n..n + len]);
        n += len;
        let in_roi = !part.is_empty() && y >= part.y && y < part.y + part.height;
        if !in_roi {
            plain(row, hrow, lrow);
            continue;
        }
        plain(&row[..a], &mut hrow[..a], &mut lrow[..a]);
        plain(&row[b..], &mut hrow[b..], &mut lrow[b..]);
        // ROI samples: split the substituted values, add the carrier bits
        // (vectorizes).
        let m = b - a;
        let sub = &scratch.sub[kk..kk + m];
        let (e1, e2) = (
            &scratch.carried[0][kk..kk + m],
            &scratch.carried[1][kk..kk + m],
        );
        kk += m;
        for ((((h, l), &v), &x), &y) in hrow[a..b]
            .iter_mut()
            .zip(lrow[a..b].iter_mut())
            .zip(sub)
            .zip(e1)
            .zip(e2)
        {
            *h = ((v >> lb) << 1) | x;
            *l = ((v & lmask) << 1) | y;
        }
    }
    n
}

/// `SPREAD[byte][i]` is bit `7 - i` of `byte`: a stream byte (most
/// significant bit first) as the embedded bits of eight samples.
static SPREAD: [[u16; 8]; 256] = {
    let mut t = [[0u16; 8]; 256];
    let mut b = 0;
    while b < 256 {
        let mut i = 0;
        while i < 8 {
            t[b][i] = ((b >> (7 - i)) & 1) as u16;
            i += 1;
        }
        b += 1;
    }
    t
};

/// What [`decode_tile`] found besides the pixels.
pub(super) struct Decoded {
    /// The embedded hash bits, right-aligned (`bits` of them).
    pub(super) extracted: u128,
    /// A bit that should be 0 was 1.
    pub(super) padding_set: bool,
}

/// Restore kernel for one tile: the inverse of [`encode_tile`], writing
/// rebuilt words into `out` (the frame) and collecting the embedded bits.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_tile(
    out: &mut [u16],
    frame_base: usize,
    offset: usize,
    spec: &ImageSpec,
    tile: &Tile,
    sb: &SBox,
    k: Planes,
    rule: HighBits,
    b: u8,
    high_first: bool,
    hv: &[u16; MAX_TILE],
    lv: &[u16; MAX_TILE],
    scratch: &mut TileScratch,
) -> Decoded {
    let c = spec.format.channels as usize;
    let r = &tile.rect;
    let part = &tile.roi_part;
    let (a, bnd) = if part.is_empty() {
        (0, 0)
    } else {
        (
            ((part.x - r.x) as usize) * c,
            ((part.x - r.x + part.width) as usize) * c,
        )
    };
    let samples = part.area() as usize * c;
    let bits = if samples == 0 { 0 } else { hash_bits(samples) };
    let n1 = samples.min(128);
    let n2 = bits.saturating_sub(samples);
    let mut pad = 0u16;
    let mut kk = 0;
    // Branch-free rebuild of the bits above the payload.
    let sign_bit = b - 1;
    let ext = match rule {
        HighBits::SignExtend => !(((1u32 << b) - 1) as u16),
        HighBits::None | HighBits::Zero => 0,
    };
    let lb = k.lb;
    let rebuild = move |p: u16| p | (ext & 0u16.wrapping_sub((p >> sign_bit) & 1));
    // Outside the ROI: join the planes; every embedded bit must be 0.
    let plain = |o: &mut [u16], h: &[u16], l: &[u16]| -> u16 {
        let mut pad = 0u16;
        for ((o, &h), &l) in o.iter_mut().zip(h).zip(l) {
            pad |= h | l;
            *o = rebuild(((h >> 1) << lb) | (l >> 1));
        }
        pad & 1
    };
    // ROI samples: the S-box indices (vectorizes), the embedded bits in
    // order, one per byte; the scalar lookups come after.
    let split =
        |idx: &mut [u16], carried: &mut [[u8; MAX_TILE]; 2], kk: usize, h: &[u16], l: &[u16]| {
            for ((i, &h), &l) in idx.iter_mut().zip(h).zip(l) {
                *i = ((h >> 1) << lb) | (l >> 1);
            }
            let m = h.len();
            for (e, &h) in carried[0][kk..kk + m].iter_mut().zip(h) {
                *e = (h & 1) as u8;
            }
            for (e, &l) in carried[1][kk..kk + m].iter_mut().zip(l) {
                *e = (l & 1) as u8;
            }
        };
    // The lookups; the high bits are rebuilt only when they are not 0.
    let lookup = |dst: &mut [u16], idx: &[u16]| {
        if ext == 0 {
            for (o, &i) in dst.iter_mut().zip(idx) {
                *o = sb.inverse(i);
            }
        } else {
            for (o, &i) in dst.iter_mut().zip(idx) {
                *o = rebuild(sb.inverse(i));
            }
        }
    };
    let len = r.width as usize * c;
    let row_start =
        |y: u32| frame_base + (y as usize * spec.width as usize + r.x as usize) * c - offset;
    let n = r.area() as usize * c;
    if samples == n || samples == 0 {
        // The whole tile is in the ROI, or none of it: its plane values
        // and the ROI's sample order are the tile's, so the vector loops
        // run over the whole tile at once, and only the writes go by row.
        let (h, l) = (&hv[..n], &lv[..n]);
        let flat = &mut scratch.sub[..n];
        if samples == n {
            split(flat, &mut scratch.extracted, 0, h, l);
            kk = n;
            for (y, idx) in (r.y..r.y + r.height).zip(flat.chunks_exact(len)) {
                let start = row_start(y);
                lookup(&mut out[start..start + len], idx);
            }
        } else {
            pad |= plain(flat, h, l);
            for (y, src) in (r.y..r.y + r.height).zip(flat.chunks_exact(len)) {
                let start = row_start(y);
                out[start..start + len].copy_from_slice(src);
            }
        }
    } else {
        let mut n = 0;
        for y in r.y..r.y + r.height {
            let start = row_start(y);
            let row = &mut out[start..start + len];
            let (hrow, lrow) = (&hv[n..n + len], &lv[n..n + len]);
            n += len;
            let in_roi = y >= part.y && y < part.y + part.height;
            if !in_roi {
                pad |= plain(row, hrow, lrow);
                continue;
            }
            pad |= plain(&mut row[..a], &hrow[..a], &lrow[..a]);
            pad |= plain(&mut row[bnd..], &hrow[bnd..], &lrow[bnd..]);
            let m = bnd - a;
            let idx = &mut scratch.sub[..m];
            split(
                idx,
                &mut scratch.extracted,
                kk,
                &hrow[a..bnd],
                &lrow[a..bnd],
            );
            lookup(&mut row[a..bnd], idx);
            kk += m;
        }
    }
    let carried = &scratch.extracted;
    let (first, second) = if high_first { (0, 1) } else { (1, 0) };
    let (acc1, rest1) = take_bits(&carried[first][..kk], n1);
    let (acc2, rest2) = take_bits(&carried[second][..kk], n2);
    let extracted = if n2 == 0 { acc1 } else { (acc1 << n2) | acc2 };
    Decoded {
        extracted,
        padding_set: pad != 0 || rest1 || rest2,
    }
}

/// The first `n` (at most 128) of `bits` (one 0 or 1 per byte) as a
/// right-aligned number, the first bit most significant, and whether any
/// later bit is set.
fn take_bits(bits: &[u8], n: usize) -> (u128, bool) {
    let n = n.min(bits.len());
    let (head, rest) = bits[..n].split_at(n / 8 * 8);
    let mut top = 0u128;
    for chunk in head.chunks_exact(8) {
        // Eight 0/1 bytes (one 8-byte load) to one byte, the first byte in
        // the top bit.
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        let byte = (u64::from_le_bytes(b).wrapping_mul(0x8040_2010_0804_0201) >> 56) as u8;
        top = (top << 8) | byte as u128;
    }
    for &bit in rest {
        top = (top << 1) | bit as u128;
    }
    (top, bits[n..].iter().fold(0, |a, &b| a | b) != 0)
}

/// The top `bits` bits of a folded hash, right-aligned.
pub(super) fn hash_prefix(hash: &[u8; 16], bits: usize) -> u128 {
    let h = u128::from_be_bytes(*hash);
    if bits >= 128 { h } else { h >> (128 - bits) }
}

/// Sample indices (within the frame) of a tile, in tile order.
pub(super) fn tile_indices(spec: &ImageSpec, tile: &Tile, mut f: impl FnMut(usize, usize)) {
    let c = spec.format.channels as usize;
    let r = &tile.rect;
    let mut n = 0;
    for y in r.y..r.y + r.height {
        let start = (y as usize * spec.width as usize + r.x as usize) * c;
        for idx in start..start + r.width as usize * c {
            f(n, idx);
            n += 1;
        }
    }
}
