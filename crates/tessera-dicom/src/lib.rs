//! DICOM for Tessera: split a Part 10 file into identifying metadata, pixels
//! and a container that rebuild it byte for byte, plus a de-identified copy
//! (PS3.15 Basic Application Level Confidentiality Profile).
//!
//! Pure library: no I/O, no async. Every DICOM byte is decoded by the dicom-rs
//! crates; this crate only records where the elements sit (see [`walk`]).
//!
//! ```text
//! original file = container bytes with the holes filled back in
//!   holes: identifying elements (whole: header + value)  -> `identifying`
//!          the Pixel Data value                          -> `pixels`
//! ```
//! See docs/DICOM.md for the design and the refused files.
#![forbid(unsafe_code)]

mod compare;
mod deid;
pub mod json;
mod parts;
mod pixels;
pub mod query;
pub mod synth;
mod table;
pub mod testdata;
mod walk;

use std::ops::Range;

use dicom_core::header::{DataElementHeader, Length};
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::encode::Encode;
use dicom_encoding::encode::explicit_le::ExplicitVRLittleEndianEncoder;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use sha2::{Digest, Sha256};
use tessera_image::Image;

pub use compare::{Difference, same_instance};
pub use deid::{Profile, Temporal, UidMap, deidentify};
pub use parts::Identifying;
pub use pixels::NativeLayout;

/// Default ceiling on the size of one file: 1 GiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1 << 30;

/// Explicit VR Little Endian: the transfer syntax of de-identified files with
/// native pixel data.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// Implementation Class UID written into de-identified files (a fixed
/// `2.25` UID generated for Tessera).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.302642410962651391868462540718133517131";
const IMPLEMENTATION_VERSION: &str = "TESSERA_DICOM_1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DicomError {
    #[error("file is {size} bytes, the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("not a DICOM Part 10 file: {0}")]
    NotPart10(&'static str),
    #[error("malformed DICOM: {0}")]
    Malformed(String),
    #[error("element {tag} at offset {offset} declares {length} bytes but only {remaining} remain")]
    LyingLength {
        tag: String,
        length: u32,
        offset: u64,
        remaining: u64,
    },
    #[error("unknown transfer syntax {0:?}")]
    UnknownTransferSyntax(String),
    #[error("unsupported transfer syntax {uid} ({name}): {reason}")]
    UnsupportedTransferSyntax {
        uid: String,
        name: String,
        reason: &'static str,
    },
    #[error("no Pixel Data (7FE0,0010) in the data set")]
    MissingPixelData,
    #[error("image attributes: {0}")]
    ImageAttributes(String),
    #[error(
        "{rows} rows x {columns} columns x {frames} frames x {samples_per_pixel} samples exceeds the limit of {limit} samples"
    )]
    TooManySamples {
        rows: u32,
        columns: u32,
        frames: u32,
        samples_per_pixel: u32,
        limit: u64,
    },
    #[error("Pixel Data holds {actual} bytes, the image attributes need {expected}")]
    PixelDataTooShort { expected: u64, actual: u64 },
    #[error("dicom-object cannot read the file: {0}")]
    Unreadable(String),
    #[error("corrupt {part}: {reason}")]
    Corrupt { part: &'static str, reason: String },
    #[error("the parts do not rebuild the original: {0}")]
    Mismatch(String),
    #[error("writing the de-identified file: {0}")]
    Write(String),
}

/// Bounds on what [`split`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_file_bytes: u64,
    /// Rows x Columns x frames x samples per pixel; never above
    /// [`tessera_image::MAX_SAMPLES`].
    pub max_samples: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_samples: tessera_image::MAX_SAMPLES,
        }
    }
}

/// The pixel data of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pixels {
    /// Native 8/16-bit, 1 or 3 samples (grayscale, RGB, YBR_FULL, palette
    /// indices): the raw stored words, interleaved.
    Native(Image),
    /// Encapsulated (compressed) transfer syntax: the Pixel Data value as
    /// stored (offset table item, fragment items, sequence delimiter), not
    /// decoded.
    Encapsulated(Vec<u8>),
    /// Native pixel data that [`Image`] cannot hold (1- or 32-bit samples,
    /// chroma subsampling, ...): the value as stored.
    Opaque {
        bytes: Vec<u8>,
        /// The bytes are big-endian words of `word_bytes` bytes.
        big_endian: bool,
        word_bytes: u8,
        reason: String,
    },
}

/// Everything of the original file that is neither identifying nor pixel
/// data, plus where those go back. Serialize with [`Container::to_bytes`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    original_len: u64,
    original_sha256: [u8; 32],
    transfer_syntax: String,
    pixel_hole: Range<u64>,
    pixel_kind: PixelKind,
    /// The original bytes with every hole removed.
    body: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PixelKind {
    Native(NativeLayout),
    Encapsulated,
    Opaque { big_endian: bool, word_bytes: u8 },
}

/// The result of [`split`].
#[derive(Clone, Debug)]
pub struct Split {
    pub container: Container,
    /// Serialized identifying elements (see [`Identifying`]): every element
    /// the Basic Profile removes or replaces, private elements, and file-meta
    /// attributes naming a site; to be encrypted by the caller.
    pub identifying: Vec<u8>,
    pub pixels: Pixels,
    /// A Part 10 file holding the de-identified data set without Pixel Data
    /// (see [`write_deidentified`]); empty from [`split_for_store`].
    pub deidentified: Vec<u8>,
    /// Who and what the file is about (read from the data set, in the clear:
    /// for the caller's trusted zone only).
    pub subject: Subject,
}

/// The attributes that group instances into a study and name the patient.
/// Empty strings for absent elements.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subject {
    pub patient_id: String,
    pub patient_name: String,
    pub patient_birth_date: String,
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_instance_uid: String,
    pub sop_class_uid: String,
    pub modality: String,
    /// Burned In Annotation (0028,0301) is `YES`: the pixels themselves may
    /// show identity, which no header de-identification removes.
    pub burned_in_annotation: bool,
    /// The attributes the gateway's query index keeps
    /// ([`query::indexed_values`]).
    pub indexed: Vec<(query::TagPair, String)>,
}

/// Longest value kept in a [`Subject`] field.
const SUBJECT_MAX: usize = 256;

fn subject_of(obj: &dicom_object::InMemDicomObject, meta: &dicom_object::FileMetaTable) -> Subject {
    let text = |tag: Tag| -> String {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|v| {
                let v = v.trim_end_matches(['\0', ' ']).trim_start();
                v.chars().take(SUBJECT_MAX).collect()
            })
            .unwrap_or_default()
    };
    let or_meta = |v: String, m: &str| {
        if v.is_empty() {
            m.trim_end_matches(['\0', ' '])
                .chars()
                .take(SUBJECT_MAX)
                .collect()
        } else {
            v
        }
    };
    Subject {
        patient_id: text(tags::PATIENT_ID),
        patient_name: text(tags::PATIENT_NAME),
        patient_birth_date: text(tags::PATIENT_BIRTH_DATE),
        study_instance_uid: text(tags::STUDY_INSTANCE_UID),
        series_instance_uid: text(tags::SERIES_INSTANCE_UID),
        sop_instance_uid: or_meta(
            text(tags::SOP_INSTANCE_UID),
            meta.media_storage_sop_instance_uid(),
        ),
        sop_class_uid: or_meta(
            text(tags::SOP_CLASS_UID),
            meta.media_storage_sop_class_uid(),
        ),
        modality: text(tags::MODALITY),
        burned_in_annotation: text(tags::BURNED_IN_ANNOTATION).eq_ignore_ascii_case("YES"),
        indexed: query::indexed_values(obj),
    }
}

/// File-meta attributes outside Table E.1-1 that can name a site or carry
/// arbitrary data: cut out with the identifying elements.
const META_IDENTIFYING: [Tag; 5] = [
    Tag(0x0002, 0x0016),
    Tag(0x0002, 0x0017),
    Tag(0x0002, 0x0018),
    Tag(0x0002, 0x0100),
    Tag(0x0002, 0x0102),
];

/// Whether an element is cut out into `identifying`.
pub fn is_identifying(tag: Tag) -> bool {
    if tag.group() == 0xFFFE {
        return false;
    }
    tag.group() % 2 == 1 || table::TABLE.get(tag).is_some() || META_IDENTIFYING.contains(&tag)
}

/// Number of Table E.1-1 rows embedded (the private-attributes row is the
/// odd-group rule of [`is_identifying`]).
pub fn profile_table_len() -> usize {
    table::TABLE.len()
}

/// Formats an error with its sources (dicom-rs errors keep the useful detail
/// in the source chain).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Splits a DICOM Part 10 file.
pub fn split(bytes: &[u8], limits: &Limits, profile: &Profile) -> Result<Split, DicomError> {
    split_inner(bytes, limits, Some(profile))
}

/// Splits a file for storage: as [`split`] without the de-identified copy
/// (`deidentified` is empty), which a store does not need.
pub fn split_for_store(bytes: &[u8], limits: &Limits) -> Result<Split, DicomError> {
    split_inner(bytes, limits, None)
}

fn split_inner(
    bytes: &[u8],
    limits: &Limits,
    profile: Option<&Profile>,
) -> Result<Split, DicomError> {
    let limit = limits.max_file_bytes;
    if bytes.len() as u64 > limit {
        return Err(DicomError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    // 1. Byte layout (and every length checked before dicom-rs allocates).
    let layout = walk::walk(bytes)?;
    let element = layout.pixel.clone().ok_or(DicomError::MissingPixelData)?;

    // 2. The data set through dicom-object, up to the Pixel Data.
    let file = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(&bytes[layout.magic_at as usize..])
        .map_err(|e| DicomError::Unreadable(error_chain(&e)))?;
    if file.meta().transfer_syntax() != layout.transfer_syntax {
        return Err(DicomError::Malformed(format!(
            "file meta group length disagrees with its elements (transfer syntax {:?} vs {:?})",
            file.meta().transfer_syntax(),
            layout.transfer_syntax
        )));
    }
    let big_endian = layout.transfer_syntax == "1.2.840.10008.1.2.2";

    // 3. Pixels.
    let classified = pixels::classify(&file, &element, big_endian, bytes, limits)?;
    let pixel_kind = match (&classified.pixels, classified.native) {
        (Pixels::Native(_), Some(native)) => PixelKind::Native(native),
        (Pixels::Encapsulated(_), _) => PixelKind::Encapsulated,
        (
            Pixels::Opaque {
                big_endian,
                word_bytes,
                ..
            },
            _,
        ) => PixelKind::Opaque {
            big_endian: *big_endian,
            word_bytes: *word_bytes,
        },
        (Pixels::Native(_), None) => {
            return Err(DicomError::Malformed(
                "native pixels without a layout".into(),
            ));
        }
    };

    // 4. Container and identifying parts.
    let mut identifying = Identifying::default();
    let mut body = Vec::with_capacity(bytes.len());
    let mut cursor = 0u64;
    let mut holes: Vec<(Range<u64>, bool)> = layout
        .identifying
        .iter()
        .map(|r| (r.clone(), true))
        .chain(std::iter::once((classified.hole.clone(), false)))
        .collect();
    holes.sort_by_key(|(r, _)| r.start);
    for (range, is_identifying) in &holes {
        if range.start < cursor {
            return Err(DicomError::Malformed("overlapping elements".into()));
        }
        body.extend_from_slice(&bytes[cursor as usize..range.start as usize]);
        if *is_identifying {
            identifying.entries.push((
                range.start,
                bytes[range.start as usize..range.end as usize].to_vec(),
            ));
        }
        cursor = range.end;
    }
    body.extend_from_slice(&bytes[cursor as usize..]);
    let container = Container {
        original_len: bytes.len() as u64,
        original_sha256: Sha256::digest(bytes).into(),
        transfer_syntax: layout.transfer_syntax.clone(),
        pixel_hole: classified.hole.clone(),
        pixel_kind,
        body,
    };

    // 5. The de-identified data set.
    let meta = file.meta().clone();
    let mut obj = file.into_inner();
    let subject = subject_of(&obj, &meta);
    let Some(profile) = profile else {
        return Ok(Split {
            container,
            identifying: identifying.to_bytes(),
            pixels: classified.pixels,
            deidentified: Vec::new(),
            subject,
        });
    };
    deid::deidentify(&mut obj, profile);
    // `write_deidentified` writes native pixels interleaved (and little
    // endian): the data set must say so.
    if let PixelKind::Native(layout) = pixel_kind
        && layout.planar
    {
        obj.put(dicom_core::DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            dicom_core::PrimitiveValue::from(0u16),
        ));
    }
    let ts_out = match pixel_kind {
        PixelKind::Encapsulated => layout.transfer_syntax.as_str(),
        PixelKind::Native(_) | PixelKind::Opaque { .. } => EXPLICIT_VR_LE,
    };
    let builder = FileMetaTableBuilder::new()
        .transfer_syntax(ts_out)
        .media_storage_sop_class_uid(meta.media_storage_sop_class_uid())
        .media_storage_sop_instance_uid(profile.uids.map(meta.media_storage_sop_instance_uid()))
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION);
    // The meta is given whole (not filled from the data set, whose SOP
    // elements may be stored as UN).
    let deid_meta = builder
        .build()
        .map_err(|e| DicomError::Write(error_chain(&e)))?;
    let deid_file = obj.with_exact_meta(deid_meta);
    let mut deidentified = Vec::new();
    deid_file
        .write_all(&mut deidentified)
        .map_err(|e| DicomError::Write(error_chain(&e)))?;

    Ok(Split {
        container,
        identifying: identifying.to_bytes(),
        pixels: classified.pixels,
        deidentified,
        subject,
    })
}

/// Rebuilds the original file, byte for byte.
pub fn join(
    container: &Container,
    identifying: &[u8],
    pixels: &Pixels,
) -> Result<Vec<u8>, DicomError> {
    let identifying = Identifying::from_bytes(identifying)?;
    let pixel_bytes = match (container.pixel_kind, pixels) {
        (PixelKind::Native(layout), Pixels::Native(image)) => pixels::encode(&layout, image)?,
        (PixelKind::Encapsulated, Pixels::Encapsulated(bytes)) => bytes.clone(),
        (PixelKind::Opaque { .. }, Pixels::Opaque { bytes, .. }) => bytes.clone(),
        (kind, _) => {
            return Err(DicomError::Mismatch(format!(
                "the container holds {kind:?} pixels, a different kind was given"
            )));
        }
    };
    let pixel_len = container.pixel_hole.end - container.pixel_hole.start;
    if pixel_bytes.len() as u64 != pixel_len {
        return Err(DicomError::Mismatch(format!(
            "{} pixel bytes, the container expects {pixel_len}",
            pixel_bytes.len()
        )));
    }
    let mut holes: Vec<(u64, &[u8])> = identifying
        .entries
        .iter()
        .map(|(at, b)| (*at, b.as_slice()))
        .chain(std::iter::once((
            container.pixel_hole.start,
            pixel_bytes.as_slice(),
        )))
        .collect();
    holes.sort_by_key(|(at, _)| *at);
    let total: u64 =
        container.body.len() as u64 + holes.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
    if total != container.original_len {
        return Err(DicomError::Mismatch(format!(
            "the parts add up to {total} bytes, the original had {}",
            container.original_len
        )));
    }
    let mut out = Vec::with_capacity(total as usize);
    let mut body = container.body.as_slice();
    for (at, bytes) in holes {
        let take = at
            .checked_sub(out.len() as u64)
            .filter(|n| *n <= body.len() as u64)
            .ok_or_else(|| {
                DicomError::Mismatch(format!("hole at {at} overlaps the previous part"))
            })?;
        let (head, rest) = body.split_at(take as usize);
        out.extend_from_slice(head);
        out.extend_from_slice(bytes);
        body = rest;
    }
    out.extend_from_slice(body);
    let digest: [u8; 32] = Sha256::digest(&out).into();
    if digest != container.original_sha256 {
        return Err(DicomError::Mismatch(
            "the rebuilt file's SHA-256 differs from the original's".into(),
        ));
    }
    Ok(out)
}

/// The researcher's file: the de-identified data set from [`Split`] with the
/// original pixels appended as its last element (Explicit VR Little Endian
/// for native pixel data, the original transfer syntax for encapsulated).
pub fn write_deidentified(deidentified: &[u8], pixels: &Pixels) -> Result<Vec<u8>, DicomError> {
    let (vr, len, value): (VR, Length, Vec<u8>) = match pixels {
        Pixels::Native(image) => {
            let le = image.to_le_bytes();
            let vr = if image.format().bits_allocated > 8 {
                VR::OW
            } else {
                VR::OB
            };
            (vr, Length(0), le)
        }
        Pixels::Encapsulated(bytes) => (VR::OB, Length::UNDEFINED, bytes.clone()),
        Pixels::Opaque {
            bytes,
            big_endian,
            word_bytes,
            ..
        } => {
            let mut le = bytes.clone();
            let w = usize::from(*word_bytes).max(1);
            if *big_endian && w > 1 {
                for word in le.chunks_exact_mut(w) {
                    word.reverse();
                }
            }
            let vr = if w > 1 { VR::OW } else { VR::OB };
            (vr, Length(0), le)
        }
    };
    let mut value = value;
    let len = if len.is_undefined() {
        len
    } else {
        if value.len() % 2 == 1 {
            value.push(0);
        }
        let n = u32::try_from(value.len())
            .map_err(|_| DicomError::Write("pixel data over 4 GiB".into()))?;
        Length(n)
    };
    let mut out = Vec::with_capacity(deidentified.len() + value.len() + 12);
    out.extend_from_slice(deidentified);
    ExplicitVRLittleEndianEncoder::default()
        .encode_element_header(&mut out, DataElementHeader::new(tags::PIXEL_DATA, vr, len))
        .map_err(|e| DicomError::Write(error_chain(&e)))?;
    out.extend_from_slice(&value);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parts::IDENTIFYING_MAGIC;

    #[test]
    fn identifying_round_trips_and_rejects_garbage() {
        let id = Identifying {
            entries: vec![(132, vec![1, 2, 3]), (400, vec![])],
        };
        assert_eq!(Identifying::from_bytes(&id.to_bytes()).unwrap(), id);
        let bytes = id.to_bytes();
        for cut in 0..bytes.len() {
            assert!(Identifying::from_bytes(&bytes[..cut]).is_err());
        }
        let mut huge = IDENTIFYING_MAGIC.to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Identifying::from_bytes(&huge).is_err());
    }

    #[test]
    fn identifying_covers_the_table_private_groups_and_meta_names() {
        assert!(is_identifying(tags::PATIENT_NAME));
        assert!(is_identifying(tags::SOP_INSTANCE_UID));
        assert!(is_identifying(tags::MEDIA_STORAGE_SOP_INSTANCE_UID));
        assert!(is_identifying(Tag(0x0029, 0x1010)));
        assert!(is_identifying(Tag(0x0002, 0x0016)));
        assert!(!is_identifying(tags::ROWS));
        assert!(!is_identifying(tags::PIXEL_DATA));
        assert!(!is_identifying(tags::TRANSFER_SYNTAX_UID));
        assert!(!is_identifying(Tag(0xFFFE, 0xE000)));
    }
}
