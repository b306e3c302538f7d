//! GA-ES (paper 000, sections 3.1-4): split an image into equal blocks,
//! measure each block's Shannon entropy (eq. 6), group the blocks into `N`
//! regions by entropy thresholds chosen by a genetic algorithm (Algorithm 1)
//! against a concrete fitness (processing makespan, eq. 12, plus what one
//! region reveals, eq. 7-11), cut the image into per-region [`Fragment`]s that
//! carry only the region's blocks and the halo an operation needs, run the
//! operation on each fragment and merge the results.
//!
//! The merged result of region-wise processing is bit-identical to the same
//! operation run on the whole image: every operation is integer-exact and
//! clamps coordinates at the *image* border, never at a fragment border.
//!
//! Pure library: no I/O, no async, no protos. See `docs/SEGMENTATION.md`.
#![forbid(unsafe_code)]

pub mod fragment;
pub mod ga;
pub mod grid;
pub mod histogram;
pub mod ops;

pub use fragment::{
    Fragment, FragmentOutput, OutputTile, RegionMap, Tile, make_fragments, merge, process_regions,
    process_whole,
};
pub use ga::{
    CostModel, FitnessTerms, GaParams, Problem, SearchResult, SegmentConfig, Segmentation, Weights,
    segment,
};
pub use grid::{BlockGrid, BlockStats, DEFAULT_BLOCK_SIZE, block_entropies, block_stats};
pub use histogram::{Histogram, Mapping, equalization_mapping, merge_histograms};
pub use ops::Operation;

use tessera_image::ImageError;

/// Every failure of this crate. Bad input is always one of these, never a
/// panic.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SegmentError {
    #[error("image: {0}")]
    Image(#[from] ImageError),
    #[error("the image is empty ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    #[error("block size must be at least 1")]
    ZeroBlockSize,
    #[error("block size {block_size} does not fit in the {width}x{height} image")]
    BlockTooLarge {
        block_size: u32,
        width: u32,
        height: u32,
    },
    #[error("the region count must be at least 1")]
    ZeroRegions,
    #[error("{requested} regions requested but the image has only {blocks} blocks")]
    TooManyRegions { requested: usize, blocks: usize },
    #[error(
        "{requested} regions requested but the block entropies take only {levels} distinct values"
    )]
    NotEnoughEntropyLevels { requested: usize, levels: usize },
    #[error("unknown operation {0:?} (expected gaussian, median, unsharp, sobel or histeq)")]
    UnknownOperation(String),
    #[error("operation {0} is global: use histogram, equalization_mapping and apply_mapping")]
    NeedsMapping(Operation),
    #[error("invalid region map: {0}")]
    RegionMap(String),
    #[error("invalid fragment: {0}")]
    Fragment(String),
    #[error("invalid histogram or mapping: {0}")]
    Histogram(String),
    #[error("cannot merge fragment outputs: {0}")]
    Merge(String),
    #[error("invalid parameter: {0}")]
    Parameter(String),
    #[error("exhaustive search over {0} chromosomes exceeds the limit")]
    SearchSpaceTooLarge(u128),
}

pub type Result<T> = std::result::Result<T, SegmentError>;
