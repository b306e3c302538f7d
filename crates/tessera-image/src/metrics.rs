//! Image statistics used to evaluate encryption and segmentation:
//! NPCR and UACI (paper 003, formula 11), adjacent-pixel correlation
//! (formula 12) and Shannon entropy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Direction of the neighbour in [`adjacent_correlation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Horizontal,
    Vertical,
    Diagonal,
}

impl Direction {
    pub const ALL: [Direction; 3] = [
        Direction::Horizontal,
        Direction::Vertical,
        Direction::Diagonal,
    ];
}

/// NPCR and UACI in percent between two equally sized sample arrays whose
/// values lie in `0..=max_value` (255 for 8-bit shares).
///
/// Returns `None` when the lengths differ or the arrays are empty.
pub fn npcr_uaci(a: &[u16], b: &[u16], max_value: u16) -> Option<(f64, f64)> {
    if a.len() != b.len() || a.is_empty() || max_value == 0 {
        return None;
    }
    let mut changed = 0u64;
    let mut diff_sum = 0u64;
    for (&x, &y) in a.iter().zip(b) {
        changed += u64::from(x != y);
        diff_sum += (x as i64 - y as i64).unsigned_abs();
    }
    let n = a.len() as f64;
    Some((
        100.0 * changed as f64 / n,
        100.0 * diff_sum as f64 / (n * max_value as f64),
    ))
}

/// Correlation coefficient r_xy (formula 12) of `pairs` randomly chosen
/// pairs of adjacent samples in a single-channel `width` x `height` grid.
/// Deterministic for a given `seed`. `None` when the grid is too small or a
/// variance is zero.
pub fn adjacent_correlation(
    samples: &[u16],
    width: usize,
    height: usize,
    direction: Direction,
    pairs: usize,
    seed: u64,
) -> Option<f64> {
    if width < 2 || height < 2 || samples.len() < width * height || pairs == 0 {
        return None;
    }
    let (dx, dy) = match direction {
        Direction::Horizontal => (1, 0),
        Direction::Vertical => (0, 1),
        Direction::Diagonal => (1, 1),
    };
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(pairs);
    let mut ys = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let x = rng.random_range(0..width - dx);
        let y = rng.random_range(0..height - dy);
        xs.push(samples[y * width + x] as f64);
        ys.push(samples[(y + dy) * width + x + dx] as f64);
    }
    pearson(&xs, &ys)
}

fn pearson(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    let ex = xs.iter().sum::<f64>() / n;
    let ey = ys.iter().sum::<f64>() / n;
    let (mut dx, mut dy, mut cov) = (0.0, 0.0, 0.0);
    for (x, y) in xs.iter().zip(ys) {
        dx += (x - ex) * (x - ex);
        dy += (y - ey) * (y - ey);
        cov += (x - ex) * (y - ey);
    }
    if dx == 0.0 || dy == 0.0 {
        return None;
    }
    Some(cov / (dx.sqrt() * dy.sqrt()))
}

/// Shannon entropy in bits of a histogram.
pub fn entropy_of_histogram(hist: &[u64]) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let t = total as f64;
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / t;
            -p * p.log2()
        })
        .sum()
}

/// Shannon entropy in bits of samples, each reduced to `bins_log2` bits by
/// keeping the high bits of a `value_bits`-bit value (so a 16-bit image is
/// measured over 256 bins with `bins_log2 = 8`).
pub fn entropy(samples: &[u16], value_bits: u8, bins_log2: u8) -> f64 {
    let bins_log2 = bins_log2.min(value_bits).min(16);
    let shift = value_bits - bins_log2;
    let mut hist = vec![0u64; 1 << bins_log2];
    let mask = (1u32 << bins_log2) - 1;
    for &s in samples {
        hist[((s as u32 >> shift) & mask) as usize] += 1;
    }
    entropy_of_histogram(&hist)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npcr_uaci_of_known_arrays() {
        assert_eq!(npcr_uaci(&[0, 0], &[255, 0], 255), Some((50.0, 50.0)));
        assert_eq!(npcr_uaci(&[1, 2], &[1, 2], 255), Some((0.0, 0.0)));
        assert_eq!(npcr_uaci(&[1], &[1, 2], 255), None);
    }

    #[test]
    fn correlation_of_smooth_and_random_images() {
        let (w, h) = (128, 128);
        let smooth: Vec<u16> = (0..w * h).map(|i| ((i % w) + (i / w)) as u16).collect();
        let r = adjacent_correlation(&smooth, w, h, Direction::Horizontal, 4096, 1).unwrap();
        assert!(r > 0.99, "{r}");
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let noise: Vec<u16> = (0..w * h).map(|_| rng.random_range(0..256)).collect();
        for d in Direction::ALL {
            let r = adjacent_correlation(&noise, w, h, d, 16384, 2).unwrap();
            assert!(r.abs() < 0.05, "{d:?} {r}");
        }
        assert_eq!(
            adjacent_correlation(&[1; 4], 2, 2, Direction::Vertical, 10, 1),
            None
        );
    }

    #[test]
    fn entropy_bounds() {
        let uniform: Vec<u16> = (0..256).collect();
        assert!((entropy(&uniform, 8, 8) - 8.0).abs() < 1e-12);
        assert_eq!(entropy(&[7; 100], 8, 8), 0.0);
        let wide: Vec<u16> = (0..65535).step_by(256).collect();
        assert!((entropy(&wide, 16, 8) - 8.0).abs() < 1e-12);
    }
}
