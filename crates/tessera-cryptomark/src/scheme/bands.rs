//! Parallel work: bands of whole tile rows per thread, and the workers
//! that seal (protect, secure profile) and open or decode (restore) them.

use ring::aead::{Aad, LessSafeKey};
use tessera_image::{Image, ImageSpec};

use super::seal::{TAG_LEN, aad, nonce};
use super::tile::{
    BLOCK_BYTES, MAX_TILE, Planes, TileScratch, block_hash, carrier_streams, decode_tile,
    encode_tile, hash_bits, hash_prefix, tile_indices,
};
use crate::bits::{pack_into, packed_len, unpack};
use crate::header::HighBits;
use crate::layout::Layout;
use crate::sbox::SBox;
use crate::{SHARE_PREAMBLE, TamperedBlock, TamperedTile};

/// A run of whole tile rows of one frame: the unit of parallel work. Its
/// samples and its share bytes are contiguous, so bands split the output
/// buffers into disjoint slices.
#[derive(Clone, Copy, Debug)]
pub(super) struct Band {
    pub(super) frame: usize,
    /// Tile indices within the frame.
    pub(super) first_tile: usize,
    pub(super) end_tile: usize,
    /// Image rows covered.
    pub(super) row0: u32,
    pub(super) row1: u32,
}

/// Worker threads for an image of `samples` samples: one for small images,
/// otherwise the available cores (at most 4).
pub(super) fn worker_count(samples: usize) -> usize {
    if samples < 1 << 16 {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Cuts every frame into bands and groups consecutive bands into at most
/// `threads` groups of similar size.
pub(super) fn band_groups(layout: &Layout, threads: usize) -> Vec<Vec<Band>> {
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
pub(super) fn sealed_prefix(layout: &Layout, width: u8) -> Vec<usize> {
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
pub(super) struct SealJob<'a> {
    pub(super) image: &'a Image,
    pub(super) layout: &'a Layout,
    pub(super) sb: &'a SBox,
    pub(super) k: Planes,
    pub(super) widths: [u8; 2],
    /// First ROI block index whose hash goes low plane first.
    pub(super) t: u64,
    pub(super) keys: &'a [LessSafeKey; 2],
    pub(super) digest: &'a [u8; 32],
}

impl SealJob<'_> {
    /// Encodes, packs and seals every tile of `group` into `out` (the
    /// group's contiguous part of each share's payload).
    pub(super) fn run(&self, group: &[Band], out: [&mut [u8]; 2]) {
        let spec = self.image.spec();
        let c = self.layout.channels;
        let tpf = self.layout.tiles.len() as u64;
        let mut block_bytes = [0u8; BLOCK_BYTES];
        let mut hv = [0u16; MAX_TILE];
        let mut lv = [0u16; MAX_TILE];
        let mut tile_scratch = TileScratch::new();
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
                        let hash = block_hash(words, 0, 0, spec, &tile.roi_part, &mut block_bytes);
                        carrier_streams(&hash, tile.roi_part.area() as usize * c, global < self.t)
                    }
                };
                let n = encode_tile(
                    words,
                    spec,
                    tile,
                    self.sb,
                    self.k,
                    streams,
                    &mut hv,
                    &mut lv,
                    &mut tile_scratch,
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
pub(super) fn seal_all(job: &SealJob<'_>, shares: &mut [Vec<u8>; 2], threads: usize) {
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
    let groups = band_groups(job.layout, threads);
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
pub(super) struct Findings {
    pub(super) blocks: Vec<TamperedBlock>,
    pub(super) tiles: Vec<TamperedTile>,
}

/// Everything the restore workers share.
pub(super) struct OpenJob<'a> {
    pub(super) spec: &'a ImageSpec,
    pub(super) layout: &'a Layout,
    pub(super) sb: &'a SBox,
    pub(super) k: Planes,
    pub(super) widths: [u8; 2],
    pub(super) t: u64,
    pub(super) rule: HighBits,
    pub(super) b: u8,
    /// Secure profile: the share keys.
    pub(super) keys: Option<&'a [LessSafeKey; 2]>,
    pub(super) digest: &'a [u8; 32],
    pub(super) payloads: [&'a [u8]; 2],
    pub(super) prefix: [Vec<usize>; 2],
    /// Paper profile: the un-diffused plane images.
    pub(super) planes: Option<&'a [Vec<u16>; 2]>,
}

impl OpenJob<'_> {
    /// Restores the tiles of `group` into `out`, whose first sample is
    /// sample `offset` of the image.
    pub(super) fn run(&self, group: &[Band], out: &mut [u16], offset: usize) -> Findings {
        let spec = self.spec;
        let layout = self.layout;
        let c = layout.channels;
        let tpf = layout.tiles.len();
        let fs = spec.frame_samples();
        let (lb, hb) = (layout.low_plane_bits, layout.high_plane_bits);
        let lmask = self.k.lmask;
        let mut found = Findings::default();
        let mut tile_buf: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut block_bytes = [0u8; BLOCK_BYTES];
        let mut hv = [0u16; MAX_TILE];
        let mut lv = [0u16; MAX_TILE];
        let mut tile_scratch = TileScratch::new();
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
                    out,
                    frame_base,
                    offset,
                    spec,
                    tile,
                    self.sb,
                    self.k,
                    self.rule,
                    self.b,
                    high_first,
                    &hv,
                    &lv,
                    &mut tile_scratch,
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
                    let actual = block_hash(
                        out,
                        frame_base,
                        offset,
                        spec,
                        &tile.roi_part,
                        &mut block_bytes,
                    );
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
