//! Value histograms and equalization mappings: what histogram equalization
//! over fragments exchanges. Each node counts its fragment's core pixels
//! ([`crate::Fragment::histogram`]); the merger adds the counts
//! ([`merge_histograms`]) and derives one mapping ([`equalization_mapping`])
//! that every node applies to its own pixels, so the result equals
//! equalizing the whole image.

use serde::{Deserialize, Serialize};
use tessera_image::PixelFormat;

use crate::{Result, SegmentError};

/// Value histograms, one plane per (frame, channel), each `2^bits_stored`
/// bins indexed by `value - min_value`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub format: PixelFormat,
    pub frames: u32,
    pub planes: Vec<Vec<u64>>,
}

/// Output word for every value, one plane per (frame, channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub format: PixelFormat,
    pub frames: u32,
    pub planes: Vec<Vec<u16>>,
}

impl Histogram {
    pub fn empty(format: PixelFormat, frames: u32) -> Histogram {
        let planes = frames as usize * format.channels as usize;
        Histogram {
            format,
            frames,
            planes: vec![vec![0; 1usize << format.bits_stored]; planes],
        }
    }

    /// The shape must match `format` and `frames` exactly.
    pub fn validate_for(&self, format: PixelFormat, frames: u32) -> Result<()> {
        shape_check(
            self.format,
            self.frames,
            self.planes.iter().map(Vec::len),
            format,
            frames,
        )
    }
}

impl Mapping {
    pub fn validate_for(&self, format: PixelFormat, frames: u32) -> Result<()> {
        shape_check(
            self.format,
            self.frames,
            self.planes.iter().map(Vec::len),
            format,
            frames,
        )?;
        let mask = format.container_mask();
        if self.planes.iter().flatten().any(|&w| w & !mask != 0) {
            return Err(SegmentError::Histogram(
                "mapping word wider than its container".into(),
            ));
        }
        Ok(())
    }
}

fn shape_check(
    got_format: PixelFormat,
    got_frames: u32,
    mut lens: impl ExactSizeIterator<Item = usize>,
    format: PixelFormat,
    frames: u32,
) -> Result<()> {
    format.validate()?;
    if got_format != format || got_frames != frames {
        return Err(SegmentError::Histogram(format!(
            "made for {got_format} x{got_frames}, needed for {format} x{frames}"
        )));
    }
    let planes = frames as usize * format.channels as usize;
    if lens.len() != planes {
        return Err(SegmentError::Histogram(format!(
            "{} planes, expected {planes}",
            lens.len()
        )));
    }
    let bins = 1usize << format.bits_stored;
    if lens.any(|l| l != bins) {
        return Err(SegmentError::Histogram(format!(
            "a plane does not have {bins} bins"
        )));
    }
    Ok(())
}

/// Counts interleaved samples (one plane per channel) into `planes`.
pub(crate) fn count_row(fmt: PixelFormat, planes: &mut [Vec<u64>], row: &[u16]) {
    let (lo, _) = fmt.value_range();
    if let [plane] = planes {
        for &w in row {
            plane[(fmt.value(w) - lo) as usize] += 1;
        }
        return;
    }
    for px in row.chunks_exact(planes.len()) {
        for (plane, &w) in planes.iter_mut().zip(px) {
            plane[(fmt.value(w) - lo) as usize] += 1;
        }
    }
}

/// Maps interleaved samples through one mapping plane per channel.
pub(crate) fn map_row(fmt: PixelFormat, planes: &[Vec<u16>], src: &[u16], dst: &mut [u16]) {
    let (lo, _) = fmt.value_range();
    if let [plane] = planes {
        for (o, &w) in dst.iter_mut().zip(src) {
            *o = plane[(fmt.value(w) - lo) as usize];
        }
        return;
    }
    let ch = planes.len();
    for (o, px) in dst.chunks_exact_mut(ch).zip(src.chunks_exact(ch)) {
        for ((o, &w), plane) in o.iter_mut().zip(px).zip(planes) {
            *o = plane[(fmt.value(w) - lo) as usize];
        }
    }
}

/// Adds the fragments' histograms (the merger's first step).
pub fn merge_histograms(
    format: PixelFormat,
    frames: u32,
    parts: &[Histogram],
) -> Result<Histogram> {
    format.validate()?;
    let mut total = Histogram::empty(format, frames);
    for part in parts {
        part.validate_for(format, frames)?;
        for (t, p) in total.planes.iter_mut().zip(&part.planes) {
            for (a, &b) in t.iter_mut().zip(p) {
                *a = a
                    .checked_add(b)
                    .ok_or_else(|| SegmentError::Histogram("histogram count overflows".into()))?;
            }
        }
    }
    Ok(total)
}

/// Classic CDF equalization per plane:
/// `out = min + round((cdf(v) - cdf_min) (max - min) / (total - cdf_min))`,
/// identity for a constant plane.
pub fn equalization_mapping(hist: &Histogram) -> Result<Mapping> {
    hist.validate_for(hist.format, hist.frames)?;
    let format = hist.format;
    let (lo, hi) = format.value_range();
    let span = (hi - lo) as u128;
    let planes = hist
        .planes
        .iter()
        .map(|plane| {
            let total: u128 = plane.iter().map(|&c| c as u128).sum();
            let cdf_min = plane.iter().find(|&&c| c > 0).copied().unwrap_or(0) as u128;
            let den = total - cdf_min;
            let mut cdf = 0u128;
            plane
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    cdf += c as u128;
                    let v = if den == 0 {
                        lo + i as i32
                    } else {
                        let num = cdf.saturating_sub(cdf_min) * span + den / 2;
                        lo + (num / den) as i32
                    };
                    format.word(v)
                })
                .collect()
        })
        .collect();
    Ok(Mapping {
        format,
        frames: hist.frames,
        planes,
    })
}
