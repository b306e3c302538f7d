//! DIMSE command sets (PS3.7 section 9.3 and annex E) and the Part 10 file
//! header, encoded and decoded with dicom-object.

use dicom_core::dictionary::{UidDictionary, UidType};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{StandardSopClassDictionary, tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;

use crate::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

/// Command Field values (PS3.7 table E.1-1).
pub(crate) const C_STORE_RQ: u16 = 0x0001;
pub(crate) const C_STORE_RSP: u16 = 0x8001;
pub(crate) const C_ECHO_RQ: u16 = 0x0030;
pub(crate) const C_ECHO_RSP: u16 = 0x8030;
pub(crate) const C_CANCEL_RQ: u16 = 0x0FFF;

/// Command Data Set Type value meaning "no data set follows".
const NO_DATA_SET: u16 = 0x0101;
/// Command Data Set Type sent when a data set follows (any other value
/// than 0x0101 means the same).
const DATA_SET_PRESENT: u16 = 0x0000;

/// Statuses (PS3.7 annex C, PS3.4 table B.2-1).
pub(crate) const STATUS_SUCCESS: u16 = 0x0000;
pub(crate) const STATUS_SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
pub(crate) const STATUS_UNRECOGNIZED_OPERATION: u16 = 0x0211;
pub(crate) const STATUS_OUT_OF_RESOURCES: u16 = 0xA700;
pub(crate) const STATUS_CANNOT_UNDERSTAND: u16 = 0xC000;

/// A command set is a few hundred bytes; anything larger is refused before
/// dicom-object sees it.
pub(crate) const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// The fields of a request command set that this SCP uses.
#[derive(Debug)]
pub(crate) struct Command {
    pub field: u16,
    pub message_id: u16,
    pub sop_class: Option<String>,
    pub sop_instance: Option<String>,
    pub has_data_set: bool,
    /// Move Destination (0000,0600) of a C-MOVE-RQ.
    pub move_destination: Option<String>,
}

/// Decode a command set (always Implicit VR Little Endian).
///
/// Every element header is checked against the bytes that remain before
/// dicom-object reads the set, because its decoder reserves a value's
/// declared length up front.
pub(crate) fn parse_command(bytes: &[u8]) -> Result<Command, String> {
    let obj = read_command_set(bytes)?;
    let u16_of = |tag, name: &str| u16_of(&obj, tag, name);
    let str_of = |tag| str_of(&obj, tag);
    let field = u16_of(tags::COMMAND_FIELD, "Command Field")?;
    let message_id = u16_of(tags::MESSAGE_ID, "Message ID")?;
    let data_set_type = u16_of(tags::COMMAND_DATA_SET_TYPE, "Command Data Set Type")?;
    Ok(Command {
        field,
        message_id,
        sop_class: str_of(tags::AFFECTED_SOP_CLASS_UID),
        sop_instance: str_of(tags::AFFECTED_SOP_INSTANCE_UID),
        has_data_set: data_set_type != NO_DATA_SET,
        move_destination: str_of(tags::MOVE_DESTINATION),
    })
}

fn u16_of(obj: &InMemDicomObject, tag: Tag, name: &str) -> Result<u16, String> {
    obj.get(tag)
        .ok_or_else(|| format!("no {name}"))?
        .uint16()
        .map_err(|e| format!("{name}: {e}"))
}

fn str_of(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim_start().to_string())
}

/// Decode a command set (Implicit VR Little Endian, group 0000 only, at
/// most [`MAX_COMMAND_BYTES`]), checking every element header against the
/// bytes that remain first.
fn read_command_set(bytes: &[u8]) -> Result<InMemDicomObject, String> {
    if bytes.len() > MAX_COMMAND_BYTES {
        return Err(format!("command set of {} bytes", bytes.len()));
    }
    let mut rest = bytes;
    while !rest.is_empty() {
        let (Some(head), Some(len)) = (rest.get(..8), rest.get(4..8)) else {
            return Err("truncated command element header".into());
        };
        let group = u16::from_le_bytes([head[0], head[1]]);
        if group != 0x0000 {
            return Err(format!("element of group {group:04X} in a command set"));
        }
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        rest = rest
            .get(8..)
            .and_then(|r| r.get(len..))
            .ok_or_else(|| format!("command element declares {len} bytes past the end"))?;
    }
    let ts = IMPLICIT_VR_LITTLE_ENDIAN.erased();
    InMemDicomObject::read_dataset_with_ts(bytes, &ts)
        .map_err(|e| format!("unreadable command set: {e}"))
}

/// The fields of a response command set that the SCU uses.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ParsedResponse {
    pub field: u16,
    pub message_id: u16,
    pub status: u16,
    pub sop_instance: Option<String>,
    pub comment: Option<String>,
}

/// Decode a response command set (as checked as [`parse_command`]).
pub(crate) fn parse_response(bytes: &[u8]) -> Result<ParsedResponse, String> {
    let obj = read_command_set(bytes)?;
    Ok(ParsedResponse {
        field: u16_of(&obj, tags::COMMAND_FIELD, "Command Field")?,
        message_id: u16_of(
            &obj,
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            "Message ID Being Responded To",
        )?,
        status: u16_of(&obj, tags::STATUS, "Status")?,
        sop_instance: str_of(&obj, tags::AFFECTED_SOP_INSTANCE_UID).filter(|s| !s.is_empty()),
        comment: str_of(&obj, tags::ERROR_COMMENT)
            .map(|s| s.trim_end().to_string())
            .filter(|s| !s.is_empty()),
    })
}

/// Encode a command set as Implicit VR Little Endian with its Command
/// Group Length.
pub(crate) fn encode_command(
    elements: Vec<DataElement<InMemDicomObject>>,
) -> Result<Vec<u8>, String> {
    let obj = InMemDicomObject::command_from_element_iter(elements);
    let mut out = Vec::with_capacity(256);
    obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .map_err(|e| format!("cannot encode a command set: {e}"))?;
    Ok(out)
}

/// A C-STORE-RQ command set (medium priority, a data set follows).
pub(crate) fn store_request(
    message_id: u16,
    sop_class: &str,
    sop_instance: &str,
) -> Result<Vec<u8>, String> {
    encode_command(vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(C_STORE_RQ),
        ),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0_u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(DATA_SET_PRESENT),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
    ])
}

/// A C-ECHO-RQ command set.
pub(crate) fn echo_request(message_id: u16) -> Result<Vec<u8>, String> {
    encode_command(vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::VERIFICATION),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(C_ECHO_RQ)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(NO_DATA_SET),
        ),
    ])
}

/// A response command set.
pub(crate) struct Response<'a> {
    pub field: u16,
    pub message_id: u16,
    pub sop_class: Option<&'a str>,
    pub sop_instance: Option<&'a str>,
    pub status: u16,
    pub comment: Option<&'a str>,
}

impl Response<'_> {
    /// Encode as Implicit VR Little Endian with its Command Group Length.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, String> {
        let mut elements = Vec::with_capacity(7);
        if let Some(uid) = self.sop_class {
            elements.push(DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from(uid),
            ));
        }
        elements.push(DataElement::new(
            tags::COMMAND_FIELD,
            VR::US,
            PrimitiveValue::from(self.field),
        ));
        elements.push(DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            PrimitiveValue::from(self.message_id),
        ));
        elements.push(DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(NO_DATA_SET),
        ));
        elements.push(DataElement::new(
            tags::STATUS,
            VR::US,
            PrimitiveValue::from(self.status),
        ));
        if let Some(comment) = self.comment {
            elements.push(DataElement::new(
                tags::ERROR_COMMENT,
                VR::LO,
                PrimitiveValue::from(error_comment(comment)),
            ));
        }
        if let Some(uid) = self.sop_instance {
            elements.push(DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from(uid),
            ));
        }
        encode_command(elements)
    }
}

/// Error Comment is LO: at most 64 characters of the default repertoire,
/// no backslash.
pub(crate) fn error_comment(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '\\' || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(64)
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// A syntactically valid UID: 1 to 64 characters of digits and dots.
pub(crate) fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !uid.starts_with('.')
        && !uid.ends_with('.')
        && !uid.contains("..")
}

/// Whether the standard dictionary knows `uid` as a storage SOP class.
///
/// A storage SOP class is a SOP class whose keyword ends in `Storage`
/// (CT Image Storage, Enhanced SR Storage, Encapsulated PDF Storage, ...),
/// except Media Storage Directory Storage (DICOMDIR, media only).
pub(crate) fn is_standard_storage_sop_class(uid: &str) -> bool {
    uid != uids::MEDIA_STORAGE_DIRECTORY_STORAGE
        && StandardSopClassDictionary
            .by_uid(uid)
            .is_some_and(|e| e.r#type == UidType::SopClass && e.alias.ends_with("Storage"))
}

/// The Part 10 header: 128-byte preamble, `DICM` and the file meta group
/// (Explicit VR Little Endian), ready for the data set bytes to follow.
pub(crate) fn file_header(
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
    calling_ae: &str,
) -> Result<Vec<u8>, String> {
    let meta = FileMetaTableBuilder::new()
        .information_version([0, 1])
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(transfer_syntax)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
        .source_application_entity_title(calling_ae)
        .build()
        .map_err(|e| format!("cannot build the file meta group: {e}"))?;
    let mut out = Vec::with_capacity(512);
    out.resize(128, 0);
    out.extend_from_slice(b"DICM");
    meta.write(&mut out)
        .map_err(|e| format!("cannot write the file meta group: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(elements: Vec<DataElement<InMemDicomObject>>) -> Vec<u8> {
        let obj = InMemDicomObject::command_from_element_iter(elements);
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
            .unwrap();
        out
    }

    #[test]
    fn parses_a_store_request() {
        let bytes = command(vec![
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
            ),
            DataElement::new(
                tags::COMMAND_FIELD,
                VR::US,
                PrimitiveValue::from(C_STORE_RQ),
            ),
            DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(7_u16)),
            DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0_u16)),
            DataElement::new(
                tags::COMMAND_DATA_SET_TYPE,
                VR::US,
                PrimitiveValue::from(0x0000_u16),
            ),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4"),
            ),
        ]);
        let c = parse_command(&bytes).unwrap();
        assert_eq!(c.field, C_STORE_RQ);
        assert_eq!(c.message_id, 7);
        assert_eq!(c.sop_class.as_deref(), Some("1.2.840.10008.5.1.4.1.1.2"));
        assert_eq!(c.sop_instance.as_deref(), Some("1.2.3.4"));
        assert!(c.has_data_set);
    }

    #[test]
    fn refuses_bad_command_sets() {
        // A length far past the end must be refused before any allocation.
        let mut bytes = vec![0x00, 0x00, 0x00, 0x01];
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(parse_command(&bytes).is_err());
        // Truncated header.
        assert!(parse_command(&[0, 0, 0]).is_err());
        // Element outside group 0000.
        let mut bytes = vec![0x08, 0x00, 0x18, 0x00, 2, 0, 0, 0, b'1', 0];
        assert!(parse_command(&bytes).is_err());
        // Missing Command Field.
        bytes = command(vec![DataElement::new(
            tags::MESSAGE_ID,
            VR::US,
            PrimitiveValue::from(1_u16),
        )]);
        assert!(parse_command(&bytes).is_err());
        assert!(parse_command(&vec![0; MAX_COMMAND_BYTES + 2]).is_err());
    }

    #[test]
    fn response_round_trips_with_group_length() {
        let bytes = Response {
            field: C_STORE_RSP,
            message_id: 3,
            sop_class: Some("1.2.840.10008.5.1.4.1.1.2"),
            sop_instance: Some("1.2.345"),
            status: 0xA900,
            comment: Some(
                "bad\\thing\u{e9} and a very long explanation that goes on past sixty-four chars",
            ),
        }
        .encode()
        .unwrap();
        let ts = IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let obj = InMemDicomObject::read_dataset_with_ts(&bytes[..], &ts).unwrap();
        let group_length = obj
            .get(tags::COMMAND_GROUP_LENGTH)
            .unwrap()
            .uint32()
            .unwrap();
        assert_eq!(group_length as usize, bytes.len() - 12);
        assert_eq!(obj.get(tags::STATUS).unwrap().uint16().unwrap(), 0xA900);
        let comment = obj.get(tags::ERROR_COMMENT).unwrap().to_str().unwrap();
        assert!(comment.len() <= 64 && !comment.contains('\\'), "{comment}");
        assert_eq!(
            obj.get(tags::AFFECTED_SOP_INSTANCE_UID)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches('\0'),
            "1.2.345"
        );
        assert_eq!(bytes.len() % 2, 0);
    }

    #[test]
    fn requests_round_trip() {
        let c =
            parse_command(&store_request(9, uids::CT_IMAGE_STORAGE, "1.2.345").unwrap()).unwrap();
        assert_eq!(c.field, C_STORE_RQ);
        assert_eq!(c.message_id, 9);
        assert_eq!(c.sop_class.as_deref(), Some(uids::CT_IMAGE_STORAGE));
        assert_eq!(c.sop_instance.as_deref(), Some("1.2.345"));
        assert!(c.has_data_set);
        let c = parse_command(&echo_request(10).unwrap()).unwrap();
        assert_eq!(c.field, C_ECHO_RQ);
        assert_eq!(c.message_id, 10);
        assert_eq!(c.sop_class.as_deref(), Some(uids::VERIFICATION));
        assert!(!c.has_data_set);
    }

    #[test]
    fn responses_parse() {
        let bytes = Response {
            field: C_STORE_RSP,
            message_id: 4,
            sop_class: Some(uids::CT_IMAGE_STORAGE),
            sop_instance: Some("1.2.345"),
            status: 0xA700,
            comment: Some("too big"),
        }
        .encode()
        .unwrap();
        assert_eq!(
            parse_response(&bytes).unwrap(),
            ParsedResponse {
                field: C_STORE_RSP,
                message_id: 4,
                status: 0xA700,
                sop_instance: Some("1.2.345".into()),
                comment: Some("too big".into()),
            }
        );
        let bytes = Response {
            field: C_ECHO_RSP,
            message_id: 1,
            sop_class: None,
            sop_instance: None,
            status: 0,
            comment: None,
        }
        .encode()
        .unwrap();
        let r = parse_response(&bytes).unwrap();
        assert_eq!(
            (r.field, r.status, r.sop_instance, r.comment),
            (C_ECHO_RSP, 0, None, None)
        );
        // A request is not a response (no Message ID Being Responded To,
        // no Status), and the length checks apply.
        assert!(parse_response(&echo_request(1).unwrap()).is_err());
        let mut lying = vec![0x00, 0x00, 0x00, 0x09];
        lying.extend_from_slice(&0xFFFF_FF00_u32.to_le_bytes());
        assert!(parse_response(&lying).is_err());
    }

    #[test]
    fn storage_classes() {
        assert!(is_standard_storage_sop_class(uids::CT_IMAGE_STORAGE));
        assert!(is_standard_storage_sop_class(
            uids::ENCAPSULATED_PDF_STORAGE
        ));
        assert!(is_standard_storage_sop_class(uids::BASIC_TEXT_SR_STORAGE));
        assert!(!is_standard_storage_sop_class(uids::VERIFICATION));
        assert!(!is_standard_storage_sop_class(
            uids::STORAGE_COMMITMENT_PUSH_MODEL
        ));
        assert!(!is_standard_storage_sop_class(
            uids::MEDIA_STORAGE_DIRECTORY_STORAGE
        ));
        assert!(!is_standard_storage_sop_class(
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND
        ));
        assert!(!is_standard_storage_sop_class("1.2.3.4"));
    }

    #[test]
    fn uids() {
        assert!(is_valid_uid("1.2.840.10008.5.1.4.1.1.2"));
        for bad in ["", "1..2", ".1", "1.", "1.2a", "../etc", &"1".repeat(65)] {
            assert!(!is_valid_uid(bad), "{bad}");
        }
    }

    #[test]
    fn header_is_a_part10_prefix() {
        let h = file_header(
            "1.2.840.10008.5.1.4.1.1.2",
            "1.2.3",
            "1.2.840.10008.1.2.1",
            "MOD",
        )
        .unwrap();
        assert_eq!(&h[128..132], b"DICM");
        let meta = dicom_object::meta::FileMetaTable::from_reader(&h[128..]).unwrap();
        assert_eq!(meta.transfer_syntax(), "1.2.840.10008.1.2.1");
        assert_eq!(
            meta.implementation_version_name(),
            Some(IMPLEMENTATION_VERSION_NAME)
        );
        assert_eq!(meta.source_application_entity_title(), Some("MOD"));
        assert_eq!(h.len(), 132 + 12 + meta.information_group_length as usize);
    }
}
