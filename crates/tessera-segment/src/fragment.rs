//! Regions, fragments and the merge.
//!
//! A [`Fragment`] is what one untrusted node receives: the pixels of one
//! region's blocks plus the halo its operation needs, never more. Blocks of
//! the region that are horizontally adjacent in one block row are grouped into
//! a run; each run becomes a [`Tile`] holding the run rectangle grown by the
//! halo and clipped to the image. Everything else in the fragment (the tile
//! rectangles, their order) is derived from the block list, so
//! [`Fragment::validate`] recomputes it and never trusts a length.

use serde::{Deserialize, Serialize};
use tessera_image::{Image, ImageSpec, Rect};

use crate::grid::BlockGrid;
use crate::histogram::{
    Histogram, Mapping, count_row, equalization_mapping, map_row, merge_histograms,
};
use crate::ops::{Operation, run_local};
use crate::{Result, SegmentError};

/// Largest halo a fragment may carry.
pub const MAX_HALO: u32 = 16;

/// Which region each block belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionMap {
    pub grid: BlockGrid,
    /// Number of regions; ids are `0..regions`. A region may be empty (it
    /// then gets no fragment).
    pub regions: u16,
    /// Region id of every block, row-major.
    pub assignment: Vec<u16>,
}

impl RegionMap {
    pub fn new(grid: BlockGrid, regions: u16, assignment: Vec<u16>) -> Result<RegionMap> {
        let map = RegionMap {
            grid,
            regions,
            assignment,
        };
        map.validate()?;
        Ok(map)
    }

    /// All blocks in region 0.
    pub fn single(grid: BlockGrid) -> RegionMap {
        RegionMap {
            grid,
            regions: 1,
            assignment: vec![0; grid.len()],
        }
    }

    pub fn validate(&self) -> Result<()> {
        BlockGrid::new(self.grid.width, self.grid.height, self.grid.block_size)?;
        if self.regions == 0 {
            return Err(SegmentError::ZeroRegions);
        }
        if self.assignment.len() != self.grid.len() {
            return Err(SegmentError::RegionMap(format!(
                "{} assignments for {} blocks",
                self.assignment.len(),
                self.grid.len()
            )));
        }
        if let Some(&bad) = self.assignment.iter().find(|&&r| r >= self.regions) {
            return Err(SegmentError::RegionMap(format!(
                "region id {bad} but only {} regions",
                self.regions
            )));
        }
        Ok(())
    }

    /// Block indices of `region`, ascending.
    pub fn blocks_of(&self, region: u16) -> Vec<u32> {
        self.assignment
            .iter()
            .enumerate()
            .filter(|&(_, &r)| r == region)
            .map(|(i, _)| i as u32)
            .collect()
    }

    /// Number of blocks in each region.
    pub fn region_sizes(&self) -> Vec<usize> {
        let mut sizes = vec![0; self.regions as usize];
        for &r in &self.assignment {
            sizes[r as usize] += 1;
        }
        sizes
    }
}

/// Input pixels of one run of blocks: `rect` (the run grown by the halo,
/// clipped to the image) with its samples, frames x rows x columns x channels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tile {
    /// The output pixels: a horizontal run of the region's blocks.
    pub core: Rect,
    /// The pixels held: `core` grown by the halo, clipped to the image.
    pub rect: Rect,
    pub samples: Vec<u16>,
}

/// One region's share of an image, as sent to one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    pub region: u16,
    /// Geometry and format of the whole image (needed to clamp at the image
    /// border); no pixel data beyond the tiles.
    pub spec: ImageSpec,
    pub block_size: u32,
    pub halo: u32,
    /// Block indices (row-major), strictly ascending.
    pub blocks: Vec<u32>,
    pub tiles: Vec<Tile>,
}

/// Processed pixels of one run of blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputTile {
    pub core: Rect,
    pub samples: Vec<u16>,
}

/// What a node returns for a fragment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FragmentOutput {
    pub region: u16,
    pub tiles: Vec<OutputTile>,
}

/// (core, rect) of every run of `blocks` (ascending), in order.
fn runs(grid: &BlockGrid, blocks: &[u32], halo: u32) -> Vec<(Rect, Rect)> {
    let cols = grid.cols();
    let mut out = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i];
        let row = start / cols;
        let mut end = start;
        while i + 1 < blocks.len() && blocks[i + 1] == end + 1 && (end + 1) / cols == row {
            end += 1;
            i += 1;
        }
        i += 1;
        let first = grid.rect(start as usize);
        let last = grid.rect(end as usize);
        let core = Rect::new(
            first.x,
            first.y,
            last.right() as u32 - first.x,
            first.height,
        );
        let x0 = core.x.saturating_sub(halo);
        let y0 = core.y.saturating_sub(halo);
        let x1 = (core.right() + halo as u64).min(grid.width as u64) as u32;
        let y1 = (core.bottom() + halo as u64).min(grid.height as u64) as u32;
        out.push((core, Rect::new(x0, y0, x1 - x0, y1 - y0)));
    }
    out
}

/// Copies `rect` of every frame out of `image`.
fn crop(image: &Image, rect: Rect) -> Vec<u16> {
    let ch = image.channels() as usize;
    let w = image.width() as usize;
    let row_len = rect.width as usize * ch;
    let mut out = Vec::with_capacity(rect.area() as usize * ch * image.frames() as usize);
    for f in 0..image.frames() {
        let data = image.frame(f);
        for y in rect.y as usize..rect.bottom() as usize {
            let start = (y * w + rect.x as usize) * ch;
            out.extend_from_slice(&data[start..start + row_len]);
        }
    }
    out
}

/// One fragment per non-empty region, each carrying the region's blocks and
/// `halo` pixels around them (clipped to the image).
pub fn make_fragments(image: &Image, map: &RegionMap, halo: u32) -> Result<Vec<Fragment>> {
    map.validate()?;
    map.grid.check_image(image)?;
    if halo > MAX_HALO {
        return Err(SegmentError::Parameter(format!(
            "halo {halo} exceeds {MAX_HALO}"
        )));
    }
    let mut out = Vec::new();
    for region in 0..map.regions {
        let blocks = map.blocks_of(region);
        if blocks.is_empty() {
            continue;
        }
        let tiles = runs(&map.grid, &blocks, halo)
            .into_iter()
            .map(|(core, rect)| Tile {
                core,
                rect,
                samples: crop(image, rect),
            })
            .collect();
        out.push(Fragment {
            region,
            spec: *image.spec(),
            block_size: map.grid.block_size,
            halo,
            blocks,
            tiles,
        });
    }
    Ok(out)
}

impl Fragment {
    /// Checks internal consistency: the spec, the block list, and that every
    /// tile is exactly what the block list and halo imply, with the right
    /// number of samples, each fitting its container.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(SegmentError::Fragment(m));
        self.spec.validate()?;
        let grid = BlockGrid::new(self.spec.width, self.spec.height, self.block_size)?;
        if self.halo > MAX_HALO {
            return bad(format!("halo {} exceeds {MAX_HALO}", self.halo));
        }
        if self.blocks.is_empty() {
            return bad("no blocks".into());
        }
        if self.blocks.windows(2).any(|w| w[0] >= w[1]) {
            return bad("block indices are not strictly ascending".into());
        }
        if *self.blocks.last().unwrap_or(&0) as usize >= grid.len() {
            return bad(format!("block index beyond the {} blocks", grid.len()));
        }
        let expected = runs(&grid, &self.blocks, self.halo);
        if expected.len() != self.tiles.len() {
            return bad(format!(
                "{} tiles, the blocks imply {}",
                self.tiles.len(),
                expected.len()
            ));
        }
        let per_pixel = self.spec.format.channels as u64 * self.spec.frames as u64;
        let mask = self.spec.format.container_mask();
        for (tile, (core, rect)) in self.tiles.iter().zip(&expected) {
            if tile.core != *core || tile.rect != *rect {
                return bad(format!(
                    "tile {}/{} does not match the blocks (expected {core}/{rect})",
                    tile.core, tile.rect
                ));
            }
            if tile.samples.len() as u64 != rect.area() * per_pixel {
                return bad(format!(
                    "tile {} holds {} samples, expected {}",
                    tile.rect,
                    tile.samples.len(),
                    rect.area() * per_pixel
                ));
            }
            if tile.samples.iter().fold(0u16, |a, &w| a | w) & !mask != 0 {
                return bad(format!(
                    "tile {} has a sample wider than its container",
                    tile.rect
                ));
            }
        }
        Ok(())
    }

    /// Every pixel coordinate this fragment holds (with repeats where tiles
    /// overlap).
    pub fn pixels(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.tiles.iter().flat_map(|t| {
            let r = t.rect;
            (r.y..r.bottom() as u32).flat_map(move |y| (r.x..r.right() as u32).map(move |x| (x, y)))
        })
    }

    /// Runs a local operation over the fragment's blocks.
    pub fn apply(&self, op: Operation) -> Result<FragmentOutput> {
        self.validate()?;
        if op.is_global() {
            return Err(SegmentError::NeedsMapping(op));
        }
        if op.halo() > self.halo {
            return Err(SegmentError::Fragment(format!(
                "{op} needs a halo of {}, the fragment has {}",
                op.halo(),
                self.halo
            )));
        }
        let tiles = self
            .tiles
            .iter()
            .map(|t| OutputTile {
                core: t.core,
                samples: run_local(op, &self.spec, t.core, t.rect, &t.samples),
            })
            .collect();
        Ok(FragmentOutput {
            region: self.region,
            tiles,
        })
    }

    /// `(frame, start in tile.samples, start in the core output)` of every
    /// row of the tile's core (not the halo); each row is `core.width *
    /// channels` samples.
    fn core_rows(&self, tile: &Tile) -> impl Iterator<Item = (usize, usize, usize)> {
        let ch = self.spec.format.channels as usize;
        let (core, rect) = (tile.core, tile.rect);
        let (dx, dy) = ((core.x - rect.x) as usize, (core.y - rect.y) as usize);
        let (rw, rh) = (rect.width as usize, rect.height as usize);
        let (cw, chh) = (core.width as usize, core.height as usize);
        (0..self.spec.frames as usize).flat_map(move |fr| {
            (0..chh).map(move |y| {
                (
                    fr,
                    ((fr * rh + y + dy) * rw + dx) * ch,
                    (fr * chh + y) * cw * ch,
                )
            })
        })
    }

    /// Histograms of the fragment's own blocks (the halo is not counted, so
    /// the fragments' histograms add up to the image's).
    pub fn histogram(&self) -> Result<Histogram> {
        self.validate()?;
        Ok(self.count_histogram())
    }

    /// [`Self::histogram`] of a fragment known to be valid (made here).
    fn count_histogram(&self) -> Histogram {
        let mut h = Histogram::empty(self.spec.format, self.spec.frames);
        let fmt = self.spec.format;
        let ch = fmt.channels as usize;
        for tile in &self.tiles {
            let len = tile.core.width as usize * ch;
            for (fr, src, _) in self.core_rows(tile) {
                count_row(
                    fmt,
                    &mut h.planes[fr * ch..(fr + 1) * ch],
                    &tile.samples[src..src + len],
                );
            }
        }
        h
    }

    /// Applies the merger's mapping to the fragment's own blocks.
    pub fn apply_mapping(&self, mapping: &Mapping) -> Result<FragmentOutput> {
        self.validate()?;
        mapping.validate_for(self.spec.format, self.spec.frames)?;
        let fmt = self.spec.format;
        let ch = fmt.channels as usize;
        let per_pixel = ch * self.spec.frames as usize;
        let tiles = self
            .tiles
            .iter()
            .map(|tile| {
                let mut samples = vec![0u16; tile.core.area() as usize * per_pixel];
                let len = tile.core.width as usize * ch;
                for (fr, src, dst) in self.core_rows(tile) {
                    map_row(
                        fmt,
                        &mapping.planes[fr * ch..(fr + 1) * ch],
                        &tile.samples[src..src + len],
                        &mut samples[dst..dst + len],
                    );
                }
                OutputTile {
                    core: tile.core,
                    samples,
                }
            })
            .collect();
        Ok(FragmentOutput {
            region: self.region,
            tiles,
        })
    }
}

/// Reassembles fragment outputs into one image of `spec`. Every pixel must be
/// written exactly once.
pub fn merge(spec: &ImageSpec, outputs: &[FragmentOutput]) -> Result<Image> {
    spec.validate()?;
    let (w, h) = (spec.width as usize, spec.height as usize);
    let ch = spec.format.channels as usize;
    let per_pixel = ch as u64 * spec.frames as u64;
    let mut covered = vec![false; w * h];
    let mut samples = vec![0u16; spec.sample_count()];
    let frame_len = spec.frame_samples();
    for out in outputs {
        for tile in &out.tiles {
            let c = tile.core;
            if c.is_empty() || !c.fits(spec.width, spec.height) {
                return Err(SegmentError::Merge(format!(
                    "tile {c} of region {} is empty or outside the image",
                    out.region
                )));
            }
            if tile.samples.len() as u64 != c.area() * per_pixel {
                return Err(SegmentError::Merge(format!(
                    "tile {c} of region {} has {} samples, expected {}",
                    out.region,
                    tile.samples.len(),
                    c.area() * per_pixel
                )));
            }
            for y in c.y as usize..c.bottom() as usize {
                let row = &mut covered[y * w + c.x as usize..][..c.width as usize];
                if row.iter().any(|&b| b) {
                    return Err(SegmentError::Merge(format!(
                        "tile {c} of region {} overlaps another tile",
                        out.region
                    )));
                }
                row.iter_mut().for_each(|b| *b = true);
            }
            let row_len = c.width as usize * ch;
            for f in 0..spec.frames as usize {
                for (j, y) in (c.y as usize..c.bottom() as usize).enumerate() {
                    let src = &tile.samples[(f * c.height as usize + j) * row_len..][..row_len];
                    let dst = f * frame_len + (y * w + c.x as usize) * ch;
                    samples[dst..dst + row_len].copy_from_slice(src);
                }
            }
        }
    }
    if let Some(i) = covered.iter().position(|&b| !b) {
        return Err(SegmentError::Merge(format!(
            "pixel ({}, {}) is not covered by any fragment",
            i % w,
            i / w
        )));
    }
    Ok(Image::new(*spec, samples)?)
}

/// The reference: `op` on the whole image in one piece.
pub fn process_whole(image: &Image, op: Operation) -> Result<Image> {
    let spec = *image.spec();
    if op.is_global() {
        let ch = spec.format.channels as usize;
        let fmt = spec.format;
        let mut hist = Histogram::empty(fmt, spec.frames);
        for f in 0..spec.frames as usize {
            count_row(
                fmt,
                &mut hist.planes[f * ch..(f + 1) * ch],
                image.frame(f as u32),
            );
        }
        let mapping = equalization_mapping(&hist)?;
        let mut out = vec![0u16; spec.sample_count()];
        let frame_len = spec.frame_samples();
        for f in 0..spec.frames as usize {
            map_row(
                fmt,
                &mapping.planes[f * ch..(f + 1) * ch],
                image.frame(f as u32),
                &mut out[f * frame_len..(f + 1) * frame_len],
            );
        }
        return Ok(Image::new(spec, out)?);
    }
    let full = spec.full_rect();
    Ok(Image::new(
        spec,
        run_local(op, &spec, full, full, image.samples()),
    )?)
}

/// Region-wise processing in-process: fragments, per-fragment work (with the
/// histogram protocol for global operations), merge.
pub fn process_regions(image: &Image, map: &RegionMap, op: Operation) -> Result<Image> {
    if op.is_global() {
        return equalize_regions(image, map);
    }
    let fragments = make_fragments(image, map, op.halo())?;
    let outputs = fragments
        .iter()
        .map(|f| f.apply(op))
        .collect::<Result<Vec<_>>>()?;
    merge(image.spec(), &outputs)
}

/// The histogram protocol in-process: one histogram per region, merged
/// into one mapping, each region mapped with it. A global operation has no
/// halo, so a region's fragment would hold exactly its own blocks: each
/// region's runs of blocks are read where they lie in the image (the crop
/// copy is a transport's cost, not the protocol's), all regions' runs in
/// raster order, and each is written straight into the merged image. Every block has exactly one region (the
/// validated map), so every pixel is written exactly once: no coverage
/// bitmap is needed.
fn equalize_regions(image: &Image, map: &RegionMap) -> Result<Image> {
    map.validate()?;
    map.grid.check_image(image)?;
    let spec = *image.spec();
    let fmt = spec.format;
    let ch = fmt.channels as usize;
    let w = spec.width as usize;
    let frames = spec.frames as usize;
    // Every region's runs of blocks (its fragment's tiles), tagged with
    // the region's slot among the non-empty ones and visited in raster
    // order (block row, then x), so each pass reads the image front to back.
    let mut runs_of: Vec<(usize, Rect)> = Vec::new();
    let mut slots = 0;
    for r in 0..map.regions {
        let cores = runs(&map.grid, &map.blocks_of(r), 0);
        if cores.is_empty() {
            continue;
        }
        runs_of.extend(cores.into_iter().map(|(core, _)| (slots, core)));
        slots += 1;
    }
    runs_of.sort_unstable_by_key(|&(_, c)| (c.y, c.x));
    // Block rows: the runs sharing a top edge (and so a height).
    let mut bands: Vec<&[(usize, Rect)]> = Vec::new();
    let mut rest = runs_of.as_slice();
    while let Some(&(_, first)) = rest.first() {
        let n = rest.iter().take_while(|(_, c)| c.y == first.y).count();
        let (band, tail) = rest.split_at(n);
        bands.push(band);
        rest = tail;
    }
    let mut hists: Vec<Histogram> = (0..slots)
        .map(|_| Histogram::empty(fmt, spec.frames))
        .collect();
    for f in 0..frames {
        let data = image.frame(f as u32);
        for band in &bands {
            let (y0, h) = (band[0].1.y as usize, band[0].1.height as usize);
            for y in y0..y0 + h {
                for &(slot, core) in *band {
                    let at = (y * w + core.x as usize) * ch;
                    let len = core.width as usize * ch;
                    count_row(
                        fmt,
                        &mut hists[slot].planes[f * ch..(f + 1) * ch],
                        &data[at..at + len],
                    );
                }
            }
        }
    }
    let mapping = equalization_mapping(&merge_histograms(fmt, spec.frames, &hists)?)?;
    let frame_len = spec.frame_samples();
    let mut out = vec![0u16; spec.sample_count()];
    for f in 0..frames {
        let data = image.frame(f as u32);
        let planes = &mapping.planes[f * ch..(f + 1) * ch];
        let dst = &mut out[f * frame_len..(f + 1) * frame_len];
        for band in &bands {
            let (y0, h) = (band[0].1.y as usize, band[0].1.height as usize);
            for y in y0..y0 + h {
                for &(_, core) in *band {
                    let at = (y * w + core.x as usize) * ch;
                    let len = core.width as usize * ch;
                    map_row(fmt, planes, &data[at..at + len], &mut dst[at..at + len]);
                }
            }
        }
    }
    Ok(Image::new(spec, out)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_image::PixelFormat;

    fn ramp(w: u32, h: u32) -> Image {
        let spec = ImageSpec::new(w, h, PixelFormat::GRAY8);
        Image::new(spec, (0..w * h).map(|i| (i % 251) as u16).collect()).unwrap()
    }

    #[test]
    fn runs_group_adjacent_blocks_in_a_row() {
        let g = BlockGrid::new(40, 20, 10).unwrap(); // 4 x 2 blocks
        let r = runs(&g, &[0, 1, 3, 4, 5], 2);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], (Rect::new(0, 0, 20, 10), Rect::new(0, 0, 22, 12)));
        assert_eq!(r[1], (Rect::new(30, 0, 10, 10), Rect::new(28, 0, 12, 12)));
        assert_eq!(r[2], (Rect::new(0, 10, 20, 10), Rect::new(0, 8, 22, 12)));
    }

    #[test]
    fn tampered_fragments_are_refused() {
        let img = ramp(40, 20);
        let g = BlockGrid::new(40, 20, 10).unwrap();
        let map = RegionMap::new(g, 2, vec![0, 1, 0, 1, 1, 0, 1, 0]).unwrap();
        let frag = make_fragments(&img, &map, 2).unwrap().remove(0);
        frag.validate().unwrap();
        let mut f = frag.clone();
        f.tiles[0].samples.pop();
        assert!(matches!(f.validate(), Err(SegmentError::Fragment(_))));
        let mut f = frag.clone();
        f.tiles[0].rect.width += 1;
        assert!(f.validate().is_err());
        let mut f = frag.clone();
        f.blocks.swap(0, 1);
        assert!(f.validate().is_err());
        let mut f = frag.clone();
        f.blocks.push(99);
        assert!(f.validate().is_err());
        let mut f = frag.clone();
        f.tiles[0].samples[0] = 256;
        assert!(f.validate().is_err());
        let mut f = frag.clone();
        f.halo = 1;
        assert!(f.validate().is_err(), "tiles no longer match the halo");
        assert_eq!(
            frag.apply(Operation::HistEq),
            Err(SegmentError::NeedsMapping(Operation::HistEq))
        );
        let small = make_fragments(&img, &map, 1).unwrap().remove(0);
        assert!(matches!(
            small.apply(Operation::Gaussian),
            Err(SegmentError::Fragment(_))
        ));
    }

    #[test]
    fn merge_refuses_gaps_overlaps_and_bad_lengths() {
        let img = ramp(20, 10);
        let map = RegionMap::new(BlockGrid::new(20, 10, 10).unwrap(), 2, vec![0, 1]).unwrap();
        let outs: Vec<_> = make_fragments(&img, &map, 1)
            .unwrap()
            .iter()
            .map(|f| f.apply(Operation::Median).unwrap())
            .collect();
        assert!(merge(img.spec(), &outs).is_ok());
        assert!(matches!(
            merge(img.spec(), &outs[..1]),
            Err(SegmentError::Merge(_))
        ));
        let twice = [outs[0].clone(), outs[0].clone(), outs[1].clone()];
        assert!(matches!(
            merge(img.spec(), &twice),
            Err(SegmentError::Merge(_))
        ));
        let mut short = outs.clone();
        short[1].tiles[0].samples.pop();
        assert!(merge(img.spec(), &short).is_err());
        let mut outside = outs;
        outside[1].tiles[0].core.x = 15;
        assert!(merge(img.spec(), &outside).is_err());
    }

    #[test]
    fn region_map_validation() {
        let g = BlockGrid::new(20, 10, 10).unwrap();
        assert!(RegionMap::new(g, 2, vec![0]).is_err());
        assert!(RegionMap::new(g, 2, vec![0, 2]).is_err());
        assert_eq!(
            RegionMap::new(g, 0, vec![0, 0]),
            Err(SegmentError::ZeroRegions)
        );
        assert_eq!(RegionMap::single(g).region_sizes(), vec![2]);
    }

    #[test]
    fn mapping_shape_is_checked() {
        let h = Histogram::empty(PixelFormat::GRAY8, 1);
        let mut m = equalization_mapping(&h).unwrap();
        assert!(m.validate_for(PixelFormat::GRAY8, 1).is_ok());
        assert!(m.validate_for(PixelFormat::GRAY8, 2).is_err());
        m.planes[0].pop();
        assert!(m.validate_for(PixelFormat::GRAY8, 1).is_err());
        let mut bad = h.clone();
        bad.planes.push(vec![0; 256]);
        assert!(merge_histograms(PixelFormat::GRAY8, 1, &[bad]).is_err());
    }

    #[test]
    fn equalization_spreads_a_narrow_histogram() {
        let spec = ImageSpec::new(4, 1, PixelFormat::GRAY8);
        let img = Image::new(spec, vec![10, 11, 12, 13]).unwrap();
        let out = process_whole(&img, Operation::HistEq).unwrap();
        assert_eq!(out.samples(), &[0, 85, 170, 255]);
        let flat = Image::new(spec, vec![7; 4]).unwrap();
        assert_eq!(process_whole(&flat, Operation::HistEq).unwrap(), flat);
    }
}
