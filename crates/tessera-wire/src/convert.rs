//! Scalar conversions: image specs and rectangles (the segmentation.v1 and
//! watermark.v1 messages have the same shape), operations, and sample words
//! as little-endian bytes.

use tessera_proto::segmentation::v1 as seg_pb;
use tessera_segment::Operation;

use crate::{WireError, invalid};

macro_rules! spec_conversions {
    ($module:ident, $pb:path, $doc:literal) => {
        #[doc = $doc]
        pub mod $module {
            use tessera_image::{ImageSpec, PixelFormat, Rect};

            use crate::{WireError, invalid};
            use $pb as pb;

            /// Checks a spec (`frames` 0 means 1) and turns it into the
            /// core's type; errors name `field`.
            pub fn spec_from_proto(field: &str, s: pb::ImageSpec) -> Result<ImageSpec, WireError> {
                let narrow = |name: &str, v: u32| {
                    u8::try_from(v)
                        .map_err(|_| invalid(format!("{field}.{name} {v} is out of range")))
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

            /// A required spec: `field` must be set and valid.
            pub fn required_spec(
                field: &str,
                s: Option<pb::ImageSpec>,
            ) -> Result<ImageSpec, WireError> {
                spec_from_proto(
                    field,
                    s.ok_or_else(|| invalid(format!("{field} is required")))?,
                )
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

            /// A required rectangle (any values: callers check it against
            /// the image).
            pub fn rect_from_proto(field: &str, r: Option<pb::Rect>) -> Result<Rect, WireError> {
                let r = r.ok_or_else(|| invalid(format!("{field} is required")))?;
                Ok(Rect::new(r.x, r.y, r.width, r.height))
            }

            pub fn rect_to_proto(r: &Rect) -> pb::Rect {
                pb::Rect {
                    x: r.x,
                    y: r.y,
                    width: r.width,
                    height: r.height,
                }
            }
        }
    };
}

spec_conversions!(
    segmentation,
    tessera_proto::segmentation::v1,
    "`tessera.segmentation.v1.ImageSpec` / `Rect` (also used by storage.v1)."
);
spec_conversions!(
    watermark,
    tessera_proto::watermark::v1,
    "`tessera.watermark.v1.ImageSpec` / `Rect` (also used by gateway.v1)."
);

/// A required operation; errors name `field`.
pub fn operation_from_proto(field: &str, op: i32) -> Result<Operation, WireError> {
    match seg_pb::Operation::try_from(op) {
        Ok(seg_pb::Operation::Unspecified) => Err(invalid(format!("{field} is required"))),
        Err(_) => Err(invalid(format!("{field}: unknown operation {op}"))),
        Ok(seg_pb::Operation::Gaussian) => Ok(Operation::Gaussian),
        Ok(seg_pb::Operation::Median) => Ok(Operation::Median),
        Ok(seg_pb::Operation::Unsharp) => Ok(Operation::Unsharp),
        Ok(seg_pb::Operation::Sobel) => Ok(Operation::Sobel),
        Ok(seg_pb::Operation::Histeq) => Ok(Operation::HistEq),
    }
}

pub fn operation_to_proto(op: Operation) -> seg_pb::Operation {
    match op {
        Operation::Gaussian => seg_pb::Operation::Gaussian,
        Operation::Median => seg_pb::Operation::Median,
        Operation::Unsharp => seg_pb::Operation::Unsharp,
        Operation::Sobel => seg_pb::Operation::Sobel,
        Operation::HistEq => seg_pb::Operation::Histeq,
    }
}

/// Little-endian words: one byte per sample for 8-bit containers
/// (`bytes_per_sample == 1`), else two.
pub fn encode_samples(samples: &[u16], bytes_per_sample: usize) -> Vec<u8> {
    if bytes_per_sample == 1 {
        samples.iter().map(|&w| w as u8).collect()
    } else {
        samples.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// Appends the words of `bytes` (see [`encode_samples`]) to `out`, which
/// may take at most `room` more; errors name `field`. A word on the wire is
/// exactly as wide as its container, so every decoded word fits it.
pub fn decode_samples(
    field: &str,
    bytes: &[u8],
    bytes_per_sample: usize,
    room: u64,
    out: &mut Vec<u16>,
) -> Result<(), WireError> {
    if bytes.is_empty() || bytes.len() > crate::CHUNK_BYTES {
        return Err(invalid(format!(
            "{field}: chunks must be 1..={} bytes, got {}",
            crate::CHUNK_BYTES,
            bytes.len()
        )));
    }
    if !bytes.len().is_multiple_of(bytes_per_sample) {
        return Err(invalid(format!(
            "{field}: {} bytes is not a whole number of {bytes_per_sample}-byte words",
            bytes.len()
        )));
    }
    let words = (bytes.len() / bytes_per_sample) as u64;
    if words > room {
        return Err(invalid(format!(
            "{field}: {words} more words, only {room} expected"
        )));
    }
    if bytes_per_sample == 1 {
        out.extend(bytes.iter().map(|&b| u16::from(b)));
    } else {
        out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_image::{ImageSpec, PixelFormat, Rect};

    #[test]
    fn specs_round_trip_and_refuse_bad_fields() {
        let spec = ImageSpec {
            width: 7,
            height: 5,
            frames: 3,
            format: PixelFormat::gray16(12, true),
        };
        let p = segmentation::spec_to_proto(&spec);
        assert_eq!(segmentation::spec_from_proto("s", p).unwrap(), spec);
        let w = watermark::spec_to_proto(&spec);
        assert_eq!(watermark::spec_from_proto("s", w).unwrap(), spec);
        let mut zero_frames = segmentation::spec_to_proto(&spec);
        zero_frames.frames = 0;
        assert_eq!(
            segmentation::spec_from_proto("s", zero_frames)
                .unwrap()
                .frames,
            1
        );
        let mut bad = p;
        bad.bits_allocated = 300;
        let e = segmentation::spec_from_proto("start.spec", bad).unwrap_err();
        assert!(e.to_string().contains("start.spec.bits_allocated"), "{e}");
        let mut bad = p;
        bad.width = 0;
        assert!(segmentation::spec_from_proto("f.spec", bad).is_err());
        assert!(
            segmentation::required_spec("f.spec", None)
                .unwrap_err()
                .to_string()
                .contains("f.spec is required")
        );
        let r = Rect::new(1, 2, 3, 4);
        assert_eq!(
            segmentation::rect_from_proto("r", Some(segmentation::rect_to_proto(&r))).unwrap(),
            r
        );
        assert_eq!(
            watermark::rect_from_proto("r", Some(watermark::rect_to_proto(&r))).unwrap(),
            r
        );
        assert!(segmentation::rect_from_proto("tile.core", None).is_err());
    }

    #[test]
    fn operations_round_trip() {
        for op in Operation::ALL {
            assert_eq!(
                operation_from_proto("op", operation_to_proto(op).into()).unwrap(),
                op
            );
        }
        assert!(
            operation_from_proto("start.operation", 0)
                .unwrap_err()
                .to_string()
                .contains("start.operation is required")
        );
        assert!(operation_from_proto("start.operation", 99).is_err());
    }

    #[test]
    fn samples_round_trip_and_are_bounded() {
        let words = [0u16, 1, 255, 4095, 65535];
        let mut out = Vec::new();
        decode_samples("s", &encode_samples(&words, 2), 2, 5, &mut out).unwrap();
        assert_eq!(out, words);
        let mut out = Vec::new();
        decode_samples("s", &encode_samples(&words[..3], 1), 1, 3, &mut out).unwrap();
        assert_eq!(out, &words[..3]);
        let mut out = Vec::new();
        assert!(decode_samples("s", &[1, 2, 3], 2, 10, &mut out).is_err());
        assert!(decode_samples("s", &[], 1, 10, &mut out).is_err());
        assert!(decode_samples("s", &[1, 2, 3], 1, 2, &mut out).is_err());
        assert!(
            decode_samples("s", &vec![0; crate::CHUNK_BYTES + 1], 1, u64::MAX, &mut out).is_err()
        );
        assert!(out.is_empty(), "nothing appended on error");
    }
}
