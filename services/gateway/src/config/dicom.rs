//! The `[dicom]` section: de-identification's temporal option, the C-STORE
//! SCP, the query/retrieve peers bound to identities and the C-MOVE
//! destinations, with their checks; and the `[dicomweb]` section.

use std::collections::BTreeSet;

use serde::Deserialize;
use tessera_scp::Cidr;
use tessera_tls::Identity;

/// The `[dicomweb]` section: HTTPS with mutual TLS (the gRPC server's
/// certificate, CA and role map).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DicomWebSection {
    pub listen: std::net::SocketAddr,
    /// Largest STOW-RS request body; larger ones are refused with 413.
    #[serde(default = "default_dicomweb_request_bytes")]
    pub max_request_bytes: u64,
}

fn default_dicomweb_request_bytes() -> u64 {
    512 << 20
}

/// Retain Longitudinal Temporal Information (PS3.15 E.3.6) for the
/// de-identified files researchers receive.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TemporalOption {
    /// Basic Profile: dates and times removed or replaced.
    #[default]
    Remove,
    /// Retain full dates.
    RetainFull,
    /// Shift every date of a study by the same number of days (1..=3650,
    /// derived per study from its metadata key; times kept).
    RetainModified,
}

/// The `[dicom]` section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DicomSection {
    #[serde(default)]
    pub temporal: TemporalOption,
    /// Release de-identified copies of instances whose Burned In Annotation
    /// is YES (their pixels may show identity). Off by default: such an
    /// instance is refused to roles that get de-identified files.
    #[serde(default)]
    pub deidentify_burned_in: bool,
    /// When a retrieve (C-GET, C-MOVE, WADO-RS and its `/metadata`) is
    /// refused for lack of a grant on a study the caller sees (as owner or
    /// delegate), file an access request for it on the caller's behalf
    /// (as RequestAccess does), unless one filed here is still pending;
    /// the refusal names the request. Off by default.
    #[serde(default)]
    pub file_requests: bool,
    /// The C-STORE SCP; absent: DICOM arrives over gRPC only.
    pub scp: Option<ScpSection>,
}

/// The `[dicom.scp]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ScpSection {
    /// Where the SCP listens (plain DICOM upper layer: put it on the
    /// trusted hospital network only).
    pub listen: std::net::SocketAddr,
    /// DICOM TLS (PS3.15 Annex B) on its own port, with the gRPC server's
    /// certificate and CA (`[server.tls]`): a client certificate of the CA
    /// is required and its identity (the SPIFFE id, as over gRPC) is the
    /// peer, instead of an AE binding; any calling AE title is admitted.
    /// No certificate or an untrusted one: refused at the handshake and
    /// logged as a security event. Off unless set.
    #[serde(default)]
    pub tls_listen: Option<std::net::SocketAddr>,
    #[serde(default = "default_ae_title")]
    pub ae_title: String,
    /// Calling AE titles that may C-STORE (for `owner`); an AE in neither
    /// this list nor `peers` is rejected.
    #[serde(default)]
    pub allowed_calling_aes: Vec<String>,
    /// Query/retrieve peers (viewers, PACS): each calling AE title bound to
    /// a Tessera identity and the networks it may call from.
    #[serde(default)]
    pub peers: Vec<PeerSection>,
    /// Where C-MOVE may send: any other destination is refused.
    #[serde(default)]
    pub move_destinations: Vec<MoveDestination>,
    /// The data owner of studies received over C-STORE.
    pub owner: String,
    #[serde(default = "default_associations")]
    pub max_associations: u32,
    /// Seconds without a PDU before an association is aborted.
    #[serde(default = "default_idle_secs")]
    pub idle_timeout_secs: u64,
    /// The ARTIM timer: seconds a new connection has to send its whole
    /// A-ASSOCIATE-RQ; silent connections hold no association slot.
    #[serde(default = "default_artim_secs")]
    pub artim_timeout_secs: u64,
    /// The Tessera identity recorded as `stored_by` of what arrives over
    /// C-STORE (the calling AE title is not authenticated, so it is never
    /// recorded as who stored anything). Default: the gateway's own
    /// identity, `spiffe://<server.access.trust_domain>/service/gateway`.
    #[serde(default)]
    pub stored_by: Option<String>,
}

/// One `[[dicom.scp.peers]]` entry: DIMSE has no authentication, so the
/// calling AE title stands for `identity` (whose roles and grants decide
/// everything it sees) only from `networks`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub ae_title: String,
    /// `spiffe://<trust domain>/user/<name>`.
    pub identity: String,
    /// CIDR ranges (`10.1.0.0/16`, `127.0.0.1/32`); at least one.
    pub networks: Vec<String>,
    /// The AE-to-request rule: a DIMSE client cannot name a request, so
    /// this AE's C-GET and C-MOVE spend the grant of this request id
    /// (`rq-...`, as DICOMweb's `X-Tessera-Request`) instead of the
    /// identity's usable grant that expires first. Unset: that one.
    #[serde(default)]
    pub request: Option<String>,
}

/// One `[[dicom.scp.move_destinations]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MoveDestination {
    pub ae_title: String,
    /// `host:port` of the destination's storage SCP.
    pub address: String,
}

fn default_artim_secs() -> u64 {
    10
}

fn default_ae_title() -> String {
    "TESSERA".into()
}
fn default_associations() -> u32 {
    16
}
fn default_idle_secs() -> u64 {
    60
}

pub(super) fn valid_ae(ae: &str) -> bool {
    !ae.trim().is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

/// Checks `[[dicom.scp.peers]]` and `[[dicom.scp.move_destinations]]`.
pub fn validate_peers(s: &ScpSection, trust_domain: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for p in &s.peers {
        let ae = p.ae_title.trim();
        if ae.is_empty() || ae.len() > 16 || ae.contains('\\') || !ae.is_ascii() {
            return Err(format!(
                "dicom.scp.peers: {:?} is not an AE title",
                p.ae_title
            ));
        }
        if !seen.insert(ae.to_string()) {
            return Err(format!("dicom.scp.peers: AE title {ae:?} appears twice"));
        }
        let id = Identity::parse_uri(&p.identity)
            .map_err(|e| format!("dicom.scp.peers {ae}: identity {:?}: {e}", p.identity))?;
        if id.trust_domain() != trust_domain {
            return Err(format!(
                "dicom.scp.peers {ae}: identity {:?} is not in trust domain {trust_domain:?}",
                p.identity
            ));
        }
        if p.networks.is_empty() {
            return Err(format!(
                "dicom.scp.peers {ae}: networks must list at least one CIDR range"
            ));
        }
        for n in &p.networks {
            n.parse::<Cidr>()
                .map_err(|e| format!("dicom.scp.peers {ae}: {e}"))?;
        }
    }
    for d in &s.move_destinations {
        let ae = d.ae_title.trim();
        if ae.is_empty() || ae.len() > 16 || ae.contains('\\') || d.address.is_empty() {
            return Err(format!(
                "dicom.scp.move_destinations: {:?} -> {:?}: an AE title and host:port",
                d.ae_title, d.address
            ));
        }
    }
    Ok(())
}
