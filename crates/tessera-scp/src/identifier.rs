//! Query/Retrieve identifiers: read (every length checked against the
//! bytes that remain before dicom-object allocates anything) and written
//! in the presentation context's transfer syntax.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::header::Header;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{StandardDataDictionary, tags};
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::query::QueryKey;

/// Sequences nested deeper than this are refused.
const MAX_DEPTH: usize = 8;

/// Walks a Little Endian data set (implicit or explicit VR), checking that
/// every declared length fits in what remains; Big Endian is refused.
fn check_lengths(bytes: &[u8], explicit: bool) -> Result<(), String> {
    walk(bytes, explicit, 0, false).map(|_| ())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|x| u16::from_le_bytes([x[0], x[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

/// Walks elements (or, in a sequence, items) from the start of `b`; stops
/// at the end, or after a delimiter when `delimited`. Returns the bytes used.
fn walk(b: &[u8], explicit: bool, depth: usize, delimited: bool) -> Result<usize, String> {
    if depth > MAX_DEPTH {
        return Err("sequences nested too deep".into());
    }
    let short = || "truncated element header".to_string();
    let mut pos = 0;
    while pos < b.len() {
        let group = u16_at(b, pos).ok_or_else(short)?;
        let element = u16_at(b, pos + 2).ok_or_else(short)?;
        if group == 0xFFFE {
            let len = u32_at(b, pos + 4).ok_or_else(short)?;
            pos += 8;
            match element {
                // Item: its data set, defined or delimited.
                0xE000 if len == u32::MAX => pos += walk(&b[pos..], explicit, depth + 1, true)?,
                0xE000 => {
                    let end = pos
                        .checked_add(len as usize)
                        .filter(|e| *e <= b.len())
                        .ok_or("item length past the end")?;
                    walk(&b[pos..end], explicit, depth + 1, false)?;
                    pos = end;
                }
                // Item or sequence delimiter.
                0xE00D | 0xE0DD if delimited => return Ok(pos),
                _ => return Err("unexpected delimiter".into()),
            }
            continue;
        }
        let tag = Tag(group, element);
        let (sq, len, header) = if explicit {
            let vr = b.get(pos + 4..pos + 6).ok_or_else(short)?;
            let long = matches!(
                vr,
                b"OB"
                    | b"OD"
                    | b"OF"
                    | b"OL"
                    | b"OV"
                    | b"OW"
                    | b"SQ"
                    | b"SV"
                    | b"UC"
                    | b"UN"
                    | b"UR"
                    | b"UT"
                    | b"UV"
            );
            if long {
                (vr == b"SQ", u32_at(b, pos + 8).ok_or_else(short)?, 12)
            } else {
                (false, u32::from(u16_at(b, pos + 6).ok_or_else(short)?), 8)
            }
        } else {
            let sq = StandardDataDictionary
                .by_tag(tag)
                .is_some_and(|e| e.vr().exact() == Some(VR::SQ));
            (sq, u32_at(b, pos + 4).ok_or_else(short)?, 8)
        };
        pos += header;
        if len == u32::MAX {
            // A sequence (or UN) of undefined length: items to a delimiter.
            pos += walk(&b[pos..], explicit, depth + 1, true)?;
            continue;
        }
        let end = pos
            .checked_add(len as usize)
            .filter(|e| *e <= b.len())
            .ok_or_else(|| format!("element {tag} declares {len} bytes past the end"))?;
        if sq {
            walk(&b[pos..end], explicit, depth + 1, false)?;
        }
        pos = end;
    }
    if delimited {
        return Err("missing delimiter".into());
    }
    Ok(pos)
}

/// The identifier: its level, its keys and their VRs (for the answers).
#[derive(Debug)]
pub(crate) struct Identifier {
    pub(crate) level: String,
    pub(crate) keys: Vec<QueryKey>,
    pub(crate) vrs: Vec<((u16, u16), VR)>,
}

pub(crate) fn read_identifier(bytes: &[u8], ts: &str) -> Result<Identifier, String> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| format!("transfer syntax {ts} unknown"))?;
    if ts.endianness() != dicom_encoding::transfer_syntax::Endianness::Little
        || matches!(
            ts.codec(),
            dicom_encoding::transfer_syntax::Codec::Dataset(_)
        )
    {
        return Err(
            "identifiers are read in Little Endian, not deflated, transfer syntaxes only".into(),
        );
    }
    let explicit = ts.uid().trim_end_matches('\0') != "1.2.840.10008.1.2";
    check_lengths(bytes, explicit)?;
    let obj = InMemDicomObject::read_dataset_with_ts(bytes, ts)
        .map_err(|e| format!("unreadable identifier: {e}"))?;
    let mut level = String::new();
    let mut keys = Vec::new();
    let mut vrs = Vec::new();
    for elem in obj.iter() {
        let tag = elem.tag();
        let value = if elem.vr() == VR::SQ {
            String::new()
        } else {
            elem.to_str()
                .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_string())
                .unwrap_or_default()
        };
        if tag == tags::QUERY_RETRIEVE_LEVEL {
            level = value.to_ascii_uppercase();
        } else if tag != tags::SPECIFIC_CHARACTER_SET && tag.group() != 0x0000 {
            vrs.push(((tag.group(), tag.element()), elem.vr()));
            keys.push(QueryKey {
                tag: (tag.group(), tag.element()),
                value,
            });
        }
    }
    Ok(Identifier { level, keys, vrs })
}

fn vr_for(tag: (u16, u16), vrs: &[((u16, u16), VR)]) -> VR {
    vrs.iter()
        .find(|(t, _)| *t == tag)
        .map(|(_, vr)| *vr)
        .or_else(|| {
            StandardDataDictionary
                .by_tag(Tag(tag.0, tag.1))
                .and_then(|e| e.vr().exact())
        })
        .unwrap_or(VR::LO)
}

pub(crate) fn encode_identifier(
    level: &str,
    values: &[QueryKey],
    vrs: &[((u16, u16), VR)],
    ts: &str,
) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| format!("transfer syntax {ts} unknown"))?;
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from(level),
    ));
    for k in values {
        let vr = vr_for(k.tag, vrs);
        let value = if vr == VR::SQ || k.value.is_empty() {
            PrimitiveValue::Empty
        } else if k.value.contains('\\') {
            PrimitiveValue::Strs(k.value.split('\\').map(str::to_owned).collect())
        } else {
            PrimitiveValue::from(k.value.as_str())
        };
        let vr = if vr == VR::SQ { VR::UN } else { vr };
        obj.put(DataElement::new(Tag(k.tag.0, k.tag.1), vr, value));
    }
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| format!("cannot encode an identifier: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

    #[test]
    fn identifiers_round_trip() {
        let ts = IMPLICIT_VR_LITTLE_ENDIAN.uid();
        let keys = vec![
            QueryKey {
                tag: (0x0010, 0x0010),
                value: "DOE^*".into(),
            },
            QueryKey {
                tag: (0x0020, 0x000D),
                value: String::new(),
            },
            QueryKey {
                tag: (0x0008, 0x0061),
                value: "CT\\MR".into(),
            },
        ];
        let bytes = encode_identifier("STUDY", &keys, &[], ts).unwrap();
        let id = read_identifier(&bytes, ts).unwrap();
        assert_eq!(id.level, "STUDY");
        assert_eq!(id.keys.len(), 3);
        assert_eq!(id.keys[0].value, "CT\\MR");
        assert!(
            id.keys
                .iter()
                .any(|k| k.tag == (0x0010, 0x0010) && k.value == "DOE^*")
        );
        assert!(read_identifier(&[1, 2, 3], ts).is_err());
        // A length far past the end is refused before anything is allocated.
        let mut lying = vec![0x10, 0x00, 0x10, 0x00];
        lying.extend_from_slice(&0xFFFF_FFF0_u32.to_le_bytes());
        assert!(
            read_identifier(&lying, ts)
                .unwrap_err()
                .contains("past the end")
        );
        let explicit = dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.uid();
        let bytes = encode_identifier("SERIES", &keys, &[], explicit).unwrap();
        assert_eq!(read_identifier(&bytes, explicit).unwrap().keys.len(), 3);
        assert!(read_identifier(&bytes, "1.2.3.4").is_err());
    }
}
