//! C-FIND matching of the gateway's query index (PS3.4 C.2.2.2) and the
//! de-identified view a researcher is answered from.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use tessera_dicom::query::{Level, deidentified_values, indexed, indexed_values, matches};
use tessera_dicom::{Profile, Temporal, UidMap};

#[test]
fn universal_and_single_value_matching() {
    assert!(matches(VR::LO, "", "P-1"));
    assert!(matches(VR::LO, "*", "P-1"));
    assert!(matches(VR::LO, "P-1", "P-1"));
    assert!(!matches(VR::LO, "P-1", "P-12"));
    assert!(matches(VR::SH, "ACC-7 ", "ACC-7"), "padding is ignored");
    assert!(
        !matches(VR::SH, "acc-7", "ACC-7"),
        "case matters outside PN"
    );
    assert!(matches(VR::CS, "CT", "CT"));
    assert!(!matches(VR::CS, "MR", "CT"));
    assert!(matches(VR::CS, "MR", "CT\\MR"), "one of several values");
}

#[test]
fn person_names_with_wildcards_ignore_case() {
    assert!(matches(VR::PN, "Doe^Jane", "DOE^JANE"));
    assert!(matches(VR::PN, "DOE*", "Doe^Jane"));
    assert!(matches(VR::PN, "*jane", "Doe^Jane"));
    assert!(matches(VR::PN, "D?e^*", "Doe^Jane"));
    assert!(!matches(VR::PN, "Smith*", "Doe^Jane"));
    assert!(!matches(VR::PN, "D?^*", "Doe^Jane"));
    assert!(matches(VR::LO, "P-*", "P-1234"));
    assert!(!matches(VR::PN, "Doe^Jane", ""));
}

#[test]
fn date_ranges() {
    assert!(matches(VR::DA, "20240102", "20240102"));
    assert!(!matches(VR::DA, "20240103", "20240102"));
    assert!(matches(VR::DA, "20240101-20240131", "20240115"));
    assert!(matches(VR::DA, "20240101-20240131", "20240131"));
    assert!(!matches(VR::DA, "20240101-20240131", "20240201"));
    assert!(matches(VR::DA, "20240101-", "20991231"));
    assert!(!matches(VR::DA, "20240101-", "20231231"));
    assert!(matches(VR::DA, "-20240101", "19000101"));
    assert!(!matches(VR::DA, "-20240101", "20240102"));
    assert!(!matches(VR::DA, "20240101-", ""), "no value: no match");
    assert!(matches(VR::TM, "080000-120000", "103000.123"));
    assert!(!matches(VR::TM, "080000-120000", "130000"));
    assert!(
        matches(VR::DA, "2024.01.02", "20240102"),
        "old ACR-NEMA form"
    );
}

#[test]
fn uid_lists() {
    assert!(matches(VR::UI, "1.2.3", "1.2.3"));
    assert!(!matches(VR::UI, "1.2.3", "1.2.34"));
    assert!(matches(VR::UI, "1.2.9\\1.2.3", "1.2.3"));
    assert!(!matches(VR::UI, "1.2.*", "1.2.3"), "no wildcards in UIDs");
}

#[test]
fn levels_of_the_indexed_attributes() {
    let p = |t: dicom_core::Tag| (t.group(), t.element());
    assert_eq!(indexed(p(tags::PATIENT_NAME)), Some((VR::PN, Level::Study)));
    assert_eq!(indexed(p(tags::STUDY_DATE)), Some((VR::DA, Level::Study)));
    assert_eq!(indexed(p(tags::MODALITY)), Some((VR::CS, Level::Series)));
    assert_eq!(
        indexed(p(tags::SOP_INSTANCE_UID)),
        Some((VR::UI, Level::Image))
    );
    assert_eq!(indexed(p(tags::PIXEL_DATA)), None);
}

fn sample() -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    for (t, vr, v) in [
        (tags::PATIENT_NAME, VR::PN, "Doe^Jane"),
        (tags::PATIENT_ID, VR::LO, "P-1234"),
        (tags::STUDY_DATE, VR::DA, "20240115"),
        (tags::ACCESSION_NUMBER, VR::SH, "ACC-7"),
        (tags::MODALITY, VR::CS, "CT"),
        (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.826.0.1.1"),
        (tags::SERIES_INSTANCE_UID, VR::UI, "1.2.826.0.1.1.1"),
        (tags::SOP_INSTANCE_UID, VR::UI, "1.2.826.0.1.1.1.1"),
        (tags::ROWS, VR::US, "4"),
    ] {
        o.put(DataElement::new(t, vr, PrimitiveValue::from(v)));
    }
    o
}

fn value(values: &[((u16, u16), String)], t: dicom_core::Tag) -> Option<&str> {
    values
        .iter()
        .find(|(k, _)| *k == (t.group(), t.element()))
        .map(|(_, v)| v.as_str())
}

#[test]
fn the_researchers_view_hides_identity_and_maps_uids() {
    let values = indexed_values(&sample());
    assert_eq!(value(&values, tags::PATIENT_NAME), Some("Doe^Jane"));
    assert_eq!(value(&values, tags::ROWS), None, "not indexed");
    let uids = UidMap::new(b"a study key for the tests, 32 b.");
    let profile = Profile {
        temporal: Temporal::RetainModified { shift_days: -10 },
        uids: uids.clone(),
    };
    let view = deidentified_values(&values, &profile);
    for t in [tags::PATIENT_NAME, tags::PATIENT_ID, tags::ACCESSION_NUMBER] {
        let v = value(&view, t).unwrap_or("");
        assert!(
            !values.iter().any(|(_, o)| o == v && !v.is_empty()),
            "{t}: {v}"
        );
    }
    assert_eq!(
        value(&view, tags::STUDY_DATE),
        Some("20240105"),
        "shifted 10 days"
    );
    assert_eq!(value(&view, tags::MODALITY), Some("CT"), "kept");
    let mapped = uids.map("1.2.826.0.1.1");
    assert_eq!(
        value(&view, tags::STUDY_INSTANCE_UID),
        Some(mapped.as_str())
    );
    assert!(matches(
        VR::UI,
        &mapped,
        value(&view, tags::STUDY_INSTANCE_UID).unwrap()
    ));
    assert!(!matches(
        VR::PN,
        "Doe*",
        value(&view, tags::PATIENT_NAME).unwrap_or("")
    ));
    let removed = Profile {
        temporal: Temporal::Remove,
        uids,
    };
    let view = deidentified_values(&values, &removed);
    assert!(
        value(&view, tags::STUDY_DATE).unwrap_or("").is_empty()
            || value(&view, tags::STUDY_DATE) != Some("20240115")
    );
}
