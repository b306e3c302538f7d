//! Pixel Data: from the stored bytes to a [`tessera_image::Image`] and back,
//! word for word (bits above Bits Stored and the padding byte pattern are
//! carried untouched, so the round trip is bit-identical).

use std::ops::Range;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use tessera_image::{Image, ImageSpec, MAX_DIMENSION, PixelFormat};

use crate::walk::PixelElement;
use crate::{DicomError, Limits, Pixels};

/// How native pixel words are laid out in the file: everything needed to go
/// from an [`Image`] back to the exact stored bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NativeLayout {
    pub spec: ImageSpec,
    /// Planar Configuration 1: per frame, all R, then all G, then all B.
    pub planar: bool,
    /// 16-bit words stored big endian (Explicit VR Big Endian).
    pub big_endian: bool,
    /// 8-bit samples in an OW value of a big-endian file: each byte pair is
    /// swapped in the stream.
    pub swap_pairs: bool,
}

/// What the split decided about the pixels, and which bytes of the file they
/// replace.
pub struct Classified {
    pub pixels: Pixels,
    pub hole: Range<u64>,
    pub native: Option<NativeLayout>,
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok())
}

fn required(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<u32, DicomError> {
    let v = int(obj, tag).ok_or_else(|| {
        DicomError::ImageAttributes(format!(
            "{name} {} is missing or not a number",
            crate::walk::fmt_tag(tag)
        ))
    })?;
    u32::try_from(v).map_err(|_| DicomError::ImageAttributes(format!("{name} is {v}")))
}

/// Reads the image attributes, checks the sample budget and picks the
/// representation.
pub fn classify(
    obj: &InMemDicomObject,
    element: &PixelElement,
    big_endian: bool,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Classified, DicomError> {
    let rows = required(obj, tags::ROWS, "Rows")?;
    let columns = required(obj, tags::COLUMNS, "Columns")?;
    let spp = required(obj, tags::SAMPLES_PER_PIXEL, "Samples per Pixel")?;
    let bits_allocated = required(obj, tags::BITS_ALLOCATED, "Bits Allocated")?;
    let bits_stored = match int(obj, tags::BITS_STORED) {
        Some(v) => u32::try_from(v)
            .map_err(|_| DicomError::ImageAttributes(format!("Bits Stored is {v}")))?,
        None => bits_allocated,
    };
    let signed = int(obj, tags::PIXEL_REPRESENTATION) == Some(1);
    let frames = match obj.get(tags::NUMBER_OF_FRAMES) {
        None => 1,
        Some(e) => {
            let v = e.to_int::<i64>().unwrap_or(1);
            u32::try_from(v)
                .ok()
                .filter(|f| *f > 0)
                .ok_or_else(|| DicomError::ImageAttributes(format!("Number of Frames is {v}")))?
        }
    };
    let planar = int(obj, tags::PLANAR_CONFIGURATION) == Some(1);
    let photometric = obj
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if rows == 0 || columns == 0 || spp == 0 || bits_allocated == 0 {
        return Err(DicomError::ImageAttributes(format!(
            "{rows} rows, {columns} columns, {spp} samples per pixel, {bits_allocated} bits allocated"
        )));
    }
    let samples = u64::from(rows) * u64::from(columns) * u64::from(frames) * u64::from(spp);
    let max = limits.max_samples.min(tessera_image::MAX_SAMPLES);
    if samples > max {
        return Err(DicomError::TooManySamples {
            rows,
            columns,
            frames,
            samples_per_pixel: spp,
            limit: max,
        });
    }
    let value = element.value.clone();
    let value_len = value.end - value.start;
    let whole = |start: u64, end: u64| bytes[start as usize..end as usize].to_vec();
    if element.encapsulated {
        return Ok(Classified {
            pixels: Pixels::Encapsulated(whole(value.start, value.end)),
            hole: value,
            native: None,
        });
    }
    let expected = if bits_allocated % 8 == 0 {
        Some(samples * u64::from(bits_allocated / 8))
    } else if bits_allocated == 1 {
        Some(samples.div_ceil(8))
    } else {
        None
    };
    let subsampled = photometric.ends_with("_422") || photometric.ends_with("_420");
    if let Some(expected) = expected.filter(|_| !subsampled)
        && value_len < expected
    {
        return Err(DicomError::PixelDataTooShort {
            expected,
            actual: value_len,
        });
    }
    let swap_pairs = big_endian && element.vr == VR::OW && bits_allocated == 8;
    let opaque = |reason: String| {
        let word_bytes = if bits_allocated % 8 == 0 && bits_allocated <= 64 {
            (bits_allocated / 8) as u8
        } else {
            1
        };
        Ok(Classified {
            pixels: Pixels::Opaque {
                bytes: whole(value.start, value.end),
                big_endian: big_endian && (bits_allocated != 8 || swap_pairs),
                word_bytes: if swap_pairs { 2 } else { word_bytes },
                reason,
            },
            hole: value.clone(),
            native: None,
        })
    };
    if subsampled {
        return opaque(format!("{photometric} pixels are chroma subsampled"));
    }
    if bits_allocated != 8 && bits_allocated != 16 {
        return opaque(format!(
            "{bits_allocated}-bit samples (tessera-image holds 8 and 16)"
        ));
    }
    if spp != 1 && spp != 3 {
        return opaque(format!("{spp} samples per pixel"));
    }
    if bits_stored == 0 || bits_stored > bits_allocated {
        return opaque(format!(
            "Bits Stored {bits_stored} with Bits Allocated {bits_allocated}"
        ));
    }
    if rows > MAX_DIMENSION || columns > MAX_DIMENSION {
        return opaque(format!("{columns}x{rows} exceeds {MAX_DIMENSION}"));
    }
    let expected = samples * u64::from(bits_allocated / 8);
    if swap_pairs && expected % 2 == 1 {
        return opaque("odd number of byte-swapped 8-bit samples".into());
    }
    let spec = ImageSpec {
        width: columns,
        height: rows,
        frames,
        format: PixelFormat {
            bits_allocated: bits_allocated as u8,
            bits_stored: bits_stored as u8,
            signed,
            channels: spp as u8,
        },
    };
    let layout = NativeLayout {
        spec,
        planar: planar && spp == 3,
        big_endian,
        swap_pairs,
    };
    let hole = value.start..value.start + expected;
    let image = decode(&layout, &bytes[hole.start as usize..hole.end as usize])?;
    Ok(Classified {
        pixels: Pixels::Native(image),
        hole,
        native: Some(layout),
    })
}

/// Stored bytes -> image (interleaved samples).
pub fn decode(layout: &NativeLayout, raw: &[u8]) -> Result<Image, DicomError> {
    let spec = layout.spec;
    let n = spec.sample_count();
    let mut words: Vec<u16> = Vec::new();
    words
        .try_reserve_exact(n)
        .map_err(|_| DicomError::ImageAttributes(format!("cannot allocate {n} samples")))?;
    if spec.format.bits_allocated == 8 {
        if layout.swap_pairs {
            words.extend((0..n).map(|i| u16::from(raw[i ^ 1])));
        } else {
            words.extend(raw[..n].iter().map(|&b| u16::from(b)));
        }
    } else if layout.big_endian {
        words.extend(
            raw[..2 * n]
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]])),
        );
    } else {
        words.extend(
            raw[..2 * n]
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
    }
    if layout.planar {
        words = planar_to_interleaved(&words, spec.width as usize * spec.height as usize);
    }
    Image::new(spec, words).map_err(|e| DicomError::ImageAttributes(e.to_string()))
}

/// Image -> stored bytes: the exact inverse of [`decode`].
pub fn encode(layout: &NativeLayout, image: &Image) -> Result<Vec<u8>, DicomError> {
    if *image.spec() != layout.spec {
        return Err(DicomError::Mismatch(format!(
            "image is {:?}, the container expects {:?}",
            image.spec(),
            layout.spec
        )));
    }
    let interleaved;
    let words: &[u16] = if layout.planar {
        interleaved = interleaved_to_planar(
            image.samples(),
            layout.spec.width as usize * layout.spec.height as usize,
        );
        &interleaved
    } else {
        image.samples()
    };
    Ok(if layout.spec.format.bits_allocated == 8 {
        let mut out: Vec<u8> = words.iter().map(|&w| w as u8).collect();
        if layout.swap_pairs {
            for pair in out.chunks_exact_mut(2) {
                pair.swap(0, 1);
            }
        }
        out
    } else if layout.big_endian {
        words.iter().flat_map(|w| w.to_be_bytes()).collect()
    } else {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    })
}

/// Per frame: RRR..GGG..BBB -> RGBRGB.
fn planar_to_interleaved(words: &[u16], plane: usize) -> Vec<u16> {
    let mut out = vec![0u16; words.len()];
    for (f, frame) in words.chunks_exact(3 * plane).enumerate() {
        let base = f * 3 * plane;
        for c in 0..3 {
            for p in 0..plane {
                out[base + p * 3 + c] = frame[c * plane + p];
            }
        }
    }
    out
}

/// Per frame: RGBRGB -> RRR..GGG..BBB.
fn interleaved_to_planar(words: &[u16], plane: usize) -> Vec<u16> {
    let mut out = vec![0u16; words.len()];
    for (f, frame) in words.chunks_exact(3 * plane).enumerate() {
        let base = f * 3 * plane;
        for c in 0..3 {
            for p in 0..plane {
                out[base + c * plane + p] = frame[p * 3 + c];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(
        planar: bool,
        big_endian: bool,
        swap_pairs: bool,
        format: PixelFormat,
    ) -> NativeLayout {
        NativeLayout {
            spec: ImageSpec {
                width: 3,
                height: 2,
                frames: 2,
                format,
            },
            planar,
            big_endian,
            swap_pairs,
        }
    }

    #[test]
    fn every_layout_round_trips_bytes_exactly() {
        let rgb16 = PixelFormat {
            bits_allocated: 16,
            bits_stored: 12,
            signed: true,
            channels: 3,
        };
        for l in [
            layout(false, false, false, PixelFormat::GRAY8),
            layout(false, false, false, PixelFormat::RGB8),
            layout(true, false, false, PixelFormat::RGB8),
            layout(false, true, true, PixelFormat::RGB8),
            layout(true, true, false, rgb16),
            layout(false, false, false, rgb16),
            layout(false, true, false, PixelFormat::gray16(16, false)),
        ] {
            let n = l.spec.byte_len();
            let raw: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let image = decode(&l, &raw).unwrap();
            assert_eq!(encode(&l, &image).unwrap(), raw, "{l:?}");
        }
    }

    #[test]
    fn planar_rgb_is_interleaved_in_the_image() {
        let l = layout(true, false, false, PixelFormat::RGB8);
        let plane = 6;
        let mut raw = Vec::new();
        for f in 0..2u8 {
            for c in 0..3u8 {
                raw.extend(std::iter::repeat_n(f * 10 + c, plane));
            }
        }
        let image = decode(&l, &raw).unwrap();
        assert_eq!(image.get(1, 2, 1, 0), 10);
        assert_eq!(image.get(1, 2, 1, 2), 12);
        assert_eq!(image.get(0, 0, 0, 1), 1);
    }

    #[test]
    fn big_endian_words_keep_bits_above_bits_stored() {
        let l = layout(false, true, false, PixelFormat::gray16(12, false));
        let raw: Vec<u8> = (0..24)
            .map(|i| if i % 2 == 0 { 0xF0 } else { i as u8 })
            .collect();
        let image = decode(&l, &raw).unwrap();
        assert_eq!(image.samples()[1], 0xF003);
        assert_eq!(encode(&l, &image).unwrap(), raw);
    }
}
