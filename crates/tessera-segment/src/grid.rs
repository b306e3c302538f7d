//! The block grid and per-block statistics: Shannon entropy (eq. 6) and the
//! sums the fitness needs (sample count, sum, sum of squares, non-zero count).

use serde::{Deserialize, Serialize};
use tessera_image::{Image, PixelFormat, Rect, metrics};

use crate::{Result, SegmentError};

/// The paper's block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 16;

/// Entropy is measured over at most 2^8 bins per color component: formats with
/// more than 8 stored bits keep the 8 high bits of `value - min_value`.
pub const ENTROPY_BINS_LOG2: u8 = 8;

/// Equal square blocks in row-major order; the last column and row may be
/// narrower or shorter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlockGrid {
    pub width: u32,
    pub height: u32,
    pub block_size: u32,
}

impl BlockGrid {
    /// Refuses an empty image, a zero block size and a block that does not
    /// fit in the image (wider or taller than it).
    pub fn new(width: u32, height: u32, block_size: u32) -> Result<BlockGrid> {
        if width == 0 || height == 0 {
            return Err(SegmentError::EmptyImage { width, height });
        }
        if block_size == 0 {
            return Err(SegmentError::ZeroBlockSize);
        }
        if block_size > width || block_size > height {
            return Err(SegmentError::BlockTooLarge {
                block_size,
                width,
                height,
            });
        }
        Ok(BlockGrid {
            width,
            height,
            block_size,
        })
    }

    pub fn for_image(image: &Image, block_size: u32) -> Result<BlockGrid> {
        BlockGrid::new(image.width(), image.height(), block_size)
    }

    pub fn cols(&self) -> u32 {
        self.width.div_ceil(self.block_size)
    }

    pub fn rows(&self) -> u32 {
        self.height.div_ceil(self.block_size)
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.cols() as usize * self.rows() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pixel rectangle of block (`col`, `row`), clipped to the image.
    pub fn rect_at(&self, col: u32, row: u32) -> Rect {
        let x = col * self.block_size;
        let y = row * self.block_size;
        Rect::new(
            x,
            y,
            self.block_size.min(self.width - x),
            self.block_size.min(self.height - y),
        )
    }

    /// Pixel rectangle of block `index` (row-major).
    pub fn rect(&self, index: usize) -> Rect {
        let cols = self.cols() as usize;
        self.rect_at((index % cols) as u32, (index / cols) as u32)
    }

    /// Block index holding pixel (`x`, `y`).
    pub fn block_of(&self, x: u32, y: u32) -> usize {
        (y / self.block_size) as usize * self.cols() as usize + (x / self.block_size) as usize
    }

    /// Fails unless the grid was made for `image`'s size.
    pub fn check_image(&self, image: &Image) -> Result<()> {
        if image.width() != self.width || image.height() != self.height {
            return Err(SegmentError::Parameter(format!(
                "block grid is for a {}x{} image, got {}x{}",
                self.width,
                self.height,
                image.width(),
                image.height()
            )));
        }
        Ok(())
    }
}

/// What the fitness needs to know about one block. Sums run over every
/// sample of the block (all frames and channels) in numeric value
/// ([`PixelFormat::value`]).
#[derive(Clone, Copy, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct BlockStats {
    /// Shannon entropy in bits (eq. 6); for RGB the mean over the three
    /// components, each measured on its own histogram as the paper does.
    pub entropy: f64,
    pub samples: u64,
    pub sum: i64,
    pub sum_sq: u64,
    /// Samples whose value is not 0 (they differ from a blanked mosaic).
    pub nonzero: u64,
}

/// Entropy bin of a stored word: `value - min_value`, reduced to its 8 high
/// bits when the format stores more than 8 bits (documented binning for 12-
/// and 16-bit images; signed values are offset first so the bins stay ordered).
pub fn entropy_bin(format: PixelFormat, word: u16) -> usize {
    let (lo, _) = format.value_range();
    let offset = (format.value(word) - lo) as u32;
    (offset >> format.bits_stored.saturating_sub(ENTROPY_BINS_LOG2)) as usize
}

/// Per-block statistics in row-major block order.
pub fn block_stats(image: &Image, grid: &BlockGrid) -> Result<Vec<BlockStats>> {
    grid.check_image(image)?;
    let format = image.format();
    let ch = format.channels as usize;
    let bins = 1usize << format.bits_stored.min(ENTROPY_BINS_LOG2);
    // Word -> (bin, value) tables: one lookup per sample in the hot loop.
    let words = format.container_mask() as usize + 1;
    let bin_of: Vec<u16> = (0..words)
        .map(|w| entropy_bin(format, w as u16) as u16)
        .collect();
    let value_of: Vec<i32> = (0..words).map(|w| format.value(w as u16)).collect();
    let mut hist = vec![0u64; bins * ch];
    let width = image.width() as usize;
    let mut out = Vec::with_capacity(grid.len());
    for index in 0..grid.len() {
        let rect = grid.rect(index);
        hist.iter_mut().for_each(|h| *h = 0);
        let mut st = BlockStats::default();
        for frame in 0..image.frames() {
            let data = image.frame(frame);
            for y in rect.y as usize..rect.bottom() as usize {
                let start = (y * width + rect.x as usize) * ch;
                let row = &data[start..start + rect.width as usize * ch];
                for (i, &w) in row.iter().enumerate() {
                    let c = i % ch;
                    hist[c * bins + bin_of[w as usize] as usize] += 1;
                    let v = value_of[w as usize] as i64;
                    st.sum += v;
                    st.sum_sq += (v * v) as u64;
                    st.nonzero += u64::from(v != 0);
                }
                st.samples += row.len() as u64;
            }
        }
        st.entropy = hist
            .chunks_exact(bins)
            .map(metrics::entropy_of_histogram)
            .sum::<f64>()
            / ch as f64;
        out.push(st);
    }
    Ok(out)
}

/// Entropy of every block (eq. 6), row-major.
pub fn block_entropies(image: &Image, grid: &BlockGrid) -> Result<Vec<f64>> {
    Ok(block_stats(image, grid)?
        .into_iter()
        .map(|s| s.entropy)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_image::ImageSpec;

    #[test]
    fn grid_geometry_and_edge_blocks() {
        let g = BlockGrid::new(40, 20, 16).unwrap();
        assert_eq!((g.cols(), g.rows(), g.len()), (3, 2, 6));
        assert_eq!(g.rect(2), Rect::new(32, 0, 8, 16));
        assert_eq!(g.rect(5), Rect::new(32, 16, 8, 4));
        assert_eq!(g.block_of(33, 17), 5);
        let covered: u64 = (0..g.len()).map(|i| g.rect(i).area()).sum();
        assert_eq!(covered, 800);
    }

    #[test]
    fn grid_rejects_bad_sizes() {
        assert_eq!(BlockGrid::new(8, 8, 0), Err(SegmentError::ZeroBlockSize));
        assert!(matches!(
            BlockGrid::new(8, 8, 9),
            Err(SegmentError::BlockTooLarge { .. })
        ));
        assert!(matches!(
            BlockGrid::new(0, 8, 1),
            Err(SegmentError::EmptyImage { .. })
        ));
        assert!(BlockGrid::new(8, 8, 8).is_ok());
    }

    #[test]
    fn entropy_of_known_blocks() {
        // Left block constant (0 bits), right block 256 distinct values (8 bits).
        let spec = ImageSpec::new(32, 16, PixelFormat::GRAY8);
        let mut s = vec![0u16; 32 * 16];
        for y in 0..16 {
            for x in 16..32 {
                s[y * 32 + x] = ((y * 16) + (x - 16)) as u16;
            }
        }
        let img = Image::new(spec, s).unwrap();
        let g = BlockGrid::new(32, 16, 16).unwrap();
        let e = block_entropies(&img, &g).unwrap();
        assert_eq!(e[0], 0.0);
        assert!((e[1] - 8.0).abs() < 1e-12);
        let st = block_stats(&img, &g).unwrap();
        assert_eq!(st[1].samples, 256);
        assert_eq!(st[1].sum, (0..256).sum::<i64>());
        assert_eq!(st[1].nonzero, 255);
    }

    #[test]
    fn sixteen_bit_binning_and_rgb_components() {
        let f = PixelFormat::gray16(12, true);
        assert_eq!(entropy_bin(f, f.word(-2048)), 0);
        assert_eq!(entropy_bin(f, f.word(2047)), 255);
        assert_eq!(entropy_bin(f, f.word(0)), 128);
        assert_eq!(entropy_bin(PixelFormat::GRAY16, 0xFFFF), 255);
        assert_eq!(entropy_bin(PixelFormat::gray16(4, false), 9), 9);
        // RGB: R uniform over 4 values (2 bits), G and B constant -> mean 2/3.
        let spec = ImageSpec::new(2, 2, PixelFormat::RGB8);
        let s = vec![0, 5, 5, 1, 5, 5, 2, 5, 5, 3, 5, 5];
        let img = Image::new(spec, s).unwrap();
        let e = block_entropies(&img, &BlockGrid::new(2, 2, 2).unwrap()).unwrap();
        assert!((e[0] - 2.0 / 3.0).abs() < 1e-12);
    }
}
