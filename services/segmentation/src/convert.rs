//! Request checking: the start message to a checked plan (`TryFrom`,
//! errors name the field). The core never sees a proto. Specs, operations,
//! region maps, fragments and the summary are converted by `tessera-wire`,
//! which the gateway shares to decode the response.

use tessera_image::ImageSpec;
use tessera_proto::segmentation::v1 as pb;
use tessera_segment::{BlockGrid, GaParams, Operation, RegionMap, SegmentConfig};
use tessera_wire::segmentation::required_spec;
use tessera_wire::{MAX_BLOCKS, MAX_REGIONS, operation_from_proto};

use crate::error::SegmentationError;

/// Largest accepted request message: a chunk plus framing, far below the
/// platform's 4 MiB.
pub const MAX_REQUEST_MESSAGE: usize = tessera_wire::MAX_MESSAGE_BYTES;
/// Largest response message: a chunk, a region map (one byte per block) or a
/// block-list chunk, plus framing.
pub const MAX_RESPONSE_MESSAGE: usize = tessera_wire::MAX_MESSAGE_BYTES;

fn invalid(m: impl Into<String>) -> SegmentationError {
    SegmentationError::InvalidArgument(m.into())
}

/// A validated start message.
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentPlan {
    pub spec: ImageSpec,
    pub operation: Operation,
    pub config: SegmentConfig,
}

impl SegmentPlan {
    /// Bytes of pixels the stream must carry.
    pub fn pixel_bytes(&self) -> u64 {
        self.spec.byte_len() as u64
    }

    /// The block grid (checked in `try_from`).
    pub fn grid(&self) -> Result<BlockGrid, SegmentationError> {
        Ok(BlockGrid::new(
            self.spec.width,
            self.spec.height,
            self.config.block_size,
        )?)
    }
}

impl TryFrom<pb::SegmentStart> for SegmentPlan {
    type Error = SegmentationError;

    fn try_from(s: pb::SegmentStart) -> Result<Self, Self::Error> {
        let spec = required_spec("start.spec", s.spec)?;
        let side = spec.width.min(spec.height);
        if s.block_size == 0 || s.block_size > side {
            return Err(invalid(format!(
                "start.block_size must be 1..={side} for a {}x{} image, got {}",
                spec.width, spec.height, s.block_size
            )));
        }
        let grid = BlockGrid::new(spec.width, spec.height, s.block_size)?;
        let blocks = grid.len() as u64;
        if blocks > MAX_BLOCKS {
            return Err(invalid(format!(
                "start.block_size {} gives {blocks} blocks, more than {MAX_BLOCKS}",
                s.block_size
            )));
        }
        if s.max_regions == 0 || s.max_regions > MAX_REGIONS {
            return Err(invalid(format!(
                "start.max_regions must be 1..={MAX_REGIONS}, got {}",
                s.max_regions
            )));
        }
        let min_regions = match s.regions {
            None => 1,
            Some(n) if n == 0 || n > s.max_regions => {
                return Err(invalid(format!(
                    "start.regions must be 1..=max_regions ({}), got {n}",
                    s.max_regions
                )));
            }
            Some(n) if u64::from(n) > blocks => {
                return Err(invalid(format!(
                    "start.regions {n} exceeds the {blocks} blocks of the image"
                )));
            }
            Some(n) => n,
        };
        let max_regions = s.regions.unwrap_or(s.max_regions);
        let operation = operation_from_proto("start.operation", s.operation)?;
        Ok(Self {
            spec,
            operation,
            config: SegmentConfig {
                block_size: s.block_size,
                min_regions: min_regions as usize,
                max_regions: max_regions as usize,
                ga: GaParams {
                    seed: s.seed,
                    ..GaParams::default()
                },
                ..SegmentConfig::default()
            },
        })
    }
}

/// Samples every fragment of `map` with `halo` would hold, computed from
/// the map alone (before any fragment is allocated): every horizontal run of
/// a region's blocks, grown by the halo and clipped to the image.
pub fn fragment_samples(map: &RegionMap, halo: u32, spec: &ImageSpec) -> u64 {
    let grid = &map.grid;
    let cols = grid.cols() as usize;
    let per_pixel = u64::from(spec.format.channels) * u64::from(spec.frames);
    let mut total = 0u64;
    for (row, ids) in map.assignment.chunks(cols).enumerate() {
        let mut c = 0;
        while c < ids.len() {
            let mut end = c;
            while end + 1 < ids.len() && ids[end + 1] == ids[c] {
                end += 1;
            }
            let first = grid.rect_at(c as u32, row as u32);
            let last = grid.rect_at(end as u32, row as u32);
            let x0 = u64::from(first.x.saturating_sub(halo));
            let y0 = u64::from(first.y.saturating_sub(halo));
            let x1 = (last.right() + u64::from(halo)).min(u64::from(grid.width));
            let y1 = (last.bottom() + u64::from(halo)).min(u64::from(grid.height));
            total += (x1 - x0) * (y1 - y0) * per_pixel;
            c = end + 1;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_image::PixelFormat;
    use tessera_segment::make_fragments;

    fn start() -> pb::SegmentStart {
        pb::SegmentStart {
            spec: Some(pb::ImageSpec {
                width: 64,
                height: 48,
                frames: 0,
                bits_allocated: 16,
                bits_stored: 12,
                signed: false,
                channels: 1,
            }),
            block_size: 16,
            max_regions: 3,
            regions: None,
            operation: pb::Operation::Gaussian.into(),
            seed: 9,
        }
    }

    fn err(s: pb::SegmentStart) -> String {
        match SegmentPlan::try_from(s) {
            Err(SegmentationError::InvalidArgument(m)) => m,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn valid_start() {
        let p = SegmentPlan::try_from(start()).unwrap();
        assert_eq!(p.spec.frames, 1);
        assert_eq!(p.pixel_bytes(), 64 * 48 * 2);
        assert_eq!(p.operation, Operation::Gaussian);
        assert_eq!((p.config.min_regions, p.config.max_regions), (1, 3));
        assert_eq!(p.config.ga.seed, 9);
        let fixed = SegmentPlan::try_from(pb::SegmentStart {
            regions: Some(2),
            ..start()
        })
        .unwrap();
        assert_eq!((fixed.config.min_regions, fixed.config.max_regions), (2, 2));
    }

    #[test]
    fn invalid_starts_name_the_field() {
        assert!(
            err(pb::SegmentStart {
                spec: None,
                ..start()
            })
            .contains("start.spec")
        );
        assert!(
            err(pb::SegmentStart {
                block_size: 0,
                ..start()
            })
            .contains("start.block_size")
        );
        assert!(
            err(pb::SegmentStart {
                block_size: 49,
                ..start()
            })
            .contains("start.block_size")
        );
        assert!(
            err(pb::SegmentStart {
                max_regions: 0,
                ..start()
            })
            .contains("start.max_regions")
        );
        assert!(
            err(pb::SegmentStart {
                max_regions: 17,
                ..start()
            })
            .contains("start.max_regions")
        );
        assert!(
            err(pb::SegmentStart {
                regions: Some(0),
                ..start()
            })
            .contains("start.regions")
        );
        assert!(
            err(pb::SegmentStart {
                regions: Some(4),
                ..start()
            })
            .contains("start.regions")
        );
        assert!(
            err(pb::SegmentStart {
                // 2 blocks (64x48 in 48-pixel blocks), 3 regions.
                block_size: 48,
                max_regions: 3,
                regions: Some(3),
                ..start()
            })
            .contains("start.regions")
        );
        assert!(
            err(pb::SegmentStart {
                operation: 0,
                ..start()
            })
            .contains("start.operation")
        );
        assert!(
            err(pb::SegmentStart {
                operation: 99,
                ..start()
            })
            .contains("start.operation")
        );
        let mut s = start();
        s.spec.as_mut().unwrap().bits_allocated = 300;
        assert!(err(s).contains("start.spec.bits_allocated"));
        let mut s = start();
        s.spec.as_mut().unwrap().width = 65_536;
        s.spec.as_mut().unwrap().height = 65_536;
        assert!(err(s).contains("start.spec"));
        let mut s = start();
        s.spec.as_mut().unwrap().width = 2048;
        s.spec.as_mut().unwrap().height = 2048;
        s.block_size = 1;
        assert!(err(s).contains("blocks"));
    }

    #[test]
    fn fragment_samples_matches_make_fragments() {
        let spec = ImageSpec::new(50, 37, PixelFormat::GRAY8);
        let image = tessera_image::Image::zeroed(spec).unwrap();
        let grid = BlockGrid::new(50, 37, 8).unwrap();
        let assignment: Vec<u16> = (0..grid.len()).map(|i| ((i * 7 / 3) % 3) as u16).collect();
        let map = RegionMap::new(grid, 3, assignment).unwrap();
        for halo in [0, 1, 2, 5] {
            let frags = make_fragments(&image, &map, halo).unwrap();
            let real: u64 = frags
                .iter()
                .flat_map(|f| &f.tiles)
                .map(|t| t.samples.len() as u64)
                .sum();
            assert_eq!(fragment_samples(&map, halo, &spec), real, "halo {halo}");
        }
    }
}
