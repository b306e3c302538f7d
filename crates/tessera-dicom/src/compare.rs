//! Is a file the same DICOM instance as another? Compares the data sets,
//! not the files: a C-STORE SCP writes its own file meta group (0002) and
//! an encoder may drop the trailing padding (FFFC,FFFC) or retired group
//! lengths (gggg,0000), none of which changes the instance. Every other
//! element, at any depth (sequence items too), must hold the same value,
//! and the Pixel Data value the same bytes as stored (what a retrieve
//! gives back), in the same transfer syntax.
//!
//! ```text
//! same_instance(stored, received) -> Ok(())                  the same instance
//!                                 -> Err([(0008,1030) StudyDescription: other value, ...])
//! ```

use std::collections::BTreeMap;
use std::fmt;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataDictionary, Tag};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_object::file::ReadPreamble;
use dicom_object::{InMemDicomObject, OpenFileOptions};

use crate::walk::{self, fmt_tag};
use crate::{DicomError, error_chain};

/// Data Set Trailing Padding.
const TRAILING_PADDING: Tag = Tag(0xFFFC, 0xFFFC);
/// Transfer Syntax UID, the one meta element that counts.
const TRANSFER_SYNTAX: Tag = Tag(0x0002, 0x0010);

/// How two data sets differ at one element (or why one is not a data set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    /// Present in both with other values (or, in a sequence, other items).
    Value { tag: Tag },
    /// Only in the first data set.
    OnlyInFirst { tag: Tag },
    /// Only in the second data set.
    OnlyInSecond { tag: Tag },
    /// Encoded in other transfer syntaxes (0002,0010): the values may
    /// match, the encodings do not.
    TransferSyntax { first: String, second: String },
    /// File `which` (1 or 2) is not a readable Part 10 file.
    Unreadable { which: u8, reason: String },
}

impl Difference {
    /// The element concerned (none for an unreadable file).
    pub fn tag(&self) -> Option<Tag> {
        match self {
            Difference::Value { tag }
            | Difference::OnlyInFirst { tag }
            | Difference::OnlyInSecond { tag } => Some(*tag),
            Difference::TransferSyntax { .. } => Some(TRANSFER_SYNTAX),
            Difference::Unreadable { .. } => None,
        }
    }
}

/// `(0008,1030) StudyDescription` (the tag alone when the dictionary does
/// not know it).
fn named(tag: Tag) -> String {
    match StandardDataDictionary.by_tag(tag) {
        Some(entry) => format!("{} {}", fmt_tag(tag), entry.alias),
        None => fmt_tag(tag),
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Value { tag } => write!(f, "{}: other value", named(*tag)),
            Difference::OnlyInFirst { tag } => write!(f, "{}: only in the first", named(*tag)),
            Difference::OnlyInSecond { tag } => {
                write!(f, "{}: only in the second", named(*tag))
            }
            Difference::TransferSyntax { first, second } => write!(
                f,
                "{}: {first} in the first, {second} in the second",
                named(TRANSFER_SYNTAX)
            ),
            Difference::Unreadable { which, reason } => {
                write!(f, "file {which} is not readable DICOM: {reason}")
            }
        }
    }
}

/// Whether `a` and `b` (complete Part 10 files) hold the same data set:
/// `Ok(())`, or every top-level element that differs, in tag order. Of
/// the file meta group (0002) only the transfer syntax counts (the same
/// values in another encoding are another file to give back); the trailing
/// padding (FFFC,FFFC) and group length elements (gggg,0000) are ignored; string values are compared
/// without their trailing padding (space or NUL). Every length is checked
/// before anything is allocated, as in [`crate::split`].
pub fn same_instance(a: &[u8], b: &[u8]) -> Result<(), Vec<Difference>> {
    let read = |bytes: &[u8], which: u8| {
        open(bytes).map_err(|e| {
            vec![Difference::Unreadable {
                which,
                reason: e.to_string(),
            }]
        })
    };
    let ((ts1, px1, first), (ts2, px2, second)) = (read(a, 1)?, read(b, 2)?);
    let mut differences = differences(&first, &second);
    // Pixel Data is also compared as stored (what a retrieve gives back):
    // an encapsulated value cut short of its delimiter parses alike.
    let pixel = |bytes: &[u8], r: Option<std::ops::Range<u64>>| {
        r.and_then(|r| {
            bytes
                .get(r.start as usize..r.end as usize)
                .map(<[u8]>::to_vec)
        })
    };
    if pixel(a, px1) != pixel(b, px2)
        && !differences
            .iter()
            .any(|d| d.tag() == Some(dicom_dictionary_std::tags::PIXEL_DATA))
    {
        differences.push(Difference::Value {
            tag: dicom_dictionary_std::tags::PIXEL_DATA,
        });
        differences.sort_by_key(Difference::tag);
    }
    if ts1 != ts2 {
        differences.insert(
            0,
            Difference::TransferSyntax {
                first: ts1,
                second: ts2,
            },
        );
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(differences)
    }
}

/// The transfer syntax, where the Pixel Data value sits and the data set
/// of a Part 10 file (its length fields checked first).
fn open(
    bytes: &[u8],
) -> Result<(String, Option<std::ops::Range<u64>>, InMemDicomObject), DicomError> {
    let layout = walk::walk(bytes)?;
    let file = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&bytes[layout.magic_at as usize..])
        .map_err(|e| DicomError::Unreadable(error_chain(&e)))?;
    let pixel = layout.pixel.map(|p| p.value);
    Ok((layout.transfer_syntax, pixel, file.into_inner()))
}

/// The elements that count: no group lengths, no trailing padding (the
/// file meta group is not part of the data set object).
fn elements(obj: &InMemDicomObject) -> BTreeMap<Tag, &dicom_object::mem::InMemElement> {
    obj.iter()
        .filter(|e| {
            let t = e.header().tag;
            t != TRAILING_PADDING && t.element() != 0 && t.group() != 0x0002
        })
        .map(|e| (e.header().tag, e))
        .collect()
}

fn differences(a: &InMemDicomObject, b: &InMemDicomObject) -> Vec<Difference> {
    let (ea, eb) = (elements(a), elements(b));
    let mut out = Vec::new();
    for (tag, x) in &ea {
        match eb.get(tag) {
            None => out.push(Difference::OnlyInFirst { tag: *tag }),
            Some(y) if !same_value(x.value(), y.value()) => {
                out.push(Difference::Value { tag: *tag });
            }
            Some(_) => {}
        }
    }
    for tag in eb.keys().filter(|t| !ea.contains_key(t)) {
        out.push(Difference::OnlyInSecond { tag: *tag });
    }
    out.sort_by_key(|d| d.tag());
    out
}

type ElementValue = Value<InMemDicomObject, dicom_object::mem::InMemFragment>;

fn same_value(a: &ElementValue, b: &ElementValue) -> bool {
    match (a, b) {
        (Value::Primitive(x), Value::Primitive(y)) => same_primitive(x, y),
        (Value::Sequence(x), Value::Sequence(y)) => {
            x.items().len() == y.items().len()
                && x.items()
                    .iter()
                    .zip(y.items())
                    .all(|(i, j)| differences(i, j).is_empty())
        }
        (Value::PixelSequence(x), Value::PixelSequence(y)) => {
            x.offset_table() == y.offset_table() && x.fragments() == y.fragments()
        }
        (Value::Primitive(_) | Value::Sequence(_) | Value::PixelSequence(_), _) => false,
    }
}

/// Equal values; strings also when they differ only in trailing padding.
fn same_primitive(a: &PrimitiveValue, b: &PrimitiveValue) -> bool {
    if a == b {
        return true;
    }
    let text = |v: &PrimitiveValue| match v {
        PrimitiveValue::Str(_) | PrimitiveValue::Strs(_) => Some(
            v.to_str()
                .trim_end_matches([' ', '\0'])
                .split('\\')
                .map(|s| s.trim_end_matches([' ', '\0']).to_owned())
                .collect::<Vec<_>>(),
        ),
        PrimitiveValue::Empty => Some(Vec::new()),
        PrimitiveValue::Tags(_)
        | PrimitiveValue::U8(_)
        | PrimitiveValue::I16(_)
        | PrimitiveValue::U16(_)
        | PrimitiveValue::I32(_)
        | PrimitiveValue::U32(_)
        | PrimitiveValue::I64(_)
        | PrimitiveValue::U64(_)
        | PrimitiveValue::F32(_)
        | PrimitiveValue::F64(_)
        | PrimitiveValue::Date(_)
        | PrimitiveValue::DateTime(_)
        | PrimitiveValue::Time(_) => None,
    };
    match (text(a), text(b)) {
        (Some(x), Some(y)) => {
            let clean = |v: Vec<String>| -> Vec<String> {
                if v.iter().all(String::is_empty) {
                    Vec::new()
                } else {
                    v
                }
            };
            clean(x) == clean(y)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_compare_without_their_padding() {
        let a = PrimitiveValue::from("ABC ");
        let b = PrimitiveValue::from("ABC");
        assert!(same_primitive(&a, &b));
        assert!(same_primitive(
            &PrimitiveValue::from("A\\B "),
            &PrimitiveValue::Strs(["A".to_owned(), "B".to_owned()].into_iter().collect())
        ));
        assert!(same_primitive(
            &PrimitiveValue::Empty,
            &PrimitiveValue::from(" ")
        ));
        assert!(!same_primitive(
            &PrimitiveValue::from("ABC"),
            &PrimitiveValue::from("ABD")
        ));
        assert!(!same_primitive(
            &PrimitiveValue::from(1u16),
            &PrimitiveValue::from(2u16)
        ));
    }

    #[test]
    fn differences_name_the_element() {
        let d = Difference::Value {
            tag: Tag(0x0008, 0x1030),
        };
        assert_eq!(d.to_string(), "(0008,1030) StudyDescription: other value");
        let d = Difference::OnlyInSecond {
            tag: Tag(0x0009, 0x1001),
        };
        assert_eq!(d.to_string(), "(0009,1001): only in the second");
    }
}
