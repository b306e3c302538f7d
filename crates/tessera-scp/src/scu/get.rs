//! C-GET service class user (Study Root, PS3.4 C.4.3): asks an SCP for a
//! study, series or instances and receives them as C-STORE
//! sub-operations on the same association, answering each one.
//!
//! The instances come back as Part 10 files built the way the SCP side
//! of this crate builds them (a file meta group written here, then the
//! data set bytes exactly as received), so a file sent with C-STORE and
//! fetched back with C-GET has the same data set bytes.

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
use dicom_ul::Pdu;
use dicom_ul::pdu::{PDataValue, PDataValueType};
use tracing::debug;

use super::{Link, ScuError, ScuOptions, associate_with_roles, bounded, ul_error, validate};
use crate::dimse::{self, MAX_COMMAND_BYTES, Response};
use crate::identifier::encode_identifier;
use crate::query::{C_GET_RQ, MAX_IDENTIFIER_BYTES, QueryKey, STATUS_PENDING};
use crate::{StoreOutcome, valid_ae_title};

/// Command Field of a C-GET-RSP.
const C_GET_RSP: u16 = 0x8010;
/// Pending with a warning (PS3.4 C.4.3.1.4): more responses follow.
const STATUS_PENDING_WARNING: u16 = 0xFF01;

/// What to retrieve and how to receive it.
#[derive(Debug, Clone)]
pub struct GetRequest {
    /// Query/Retrieve Level: `STUDY`, `SERIES` or `IMAGE`.
    pub level: String,
    /// The unique keys of the level and above (Study Instance UID, Series
    /// Instance UID, SOP Instance UID; several UIDs `\`-separated).
    pub keys: Vec<QueryKey>,
    /// (storage SOP class, transfer syntax) pairs proposed with the SCP
    /// role, one presentation context each. An SCP that never re-encodes
    /// (this crate's) can only send an instance in a pair listed here.
    pub storage_contexts: Vec<(String, String)>,
    /// Largest data set accepted; a larger sub-operation is read to its end
    /// without being kept and answered 0xA700 (counted as failed by the SCP).
    pub max_instance_bytes: u64,
}

/// One instance received by a C-STORE sub-operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retrieved {
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    /// The presentation context's transfer syntax (also in (0002,0010)).
    pub transfer_syntax: String,
    /// 128-byte preamble, `DICM`, a file meta group written here (with the
    /// SCP's AE title as Source AE), then the data set bytes exactly as
    /// received.
    pub file: Vec<u8>,
    /// Offset of the data set in `file`.
    pub dataset_offset: usize,
}

impl Retrieved {
    /// The data set bytes exactly as received.
    pub fn dataset(&self) -> &[u8] {
        self.file.get(self.dataset_offset..).unwrap_or_default()
    }
}

/// The final C-GET-RSP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetOutcome {
    /// 0x0000 success, 0xB000 some sub-operations failed, 0xA702 all
    /// failed, 0xFE00 cancelled, anything else a refusal (for instance
    /// 0x0124 not authorized, 0xA900 bad identifier, 0xC000...).
    pub status: u16,
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
    /// The final response's Error Comment, if any (why it was refused).
    pub error_comment: Option<String>,
    /// C-STORE sub-operations received (answered, kept or not).
    pub received: usize,
}

/// Sends a Study Root C-GET over a new association and hands every
/// instance of its C-STORE sub-operations to `on_instance`, whose
/// [`StoreOutcome`] is the C-STORE-RSP status; returns the final response.
///
/// The association proposes the Study Root GET model (Implicit VR LE) and
/// one context per [`GetRequest::storage_contexts`] pair with the SCP role.
/// A refusal (no grant, bad identifier...) is not an error: it is the
/// returned [`GetOutcome::status`] with its comment. Every PDU is bounded
/// by [`ScuOptions::timeout`]; the association is released at the end and
/// aborted after an error.
pub async fn get(
    addr: &str,
    opts: &ScuOptions,
    request: &GetRequest,
    mut on_instance: impl FnMut(Retrieved) -> StoreOutcome,
) -> Result<GetOutcome, ScuError> {
    validate(opts)?;
    if !["STUDY", "SERIES", "IMAGE"].contains(&request.level.as_str()) {
        return Err(ScuError::InvalidOptions(format!(
            "Query/Retrieve Level {:?}: STUDY, SERIES or IMAGE",
            request.level
        )));
    }
    if request.max_instance_bytes == 0 {
        return Err(ScuError::InvalidOptions("max_instance_bytes is 0".into()));
    }
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (class, ts) in &request.storage_contexts {
        if !dimse::is_valid_uid(class) || !dimse::is_valid_uid(ts) {
            return Err(ScuError::InvalidOptions(format!(
                "storage context ({class:?}, {ts:?}) is not a pair of UIDs"
            )));
        }
        if !pairs.contains(&(class.as_str(), ts.as_str())) {
            pairs.push((class.as_str(), ts.as_str()));
        }
    }
    if pairs.is_empty() {
        return Err(ScuError::InvalidOptions(
            "no storage context: the SCP could send nothing back".into(),
        ));
    }
    if pairs.len() + 1 > super::MAX_PRESENTATION_CONTEXTS {
        return Err(ScuError::TooManyContexts(pairs.len() + 1));
    }
    let model = uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET;
    let implicit = IMPLICIT_VR_LITTLE_ENDIAN.uid();
    let identifier = encode_identifier(&request.level, &request.keys, &[], implicit)
        .map_err(ScuError::InvalidOptions)?;
    let mut contexts = vec![(model, implicit)];
    contexts.extend(pairs.iter().copied());
    let mut roles: Vec<&str> = Vec::new();
    for (class, _) in &pairs {
        if !roles.contains(class) {
            roles.push(class);
        }
    }
    let mut link = associate_with_roles(addr, opts, &contexts, &roles).await?;
    let pc = match link.context_id(model, implicit) {
        Ok(pc) => pc,
        Err(e) => return link.abort(e).await,
    };
    let source_ae = if valid_ae_title(&opts.called_ae) {
        opts.called_ae.trim_matches(' ').to_string()
    } else {
        String::new()
    };
    let message_id = link.message_id();
    let exchange = async {
        let command = get_request(message_id).map_err(ScuError::Protocol)?;
        link.send_fragments(pc, PDataValueType::Command, &command)
            .await?;
        link.send_fragments(pc, PDataValueType::Data, &identifier)
            .await?;
        let mut receiver = Receiver {
            get_pc: pc,
            message_id,
            max_instance_bytes: request.max_instance_bytes,
            source_ae: &source_ae,
            received: 0,
        };
        receiver.run(&mut link, &mut on_instance).await
    };
    match exchange.await {
        Ok(outcome) => {
            link.release().await;
            Ok(outcome)
        }
        Err(e) => link.abort(e).await,
    }
}

/// A C-GET-RQ command set (medium priority, an identifier follows).
fn get_request(message_id: u16) -> Result<Vec<u8>, String> {
    let us = |t, v: u16| DataElement::new(t, VR::US, PrimitiveValue::from(v));
    dimse::encode_command(vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET),
        ),
        us(tags::COMMAND_FIELD, C_GET_RQ),
        us(tags::MESSAGE_ID, message_id),
        us(tags::PRIORITY, 0),
        us(tags::COMMAND_DATA_SET_TYPE, 0x0000),
    ])
}

/// Where the association is between PDVs.
enum Phase {
    Idle,
    Command {
        pc: u8,
        bytes: Vec<u8>,
    },
    /// A C-STORE-RQ's data set (kept while under the limit).
    Store {
        pc: u8,
        command: dimse::Command,
        file: Option<Vec<u8>>,
        dataset_offset: usize,
        received: u64,
    },
    /// The data set of a C-GET-RSP (a Failed SOP Instance UID List):
    /// read and dropped; `outcome` is returned after its last fragment.
    ResponseData {
        pc: u8,
        outcome: Option<GetOutcome>,
        received: u64,
    },
}

struct Receiver<'a> {
    get_pc: u8,
    message_id: u16,
    max_instance_bytes: u64,
    source_ae: &'a str,
    received: usize,
}

/// Completed/failed/warning counts of a C-GET-RSP whose command set
/// `parse_response` already checked, and whether a data set follows.
fn counts(bytes: &[u8]) -> (u16, u16, u16, bool) {
    let ts = IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let Ok(obj) = InMemDicomObject::read_dataset_with_ts(bytes, &ts) else {
        return (0, 0, 0, false);
    };
    let n = |t| obj.get(t).and_then(|e| e.uint16().ok()).unwrap_or_default();
    (
        n(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS),
        n(tags::NUMBER_OF_FAILED_SUBOPERATIONS),
        n(tags::NUMBER_OF_WARNING_SUBOPERATIONS),
        // 0x0101: no data set; any other value: one follows.
        obj.get(tags::COMMAND_DATA_SET_TYPE)
            .and_then(|e| e.uint16().ok())
            .is_some_and(|t| t != 0x0101),
    )
}

impl Link {
    /// The (abstract syntax, transfer syntax) of accepted context `pc`.
    fn context_uids(&self, pc: u8) -> Option<(String, String)> {
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|c| c.id == pc)
            .map(|c| (trim(&c.abstract_syntax), trim(&c.transfer_syntax)))
    }
}

impl Receiver<'_> {
    async fn run(
        &mut self,
        link: &mut Link,
        on_instance: &mut impl FnMut(Retrieved) -> StoreOutcome,
    ) -> Result<GetOutcome, ScuError> {
        let timeout = link.timeout;
        let doing = "a C-GET response or C-STORE sub-operation";
        let mut phase = Phase::Idle;
        loop {
            let pdu = bounded(timeout, doing, async {
                link.assoc
                    .receive()
                    .await
                    .map_err(|e| ul_error(e, timeout, doing))
            })
            .await?;
            let data = match pdu {
                Pdu::PData { data } => data,
                Pdu::AbortRQ { source } => {
                    return Err(ScuError::Protocol(format!(
                        "the SCP aborted the association ({source:?})"
                    )));
                }
                pdu @ (Pdu::ReleaseRQ
                | Pdu::AssociationRQ(_)
                | Pdu::AssociationAC(_)
                | Pdu::AssociationRJ(_)
                | Pdu::ReleaseRP
                | Pdu::Unknown { .. }) => {
                    return Err(ScuError::Protocol(format!(
                        "unexpected {} during a C-GET",
                        pdu.short_description()
                    )));
                }
            };
            for pdv in data {
                let (next, done) = self.on_pdv(link, phase, pdv, on_instance).await?;
                if let Some(outcome) = done {
                    return Ok(outcome);
                }
                phase = next;
            }
        }
    }

    async fn on_pdv(
        &mut self,
        link: &mut Link,
        phase: Phase,
        pdv: PDataValue,
        on_instance: &mut impl FnMut(Retrieved) -> StoreOutcome,
    ) -> Result<(Phase, Option<GetOutcome>), ScuError> {
        let PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data,
        } = pdv;
        let out_of_sequence =
            || ScuError::Protocol(format!("P-DATA fragment out of sequence (context {pc})"));
        match (value_type, phase) {
            (PDataValueType::Command, Phase::Idle) => {
                self.on_command(link, pc, Vec::new(), data, is_last).await
            }
            (PDataValueType::Command, Phase::Command { pc: p, bytes }) if p == pc => {
                self.on_command(link, pc, bytes, data, is_last).await
            }
            (
                PDataValueType::Data,
                Phase::Store {
                    pc: p,
                    command,
                    mut file,
                    dataset_offset,
                    received,
                },
            ) if p == pc => {
                let received = received.saturating_add(data.len() as u64);
                if received > self.max_instance_bytes {
                    file = None;
                } else if let Some(f) = file.as_mut() {
                    f.extend_from_slice(&data);
                }
                if !is_last {
                    let phase = Phase::Store {
                        pc,
                        command,
                        file,
                        dataset_offset,
                        received,
                    };
                    return Ok((phase, None));
                }
                self.on_instance(
                    link,
                    pc,
                    command,
                    file,
                    dataset_offset,
                    received,
                    on_instance,
                )
                .await?;
                Ok((Phase::Idle, None))
            }
            (
                PDataValueType::Data,
                Phase::ResponseData {
                    pc: p,
                    outcome,
                    received,
                },
            ) if p == pc => {
                let received = received.saturating_add(data.len() as u64);
                if received > MAX_IDENTIFIER_BYTES {
                    return Err(ScuError::Protocol(format!(
                        "C-GET-RSP data set over {MAX_IDENTIFIER_BYTES} bytes"
                    )));
                }
                if !is_last {
                    let phase = Phase::ResponseData {
                        pc,
                        outcome,
                        received,
                    };
                    return Ok((phase, None));
                }
                Ok((Phase::Idle, outcome))
            }
            (PDataValueType::Command | PDataValueType::Data, _) => Err(out_of_sequence()),
        }
    }

    /// A command fragment; on the last one, a C-STORE-RQ or a C-GET-RSP.
    async fn on_command(
        &mut self,
        link: &mut Link,
        pc: u8,
        mut bytes: Vec<u8>,
        data: Vec<u8>,
        is_last: bool,
    ) -> Result<(Phase, Option<GetOutcome>), ScuError> {
        if bytes.len() + data.len() > MAX_COMMAND_BYTES {
            return Err(ScuError::Protocol(format!(
                "command set over {MAX_COMMAND_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&data);
        if !is_last {
            return Ok((Phase::Command { pc, bytes }, None));
        }
        if pc == self.get_pc {
            let rsp = dimse::parse_response(&bytes)
                .map_err(|e| ScuError::Protocol(format!("malformed C-GET-RSP: {e}")))?;
            if rsp.field != C_GET_RSP || rsp.message_id != self.message_id {
                return Err(ScuError::Protocol(format!(
                    "response with Command Field {:#06X} to message {}, expected a C-GET-RSP to {}",
                    rsp.field, rsp.message_id, self.message_id
                )));
            }
            let (completed, failed, warning, has_data) = counts(&bytes);
            debug!(status = rsp.status, completed, failed, warning, "C-GET-RSP");
            let outcome = (![STATUS_PENDING, STATUS_PENDING_WARNING].contains(&rsp.status))
                .then_some(GetOutcome {
                    status: rsp.status,
                    completed,
                    failed,
                    warning,
                    error_comment: rsp.comment,
                    received: self.received,
                });
            if has_data {
                let phase = Phase::ResponseData {
                    pc,
                    outcome,
                    received: 0,
                };
                return Ok((phase, None));
            }
            return Ok((Phase::Idle, outcome));
        }
        let command = dimse::parse_command(&bytes)
            .map_err(|e| ScuError::Protocol(format!("malformed command: {e}")))?;
        if command.field != dimse::C_STORE_RQ {
            return Err(ScuError::Protocol(format!(
                "command {:#06X} on storage context {pc} during a C-GET",
                command.field
            )));
        }
        let Some((class, ts)) = link.context_uids(pc) else {
            return Err(ScuError::Protocol(format!(
                "C-STORE-RQ on presentation context {pc}, which was not accepted"
            )));
        };
        let sop_class = command.sop_class.clone().unwrap_or_default();
        let sop_instance = command.sop_instance.clone().unwrap_or_default();
        if !command.has_data_set || sop_class != class || !dimse::is_valid_uid(&sop_instance) {
            // Nothing to keep: answer at once (a data set, if announced,
            // would be a protocol error caught by the phase check).
            if command.has_data_set {
                return Err(ScuError::Protocol(format!(
                    "C-STORE-RQ for SOP class {sop_class:?} on the context of {class}"
                )));
            }
            self.answer(
                link,
                pc,
                &command,
                dimse::STATUS_CANNOT_UNDERSTAND,
                Some("C-STORE-RQ without a data set"),
            )
            .await?;
            return Ok((Phase::Idle, None));
        }
        let header = dimse::file_header(&sop_class, &sop_instance, &ts, self.source_ae)
            .map_err(ScuError::Protocol)?;
        let phase = Phase::Store {
            pc,
            command,
            dataset_offset: header.len(),
            file: Some(header),
            received: 0,
        };
        Ok((phase, None))
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_instance(
        &mut self,
        link: &mut Link,
        pc: u8,
        command: dimse::Command,
        file: Option<Vec<u8>>,
        dataset_offset: usize,
        received: u64,
        on_instance: &mut impl FnMut(Retrieved) -> StoreOutcome,
    ) -> Result<(), ScuError> {
        self.received += 1;
        let Some(file) = file else {
            let comment = format!(
                "data set of {received} bytes exceeds the limit of {}",
                self.max_instance_bytes
            );
            return self
                .answer(
                    link,
                    pc,
                    &command,
                    dimse::STATUS_OUT_OF_RESOURCES,
                    Some(&comment),
                )
                .await;
        };
        let ts = link.context_uids(pc).map(|(_, ts)| ts).unwrap_or_default();
        let instance = Retrieved {
            sop_class_uid: command.sop_class.clone().unwrap_or_default(),
            sop_instance_uid: command.sop_instance.clone().unwrap_or_default(),
            transfer_syntax: ts,
            file,
            dataset_offset,
        };
        match on_instance(instance) {
            StoreOutcome::Stored => {
                self.answer(link, pc, &command, dimse::STATUS_SUCCESS, None)
                    .await
            }
            StoreOutcome::Refused { status, reason } => {
                let status = if status == dimse::STATUS_SUCCESS {
                    dimse::STATUS_CANNOT_UNDERSTAND
                } else {
                    status
                };
                self.answer(link, pc, &command, status, Some(&reason)).await
            }
        }
    }

    async fn answer(
        &self,
        link: &mut Link,
        pc: u8,
        command: &dimse::Command,
        status: u16,
        comment: Option<&str>,
    ) -> Result<(), ScuError> {
        let bytes = Response {
            field: dimse::C_STORE_RSP,
            message_id: command.message_id,
            sop_class: command
                .sop_class
                .as_deref()
                .filter(|u| dimse::is_valid_uid(u)),
            sop_instance: command
                .sop_instance
                .as_deref()
                .filter(|u| dimse::is_valid_uid(u)),
            status,
            comment,
        }
        .encode()
        .map_err(ScuError::Protocol)?;
        link.send_fragments(pc, PDataValueType::Command, &bytes)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_request_is_a_c_get() {
        let bytes = get_request(7).unwrap();
        let c = dimse::parse_command(&bytes).unwrap();
        assert_eq!((c.field, c.message_id, c.has_data_set), (C_GET_RQ, 7, true));
        assert_eq!(
            c.sop_class.as_deref(),
            Some(uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET)
        );
    }

    #[tokio::test]
    async fn bad_requests_fail_before_connecting() {
        let opts = ScuOptions::default();
        let good = GetRequest {
            level: "STUDY".into(),
            keys: vec![QueryKey {
                tag: (0x0020, 0x000D),
                value: "1.2.3".into(),
            }],
            storage_contexts: vec![(uids::CT_IMAGE_STORAGE.into(), "1.2.840.10008.1.2.1".into())],
            max_instance_bytes: 1 << 20,
        };
        // Nothing listens on port 9 of the discard range here: a request
        // that passed the checks would fail with an I/O error instead.
        let cases = [
            GetRequest {
                level: "PATIENT".into(),
                ..good.clone()
            },
            GetRequest {
                storage_contexts: Vec::new(),
                ..good.clone()
            },
            GetRequest {
                storage_contexts: vec![("not a uid".into(), "1.2".into())],
                ..good.clone()
            },
            GetRequest {
                max_instance_bytes: 0,
                ..good.clone()
            },
        ];
        for r in cases {
            let e = get("127.0.0.1:9", &opts, &r, |_| StoreOutcome::Stored)
                .await
                .unwrap_err();
            assert!(matches!(e, ScuError::InvalidOptions(_)), "{r:?}: {e}");
        }
        let too_many = GetRequest {
            storage_contexts: (0..200)
                .map(|i| (format!("1.2.3.{i}"), "1.2.840.10008.1.2".into()))
                .collect(),
            ..good.clone()
        };
        assert!(matches!(
            get("127.0.0.1:9", &opts, &too_many, |_| StoreOutcome::Stored).await,
            Err(ScuError::TooManyContexts(201))
        ));
    }
}
