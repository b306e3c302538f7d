//! A file's data set in the DICOM JSON model (PS3.18 F.2), for WADO-RS
//! `/metadata`: every attribute of the data set as the file holds it (the
//! file meta group is not part of it), except the pixel data, which is
//! bulk data and left out (PS3.18 8.3.5.1 lets an origin server omit it;
//! Tessera serves no bulk data URIs). Serialized by the dicom-json crate.

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;

use crate::{DicomError, error_chain, walk};

/// The pixel data elements left out: Pixel Data, Float and Double Float
/// Pixel Data.
const PIXEL_BULK: [Tag; 3] = [
    tags::PIXEL_DATA,
    tags::FLOAT_PIXEL_DATA,
    tags::DOUBLE_FLOAT_PIXEL_DATA,
];

/// The data set of the Part 10 file `bytes` as a DICOM JSON object,
/// without its pixel data.
pub fn metadata(bytes: &[u8]) -> Result<serde_json::Value, DicomError> {
    let layout = walk::walk(bytes)?;
    let file = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&bytes[layout.magic_at as usize..])
        .map_err(|e| DicomError::Unreadable(error_chain(&e)))?;
    let mut obj = file.into_inner();
    for t in PIXEL_BULK {
        obj.remove_element(t);
    }
    dicom_json::to_value(&obj).map_err(|e| DicomError::Malformed(format!("DICOM JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use crate::json::metadata;
    use crate::testdata::pydicom_data_dir;

    #[test]
    fn the_data_set_without_pixel_data() {
        let dir = pydicom_data_dir().expect("pydicom-data (TESSERA_DICOM_DATA)");
        let bytes = std::fs::read(dir.join("SC_rgb.dcm")).expect("SC_rgb.dcm");
        let v = metadata(&bytes).expect("metadata");
        let o = v.as_object().expect("an object");
        assert_eq!(o["00100020"]["Value"][0], "ID1", "PatientID");
        assert_eq!(o["00100010"]["Value"][0]["Alphabetic"], "Lestrade^G");
        assert_eq!(o["00080018"]["vr"], "UI");
        assert_eq!(o["00280010"]["Value"][0], 100, "Rows as a number");
        assert!(!o.contains_key("7FE00010"), "no Pixel Data");
        assert!(
            !o.keys().any(|k| k.starts_with("0002")),
            "no file meta group"
        );
    }

    #[test]
    fn not_a_dicom_file_is_an_error() {
        assert!(metadata(b"not DICOM at all").is_err());
    }
}
