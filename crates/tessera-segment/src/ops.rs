//! The operations a region can be processed with. Every local operation is
//! integer-exact and reads its neighbours at coordinates clamped to the
//! *image* (replicate border), so an output pixel depends only on the input
//! within `halo` pixels of it: computing it from a fragment that holds that
//! neighbourhood gives the same bits as computing it from the whole image.
//!
//! Values are [`PixelFormat::value`] (sign-extended) in `i32`/`i64`; results
//! go back through [`PixelFormat::word`], which clamps to the format's range.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tessera_image::{ImageSpec, Rect};

use crate::SegmentError;

/// An image operation. Local operations need a halo of neighbours; histogram
/// equalization is global and runs as a three-step protocol (fragments report
/// histograms, the merger returns one mapping, fragments apply it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// 5x5 binomial Gaussian (outer product of 1 4 6 4 1), sum / 256 rounded
    /// half up: the paper's noise-removal filter.
    Gaussian,
    /// 3x3 median.
    Median,
    /// Unsharp mask, amount 1: `v + round((256 v - G(v)) / 256)` with the
    /// unnormalized 5x5 binomial sum `G`.
    Unsharp,
    /// Sobel gradient magnitude `floor(sqrt(gx^2 + gy^2))`, clamped.
    Sobel,
    /// Global histogram equalization, one mapping per frame and channel.
    HistEq,
}

impl Operation {
    pub const ALL: [Operation; 5] = [
        Operation::Gaussian,
        Operation::Median,
        Operation::Unsharp,
        Operation::Sobel,
        Operation::HistEq,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Operation::Gaussian => "gaussian",
            Operation::Median => "median",
            Operation::Unsharp => "unsharp",
            Operation::Sobel => "sobel",
            Operation::HistEq => "histeq",
        }
    }

    /// Neighbours needed on each side of an output pixel.
    pub fn halo(&self) -> u32 {
        match self {
            Operation::Gaussian | Operation::Unsharp => 2,
            Operation::Median | Operation::Sobel => 1,
            Operation::HistEq => 0,
        }
    }

    /// Whether the operation needs image-wide information (histogram).
    pub fn is_global(&self) -> bool {
        matches!(self, Operation::HistEq)
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Operation {
    type Err = SegmentError;

    fn from_str(s: &str) -> Result<Operation, SegmentError> {
        match s.to_ascii_lowercase().as_str() {
            "gaussian" | "gauss" | "blur" => Ok(Operation::Gaussian),
            "median" => Ok(Operation::Median),
            "unsharp" | "unsharp-mask" | "sharpen" => Ok(Operation::Unsharp),
            "sobel" | "edges" => Ok(Operation::Sobel),
            "histeq" | "hist-eq" | "equalize" => Ok(Operation::HistEq),
            _ => Err(SegmentError::UnknownOperation(s.to_owned())),
        }
    }
}

/// Runs local operation `op` for the output rectangle `core`, reading input
/// from `src`, which holds the samples of rectangle `src_rect` (frames x rows x
/// columns x channels). `src_rect` must contain `core` grown by the halo and
/// clipped to the image; the caller checks this. Returns the samples of `core`
/// in the same layout.
pub(crate) fn run_local(
    op: Operation,
    spec: &ImageSpec,
    core: Rect,
    src_rect: Rect,
    src: &[u16],
) -> Vec<u16> {
    let fmt = spec.format;
    let r = op.halo() as i64;
    let ch = fmt.channels as usize;
    let (cw, chh) = (core.width as usize, core.height as usize);
    let pw = cw + 2 * r as usize;
    let ph = chh + 2 * r as usize;
    // Clamp at the image border, then translate into the source rectangle.
    let xs: Vec<usize> = (0..pw as i64)
        .map(|i| {
            let x = (core.x as i64 + i - r).clamp(0, spec.width as i64 - 1);
            (x - src_rect.x as i64) as usize
        })
        .collect();
    let ys: Vec<usize> = (0..ph as i64)
        .map(|j| {
            let y = (core.y as i64 + j - r).clamp(0, spec.height as i64 - 1);
            (y - src_rect.y as i64) as usize
        })
        .collect();
    let src_row = src_rect.width as usize * ch;
    let src_frame = src_row * src_rect.height as usize;
    let mut plane = vec![0i32; pw * ph];
    let mut result = vec![0i32; cw * chh];
    let mut scratch = vec![0i32; cw * ph];
    let mut out = vec![0u16; spec.frames as usize * cw * chh * ch];
    for f in 0..spec.frames as usize {
        for c in 0..ch {
            for (j, &y) in ys.iter().enumerate() {
                let row = &src[f * src_frame + y * src_row..][..src_row];
                let dst = &mut plane[j * pw..(j + 1) * pw];
                for (d, &x) in dst.iter_mut().zip(&xs) {
                    *d = fmt.value(row[x * ch + c]);
                }
            }
            kernel(op, &plane, pw, cw, chh, &mut scratch, &mut result);
            let base = f * cw * chh * ch;
            for (i, &v) in result.iter().enumerate() {
                out[base + i * ch + c] = fmt.word(v);
            }
        }
    }
    out
}

/// Applies `op` to a padded plane (`pw` wide, `h + 2 halo` tall) producing
/// the `w` x `h` interior.
fn kernel(
    op: Operation,
    p: &[i32],
    pw: usize,
    w: usize,
    h: usize,
    scratch: &mut [i32],
    out: &mut [i32],
) {
    match op {
        Operation::Gaussian | Operation::Unsharp => {
            binomial5(p, pw, w, h, scratch, out);
            if op == Operation::Unsharp {
                for y in 0..h {
                    for x in 0..w {
                        let v = p[(y + 2) * pw + x + 2];
                        let s = out[y * w + x];
                        out[y * w + x] = v + ((256 * v - s + 128) >> 8);
                    }
                }
            } else {
                out.iter_mut().for_each(|s| *s = (*s + 128) >> 8);
            }
        }
        Operation::Median => {
            for y in 0..h {
                let (r0, r1, r2) = (&p[y * pw..], &p[(y + 1) * pw..], &p[(y + 2) * pw..]);
                for x in 0..w {
                    out[y * w + x] = median9([
                        r0[x],
                        r0[x + 1],
                        r0[x + 2],
                        r1[x],
                        r1[x + 1],
                        r1[x + 2],
                        r2[x],
                        r2[x + 1],
                        r2[x + 2],
                    ]);
                }
            }
        }
        Operation::Sobel => {
            for y in 0..h {
                let (r0, r1, r2) = (&p[y * pw..], &p[(y + 1) * pw..], &p[(y + 2) * pw..]);
                for x in 0..w {
                    let gx = (r0[x + 2] + 2 * r1[x + 2] + r2[x + 2]) as i64
                        - (r0[x] + 2 * r1[x] + r2[x]) as i64;
                    let gy = (r2[x] + 2 * r2[x + 1] + r2[x + 2]) as i64
                        - (r0[x] + 2 * r0[x + 1] + r0[x + 2]) as i64;
                    let m = ((gx * gx + gy * gy) as u64).isqrt();
                    out[y * w + x] = m.min(i32::MAX as u64) as i32;
                }
            }
        }
        // Global: never reaches a kernel (callers route it to the mapping
        // protocol); identity keeps this total.
        Operation::HistEq => {
            for y in 0..h {
                out[y * w..(y + 1) * w].copy_from_slice(&p[y * pw..y * pw + w]);
            }
        }
    }
}

/// Unnormalized separable 1-4-6-4-1 sum (weights total 256); exact in i32 for
/// 16-bit values (|sum| <= 256 * 65535).
fn binomial5(p: &[i32], pw: usize, w: usize, h: usize, tmp: &mut [i32], out: &mut [i32]) {
    let ph = h + 4;
    for y in 0..ph {
        let row = &p[y * pw..(y + 1) * pw];
        let t = &mut tmp[y * w..(y + 1) * w];
        for x in 0..w {
            t[x] = row[x] + 4 * row[x + 1] + 6 * row[x + 2] + 4 * row[x + 3] + row[x + 4];
        }
    }
    for y in 0..h {
        for x in 0..w {
            let c = |k: usize| tmp[(y + k) * w + x];
            out[y * w + x] = c(0) + 4 * c(1) + 6 * c(2) + 4 * c(3) + c(4);
        }
    }
}

/// Median of nine by a 19-exchange network (Paeth / Devillard).
fn median9(mut p: [i32; 9]) -> i32 {
    let mut s = |a: usize, b: usize| {
        if p[a] > p[b] {
            p.swap(a, b);
        }
    };
    s(1, 2);
    s(4, 5);
    s(7, 8);
    s(0, 1);
    s(3, 4);
    s(6, 7);
    s(1, 2);
    s(4, 5);
    s(7, 8);
    s(0, 3);
    s(5, 8);
    s(4, 7);
    s(3, 6);
    s(1, 4);
    s(2, 5);
    s(4, 7);
    s(4, 2);
    s(6, 4);
    s(4, 2);
    p[4]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tessera_image::{Image, PixelFormat};

    /// The textbook per-pixel definitions with clamped coordinates, to check
    /// the padded-plane kernels against.
    fn naive(op: Operation, img: &Image) -> Image {
        let spec = *img.spec();
        let fmt = spec.format;
        let (w, h) = (spec.width as i64, spec.height as i64);
        let mut out = img.clone();
        let k = [1i64, 4, 6, 4, 1];
        for f in 0..spec.frames {
            for c in 0..fmt.channels {
                let at = |x: i64, y: i64| {
                    fmt.value(img.get(f, x.clamp(0, w - 1) as u32, y.clamp(0, h - 1) as u32, c))
                        as i64
                };
                for y in 0..h {
                    for x in 0..w {
                        let g = || {
                            let mut s = 0;
                            for j in 0..5 {
                                for i in 0..5 {
                                    s += k[i] * k[j] * at(x + i as i64 - 2, y + j as i64 - 2);
                                }
                            }
                            s
                        };
                        let v = match op {
                            Operation::Gaussian => (g() + 128).div_euclid(256),
                            Operation::Unsharp => {
                                let v = at(x, y);
                                v + (256 * v - g() + 128).div_euclid(256)
                            }
                            Operation::Median => {
                                let mut n: Vec<i64> =
                                    (0..9).map(|i| at(x + i % 3 - 1, y + i / 3 - 1)).collect();
                                n.sort();
                                n[4]
                            }
                            Operation::Sobel => {
                                let gx = at(x + 1, y - 1) + 2 * at(x + 1, y) + at(x + 1, y + 1)
                                    - at(x - 1, y - 1)
                                    - 2 * at(x - 1, y)
                                    - at(x - 1, y + 1);
                                let gy = at(x - 1, y + 1) + 2 * at(x, y + 1) + at(x + 1, y + 1)
                                    - at(x - 1, y - 1)
                                    - 2 * at(x, y - 1)
                                    - at(x + 1, y - 1);
                                ((gx * gx + gy * gy) as f64).sqrt().floor() as i64
                            }
                            Operation::HistEq => at(x, y),
                        };
                        out.set(f, x as u32, y as u32, c, fmt.word(v as i32));
                    }
                }
            }
        }
        out
    }

    fn random_image(spec: ImageSpec, seed: u64) -> Image {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mask = spec.format.container_mask();
        let s = (0..spec.sample_count())
            .map(|_| rng.random::<u16>() & mask)
            .collect();
        Image::new(spec, s).unwrap()
    }

    #[test]
    fn kernels_match_the_textbook_definitions() {
        let formats = [
            PixelFormat::GRAY8,
            PixelFormat::RGB8,
            PixelFormat::GRAY16,
            PixelFormat::gray16(12, true),
        ];
        for (i, fmt) in formats.into_iter().enumerate() {
            let spec = ImageSpec {
                frames: 2,
                ..ImageSpec::new(13, 7, fmt)
            };
            let img = random_image(spec, i as u64);
            for op in [
                Operation::Gaussian,
                Operation::Median,
                Operation::Unsharp,
                Operation::Sobel,
            ] {
                let full = spec.full_rect();
                let got = run_local(op, &spec, full, full, img.samples());
                assert_eq!(got, naive(op, &img).into_samples(), "{op} {fmt}");
            }
        }
    }

    #[test]
    fn median_network_is_a_median() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..2000 {
            let a: [i32; 9] = std::array::from_fn(|_| rng.random_range(-5..5));
            let mut s = a;
            s.sort();
            assert_eq!(median9(a), s[4], "{a:?}");
        }
    }

    #[test]
    fn operation_names_parse_and_unknown_is_an_error() {
        for op in Operation::ALL {
            assert_eq!(op.name().parse::<Operation>(), Ok(op));
        }
        assert_eq!(
            "blurry".parse::<Operation>(),
            Err(SegmentError::UnknownOperation("blurry".into()))
        );
    }
}
