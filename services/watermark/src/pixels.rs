//! Pixels in and out of the service without a second copy of the image
//! (issue 20): packed little-endian words decoded into samples as their
//! chunks arrive, and an image's samples encoded back one chunk at a time
//! as the answer goes out.

use tessera_image::{Image, ImageSpec};

use crate::convert::CHUNK_BYTES;

/// Samples of `spec`, filled from packed little-endian chunks in order
/// (a chunk may end inside a 16-bit word).
pub(crate) struct SampleSink {
    sixteen: bool,
    samples: Vec<u16>,
    /// The low byte of a 16-bit word whose high byte is in the next chunk.
    carry: Option<u8>,
}

impl SampleSink {
    /// Room for every sample of `spec` (reserved, not yet touched).
    pub(crate) fn new(spec: &ImageSpec) -> Self {
        SampleSink {
            sixteen: spec.format.bits_allocated > 8,
            samples: Vec::with_capacity(spec.sample_count()),
            carry: None,
        }
    }

    pub(crate) fn push(&mut self, mut chunk: &[u8]) {
        if !self.sixteen {
            self.samples.extend(chunk.iter().map(|&b| u16::from(b)));
            return;
        }
        if let Some(lo) = self.carry.take() {
            match chunk.split_first() {
                Some((&hi, rest)) => {
                    self.samples.push(u16::from_le_bytes([lo, hi]));
                    chunk = rest;
                }
                None => {
                    self.carry = Some(lo);
                    return;
                }
            }
        }
        let words = chunk.chunks_exact(2);
        if let [b] = words.remainder() {
            self.carry = Some(*b);
        }
        self.samples
            .extend(words.map(|w| u16::from_le_bytes([w[0], w[1]])));
    }

    /// The image (checked as [`Image::new`] checks it); a dangling half
    /// word (an odd byte count of 16-bit words) is a length error, as
    /// [`Image::from_le_bytes`] names it.
    pub(crate) fn finish(self, spec: ImageSpec) -> Result<Image, tessera_image::ImageError> {
        if self.carry.is_some() {
            return Err(tessera_image::ImageError::Length {
                expected: spec.sample_count() as u64,
                actual: self.samples.len() as u64,
            });
        }
        Image::new(spec, self.samples)
    }
}

/// An image's packed little-endian words ([`Image::to_le_bytes`]) in
/// chunks of [`CHUNK_BYTES`], each encoded when it is pulled; the image is
/// released after the last one.
pub(crate) fn image_chunks(image: Image) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    let eight = image.format().bits_allocated == 8;
    let per = if eight { CHUNK_BYTES } else { CHUNK_BYTES / 2 };
    let mut image = Some(image);
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let samples = image.as_ref()?.samples();
        let end = samples.len().min(at + per);
        let part = &samples[at.min(end)..end];
        let chunk: Option<Vec<u8>> = (!part.is_empty()).then(|| {
            if eight {
                part.iter().map(|&w| w as u8).collect()
            } else {
                part.iter().flat_map(|w| w.to_le_bytes()).collect()
            }
        });
        at = end;
        if at >= samples.len() {
            image = None;
        }
        chunk
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_image::PixelFormat;
    use tessera_image::phantom::head_phantom;

    #[test]
    fn chunks_in_and_out_are_the_packed_bytes() {
        for format in [PixelFormat::gray16(12, false), PixelFormat::GRAY8] {
            // 3 frames of 512 x 512: more than one chunk either way.
            let image = head_phantom(512, 512, 3, format, 5).unwrap();
            let bytes = image.to_le_bytes();
            // Odd chunk sizes split 16-bit words across chunks.
            let mut sink = SampleSink::new(image.spec());
            for c in bytes.chunks(1001) {
                sink.push(c);
            }
            assert_eq!(sink.finish(*image.spec()).unwrap(), image, "{format}");
            let out: Vec<Vec<u8>> = image_chunks(image.clone()).collect();
            let want: Vec<Vec<u8>> = bytes.chunks(CHUNK_BYTES).map(<[u8]>::to_vec).collect();
            assert_eq!(out, want, "{format}");
        }
    }

    #[test]
    fn a_missing_byte_is_a_length_error() {
        let image = head_phantom(16, 16, 1, PixelFormat::GRAY16, 5).unwrap();
        let bytes = image.to_le_bytes();
        let mut sink = SampleSink::new(image.spec());
        sink.push(&bytes[..bytes.len() - 1]);
        assert!(sink.finish(*image.spec()).is_err());
    }
}
