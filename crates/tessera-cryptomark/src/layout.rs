//! Geometry shared by protect and restore: the tile lattice, the ROI blocks,
//! and the payload and plane widths.
//!
//! Tiles are `block` x `block` squares on a lattice aligned with the ROI's
//! top-left corner (so every 16x16 ROI block of the paper is exactly the ROI
//! part of one tile); tiles at the image border may be smaller. ROI blocks
//! are numbered in raster order, frame after frame.

use tessera_image::Rect;

use crate::header::Header;

/// One tile of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    /// Index within its frame.
    pub index: u32,
    pub rect: Rect,
    /// `rect` intersected with the ROI (empty when the tile is outside it).
    pub roi_part: Rect,
    /// Index of the ROI block within its frame, when `roi_part` is not empty.
    pub roi_block: Option<u32>,
}

/// Everything derived from a validated header.
#[derive(Clone, Debug)]
pub struct Layout {
    pub tiles: Vec<Tile>,
    pub frames: u32,
    pub channels: usize,
    pub roi_blocks_per_frame: u32,
    /// Payload bits b, high-plane bits ceil(b/2), low-plane bits floor(b/2).
    pub payload_bits: u8,
    pub high_plane_bits: u8,
    pub low_plane_bits: u8,
}

fn starts(len: u32, offset: u32, block: u32) -> Vec<(u32, u32)> {
    let mut cuts = vec![0u32];
    let mut next = if offset == 0 { block } else { offset };
    while next < len {
        cuts.push(next);
        next += block;
    }
    cuts.push(len);
    cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

impl Layout {
    pub fn new(header: &Header) -> Layout {
        let spec = &header.spec;
        let roi = header.roi;
        let block = header.block;
        let (ox, oy) = if roi.is_empty() {
            (0, 0)
        } else {
            (roi.x % block, roi.y % block)
        };
        let cols = starts(spec.width, ox, block);
        let rows = starts(spec.height, oy, block);
        let mut tiles = Vec::with_capacity(cols.len() * rows.len());
        let mut roi_blocks = 0u32;
        for &(y, h) in &rows {
            for &(x, w) in &cols {
                let rect = Rect::new(x, y, w, h);
                let roi_part = if roi.is_empty() {
                    Rect::default()
                } else {
                    rect.intersect(&roi)
                };
                let roi_block = if roi_part.is_empty() {
                    None
                } else {
                    roi_blocks += 1;
                    Some(roi_blocks - 1)
                };
                tiles.push(Tile {
                    index: tiles.len() as u32,
                    rect,
                    roi_part,
                    roi_block,
                });
            }
        }
        let b = header.payload_bits;
        Layout {
            tiles,
            frames: spec.frames,
            channels: spec.format.channels as usize,
            roi_blocks_per_frame: roi_blocks,
            payload_bits: b,
            high_plane_bits: b.div_ceil(2),
            low_plane_bits: b / 2,
        }
    }

    /// Total number of ROI blocks m over all frames.
    pub fn roi_blocks(&self) -> u64 {
        self.roi_blocks_per_frame as u64 * self.frames as u64
    }

    /// Tiles over all frames.
    pub fn tile_count(&self) -> u64 {
        self.tiles.len() as u64 * self.frames as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lattice_follows_the_roi_corner() {
        assert_eq!(starts(40, 0, 16), vec![(0, 16), (16, 16), (32, 8)]);
        assert_eq!(starts(40, 5, 16), vec![(0, 5), (5, 16), (21, 16), (37, 3)]);
        assert_eq!(starts(10, 0, 16), vec![(0, 10)]);
    }
}
