//! The edge: protos to domain types (`TryFrom`, errors name the field) and
//! domain results back to protos. The core never sees a proto.

use tessera_image::{ImageSpec, PixelFormat, Rect};
use tessera_proto::segmentation::v1 as pb;
use tessera_segment::{
    BlockGrid, Fragment, GaParams, Operation, RegionMap, SegmentConfig, Segmentation,
};

use crate::error::SegmentationError;

/// Largest data chunk in any message, either direction.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest accepted request message: a chunk plus framing, far below the
/// platform's 4 MiB.
pub const MAX_REQUEST_MESSAGE: usize = CHUNK_BYTES + 64 * 1024;
/// Largest response message: a chunk, a region map (one byte per block) or a
/// block-list chunk, plus framing.
pub const MAX_RESPONSE_MESSAGE: usize = CHUNK_BYTES + 64 * 1024;
/// Most regions one request may ask for (storage nodes).
pub const MAX_REGIONS: u32 = 16;
/// Most blocks a grid may have: the region map (one byte per block) then
/// fits one 1 MiB message.
pub const MAX_BLOCKS: u64 = CHUNK_BYTES as u64;
/// Block indices per `BlockChunk` (at most 5 varint bytes each: 640 KiB).
pub const BLOCK_CHUNK: usize = 128 * 1024;

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
        let spec = spec_from_proto(
            "start.spec",
            s.spec.ok_or_else(|| invalid("start.spec is required"))?,
        )?;
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
        let operation = match pb::Operation::try_from(s.operation) {
            Ok(pb::Operation::Unspecified) => {
                return Err(invalid("start.operation is required"));
            }
            Err(_) => {
                return Err(invalid(format!(
                    "start.operation: unknown operation {}",
                    s.operation
                )));
            }
            Ok(pb::Operation::Gaussian) => Operation::Gaussian,
            Ok(pb::Operation::Median) => Operation::Median,
            Ok(pb::Operation::Unsharp) => Operation::Unsharp,
            Ok(pb::Operation::Sobel) => Operation::Sobel,
            Ok(pb::Operation::Histeq) => Operation::HistEq,
        };
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

/// Checks a spec and turns it into the core's type.
pub fn spec_from_proto(field: &str, s: pb::ImageSpec) -> Result<ImageSpec, SegmentationError> {
    let narrow = |name: &str, v: u32| {
        u8::try_from(v).map_err(|_| invalid(format!("{field}.{name} {v} is out of range")))
    };
    let spec = ImageSpec {
        width: s.width,
        height: s.height,
        frames: s.frames.max(1),
        format: PixelFormat {
            bits_allocated: narrow("bits_allocated", s.bits_allocated)?,
            bits_stored: narrow("bits_stored", s.bits_stored)?,
            signed: s.signed,
            channels: narrow("channels", s.channels)?,
        },
    };
    spec.validate()
        .map_err(|e| invalid(format!("{field}: {e}")))?;
    Ok(spec)
}

/// The core's spec as a proto.
pub fn spec_to_proto(s: &ImageSpec) -> pb::ImageSpec {
    pb::ImageSpec {
        width: s.width,
        height: s.height,
        frames: s.frames,
        bits_allocated: s.format.bits_allocated.into(),
        bits_stored: s.format.bits_stored.into(),
        signed: s.format.signed,
        channels: s.format.channels.into(),
    }
}

pub fn rect_to_proto(r: &Rect) -> pb::Rect {
    pb::Rect {
        x: r.x,
        y: r.y,
        width: r.width,
        height: r.height,
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

/// The summary message: N, thresholds, fitness, search effort, region map.
pub fn summary_to_proto(seg: &Segmentation, halo: u32, fragments: usize) -> pb::SegmentResponse {
    let map = &seg.region_map;
    let f = &seg.fitness;
    pb::SegmentResponse {
        msg: Some(pb::segment_response::Msg::Summary(pb::Summary {
            regions: u32::from(map.regions),
            thresholds: seg.thresholds.clone(),
            fitness: Some(pb::FitnessTerms {
                regions: f.regions as u32,
                makespan_ns: f.makespan_ns,
                cost: f.cost,
                info_share: f.info_share,
                cor: f.cor,
                npcr: f.npcr,
                total: f.total,
            }),
            generations: seg.generations as u64,
            evaluations: seg.evaluations,
            region_map: Some(pb::RegionMap {
                width: map.grid.width,
                height: map.grid.height,
                block_size: map.grid.block_size,
                cols: map.grid.cols(),
                rows: map.grid.rows(),
                regions: u32::from(map.regions),
                // Region ids are < MAX_REGIONS (16): one byte each.
                assignment: map.assignment.iter().map(|&r| r as u8).collect(),
            }),
            halo,
            fragments: fragments as u32,
        })),
    }
}

fn response(m: pb::segment_response::Msg) -> pb::SegmentResponse {
    pb::SegmentResponse { msg: Some(m) }
}

/// Little-endian words: one byte per sample for 8-bit containers, else two.
pub fn encode_samples(samples: &[u16], bytes_per_sample: usize) -> Vec<u8> {
    if bytes_per_sample == 1 {
        samples.iter().map(|&w| w as u8).collect()
    } else {
        samples.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// One fragment as messages: its header, its block list in chunks, then
/// every tile's header followed by its samples in chunks of at most
/// [`CHUNK_BYTES`]. Lazy: chunks are encoded as the stream is read.
pub fn fragment_messages(f: Fragment) -> impl Iterator<Item = pb::SegmentResponse> + Send {
    use pb::segment_response::Msg;
    let bps = f.spec.format.bytes_per_sample();
    let header = response(Msg::Fragment(pb::FragmentHeader {
        region: u32::from(f.region),
        spec: Some(spec_to_proto(&f.spec)),
        block_size: f.block_size,
        halo: f.halo,
        block_count: f.blocks.len() as u32,
        tile_count: f.tiles.len() as u32,
        sample_count: f.tiles.iter().map(|t| t.samples.len() as u64).sum(),
    }));
    let blocks: Vec<pb::SegmentResponse> = f
        .blocks
        .chunks(BLOCK_CHUNK)
        .map(|c| response(Msg::Blocks(pb::BlockChunk { blocks: c.to_vec() })))
        .collect();
    let per_chunk = CHUNK_BYTES / bps;
    let tiles = f.tiles.into_iter().flat_map(move |t| {
        let head = response(Msg::Tile(pb::TileHeader {
            core: Some(rect_to_proto(&t.core)),
            rect: Some(rect_to_proto(&t.rect)),
        }));
        let samples = t.samples;
        let n = samples.len();
        std::iter::once(head).chain((0..n).step_by(per_chunk).map(move |i| {
            response(Msg::Samples(encode_samples(
                &samples[i..n.min(i + per_chunk)],
                bps,
            )))
        }))
    });
    std::iter::once(header).chain(blocks).chain(tiles)
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn fragment_messages_chunk_and_round_trip() {
        let spec = ImageSpec::new(1200, 600, PixelFormat::gray16(12, false));
        let image = tessera_image::Image::zeroed(spec).unwrap();
        let grid = BlockGrid::new(1200, 600, 600).unwrap();
        let map = RegionMap::new(grid, 1, vec![0, 0]).unwrap();
        let frag = make_fragments(&image, &map, 2).unwrap().remove(0);
        let msgs: Vec<_> = fragment_messages(frag.clone()).collect();
        use pb::segment_response::Msg;
        let mut bytes = 0;
        for m in &msgs {
            if let Some(Msg::Samples(s)) = &m.msg {
                assert!(s.len() <= CHUNK_BYTES);
                bytes += s.len();
            }
        }
        assert_eq!(bytes, 1200 * 600 * 2);
        assert!(msgs.len() > 3);
        assert!(matches!(msgs[0].msg, Some(Msg::Fragment(_))));
    }
}
