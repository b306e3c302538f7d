//! Unit tests of [`super`] (ga.rs).

use super::*;
use tessera_image::{ImageSpec, PixelFormat};

fn problem(levels: usize, nodes: usize) -> Problem {
    // One block per entropy level with growing counts of samples.
    let grid = BlockGrid::new(levels as u32 * 4, 4, 4).unwrap();
    let stats: Vec<BlockStats> = (0..levels)
        .map(|i| BlockStats {
            entropy: i as f64 * 0.5,
            samples: 16,
            sum: 16 * (i as i64 + 1) * 7,
            sum_sq: 16 * ((i as u64 + 1) * 7).pow(2),
            nonzero: 16,
        })
        .collect();
    let config = SegmentConfig {
        block_size: 4,
        max_regions: nodes,
        ..SegmentConfig::default()
    };
    Problem::from_stats(grid, &stats, &config).unwrap()
}

#[test]
fn exhaustive_enumerates_the_whole_space() {
    let p = problem(7, 3); // K = 6: 1 + 6 + 15 chromosomes
    assert_eq!(p.search_space(), 22);
    let r = p.exhaustive(1000).unwrap();
    assert_eq!(r.evaluations, 22);
    assert!(p.exhaustive(10).is_err());
}

#[test]
fn more_regions_leak_less_and_single_region_leaks_all() {
    let p = problem(8, 8);
    let one = p.evaluate(&[]).unwrap();
    assert_eq!(one.info_share, 1.0);
    assert!((one.cor - 1.0).abs() < 1e-9);
    assert_eq!(one.npcr, 0.0);
    let four = p.evaluate(&[1, 3, 5]).unwrap();
    assert!(four.info_share < 0.5 && four.cor < 1.0 && four.npcr > 50.0);
    assert!(p.evaluate(&[3, 1]).is_err());
    assert!(p.evaluate(&[7]).is_err());
}

#[test]
fn region_map_follows_thresholds() {
    let p = problem(5, 3);
    let cuts = [1, 2];
    let t = p.thresholds(&cuts);
    assert_eq!(t, vec![0.75, 1.25]);
    let map = p.region_map(&cuts);
    assert_eq!(map.assignment, vec![0, 0, 1, 2, 2]);
}

#[test]
fn ga_is_deterministic_and_respects_bounds() {
    let spec = ImageSpec::new(96, 96, PixelFormat::GRAY8);
    let img =
        tessera_image::phantom::head_phantom(spec.width, spec.height, 1, spec.format, 5).unwrap();
    let config = SegmentConfig {
        max_regions: 5,
        ..SegmentConfig::default()
    };
    let a = segment(&img, &config).unwrap();
    let b = segment(&img, &config).unwrap();
    assert_eq!(a, b);
    assert!((1..=5).contains(&a.fitness.regions));
    assert_eq!(a.thresholds.len() + 1, a.fitness.regions);
    assert!(a.region_map.region_sizes().iter().all(|&s| s > 0));
}
