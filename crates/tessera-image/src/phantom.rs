//! Realistic synthetic test images: the modified Shepp-Logan head phantom
//! with texture and acquisition noise, deterministic for a seed. Used by
//! tests, benchmarks and the demo so no patient data is ever needed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::{Image, ImageError, ImageSpec, PixelFormat};

/// (intensity, semi-axis a, semi-axis b, centre x, centre y, angle in degrees)
const ELLIPSES: [(f64, f64, f64, f64, f64, f64); 10] = [
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0.0),
];

/// Phantom density in [0, 1] at normalised coordinates (x, y in [-1, 1]).
fn density(x: f64, y: f64) -> f64 {
    let mut v = 0.0;
    for &(a, sa, sb, cx, cy, deg) in &ELLIPSES {
        let (s, c) = deg.to_radians().sin_cos();
        let (dx, dy) = (x - cx, y - cy);
        let u = dx * c + dy * s;
        let w = -dx * s + dy * c;
        if (u * u) / (sa * sa) + (w * w) / (sb * sb) <= 1.0 {
            v += a;
        }
    }
    v
}

/// A head phantom of `width` x `height` x `frames` in `format`: the values
/// span the format's stored range (10 % - 90 % for tissue), with a smooth
/// texture inside the head and noise of about 1.5 % of the range. Frames
/// shift slightly, like adjacent slices; RGB channels get different gains.
pub fn head_phantom(
    width: u32,
    height: u32,
    frames: u32,
    format: PixelFormat,
    seed: u64,
) -> Result<Image, ImageError> {
    let spec = ImageSpec {
        width,
        height,
        frames,
        format,
    };
    spec.validate()?;
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (lo, hi) = format.value_range();
    let span = (hi - lo) as f64;
    let c = format.channels as usize;
    let mut samples = Vec::with_capacity(spec.sample_count());
    for f in 0..frames {
        let shift = f as f64 * 0.01;
        for py in 0..height {
            for px in 0..width {
                let x = 2.0 * (px as f64 + 0.5) / width as f64 - 1.0;
                let y = 2.0 * (py as f64 + 0.5) / height as f64 - 1.0 + shift;
                let d = density(x, y);
                let texture = if d > 0.0 {
                    0.03 * ((x * 23.0).sin() * (y * 17.0).cos())
                } else {
                    0.0
                };
                for ch in 0..c {
                    let gain = 1.0 - 0.15 * ch as f64;
                    let noise: f64 = (rng.random::<f64>() + rng.random::<f64>() - 1.0) * 0.03;
                    let level = 0.05 + 0.85 * (d * gain + texture).clamp(0.0, 1.0) + noise;
                    let value = lo as f64 + level.clamp(0.0, 1.0) * span;
                    samples.push(format.word(value.round() as i32));
                }
            }
        }
    }
    Image::new(spec, samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phantom_is_deterministic_and_structured() {
        let a = head_phantom(256, 256, 1, PixelFormat::GRAY8, 1).unwrap();
        let b = head_phantom(256, 256, 1, PixelFormat::GRAY8, 1).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, head_phantom(256, 256, 1, PixelFormat::GRAY8, 2).unwrap());
        let centre = a.get(0, 128, 128, 0);
        let corner = a.get(0, 0, 0, 0);
        assert!(centre > corner, "tissue brighter than air");
        let r = crate::metrics::adjacent_correlation(
            a.samples(),
            256,
            256,
            crate::metrics::Direction::Horizontal,
            2000,
            3,
        )
        .unwrap();
        assert!(r > 0.8, "a natural image has correlated neighbours: {r}");
        let s = head_phantom(16, 16, 2, PixelFormat::gray16(12, true), 4).unwrap();
        let f = s.format();
        assert!(s.samples().iter().all(|&w| f.word(f.value(w)) == w));
    }
}
