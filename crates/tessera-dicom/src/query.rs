//! The attributes the gateway's query index keeps of each instance, their
//! de-identified view, and C-FIND attribute matching (PS3.4 C.2.2.2).
//!
//! Pure: the gateway stores [`indexed_values`] (read at store time, in the
//! clear only inside its sealed vault records), computes a researcher's
//! view with [`deidentified_values`] (the same profile as the files a
//! researcher retrieves) and matches keys with [`matches`].

/// The value representation the matching rules depend on.
pub use dicom_core::VR;
use dicom_core::{DataElement, PrimitiveValue, Tag};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::deid::{Profile, deidentify};

/// The Query/Retrieve level an attribute belongs to (Study Root).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Study level (patient attributes included, as in Study Root).
    Study,
    Series,
    Image,
}

/// (group, element): a tag without dicom-rs types in the API.
pub type TagPair = (u16, u16);

/// Every attribute the index keeps: tag, VR, level.
pub const INDEXED: [(Tag, VR, Level); 19] = [
    (tags::PATIENT_NAME, VR::PN, Level::Study),
    (tags::PATIENT_ID, VR::LO, Level::Study),
    (tags::PATIENT_BIRTH_DATE, VR::DA, Level::Study),
    (tags::PATIENT_SEX, VR::CS, Level::Study),
    (tags::STUDY_INSTANCE_UID, VR::UI, Level::Study),
    (tags::STUDY_DATE, VR::DA, Level::Study),
    (tags::STUDY_TIME, VR::TM, Level::Study),
    (tags::ACCESSION_NUMBER, VR::SH, Level::Study),
    (tags::STUDY_ID, VR::SH, Level::Study),
    (tags::STUDY_DESCRIPTION, VR::LO, Level::Study),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN, Level::Study),
    (tags::SERIES_INSTANCE_UID, VR::UI, Level::Series),
    (tags::MODALITY, VR::CS, Level::Series),
    (tags::SERIES_NUMBER, VR::IS, Level::Series),
    (tags::SERIES_DESCRIPTION, VR::LO, Level::Series),
    (tags::SERIES_DATE, VR::DA, Level::Series),
    (tags::SOP_INSTANCE_UID, VR::UI, Level::Image),
    (tags::SOP_CLASS_UID, VR::UI, Level::Image),
    (tags::INSTANCE_NUMBER, VR::IS, Level::Image),
];

/// Longest value kept per attribute.
const VALUE_MAX: usize = 256;

fn pair(t: Tag) -> TagPair {
    (t.group(), t.element())
}

/// The VR and level of an indexed attribute.
pub fn indexed(tag: TagPair) -> Option<(VR, Level)> {
    INDEXED
        .iter()
        .find(|(t, _, _)| pair(*t) == tag)
        .map(|(_, vr, level)| (*vr, *level))
}

/// The indexed attributes present in a data set (trimmed text, multiple
/// values joined by `\`).
pub fn indexed_values(obj: &InMemDicomObject) -> Vec<(TagPair, String)> {
    INDEXED
        .iter()
        .filter_map(|(tag, _, _)| {
            let v = obj.get(*tag)?.to_str().ok()?;
            let v: String = v
                .trim_end_matches(['\0', ' '])
                .trim_start()
                .chars()
                .take(VALUE_MAX)
                .collect();
            Some((pair(*tag), v))
        })
        .collect()
}

/// What a de-identified copy made with `profile` holds of `values`: the
/// same Basic Profile actions as the files (UIDs mapped, names and IDs
/// emptied or dummied, dates removed or shifted); attributes it removes
/// are absent.
pub fn deidentified_values(
    values: &[(TagPair, String)],
    profile: &Profile,
) -> Vec<(TagPair, String)> {
    let mut obj = InMemDicomObject::new_empty();
    for ((g, e), v) in values {
        let Some((vr, _)) = indexed((*g, *e)) else {
            continue;
        };
        obj.put(DataElement::new(
            Tag(*g, *e),
            vr,
            PrimitiveValue::from(v.as_str()),
        ));
    }
    deidentify(&mut obj, profile);
    indexed_values(&obj)
}

/// Whether `value` (an attribute of VR `vr`, `\`-separated when multi-
/// valued) matches the C-FIND key `key` (PS3.4 C.2.2.2): an empty key or
/// `*` matches anything; UI keys are lists of UIDs; DA/TM/DT keys may be
/// ranges (`a-b`, `a-`, `-b`); `*` and `?` are wildcards in other text
/// VRs; person names match case-insensitively; otherwise a value must equal
/// the key. A multi-valued attribute matches when one of its values does.
pub fn matches(vr: VR, key: &str, value: &str) -> bool {
    let key = key.trim_end_matches(['\0', ' ']).trim_start();
    if key.is_empty() || key == "*" {
        return true;
    }
    let values = value.trim_end_matches(['\0', ' ']).split('\\');
    match vr {
        VR::UI => {
            let value = value.trim_end_matches(['\0', ' ']);
            key.split('\\').any(|k| k.trim() == value)
        }
        VR::DA | VR::TM | VR::DT => {
            let norm = |s: &str| s.trim().replace([':', '.'], "");
            values
                .map(norm)
                .any(|v| !v.is_empty() && in_range(vr, key, &v))
        }
        VR::PN => values.into_iter().any(|v| {
            glob(
                key.to_ascii_uppercase().as_bytes(),
                v.trim().to_ascii_uppercase().as_bytes(),
            )
        }),
        VR::AE
        | VR::AS
        | VR::AT
        | VR::CS
        | VR::DS
        | VR::FD
        | VR::FL
        | VR::IS
        | VR::LO
        | VR::LT
        | VR::OB
        | VR::OD
        | VR::OF
        | VR::OL
        | VR::OV
        | VR::OW
        | VR::SH
        | VR::SL
        | VR::SQ
        | VR::SS
        | VR::ST
        | VR::SV
        | VR::UC
        | VR::UL
        | VR::UN
        | VR::UR
        | VR::US
        | VR::UT
        | VR::UV => values
            .into_iter()
            .any(|v| glob(key.as_bytes(), v.trim().as_bytes())),
    }
}

/// A date/time key: single value, or a range with either end open.
fn in_range(vr: VR, key: &str, value: &str) -> bool {
    let norm = |s: &str| s.trim().replace([':', '.'], "");
    // Compare on the shorter precision so `20240101` matches a DT value
    // `20240101120000`, and a TM key `10` matches `103000`.
    let cmp = |a: &str, b: &str| {
        let n = a.len().min(b.len());
        a[..n].cmp(&b[..n])
    };
    match key.split_once('-') {
        // DT values may carry a UTC offset `-0500`: only DA and TM split.
        Some((lo, hi)) if vr != VR::DT || key.matches('-').count() == 1 => {
            let (lo, hi) = (norm(lo), norm(hi));
            (lo.is_empty() || cmp(value, &lo).is_ge()) && (hi.is_empty() || cmp(value, &hi).is_le())
        }
        Some(_) | None => cmp(value, &norm(key)).is_eq() && !norm(key).is_empty(),
    }
}

/// `*` (any run) and `?` (one character) wildcard match.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}
