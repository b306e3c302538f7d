//! Protect, restore and verify.
//!
//! The work is spread over three submodules: [`tile`] (the per-tile
//! kernels), [`bands`] (tiles grouped into bands, one group per thread) and
//! [`seal`] (the secure profile's AES-256-GCM keys, nonces and AAD).

mod bands;
mod seal;
mod tile;

use sha2::{Digest, Sha256};
use tessera_image::{Image, Rect};

use crate::bits::packed_len;
use crate::chaos;
use crate::header::{MAX_OBJECT_ID, VERSION};
use crate::layout::Layout;
use crate::{
    BLOCK, CryptomarkError, Header, PaperKeys, Profile, ProtectKey, Protected, RestoreKey,
    Restored, SHARE_PREAMBLE, VerificationReport,
};
use bands::{Findings, OpenJob, SealJob, band_groups, seal_all, sealed_prefix, worker_count};
use seal::{TAG_LEN, check_matches, check_tag, share_key};
use tile::{
    BLOCK_BYTES, MAX_TILE, Planes, TileScratch, block_hash, carrier_streams, encode_tile,
    payload_rule, sbox, tile_indices,
};

const MAGIC: &[u8; 4] = b"TCMS";

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
/// rectangle inside the image. Runs on up to [`default_threads`] threads.
pub fn protect(
    image: &Image,
    roi: Rect,
    object_id: &str,
    key: ProtectKey<'_>,
) -> Result<Protected, CryptomarkError> {
    let threads = default_threads(image.spec().sample_count());
    protect_with_threads(image, roi, object_id, key, threads)
}

/// The threads [`protect`] and [`restore`] use for an image of `samples`
/// samples: one below 65,536 samples, otherwise the available cores, at
/// most 4.
pub fn default_threads(samples: usize) -> usize {
    worker_count(samples)
}

/// [`protect`] on at most `threads` threads (at least one; the output is
/// the same for any count).
pub fn protect_with_threads(
    image: &Image,
    roi: Rect,
    object_id: &str,
    key: ProtectKey<'_>,
    threads: usize,
) -> Result<Protected, CryptomarkError> {
    let threads = threads.max(1);
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
    let mut block_bytes = [0u8; BLOCK_BYTES];
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
        seal_all(&job, &mut shares, threads);
    }
    if let Some([p1, p2]) = planes.as_mut() {
        let mut tile_scratch = TileScratch::new();
        for frame in 0..spec.frames {
            let words = image.frame(frame);
            let frame_base = frame as usize * spec.frame_samples();
            for tile in &layout.tiles {
                let streams = match tile.roi_block {
                    None => (0, 0),
                    Some(local) => {
                        let global =
                            frame as u64 * layout.roi_blocks_per_frame as u64 + local as u64;
                        let hash = block_hash(words, 0, 0, &spec, &tile.roi_part, &mut block_bytes);
                        let high_first = global < t;
                        let slot = usize::from(!high_first);
                        for (a, h) in key_acc[slot].iter_mut().zip(hash) {
                            *a ^= h;
                        }
                        key_seen[slot] = true;
                        carrier_streams(&hash, tile.roi_part.area() as usize * c, high_first)
                    }
                };
                let n = encode_tile(
                    words,
                    &spec,
                    tile,
                    sb,
                    k,
                    streams,
                    &mut hv,
                    &mut lv,
                    &mut tile_scratch,
                );
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
            let [q1, q2] = &mut planes;
            both(
                threads,
                || chaos::diffuse_stream(q1, &keys.share1, modulus),
                || chaos::diffuse_stream(q2, &keys.share2, modulus),
            );
            for (s, plane) in planes.iter().enumerate() {
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

/// Runs `a` and `b`, on two threads when `threads` allows (the paper
/// profile's two planes are diffused independently).
fn both(threads: usize, a: impl FnOnce() + Send, b: impl FnOnce() + Send) {
    if threads < 2 {
        a();
        b();
        return;
    }
    std::thread::scope(|scope| {
        let h = scope.spawn(a);
        b();
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
    });
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

/// Restores the image from its two shares and verifies it, on up to
/// [`default_threads`] threads.
pub fn restore(
    header: &Header,
    share1: &[u8],
    share2: &[u8],
    key: RestoreKey<'_>,
) -> Result<Restored, CryptomarkError> {
    header.validate()?;
    let threads = default_threads(header.spec.sample_count());
    restore_with_threads(header, share1, share2, key, threads)
}

/// [`restore`] on at most `threads` threads (at least one; the result is
/// the same for any count).
pub fn restore_with_threads(
    header: &Header,
    share1: &[u8],
    share2: &[u8],
    key: RestoreKey<'_>,
    threads: usize,
) -> Result<Restored, CryptomarkError> {
    header.validate()?;
    let threads = threads.max(1);
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
            let [mut q1, mut q2] = [&p1, &p2].map(|p| -> Vec<u16> {
                if container == 8 {
                    p.payload.iter().map(|&v| v as u16).collect()
                } else {
                    p.payload
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect()
                }
            });
            both(
                threads,
                || chaos::undiffuse_stream(&mut q1, &keys.share1, modulus),
                || chaos::undiffuse_stream(&mut q2, &keys.share2, modulus),
            );
            Some([q1, q2])
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
    let groups = band_groups(&layout, threads);
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
