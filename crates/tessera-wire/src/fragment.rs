//! One fragment as messages (both directions), shared by the Segment
//! response and the Process request: a `FragmentHeader`, the block list in
//! `BlockChunk`s, then for every tile a `TileHeader` followed by its sample
//! chunks.

use std::borrow::Borrow;

use tessera_image::{ImageSpec, Rect};
use tessera_proto::segmentation::v1 as pb;
use tessera_segment::fragment::MAX_HALO;
use tessera_segment::{BlockGrid, Fragment, Tile};

use crate::convert::segmentation::{rect_from_proto, rect_to_proto, required_spec, spec_to_proto};
use crate::convert::{decode_samples, encode_samples};
use crate::{BLOCK_CHUNK, CHUNK_BYTES, WireError, invalid};

/// Memory one received tile costs beyond its samples (its rectangles and
/// vector header), charged against the byte budget.
pub(crate) const TILE_OVERHEAD: u64 = std::mem::size_of::<Tile>() as u64;

/// The header of a fragment: what it is and the totals that follow.
pub fn fragment_header(f: &Fragment) -> pb::FragmentHeader {
    pb::FragmentHeader {
        region: u32::from(f.region),
        spec: Some(spec_to_proto(&f.spec)),
        block_size: f.block_size,
        halo: f.halo,
        block_count: f.blocks.len() as u32,
        tile_count: f.tiles.len() as u32,
        sample_count: f.tiles.iter().map(|t| t.samples.len() as u64).sum(),
    }
}

/// One message body after the header; each RPC wraps it in its own oneof.
#[derive(Clone, Debug, PartialEq)]
pub enum FragmentPart {
    Blocks(pb::BlockChunk),
    Tile(pb::TileHeader),
    /// At most [`CHUNK_BYTES`] of the current tile's samples.
    Samples(Vec<u8>),
}

/// The body of a fragment (everything after the header), encoded lazily: at
/// most one chunk is held at a time. Works on an owned `Fragment` or a
/// shared `Arc<Fragment>`.
#[derive(Clone, Debug)]
pub struct FragmentBody<F> {
    fragment: F,
    next_block: usize,
    tile: usize,
    /// `None`: the current tile's header is next; `Some(i)`: its samples
    /// from `i` are next.
    offset: Option<usize>,
}

impl<F: Borrow<Fragment>> FragmentBody<F> {
    pub fn new(fragment: F) -> Self {
        Self {
            fragment,
            next_block: 0,
            tile: 0,
            offset: None,
        }
    }
}

impl<F: Borrow<Fragment>> Iterator for FragmentBody<F> {
    type Item = FragmentPart;

    fn next(&mut self) -> Option<FragmentPart> {
        let f: &Fragment = self.fragment.borrow();
        if self.next_block < f.blocks.len() {
            let end = (self.next_block + BLOCK_CHUNK).min(f.blocks.len());
            let blocks = f.blocks[self.next_block..end].to_vec();
            self.next_block = end;
            return Some(FragmentPart::Blocks(pb::BlockChunk { blocks }));
        }
        let bps = f.spec.format.bytes_per_sample();
        let per_chunk = CHUNK_BYTES / bps;
        loop {
            let tile = f.tiles.get(self.tile)?;
            match self.offset {
                None => {
                    self.offset = Some(0);
                    return Some(FragmentPart::Tile(pb::TileHeader {
                        core: Some(rect_to_proto(&tile.core)),
                        rect: Some(rect_to_proto(&tile.rect)),
                    }));
                }
                Some(start) if start < tile.samples.len() => {
                    let end = (start + per_chunk).min(tile.samples.len());
                    self.offset = Some(end);
                    return Some(FragmentPart::Samples(encode_samples(
                        &tile.samples[start..end],
                        bps,
                    )));
                }
                Some(_) => {
                    self.tile += 1;
                    self.offset = None;
                }
            }
        }
    }
}

/// What a declared sample costs against a byte budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SampleCost {
    /// Its size on the wire (1 or 2 bytes), like the segmentation service's
    /// own fragment limit.
    Wire,
    /// Its size in memory (a `u16`).
    Memory,
}

/// Re-assembles one fragment from its header and parts, enforcing the order
/// (blocks, then tiles each followed by exactly its samples), the declared
/// totals, and a byte budget, before allocating. Errors name `field`.
#[derive(Debug)]
pub(crate) struct FragmentBuilder {
    field: String,
    fragment: Fragment,
    grid_len: u32,
    block_count: usize,
    tile_count: usize,
    sample_count: u64,
    /// Declared samples not yet received.
    samples_left: u64,
    /// Samples the current tile still needs.
    tile_left: u64,
    per_pixel: u64,
    bps: usize,
}

impl FragmentBuilder {
    /// Checks the header and charges its cost (`sample_cost` bytes per
    /// declared sample, 4 per block, [`TILE_OVERHEAD`] per tile) against
    /// `budget` (remaining bytes), refusing with `TooLarge` if it does not
    /// fit or the block count exceeds `max_blocks`.
    pub(crate) fn new(
        field: &str,
        h: pb::FragmentHeader,
        sample_cost: SampleCost,
        budget: &mut u64,
        max_blocks: u64,
    ) -> Result<Self, WireError> {
        let spec: ImageSpec = required_spec(&format!("{field}.spec"), h.spec)?;
        let region = u16::try_from(h.region)
            .map_err(|_| invalid(format!("{field}.region {} is out of range", h.region)))?;
        let grid = BlockGrid::new(spec.width, spec.height, h.block_size)
            .map_err(|e| invalid(format!("{field}.block_size {}: {e}", h.block_size)))?;
        if h.halo > MAX_HALO {
            return Err(invalid(format!(
                "{field}.halo {} exceeds {MAX_HALO}",
                h.halo
            )));
        }
        let blocks = grid.len() as u64;
        if h.block_count == 0 || u64::from(h.block_count) > blocks {
            return Err(invalid(format!(
                "{field}.block_count must be 1..={blocks} (the grid), got {}",
                h.block_count
            )));
        }
        if u64::from(h.block_count) > max_blocks {
            return Err(WireError::TooLarge(format!(
                "{field}.block_count {} exceeds the limit of {max_blocks} blocks",
                h.block_count
            )));
        }
        if h.tile_count == 0 || h.tile_count > h.block_count {
            return Err(invalid(format!(
                "{field}.tile_count must be 1..=block_count ({}), got {}",
                h.block_count, h.tile_count
            )));
        }
        if h.sample_count == 0 {
            return Err(invalid(format!("{field}.sample_count must be positive")));
        }
        let bps = spec.format.bytes_per_sample();
        let per_sample = match sample_cost {
            SampleCost::Wire => bps as u64,
            SampleCost::Memory => std::mem::size_of::<u16>() as u64,
        };
        let cost = h
            .sample_count
            .saturating_mul(per_sample)
            .saturating_add(u64::from(h.block_count) * 4)
            .saturating_add(u64::from(h.tile_count) * TILE_OVERHEAD);
        if cost > *budget {
            return Err(WireError::TooLarge(format!(
                "{field}: {} samples in {} tiles need {cost} bytes, more than the {} left of the limit",
                h.sample_count, h.tile_count, *budget
            )));
        }
        *budget -= cost;
        Ok(Self {
            field: field.to_owned(),
            fragment: Fragment {
                region,
                spec,
                block_size: h.block_size,
                halo: h.halo,
                // Bounded by max_blocks and the budget just charged.
                blocks: Vec::with_capacity(h.block_count as usize),
                // Tiles are at most blocks; allocated as they arrive.
                tiles: Vec::new(),
            },
            grid_len: grid.len() as u32,
            block_count: h.block_count as usize,
            tile_count: h.tile_count as usize,
            sample_count: h.sample_count,
            samples_left: h.sample_count,
            tile_left: 0,
            per_pixel: u64::from(spec.format.channels) * u64::from(spec.frames),
            bps,
        })
    }

    pub(crate) fn fragment(&self) -> &Fragment {
        &self.fragment
    }

    pub(crate) fn blocks(&mut self, chunk: pb::BlockChunk) -> Result<(), WireError> {
        let field = &self.field;
        if !self.fragment.tiles.is_empty() {
            return Err(invalid(format!("{field}: blocks after a tile")));
        }
        let n = chunk.blocks.len();
        if n == 0 || n > BLOCK_CHUNK {
            return Err(invalid(format!(
                "{field}.blocks: chunks must hold 1..={BLOCK_CHUNK} indices, got {n}"
            )));
        }
        let have = self.fragment.blocks.len();
        if have + n > self.block_count {
            return Err(invalid(format!(
                "{field}.blocks: more than the {} block_count declares",
                self.block_count
            )));
        }
        let mut prev = self.fragment.blocks.last().copied();
        for &b in &chunk.blocks {
            if b >= self.grid_len {
                return Err(invalid(format!(
                    "{field}.blocks: index {b} beyond the {} blocks of the grid",
                    self.grid_len
                )));
            }
            if prev.is_some_and(|p| b <= p) {
                return Err(invalid(format!(
                    "{field}.blocks: indices must be strictly ascending ({b} after {})",
                    prev.unwrap_or(0)
                )));
            }
            prev = Some(b);
        }
        self.fragment.blocks.extend_from_slice(&chunk.blocks);
        Ok(())
    }

    pub(crate) fn tile(&mut self, t: pb::TileHeader) -> Result<(), WireError> {
        let field = &self.field;
        let i = self.fragment.tiles.len();
        if self.fragment.blocks.len() != self.block_count {
            return Err(invalid(format!(
                "{field}.tile[{i}]: arrived after {} of the {} blocks; send every block first",
                self.fragment.blocks.len(),
                self.block_count
            )));
        }
        if self.tile_left > 0 {
            return Err(invalid(format!(
                "{field}.tile[{}]: {} samples missing before the next tile",
                i.saturating_sub(1),
                self.tile_left
            )));
        }
        if i == self.tile_count {
            return Err(invalid(format!(
                "{field}: more tiles than the {} tile_count declares",
                self.tile_count
            )));
        }
        let core = rect_from_proto(&format!("{field}.tile[{i}].core"), t.core)?;
        let rect = rect_from_proto(&format!("{field}.tile[{i}].rect"), t.rect)?;
        let (w, h) = (self.fragment.spec.width, self.fragment.spec.height);
        if rect.is_empty() || !rect.fits(w, h) {
            return Err(invalid(format!(
                "{field}.tile[{i}].rect {rect} is empty or outside the {w}x{h} image"
            )));
        }
        let inside = core.x >= rect.x
            && core.y >= rect.y
            && core.right() <= rect.right()
            && core.bottom() <= rect.bottom();
        if core.is_empty() || !inside {
            return Err(invalid(format!(
                "{field}.tile[{i}].core {core} is empty or not inside its rect {rect}"
            )));
        }
        let need = rect.area() * self.per_pixel;
        if need > self.samples_left {
            return Err(invalid(format!(
                "{field}.tile[{i}]: its rect holds {need} samples, only {} of the {} \
                 sample_count declares are left",
                self.samples_left, self.sample_count
            )));
        }
        self.fragment.tiles.push(Tile {
            core,
            rect,
            // Bounded by the declared sample count, which the budget covers.
            samples: Vec::with_capacity(need as usize),
        });
        self.tile_left = need;
        Ok(())
    }

    pub(crate) fn samples(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let i = self.fragment.tiles.len();
        let field = format!("{}.tile[{}].samples", self.field, i.saturating_sub(1));
        let Some(tile) = self.fragment.tiles.last_mut() else {
            return Err(invalid(format!("{}: samples before a tile", self.field)));
        };
        if self.tile_left == 0 {
            return Err(invalid(format!(
                "{field}: more samples than the tile's rect"
            )));
        }
        let before = tile.samples.len();
        decode_samples(&field, bytes, self.bps, self.tile_left, &mut tile.samples)?;
        let got = (tile.samples.len() - before) as u64;
        self.tile_left -= got;
        self.samples_left -= got;
        Ok(())
    }

    /// The fragment, once every declared part has arrived and
    /// `Fragment::validate` accepts it.
    pub(crate) fn finish(self) -> Result<Fragment, WireError> {
        let field = &self.field;
        let f = &self.fragment;
        if f.blocks.len() != self.block_count {
            return Err(invalid(format!(
                "{field}: {} blocks received, block_count declares {}",
                f.blocks.len(),
                self.block_count
            )));
        }
        if self.tile_left > 0 || f.tiles.len() != self.tile_count {
            return Err(invalid(format!(
                "{field}: {} complete tiles received, tile_count declares {}",
                f.tiles.len() - usize::from(self.tile_left > 0),
                self.tile_count
            )));
        }
        if self.samples_left > 0 {
            return Err(invalid(format!(
                "{field}: the tiles hold {} samples, sample_count declares {}",
                self.sample_count - self.samples_left,
                self.sample_count
            )));
        }
        f.validate().map_err(|e| invalid(format!("{field}: {e}")))?;
        Ok(self.fragment)
    }
}

/// Whether `core` lies in the image (for output tiles).
pub(crate) fn rect_in(spec: &ImageSpec, r: &Rect) -> bool {
    !r.is_empty() && r.fits(spec.width, spec.height)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tessera_image::{Image, PixelFormat};
    use tessera_segment::{RegionMap, make_fragments};

    /// A 3-region fragment set of a ramp image.
    pub(crate) fn fragments(format: PixelFormat, halo: u32) -> (Image, RegionMap, Vec<Fragment>) {
        let spec = ImageSpec::new(50, 37, format);
        let mask = format.container_mask();
        let image = Image::new(
            spec,
            (0..spec.sample_count())
                .map(|i| (i as u16).wrapping_mul(97) & mask)
                .collect(),
        )
        .unwrap();
        let grid = BlockGrid::new(50, 37, 8).unwrap();
        let assignment: Vec<u16> = (0..grid.len()).map(|i| ((i * 7 / 3) % 3) as u16).collect();
        let map = RegionMap::new(grid, 3, assignment).unwrap();
        let frags = make_fragments(&image, &map, halo).unwrap();
        (image, map, frags)
    }

    pub(crate) fn rebuild(
        h: pb::FragmentHeader,
        parts: impl IntoIterator<Item = FragmentPart>,
        budget: u64,
    ) -> Result<Fragment, WireError> {
        let mut budget = budget;
        let mut b =
            FragmentBuilder::new("f", h, SampleCost::Memory, &mut budget, crate::MAX_BLOCKS)?;
        for p in parts {
            match p {
                FragmentPart::Blocks(c) => b.blocks(c)?,
                FragmentPart::Tile(t) => b.tile(t)?,
                FragmentPart::Samples(s) => b.samples(&s)?,
            }
        }
        b.finish()
    }

    #[test]
    fn body_round_trips_for_owned_and_shared_fragments() {
        for format in [
            PixelFormat::GRAY8,
            PixelFormat::gray16(12, false),
            PixelFormat::RGB8,
        ] {
            let (_, _, frags) = fragments(format, 2);
            for f in frags {
                let parts: Vec<_> = FragmentBody::new(std::sync::Arc::new(f.clone())).collect();
                assert_eq!(parts, FragmentBody::new(f.clone()).collect::<Vec<_>>());
                let got = rebuild(fragment_header(&f), parts, u64::MAX).unwrap();
                assert_eq!(got, f);
            }
        }
    }

    #[test]
    fn big_tiles_are_chunked() {
        let spec = ImageSpec::new(1200, 600, PixelFormat::gray16(12, false));
        let image = Image::zeroed(spec).unwrap();
        let grid = BlockGrid::new(1200, 600, 600).unwrap();
        let map = RegionMap::new(grid, 1, vec![0, 0]).unwrap();
        let f = make_fragments(&image, &map, 2).unwrap().remove(0);
        let parts: Vec<_> = FragmentBody::new(&f).collect();
        let mut bytes = 0;
        for p in &parts {
            if let FragmentPart::Samples(s) = p {
                assert!(s.len() <= CHUNK_BYTES);
                bytes += s.len();
            }
        }
        assert_eq!(bytes, 1200 * 600 * 2);
        assert!(parts.len() > 3);
        assert_eq!(rebuild(fragment_header(&f), parts, u64::MAX).unwrap(), f);
    }

    #[test]
    fn lies_and_disorder_are_refused() {
        let (_, _, frags) = fragments(PixelFormat::gray16(12, false), 1);
        let f = &frags[0];
        let parts: Vec<_> = FragmentBody::new(f).collect();
        let h = fragment_header(f);
        let err = |h: pb::FragmentHeader, parts: Vec<FragmentPart>| {
            rebuild(h, parts, u64::MAX).unwrap_err()
        };
        // Header lies.
        for (what, h2) in [
            ("no spec", pb::FragmentHeader { spec: None, ..h }),
            ("block size", pb::FragmentHeader { block_size: 0, ..h }),
            ("halo", pb::FragmentHeader { halo: 17, ..h }),
            (
                "no blocks",
                pb::FragmentHeader {
                    block_count: 0,
                    ..h
                },
            ),
            (
                "blocks beyond grid",
                pb::FragmentHeader {
                    block_count: 10_000,
                    ..h
                },
            ),
            (
                "tiles > blocks",
                pb::FragmentHeader {
                    tile_count: h.block_count + 1,
                    ..h
                },
            ),
            (
                "no samples",
                pb::FragmentHeader {
                    sample_count: 0,
                    ..h
                },
            ),
            (
                "more samples",
                pb::FragmentHeader {
                    sample_count: h.sample_count + 1,
                    ..h
                },
            ),
            (
                "fewer samples",
                pb::FragmentHeader {
                    sample_count: h.sample_count - 1,
                    ..h
                },
            ),
            (
                "fewer tiles",
                pb::FragmentHeader {
                    tile_count: h.tile_count - 1,
                    ..h
                },
            ),
            (
                "more tiles",
                pb::FragmentHeader {
                    tile_count: h.tile_count + 1,
                    ..h
                },
            ),
            ("halo mismatch", pb::FragmentHeader { halo: 2, ..h }),
        ] {
            let e = err(h2, parts.clone());
            assert!(matches!(e, WireError::Invalid(_)), "{what}: {e:?}");
        }
        // Budget.
        let e = rebuild(h, parts.clone(), 100).unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e:?}");
        let mut budget = u64::MAX;
        let e = FragmentBuilder::new("f", h, SampleCost::Wire, &mut budget, 2).unwrap_err();
        assert!(matches!(e, WireError::TooLarge(_)), "{e:?}");

        // Order and content.
        let first_tile = parts
            .iter()
            .position(|p| matches!(p, FragmentPart::Tile(_)))
            .unwrap();
        let mut tile_first = parts.clone();
        let t = tile_first.remove(first_tile);
        tile_first.insert(0, t);
        let mut outside = parts.clone();
        if let FragmentPart::Tile(t) = &mut outside[first_tile] {
            t.rect.as_mut().unwrap().x = 45;
            t.rect.as_mut().unwrap().width = 10;
        }
        let mut no_core = parts.clone();
        if let FragmentPart::Tile(t) = &mut no_core[first_tile] {
            t.core = None;
        }
        let mut shifted = parts.clone();
        if let FragmentPart::Tile(t) = &mut shifted[first_tile] {
            // Still inside the image and holding as many samples, but not
            // what the block list implies.
            t.core.as_mut().unwrap().y += 1;
            t.rect.as_mut().unwrap().y += 1;
        }
        let mut descending = parts.clone();
        if let FragmentPart::Blocks(b) = &mut descending[0] {
            b.blocks.swap(0, 1);
        }
        let mut odd = parts.clone();
        if let Some(FragmentPart::Samples(s)) = odd.last_mut() {
            s.pop();
        }
        let mut extra = parts.clone();
        extra.push(FragmentPart::Samples(vec![0, 0]));
        let mut empty_chunk = parts.clone();
        empty_chunk.insert(1, FragmentPart::Blocks(pb::BlockChunk { blocks: vec![] }));
        for (what, p) in [
            ("tile before blocks", tile_first),
            ("tile outside the image", outside),
            ("tile without core", no_core),
            ("tile not implied by the blocks", shifted),
            ("blocks descending", descending),
            ("odd byte count", odd),
            ("extra samples", extra),
            ("empty block chunk", empty_chunk),
        ] {
            let e = err(h, p);
            assert!(matches!(e, WireError::Invalid(_)), "{what}: {e:?}");
        }
    }
}
