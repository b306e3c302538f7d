//! The pixel model shared by every Tessera algorithm.
//!
//! An [`Image`] is a stack of `frames`, each `height` rows of `width` pixels,
//! each pixel `channels` samples (1 = grayscale, 3 = RGB). Every sample is kept
//! as the raw stored word in a `u16`, whatever `bits_allocated` is, so that
//! algorithms can be lossless on the words themselves: bits above
//! `bits_stored` and the two's-complement pattern of signed samples are carried
//! untouched. Interpretation (sign extension, windowing) is opt-in through
//! [`PixelFormat::value`].
//!
//! No I/O here beyond encoding and decoding byte buffers ([`codec`]).
#![forbid(unsafe_code)]

pub mod codec;
pub mod metrics;
pub mod phantom;

use serde::{Deserialize, Serialize};

/// Largest number of samples (frames x rows x columns x channels) any image
/// may hold: 256 Mi samples = 512 MiB of `u16`. Every constructor checks it,
/// so a lying header can never drive an unbounded allocation.
pub const MAX_SAMPLES: u64 = 1 << 28;

/// Largest width or height accepted.
pub const MAX_DIMENSION: u32 = 65_536;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("invalid pixel format: {0}")]
    Format(String),
    #[error("invalid dimensions {width}x{height}x{frames}: {reason}")]
    Dimensions {
        width: u32,
        height: u32,
        frames: u32,
        reason: &'static str,
    },
    #[error("sample buffer holds {actual} samples, the image needs {expected}")]
    Length { expected: u64, actual: u64 },
    #[error("sample value {value} at index {index} does not fit in {bits} allocated bits")]
    SampleTooWide { value: u16, index: usize, bits: u8 },
    #[error("rectangle {rect} lies outside the {width}x{height} image")]
    RectOutside { rect: Rect, width: u32, height: u32 },
    #[error("codec: {0}")]
    Codec(String),
}

/// How each sample is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PixelFormat {
    /// 8 or 16: the container width of one sample.
    pub bits_allocated: u8,
    /// 1..=bits_allocated: how many low bits carry the value.
    pub bits_stored: u8,
    /// Two's complement within `bits_stored` bits.
    pub signed: bool,
    /// 1 (grayscale) or 3 (RGB, interleaved).
    pub channels: u8,
}

impl PixelFormat {
    pub const GRAY8: PixelFormat = PixelFormat {
        bits_allocated: 8,
        bits_stored: 8,
        signed: false,
        channels: 1,
    };
    pub const GRAY16: PixelFormat = PixelFormat {
        bits_allocated: 16,
        bits_stored: 16,
        signed: false,
        channels: 1,
    };
    pub const RGB8: PixelFormat = PixelFormat {
        bits_allocated: 8,
        bits_stored: 8,
        signed: false,
        channels: 3,
    };

    /// A 16-bit container with `bits_stored` significant bits (e.g. 12-bit CT).
    pub fn gray16(bits_stored: u8, signed: bool) -> PixelFormat {
        PixelFormat {
            bits_allocated: 16,
            bits_stored,
            signed,
            channels: 1,
        }
    }

    pub fn validate(&self) -> Result<(), ImageError> {
        if self.bits_allocated != 8 && self.bits_allocated != 16 {
            return Err(ImageError::Format(format!(
                "bits_allocated must be 8 or 16, got {}",
                self.bits_allocated
            )));
        }
        if self.bits_stored == 0 || self.bits_stored > self.bits_allocated {
            return Err(ImageError::Format(format!(
                "bits_stored must be in 1..={}, got {}",
                self.bits_allocated, self.bits_stored
            )));
        }
        if self.channels != 1 && self.channels != 3 {
            return Err(ImageError::Format(format!(
                "channels must be 1 or 3, got {}",
                self.channels
            )));
        }
        Ok(())
    }

    /// Mask of the allocated container.
    pub fn container_mask(&self) -> u16 {
        if self.bits_allocated >= 16 {
            u16::MAX
        } else {
            (1u16 << self.bits_allocated) - 1
        }
    }

    /// Mask of the stored bits.
    pub fn stored_mask(&self) -> u16 {
        if self.bits_stored >= 16 {
            u16::MAX
        } else {
            (1u16 << self.bits_stored) - 1
        }
    }

    /// The numeric value of a stored word: the `bits_stored` low bits, sign
    /// extended when the format is signed. Bits above `bits_stored` are ignored,
    /// as DICOM readers do.
    pub fn value(&self, word: u16) -> i32 {
        let v = (word & self.stored_mask()) as i32;
        if self.signed && self.bits_stored > 0 && (v >> (self.bits_stored - 1)) & 1 == 1 {
            v - (1i32 << self.bits_stored)
        } else {
            v
        }
    }

    /// Smallest and largest numeric value this format can represent.
    pub fn value_range(&self) -> (i32, i32) {
        if self.signed {
            (
                -(1i32 << (self.bits_stored - 1)),
                (1i32 << (self.bits_stored - 1)) - 1,
            )
        } else {
            (0, (1i32 << self.bits_stored) - 1)
        }
    }

    /// The stored word for a numeric value (inverse of [`PixelFormat::value`]
    /// for words whose bits above `bits_stored` are the canonical ones: zero
    /// for unsigned, the sign extension for signed). Values are clamped into
    /// [`PixelFormat::value_range`].
    pub fn word(&self, value: i32) -> u16 {
        let (lo, hi) = self.value_range();
        let v = value.clamp(lo, hi);
        let w = (v as u32 as u16) & self.container_mask();
        if self.signed {
            w
        } else {
            w & self.stored_mask()
        }
    }

    /// Bytes one sample takes in a packed little-endian buffer.
    pub fn bytes_per_sample(&self) -> usize {
        (self.bits_allocated as usize) / 8
    }
}

impl std::fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.channels == 3 { "rgb" } else { "gray" };
        let sign = if self.signed { "s" } else { "u" };
        write!(
            f,
            "{kind}{}/{}{sign}",
            self.bits_stored, self.bits_allocated
        )
    }
}

/// Geometry plus format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageSpec {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub format: PixelFormat,
}

impl ImageSpec {
    pub fn new(width: u32, height: u32, format: PixelFormat) -> ImageSpec {
        ImageSpec {
            width,
            height,
            frames: 1,
            format,
        }
    }

    pub fn validate(&self) -> Result<(), ImageError> {
        self.format.validate()?;
        let err = |reason| ImageError::Dimensions {
            width: self.width,
            height: self.height,
            frames: self.frames,
            reason,
        };
        if self.width == 0 || self.height == 0 || self.frames == 0 {
            return Err(err("every dimension must be at least 1"));
        }
        if self.width > MAX_DIMENSION || self.height > MAX_DIMENSION {
            return Err(err("width and height are limited to 65536"));
        }
        if self.sample_count_u64() > MAX_SAMPLES {
            return Err(err("more than 2^28 samples"));
        }
        Ok(())
    }

    fn sample_count_u64(&self) -> u64 {
        self.width as u64 * self.height as u64 * self.frames as u64 * self.format.channels as u64
    }

    /// Samples in one frame.
    pub fn frame_samples(&self) -> usize {
        self.width as usize * self.height as usize * self.format.channels as usize
    }

    /// Samples in the whole image.
    pub fn sample_count(&self) -> usize {
        self.frame_samples() * self.frames as usize
    }

    /// Bytes of the image as stored (packed, little-endian words).
    pub fn byte_len(&self) -> usize {
        self.sample_count() * self.format.bytes_per_sample()
    }

    pub fn full_rect(&self) -> Rect {
        Rect::new(0, 0, self.width, self.height)
    }

    /// Index of sample (`x`, `y`, `channel`) of `frame` in the sample buffer.
    pub fn index(&self, frame: u32, x: u32, y: u32, channel: u8) -> usize {
        let c = self.format.channels as usize;
        frame as usize * self.frame_samples()
            + (y as usize * self.width as usize + x as usize) * c
            + channel as usize
    }
}

/// An axis-aligned pixel rectangle; `width == 0` or `height == 0` is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    pub fn right(&self) -> u64 {
        self.x as u64 + self.width as u64
    }

    pub fn bottom(&self) -> u64 {
        self.y as u64 + self.height as u64
    }

    pub fn area(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x && (x as u64) < self.right() && y >= self.y && (y as u64) < self.bottom()
    }

    /// Whether the rectangle lies inside a `width` x `height` image.
    pub fn fits(&self, width: u32, height: u32) -> bool {
        self.right() <= width as u64 && self.bottom() <= height as u64
    }

    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = self.right().min(other.right());
        let y1 = self.bottom().min(other.bottom());
        if (x0 as u64) >= x1 || (y0 as u64) >= y1 {
            Rect::default()
        } else {
            Rect::new(x0, y0, (x1 - x0 as u64) as u32, (y1 - y0 as u64) as u32)
        }
    }
}

impl std::fmt::Display for Rect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}+{}+{}", self.width, self.height, self.x, self.y)
    }
}

/// A validated image: spec plus exactly `spec.sample_count()` words, each
/// fitting in `bits_allocated` bits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    spec: ImageSpec,
    samples: Vec<u16>,
}

impl Image {
    /// Wraps a sample buffer after checking the spec, the length and that
    /// every word fits its container.
    pub fn new(spec: ImageSpec, samples: Vec<u16>) -> Result<Image, ImageError> {
        spec.validate()?;
        let expected = spec.sample_count() as u64;
        if samples.len() as u64 != expected {
            return Err(ImageError::Length {
                expected,
                actual: samples.len() as u64,
            });
        }
        let mask = spec.format.container_mask();
        // Every 16-bit word fits a 16-bit container; for 8-bit containers
        // an OR over all words (which the compiler vectorizes) finds out
        // whether any is too wide, and only then is the first one sought.
        if mask != u16::MAX
            && samples.iter().fold(0u16, |acc, &w| acc | w) & !mask != 0
            && let Some((index, &value)) =
                samples.iter().enumerate().find(|(_, w)| **w & !mask != 0)
        {
            return Err(ImageError::SampleTooWide {
                value,
                index,
                bits: spec.format.bits_allocated,
            });
        }
        Ok(Image { spec, samples })
    }

    /// An image of zeros.
    pub fn zeroed(spec: ImageSpec) -> Result<Image, ImageError> {
        spec.validate()?;
        Ok(Image {
            samples: vec![0; spec.sample_count()],
            spec,
        })
    }

    /// Reads packed little-endian words (1 byte per sample for 8-bit).
    pub fn from_le_bytes(spec: ImageSpec, bytes: &[u8]) -> Result<Image, ImageError> {
        spec.validate()?;
        let expected = spec.byte_len() as u64;
        if bytes.len() as u64 != expected {
            return Err(ImageError::Length {
                expected: spec.sample_count() as u64,
                actual: bytes.len() as u64 / spec.format.bytes_per_sample() as u64,
            });
        }
        let samples = if spec.format.bits_allocated == 8 {
            bytes.iter().map(|&b| b as u16).collect()
        } else {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        Image::new(spec, samples)
    }

    /// Packed little-endian words (1 byte per sample for 8-bit).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        if self.spec.format.bits_allocated == 8 {
            self.samples.iter().map(|&w| w as u8).collect()
        } else {
            self.samples.iter().flat_map(|w| w.to_le_bytes()).collect()
        }
    }

    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    pub fn format(&self) -> PixelFormat {
        self.spec.format
    }

    pub fn width(&self) -> u32 {
        self.spec.width
    }

    pub fn height(&self) -> u32 {
        self.spec.height
    }

    pub fn frames(&self) -> u32 {
        self.spec.frames
    }

    pub fn channels(&self) -> u8 {
        self.spec.format.channels
    }

    pub fn samples(&self) -> &[u16] {
        &self.samples
    }

    pub fn into_samples(self) -> Vec<u16> {
        self.samples
    }

    /// The samples of one frame.
    pub fn frame(&self, frame: u32) -> &[u16] {
        let n = self.spec.frame_samples();
        &self.samples[frame as usize * n..(frame as usize + 1) * n]
    }

    pub fn get(&self, frame: u32, x: u32, y: u32, channel: u8) -> u16 {
        self.samples[self.spec.index(frame, x, y, channel)]
    }

    /// Sets one sample; the word is masked to the container width.
    pub fn set(&mut self, frame: u32, x: u32, y: u32, channel: u8, word: u16) {
        let i = self.spec.index(frame, x, y, channel);
        self.samples[i] = word & self.spec.format.container_mask();
    }

    /// Checks that `rect` lies inside the image.
    pub fn check_rect(&self, rect: &Rect) -> Result<(), ImageError> {
        if rect.fits(self.spec.width, self.spec.height) {
            Ok(())
        } else {
            Err(ImageError::RectOutside {
                rect: *rect,
                width: self.spec.width,
                height: self.spec.height,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_values_round_trip_through_words() {
        let f = PixelFormat::gray16(12, true);
        assert_eq!(f.value(0x0FFF), -1);
        assert_eq!(f.value(0xFFFF), -1, "bits above bits_stored are ignored");
        assert_eq!(f.value(0x07FF), 2047);
        assert_eq!(f.value(0x0800), -2048);
        assert_eq!(f.word(-1), 0xFFFF);
        assert_eq!(f.word(-2048), 0xF800);
        assert_eq!(f.word(5000), 0x07FF, "clamped to the range");
        let u = PixelFormat::gray16(12, false);
        assert_eq!(u.word(-3), 0);
        assert_eq!(u.value(0xF123), 0x123);
    }

    #[test]
    fn rejects_bad_specs_and_buffers() {
        let spec = ImageSpec::new(0, 4, PixelFormat::GRAY8);
        assert!(matches!(
            spec.validate(),
            Err(ImageError::Dimensions { .. })
        ));
        let bad = PixelFormat {
            bits_allocated: 12,
            ..PixelFormat::GRAY16
        };
        assert!(matches!(bad.validate(), Err(ImageError::Format(_))));
        let spec = ImageSpec::new(2, 2, PixelFormat::GRAY8);
        assert!(matches!(
            Image::new(spec, vec![0; 3]),
            Err(ImageError::Length { .. })
        ));
        assert!(matches!(
            Image::new(spec, vec![0, 1, 2, 256]),
            Err(ImageError::SampleTooWide { index: 3, .. })
        ));
        let huge = ImageSpec {
            width: 65_536,
            height: 65_536,
            frames: 1,
            format: PixelFormat::GRAY16,
        };
        assert!(huge.validate().is_err(), "2^32 samples must be refused");
    }

    #[test]
    fn le_bytes_round_trip() {
        let spec = ImageSpec::new(3, 1, PixelFormat::GRAY16);
        let img = Image::new(spec, vec![1, 0xABCD, 0xFFFF]).unwrap();
        let bytes = img.to_le_bytes();
        assert_eq!(bytes, vec![1, 0, 0xCD, 0xAB, 0xFF, 0xFF]);
        assert_eq!(Image::from_le_bytes(spec, &bytes).unwrap(), img);
        assert!(Image::from_le_bytes(spec, &bytes[..5]).is_err());
    }

    #[test]
    fn rect_intersection() {
        let a = Rect::new(0, 0, 10, 10);
        let b = Rect::new(5, 8, 10, 10);
        assert_eq!(a.intersect(&b), Rect::new(5, 8, 5, 2));
        assert!(a.intersect(&Rect::new(10, 0, 3, 3)).is_empty());
        assert!(Rect::new(5, 5, 5, 5).fits(10, 10));
        assert!(!Rect::new(5, 5, 6, 5).fits(10, 10));
        assert!(!Rect::new(u32::MAX, 0, 2, 1).fits(10, 10));
    }
}
