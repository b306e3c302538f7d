//! Encoding and decoding of image files held in memory: PNG (8- and 16-bit
//! grayscale, RGB), TIFF (read) and raw little-endian words. The caller does
//! the file I/O.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use crate::{Image, ImageError, ImageSpec, PixelFormat};

/// Decodes PNG or TIFF bytes. Grayscale and RGB, 8 or 16 bits; an alpha
/// channel is refused rather than silently dropped (that would not be lossless).
pub fn decode(bytes: &[u8]) -> Result<Image, ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Codec(e.to_string()))?;
    if !matches!(reader.format(), Some(ImageFormat::Png | ImageFormat::Tiff)) {
        return Err(ImageError::Codec(
            "not a PNG or TIFF file (raw files need --width/--height/--bits)".into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(crate::MAX_DIMENSION);
    limits.max_image_height = Some(crate::MAX_DIMENSION);
    limits.max_alloc = Some(crate::MAX_SAMPLES * 2);
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| ImageError::Codec(e.to_string()))?;
    // The header alone says how big the image is: refuse one over the
    // sample limit before a single pixel buffer is allocated (the decoded
    // bytes of an 8-bit image would fit max_alloc and only the widened
    // copy would be refused, after allocating both).
    let (w, h) = decoder.dimensions();
    let channels = u64::from(decoder.color_type().channel_count());
    let samples = u64::from(w) * u64::from(h) * channels;
    if samples > crate::MAX_SAMPLES {
        return Err(ImageError::Codec(format!(
            "the header declares {w}x{h} with {channels} channel(s): {samples} samples, \
             more than the limit of {} (2^28)",
            crate::MAX_SAMPLES
        )));
    }
    let decoded =
        DynamicImage::from_decoder(decoder).map_err(|e| ImageError::Codec(e.to_string()))?;
    let (w, h) = (decoded.width(), decoded.height());
    // DynamicImage is non-exhaustive: every other color type is refused.
    #[allow(clippy::wildcard_enum_match_arm)]
    let (format, samples): (PixelFormat, Vec<u16>) = match decoded {
        DynamicImage::ImageLuma8(b) => (
            PixelFormat::GRAY8,
            b.into_raw().into_iter().map(u16::from).collect(),
        ),
        DynamicImage::ImageLuma16(b) => (PixelFormat::GRAY16, b.into_raw()),
        DynamicImage::ImageRgb8(b) => (
            PixelFormat::RGB8,
            b.into_raw().into_iter().map(u16::from).collect(),
        ),
        DynamicImage::ImageRgb16(b) => (
            PixelFormat {
                channels: 3,
                ..PixelFormat::GRAY16
            },
            b.into_raw(),
        ),
        other => {
            return Err(ImageError::Codec(format!(
                "unsupported color type {:?}: Tessera takes grayscale or RGB without alpha",
                other.color()
            )));
        }
    };
    Image::new(ImageSpec::new(w, h, format), samples)
}

/// Encodes one frame as PNG. Words are written as stored; a signed image is
/// written as its raw two's-complement words (PNG has no signed samples), so
/// decoding gives back the same words with an unsigned format.
pub fn encode_png(image: &Image, frame: u32) -> Result<Vec<u8>, ImageError> {
    if frame >= image.frames() {
        return Err(ImageError::Codec(format!(
            "frame {frame} does not exist (image has {})",
            image.frames()
        )));
    }
    let (w, h) = (image.width(), image.height());
    let words = image.frame(frame);
    let f = image.format();
    let dynamic = match (f.bits_allocated, f.channels) {
        (8, 1) => DynamicImage::ImageLuma8(
            image::GrayImage::from_raw(w, h, words.iter().map(|&v| v as u8).collect())
                .ok_or_else(|| ImageError::Codec("buffer size".into()))?,
        ),
        (8, _) => DynamicImage::ImageRgb8(
            image::RgbImage::from_raw(w, h, words.iter().map(|&v| v as u8).collect())
                .ok_or_else(|| ImageError::Codec("buffer size".into()))?,
        ),
        (_, 1) => DynamicImage::ImageLuma16(
            image::ImageBuffer::from_raw(w, h, words.to_vec())
                .ok_or_else(|| ImageError::Codec("buffer size".into()))?,
        ),
        (_, _) => DynamicImage::ImageRgb16(
            image::ImageBuffer::from_raw(w, h, words.to_vec())
                .ok_or_else(|| ImageError::Codec("buffer size".into()))?,
        ),
    };
    let mut out = Cursor::new(Vec::new());
    dynamic
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| ImageError::Codec(e.to_string()))?;
    Ok(out.into_inner())
}

/// Encodes an 8-bit grayscale or RGB picture built by the caller (maps,
/// visualisations) as PNG.
pub fn encode_png_rgb8(width: u32, height: u32, rgb: Vec<u8>) -> Result<Vec<u8>, ImageError> {
    let buf = image::RgbImage::from_raw(width, height, rgb)
        .ok_or_else(|| ImageError::Codec("RGB buffer size does not match".into()))?;
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(buf)
        .write_to(&mut out, ImageFormat::Png)
        .map_err(|e| ImageError::Codec(e.to_string()))?;
    Ok(out.into_inner())
}

/// Reads raw little-endian words laid out as `spec` says.
pub fn decode_raw(spec: ImageSpec, bytes: &[u8]) -> Result<Image, ImageError> {
    Image::from_le_bytes(spec, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_gray8_gray16_rgb() {
        let cases = [
            (PixelFormat::GRAY8, 255u16),
            (PixelFormat::GRAY16, u16::MAX),
            (PixelFormat::RGB8, 255),
        ];
        for (format, max) in cases {
            let spec = ImageSpec::new(7, 5, format);
            let samples: Vec<u16> = (0..spec.sample_count() as u32)
                .map(|i| (i.wrapping_mul(2654435761u32) >> 7) as u16 & max)
                .collect();
            let img = Image::new(spec, samples).unwrap();
            let png = encode_png(&img, 0).unwrap();
            assert_eq!(decode(&png).unwrap(), img, "{format}");
        }
    }

    /// A PNG of a few dozen bytes whose header declares 20000 x 20000
    /// 8-bit gray (400 M samples, 400 MB decoded: under the allocation
    /// limit, over the sample limit): refused from the header, naming the
    /// limit, before any pixel buffer exists.
    #[test]
    fn huge_declared_dimensions_are_refused_from_the_header() {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut c = 0xFFFF_FFFFu32;
            for &b in bytes {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        0xEDB8_8320 ^ (c >> 1)
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        }
        fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            let at = out.len();
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            let crc = crc32(&out[at..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&20_000u32.to_be_bytes());
        ihdr.extend_from_slice(&20_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        // A start of zlib data: the decoder reads the header up to here.
        chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x63, 0x00]);
        chunk(&mut png, b"IEND", &[]);
        assert!(png.len() < 80);
        let e = decode(&png).unwrap_err().to_string();
        assert!(e.contains("20000x20000") && e.contains("2^28"), "{e}");
    }

    #[test]
    fn garbage_and_truncated_files_are_errors() {
        assert!(decode(b"not an image").is_err());
        let img = Image::zeroed(ImageSpec::new(16, 16, PixelFormat::GRAY8)).unwrap();
        let png = encode_png(&img, 0).unwrap();
        assert!(decode(&png[..png.len() / 2]).is_err());
        assert!(encode_png(&img, 1).is_err());
    }
}
