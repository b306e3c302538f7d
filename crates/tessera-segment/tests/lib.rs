//! Integration tests: region-wise processing equals whole-image processing
//! bit for bit, fragments hold nothing beyond their blocks and halo, the GA
//! against random and exhaustive search, and bad input.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, ImageSpec, PixelFormat};
use tessera_segment::{
    BlockGrid, GaParams, Operation, Problem, RegionMap, SegmentConfig, SegmentError,
    make_fragments, process_regions, process_whole, segment,
};

const FORMATS: [PixelFormat; 6] = [
    PixelFormat::GRAY8,
    PixelFormat::GRAY16,
    PixelFormat {
        bits_allocated: 16,
        bits_stored: 12,
        signed: true,
        channels: 1,
    },
    PixelFormat {
        bits_allocated: 16,
        bits_stored: 10,
        signed: false,
        channels: 1,
    },
    PixelFormat::RGB8,
    PixelFormat {
        bits_allocated: 16,
        bits_stored: 16,
        signed: false,
        channels: 3,
    },
];

/// An image of `spec`: noise (any word, including bits above `bits_stored`),
/// or the smooth phantom, which gives narrow histograms and flat areas.
fn image(spec: ImageSpec, seed: u64) -> Image {
    if seed & 1 == 0 {
        return phantom(spec, seed);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mask = spec.format.container_mask();
    let s = (0..spec.sample_count())
        .map(|_| rng.random::<u16>() & mask)
        .collect();
    Image::new(spec, s).unwrap()
}

fn phantom(spec: ImageSpec, seed: u64) -> Image {
    head_phantom(spec.width, spec.height, spec.frames, spec.format, seed).unwrap()
}

fn random_map(grid: BlockGrid, regions: u16, seed: u64) -> RegionMap {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let assignment = (0..grid.len())
        .map(|_| rng.random_range(0..regions))
        .collect();
    RegionMap::new(grid, regions, assignment).unwrap()
}

#[derive(Debug, Clone)]
struct Case {
    image: Image,
    map: RegionMap,
}

fn case() -> impl Strategy<Value = Case> {
    (
        0..FORMATS.len(),
        1u32..=2,
        1u32..=20,
        0u32..=60,
        0u32..=60,
        1u16..=7,
        any::<u64>(),
    )
        .prop_map(|(f, frames, bs, ew, eh, regions, seed)| {
            let spec = ImageSpec {
                frames,
                ..ImageSpec::new(bs + ew, bs + eh, FORMATS[f])
            };
            let image = image(spec, seed);
            let grid = BlockGrid::for_image(&image, bs).unwrap();
            Case {
                map: random_map(grid, regions, seed),
                image,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn region_wise_equals_whole_image(c in case()) {
        for op in Operation::ALL {
            let whole = process_whole(&c.image, op).unwrap();
            let parts = process_regions(&c.image, &c.map, op).unwrap();
            prop_assert!(whole == parts, "{} differs for {} {:?}", op, c.image.format(), c.map.grid);
        }
    }

    #[test]
    fn fragments_hold_only_their_blocks_and_halo(c in case(), halo in 0u32..=3) {
        let grid = c.map.grid;
        let frags = make_fragments(&c.image, &c.map, halo).unwrap();
        let mut owned = vec![false; grid.len()];
        for f in &frags {
            f.validate().unwrap();
            prop_assert_eq!(&f.blocks, &c.map.blocks_of(f.region));
            // Allowed pixels: the fragment's blocks grown by the halo.
            let (w, h) = (grid.width as usize, grid.height as usize);
            let mut allowed = vec![false; w * h];
            for &b in &f.blocks {
                owned[b as usize] = true;
                let r = grid.rect(b as usize);
                let y0 = r.y.saturating_sub(halo) as usize;
                let y1 = ((r.bottom() + halo as u64) as usize).min(h);
                let x0 = r.x.saturating_sub(halo) as usize;
                let x1 = ((r.right() + halo as u64) as usize).min(w);
                for y in y0..y1 {
                    for x in x0..x1 {
                        allowed[y * w + x] = true;
                    }
                }
            }
            let mut held = 0usize;
            for (x, y) in f.pixels() {
                prop_assert!(allowed[y as usize * w + x as usize], "({x},{y}) outside blocks+halo");
                held += 1;
            }
            // The samples are the image's own at those coordinates.
            let ch = c.image.channels() as usize;
            for t in &f.tiles {
                let mut i = 0;
                for fr in 0..c.image.frames() {
                    for y in t.rect.y..t.rect.bottom() as u32 {
                        for x in t.rect.x..t.rect.right() as u32 {
                            for k in 0..ch {
                                prop_assert_eq!(t.samples[i], c.image.get(fr, x, y, k as u8));
                                i += 1;
                            }
                        }
                    }
                }
                prop_assert_eq!(i, t.samples.len());
            }
            let sample_count: usize = f.tiles.iter().map(|t| t.samples.len()).sum();
            prop_assert_eq!(sample_count, held * ch * c.image.frames() as usize);
        }
        let sizes = c.map.region_sizes();
        prop_assert_eq!(frags.len(), sizes.iter().filter(|&&s| s > 0).count());
        prop_assert!(owned.iter().all(|&o| o), "every block is in exactly one fragment");
    }
}

#[test]
fn ga_es_regions_process_identically() {
    for (i, fmt) in FORMATS.into_iter().enumerate() {
        let spec = ImageSpec::new(72, 64, fmt);
        let img = image(spec, 2 * i as u64);
        let config = SegmentConfig {
            block_size: 8,
            max_regions: 5,
            ..SegmentConfig::default()
        };
        let seg = segment(&img, &config).unwrap();
        for op in Operation::ALL {
            assert_eq!(
                process_regions(&img, &seg.region_map, op).unwrap(),
                process_whole(&img, op).unwrap(),
                "{op} {fmt}"
            );
        }
    }
}

#[test]
fn ga_is_at_least_as_good_as_random_search_with_the_same_budget() {
    let mut ga_sum = 0.0;
    let mut random_sum = 0.0;
    let mut ga_wins_or_ties = 0;
    let seeds = 24u64;
    for seed in 0..seeds {
        let spec = ImageSpec::new(
            128,
            128,
            if seed % 3 == 0 {
                PixelFormat::RGB8
            } else {
                PixelFormat::GRAY8
            },
        );
        let img = phantom(spec, seed / 4);
        let config = SegmentConfig {
            block_size: 8,
            max_regions: 6,
            ga: GaParams {
                seed,
                ..GaParams::default()
            },
            ..SegmentConfig::default()
        };
        let p = Problem::new(&img, &config).unwrap();
        let ga = p.ga(&config.ga).unwrap();
        let random = p.random_search(ga.evaluations, seed + 1000);
        assert_eq!(random.evaluations, ga.evaluations);
        ga_sum += ga.fitness.total;
        random_sum += random.fitness.total;
        if ga.fitness.total <= random.fitness.total {
            ga_wins_or_ties += 1;
        }
    }
    assert!(
        ga_sum <= random_sum,
        "mean GA {} vs random {}",
        ga_sum / seeds as f64,
        random_sum / seeds as f64
    );
    assert_eq!(
        ga_wins_or_ties, seeds,
        "GA lost to random search on some seed"
    );
}

#[test]
fn ga_equals_exhaustive_search_on_small_cases() {
    let mut checked = 0;
    for seed in 0..16u64 {
        let fmt = FORMATS[seed as usize % FORMATS.len()];
        let img = image(ImageSpec::new(40, 32, fmt), seed);
        for nodes in [2, 3, 4] {
            let config = SegmentConfig {
                block_size: 8, // 20 blocks
                max_regions: nodes,
                ga: GaParams {
                    seed,
                    ..GaParams::default()
                },
                ..SegmentConfig::default()
            };
            let p = Problem::new(&img, &config).unwrap();
            let exact = p.exhaustive(100_000).unwrap();
            let ga = p.ga(&config.ga).unwrap();
            assert_eq!(
                ga.fitness.total, exact.fitness.total,
                "seed {seed} nodes {nodes}: GA {:?} vs exhaustive {:?}",
                ga.cuts, exact.cuts
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 48);
}

#[test]
fn fixed_region_count_is_honoured() {
    let img = phantom(ImageSpec::new(64, 64, PixelFormat::GRAY16), 3);
    for n in 1..=5 {
        let config = SegmentConfig {
            block_size: 8,
            min_regions: n,
            max_regions: n,
            ..SegmentConfig::default()
        };
        let seg = segment(&img, &config).unwrap();
        assert_eq!(seg.fitness.regions, n);
        assert_eq!(seg.region_map.regions as usize, n);
        assert!(seg.region_map.region_sizes().iter().all(|&s| s > 0));
        assert!(seg.thresholds.windows(2).all(|t| t[0] < t[1]));
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let img = image(ImageSpec::new(32, 24, PixelFormat::GRAY8), 1);
    let with = |block_size, min_regions, max_regions| SegmentConfig {
        block_size,
        min_regions,
        max_regions,
        ..SegmentConfig::default()
    };
    assert_eq!(
        segment(&img, &with(0, 1, 4)).unwrap_err(),
        SegmentError::ZeroBlockSize
    );
    assert!(matches!(
        segment(&img, &with(25, 1, 4)),
        Err(SegmentError::BlockTooLarge { .. })
    ));
    // 4 x 3 blocks of 8.
    assert_eq!(
        segment(&img, &with(8, 13, 13)).unwrap_err(),
        SegmentError::TooManyRegions {
            requested: 13,
            blocks: 12
        }
    );
    assert_eq!(
        segment(&img, &with(8, 0, 0)).unwrap_err(),
        SegmentError::ZeroRegions
    );
    assert!(matches!(
        segment(&img, &with(8, 3, 2)),
        Err(SegmentError::Parameter(_))
    ));
    // A flat image has one entropy level: more than one region is impossible.
    let flat = Image::new(ImageSpec::new(32, 32, PixelFormat::GRAY8), vec![9; 1024]).unwrap();
    assert_eq!(
        segment(&flat, &with(8, 2, 2)).unwrap_err(),
        SegmentError::NotEnoughEntropyLevels {
            requested: 2,
            levels: 1
        }
    );
    // Auto mode with more nodes than levels just uses fewer regions.
    assert_eq!(segment(&flat, &with(8, 1, 8)).unwrap().fitness.regions, 1);
    assert!(matches!(
        "rotate".parse::<Operation>(),
        Err(SegmentError::UnknownOperation(_))
    ));
    assert!(matches!(
        BlockGrid::new(0, 0, 16),
        Err(SegmentError::EmptyImage { .. })
    ));
    // An empty image cannot even be built; the error converts.
    let empty = Image::new(ImageSpec::new(0, 0, PixelFormat::GRAY8), vec![]).unwrap_err();
    assert!(matches!(SegmentError::from(empty), SegmentError::Image(_)));
    // A region map for another image size.
    let other = RegionMap::single(BlockGrid::new(16, 16, 8).unwrap());
    assert!(matches!(
        process_regions(&img, &other, Operation::Median),
        Err(SegmentError::Parameter(_))
    ));
    let bad_params = GaParams {
        population: 1,
        ..GaParams::default()
    };
    let p = Problem::new(&img, &with(8, 1, 4)).unwrap();
    assert!(matches!(p.ga(&bad_params), Err(SegmentError::Parameter(_))));
}
