//! Building CT Image Storage instances (Explicit VR Little Endian, 16-bit
//! unsigned, one frame) with dicom-object: the multi-instance studies of the
//! tests, the demo and `tessera bench dicom`, whose pixels come from real
//! slices.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;

use crate::{DicomError, error_chain};

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";

/// Who and which study the slices belong to.
#[derive(Clone, Debug)]
pub struct StudyInfo {
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub study_date: String,
    pub institution: String,
    /// Root of every UID of the study (`<root>.1` study, `<root>.2` series,
    /// `<root>.3.<n>` instances).
    pub uid_root: String,
}

impl StudyInfo {
    pub fn study_uid(&self) -> String {
        format!("{}.1", self.uid_root)
    }

    pub fn sop_instance_uid(&self, index: u32) -> String {
        format!("{}.3.{}", self.uid_root, index + 1)
    }
}

/// One slice: `pixels` are `rows x columns` 16-bit samples (12 stored).
pub fn ct_slice(
    study: &StudyInfo,
    index: u32,
    rows: u16,
    columns: u16,
    pixels: &[u16],
) -> Result<Vec<u8>, DicomError> {
    if pixels.len() != usize::from(rows) * usize::from(columns) {
        return Err(DicomError::Write(format!(
            "{} samples given for {rows}x{columns}",
            pixels.len()
        )));
    }
    let sop = study.sop_instance_uid(index);
    let text = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
    let mut obj = InMemDicomObject::from_element_iter([
        text(tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE),
        text(tags::SOP_INSTANCE_UID, VR::UI, &sop),
        text(tags::STUDY_DATE, VR::DA, &study.study_date),
        text(tags::MODALITY, VR::CS, "CT"),
        text(tags::INSTITUTION_NAME, VR::LO, &study.institution),
        text(tags::PATIENT_NAME, VR::PN, &study.patient_name),
        text(tags::PATIENT_ID, VR::LO, &study.patient_id),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, &study.patient_birth_date),
        text(tags::STUDY_INSTANCE_UID, VR::UI, &study.study_uid()),
        text(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            &format!("{}.2", study.uid_root),
        ),
        text(tags::INSTANCE_NUMBER, VR::IS, &(index + 1).to_string()),
        text(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            &format!("-250\\-250\\{}", index as f64 * -1.25),
        ),
        text(tags::SLICE_THICKNESS, VR::DS, "1.25"),
        text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        text(tags::RESCALE_INTERCEPT, VR::DS, "-1024"),
        text(tags::RESCALE_SLOPE, VR::DS, "1"),
    ]);
    for (tag, v) in [
        (tags::SAMPLES_PER_PIXEL, 1u16),
        (tags::ROWS, rows),
        (tags::COLUMNS, columns),
        (tags::BITS_ALLOCATED, 16),
        (tags::BITS_STORED, 12),
        (tags::HIGH_BIT, 11),
        (tags::PIXEL_REPRESENTATION, 0),
    ] {
        obj.put(DataElement::new(tag, VR::US, PrimitiveValue::from(v)));
    }
    let words: Vec<u16> = pixels.iter().map(|&v| v & 0x0fff).collect();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::U16(words.into()),
    ));
    let meta = FileMetaTableBuilder::new()
        .transfer_syntax("1.2.840.10008.1.2.1")
        .media_storage_sop_class_uid(CT_IMAGE_STORAGE)
        .media_storage_sop_instance_uid(sop)
        .implementation_class_uid(crate::IMPLEMENTATION_CLASS_UID)
        .build()
        .map_err(|e| DicomError::Write(error_chain(&e)))?;
    let mut out = Vec::with_capacity(pixels.len() * 2 + 2048);
    obj.with_exact_meta(meta)
        .write_all(&mut out)
        .map_err(|e| DicomError::Write(error_chain(&e)))?;
    Ok(out)
}

/// Resamples a real slice (any size, 8/16-bit, first frame, first
/// channel) to `rows x columns` 12-bit samples by nearest neighbour.
pub fn resample_to_12bit(image: &tessera_image::Image, rows: u16, columns: u16) -> Vec<u16> {
    let spec = image.spec();
    let (w, h) = (spec.width.max(1) as usize, spec.height.max(1) as usize);
    let ch = usize::from(spec.format.channels.max(1));
    let words = image.to_le_bytes();
    let bytes_per = if spec.format.bits_allocated > 8 { 2 } else { 1 };
    let sample = |x: usize, y: usize| -> u32 {
        let i = (y * w + x) * ch * bytes_per;
        match (bytes_per, words.get(i), words.get(i + 1)) {
            (2, Some(&lo), Some(&hi)) => u32::from(u16::from_le_bytes([lo, hi])),
            (_, Some(&b), _) => u32::from(b) << 4,
            _ => 0,
        }
    };
    let max = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| sample(x, y))
        .max()
        .unwrap_or(1)
        .max(1);
    let (rows, columns) = (usize::from(rows), usize::from(columns));
    let mut out = Vec::with_capacity(rows * columns);
    for r in 0..rows {
        for c in 0..columns {
            let v = sample(c * w / columns, r * h / rows);
            out.push((v * 4095 / max) as u16);
        }
    }
    out
}
