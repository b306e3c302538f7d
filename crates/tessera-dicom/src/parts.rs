//! The serialized parts of a split: the identifying part (`TSID` v1) and
//! the container (`TSCN` v1), each a little-endian record read back through
//! a bounds-checked reader; and how encapsulated or opaque pixels are kept.

use tessera_image::{ImageSpec, PixelFormat};

use crate::{Container, DicomError, NativeLayout, PixelKind, Pixels};

/// The identifying part: `TSID` v1, count, then (offset in the original
/// file, length, bytes) per element, all little endian.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identifying {
    /// (offset in the original file, the element's bytes: header and value).
    pub entries: Vec<(u64, Vec<u8>)>,
}

pub(crate) const IDENTIFYING_MAGIC: &[u8; 5] = b"TSID\x01";
pub(crate) const CONTAINER_MAGIC: &[u8; 5] = b"TSCN\x01";

impl Identifying {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(IDENTIFYING_MAGIC);
        w.u64(self.entries.len() as u64);
        for (at, bytes) in &self.entries {
            w.u64(*at);
            w.blob(bytes);
        }
        w.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Identifying, DicomError> {
        let mut r = Reader::new(bytes, "identifying part");
        r.magic(IDENTIFYING_MAGIC)?;
        let n = r.u64()?;
        let mut entries = Vec::new();
        for _ in 0..n {
            let at = r.u64()?;
            entries.push((at, r.blob()?.to_vec()));
        }
        r.end()?;
        Ok(Identifying { entries })
    }
}

impl Pixels {
    /// The Pixel Data value as stored, for encapsulated and opaque pixels
    /// (kept whole, not decoded); `None` for native pixels.
    pub fn stored_bytes(&self) -> Option<&[u8]> {
        match self {
            Pixels::Native(_) => None,
            Pixels::Encapsulated(b) | Pixels::Opaque { bytes: b, .. } => Some(b),
        }
    }
}

impl Container {
    /// Rebuilds encapsulated or opaque [`Pixels`] from their stored bytes
    /// ([`Pixels::stored_bytes`]); an error for a container of native pixels.
    pub fn stored_pixels(&self, bytes: Vec<u8>) -> Result<Pixels, DicomError> {
        match self.pixel_kind {
            PixelKind::Encapsulated => Ok(Pixels::Encapsulated(bytes)),
            PixelKind::Opaque {
                big_endian,
                word_bytes,
            } => Ok(Pixels::Opaque {
                bytes,
                big_endian,
                word_bytes,
                reason: "kept as stored".into(),
            }),
            PixelKind::Native(_) => Err(DicomError::Mismatch(
                "the container holds native pixels, not stored bytes".into(),
            )),
        }
    }

    /// The transfer syntax UID of the original file.
    pub fn transfer_syntax(&self) -> &str {
        &self.transfer_syntax
    }

    pub fn original_len(&self) -> u64 {
        self.original_len
    }

    /// SHA-256 of the original file ([`join`] checks its output against it).
    pub fn original_sha256(&self) -> [u8; 32] {
        self.original_sha256
    }

    /// The layout of native pixels, if the file has them.
    pub fn native_layout(&self) -> Option<NativeLayout> {
        match self.pixel_kind {
            PixelKind::Native(layout) => Some(layout),
            PixelKind::Encapsulated | PixelKind::Opaque { .. } => None,
        }
    }

    /// `TSCN` v1: original length and SHA-256, transfer syntax, pixel hole,
    /// pixel kind (and native layout), body.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(CONTAINER_MAGIC);
        w.u64(self.original_len);
        w.bytes(&self.original_sha256);
        w.blob(self.transfer_syntax.as_bytes());
        w.u64(self.pixel_hole.start);
        w.u64(self.pixel_hole.end);
        match self.pixel_kind {
            PixelKind::Native(l) => {
                let f = l.spec.format;
                w.bytes(&[1]);
                w.u64(u64::from(l.spec.width));
                w.u64(u64::from(l.spec.height));
                w.u64(u64::from(l.spec.frames));
                w.bytes(&[
                    f.bits_allocated,
                    f.bits_stored,
                    u8::from(f.signed),
                    f.channels,
                    u8::from(l.planar),
                    u8::from(l.big_endian),
                    u8::from(l.swap_pairs),
                ]);
            }
            PixelKind::Encapsulated => w.bytes(&[2]),
            PixelKind::Opaque {
                big_endian,
                word_bytes,
            } => w.bytes(&[3, u8::from(big_endian), word_bytes]),
        }
        w.blob(&self.body);
        w.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Container, DicomError> {
        let mut r = Reader::new(bytes, "container");
        r.magic(CONTAINER_MAGIC)?;
        let original_len = r.u64()?;
        let mut original_sha256 = [0u8; 32];
        original_sha256.copy_from_slice(r.take(32)?);
        let transfer_syntax =
            String::from_utf8(r.blob()?.to_vec()).map_err(|_| r.bad("transfer syntax"))?;
        let start = r.u64()?;
        let end = r.u64()?;
        if end < start || end > original_len {
            return Err(r.bad("pixel hole"));
        }
        let pixel_kind = match r.take(1)?[0] {
            1 => {
                let width = u32::try_from(r.u64()?).map_err(|_| r.bad("width"))?;
                let height = u32::try_from(r.u64()?).map_err(|_| r.bad("height"))?;
                let frames = u32::try_from(r.u64()?).map_err(|_| r.bad("frames"))?;
                let b = r.take(7)?;
                let spec = ImageSpec {
                    width,
                    height,
                    frames,
                    format: PixelFormat {
                        bits_allocated: b[0],
                        bits_stored: b[1],
                        signed: b[2] == 1,
                        channels: b[3],
                    },
                };
                spec.validate().map_err(|e| r.bad(&e.to_string()))?;
                if spec.byte_len() as u64 != end - start {
                    return Err(r.bad("pixel hole size"));
                }
                PixelKind::Native(NativeLayout {
                    spec,
                    planar: b[4] == 1,
                    big_endian: b[5] == 1,
                    swap_pairs: b[6] == 1,
                })
            }
            2 => PixelKind::Encapsulated,
            3 => {
                let b = r.take(2)?;
                PixelKind::Opaque {
                    big_endian: b[0] == 1,
                    word_bytes: b[1],
                }
            }
            _ => return Err(r.bad("pixel kind")),
        };
        let body = r.blob()?.to_vec();
        r.end()?;
        Ok(Container {
            original_len,
            original_sha256,
            transfer_syntax,
            pixel_hole: start..end,
            pixel_kind,
            body,
        })
    }
}

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn blob(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.bytes(b);
    }
}

/// Bounds-checked reader: every length is checked against what is left.
struct Reader<'a> {
    rest: &'a [u8],
    part: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], part: &'static str) -> Reader<'a> {
        Reader { rest: bytes, part }
    }
    fn bad(&self, what: &str) -> DicomError {
        DicomError::Corrupt {
            part: self.part,
            reason: format!("bad {what}"),
        }
    }
    fn take(&mut self, n: u64) -> Result<&'a [u8], DicomError> {
        if n > self.rest.len() as u64 {
            return Err(DicomError::Corrupt {
                part: self.part,
                reason: format!("needs {n} more bytes, {} left", self.rest.len()),
            });
        }
        let (head, tail) = self.rest.split_at(n as usize);
        self.rest = tail;
        Ok(head)
    }
    fn magic(&mut self, magic: &[u8]) -> Result<(), DicomError> {
        if self.take(magic.len() as u64)? != magic {
            return Err(self.bad("magic or version"));
        }
        Ok(())
    }
    fn u64(&mut self) -> Result<u64, DicomError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn blob(&mut self) -> Result<&'a [u8], DicomError> {
        let n = self.u64()?;
        self.take(n)
    }
    fn end(&self) -> Result<(), DicomError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}
