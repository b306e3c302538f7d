//! A DICOM C-STORE / C-ECHO service class user on dicom-ul: sends Part 10
//! files to an SCP (ours or any other) over one association.
//!
//! Each file's SOP class, SOP instance and transfer syntax come from its
//! file meta group (read with dicom-object); the data set bytes that follow
//! the meta group are sent exactly as they are, never decoded or
//! re-encoded, in a presentation context whose only transfer syntax is the
//! file's. Messages are split into P-DATA PDUs here (dicom-ul's
//! `AsyncPDataWriter` needs a multi-threaded runtime), so this works on any
//! tokio runtime.
//!
//! ```no_run
//! # async fn demo(files: Vec<Vec<u8>>) -> Result<(), tessera_scp::scu::ScuError> {
//! use tessera_scp::scu::{self, ScuOptions};
//! let opts = ScuOptions {
//!     calling_ae: "MODALITY".into(),
//!     called_ae: "TESSERA".into(),
//!     ..ScuOptions::default()
//! };
//! assert_eq!(scu::echo("127.0.0.1:11112", &opts).await?, 0x0000);
//! let sent = scu::send_files("127.0.0.1:11112", &opts, &files, |done, total| {
//!     eprintln!("{done}/{total}");
//! })
//! .await?;
//! assert!(sent.iter().all(|s| s.status == 0x0000));
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_object::meta::FileMetaTable;
use dicom_ul::association::Error as UlError;
use dicom_ul::association::client::AsyncClientAssociation;
use dicom_ul::pdu::{AssociationRJResult, MINIMUM_PDU_SIZE, PDataValue, PDataValueType};
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::MAX_PDU_LENGTH_LIMIT;
use crate::dimse::{self, MAX_COMMAND_BYTES, ParsedResponse};

/// Most presentation contexts one association can carry (context IDs are
/// the odd numbers 1 to 255).
pub const MAX_PRESENTATION_CONTEXTS: usize = 128;

/// Largest P-DATA PDU we send, whatever the SCP accepts: bounds the buffers
/// of one PDU.
const MAX_SEND_PDU: u32 = 1024 * 1024;

/// The SCP's Maximum Length Received must leave room for a useful fragment
/// (a PDV item has a 6-byte header); smaller values are refused.
const MIN_PEER_PDU: u32 = 64;

/// Transfer syntax of the Verification context of [`echo`].
const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";

/// How to reach the SCP.
#[derive(Debug, Clone)]
pub struct ScuOptions {
    /// Our AE title (calling AE), 1 to 16 characters.
    pub calling_ae: String,
    /// The SCP's AE title (called AE), 1 to 16 characters.
    pub called_ae: String,
    /// Largest PDU we accept from the SCP (announced in the
    /// A-ASSOCIATE-RQ), 1 018 B to 16 MiB.
    pub max_pdu_length: u32,
    /// Bounds the connection and association negotiation, each PDU
    /// written, each response awaited (from the end of the request to the
    /// whole response) and the release. Not the whole batch: a large data
    /// set on a slow link takes as long as it takes, PDU by PDU.
    pub timeout: Duration,
}

impl Default for ScuOptions {
    fn default() -> Self {
        ScuOptions {
            calling_ae: "TESSERA_SCU".into(),
            called_ae: "TESSERA".into(),
            max_pdu_length: 64 * 1024,
            timeout: Duration::from_secs(30),
        }
    }
}

/// The answer to one C-STORE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The file's Media Storage SOP Instance UID (sent as the Affected SOP
    /// Instance UID).
    pub sop_instance_uid: String,
    /// The C-STORE-RSP status: 0x0000 success, 0xB000/0xB007/0xB006
    /// warnings, anything else a failure (the instance was not stored).
    pub status: u16,
    /// The response's Error Comment, if any.
    pub error_comment: Option<String>,
}

/// Why [`send_files`] or [`echo`] failed. Any of these after the
/// association was established aborts it.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    /// An input is not a usable Part 10 file; nothing was sent.
    #[error("file {index} is not a DICOM Part 10 file: {reason}")]
    NotPart10 { index: usize, reason: String },
    /// [`ScuOptions`] are invalid; nothing was sent.
    #[error("invalid SCU options: {0}")]
    InvalidOptions(String),
    /// The files need more presentation contexts than one association has.
    #[error(
        "{0} distinct (SOP class, transfer syntax) pairs: at most {MAX_PRESENTATION_CONTEXTS} presentation contexts per association"
    )]
    TooManyContexts(usize),
    /// The SCP answered A-ASSOCIATE-RJ.
    #[error("association rejected ({}): {reason}", if *.transient { "transient" } else { "permanent" })]
    Rejected {
        /// A transient rejection (for instance "local limit exceeded") may
        /// succeed later; a permanent one will not.
        transient: bool,
        reason: String,
    },
    /// The SCP did not accept the presentation context of this pair;
    /// nothing was sent.
    #[error(
        "no accepted presentation context for SOP class {sop_class} in transfer syntax {transfer_syntax}"
    )]
    NoContext {
        sop_class: String,
        transfer_syntax: String,
    },
    /// Connecting, reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing came within [`ScuOptions::timeout`].
    #[error("timed out after {timeout:?} waiting for {waiting_for}")]
    Timeout {
        timeout: Duration,
        waiting_for: String,
    },
    /// The SCP broke the protocol (unexpected or malformed PDU, wrong
    /// response, A-ABORT...).
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// A file ready to send: what its meta group says and where its data set
/// starts.
#[derive(Debug)]
pub(crate) struct Part10<'a> {
    pub(crate) sop_class: String,
    pub(crate) sop_instance: String,
    pub(crate) transfer_syntax: String,
    pub(crate) dataset: &'a [u8],
}

/// Explicit VR with a 2-byte reserved field and a 4-byte length.
fn long_length_vr(vr: [u8; 2]) -> bool {
    matches!(
        &vr,
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
    )
}

/// Split a Part 10 file into its meta group's UIDs and its data set.
///
/// Accepts the 128-byte preamble + `DICM` (or `DICM` at offset 0). The
/// meta group's extent is found by walking its elements (Explicit VR LE,
/// every length checked against the bytes that remain) up to the first
/// element outside group 0002; only that slice is given to dicom-object.
pub(crate) fn split_part10(bytes: &[u8]) -> Result<Part10<'_>, String> {
    let start = if bytes.get(128..132) == Some(b"DICM") {
        128
    } else if bytes.get(..4) == Some(b"DICM") {
        0
    } else {
        return Err("no DICM magic at offset 128 (nor 0)".into());
    };
    let mut pos = start + 4;
    // Up to the end of the file or the first element outside group 0002.
    while let Some(head) = bytes.get(pos..pos + 8) {
        let group = u16::from_le_bytes([head[0], head[1]]);
        if group != 0x0002 {
            break;
        }
        let vr = [head[4], head[5]];
        let (header, len) = if long_length_vr(vr) {
            let Some(l) = bytes.get(pos + 8..pos + 12) else {
                return Err("truncated file meta element".into());
            };
            (12, u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize)
        } else {
            (8, u16::from_le_bytes([head[6], head[7]]) as usize)
        };
        if len == 0xFFFF_FFFF {
            return Err("undefined length in the file meta group".into());
        }
        pos = pos
            .checked_add(header + len)
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| {
                format!(
                    "file meta element ({:04X},{:04X}) declares {len} bytes past the end",
                    group,
                    u16::from_le_bytes([head[2], head[3]])
                )
            })?;
    }
    let meta = FileMetaTable::from_reader(&bytes[start..pos])
        .map_err(|e| format!("file meta group: {e}"))?;
    let trim = |s: &str| {
        s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string()
    };
    let sop_class = trim(meta.media_storage_sop_class_uid());
    let sop_instance = trim(meta.media_storage_sop_instance_uid());
    let transfer_syntax = trim(meta.transfer_syntax());
    for (name, uid) in [
        ("Media Storage SOP Class UID", &sop_class),
        ("Media Storage SOP Instance UID", &sop_instance),
        ("Transfer Syntax UID", &transfer_syntax),
    ] {
        if !dimse::is_valid_uid(uid) {
            return Err(format!("{name} {uid:?} is not a UID"));
        }
    }
    let dataset = &bytes[pos..];
    if dataset.is_empty() {
        return Err("no data set after the file meta group".into());
    }
    Ok(Part10 {
        sop_class,
        sop_instance,
        transfer_syntax,
        dataset,
    })
}

fn validate(opts: &ScuOptions) -> Result<(), ScuError> {
    for (name, ae) in [
        ("calling_ae", &opts.calling_ae),
        ("called_ae", &opts.called_ae),
    ] {
        if !crate::valid_ae_title(ae) {
            return Err(ScuError::InvalidOptions(format!(
                "{name} {ae:?}: 1 to 16 printable ASCII characters, no backslash"
            )));
        }
    }
    if !(MINIMUM_PDU_SIZE..=MAX_PDU_LENGTH_LIMIT).contains(&opts.max_pdu_length) {
        return Err(ScuError::InvalidOptions(format!(
            "max_pdu_length {} outside {MINIMUM_PDU_SIZE}..={MAX_PDU_LENGTH_LIMIT}",
            opts.max_pdu_length
        )));
    }
    if opts.timeout.is_zero() {
        return Err(ScuError::InvalidOptions("timeout is 0".into()));
    }
    Ok(())
}

/// `error` and its sources, `: `-separated.
fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// Map a dicom-ul error; `doing` names the step for timeouts.
fn ul_error(e: UlError, timeout: Duration, doing: &str) -> ScuError {
    // dicom-ul's error enum has feature-dependent variants (TLS), so the
    // fall-back arm cannot list them all.
    #[allow(clippy::wildcard_enum_match_arm)]
    match e {
        UlError::Rejected { association_rj, .. } => ScuError::Rejected {
            transient: association_rj.result == AssociationRJResult::Transient,
            reason: association_rj.source.to_string(),
        },
        UlError::Timeout { .. } => ScuError::Timeout {
            timeout,
            waiting_for: doing.to_string(),
        },
        UlError::Connect { source, .. }
        | UlError::ToAddress { source, .. }
        | UlError::WireSend { source, .. }
        | UlError::WireRead { source, .. }
        | UlError::Close { source, .. } => ScuError::Io(source),
        UlError::ConnectionClosed { .. } => ScuError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("connection closed by the SCP (waiting for {doing})"),
        )),
        other => ScuError::Protocol(format!("{doing}: {}", chain(&other))),
    }
}

/// Bound `fut` by `timeout`.
async fn bounded<T>(
    timeout: Duration,
    doing: &str,
    fut: impl Future<Output = Result<T, ScuError>>,
) -> Result<T, ScuError> {
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(ScuError::Timeout {
                timeout,
                waiting_for: doing.to_string(),
            })
        })
}

/// An established association and what is needed to talk on it.
struct Link {
    assoc: AsyncClientAssociation<TcpStream>,
    timeout: Duration,
    /// Largest PDV value we put in one P-DATA PDU.
    fragment: usize,
    next_message_id: u16,
}

/// Connect and negotiate `contexts` (abstract syntax, transfer syntax).
async fn associate(
    addr: &str,
    opts: &ScuOptions,
    contexts: &[(&str, &str)],
) -> Result<Link, ScuError> {
    associate_with_roles(addr, opts, contexts, &[]).await
}

/// [`associate`], also proposing the SCP role (not the SCU role) for the SOP
/// classes of `scp_roles` (how a C-GET receives its instances).
async fn associate_with_roles(
    addr: &str,
    opts: &ScuOptions,
    contexts: &[(&str, &str)],
    scp_roles: &[&str],
) -> Result<Link, ScuError> {
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(opts.calling_ae.trim_matches(' ').to_string())
        .called_ae_title(opts.called_ae.trim_matches(' ').to_string())
        .max_pdu_length(opts.max_pdu_length)
        .strict(true)
        .connection_timeout(opts.timeout)
        // Our own bound (`bounded`) on every read fires first: with
        // dicom-ul's `async-tls` feature (DICOM TLS on the SCP side), a
        // read timeout of its own during negotiation is reported as
        // "TLS not supported" instead of a timeout.
        .read_timeout(opts.timeout + Duration::from_secs(1))
        .write_timeout(opts.timeout);
    for (abstract_syntax, ts) in contexts {
        options =
            options.with_presentation_context(abstract_syntax.to_string(), vec![ts.to_string()]);
    }
    for sop_class in scp_roles {
        options = options.with_role_selection(sop_class.to_string(), false, true);
    }
    let timeout = opts.timeout;
    let doing = "the association to be accepted";
    let mut assoc = bounded(timeout, doing, async {
        options.establish_async(addr).await.map_err(|e| {
            // dicom-ul fails this way when it accepts none: name the first.
            if let UlError::NoAcceptedPresentationContexts { .. } = e
                && let Some((sop_class, ts)) = contexts.first()
            {
                ScuError::NoContext {
                    sop_class: sop_class.to_string(),
                    transfer_syntax: ts.to_string(),
                }
            } else {
                ul_error(e, timeout, doing)
            }
        })
    })
    .await?;
    // Each PDU goes out in one write: without TCP_NODELAY, Nagle holds the
    // tail of a data set until the SCP's delayed ACK (~40 ms per C-STORE).
    if let Err(e) = assoc.inner_stream().set_nodelay(true) {
        debug!(addr, error = %e, "set_nodelay failed");
    }
    let peer_max = assoc.acceptor_max_pdu_length();
    if peer_max < MIN_PEER_PDU {
        let _ = bounded(timeout, "A-ABORT", async {
            assoc
                .abort()
                .await
                .map_err(|e| ul_error(e, timeout, "A-ABORT"))
        })
        .await;
        return Err(ScuError::Protocol(format!(
            "the SCP's maximum PDU length {peer_max} is below {MIN_PEER_PDU}"
        )));
    }
    debug!(
        addr,
        peer_max_pdu = peer_max,
        contexts = assoc.presentation_contexts().len(),
        "association established"
    );
    Ok(Link {
        fragment: peer_max.min(MAX_SEND_PDU) as usize - 6,
        assoc,
        timeout,
        next_message_id: 1,
    })
}

impl Link {
    /// The accepted context for (abstract syntax, transfer syntax).
    fn context_id(&self, abstract_syntax: &str, ts: &str) -> Result<u8, ScuError> {
        let trim = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
        self.assoc
            .presentation_contexts()
            .iter()
            .find(|pc| {
                trim(&pc.abstract_syntax) == abstract_syntax && trim(&pc.transfer_syntax) == ts
            })
            .map(|pc| pc.id)
            .ok_or_else(|| ScuError::NoContext {
                sop_class: abstract_syntax.to_string(),
                transfer_syntax: ts.to_string(),
            })
    }

    fn message_id(&mut self) -> u16 {
        let id = self.next_message_id;
        self.next_message_id = self.next_message_id.checked_add(1).unwrap_or(1);
        id
    }

    /// Send `bytes` as one message part (command or data set) on context
    /// `pc`: one PDV per PDU, each as large as the SCP accepts.
    async fn send_fragments(
        &mut self,
        pc: u8,
        value_type: PDataValueType,
        bytes: &[u8],
    ) -> Result<(), ScuError> {
        let mut chunks = bytes.chunks(self.fragment.max(1)).peekable();
        while let Some(part) = chunks.next() {
            let pdu = Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: pc,
                    value_type: value_type.clone(),
                    is_last: chunks.peek().is_none(),
                    data: part.to_vec(),
                }],
            };
            // dicom-ul bounds each write by the write timeout.
            self.assoc
                .send(&pdu)
                .await
                .map_err(|e| ul_error(e, self.timeout, "a P-DATA PDU to be written"))?;
        }
        Ok(())
    }

    /// Await the response to `message_id` on context `pc`: command
    /// fragments up to the last one, bounded in size and by the timeout.
    async fn response(
        &mut self,
        pc: u8,
        expected_field: u16,
        message_id: u16,
    ) -> Result<ParsedResponse, ScuError> {
        let timeout = self.timeout;
        let doing = "the response";
        let bytes = bounded(timeout, doing, async {
            let mut bytes = Vec::new();
            loop {
                let pdu = self
                    .assoc
                    .receive()
                    .await
                    .map_err(|e| ul_error(e, timeout, doing))?;
                let data = match pdu {
                    Pdu::PData { data } => data,
                    Pdu::AbortRQ { source } => {
                        return Err(ScuError::Protocol(format!(
                            "the SCP aborted the association ({source:?})"
                        )));
                    }
                    Pdu::ReleaseRQ => {
                        return Err(ScuError::Protocol(
                            "the SCP asked for a release while a response was due".into(),
                        ));
                    }
                    pdu @ (Pdu::AssociationRQ(_)
                    | Pdu::AssociationAC(_)
                    | Pdu::AssociationRJ(_)
                    | Pdu::ReleaseRP
                    | Pdu::Unknown { .. }) => {
                        return Err(ScuError::Protocol(format!(
                            "unexpected {} while awaiting a response",
                            pdu.short_description()
                        )));
                    }
                };
                let count = data.len();
                for (i, pdv) in data.into_iter().enumerate() {
                    if pdv.presentation_context_id != pc {
                        return Err(ScuError::Protocol(format!(
                            "response fragment on presentation context {} instead of {pc}",
                            pdv.presentation_context_id
                        )));
                    }
                    match pdv.value_type {
                        PDataValueType::Command => {}
                        PDataValueType::Data => {
                            return Err(ScuError::Protocol(
                                "a data set fragment where a response command was due".into(),
                            ));
                        }
                    }
                    if bytes.len() + pdv.data.len() > MAX_COMMAND_BYTES {
                        return Err(ScuError::Protocol(format!(
                            "response command set over {MAX_COMMAND_BYTES} bytes"
                        )));
                    }
                    bytes.extend_from_slice(&pdv.data);
                    if pdv.is_last {
                        if i + 1 != count {
                            return Err(ScuError::Protocol(
                                "fragments after the last fragment of a response".into(),
                            ));
                        }
                        return Ok(bytes);
                    }
                }
            }
        })
        .await?;
        let rsp = dimse::parse_response(&bytes)
            .map_err(|e| ScuError::Protocol(format!("malformed response: {e}")))?;
        if rsp.field != expected_field {
            return Err(ScuError::Protocol(format!(
                "response with Command Field {:#06X}, expected {expected_field:#06X}",
                rsp.field
            )));
        }
        if rsp.message_id != message_id {
            return Err(ScuError::Protocol(format!(
                "response to message {}, expected {message_id}",
                rsp.message_id
            )));
        }
        Ok(rsp)
    }

    /// C-STORE of one file.
    async fn store(&mut self, pc: u8, file: &Part10<'_>) -> Result<Sent, ScuError> {
        let message_id = self.message_id();
        let command = dimse::store_request(message_id, &file.sop_class, &file.sop_instance)
            .map_err(ScuError::Protocol)?;
        self.send_fragments(pc, PDataValueType::Command, &command)
            .await?;
        self.send_fragments(pc, PDataValueType::Data, file.dataset)
            .await?;
        let rsp = self.response(pc, dimse::C_STORE_RSP, message_id).await?;
        if let Some(uid) = &rsp.sop_instance
            && *uid != file.sop_instance
        {
            return Err(ScuError::Protocol(format!(
                "C-STORE-RSP for instance {uid}, expected {}",
                file.sop_instance
            )));
        }
        Ok(Sent {
            sop_instance_uid: file.sop_instance.clone(),
            status: rsp.status,
            error_comment: rsp.comment,
        })
    }

    /// A-RELEASE; a failure is only logged (every answer is already in).
    async fn release(self) {
        let timeout = self.timeout;
        let doing = "A-RELEASE-RP";
        let out = bounded(timeout, doing, async {
            self.assoc
                .release()
                .await
                .map_err(|e| ul_error(e, timeout, doing))
        })
        .await;
        if let Err(e) = out {
            warn!(error = %e, "association release failed");
        }
    }

    /// A-ABORT after an error (best effort, bounded), then return `e`.
    async fn abort<T>(self, e: ScuError) -> Result<T, ScuError> {
        debug!(error = %e, "aborting the association");
        let timeout = self.timeout;
        let _ = tokio::time::timeout(timeout, self.assoc.abort()).await;
        Err(e)
    }
}

/// Sends `files` (complete Part 10 files) with C-STORE over one
/// association and returns each one's response, in order.
///
/// One presentation context is proposed per distinct (SOP class, transfer
/// syntax) of the files, read from each file's meta group with
/// dicom-object, with that transfer syntax only: the data set bytes after
/// the meta group are sent exactly as they are, never re-encoded. The files
/// are checked before connecting (a file that is not Part 10 gives
/// [`ScuError::NotPart10`] with its index, more than
/// [`MAX_PRESENTATION_CONTEXTS`] pairs [`ScuError::TooManyContexts`]), and
/// every context must be accepted before the first C-STORE
/// ([`ScuError::NoContext`] otherwise). A failure status is not an error:
/// it is returned in [`Sent::status`] and the next file goes on.
/// `progress(done, total)` is called after each response. The association
/// is released at the end (a failed release is only logged); after any
/// error it is aborted.
pub async fn send_files(
    addr: &str,
    opts: &ScuOptions,
    files: &[Vec<u8>],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Sent>, ScuError> {
    validate(opts)?;
    let parsed = files
        .iter()
        .enumerate()
        .map(|(index, bytes)| {
            split_part10(bytes).map_err(|reason| ScuError::NotPart10 { index, reason })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if parsed.is_empty() {
        return Ok(Vec::new());
    }
    let mut contexts: Vec<(&str, &str)> = Vec::new();
    for f in &parsed {
        let pair = (f.sop_class.as_str(), f.transfer_syntax.as_str());
        if !contexts.contains(&pair) {
            contexts.push(pair);
        }
    }
    if contexts.len() > MAX_PRESENTATION_CONTEXTS {
        return Err(ScuError::TooManyContexts(contexts.len()));
    }
    let mut link = associate(addr, opts, &contexts).await?;
    let mut ids = Vec::with_capacity(contexts.len());
    for (sop_class, ts) in &contexts {
        match link.context_id(sop_class, ts) {
            Ok(id) => ids.push(((*sop_class, *ts), id)),
            Err(e) => return link.abort(e).await,
        }
    }
    let total = parsed.len();
    let mut sent = Vec::with_capacity(total);
    for file in &parsed {
        let pair = (file.sop_class.as_str(), file.transfer_syntax.as_str());
        let Some(&(_, pc)) = ids.iter().find(|(p, _)| *p == pair) else {
            let e = ScuError::NoContext {
                sop_class: file.sop_class.clone(),
                transfer_syntax: file.transfer_syntax.clone(),
            };
            return link.abort(e).await;
        };
        match link.store(pc, file).await {
            Ok(s) => {
                debug!(sop_instance = %s.sop_instance_uid, status = s.status, "C-STORE answered");
                sent.push(s);
                progress(sent.len(), total);
            }
            Err(e) => return link.abort(e).await,
        }
    }
    link.release().await;
    Ok(sent)
}

/// C-ECHO (Verification, Implicit VR LE) over a new association; returns
/// the response status (0x0000: the SCP is there and talks DICOM).
pub async fn echo(addr: &str, opts: &ScuOptions) -> Result<u16, ScuError> {
    validate(opts)?;
    let mut link = associate(addr, opts, &[(uids::VERIFICATION, IMPLICIT_VR_LE)]).await?;
    let pc = match link.context_id(uids::VERIFICATION, IMPLICIT_VR_LE) {
        Ok(pc) => pc,
        Err(e) => return link.abort(e).await,
    };
    let message_id = link.message_id();
    let exchange = async {
        let command = dimse::echo_request(message_id).map_err(ScuError::Protocol)?;
        link.send_fragments(pc, PDataValueType::Command, &command)
            .await?;
        link.response(pc, dimse::C_ECHO_RSP, message_id).await
    };
    match exchange.await {
        Ok(rsp) => {
            link.release().await;
            Ok(rsp.status)
        }
        Err(e) => link.abort(e).await,
    }
}

pub mod get;

#[cfg(test)]
mod tests;
