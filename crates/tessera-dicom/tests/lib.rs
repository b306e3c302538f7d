//! tessera-dicom integration tests: synthetic files for every pixel layout
//! and every kind of bad input, and (with TESSERA_DICOM_DATA set, as `./x unit`
//! does) every file of the pydicom-data package. The one integration-test
//! binary of the crate: the other files in tests/ are its modules.

mod fuzz_regressions;
mod query_match;
mod same_instance;

use std::collections::BTreeSet;
use std::path::PathBuf;

use dicom_core::header::Header;
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use proptest::prelude::*;
use tessera_dicom::{
    DicomError, Limits, Pixels, Profile, Temporal, UidMap, is_identifying, join, split,
    write_deidentified,
};

const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";

fn profile() -> Profile {
    Profile {
        temporal: Temporal::Remove,
        uids: UidMap::new(b"per-study key for the tests....."),
    }
}

struct Spec {
    ts: &'static str,
    rows: u16,
    columns: u16,
    frames: u32,
    spp: u16,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    planar: bool,
    photometric: &'static str,
}

impl Spec {
    fn gray16() -> Spec {
        Spec {
            ts: EXPLICIT_LE,
            rows: 5,
            columns: 7,
            frames: 1,
            spp: 1,
            bits_allocated: 16,
            bits_stored: 12,
            signed: false,
            planar: false,
            photometric: "MONOCHROME2",
        }
    }
}

/// A small but complete file written by dicom-object, with identifying
/// attributes at the top level, in a sequence and in a private group.
fn make_file(s: &Spec) -> Vec<u8> {
    let samples = s.rows as usize * s.columns as usize * s.frames as usize * s.spp as usize;
    let mut obj = InMemDicomObject::from_element_iter([
        DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.7"),
        ),
        DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.2.1125.1.1"),
        ),
        DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.826.0.1.3680043.2.1125.1"),
        ),
        DataElement::new(tags::STUDY_DATE, VR::DA, PrimitiveValue::from("20240228")),
        DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
        DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("PID-0042")),
        DataElement::new(
            tags::PATIENT_BIRTH_DATE,
            VR::DA,
            PrimitiveValue::from("19700101"),
        ),
        DataElement::new(
            tags::INSTITUTION_NAME,
            VR::LO,
            PrimitiveValue::from("St Elsewhere"),
        ),
        DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("OT")),
        DataElement::new(
            Tag(0x0009, 0x0010),
            VR::LO,
            PrimitiveValue::from("ACME 1.0"),
        ),
        DataElement::new(
            Tag(0x0009, 0x1001),
            VR::LO,
            PrimitiveValue::from("Doe^Jane again"),
        ),
        DataElement::new(
            tags::REFERENCED_STUDY_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(
                vec![InMemDicomObject::from_element_iter([DataElement::new(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    PrimitiveValue::from("1.2.826.0.1.3680043.2.1125.9"),
                )])],
                Length::UNDEFINED,
            ),
        ),
        DataElement::new(
            tags::ANATOMIC_REGION_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(
                vec![InMemDicomObject::from_element_iter([
                    DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from("T-D3000")),
                    DataElement::new(
                        tags::PATIENT_NAME,
                        VR::PN,
                        PrimitiveValue::from("Nested^Name"),
                    ),
                ])],
                Length::UNDEFINED,
            ),
        ),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(s.spp)),
        DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            PrimitiveValue::from(s.photometric),
        ),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(s.rows)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(s.columns)),
        DataElement::new(
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(s.bits_allocated),
        ),
        DataElement::new(
            tags::BITS_STORED,
            VR::US,
            PrimitiveValue::from(s.bits_stored),
        ),
        DataElement::new(
            tags::HIGH_BIT,
            VR::US,
            PrimitiveValue::from(s.bits_stored - 1),
        ),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(u16::from(s.signed)),
        ),
    ]);
    if s.frames > 1 {
        obj.put(DataElement::new(
            tags::NUMBER_OF_FRAMES,
            VR::IS,
            PrimitiveValue::from(s.frames.to_string()),
        ));
    }
    if s.spp == 3 {
        obj.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(u16::from(s.planar)),
        ));
    }
    if s.photometric == "PALETTE COLOR" {
        for (d, data) in [
            (
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
            (
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
            (
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
                tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            ),
        ] {
            obj.put(DataElement::new(
                d,
                VR::US,
                PrimitiveValue::U16([256, 0, 16].as_slice().into()),
            ));
            let lut: Vec<u16> = (0..256u16).map(|i| i * 257).collect();
            obj.put(DataElement::new(
                data,
                VR::OW,
                PrimitiveValue::U16(lut.into()),
            ));
        }
    }
    // Words with bits set above Bits Stored: they must survive.
    if s.bits_allocated == 16 {
        let words: Vec<u16> = (0..samples)
            .map(|i| (i as u16).wrapping_mul(40_503) | 0xF000)
            .collect();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(words.into()),
        ));
    } else {
        let bytes: Vec<u8> = (0..samples).map(|i| (i * 7 + 3) as u8).collect();
        obj.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::U8(bytes.into()),
        ));
    }
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(s.ts)
                .source_application_entity_title("SCANNER1"),
        )
        .unwrap();
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

fn open(bytes: &[u8]) -> Result<dicom_object::DefaultDicomObject, String> {
    OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .map_err(|e| e.to_string())
}

/// Values every identifying attribute of a data set holds (any depth).
fn identifying_values(obj: &InMemDicomObject, out: &mut BTreeSet<(Tag, String)>) {
    for elem in obj.iter() {
        if let Some(items) = elem.items() {
            for item in items {
                identifying_values(item, out);
            }
            continue;
        }
        if elem.tag() == tags::PIXEL_DATA || !is_identifying(elem.tag()) {
            continue;
        }
        if let Ok(v) = elem.to_str() {
            let v = v.trim_end_matches(['\0', ' ']).to_string();
            if !v.is_empty() {
                out.insert((elem.tag(), v));
            }
        }
    }
}

const DUMMIES: [&str; 6] = [
    "ANONYMIZED",
    "19000101",
    "19000101000000",
    "000000",
    "0",
    "000Y",
];

/// The whole contract on one file: byte-identical join (also through the
/// serialized parts) and a de-identified file that re-parses and keeps no
/// identifying value.
fn check_file(name: &str, bytes: &[u8]) -> Result<&'static str, DicomError> {
    let parts = split(bytes, &Limits::default(), &profile())?;
    let joined = join(&parts.container, &parts.identifying, &parts.pixels).unwrap();
    assert!(joined == bytes, "{name}: join is not byte-identical");
    let container = tessera_dicom::Container::from_bytes(&parts.container.to_bytes()).unwrap();
    assert_eq!(container, parts.container, "{name}");
    assert!(join(&container, &parts.identifying, &parts.pixels).unwrap() == bytes);

    let original = open(bytes).unwrap();
    let researcher = write_deidentified(&parts.deidentified, &parts.pixels).unwrap();
    let deid = open(&researcher)
        .unwrap_or_else(|e| panic!("{name}: de-identified file does not parse: {e}"));
    // The researcher's file shows the same pixels (its attributes describe
    // the pixel data as written, e.g. interleaved after a planar original).
    if let Pixels::Native(image) = &parts.pixels {
        let again = split(&researcher, &Limits::default(), &profile())
            .unwrap_or_else(|e| panic!("{name}: de-identified file does not split: {e}"));
        assert!(
            again.pixels == Pixels::Native(image.clone()),
            "{name}: the researcher's pixels differ from the original"
        );
    }
    let mut before = BTreeSet::new();
    identifying_values(&original, &mut before);
    let mut after = BTreeSet::new();
    identifying_values(&deid, &mut after);
    let leaked: Vec<_> = before
        .intersection(&after)
        .filter(|(_, v)| !DUMMIES.contains(&v.as_str()))
        .collect();
    assert!(
        leaked.is_empty(),
        "{name}: identifying values survive: {leaked:?}"
    );
    assert!(
        deid.iter().all(|e| e.tag().group() % 2 == 0),
        "{name}: private tag left"
    );
    assert_eq!(
        deid.element(tags::PATIENT_IDENTITY_REMOVED)
            .unwrap()
            .to_str()
            .unwrap(),
        "YES"
    );
    assert!(deid.element(tags::DEIDENTIFICATION_METHOD).is_ok());
    assert!(
        deid.element(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
            .is_ok()
    );
    assert_ne!(
        deid.meta().media_storage_sop_instance_uid(),
        original.meta().media_storage_sop_instance_uid(),
        "{name}"
    );
    assert!(deid.element(tags::PIXEL_DATA).is_ok(), "{name}: no pixels");
    Ok(match parts.pixels {
        Pixels::Native(_) => "native",
        Pixels::Encapsulated(_) => "encapsulated",
        Pixels::Opaque { .. } => "opaque",
    })
}

#[test]
fn synthetic_files_of_every_layout_round_trip() {
    let mut cases = Vec::new();
    for ts in [EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE] {
        cases.push(Spec {
            ts,
            ..Spec::gray16()
        });
        cases.push(Spec {
            ts,
            bits_allocated: 8,
            bits_stored: 8,
            ..Spec::gray16()
        });
        cases.push(Spec {
            ts,
            signed: true,
            bits_stored: 16,
            frames: 3,
            ..Spec::gray16()
        });
        cases.push(Spec {
            ts,
            spp: 3,
            photometric: "RGB",
            bits_allocated: 8,
            bits_stored: 8,
            ..Spec::gray16()
        });
        cases.push(Spec {
            ts,
            spp: 3,
            planar: true,
            frames: 2,
            photometric: "RGB",
            bits_allocated: 8,
            bits_stored: 8,
            ..Spec::gray16()
        });
        cases.push(Spec {
            ts,
            spp: 3,
            planar: true,
            photometric: "RGB",
            ..Spec::gray16()
        });
        cases.push(Spec {
            ts,
            photometric: "PALETTE COLOR",
            bits_allocated: 8,
            bits_stored: 8,
            ..Spec::gray16()
        });
    }
    for (i, spec) in cases.iter().enumerate() {
        let bytes = make_file(spec);
        let name = format!(
            "case {i} ({}, {} bit, spp {})",
            spec.ts, spec.bits_allocated, spec.spp
        );
        assert_eq!(check_file(&name, &bytes), Ok("native"), "{name}");
        let parts = split(&bytes, &Limits::default(), &profile()).unwrap();
        let Pixels::Native(image) = &parts.pixels else {
            panic!("{name}: not native")
        };
        assert_eq!(image.frames(), spec.frames);
        assert_eq!(image.channels() as u16, spec.spp);
        assert_eq!(image.format().signed, spec.signed);
        if spec.bits_allocated == 16 {
            assert!(
                image.samples().iter().all(|w| w & 0xF000 == 0xF000),
                "{name}: high bits lost"
            );
        }
        // The identifying part holds the identity; the container does not.
        for needle in [
            &b"Doe^Jane"[..],
            b"PID-0042",
            b"St Elsewhere",
            b"Nested^Name",
            b"SCANNER1",
            b"ACME",
        ] {
            assert!(
                find(&parts.identifying, needle),
                "{name}: {needle:?} not in identifying"
            );
            assert!(
                !find(&parts.container.to_bytes(), needle),
                "{name}: {needle:?} left in container"
            );
            assert!(
                !find(&parts.deidentified, needle),
                "{name}: {needle:?} in de-identified"
            );
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn uids_map_consistently_across_a_study() {
    let a = split(&make_file(&Spec::gray16()), &Limits::default(), &profile()).unwrap();
    let b = split(
        &make_file(&Spec {
            frames: 2,
            ..Spec::gray16()
        }),
        &Limits::default(),
        &profile(),
    )
    .unwrap();
    let uid = |d: &[u8]| {
        open(d)
            .unwrap()
            .element(tags::STUDY_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap()
            .into_owned()
    };
    assert_eq!(uid(&a.deidentified), uid(&b.deidentified));
    assert_ne!(uid(&a.deidentified), "1.2.826.0.1.3680043.2.1125.1");
}

#[test]
fn retain_longitudinal_full_dates_keeps_the_study_date() {
    let bytes = make_file(&Spec::gray16());
    let p = Profile {
        temporal: Temporal::RetainFull,
        uids: UidMap::new(b"k"),
    };
    let parts = split(&bytes, &Limits::default(), &p).unwrap();
    let obj = open(&parts.deidentified).unwrap();
    assert_eq!(
        obj.element(tags::STUDY_DATE).unwrap().to_str().unwrap(),
        "20240228"
    );
    assert_eq!(
        obj.element(tags::PATIENT_NAME).unwrap().to_str().unwrap(),
        ""
    );
}

/// Offset of the first occurrence of a tag's header in an explicit VR LE file.
fn tag_offset(bytes: &[u8], tag: Tag) -> usize {
    let mut pat = tag.group().to_le_bytes().to_vec();
    pat.extend_from_slice(&tag.element().to_le_bytes());
    bytes.windows(4).position(|w| w == pat.as_slice()).unwrap()
}

#[test]
fn bad_input_gets_typed_errors() {
    let good = make_file(&Spec::gray16());
    let limits = Limits::default();

    assert!(matches!(
        split(b"not dicom", &limits, &profile()),
        Err(DicomError::NotPart10(_))
    ));
    assert!(matches!(
        split(
            &good,
            &Limits {
                max_file_bytes: 100,
                ..limits
            },
            &profile()
        ),
        Err(DicomError::TooLarge { .. })
    ));

    // Lying length: Patient ID (LO, 2-byte length) claims more than is left;
    // then Pixel Data (OW, 4-byte length) claims 4 GiB.
    let mut lying = good.clone();
    let at = tag_offset(&lying[132..], tags::PATIENT_ID) + 132;
    lying[at + 6..at + 8].copy_from_slice(&0xFFF0u16.to_le_bytes());
    assert!(split(&lying, &limits, &profile()).is_err());
    let mut lying = good.clone();
    let at = good.len() - 5 * 7 * 2 - 12;
    assert_eq!(&lying[at..at + 4], &[0xE0, 0x7F, 0x10, 0x00]);
    lying[at + 8..at + 12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    assert!(
        matches!(
            split(&lying, &limits, &profile()),
            Err(DicomError::LyingLength { .. })
        ),
        "{:?}",
        split(&lying, &limits, &profile()).err()
    );

    // Huge Rows x Columns x frames.
    let huge = make_file_small(
        &Spec {
            rows: 65_535,
            columns: 65_535,
            ..Spec::gray16()
        },
        40_000,
    );
    assert!(matches!(
        split(&huge, &limits, &profile()),
        Err(DicomError::TooManySamples { .. })
    ));

    // Pixel data shorter than the attributes say.
    let short = make_file_small(
        &Spec {
            rows: 300,
            columns: 300,
            ..Spec::gray16()
        },
        1,
    );
    assert!(matches!(
        split(&short, &limits, &profile()),
        Err(DicomError::PixelDataTooShort { .. })
    ));

    // Missing pixel data.
    let mut obj = open(&good).unwrap();
    obj.remove_element(tags::PIXEL_DATA);
    let mut missing = Vec::new();
    obj.write_all(&mut missing).unwrap();
    assert_eq!(
        split(&missing, &limits, &profile()).unwrap_err(),
        DicomError::MissingPixelData
    );

    // Unknown transfer syntax (same length as the real one, so the meta
    // group stays well formed).
    let mut unknown = good.clone();
    let at = unknown
        .windows(EXPLICIT_LE.len())
        .position(|w| w == EXPLICIT_LE.as_bytes())
        .unwrap();
    unknown[at..at + EXPLICIT_LE.len()].copy_from_slice(b"1.2.3.4.5.6.7.8.9.1");
    assert_eq!(
        split(&unknown, &limits, &profile()).unwrap_err(),
        DicomError::UnknownTransferSyntax("1.2.3.4.5.6.7.8.9.1".into())
    );

    // Truncation anywhere: an error, never a panic.
    for cut in (0..good.len()).step_by(7) {
        assert!(
            split(&good[..cut], &limits, &profile()).is_err(),
            "cut at {cut}"
        );
    }

    // Mismatched parts are refused by join.
    let parts = split(&good, &limits, &profile()).unwrap();
    let other = split(
        &make_file(&Spec {
            bits_stored: 16,
            ..Spec::gray16()
        }),
        &limits,
        &profile(),
    )
    .unwrap();
    assert!(join(&parts.container, &parts.identifying, &other.pixels).is_err());
    assert!(
        join(&parts.container, &other.identifying, &parts.pixels).is_err()
            || other.identifying == parts.identifying
    );
    assert!(join(&parts.container, b"garbage", &parts.pixels).is_err());
}

/// A 2x2 file whose Rows, Columns and Number of Frames then claim more.
fn make_file_small(s: &Spec, frames: u32) -> Vec<u8> {
    let bytes = make_file(&Spec {
        rows: 2,
        columns: 2,
        ts: s.ts,
        ..Spec::gray16()
    });
    let mut obj = open(&bytes).unwrap();
    obj.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(s.rows),
    ));
    obj.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(s.columns),
    ));
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from(frames.to_string()),
    ));
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Truncating a real small file or flipping its bytes never panics, and
    /// whatever is accepted still joins back byte-identically.
    #[test]
    fn damaged_files_never_panic(cut in 0usize..2000, flips in proptest::collection::vec((0usize..2000, any::<u8>()), 0..6)) {
        let mut bytes = small_real_file();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        bytes.truncate(bytes.len().saturating_sub(cut % 64 * (cut / 64 % 2)));
        if let Ok(parts) = split(&bytes, &Limits::default(), &profile()) {
            prop_assert!(join(&parts.container, &parts.identifying, &parts.pixels).unwrap() == bytes);
            let _ = write_deidentified(&parts.deidentified, &parts.pixels);
        }
    }
}

/// A small real pydicom-data file (SC_rgb.dcm).
fn small_real_file() -> Vec<u8> {
    static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let p = data_dir().join("SC_rgb.dcm");
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    })
    .clone()
}

fn data_dir() -> PathBuf {
    tessera_dicom::testdata::pydicom_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/DICOM.md");
const START: &str = "<!-- refused-files:start (generated by the pydicom_data_files test with TESSERA_DICOM_BLESS=1) -->";
const END: &str = "<!-- refused-files:end -->";

/// Every file of pydicom-data: readable ones split and join byte-identical,
/// the others are refused, and the refusals match docs/DICOM.md.
#[test]
fn pydicom_data_files() {
    let dir = data_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "dcm"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 60,
        "expected the pydicom-data files in {}",
        dir.display()
    );
    let mut refused = Vec::new();
    let mut kinds = std::collections::BTreeMap::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        let readable = open(&bytes).is_ok();
        match check_file(&name, &bytes) {
            Ok(kind) => *kinds.entry(kind).or_insert(0) += 1,
            Err(e) => {
                let why = if readable {
                    "dicom-object reads it, tessera refuses"
                } else {
                    "dicom-object cannot read it"
                };
                refused.push(format!("- `{name}` ({why}): {e}"));
            }
        }
    }
    println!(
        "pydicom-data: accepted {kinds:?}, {} refused",
        refused.len()
    );
    let listed = refused.join("\n");
    let doc = std::fs::read_to_string(DOC).unwrap_or_default();
    if std::env::var_os("TESSERA_DICOM_BLESS").is_some() {
        let (head, tail) = match (doc.find(START), doc.find(END)) {
            (Some(s), Some(e)) => (doc[..s].to_string(), doc[e + END.len()..].to_string()),
            _ => (doc.clone(), String::from("\n")),
        };
        std::fs::write(DOC, format!("{head}{START}\n{listed}\n{END}{tail}")).unwrap();
        return;
    }
    let committed = match (doc.find(START), doc.find(END)) {
        (Some(s), Some(e)) => doc[s + START.len()..e].trim().to_string(),
        _ => panic!("docs/DICOM.md has no refused-files section"),
    };
    assert_eq!(
        committed, listed,
        "the refused pydicom-data files changed; if intended, regenerate with TESSERA_DICOM_BLESS=1"
    );
}
