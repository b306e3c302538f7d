//! A DICOM C-STORE service class provider (plus C-ECHO / Verification) on
//! dicom-ul.
//!
//! A modality or PACS sends images with C-STORE as it would to any archive;
//! each received instance becomes a complete Part 10 file (preamble, `DICM`,
//! a file meta group written here, then the data set bytes exactly as they
//! arrived) handed to an [`InstanceSink`], whose [`StoreOutcome`] becomes the
//! C-STORE-RSP status. The crate knows nothing of the rest of Tessera.
//!
//! Limits: calling and called AE titles are checked (fail closed), the number
//! of concurrent associations is bounded, a connection must complete its
//! A-ASSOCIATE-RQ within `artim_timeout` (holding no association slot until
//! it starts one), every PDU read is bounded by `max_pdu_length` and
//! `idle_timeout`, and every data set by `max_instance_bytes`. See the
//! README for the statuses.
//!
//! [`scu`] is the other side: it sends Part 10 files with C-STORE (and
//! C-ECHO) to this SCP or any other.

mod association;
mod dimse;
mod identifier;
mod net;
mod qr;
mod query;
pub mod scu;

pub use net::Cidr;
pub use query::{
    FindOutcome, FindRequest, QueryKey, RetrieveKind, RetrieveOutcome, RetrieveRequest,
    STATUS_CANCEL, STATUS_IDENTIFIER_MISMATCH, STATUS_MOVE_DESTINATION_UNKNOWN,
    STATUS_NOT_AUTHORIZED, STATUS_PENDING, STATUS_SUBOPS_IMPOSSIBLE, STATUS_SUBOPS_WARNING,
};

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::association::server::{AccessControl, Negotiation, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJServiceUserReason, MINIMUM_PDU_SIZE, RequestorRoles, UserIdentity,
};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Implementation Class UID written in (0002,0012) of every file.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.87146146561537248212016202968034383609";
/// Implementation Version Name written in (0002,0013) of every file.
pub const IMPLEMENTATION_VERSION_NAME: &str = "TESSERA_SCP";

/// Largest `max_pdu_length` accepted: a PDU is held in memory while read.
pub const MAX_PDU_LENGTH_LIMIT: u32 = 16 * 1024 * 1024;

/// Associations turned away for being over `max_associations` are answered
/// (A-ASSOCIATE-RJ, transient, local limit exceeded) by at most this many
/// tasks at once; beyond that the connection is closed without an answer.
const MAX_REJECTING_TASKS: usize = 8;

/// Connections that have not yet sent their first byte: at most this many
/// per association slot, and at least [`MIN_PENDING`]; beyond that a new
/// connection is closed at once. They hold no association slot, only one of
/// these, for at most `artim_timeout`.
const PENDING_PER_ASSOCIATION: usize = 4;
const MIN_PENDING: usize = 64;

/// Configuration of the SCP.
#[derive(Debug, Clone)]
pub struct ScpConfig {
    /// Our AE title; associations calling another called-AE are rejected.
    pub ae_title: String,
    /// Calling AE titles allowed to associate (exact match after trimming
    /// spaces). Fail closed: an empty list rejects every association.
    pub allowed_calling_aes: Vec<String>,
    /// Largest P-DATA PDU we accept (announced in the A-ASSOCIATE-AC);
    /// larger PDUs abort the association.
    pub max_pdu_length: u32,
    /// Largest data set accepted; a larger one is read to the end without
    /// being kept and answered with 0xA700 (Out of Resources).
    pub max_instance_bytes: u64,
    /// Concurrent associations; more are rejected (transient, local limit
    /// exceeded).
    pub max_associations: usize,
    /// No complete PDU for this long aborts the association; also the grace
    /// period of a shutdown.
    pub idle_timeout: Duration,
    /// The ARTIM timer (PS3.8 9.1.5): a connection that has not sent and
    /// completed its A-ASSOCIATE-RQ within this is closed. Until its first
    /// byte arrives a connection holds no association slot.
    pub artim_timeout: Duration,
    /// SOP classes accepted by C-STORE besides the standard storage SOP
    /// classes (for instance a vendor's private SOP class).
    pub extra_sop_classes: Vec<String>,
    /// Per calling AE title, the networks its associations must come from
    /// (an AE listed here with no network matching the peer's address is
    /// rejected like an unknown AE). AEs not listed: any address.
    pub calling_ae_networks: Vec<(String, Vec<Cidr>)>,
    /// C-MOVE destinations: AE title -> `host:port`. Any other destination
    /// is refused (0xA801).
    pub move_destinations: Vec<(String, String)>,
}

impl Default for ScpConfig {
    fn default() -> Self {
        ScpConfig {
            ae_title: "TESSERA".into(),
            allowed_calling_aes: Vec::new(),
            max_pdu_length: 64 * 1024,
            max_instance_bytes: 1024 * 1024 * 1024,
            max_associations: 16,
            idle_timeout: Duration::from_secs(60),
            artim_timeout: Duration::from_secs(10),
            extra_sop_classes: Vec::new(),
            calling_ae_networks: Vec::new(),
            move_destinations: Vec::new(),
        }
    }
}

impl ScpConfig {
    fn validate(&self) -> io::Result<()> {
        let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if !valid_ae_title(&self.ae_title) {
            return invalid(format!(
                "ae_title {:?}: 1 to 16 printable ASCII characters, no backslash",
                self.ae_title
            ));
        }
        if let Some(ae) = self
            .allowed_calling_aes
            .iter()
            .find(|ae| !valid_ae_title(ae))
        {
            return invalid(format!(
                "allowed calling AE title {ae:?} is not an AE title"
            ));
        }
        if !(MINIMUM_PDU_SIZE..=MAX_PDU_LENGTH_LIMIT).contains(&self.max_pdu_length) {
            return invalid(format!(
                "max_pdu_length {} outside {MINIMUM_PDU_SIZE}..={MAX_PDU_LENGTH_LIMIT}",
                self.max_pdu_length
            ));
        }
        if self.max_instance_bytes == 0 {
            return invalid("max_instance_bytes is 0".into());
        }
        if self.max_associations == 0 || self.max_associations > Semaphore::MAX_PERMITS {
            return invalid(format!("max_associations {}", self.max_associations));
        }
        if self.idle_timeout.is_zero() {
            return invalid("idle_timeout is 0".into());
        }
        if self.artim_timeout.is_zero() {
            return invalid("artim_timeout is 0".into());
        }
        if let Some(uid) = self
            .extra_sop_classes
            .iter()
            .find(|u| !dimse::is_valid_uid(u))
        {
            return invalid(format!("extra SOP class {uid:?} is not a UID"));
        }
        if let Some((ae, _)) = self
            .move_destinations
            .iter()
            .find(|(ae, addr)| !valid_ae_title(ae) || addr.is_empty())
        {
            return invalid(format!(
                "move destination {ae:?}: an AE title and host:port"
            ));
        }
        Ok(())
    }
}

pub(crate) fn valid_ae_title(ae: &str) -> bool {
    let t = ae.trim_matches(' ');
    !t.is_empty() && t.len() <= 16 && t.bytes().all(|b| (0x20..0x7F).contains(&b) && b != b'\\')
}

/// One instance received by C-STORE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The association's calling AE title.
    pub calling_ae: String,
    /// On a DICOM TLS association, the client certificate's identity
    /// (`spiffe://...`).
    pub tls_identity: Option<String>,
    /// The peer's socket address.
    pub peer: SocketAddr,
    /// Affected SOP Class UID of the C-STORE-RQ (also in (0002,0002)).
    pub sop_class_uid: String,
    /// Affected SOP Instance UID of the C-STORE-RQ (also in (0002,0003)).
    pub sop_instance_uid: String,
    /// The presentation context's transfer syntax (also in (0002,0010)).
    pub transfer_syntax: String,
    /// The complete Part 10 file: 128-byte preamble, `DICM`, the file meta
    /// group written by us (Explicit VR LE), then the data set bytes exactly
    /// as received.
    pub file: Vec<u8>,
    /// Offset of the data set in `file`.
    pub dataset_offset: usize,
}

impl Received {
    /// The data set bytes exactly as received.
    pub fn dataset(&self) -> &[u8] {
        self.file.get(self.dataset_offset..).unwrap_or_default()
    }
}

/// What the sink did with an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored: the C-STORE-RSP status is 0x0000.
    Stored,
    /// Not stored: `status` is sent back in the C-STORE-RSP (for instance
    /// 0xA700 out of resources, 0xA900 data set does not match SOP class,
    /// 0xC000 cannot understand) with `reason` as its Error Comment
    /// (truncated to 64 characters). A status of 0x0000 here is sent as
    /// 0xC000: a refusal never reads as success.
    Refused { status: u16, reason: String },
}

/// Where received instances go, and what C-FIND, C-GET and C-MOVE answer.
pub trait InstanceSink: Send + Sync + 'static {
    fn store(&self, received: Received) -> impl Future<Output = StoreOutcome> + Send;

    /// The matches of a Study Root C-FIND. Default: none served (0x0122).
    fn find(&self, request: FindRequest) -> impl Future<Output = FindOutcome> + Send {
        drop(request);
        async {
            FindOutcome::Refused {
                status: dimse::STATUS_SOP_CLASS_NOT_SUPPORTED,
                reason: "query is not served here".into(),
            }
        }
    }

    /// The instances of a Study Root C-GET or C-MOVE. Default: none
    /// served (0x0122).
    fn retrieve(&self, request: RetrieveRequest) -> impl Future<Output = RetrieveOutcome> + Send {
        drop(request);
        async {
            RetrieveOutcome::Refused {
                status: dimse::STATUS_SOP_CLASS_NOT_SUPPORTED,
                reason: "retrieve is not served here".into(),
            }
        }
    }

    /// An association was rejected: unknown calling AE, an address outside
    /// its networks, or a wrong called AE (for the security log).
    fn association_refused(&self, calling_ae: &str, peer: SocketAddr, reason: &str) {
        let _ = (calling_ae, peer, reason);
    }
}

/// A bound, not yet serving, SCP.
pub struct Scp {
    listener: TcpListener,
    local_addr: SocketAddr,
    cfg: Arc<ScpConfig>,
    /// DICOM TLS (PS3.15 Annex B): every connection is a TLS handshake
    /// requiring a client certificate of the CA; the peer is its identity.
    tls: Option<Arc<tessera_tls::ServerTls>>,
}

/// Called-AE, calling-AE and peer address check done by dicom-ul during
/// negotiation; the reason of a rejection is kept in `refusal`.
#[derive(Debug)]
pub(crate) struct AeFilter {
    /// DICOM TLS: the certificate names the peer, any calling AE title is
    /// admitted (the called AE title is still checked).
    pub(crate) any_calling_ae: bool,
    allowed_calling_aes: Vec<String>,
    networks: Vec<(String, Vec<Cidr>)>,
    peer: Option<std::net::IpAddr>,
    pub(crate) refusal: Arc<std::sync::Mutex<Option<(String, String)>>>,
}

impl AeFilter {
    pub(crate) fn new(cfg: &ScpConfig, peer: Option<std::net::IpAddr>) -> Self {
        AeFilter {
            any_calling_ae: false,
            allowed_calling_aes: cfg.allowed_calling_aes.clone(),
            networks: cfg.calling_ae_networks.clone(),
            peer,
            refusal: Arc::default(),
        }
    }

    fn refuse(
        &self,
        calling: &str,
        reason: String,
        r: AssociationRJServiceUserReason,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if let Ok(mut slot) = self.refusal.lock() {
            *slot = Some((calling.to_string(), reason));
        }
        Err(r)
    }
}

impl AccessControl for AeFilter {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        let calling = calling_ae_title.trim_matches(' ');
        if called_ae_title.trim_matches(' ') != this_ae_title.trim_matches(' ') {
            return self.refuse(
                calling,
                format!("called AE title {:?} is not ours", called_ae_title.trim()),
                AssociationRJServiceUserReason::CalledAETitleNotRecognized,
            );
        }
        if self.any_calling_ae {
            return Ok(());
        }
        if !self
            .allowed_calling_aes
            .iter()
            .any(|ae| ae.trim_matches(' ') == calling)
        {
            return self.refuse(
                calling,
                format!("calling AE title {calling:?} is not configured"),
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            );
        }
        if let Some((_, nets)) = self
            .networks
            .iter()
            .find(|(ae, _)| ae.trim_matches(' ') == calling)
            && !self
                .peer
                .is_some_and(|ip| nets.iter().any(|n| n.contains(ip)))
        {
            let from = self.peer.map(|ip| ip.to_string()).unwrap_or_default();
            return self.refuse(
                calling,
                format!(
                    "calling AE title {calling:?} from {from}, outside its configured networks"
                ),
                AssociationRJServiceUserReason::CallingAETitleNotRecognized,
            );
        }
        Ok(())
    }
}

/// Role selection: a requestor may take the SCP role for storage SOP
/// classes (how C-GET sends its instances back); nothing else is answered.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QrNegotiation;

impl Negotiation for QrNegotiation {
    fn negotiate_roles(
        &self,
        sop_class_uid: &str,
        scu_role: bool,
        scp_role: bool,
    ) -> Option<RequestorRoles> {
        let uid = sop_class_uid.trim_end_matches(['\0', ' ']);
        dimse::is_standard_storage_sop_class(uid).then_some(RequestorRoles {
            scu: scu_role,
            scp: scp_role,
        })
    }
}

pub(crate) type Options = ServerAssociationOptions<'static, AeFilter, QrNegotiation>;

pub(crate) fn association_options(cfg: &ScpConfig, filter: AeFilter) -> Options {
    // Every abstract syntax is accepted at negotiation (promiscuous): the
    // standard dictionary cannot be enumerated, so the storage check is made
    // per C-STORE-RQ (0x0122 for a non-storage SOP class). Transfer
    // syntaxes: the first proposed one that the transfer syntax registry
    // supports (dicom-ul's default), others are rejected per context.
    ServerAssociationOptions::new()
        .ae_access_control(filter)
        .with_negotiation(QrNegotiation)
        .ae_title(cfg.ae_title.trim_matches(' ').to_string())
        .promiscuous(true)
        .strict(true)
        .max_pdu_length(cfg.max_pdu_length)
        .read_timeout(cfg.idle_timeout)
        .write_timeout(cfg.idle_timeout)
}

impl Scp {
    /// Validate `cfg` and bind the listening socket.
    pub async fn bind(addr: SocketAddr, cfg: ScpConfig) -> io::Result<Scp> {
        cfg.validate()?;
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Scp {
            listener,
            local_addr,
            cfg: Arc::new(cfg),
            tls: None,
        })
    }

    /// As [`Scp::bind`], for DICOM TLS (PS3.15 Annex B): each connection
    /// must complete a TLS handshake with a client certificate `tls`
    /// trusts (within `artim_timeout`), and the certificate's identity is
    /// the peer ([`Received::tls_identity`], [`FindRequest::tls_identity`],
    /// [`RetrieveRequest::tls_identity`]) whatever its calling AE title;
    /// `allowed_calling_aes` and the AE networks do not apply. A failed
    /// handshake is refused and reported to
    /// [`InstanceSink::association_refused`].
    pub async fn bind_tls(
        addr: SocketAddr,
        cfg: ScpConfig,
        tls: tessera_tls::ServerTls,
    ) -> io::Result<Scp> {
        let mut scp = Self::bind(addr, cfg).await?;
        scp.tls = Some(Arc::new(tls));
        Ok(scp)
    }

    /// The bound address (with the port chosen by the system for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves; each association on its own task;
    /// returns after in-flight associations end (bounded by idle_timeout).
    ///
    /// On shutdown the listener is closed, associations waiting between
    /// messages are aborted, associations in the middle of a message finish
    /// it (including the sink call), and whatever still runs after
    /// `idle_timeout` is cancelled.
    pub async fn serve<S: InstanceSink>(
        self,
        sink: Arc<S>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let Scp {
            listener,
            local_addr,
            cfg,
            tls,
        } = self;
        let permits = Arc::new(Semaphore::new(cfg.max_associations));
        let rejecting = Arc::new(Semaphore::new(MAX_REJECTING_TASKS));
        let pending = Arc::new(Semaphore::new(
            cfg.max_associations
                .saturating_mul(PENDING_PER_ASSOCIATION)
                .max(MIN_PENDING),
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        info!(%local_addr, ae_title = %cfg.ae_title, "DICOM SCP serving");
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    if let Err(e) = done {
                        warn!(error = %e, "association task failed");
                    }
                }
                accepted = listener.accept() => {
                    let (socket, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors, connection reset before
                            // accept...: keep serving, but do not spin.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if let Err(e) = socket.set_nodelay(true) {
                        debug!(%peer, error = %e, "set_nodelay failed");
                    }
                    let Ok(waiting) = pending.clone().try_acquire_owned() else {
                        debug!(%peer, "too many silent connections: closing");
                        drop(socket);
                        continue;
                    };
                    let task = association::Task {
                        cfg: cfg.clone(),
                        sink: sink.clone(),
                        stop: stop_rx.clone(),
                        peer,
                    };
                    let (permits, rejecting) = (permits.clone(), rejecting.clone());
                    let tls = tls.clone();
                    tasks.spawn(async move {
                        // ARTIM: wait for the first byte without holding an
                        // association slot.
                        if !association::first_byte(&socket, peer, &task.cfg, task.stop.clone()).await {
                            return;
                        }
                        drop(waiting);
                        match permits.try_acquire_owned() {
                            Ok(permit) => {
                                match tls {
                                    Some(tls) => task.run_tls(socket, &tls).await,
                                    None => task.run(socket).await,
                                }
                                drop(permit);
                            }
                            Err(_) => match rejecting.try_acquire_owned() {
                                Ok(permit) => {
                                    warn!(%peer, max = task.cfg.max_associations, "too many associations: rejecting");
                                    association::reject_busy(socket, peer, &task.cfg).await;
                                    drop(permit);
                                }
                                Err(_) => {
                                    warn!(%peer, "too many associations: closing the connection");
                                    drop(socket);
                                }
                            },
                        }
                    });
                }
            }
        }
        drop(listener);
        info!(
            in_flight = tasks.len(),
            "DICOM SCP shutting down: waiting for associations"
        );
        // Receivers treat a dropped sender as a stop too, so the result
        // does not matter.
        let _ = stop_tx.send(true);
        let mut grace = std::pin::pin!(tokio::time::sleep(cfg.idle_timeout));
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    None => break,
                    Some(Err(e)) if e.is_panic() => warn!(error = %e, "association task panicked"),
                    Some(_) => {}
                },
                () = &mut grace => {
                    warn!(remaining = tasks.len(), "shutdown grace period over: cancelling associations");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        info!("DICOM SCP stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(ScpConfig::default().validate().is_ok());
        let bad = [
            ScpConfig {
                ae_title: String::new(),
                ..ScpConfig::default()
            },
            ScpConfig {
                ae_title: "A_TITLE_LONGER_THAN_16".into(),
                ..ScpConfig::default()
            },
            ScpConfig {
                allowed_calling_aes: vec!["BAD\\AE".into()],
                ..ScpConfig::default()
            },
            ScpConfig {
                max_pdu_length: 100,
                ..ScpConfig::default()
            },
            ScpConfig {
                max_pdu_length: u32::MAX,
                ..ScpConfig::default()
            },
            ScpConfig {
                max_associations: 0,
                ..ScpConfig::default()
            },
            ScpConfig {
                idle_timeout: Duration::ZERO,
                ..ScpConfig::default()
            },
            ScpConfig {
                artim_timeout: Duration::ZERO,
                ..ScpConfig::default()
            },
            ScpConfig {
                max_instance_bytes: 0,
                ..ScpConfig::default()
            },
            ScpConfig {
                extra_sop_classes: vec!["not a uid".into()],
                ..ScpConfig::default()
            },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
    }

    #[test]
    fn ae_filter_fails_closed() {
        let cfg = ScpConfig {
            allowed_calling_aes: vec!["MODALITY".into(), "VIEWER".into()],
            calling_ae_networks: vec![("VIEWER".into(), vec!["10.1.0.0/16".parse().unwrap()])],
            ..ScpConfig::default()
        };
        let f = AeFilter::new(&cfg, Some("10.2.0.1".parse().unwrap()));
        assert_eq!(
            f.check_access("TESSERA", "VIEWER", "TESSERA", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized),
            "outside the AE's network"
        );
        assert!(
            f.refusal
                .lock()
                .unwrap()
                .as_ref()
                .unwrap()
                .1
                .contains("outside")
        );
        let inside = AeFilter::new(&cfg, Some("10.1.200.3".parse().unwrap()));
        assert!(
            inside
                .check_access("TESSERA", "VIEWER", "TESSERA", None)
                .is_ok()
        );
        assert!(
            f.check_access("TESSERA", "MODALITY", "TESSERA", None)
                .is_ok()
        );
        assert_eq!(
            f.check_access("TESSERA", "OTHER", "TESSERA", None),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        assert_eq!(
            f.check_access("TESSERA", "MODALITY", "PACS", None),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
        let empty = AeFilter::new(&ScpConfig::default(), None);
        assert!(
            empty
                .check_access("TESSERA", "MODALITY", "TESSERA", None)
                .is_err()
        );
    }
}
