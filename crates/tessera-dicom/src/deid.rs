//! The Basic Application Level Confidentiality Profile (PS3.15 Annex E) on a
//! dicom-rs object, with the Retain Longitudinal Temporal Information options.

use dicom_core::header::Header;
use dicom_core::smallvec::smallvec;
use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use ring::hmac;

use crate::table::{Basic, OptionAction, Row, TABLE};

/// The Retain Longitudinal Temporal Information options of PS3.15 E.3.6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Temporal {
    /// Basic Profile: dates and times removed or replaced.
    Remove,
    /// Retain Longitudinal Temporal Information With Full Dates Option.
    RetainFull,
    /// Retain Longitudinal Temporal Information With Modified Dates Option:
    /// every date moves by the same number of days (times are kept), so
    /// intervals within the study survive.
    RetainModified { shift_days: i32 },
}

/// A keyed, deterministic UID replacement: HMAC-SHA256(key, uid) read as a
/// 128-bit number under the `2.25` root (PS3.5 B.2). With one key per study
/// the same UID maps to the same new UID in every instance of the study, and
/// without the key the mapping can be neither inverted nor recomputed.
#[derive(Clone)]
pub struct UidMap {
    key: hmac::Key,
}

impl UidMap {
    /// `secret`: a per-study key from the caller (at least 16 bytes advised).
    pub fn new(secret: &[u8]) -> UidMap {
        UidMap {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    pub fn map(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches(['\0', ' ']);
        let tag = hmac::sign(&self.key, uid.as_bytes());
        let mut n = [0u8; 16];
        n.copy_from_slice(&tag.as_ref()[..16]);
        format!("2.25.{}", u128::from_be_bytes(n))
    }
}

impl std::fmt::Debug for UidMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UidMap(..)")
    }
}

/// How to de-identify.
#[derive(Clone, Debug)]
pub struct Profile {
    pub temporal: Temporal,
    pub uids: UidMap,
}

/// What one attribute gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Keep,
    Remove,
    Zero,
    Dummy,
    Uid,
    ShiftDate,
    Recurse,
}

fn act(row: &Row, temporal: Temporal) -> Act {
    let option = match temporal {
        Temporal::Remove => OptionAction::Basic,
        Temporal::RetainFull => row.full_dates,
        Temporal::RetainModified { .. } => row.modified_dates,
    };
    match option {
        OptionAction::K => return Act::Keep,
        OptionAction::C => return Act::ShiftDate,
        OptionAction::Basic => {}
    }
    // Where the table leaves a choice "for IOD conformance", take the one
    // that keeps the attribute present (Z over X, D over X and Z): without
    // per-IOD type tables this keeps Type 1 and 2 attributes conformant.
    match row.basic {
        Basic::X => Act::Remove,
        Basic::Z | Basic::XZ => Act::Zero,
        Basic::D | Basic::XD | Basic::XZD | Basic::ZD => Act::Dummy,
        Basic::U => Act::Uid,
        Basic::XZUStar => Act::Recurse,
    }
}

/// Dummy values (the D action) by VR; all valid for their VR.
pub const DUMMY_TEXT: &str = "ANONYMIZED";
pub const DUMMY_DATE: &str = "19000101";

fn dummy(vr: VR, uids: &UidMap, old: &str) -> PrimitiveValue {
    match vr {
        VR::AE | VR::CS | VR::LO | VR::LT | VR::PN | VR::SH | VR::ST | VR::UC | VR::UT | VR::UR => {
            PrimitiveValue::from(DUMMY_TEXT)
        }
        VR::AS => PrimitiveValue::from("000Y"),
        VR::DA => PrimitiveValue::from(DUMMY_DATE),
        VR::DT => PrimitiveValue::from("19000101000000"),
        VR::TM => PrimitiveValue::from("000000"),
        VR::DS | VR::IS => PrimitiveValue::from("0"),
        VR::UI => PrimitiveValue::from(map_uids(uids, old)),
        VR::FL | VR::OF => PrimitiveValue::F32(smallvec![0.0]),
        VR::FD | VR::OD => PrimitiveValue::F64(smallvec![0.0]),
        VR::SS => PrimitiveValue::I16(smallvec![0]),
        VR::US | VR::OW => PrimitiveValue::U16(smallvec![0]),
        VR::SL => PrimitiveValue::I32(smallvec![0]),
        VR::UL | VR::OL => PrimitiveValue::U32(smallvec![0]),
        VR::SV => PrimitiveValue::I64(smallvec![0]),
        VR::UV | VR::OV => PrimitiveValue::U64(smallvec![0]),
        VR::AT => PrimitiveValue::Tags(smallvec![Tag(0, 0)]),
        VR::OB | VR::UN | VR::SQ => PrimitiveValue::U8([0, 0].into()),
    }
}

fn map_uids(uids: &UidMap, value: &str) -> String {
    value
        .trim_end_matches(['\0', ' '])
        .split('\\')
        .map(|u| {
            if u.trim().is_empty() {
                String::new()
            } else {
                uids.map(u.trim())
            }
        })
        .collect::<Vec<_>>()
        .join("\\")
}

/// Shifts a YYYYMMDD prefix by `days`; `None` if it is not a valid date.
/// A day past the end of its month counts on into the next (20230231 is
/// 20230303), and results outside the years 0000..=9999 are not dates.
fn shift_date(value: &str, days: i32) -> Option<String> {
    let date = value.get(..8)?;
    if !date.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i32 = date[..4].parse().ok()?;
    let m: u8 = date[4..6].parse().ok()?;
    let d: i64 = date[6..8].parse().ok()?;
    if !(1..=31).contains(&d) {
        return None;
    }
    let month = time::Month::try_from(m).ok()?;
    let first = time::Date::from_calendar_date(y, month, 1).ok()?;
    let shifted = first.checked_add(time::Duration::days(d - 1 + i64::from(days)))?;
    if !(0..=9999).contains(&shifted.year()) {
        return None;
    }
    Some(format!(
        "{:04}{:02}{:02}{}",
        shifted.year(),
        u8::from(shifted.month()),
        shifted.day(),
        &value[8..]
    ))
}

/// The text of an element; for VR UN (explicit VR files with unknown VRs)
/// the raw bytes, so a UID stored as UN maps like the same UID stored as UI.
fn text(elem: &DataElement<InMemDicomObject>) -> String {
    if elem.vr() == VR::UN
        && let Ok(bytes) = elem.to_bytes()
    {
        return String::from_utf8_lossy(&bytes)
            .trim_end_matches(['\0', ' '])
            .to_string();
    }
    elem.to_str().map(|s| s.into_owned()).unwrap_or_default()
}

/// Applies the profile to every element at every depth, in place.
pub fn deidentify(obj: &mut InMemDicomObject, profile: &Profile) {
    apply(obj, profile, true);
    let (method, codes, longitudinal) = match profile.temporal {
        Temporal::Remove => (vec![], vec![], "REMOVED"),
        Temporal::RetainFull => (
            vec!["Retain Longitudinal Temporal Information Full Dates Option"],
            vec![(
                "113106",
                "Retain Longitudinal Temporal Information Full Dates Option",
            )],
            "UNMODIFIED",
        ),
        Temporal::RetainModified { .. } => (
            vec!["Retain Longitudinal Temporal Information Modified Dates Option"],
            vec![(
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            )],
            "MODIFIED",
        ),
    };
    let mut methods = vec!["Basic Application Confidentiality Profile".to_string()];
    methods.extend(method.iter().map(|s| s.to_string()));
    let mut code_items = vec![code_item(
        "113100",
        "Basic Application Confidentiality Profile",
    )];
    code_items.extend(codes.iter().map(|(v, m)| code_item(v, m)));
    obj.put(DataElement::new(
        tags::PATIENT_IDENTITY_REMOVED,
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    obj.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        PrimitiveValue::Strs(methods.into()),
    ));
    obj.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        DataSetSequence::new(code_items, Length::UNDEFINED),
    ));
    obj.put(DataElement::new(
        tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        VR::CS,
        PrimitiveValue::from(longitudinal),
    ));
}

fn code_item(value: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from(value)),
        DataElement::new(
            tags::CODING_SCHEME_DESIGNATOR,
            VR::SH,
            PrimitiveValue::from("DCM"),
        ),
        DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from(meaning)),
    ])
}

fn apply(obj: &mut InMemDicomObject, profile: &Profile, top: bool) {
    let tags: Vec<Tag> = obj.tags().collect();
    for tag in tags {
        // Private attributes go (Table E.1-1 last row); group lengths go
        // because the edits make them stale (they are retired in data sets);
        // nothing may follow the Pixel Data that the writer appends.
        if tag.group() % 2 == 1 || tag.element() == 0 || (top && tag >= tags::PIXEL_DATA) {
            obj.remove_element(tag);
            continue;
        }
        let Some(elem) = obj.take(tag) else { continue };
        let vr = elem.vr();
        let new = match TABLE.get(tag).map(|row| act(row, profile.temporal)) {
            None | Some(Act::Recurse) => Some(recurse(elem, profile)),
            Some(Act::Keep) => Some(elem),
            Some(Act::Remove) => None,
            Some(Act::Zero) => Some(if vr == VR::SQ {
                DataElement::new(
                    tag,
                    vr,
                    DataSetSequence::new(Vec::<InMemDicomObject>::new(), Length::UNDEFINED),
                )
            } else {
                DataElement::new(tag, vr, PrimitiveValue::Empty)
            }),
            Some(Act::Dummy) => Some(if vr == VR::SQ {
                DataElement::new(
                    tag,
                    vr,
                    DataSetSequence::new(vec![InMemDicomObject::new_empty()], Length::UNDEFINED),
                )
            } else {
                let old = text(&elem);
                DataElement::new(tag, vr, dummy(vr, &profile.uids, &old))
            }),
            Some(Act::Uid) => {
                if vr == VR::SQ {
                    Some(recurse(elem, profile))
                } else {
                    let old = text(&elem);
                    let vr = if vr == VR::UN { VR::UI } else { vr };
                    Some(DataElement::new(
                        tag,
                        vr,
                        PrimitiveValue::from(map_uids(&profile.uids, &old)),
                    ))
                }
            }
            Some(Act::ShiftDate) => match (vr, profile.temporal) {
                (VR::DA | VR::DT, Temporal::RetainModified { shift_days }) => {
                    let old = text(&elem);
                    let shifted: Option<Vec<String>> = old
                        .trim_end_matches(['\0', ' '])
                        .split('\\')
                        .map(|v| shift_date(v.trim(), shift_days))
                        .collect();
                    Some(match shifted {
                        Some(values) => {
                            DataElement::new(tag, vr, PrimitiveValue::Strs(values.into()))
                        }
                        None => DataElement::new(tag, vr, PrimitiveValue::Empty),
                    })
                }
                // Whole-day shifts leave times of day as they were.
                (VR::TM, _) => Some(elem),
                _ => None,
            },
        };
        if let Some(new) = new {
            obj.put(new);
        }
    }
}

/// Keeps an element, de-identifying the items of a sequence.
fn recurse(
    elem: DataElement<InMemDicomObject>,
    profile: &Profile,
) -> DataElement<InMemDicomObject> {
    let tag = elem.tag();
    let vr = elem.vr();
    match elem.into_value() {
        Value::Sequence(seq) => {
            let length = seq.length();
            let mut items = seq.into_items();
            for item in items.iter_mut() {
                apply(item, profile, false);
            }
            DataElement::new(
                tag,
                vr,
                DataSetSequence::new(items, length_after_edit(length)),
            )
        }
        other @ (Value::Primitive(_) | Value::PixelSequence(_)) => DataElement::new(tag, vr, other),
    }
}

/// Items change size, so an explicit sequence length would be stale.
fn length_after_edit(_: Length) -> Length {
    Length::UNDEFINED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_map_is_keyed_deterministic_and_valid() {
        let a = UidMap::new(b"study key one, 32 bytes long....");
        let b = UidMap::new(b"study key two, 32 bytes long....");
        let uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320";
        assert_eq!(a.map(uid), a.map(uid));
        assert_eq!(
            a.map(uid),
            a.map("1.2.840.113619.2.55.3.604688119.969.1268071029.320\0")
        );
        assert_ne!(a.map(uid), b.map(uid));
        let m = a.map(uid);
        assert!(m.starts_with("2.25.") && m.len() <= 64, "{m}");
        assert!(m[5..].bytes().all(|c| c.is_ascii_digit()) && !m[5..].starts_with('0'));
    }

    #[test]
    fn dates_shift_across_months_years_and_leap_days() {
        assert_eq!(shift_date("20240228", 1).unwrap(), "20240229");
        assert_eq!(shift_date("20240229", 1).unwrap(), "20240301");
        assert_eq!(shift_date("20231231", 1).unwrap(), "20240101");
        assert_eq!(shift_date("20000101", -1).unwrap(), "19991231");
        assert_eq!(
            shift_date("20200315093000.5", -365).unwrap(),
            "20190316093000.5"
        );
        assert!(shift_date("2020", 3).is_none());
        assert!(shift_date("20201340", 3).is_none());
        // Pinned edge cases (outputs of the hand-written arithmetic this
        // function had before it used the `time` crate):
        // a day past the month's end rolls over, as the day count did;
        assert_eq!(shift_date("20230231", 0).unwrap(), "20230303");
        assert_eq!(shift_date("19000229", 0).unwrap(), "19000301");
        assert_eq!(shift_date("20240431", 1).unwrap(), "20240502");
        // year 0 exists (proleptic Gregorian, a leap year); results outside
        // 0000..=9999 are not dates;
        assert_eq!(shift_date("00000229", 0).unwrap(), "00000229");
        assert_eq!(shift_date("00000101", 0).unwrap(), "00000101");
        assert!(shift_date("00000101", -1).is_none());
        assert_eq!(shift_date("99991231", 0).unwrap(), "99991231");
        assert!(shift_date("99991231", 1).is_none());
        assert!(shift_date("20200101", i32::MAX).is_none());
        assert!(shift_date("20200101", i32::MIN).is_none());
        assert_eq!(shift_date("20200101", 2_000_000).unwrap(), "74951025");
        assert_eq!(shift_date("20200101", -700_000).unwrap(), "01030620");
        // month or day 00, non-digits, a sign: not dates; the rest of a DT
        // value is kept as it was.
        assert!(shift_date("20200001", 1).is_none());
        assert!(shift_date("20200100", 1).is_none());
        assert!(shift_date("2020-1-1", 1).is_none());
        assert!(shift_date("+0200101", 1).is_none());
        assert_eq!(
            shift_date("20201231235959+0100", 1).unwrap(),
            "20210101235959+0100"
        );
        for days in [-100_000, -1, 0, 1, 59, 365, 100_000] {
            let there = shift_date("19700101", days).unwrap();
            assert_eq!(shift_date(&there, -days).unwrap(), "19700101", "{days}");
        }
    }

    fn sample() -> InMemDicomObject {
        InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^Jane")),
            DataElement::new(tags::PATIENT_ID, VR::LO, PrimitiveValue::from("12345")),
            DataElement::new(tags::STUDY_DATE, VR::DA, PrimitiveValue::from("20240228")),
            DataElement::new(tags::STUDY_TIME, VR::TM, PrimitiveValue::from("101500")),
            DataElement::new(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ),
            DataElement::new(
                tags::INSTITUTION_NAME,
                VR::LO,
                PrimitiveValue::from("General"),
            ),
            DataElement::new(tags::MODALITY, VR::CS, PrimitiveValue::from("CT")),
            DataElement::new(Tag(0x0009, 0x0010), VR::LO, PrimitiveValue::from("ACME")),
            DataElement::new(
                tags::REFERENCED_IMAGE_SEQUENCE,
                VR::SQ,
                DataSetSequence::new(
                    vec![InMemDicomObject::from_element_iter([
                        DataElement::new(
                            tags::REFERENCED_SOP_INSTANCE_UID,
                            VR::UI,
                            PrimitiveValue::from("1.2.3.4"),
                        ),
                        DataElement::new(
                            tags::PATIENT_NAME,
                            VR::PN,
                            PrimitiveValue::from("Doe^Jane"),
                        ),
                    ])],
                    Length::UNDEFINED,
                ),
            ),
        ])
    }

    fn s(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
        obj.get(tag).map(|e| e.to_str().unwrap().into_owned())
    }

    #[test]
    fn basic_profile_actions_apply_at_every_depth() {
        let uids = UidMap::new(b"k");
        let mut obj = sample();
        deidentify(
            &mut obj,
            &Profile {
                temporal: Temporal::Remove,
                uids: uids.clone(),
            },
        );
        assert_eq!(s(&obj, tags::PATIENT_NAME).unwrap(), "");
        // Z/D and X/Z/D take the dummy value (see `act`).
        assert_eq!(s(&obj, tags::PATIENT_ID).unwrap(), DUMMY_TEXT);
        assert_eq!(s(&obj, tags::STUDY_DATE).unwrap(), "");
        assert_eq!(s(&obj, tags::INSTITUTION_NAME).unwrap(), DUMMY_TEXT);
        assert!(obj.get(tags::STUDY_TIME).is_some());
        assert_eq!(s(&obj, tags::MODALITY).unwrap(), "CT");
        assert!(obj.get(Tag(0x0009, 0x0010)).is_none());
        let new_uid = uids.map("1.2.3.4");
        assert_eq!(s(&obj, tags::STUDY_INSTANCE_UID).unwrap(), new_uid);
        let seq = obj.get(tags::REFERENCED_IMAGE_SEQUENCE).unwrap();
        let item = &seq.items().unwrap()[0];
        assert_eq!(s(item, tags::REFERENCED_SOP_INSTANCE_UID).unwrap(), new_uid);
        assert_eq!(s(item, tags::PATIENT_NAME).unwrap(), "");
        assert_eq!(s(&obj, tags::PATIENT_IDENTITY_REMOVED).unwrap(), "YES");
        assert_eq!(
            s(&obj, tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED).unwrap(),
            "REMOVED"
        );
        let codes = obj
            .get(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
            .unwrap();
        assert_eq!(
            s(&codes.items().unwrap()[0], tags::CODE_VALUE).unwrap(),
            "113100"
        );
    }

    #[test]
    fn temporal_options_keep_or_shift_dates() {
        let mut full = sample();
        deidentify(
            &mut full,
            &Profile {
                temporal: Temporal::RetainFull,
                uids: UidMap::new(b"k"),
            },
        );
        assert_eq!(s(&full, tags::STUDY_DATE).unwrap(), "20240228");
        assert_eq!(s(&full, tags::STUDY_TIME).unwrap(), "101500");
        assert_eq!(s(&full, tags::PATIENT_NAME).unwrap(), "");
        let mut modified = sample();
        deidentify(
            &mut modified,
            &Profile {
                temporal: Temporal::RetainModified { shift_days: 2 },
                uids: UidMap::new(b"k"),
            },
        );
        assert_eq!(s(&modified, tags::STUDY_DATE).unwrap(), "20240301");
        assert_eq!(s(&modified, tags::STUDY_TIME).unwrap(), "101500");
        assert_eq!(
            s(&modified, tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED).unwrap(),
            "MODIFIED"
        );
        let codes = modified
            .get(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
            .unwrap();
        assert_eq!(
            s(&codes.items().unwrap()[1], tags::CODE_VALUE).unwrap(),
            "113107"
        );
    }
}
