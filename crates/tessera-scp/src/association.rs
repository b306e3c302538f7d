//! One association: negotiation, then DIMSE messages reassembled from
//! P-DATA fragments until release, abort, error or idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;

use dicom_ul::Pdu;
use dicom_ul::association::{Association, AsyncServerAssociation, Error as UlError};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationRJ, AssociationRJResult,
    AssociationRJServiceProviderPresentationReason, AssociationRJSource, PDataValue,
    PDataValueType, PresentationContextResultReason,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::dimse::{self, Command, Response};
use crate::{AeFilter, InstanceSink, Received, ScpConfig, StoreOutcome, query};

pub(crate) struct Task<S> {
    pub cfg: Arc<ScpConfig>,
    pub sink: Arc<S>,
    pub stop: watch::Receiver<bool>,
    pub peer: SocketAddr,
}

/// Why an association ended other than by release.
pub(crate) enum End {
    /// The peer sent A-ABORT or closed the connection.
    Peer,
    /// We abort: protocol violation, malformed PDU, timeout, shutdown.
    Abort(AbortRQServiceProviderReason),
    /// The connection is unusable (write failed); just drop it.
    Drop,
}

/// Where the association is in the current DIMSE message.
enum Phase {
    /// Between messages.
    Idle,
    /// Command fragments of a message on context `pc`.
    Command { pc: u8, bytes: Vec<u8> },
    /// Data set fragments of a message on context `pc`.
    Data {
        pc: u8,
        received: u64,
        then: AfterData,
    },
}

/// What to do once the data set is complete.
enum AfterData {
    /// A Query/Retrieve request: keep the identifier (dropped, to be
    /// refused, past [`query::MAX_IDENTIFIER_BYTES`]).
    Query {
        command: Command,
        identifier: Option<Vec<u8>>,
    },
    /// Keep the bytes (appended to the Part 10 header in `file` until the
    /// data set exceeds the limit, then dropped) and call the sink.
    Store {
        command: Command,
        sop_class: String,
        sop_instance: String,
        transfer_syntax: String,
        dataset_offset: usize,
        file: Option<Vec<u8>>,
    },
    /// Read and discard the data set, then answer with this status.
    Discard {
        command: Command,
        status: u16,
        comment: String,
    },
}

impl<S: InstanceSink> Task<S> {
    pub(crate) async fn run(self, socket: TcpStream) {
        let peer = self.peer;
        // A second handle on the connection: dicom-ul drops its socket right
        // after sending a rejection, and a peer that sees the close before
        // it reads the A-ASSOCIATE-RJ reports an abort instead. Holding the
        // connection open until the peer closes it (bounded, like the ARTIM
        // timer) lets the rejection arrive as one.
        let (socket, lingering) = match split_handle(socket) {
            Ok(pair) => pair,
            Err(e) => {
                warn!(%peer, error = %e, "cannot use the connection");
                return;
            }
        };
        // ARTIM: the whole A-ASSOCIATE-RQ within artim_timeout. The AE
        // check knows the peer's address (per-AE networks).
        let filter = AeFilter::new(&self.cfg, Some(peer.ip()));
        let refusal = filter.refusal.clone();
        let options = crate::association_options(&self.cfg, filter);
        let established =
            tokio::time::timeout(self.cfg.artim_timeout, options.establish_async(socket)).await;
        let Ok(established) = established else {
            info!(%peer, timeout = ?self.cfg.artim_timeout, "ARTIM timer expired during association request; closing");
            return;
        };
        let assoc = match established {
            Ok(a) => a,
            Err(UlError::Rejected { association_rj, .. }) => {
                info!(%peer, reason = %association_rj.source, "association rejected");
                let why = refusal.lock().ok().and_then(|mut r| r.take());
                if let Some((calling_ae, reason)) = why {
                    self.sink.association_refused(&calling_ae, peer, &reason);
                }
                linger_until_closed(lingering, REJECT_LINGER).await;
                return;
            }
            Err(e) => {
                warn!(%peer, error = %chain(&e), "association negotiation failed");
                return;
            }
        };
        drop(lingering);
        self.serve_association(assoc, None).await;
    }

    /// DICOM TLS (PS3.15 Annex B): the handshake (a client certificate of
    /// the CA required), then the association; the peer is the
    /// certificate's identity, whatever its calling AE title. A failed
    /// handshake or a certificate without an identity is refused and
    /// reported to the sink.
    pub(crate) async fn run_tls(self, socket: TcpStream, tls: &tessera_tls::ServerTls) {
        let peer = self.peer;
        let mut filter = AeFilter::new(&self.cfg, Some(peer.ip()));
        filter.any_calling_ae = true;
        let refusal = filter.refusal.clone();
        let options = crate::association_options(&self.cfg, filter).tls_config(tls.config());
        let established =
            tokio::time::timeout(self.cfg.artim_timeout, options.establish_tls_async(socket)).await;
        let Ok(established) = established else {
            info!(%peer, timeout = ?self.cfg.artim_timeout, "ARTIM timer expired during TLS handshake or association request; closing");
            self.sink.association_refused(
                "",
                peer,
                "TLS: no handshake and association request in time",
            );
            return;
        };
        let mut assoc = match established {
            Ok(a) => a,
            Err(UlError::Rejected { association_rj, .. }) => {
                info!(%peer, reason = %association_rj.source, "TLS association rejected");
                let why = refusal.lock().ok().and_then(|mut r| r.take());
                if let Some((calling_ae, reason)) = why {
                    self.sink.association_refused(&calling_ae, peer, &reason);
                }
                return;
            }
            Err(e) => {
                let reason = format!("TLS association refused: {}", chain(&e));
                warn!(%peer, %reason, "DICOM TLS");
                self.sink.association_refused("", peer, &reason);
                return;
            }
        };
        let identity = assoc
            .inner_stream()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| "no client certificate".to_string())
            .and_then(|der| {
                tessera_tls::Identity::from_cert_der(der.as_ref(), tls.trust_domain())
                    .map_err(|e| format!("client certificate: {e}"))
            });
        let identity = match identity {
            Ok(id) => id.to_string(),
            Err(reason) => {
                warn!(%peer, %reason, "DICOM TLS: no usable identity");
                self.sink.association_refused(
                    assoc.peer_ae_title().trim_matches(' '),
                    peer,
                    &reason,
                );
                let abort = Pdu::AbortRQ {
                    source: AbortRQSource::ServiceProvider(
                        AbortRQServiceProviderReason::ReasonNotSpecified,
                    ),
                };
                let _ = assoc.send(&abort).await;
                return;
            }
        };
        info!(%peer, %identity, "DICOM TLS association");
        self.serve_association(assoc, Some(identity)).await;
    }

    /// Serves an established association until it ends.
    async fn serve_association<T: Stream>(
        mut self,
        mut assoc: Assoc<T>,
        tls_identity: Option<String>,
    ) {
        let peer = self.peer;
        let calling_ae = assoc.peer_ae_title().trim_matches(' ').to_string();
        let accepted: Vec<_> = assoc
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .map(|pc| {
                debug!(%peer, id = pc.id, abstract_syntax = %pc.abstract_syntax,
                    transfer_syntax = %pc.transfer_syntax, "presentation context accepted");
                (
                    pc.id,
                    pc.abstract_syntax.clone(),
                    pc.transfer_syntax.clone(),
                )
            })
            .collect();
        info!(%peer, %calling_ae, contexts = accepted.len(), "association established");
        let mut conn = Connection {
            cfg: &self.cfg,
            sink: &self.sink,
            peer,
            calling_ae: &calling_ae,
            tls_identity: tls_identity.as_deref(),
            accepted: &accepted,
            phase: Phase::Idle,
        };
        let end = conn.serve(&mut assoc, &mut self.stop).await;
        match end {
            Ok(()) => info!(%peer, %calling_ae, "association released"),
            Err(End::Peer) => info!(%peer, %calling_ae, "association ended by the peer"),
            Err(End::Drop) => info!(%peer, %calling_ae, "association dropped"),
            Err(End::Abort(reason)) => {
                let abort = Pdu::AbortRQ {
                    source: AbortRQSource::ServiceProvider(reason),
                };
                if let Err(e) = assoc.send(&abort).await {
                    debug!(%peer, error = %chain(&e), "could not send A-ABORT");
                }
                info!(%peer, %calling_ae, "association aborted");
            }
        }
        if let Err(e) = assoc.inner_stream().shutdown().await {
            debug!(%peer, error = %e, "socket shutdown failed");
        }
    }
}

/// A connection an association runs on: plain TCP or DICOM TLS.
pub(crate) trait Stream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

pub(crate) struct Connection<'a, S> {
    pub(crate) cfg: &'a ScpConfig,
    pub(crate) sink: &'a Arc<S>,
    pub(crate) peer: SocketAddr,
    pub(crate) calling_ae: &'a str,
    /// The client certificate's identity on a DICOM TLS association.
    pub(crate) tls_identity: Option<&'a str>,
    /// Accepted presentation contexts: (id, abstract syntax, transfer syntax).
    pub(crate) accepted: &'a [(u8, String, String)],
    phase: Phase,
}

pub(crate) type Assoc<T> = AsyncServerAssociation<T>;

impl<S: InstanceSink> Connection<'_, S> {
    async fn serve<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), End> {
        let peer = self.peer;
        loop {
            let pdu = if matches!(self.phase, Phase::Idle) {
                tokio::select! {
                    biased;
                    () = stopped(stop) => {
                        info!(%peer, "shutting down: aborting the idle association");
                        return Err(End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified));
                    }
                    pdu = assoc.receive() => pdu,
                }
            } else {
                assoc.receive().await
            };
            let pdu = match pdu {
                Ok(pdu) => pdu,
                Err(e) => return Err(receive_failed(peer, &e)),
            };
            match pdu {
                Pdu::PData { data } => {
                    for pdv in data {
                        self.on_pdv(assoc, pdv).await?;
                    }
                }
                Pdu::ReleaseRQ => {
                    if !matches!(self.phase, Phase::Idle) {
                        warn!(%peer, "release requested in the middle of a message");
                    }
                    if let Err(e) = assoc.send(&Pdu::ReleaseRP).await {
                        debug!(%peer, error = %chain(&e), "could not send A-RELEASE-RP");
                    }
                    return Ok(());
                }
                Pdu::AbortRQ { source } => {
                    info!(%peer, ?source, "association aborted by the peer");
                    return Err(End::Peer);
                }
                Pdu::AssociationRQ(_)
                | Pdu::AssociationAC(_)
                | Pdu::AssociationRJ(_)
                | Pdu::ReleaseRP => {
                    warn!(%peer, pdu = %pdu.short_description(), "unexpected PDU");
                    return Err(End::Abort(AbortRQServiceProviderReason::UnexpectedPdu));
                }
                Pdu::Unknown { pdu_type, .. } => {
                    warn!(%peer, pdu_type, "unrecognized PDU");
                    return Err(End::Abort(AbortRQServiceProviderReason::UnrecognizedPdu));
                }
            }
        }
    }

    pub(crate) fn context(&self, pc: u8) -> Option<&(u8, String, String)> {
        self.accepted.iter().find(|(id, _, _)| *id == pc)
    }

    async fn on_pdv<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pdv: PDataValue,
    ) -> Result<(), End> {
        let peer = self.peer;
        let PDataValue {
            presentation_context_id: pc,
            value_type,
            is_last,
            data,
        } = pdv;
        if self.context(pc).is_none() {
            warn!(%peer, pc, "P-DATA on a presentation context that was not accepted");
            return Err(End::Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
            ));
        }
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        match (value_type, phase) {
            (PDataValueType::Command, Phase::Idle) => {
                self.on_command_fragment(assoc, pc, Vec::new(), data, is_last)
                    .await
            }
            (
                PDataValueType::Command,
                Phase::Command {
                    pc: expected,
                    bytes,
                },
            ) if expected == pc => {
                self.on_command_fragment(assoc, pc, bytes, data, is_last)
                    .await
            }
            (
                PDataValueType::Data,
                Phase::Data {
                    pc: expected,
                    received,
                    then,
                },
            ) if expected == pc => {
                self.on_data_fragment(assoc, pc, received, then, data, is_last)
                    .await
            }
            (PDataValueType::Command | PDataValueType::Data, _) => {
                warn!(%peer, pc, "P-DATA fragment out of sequence");
                Err(End::Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                ))
            }
        }
    }

    async fn on_command_fragment<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        mut bytes: Vec<u8>,
        data: Vec<u8>,
        is_last: bool,
    ) -> Result<(), End> {
        let peer = self.peer;
        if bytes.len().saturating_add(data.len()) > dimse::MAX_COMMAND_BYTES {
            warn!(%peer, "command set over {} bytes", dimse::MAX_COMMAND_BYTES);
            return Err(End::Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
            ));
        }
        bytes.extend_from_slice(&data);
        if !is_last {
            self.phase = Phase::Command { pc, bytes };
            return Ok(());
        }
        let command = match dimse::parse_command(&bytes) {
            Ok(c) => c,
            Err(e) => {
                warn!(%peer, error = %e, "malformed command set");
                return Err(End::Abort(
                    AbortRQServiceProviderReason::InvalidPduParameter,
                ));
            }
        };
        debug!(%peer, pc, field = command.field, message_id = command.message_id, "command");
        match command.field {
            dimse::C_STORE_RQ => self.on_store_request(assoc, pc, command).await,
            query::C_FIND_RQ | query::C_GET_RQ | query::C_MOVE_RQ => {
                self.on_query_request(assoc, pc, command).await
            }
            dimse::C_ECHO_RQ if !command.has_data_set => {
                info!(%peer, calling_ae = %self.calling_ae, "C-ECHO");
                self.respond(
                    assoc,
                    pc,
                    &command,
                    dimse::C_ECHO_RSP,
                    dimse::STATUS_SUCCESS,
                    None,
                )
                .await
            }
            dimse::C_CANCEL_RQ => {
                // Nothing is cancellable: every operation is answered before
                // the next command is read.
                debug!(%peer, "C-CANCEL ignored");
                Ok(())
            }
            field if field & 0x8000 != 0 => {
                warn!(%peer, field, "a response command sent to the SCP");
                Err(End::Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                ))
            }
            field => {
                warn!(%peer, field, "unsupported DIMSE operation");
                self.refuse(
                    assoc,
                    pc,
                    command,
                    dimse::STATUS_UNRECOGNIZED_OPERATION,
                    format!("operation {field:#06x} is not supported"),
                )
                .await
            }
        }
    }

    /// Answer `command` with a failure status, after its data set if any.
    async fn refuse<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: Command,
        status: u16,
        comment: String,
    ) -> Result<(), End> {
        if command.has_data_set {
            self.phase = Phase::Data {
                pc,
                received: 0,
                then: AfterData::Discard {
                    command,
                    status,
                    comment,
                },
            };
            return Ok(());
        }
        let field = command.field | 0x8000;
        self.respond(assoc, pc, &command, field, status, Some(&comment))
            .await
    }

    async fn on_query_request<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: Command,
    ) -> Result<(), End> {
        let Some((_, abstract_syntax, _)) = self.context(pc).cloned() else {
            return Err(End::Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
            ));
        };
        let sop_class = command.sop_class.clone().unwrap_or_default();
        let refusal = if sop_class != abstract_syntax.trim_end_matches(['\0', ' '])
            || !query::is_study_root(&sop_class, command.field)
        {
            Some((
                dimse::STATUS_SOP_CLASS_NOT_SUPPORTED,
                "only Study Root Query/Retrieve (FIND, GET, MOVE) is served".to_string(),
            ))
        } else if !command.has_data_set {
            Some((
                dimse::STATUS_CANNOT_UNDERSTAND,
                "request without an identifier".to_string(),
            ))
        } else {
            None
        };
        if let Some((status, comment)) = refusal {
            warn!(peer = %self.peer, %sop_class, status, "query/retrieve refused");
            return self.refuse(assoc, pc, command, status, comment).await;
        }
        self.phase = Phase::Data {
            pc,
            received: 0,
            then: AfterData::Query {
                command,
                identifier: Some(Vec::new()),
            },
        };
        Ok(())
    }

    async fn on_store_request<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: Command,
    ) -> Result<(), End> {
        let peer = self.peer;
        let Some((_, abstract_syntax, transfer_syntax)) = self.context(pc).cloned() else {
            return Err(End::Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
            ));
        };
        let sop_class = command.sop_class.clone().unwrap_or_default();
        let sop_instance = command.sop_instance.clone().unwrap_or_default();
        let refusal = if !dimse::is_valid_uid(&sop_class) || !dimse::is_valid_uid(&sop_instance) {
            Some((
                dimse::STATUS_CANNOT_UNDERSTAND,
                "missing or invalid Affected SOP Class/Instance UID".to_string(),
            ))
        } else if sop_class != abstract_syntax.trim_end_matches(['\0', ' ']) {
            Some((
                dimse::STATUS_SOP_CLASS_NOT_SUPPORTED,
                "SOP class differs from the presentation context".to_string(),
            ))
        } else if !dimse::is_standard_storage_sop_class(&sop_class)
            && !self.cfg.extra_sop_classes.contains(&sop_class)
        {
            Some((
                dimse::STATUS_SOP_CLASS_NOT_SUPPORTED,
                "not a storage SOP class".to_string(),
            ))
        } else if !command.has_data_set {
            Some((
                dimse::STATUS_CANNOT_UNDERSTAND,
                "C-STORE-RQ without a data set".to_string(),
            ))
        } else {
            None
        };
        if let Some((status, comment)) = refusal {
            // UIDs identify a patient's images: debug only.
            warn!(%peer, %sop_class, status, "C-STORE refused");
            debug!(%peer, %sop_instance, %comment, "C-STORE refused");
            return self.refuse(assoc, pc, command, status, comment).await;
        }
        let transfer_syntax = transfer_syntax.trim_end_matches(['\0', ' ']).to_string();
        let header =
            dimse::file_header(&sop_class, &sop_instance, &transfer_syntax, self.calling_ae);
        let file = match header {
            Ok(h) => h,
            Err(e) => {
                warn!(%peer, error = %e, "cannot build the file meta group");
                return self
                    .refuse(assoc, pc, command, dimse::STATUS_CANNOT_UNDERSTAND, e)
                    .await;
            }
        };
        self.phase = Phase::Data {
            pc,
            received: 0,
            then: AfterData::Store {
                command,
                sop_class,
                sop_instance,
                transfer_syntax,
                dataset_offset: file.len(),
                file: Some(file),
            },
        };
        Ok(())
    }

    async fn on_data_fragment<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        received: u64,
        mut then: AfterData,
        data: Vec<u8>,
        is_last: bool,
    ) -> Result<(), End> {
        let received = received.saturating_add(data.len() as u64);
        if let AfterData::Query { identifier, .. } = &mut then {
            if received > query::MAX_IDENTIFIER_BYTES {
                *identifier = None;
            } else if let Some(id) = identifier {
                id.extend_from_slice(&data);
            }
        }
        if let AfterData::Store { file, .. } = &mut then {
            if received > self.cfg.max_instance_bytes {
                // Free what was kept; the rest is read and dropped.
                *file = None;
            } else if let Some(file) = file {
                file.extend_from_slice(&data);
            }
        }
        drop(data);
        if !is_last {
            self.phase = Phase::Data { pc, received, then };
            return Ok(());
        }
        match then {
            AfterData::Query {
                command,
                identifier,
            } => {
                self.phase = Phase::Idle;
                self.on_query(assoc, pc, command, identifier).await
            }
            AfterData::Discard {
                command,
                status,
                comment,
            } => {
                let field = command.field | 0x8000;
                self.respond(assoc, pc, &command, field, status, Some(&comment))
                    .await
            }
            AfterData::Store {
                command,
                sop_class,
                sop_instance,
                transfer_syntax,
                dataset_offset,
                file,
            } => {
                let peer = self.peer;
                let Some(file) = file else {
                    warn!(%peer, bytes = received,
                        limit = self.cfg.max_instance_bytes, "C-STORE data set over the limit");
                    debug!(%peer, %sop_instance, "C-STORE data set over the limit");
                    let comment = format!(
                        "data set of {received} bytes exceeds the limit of {}",
                        self.cfg.max_instance_bytes
                    );
                    return self
                        .respond(
                            assoc,
                            pc,
                            &command,
                            dimse::C_STORE_RSP,
                            dimse::STATUS_OUT_OF_RESOURCES,
                            Some(&comment),
                        )
                        .await;
                };
                let instance = Received {
                    calling_ae: self.calling_ae.to_string(),
                    tls_identity: self.tls_identity.map(str::to_owned),
                    peer,
                    sop_class_uid: sop_class,
                    sop_instance_uid: sop_instance.clone(),
                    transfer_syntax,
                    file,
                    dataset_offset,
                };
                let outcome = self.sink.store(instance).await;
                let (status, comment) = match outcome {
                    StoreOutcome::Stored => {
                        info!(%peer, calling_ae = %self.calling_ae, bytes = received, "C-STORE stored");
                        debug!(%peer, %sop_instance, "C-STORE stored");
                        (dimse::STATUS_SUCCESS, None)
                    }
                    StoreOutcome::Refused { status, reason } => {
                        // The reason may quote UIDs or patient values.
                        warn!(%peer, calling_ae = %self.calling_ae, status, "C-STORE refused by the sink");
                        debug!(%peer, %sop_instance, %reason, "C-STORE refused by the sink");
                        let status = if status == dimse::STATUS_SUCCESS {
                            dimse::STATUS_CANNOT_UNDERSTAND
                        } else {
                            status
                        };
                        (status, Some(reason))
                    }
                };
                self.respond(
                    assoc,
                    pc,
                    &command,
                    dimse::C_STORE_RSP,
                    status,
                    comment.as_deref(),
                )
                .await
            }
        }
    }

    async fn respond<T: Stream>(
        &mut self,
        assoc: &mut Assoc<T>,
        pc: u8,
        command: &Command,
        field: u16,
        status: u16,
        comment: Option<&str>,
    ) -> Result<(), End> {
        let peer = self.peer;
        let sop_class = command
            .sop_class
            .as_deref()
            .filter(|u| dimse::is_valid_uid(u));
        let sop_instance = command
            .sop_instance
            .as_deref()
            .filter(|u| dimse::is_valid_uid(u));
        let bytes = Response {
            field,
            message_id: command.message_id,
            sop_class,
            sop_instance,
            status,
            comment,
        }
        .encode();
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                warn!(%peer, error = %e, "cannot encode a response");
                return Err(End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified));
            }
        };
        let pdu = Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: bytes,
            }],
        };
        match assoc.send(&pdu).await {
            Ok(()) => {
                self.phase = Phase::Idle;
                Ok(())
            }
            Err(e) => {
                warn!(%peer, error = %chain(&e), "could not send a response");
                Err(End::Drop)
            }
        }
    }
}

/// Resolves once the server stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: stop as well.
    let _ = stop.wait_for(|s| *s).await;
}

fn receive_failed(peer: SocketAddr, e: &UlError) -> End {
    if matches!(e, UlError::ConnectionClosed { .. }) {
        info!(%peer, "connection closed by the peer without release");
        End::Peer
    } else if matches!(e, UlError::Timeout { .. }) {
        warn!(%peer, "idle timeout");
        End::Abort(AbortRQServiceProviderReason::ReasonNotSpecified)
    } else {
        warn!(%peer, error = %chain(e), "cannot read a PDU");
        End::Abort(AbortRQServiceProviderReason::InvalidPduParameter)
    }
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The ARTIM timer before an association: waits (without reading) for the
/// connection's first byte, at most `artim_timeout`. False when the peer
/// closed, the timer expired or the SCP is stopping: drop the connection.
pub(crate) async fn first_byte(
    socket: &TcpStream,
    peer: SocketAddr,
    cfg: &ScpConfig,
    mut stop: watch::Receiver<bool>,
) -> bool {
    let mut b = [0_u8; 1];
    tokio::select! {
        r = tokio::time::timeout(cfg.artim_timeout, socket.peek(&mut b)) => match r {
            Ok(Ok(n)) if n > 0 => true,
            Ok(Ok(_)) | Ok(Err(_)) => {
                debug!(%peer, "connection closed before an association request");
                false
            }
            Err(_) => {
                info!(%peer, timeout = ?cfg.artim_timeout, "ARTIM timer expired: no association request; closing");
                false
            }
        },
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Turn away an association over the concurrency limit: read its
/// A-ASSOCIATE-RQ (bounded by max_pdu_length and idle_timeout) and answer
/// A-ASSOCIATE-RJ (transient, local limit exceeded).
pub(crate) async fn reject_busy(mut socket: TcpStream, peer: SocketAddr, cfg: &ScpConfig) {
    let work = async {
        let mut header = [0_u8; 6];
        socket.read_exact(&mut header).await?;
        let length = u32::from_be_bytes([header[2], header[3], header[4], header[5]]);
        if header[0] != 0x01 || length > cfg.max_pdu_length {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an A-ASSOCIATE-RQ",
            ));
        }
        let skipped = tokio::io::copy(
            &mut (&mut socket).take(u64::from(length)),
            &mut tokio::io::sink(),
        )
        .await?;
        if skipped != u64::from(length) {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let rj = Pdu::AssociationRJ(AssociationRJ {
            result: AssociationRJResult::Transient,
            source: AssociationRJSource::ServiceProviderPresentation(
                AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
            ),
        });
        let mut out = Vec::with_capacity(10);
        dicom_ul::write_pdu(&mut out, &rj).map_err(std::io::Error::other)?;
        socket.write_all(&out).await?;
        socket.shutdown().await
    };
    match tokio::time::timeout(cfg.idle_timeout, work).await {
        Ok(Ok(())) => debug!(%peer, "A-ASSOCIATE-RJ sent (local limit exceeded)"),
        Ok(Err(e)) => debug!(%peer, error = %e, "busy rejection failed"),
        Err(_) => debug!(%peer, "busy rejection timed out"),
    }
}

/// How long a rejected peer gets to close the connection itself.
const REJECT_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// The connection as two handles (a duplicated descriptor): one for
/// dicom-ul, one to keep it open after dicom-ul drops its own.
fn split_handle(socket: TcpStream) -> std::io::Result<(TcpStream, std::net::TcpStream)> {
    let std = socket.into_std()?;
    let spare = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, spare))
}

/// Reads (and discards) until the peer closes, at most `limit` and at most
/// 64 KiB; then the handle is dropped.
async fn linger_until_closed(spare: std::net::TcpStream, limit: std::time::Duration) {
    let Ok(mut s) = TcpStream::from_std(spare) else {
        return;
    };
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        let mut seen = 0usize;
        while seen < 64 * 1024 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen += n,
            }
        }
    })
    .await;
}
