//! Query/Retrieve (PS3.4 Annex C), Study Root: C-FIND, C-GET (the
//! instances come back as C-STORE sub-operations on the same association)
//! and C-MOVE (sent with C-STORE to a destination AE named in the
//! configuration). What matches and what may be read is the sink's
//! decision ([`crate::InstanceSink::find`], [`crate::InstanceSink::retrieve`]);
//! this module speaks the protocol: the identifier, pending responses with
//! sub-operation counts, C-CANCEL during a C-GET, the final status.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::Pdu;
use dicom_ul::pdu::{AbortRQServiceProviderReason, PDataValue, PDataValueType};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::association::{Assoc, Connection, End, Stream};
use crate::dimse::{self, Command};
use crate::identifier::{Identifier, encode_identifier, read_identifier};
use crate::query::*;
use crate::{InstanceSink, scu};

/// Sub-operation counts of a C-GET/C-MOVE.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    remaining: u16,
    completed: u16,
    failed: u16,
    warning: u16,
}

fn count16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// A Q/R response command set.
fn response(
    field: u16,
    message_id: u16,
    sop_class: &str,
    status: u16,
    data_set: bool,
    counts: Option<Counts>,
    comment: Option<&str>,
) -> Result<Vec<u8>, String> {
    let us = |t: Tag, v: u16| DataElement::new(t, VR::US, PrimitiveValue::from(v));
    let mut e = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        us(tags::COMMAND_FIELD, field),
        us(tags::MESSAGE_ID_BEING_RESPONDED_TO, message_id),
        us(
            tags::COMMAND_DATA_SET_TYPE,
            if data_set { 0x0000 } else { 0x0101 },
        ),
        us(tags::STATUS, status),
    ];
    if let Some(c) = counts {
        e.push(us(tags::NUMBER_OF_REMAINING_SUBOPERATIONS, c.remaining));
        e.push(us(tags::NUMBER_OF_COMPLETED_SUBOPERATIONS, c.completed));
        e.push(us(tags::NUMBER_OF_FAILED_SUBOPERATIONS, c.failed));
        e.push(us(tags::NUMBER_OF_WARNING_SUBOPERATIONS, c.warning));
    }
    if let Some(c) = comment {
        e.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(dimse::error_comment(c)),
        ));
    }
    dimse::encode_command(e)
}

impl<S: InstanceSink> Connection<'_, S> {
    /// A complete C-FIND/C-GET/C-MOVE request with its identifier.
    pub(crate) async fn on_query<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: Command,
        identifier: Option<Vec<u8>>,
    ) -> Result<(), End> {
        let peer = self.peer;
        let field = command.field | 0x8000;
        let sop_class = command.sop_class.clone().unwrap_or_default();
        let ts = self
            .context(pc)
            .map(|(_, _, ts)| ts.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default();
        let refuse = |status: u16, reason: &str| {
            response(
                field,
                command.message_id,
                &sop_class,
                status,
                false,
                None,
                Some(reason),
            )
        };
        let parsed = match identifier {
            None => Err(format!("identifier over {MAX_IDENTIFIER_BYTES} bytes")),
            Some(bytes) => read_identifier(&bytes, &ts),
        };
        let id = match parsed {
            Ok(id) if ["STUDY", "SERIES", "IMAGE"].contains(&id.level.as_str()) => id,
            Ok(id) => {
                let reason = format!(
                    "Query/Retrieve Level {:?}: STUDY, SERIES or IMAGE",
                    id.level
                );
                return self
                    .send_command(assoc, pc, refuse(STATUS_IDENTIFIER_MISMATCH, &reason))
                    .await;
            }
            Err(reason) => {
                warn!(%peer, %reason, "bad identifier");
                return self
                    .send_command(assoc, pc, refuse(STATUS_IDENTIFIER_MISMATCH, &reason))
                    .await;
            }
        };
        match command.field {
            C_FIND_RQ => self.find(assoc, pc, &command, &sop_class, &ts, id).await,
            C_GET_RQ | C_MOVE_RQ => {
                let kind = if command.field == C_GET_RQ {
                    RetrieveKind::Get
                } else {
                    let destination = command.move_destination.clone().unwrap_or_default();
                    if !self
                        .cfg
                        .move_destinations
                        .iter()
                        .any(|(ae, _)| ae.trim() == destination)
                    {
                        warn!(%peer, calling_ae = %self.calling_ae, %destination, "C-MOVE to an unknown destination");
                        let reason = format!("move destination {destination:?} is not configured");
                        return self
                            .send_command(
                                assoc,
                                pc,
                                refuse(STATUS_MOVE_DESTINATION_UNKNOWN, &reason),
                            )
                            .await;
                    }
                    RetrieveKind::Move { destination }
                };
                let request = RetrieveRequest {
                    calling_ae: self.calling_ae.to_string(),
                    tls_identity: self.tls_identity.map(str::to_owned),
                    peer,
                    level: id.level,
                    keys: id.keys,
                    kind: kind.clone(),
                };
                match self.sink.retrieve(request).await {
                    RetrieveOutcome::Refused { status, reason } => {
                        info!(%peer, calling_ae = %self.calling_ae, status, "retrieve refused");
                        let status = if status == dimse::STATUS_SUCCESS {
                            STATUS_NOT_AUTHORIZED
                        } else {
                            status
                        };
                        self.send_command(assoc, pc, refuse(status, &reason)).await
                    }
                    RetrieveOutcome::Instances { count, files } => match kind {
                        RetrieveKind::Get => {
                            self.get(assoc, pc, &command, &sop_class, count, files)
                                .await
                        }
                        RetrieveKind::Move { destination } => {
                            self.r#move(assoc, pc, &command, &sop_class, &destination, count, files)
                                .await
                        }
                    },
                }
            }
            other => {
                warn!(%peer, field = other, "not a query/retrieve command");
                Err(End::Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                ))
            }
        }
    }

    async fn send_command<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        bytes: Result<Vec<u8>, String>,
    ) -> Result<(), End> {
        let bytes = bytes.map_err(|e| {
            warn!(peer = %self.peer, error = %e, "cannot encode a response");
            End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified)
        })?;
        self.send_part(assoc, pc, PDataValueType::Command, &bytes)
            .await
    }

    /// One message part (command or data set) in PDUs the peer accepts.
    async fn send_part<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        value_type: PDataValueType,
        bytes: &[u8],
    ) -> Result<(), End> {
        let max = assoc.requestor_max_pdu_length();
        let max = if max == 0 {
            crate::MAX_PDU_LENGTH_LIMIT
        } else {
            max.min(crate::MAX_PDU_LENGTH_LIMIT)
        };
        let fragment = (max as usize).saturating_sub(6).max(1);
        let mut chunks = bytes.chunks(fragment).peekable();
        if bytes.is_empty() {
            return Err(End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified));
        }
        while let Some(part) = chunks.next() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: value_type.clone(),
                    is_last: chunks.peek().is_none(),
                    data: part.to_vec(),
                }],
            };
            if let Err(e) = assoc.send(&pdu).await {
                warn!(peer = %self.peer, error = %e, "could not send a P-DATA PDU");
                return Err(End::Drop);
            }
        }
        Ok(())
    }

    async fn find<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: &Command,
        sop_class: &str,
        ts: &str,
        id: Identifier,
    ) -> Result<(), End> {
        let peer = self.peer;
        let field = command.field | 0x8000;
        let request = FindRequest {
            calling_ae: self.calling_ae.to_string(),
            tls_identity: self.tls_identity.map(str::to_owned),
            peer,
            level: id.level.clone(),
            keys: id.keys,
        };
        let matches = match self.sink.find(request).await {
            FindOutcome::Matches(m) => m,
            FindOutcome::Refused { status, reason } => {
                info!(%peer, calling_ae = %self.calling_ae, status, "C-FIND refused");
                let status = if status == dimse::STATUS_SUCCESS {
                    STATUS_NOT_AUTHORIZED
                } else {
                    status
                };
                let r = response(
                    field,
                    command.message_id,
                    sop_class,
                    status,
                    false,
                    None,
                    Some(&reason),
                );
                return self.send_command(assoc, pc, r).await;
            }
        };
        info!(%peer, calling_ae = %self.calling_ae, level = %id.level, matches = matches.len(), "C-FIND");
        for m in &matches {
            let data = match encode_identifier(&id.level, m, &id.vrs, ts) {
                Ok(d) => d,
                Err(e) => {
                    warn!(%peer, error = %e, "cannot encode a match");
                    let r = response(
                        field,
                        command.message_id,
                        sop_class,
                        0xC001,
                        false,
                        None,
                        Some(&e),
                    );
                    return self.send_command(assoc, pc, r).await;
                }
            };
            let r = response(
                field,
                command.message_id,
                sop_class,
                STATUS_PENDING,
                true,
                None,
                None,
            );
            self.send_command(assoc, pc, r).await?;
            self.send_part(assoc, pc, PDataValueType::Data, &data)
                .await?;
        }
        let r = response(
            field,
            command.message_id,
            sop_class,
            dimse::STATUS_SUCCESS,
            false,
            None,
            None,
        );
        self.send_command(assoc, pc, r).await
    }

    /// Reads PDUs until the C-STORE-RSP of `message_id`; a C-CANCEL-RQ
    /// seen meanwhile sets `cancelled`.
    async fn store_response<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        message_id: u16,
        cancelled: &mut bool,
    ) -> Result<u16, End> {
        let peer = self.peer;
        let mut bytes = Vec::new();
        loop {
            let pdu = assoc.receive().await.map_err(|e| {
                warn!(%peer, error = %e, "no C-STORE response");
                End::Peer
            })?;
            let Pdu::PData { data } = pdu else {
                if let Pdu::AbortRQ { .. } = pdu {
                    return Err(End::Peer);
                }
                warn!(%peer, pdu = %pdu.short_description(), "unexpected PDU during C-GET");
                return Err(End::Abort(AbortRQServiceProviderReason::UnexpectedPdu));
            };
            for pdv in data {
                if pdv.value_type != PDataValueType::Command {
                    warn!(%peer, "data set during C-GET sub-operations");
                    return Err(End::Abort(
                        AbortRQServiceProviderReason::UnexpectedPduParameter,
                    ));
                }
                if bytes.len() + pdv.data.len() > dimse::MAX_COMMAND_BYTES {
                    return Err(End::Abort(
                        AbortRQServiceProviderReason::InvalidPduParameter,
                    ));
                }
                bytes.extend_from_slice(&pdv.data);
                if !pdv.is_last {
                    continue;
                }
                let whole = std::mem::take(&mut bytes);
                if let Ok(c) = dimse::parse_command(&whole)
                    && c.field == dimse::C_CANCEL_RQ
                {
                    debug!(%peer, "C-CANCEL during C-GET");
                    *cancelled = true;
                    continue;
                }
                match dimse::parse_response(&whole) {
                    Ok(r) if r.field == dimse::C_STORE_RSP && r.message_id == message_id => {
                        return Ok(r.status);
                    }
                    Ok(r) => {
                        warn!(%peer, field = r.field, "unexpected response during C-GET");
                        return Err(End::Abort(
                            AbortRQServiceProviderReason::UnexpectedPduParameter,
                        ));
                    }
                    Err(e) => {
                        warn!(%peer, error = %e, "malformed command during C-GET");
                        return Err(End::Abort(
                            AbortRQServiceProviderReason::InvalidPduParameter,
                        ));
                    }
                }
            }
        }
    }

    async fn get<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: &Command,
        sop_class: &str,
        count: usize,
        mut files: mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> Result<(), End> {
        let peer = self.peer;
        let field = command.field | 0x8000;
        let mut c = Counts {
            remaining: count16(count),
            ..Counts::default()
        };
        let mut cancelled = false;
        let mut message_id: u16 = 1;
        let mut failed_uids: Vec<String> = Vec::new();
        while let Some(item) = files.recv().await {
            c.remaining = c.remaining.saturating_sub(1);
            let file = match item {
                Ok(f) => f,
                Err(reason) => {
                    warn!(%peer, %reason, "C-GET sub-operation failed");
                    c.failed += 1;
                    continue;
                }
            };
            let Ok(part) = scu::split_part10(&file) else {
                c.failed += 1;
                continue;
            };
            // The stored transfer syntax only: files are never re-encoded.
            let ctx = self.accepted.iter().find(|(_, a, t)| {
                a.trim_end_matches(['\0', ' ']) == part.sop_class
                    && t.trim_end_matches(['\0', ' ']) == part.transfer_syntax
            });
            let Some((store_pc, _, _)) = ctx.cloned() else {
                warn!(%peer, sop_class = %part.sop_class, ts = %part.transfer_syntax,
                    "C-GET: no accepted storage context for this SOP class and transfer syntax");
                c.failed += 1;
                failed_uids.push(part.sop_instance.clone());
                continue;
            };
            let rq = dimse::store_request(message_id, &part.sop_class, &part.sop_instance);
            self.send_command(assoc, store_pc, rq).await?;
            self.send_part(assoc, store_pc, PDataValueType::Data, part.dataset)
                .await?;
            let status = self
                .store_response(assoc, message_id, &mut cancelled)
                .await?;
            message_id = message_id.checked_add(1).unwrap_or(1);
            match status {
                0x0000 => c.completed += 1,
                0xB000 | 0xB006 | 0xB007 => c.warning += 1,
                _ => {
                    c.failed += 1;
                    failed_uids.push(part.sop_instance.clone());
                }
            }
            if cancelled {
                break;
            }
            if c.remaining > 0 {
                let r = response(
                    field,
                    command.message_id,
                    sop_class,
                    STATUS_PENDING,
                    false,
                    Some(c),
                    None,
                );
                self.send_command(assoc, pc, r).await?;
            }
        }
        self.finish(assoc, pc, command, sop_class, c, cancelled, &failed_uids)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: &Command,
        sop_class: &str,
        c: Counts,
        cancelled: bool,
        failed_uids: &[String],
    ) -> Result<(), End> {
        let field = command.field | 0x8000;
        let status = if cancelled {
            STATUS_CANCEL
        } else if c.failed == 0 && c.warning == 0 {
            dimse::STATUS_SUCCESS
        } else if c.completed == 0 && c.warning == 0 {
            STATUS_SUBOPS_IMPOSSIBLE
        } else {
            STATUS_SUBOPS_WARNING
        };
        info!(peer = %self.peer, calling_ae = %self.calling_ae, completed = c.completed, failed = c.failed,
            warning = c.warning, status, "retrieve finished");
        let list = (!failed_uids.is_empty() && status != dimse::STATUS_SUCCESS).then(|| {
            vec![QueryKey {
                tag: (0x0008, 0x0058),
                value: failed_uids.join("\\"),
            }]
        });
        let ts = self
            .context(pc)
            .map(|(_, _, ts)| ts.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default();
        let data = list.and_then(|l| {
            let mut obj = InMemDicomObject::new_empty();
            obj.put(DataElement::new(
                Tag(l[0].tag.0, l[0].tag.1),
                VR::UI,
                PrimitiveValue::Strs(l[0].value.split('\\').map(str::to_owned).collect()),
            ));
            let t = TransferSyntaxRegistry.get(&ts)?;
            let mut out = Vec::new();
            obj.write_dataset_with_ts(&mut out, t).ok()?;
            Some(out)
        });
        let r = response(
            field,
            command.message_id,
            sop_class,
            status,
            data.is_some(),
            Some(Counts { remaining: 0, ..c }),
            None,
        );
        self.send_command(assoc, pc, r).await?;
        if let Some(d) = data {
            self.send_part(assoc, pc, PDataValueType::Data, &d).await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn r#move<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: &Command,
        sop_class: &str,
        destination: &str,
        count: usize,
        mut files: mpsc::Receiver<Result<Vec<u8>, String>>,
    ) -> Result<(), End> {
        let peer = self.peer;
        let field = command.field | 0x8000;
        let Some((_, addr)) = self
            .cfg
            .move_destinations
            .iter()
            .find(|(ae, _)| ae.trim() == destination)
            .cloned()
        else {
            return Err(End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified));
        };
        let opts = scu::ScuOptions {
            calling_ae: self.cfg.ae_title.trim().to_string(),
            called_ae: destination.to_string(),
            max_pdu_length: self.cfg.max_pdu_length,
            timeout: self.cfg.idle_timeout,
        };
        let mut c = Counts {
            remaining: count16(count),
            ..Counts::default()
        };
        let mut failed_uids = Vec::new();
        let mut batch = Vec::new();
        let mut done = false;
        while !done {
            // Up to MOVE_BATCH files per association to the destination.
            batch.clear();
            while batch.len() < MOVE_BATCH {
                match files.recv().await {
                    None => {
                        done = true;
                        break;
                    }
                    Some(Ok(f)) => batch.push(f),
                    Some(Err(reason)) => {
                        warn!(%peer, %reason, "C-MOVE sub-operation failed");
                        c.remaining = c.remaining.saturating_sub(1);
                        c.failed += 1;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let n = count16(batch.len());
            c.remaining = c.remaining.saturating_sub(n);
            match scu::send_files(&addr, &opts, &batch, |_, _| {}).await {
                Ok(sent) => {
                    for s in sent {
                        match s.status {
                            0x0000 => c.completed += 1,
                            0xB000 | 0xB006 | 0xB007 => c.warning += 1,
                            _ => {
                                c.failed += 1;
                                failed_uids.push(s.sop_instance_uid);
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(%peer, %destination, error = %e, "C-MOVE: cannot send to the destination");
                    c.failed += n;
                }
            }
            if c.remaining > 0 {
                let r = response(
                    field,
                    command.message_id,
                    sop_class,
                    STATUS_PENDING,
                    false,
                    Some(c),
                    None,
                );
                self.send_command(assoc, pc, r).await?;
            }
        }
        self.finish(assoc, pc, command, sop_class, c, false, &failed_uids)
            .await
    }
}

/// Files sent per association to a C-MOVE destination.
const MOVE_BATCH: usize = 32;

#[cfg(test)]
mod tests {
    use dicom_dictionary_std::uids;

    use super::*;

    #[test]
    fn responses_carry_counts() {
        let c = Counts {
            remaining: 2,
            completed: 3,
            failed: 1,
            warning: 0,
        };
        let bytes = response(
            0x8010,
            5,
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_GET,
            STATUS_PENDING,
            false,
            Some(c),
            None,
        )
        .unwrap();
        let r = dimse::parse_response(&bytes).unwrap();
        assert_eq!(
            (r.field, r.message_id, r.status),
            (0x8010, 5, STATUS_PENDING)
        );
        assert!(is_study_root(
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
            C_FIND_RQ
        ));
        assert!(!is_study_root(
            uids::PATIENT_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
            C_FIND_RQ
        ));
        assert!(!is_study_root(
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
            C_GET_RQ
        ));
    }
}
