//! `same_instance` on real files (pydicom-data): a file whose meta group a
//! C-STORE SCP rewrote, or whose trailing padding an encoder dropped, is the
//! same instance; a changed, added or removed element is named.

use std::path::PathBuf;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use tessera_dicom::{Difference, same_instance};

fn data_dir() -> PathBuf {
    tessera_dicom::testdata::pydicom_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

fn real(name: &str) -> Vec<u8> {
    let p = data_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Where the data set starts: after the preamble, `DICM` and the meta
/// group, whose length (0002,0000) is its first element.
fn dataset_offset(bytes: &[u8]) -> usize {
    assert_eq!(&bytes[128..132], b"DICM");
    assert_eq!(&bytes[132..136], &[2, 0, 0, 0], "(0002,0000) first");
    let len = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    144 + len
}

/// What a C-STORE SCP writes: its own meta group (other implementation
/// UID and version, a source AE title), then the data set bytes as sent.
fn scp_rewrite(bytes: &[u8]) -> Vec<u8> {
    let file = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(tags::PIXEL_DATA)
        .from_reader(bytes)
        .unwrap();
    let m = file.meta();
    let meta = FileMetaTableBuilder::new()
        .information_version([0, 1])
        .media_storage_sop_class_uid(m.media_storage_sop_class_uid())
        .media_storage_sop_instance_uid(m.media_storage_sop_instance_uid())
        .transfer_syntax(m.transfer_syntax())
        .implementation_class_uid("1.2.826.0.1.3680043.9.3811.2.1")
        .implementation_version_name("OTHER_SCP_2")
        .source_application_entity_title("STORESCU")
        .build()
        .unwrap();
    let mut out = vec![0u8; 128];
    out.extend_from_slice(b"DICM");
    meta.write(&mut out).unwrap();
    assert_ne!(
        &out[..],
        &bytes[..dataset_offset(bytes)],
        "a new meta group"
    );
    out.extend_from_slice(&bytes[dataset_offset(bytes)..]);
    out
}

/// The file with a Data Set Trailing Padding element (FFFC,FFFC) of 8
/// zero bytes appended (Explicit VR Little Endian files).
fn padded(bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    out.extend_from_slice(&[0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 8, 0, 0, 0]);
    out.extend_from_slice(&[0; 8]);
    out
}

/// The file re-encoded after `change` (dicom-object writes it anew).
fn edited(bytes: &[u8], change: impl FnOnce(&mut dicom_object::DefaultDicomObject)) -> Vec<u8> {
    let mut file = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .unwrap();
    change(&mut file);
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

#[test]
fn rewritten_meta_and_dropped_padding_are_the_same_instance() {
    // Native 16-bit, RGB, big endian, encapsulated (JPEG lossless), UN.
    for name in [
        "emri_small.dcm",
        "SC_rgb.dcm",
        "emri_small_big_endian.dcm",
        "JPEG-LL.dcm",
        "explicit_VR-UN.dcm",
    ] {
        let original = real(name);
        let received = scp_rewrite(&original);
        assert_ne!(original, received, "{name}: other bytes");
        assert_eq!(same_instance(&original, &received), Ok(()), "{name}");
        assert_eq!(same_instance(&received, &original), Ok(()), "{name}");
    }
    // Trailing padding on one side only.
    let original = real("emri_small.dcm");
    let with_padding = padded(&original);
    assert_eq!(
        same_instance(&with_padding, &scp_rewrite(&original)),
        Ok(())
    );
    assert_eq!(same_instance(&original, &with_padding), Ok(()));
    // Written anew by another encoder (dicom-object): still the same.
    let rewritten = edited(&original, |_| {});
    assert_eq!(same_instance(&original, &rewritten), Ok(()));
}

#[test]
fn every_readable_pydicom_data_file_is_the_same_instance_after_an_scp_rewrite() {
    let dir = data_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    assert!(files.len() >= 60, "pydicom-data in {}", dir.display());
    let mut compared = 0;
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        let readable = OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(&bytes[..])
            .is_ok()
            && bytes.get(128..132) == Some(b"DICM")
            && bytes.get(132..136) == Some(&[2, 0, 0, 0]);
        if !readable {
            continue;
        }
        let name = path.display();
        match same_instance(&bytes, &bytes) {
            Ok(()) => {}
            // Files whose lengths tessera refuses stay refused, never "same".
            Err(d) => {
                assert!(
                    matches!(d.as_slice(), [Difference::Unreadable { which: 1, .. }]),
                    "{name}: {d:?}"
                );
                continue;
            }
        }
        assert_eq!(
            same_instance(&bytes, &scp_rewrite(&bytes)),
            Ok(()),
            "{name}"
        );
        compared += 1;
    }
    assert!(compared >= 50, "only {compared} files compared");
}

#[test]
fn changed_added_and_removed_elements_are_named() {
    let original = real("emri_small.dcm");
    let other = edited(&original, |f| {
        f.put(DataElement::new(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            PrimitiveValue::from("another study"),
        ));
        f.remove_element(tags::INSTITUTION_NAME);
        f.put(DataElement::new(
            Tag(0x0011, 0x0010),
            VR::LO,
            PrimitiveValue::from("ACME 1.1"),
        ));
    });
    let d = same_instance(&original, &other).unwrap_err();
    assert_eq!(
        d,
        vec![
            Difference::OnlyInFirst {
                tag: tags::INSTITUTION_NAME
            },
            Difference::Value {
                tag: tags::STUDY_DESCRIPTION
            },
            Difference::OnlyInSecond {
                tag: Tag(0x0011, 0x0010)
            },
        ]
    );
    let text: Vec<String> = d.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "(0008,0080) InstitutionName: only in the first",
            "(0008,1030) StudyDescription: other value",
            "(0011,0010) PrivateCreator: only in the second",
        ]
    );

    // One pixel changed: Pixel Data differs, nothing else.
    let mut px = original.clone();
    let last = px.len() - 1;
    px[last] ^= 0x01;
    assert_eq!(
        same_instance(&original, &px),
        Err(vec![Difference::Value {
            tag: tags::PIXEL_DATA
        }])
    );
    // The same instance in another transfer syntax is another file.
    let be = real("emri_small_big_endian.dcm");
    let d = same_instance(&original, &be).unwrap_err();
    assert!(
        matches!(&d[0], Difference::TransferSyntax { first, second }
            if first == "1.2.840.10008.1.2.1" && second == "1.2.840.10008.1.2.2"),
        "{d:?}"
    );
    assert!(
        d[0].to_string()
            .starts_with("(0002,0010) TransferSyntaxUID: ")
    );
    // A change inside a sequence item names the sequence.
    let seq = real("liver.dcm");
    let found = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(&seq[..])
        .unwrap()
        .iter()
        .find(|e| e.items().is_some_and(|i| !i.is_empty()))
        .map(|e| e.header().tag)
        .expect("liver.dcm has a sequence");
    let changed = edited(&seq, |f| {
        let mut e = f.element(found).unwrap().clone();
        if let Some(items) = e.items_mut() {
            items[0].put(DataElement::new(
                Tag(0x0011, 0x0010),
                VR::LO,
                PrimitiveValue::from("inside"),
            ));
        }
        f.put(e);
    });
    assert_eq!(
        same_instance(&seq, &changed),
        Err(vec![Difference::Value { tag: found }])
    );
}

#[test]
fn unreadable_files_are_named_not_compared() {
    let original = real("emri_small.dcm");
    let d = same_instance(b"not a DICOM file", &original).unwrap_err();
    assert!(
        matches!(d.as_slice(), [Difference::Unreadable { which: 1, .. }]),
        "{d:?}"
    );
    let cut = &original[..original.len() / 2];
    let d = same_instance(&original, cut).unwrap_err();
    assert!(
        matches!(d.as_slice(), [Difference::Unreadable { which: 2, .. }]),
        "{d:?}"
    );
    assert!(d[0].to_string().starts_with("file 2 is not readable DICOM"));
}

/// pydicom-data's `emri_small_jpeg_2k_lossless_too_short.dcm` is the same
/// instance with its pixel data cut short: another data set.
#[test]
fn a_cut_short_copy_is_not_the_same_instance() {
    let whole = real("emri_small_jpeg_2k_lossless.dcm");
    let short = real("emri_small_jpeg_2k_lossless_too_short.dcm");
    assert_eq!(
        same_instance(&whole, &short),
        Err(vec![Difference::Value {
            tag: tags::PIXEL_DATA
        }])
    );
}
