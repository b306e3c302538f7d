//! Protect, restore and verify.

use std::sync::OnceLock;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use sha2::{Digest, Sha256};
use tessera_image::{Image, ImageSpec, Rect};

use crate::bits::{pack_into, packed_len, unpack};
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
    if (v >> (b - 1)) & 1 == 1 {
        v | !mask
    } else {
        v
    }
}

/// SHA-256 of a block's original words (little-endian, one byte per 8-bit
/// sample), folded to 128 bits by eq. 4: h'_i = h_i XOR h_{i+128}.
/// `buf[frame_base + i - offset]` is sample `i` of the frame.
fn block_hash(
    buf: &[u16],
    frame_base: usize,
    offset: usize,
    spec: &ImageSpec,
    part: &Rect,
    scratch: &mut Vec<u8>,
) -> [u8; 16] {
    let c = spec.format.channels as usize;
    let bytes_per = spec.format.bytes_per_sample();
    let row_len = part.width as usize * c;
    scratch.clear();
    scratch.resize(row_len * bytes_per * part.height as usize, 0);
    for (i, y) in (part.y..part.y + part.height).enumerate() {
        let start = frame_base + (y as usize * spec.width as usize + part.x as usize) * c - offset;
        let row = &buf[start..start + row_len];
        let dst = &mut scratch[i * row_len * bytes_per..(i + 1) * row_len * bytes_per];
        if bytes_per == 2 {
            for (d, &w) in dst.chunks_exact_mut(2).zip(row) {
                d.copy_from_slice(&w.to_le_bytes());
            }
        } else {
            for (d, &w) in dst.iter_mut().zip(row) {
                *d = w as u8;
            }
        }
    }
    let full: [u8; 32] = Sha256::digest(&scratch[..]).into();
    let mut folded = [0u8; 16];
    for i in 0..16 {
        folded[i] = full[i] ^ full[i + 16];
    }
    folded
}

/// How many hash bits a block of `samples` samples carries: 128, or two per
/// sample for blocks too small to hold 128 (edge blocks of tiny ROIs).
fn hash_bits(samples: usize) -> usize {
    128.min(2 * samples)
}

/// Largest tile: 16 x 16 pixels x 3 channels.
const MAX_TILE: usize = (BLOCK * BLOCK) as usize * 3;

/// The embedding bit streams of one ROI block, most significant bit first:
/// `(high plane, low plane)`. The primary plane (high for the first half of
/// the blocks, as the paper puts H_1..H_t into the MSB image) carries hash
/// bits 0.. one per carrier sample; the other plane carries what is left
/// when the block has fewer samples than hash bits. Bits past the hash are 0.
fn carrier_streams(hash: &[u8; 16], samples: usize, high_first: bool) -> (u128, u128) {
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
struct Planes {
    /// Low-plane bits floor(b/2).
    lb: u8,
    lmask: u16,
    pmask: u16,
}

/// Protect kernel for one tile: gathers the tile's samples in raster order
/// (channels interleaved), substitutes ROI samples, splits them into plane
/// values and embeds one bit per plane: `hv = h << 1 | e1`, `lv = l << 1 | e2`.
/// Returns the number of samples.
#[allow(clippy::too_many_arguments)]
fn encode_tile(
    words: &[u16],
    spec: &ImageSpec,
    tile: &Tile,
    sb: &SBox,
    k: Planes,
    mut streams: (u128, u128),
    hv: &mut [u16; MAX_TILE],
    lv: &mut [u16; MAX_TILE],
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
    let mut n = 0;
    let plain = |wd: u16, n: usize, hv: &mut [u16; MAX_TILE], lv: &mut [u16; MAX_TILE]| {
        let v = wd & k.pmask;
        hv[n] = (v >> k.lb) << 1;
        lv[n] = (v & k.lmask) << 1;
    };
    for y in r.y..r.y + r.height {
        let start = (y as usize * spec.width as usize + r.x as usize) * c;
        let row = &words[start..start + r.width as usize * c];
        let in_roi = !part.is_empty() && y >= part.y && y < part.y + part.height;
        if !in_roi {
            for &wd in row {
                plain(wd, n, hv, lv);
                n += 1;
            }
            continue;
        }
        for &wd in &row[..a] {
            plain(wd, n, hv, lv);
            n += 1;
        }
        for &wd in &row[a..b] {
            let v = sb.forward(wd & k.pmask);
            let e1 = (streams.0 >> 127) as u16;
            let e2 = (streams.1 >> 127) as u16;
            streams.0 <<= 1;
            streams.1 <<= 1;
            hv[n] = ((v >> k.lb) << 1) | e1;
            lv[n] = ((v & k.lmask) << 1) | e2;
            n += 1;
        }
        for &wd in &row[b..] {
            plain(wd, n, hv, lv);
            n += 1;
        }
    }
    n
}

/// What [`decode_tile`] found besides the pixels.
struct Decoded {
    /// The embedded hash bits, right-aligned (`bits` of them).
    extracted: u128,
    /// A bit that should be 0 was 1.
    padding_set: bool,
}

/// Restore kernel for one tile: the inverse of [`encode_tile`], writing
/// rebuilt words into `out` (the frame) and collecting the embedded bits.
#[allow(clippy::too_many_arguments)]
fn decode_tile(
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
    let (mut acc1, mut acc2) = (0u128, 0u128);
    let mut pad = 0u16;
    let mut n = 0;
    let mut kk = 0usize;
    // Branch-free rebuild of the bits above the payload.
    let sign_bit = b - 1;
    let ext = match rule {
        HighBits::SignExtend => !(((1u32 << b) - 1) as u16),
        HighBits::None | HighBits::Zero => 0,
    };
    let rebuild = |p: u16| p | (ext & 0u16.wrapping_sub((p >> sign_bit) & 1));
    for y in r.y..r.y + r.height {
        let start = frame_base + (y as usize * spec.width as usize + r.x as usize) * c - offset;
        let row = &mut out[start..start + r.width as usize * c];
        let in_roi = !part.is_empty() && y >= part.y && y < part.y + part.height;
        let (a, bnd) = if in_roi {
            (a, bnd)
        } else {
            (row.len(), row.len())
        };
        let (left, rest) = row.split_at_mut(a);
        let (mid, right) = rest.split_at_mut(bnd - a);
        for o in left.iter_mut() {
            let (h, l) = (hv[n], lv[n]);
            n += 1;
            pad |= (h | l) & 1;
            *o = rebuild(((h >> 1) << k.lb) | (l >> 1));
        }
        for o in mid.iter_mut() {
            let (h, l) = (hv[n], lv[n]);
            n += 1;
            *o = rebuild(sb.inverse(((h >> 1) << k.lb) | (l >> 1)));
            let (ef, es) = if high_first {
                (h & 1, l & 1)
            } else {
                (l & 1, h & 1)
            };
            if kk < n1 {
                acc1 = (acc1 << 1) | ef as u128;
            } else {
                pad |= ef;
            }
            if kk < n2 {
                acc2 = (acc2 << 1) | es as u128;
            } else {
                pad |= es;
            }
            kk += 1;
        }
        for o in right.iter_mut() {
            let (h, l) = (hv[n], lv[n]);
            n += 1;
            pad |= (h | l) & 1;
            *o = rebuild(((h >> 1) << k.lb) | (l >> 1));
        }
    }
    let extracted = if n2 == 0 { acc1 } else { (acc1 << n2) | acc2 };
    Decoded {
        extracted,
        padding_set: pad != 0,
    }
}

/// The top `bits` bits of a folded hash, right-aligned.
fn hash_prefix(hash: &[u8; 16], bits: usize) -> u128 {
    let h = u128::from_be_bytes(*hash);
    if bits >= 128 { h } else { h >> (128 - bits) }
}

/// Sample indices (within the frame) of a tile, in tile order.
fn tile_indices(spec: &ImageSpec, tile: &Tile, mut f: impl FnMut(usize, usize)) {
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

/// A run of whole tile rows of one frame: the unit of parallel work. Its
/// samples and its share bytes are contiguous, so bands split the output
/// buffers into disjoint slices.
#[derive(Clone, Copy, Debug)]
struct Band {
    frame: usize,
    /// Tile indices within the frame.
    first_tile: usize,
    end_tile: usize,
    /// Image rows covered.
    row0: u32,
    row1: u32,
}

/// Worker threads for an image of `samples` samples: one for small images,
/// otherwise the available cores (at most 4).
fn worker_count(samples: usize) -> usize {
    if samples < 1 << 16 {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Cuts every frame into bands and groups consecutive bands into at most
/// `threads` groups of similar size.
fn band_groups(layout: &Layout, threads: usize) -> Vec<Vec<Band>> {
    let tiles = &layout.tiles;
    let mut row_starts: Vec<usize> = (0..tiles.len()).filter(|&i| tiles[i].rect.x == 0).collect();
    row_starts.push(tiles.len());
    let rows = row_starts.len() - 1;
    let frames = layout.frames as usize;
    let per_frame = threads.div_ceil(frames).clamp(1, rows.max(1));
    let mut bands = Vec::with_capacity(frames * per_frame);
    for frame in 0..frames {
        for k in 0..per_frame {
            let (r0, r1) = (k * rows / per_frame, (k + 1) * rows / per_frame);
            if r0 == r1 {
                continue;
            }
            let (first_tile, end_tile) = (row_starts[r0], row_starts[r1]);
            let last = &tiles[end_tile - 1].rect;
            bands.push(Band {
                frame,
                first_tile,
                end_tile,
                row0: tiles[first_tile].rect.y,
                row1: last.y + last.height,
            });
        }
    }
    let per_group = bands.len().div_ceil(threads.max(1)).max(1);
    bands.chunks(per_group).map(<[Band]>::to_vec).collect()
}

/// Prefix sums of the sealed tile lengths of one frame for a share whose
/// values are `width` bits: `p[i]` = bytes before tile `i`, `p[len]` = frame.
fn sealed_prefix(layout: &Layout, width: u8) -> Vec<usize> {
    let mut p = Vec::with_capacity(layout.tiles.len() + 1);
    let mut acc = 0usize;
    p.push(0);
    for t in &layout.tiles {
        acc += packed_len(t.rect.area() as usize * layout.channels, width) + TAG_LEN;
        p.push(acc);
    }
    p
}

/// Everything the secure protect workers share.
struct SealJob<'a> {
    image: &'a Image,
    layout: &'a Layout,
    sb: &'a SBox,
    k: Planes,
    widths: [u8; 2],
    /// First ROI block index whose hash goes low plane first.
    t: u64,
    keys: &'a [LessSafeKey; 2],
    digest: &'a [u8; 32],
}

impl SealJob<'_> {
    /// Encodes, packs and seals every tile of `group` into `out` (the
    /// group's contiguous part of each share's payload).
    fn run(&self, group: &[Band], out: [&mut [u8]; 2]) {
        let spec = self.image.spec();
        let c = self.layout.channels;
        let tpf = self.layout.tiles.len() as u64;
        let mut scratch = Vec::with_capacity(MAX_TILE * 2);
        let mut hv = [0u16; MAX_TILE];
        let mut lv = [0u16; MAX_TILE];
        let mut off = [0usize; 2];
        let [o1, o2] = out;
        for band in group {
            let words = self.image.frame(band.frame as u32);
            for tile in &self.layout.tiles[band.first_tile..band.end_tile] {
                let streams = match tile.roi_block {
                    None => (0, 0),
                    Some(local) => {
                        let global = band.frame as u64 * self.layout.roi_blocks_per_frame as u64
                            + local as u64;
                        let hash = block_hash(words, 0, 0, spec, &tile.roi_part, &mut scratch);
                        carrier_streams(&hash, tile.roi_part.area() as usize * c, global < self.t)
                    }
                };
                let n = encode_tile(
                    words, spec, tile, self.sb, self.k, streams, &mut hv, &mut lv,
                );
                let g = band.frame as u64 * tpf + tile.index as u64;
                for (s, dst) in [&mut *o1, &mut *o2].into_iter().enumerate() {
                    let values = if s == 0 { &hv[..n] } else { &lv[..n] };
                    let len = packed_len(n, self.widths[s]);
                    let body = &mut dst[off[s]..off[s] + len];
                    pack_into(values, self.widths[s], body);
                    let tag = self.keys[s]
                        .seal_in_place_separate_tag(
                            nonce(g),
                            Aad::from(aad(self.digest, s as u8 + 1, g)),
                            body,
                        )
                        .expect("AES-GCM seal of a small tile cannot fail");
                    dst[off[s] + len..off[s] + len + TAG_LEN].copy_from_slice(tag.as_ref());
                    off[s] += len + TAG_LEN;
                }
            }
        }
    }
}

/// Secure protect of every tile, on several threads for large images.
fn seal_all(job: &SealJob<'_>, shares: &mut [Vec<u8>; 2]) {
    let tpf = job.layout.tiles.len();
    let prefix = [
        sealed_prefix(job.layout, job.widths[0]),
        sealed_prefix(job.layout, job.widths[1]),
    ];
    let frame_len = [prefix[0][tpf], prefix[1][tpf]];
    for s in 0..2 {
        shares[s].resize(
            SHARE_PREAMBLE + frame_len[s] * job.layout.frames as usize,
            0,
        );
    }
    let groups = band_groups(job.layout, worker_count(job.image.spec().sample_count()));
    let [a, b] = shares;
    let mut rest = [&mut a[SHARE_PREAMBLE..], &mut b[SHARE_PREAMBLE..]];
    let mut work = Vec::with_capacity(groups.len());
    for group in &groups {
        let (first, last) = (group[0], group[group.len() - 1]);
        let mut parts: [&mut [u8]; 2] = [&mut [], &mut []];
        for s in 0..2 {
            let start = first.frame * frame_len[s] + prefix[s][first.first_tile];
            let end = last.frame * frame_len[s] + prefix[s][last.end_tile];
            let (part, tail) = std::mem::take(&mut rest[s]).split_at_mut(end - start);
            parts[s] = part;
            rest[s] = tail;
        }
        work.push((group.as_slice(), parts));
    }
    if work.len() == 1 {
        let (group, parts) = work.pop().expect("one group");
        job.run(group, parts);
        return;
    }
    std::thread::scope(|scope| {
        for (group, parts) in work {
            scope.spawn(move || job.run(group, parts));
        }
    });
}

/// Tampered blocks and tiles found by one group of bands.
#[derive(Default)]
struct Findings {
    blocks: Vec<TamperedBlock>,
    tiles: Vec<TamperedTile>,
}

/// Everything the restore workers share.
struct OpenJob<'a> {
    spec: &'a ImageSpec,
    layout: &'a Layout,
    sb: &'a SBox,
    k: Planes,
    widths: [u8; 2],
    t: u64,
    rule: HighBits,
    b: u8,
    /// Secure profile: the share keys.
    keys: Option<&'a [LessSafeKey; 2]>,
    digest: &'a [u8; 32],
    payloads: [&'a [u8]; 2],
    prefix: [Vec<usize>; 2],
    /// Paper profile: the un-diffused plane images.
    planes: Option<&'a [Vec<u16>; 2]>,
}

impl OpenJob<'_> {
    /// Restores the tiles of `group` into `out`, whose first sample is
    /// sample `offset` of the image.
    fn run(&self, group: &[Band], out: &mut [u16], offset: usize) -> Findings {
        let spec = self.spec;
        let layout = self.layout;
        let c = layout.channels;
        let tpf = layout.tiles.len();
        let fs = spec.frame_samples();
        let (lb, hb) = (layout.low_plane_bits, layout.high_plane_bits);
        let lmask = self.k.lmask;
        let mut found = Findings::default();
        let mut tile_buf: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut scratch = Vec::new();
        let mut hv = [0u16; MAX_TILE];
        let mut lv = [0u16; MAX_TILE];
        for band in group {
            let frame = band.frame as u32;
            let frame_base = band.frame * fs;
            for tile in &layout.tiles[band.first_tile..band.end_tile] {
                let n = tile.rect.area() as usize * c;
                let g = band.frame as u64 * tpf as u64 + tile.index as u64;
                let roi_global = tile
                    .roi_block
                    .map(|local| frame as u64 * layout.roi_blocks_per_frame as u64 + local as u64);
                let mut invalid = false;
                if let Some(keys) = self.keys {
                    let mut failed: Vec<u8> = Vec::new();
                    for s in 0..2 {
                        let frame_len = self.prefix[s][tpf];
                        let at = band.frame * frame_len + self.prefix[s][tile.index as usize];
                        let len = packed_len(n, self.widths[s]) + TAG_LEN;
                        tile_buf[s].clear();
                        tile_buf[s].extend_from_slice(&self.payloads[s][at..at + len]);
                        let share = s as u8 + 1;
                        match keys[s].open_in_place(
                            nonce(g),
                            Aad::from(aad(self.digest, share, g)),
                            &mut tile_buf[s],
                        ) {
                            Ok(plain) => unpack(
                                plain,
                                self.widths[s],
                                if s == 0 { &mut hv[..n] } else { &mut lv[..n] },
                            ),
                            Err(_) => failed.push(share),
                        }
                    }
                    if !failed.is_empty() {
                        // Unauthenticated data is never decoded: the tile's
                        // pixels stay zero and the tile (and its ROI block)
                        // are reported.
                        found.tiles.push(TamperedTile {
                            index: g,
                            frame,
                            rect: tile.rect,
                            shares: failed,
                        });
                        if let Some(index) = roi_global {
                            found.blocks.push(TamperedBlock {
                                index,
                                frame,
                                rect: tile.roi_part,
                            });
                        }
                        continue;
                    }
                } else if let Some([q1, q2]) = self.planes {
                    let hmax = 1u16 << hb;
                    let lmax = 1u16 << (lb + 1);
                    tile_indices(spec, tile, |i, idx| {
                        let m = q1[frame_base + idx];
                        let l = q2[frame_base + idx];
                        if (m & lmask) > 1 || (m >> lb) >= hmax || l >= lmax {
                            invalid = true;
                        }
                        hv[i] = (((m >> lb) & (hmax - 1)) << 1) | (m & 1);
                        lv[i] = l & (lmax - 1);
                    });
                }
                let high_first = roi_global.is_some_and(|g| g < self.t);
                let decoded = decode_tile(
                    out, frame_base, offset, spec, tile, self.sb, self.k, self.rule, self.b,
                    high_first, &hv, &lv,
                );
                if invalid || decoded.padding_set {
                    found.tiles.push(TamperedTile {
                        index: g,
                        frame,
                        rect: tile.rect,
                        shares: vec![1, 2],
                    });
                }
                if let Some(index) = roi_global {
                    let bits = hash_bits(tile.roi_part.area() as usize * c);
                    let actual =
                        block_hash(out, frame_base, offset, spec, &tile.roi_part, &mut scratch);
                    if hash_prefix(&actual, bits) != decoded.extracted {
                        found.blocks.push(TamperedBlock {
                            index,
                            frame,
                            rect: tile.roi_part,
                        });
                    }
                }
            }
        }
        found
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
        .seal_in_place_separate_tag(
            nonce(CHECK_TILE),
            Aad::from(aad(digest, share, CHECK_TILE)),
            &mut empty,
        )
        .expect("sealing an empty message cannot fail");
    tag.as_ref().try_into().expect("16-byte tag")
}

fn check_matches(key: &LessSafeKey, digest: &[u8; 32], share: u8, tag: &[u8]) -> bool {
    let mut buf = tag.to_vec();
    key.open_in_place(
        nonce(CHECK_TILE),
        Aad::from(aad(digest, share, CHECK_TILE)),
        &mut buf,
    )
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
            let per_frame = sealed_prefix(layout, width)[layout.tiles.len()] as u64;
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
        v.reserve_exact(payload_len(&header, &layout, s) as usize);
        v
    });
    // Paper profile: whole plane images, diffused at the end.
    let mut planes: Option<[Vec<u16>; 2]> = match profile {
        Profile::Paper => Some([
            vec![0u16; spec.sample_count()],
            vec![0u16; spec.sample_count()],
        ]),
        Profile::Secure => None,
    };
    let mut key_acc = [[0u8; 16]; 2];
    let mut key_seen = [false; 2];
    let mut scratch = Vec::with_capacity(MAX_TILE * 2);
    let k = Planes { lb, lmask, pmask };
    let mut hv = [0u16; MAX_TILE];
    let mut lv = [0u16; MAX_TILE];

    if let Some(keys) = &secure_keys {
        let job = SealJob {
            image,
            layout: &layout,
            sb,
            k,
            widths: [hb + 1, lb + 1],
            t,
            keys,
            digest: &digest,
        };
        seal_all(&job, &mut shares);
    }
    if let Some([p1, p2]) = planes.as_mut() {
        for frame in 0..spec.frames {
            let words = image.frame(frame);
            let frame_base = frame as usize * spec.frame_samples();
            for tile in &layout.tiles {
                let streams = match tile.roi_block {
                    None => (0, 0),
                    Some(local) => {
                        let global =
                            frame as u64 * layout.roi_blocks_per_frame as u64 + local as u64;
                        let hash = block_hash(words, 0, 0, &spec, &tile.roi_part, &mut scratch);
                        let high_first = global < t;
                        let slot = usize::from(!high_first);
                        for (a, h) in key_acc[slot].iter_mut().zip(hash) {
                            *a ^= h;
                        }
                        key_seen[slot] = true;
                        carrier_streams(&hash, tile.roi_part.area() as usize * c, high_first)
                    }
                };
                let n = encode_tile(words, &spec, tile, sb, k, streams, &mut hv, &mut lv);
                debug_assert_eq!(n, tile.rect.area() as usize * c);
                // The paper's MSB image keeps the high bits in place:
                // M = (h << floor(b/2)) + e, L = (l << 1) + e.
                tile_indices(&spec, tile, |i, idx| {
                    let h = hv[i];
                    p1[frame_base + idx] = ((h >> 1) << lb) | (h & 1);
                    p2[frame_base + idx] = lv[i];
                });
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
            let keys = [
                share_key(k, header, &digest, 1),
                share_key(k, header, &digest, 2),
            ];
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
    let job = OpenJob {
        spec: &spec,
        layout: &layout,
        sb,
        k: Planes {
            lb,
            lmask,
            pmask: ((1u32 << b) - 1) as u16,
        },
        widths: [hb + 1, lb + 1],
        t,
        rule: header.high_bits,
        b,
        keys: secure_keys.as_ref(),
        digest: &digest,
        payloads: [p1.payload, p2.payload],
        prefix: [
            sealed_prefix(&layout, hb + 1),
            sealed_prefix(&layout, lb + 1),
        ],
        planes: planes.as_ref(),
    };
    let fs = spec.frame_samples();
    let row = spec.width as usize * c;
    let groups = band_groups(&layout, worker_count(spec.sample_count()));
    let mut rest: &mut [u16] = &mut samples;
    let mut work = Vec::with_capacity(groups.len());
    for group in &groups {
        let (first, last) = (group[0], group[group.len() - 1]);
        let start = first.frame * fs + first.row0 as usize * row;
        let end = last.frame * fs + last.row1 as usize * row;
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(end - start);
        rest = tail;
        work.push((group.as_slice(), part, start));
    }
    let parts: Vec<Findings> = if work.len() == 1 {
        work.into_iter()
            .map(|(g, part, start)| job.run(g, part, start))
            .collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = work
                .into_iter()
                .map(|(g, part, start)| {
                    let job = &job;
                    scope.spawn(move || job.run(g, part, start))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    };
    for p in parts {
        report.tampered_blocks.extend(p.blocks);
        report.tampered_tiles.extend(p.tiles);
    }
    let image = Image::new(spec, samples)?;
    Ok(Restored { image, report })
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
