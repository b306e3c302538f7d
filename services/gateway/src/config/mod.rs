//! The gateway's typed config: TOML plus `TESSERA_GATEWAY__*` environment
//! overrides, validated at start (exit 64 on a bad config).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7700"
//! [server.tls]
//! ca = "pki/ca.crt"
//! cert = "pki/gateway.crt"
//! key = "pki/gateway.key"
//!
//! [client_tls]              # our certificate for calls to the other services
//! ca = "pki/ca.crt"
//! cert = "pki/gateway.crt"
//! key = "pki/gateway.key"
//!
//! # Every upstream must present the SPIFFE identity `identity` (default:
//! # spiffe://<server.access.trust_domain>/service/<name>) besides naming
//! # the host of `address`; any other certificate is refused.
//! [keyserver]
//! address = "localhost:7400"
//! identity = "spiffe://tessera.local/service/keyserver"
//! [watermark]
//! address = "localhost:7500"
//! identity = "spiffe://tessera.local/service/watermark"
//! [segmentation]
//! address = "localhost:7550"
//! identity = "spiffe://tessera.local/service/segmentation"
//! # resolve_secs = 10      # keyserver, watermark, segmentation: calls balance
//!                           # over every address the host resolves to, looked
//!                           # up again this often (default 0: one connection
//!                           # to the name; the chart sets 10 with headless
//!                           # Services)
//!
//! [[storage_nodes]]
//! name = "storage-1"        # must equal the node's node_id (checked)
//! address = "localhost:7601"
//! identity = "spiffe://tessera.local/service/storage-1"   # default from name
//! [[storage_nodes]]
//! name = "storage-2"
//! address = "localhost:7602"
//!
//! [upstream_timeouts]       # every outgoing call (defaults shown)
//! connect_secs = 5          # TCP connect + TLS handshake
//! call_secs = 30            # keyserver calls; each message of a storage Get
//! stream_secs = 600         # watermark, segmentation, storage channels:
//!                           # until the answer starts (a whole Put upload)
//!
//! [erasure]                 # optional: k data + m parity fragments per object
//! data = 3                  # k >= 2 (clouds that must collude to rebuild a share)
//! parity = 2                # m: nodes that may be lost or corrupt
//! # write_quorum = 4        # fragments durable before a store is acknowledged (k + 1)
//! # repair_interval_secs = 3600   # background scrub + repair pass (0: off)
//! # repair_objects_per_sec = 20   # its bounded rate
//! # repair_studies_in_flight = 4  # studies a repair pass works on at once
//! # hedge_after_ms = 250    # a read asks one more node when k fragments are this late
//! # orphan_grace_secs = 3600  # a full repair pass removes objects no record names, once this old
//!
//! [vault]                   # or backend = "postgres": see config/vault.rs
//! path = "data/vault.redb"
//! key_file = "secrets/vault.key"   # 32 random bytes (or 64 hex), mode 0600/0400
//!
//! [gateway]
//! max_image_bytes = 268435456
//! max_concurrent_jobs = 32
//! max_inflight_mib = 1024        # memory budget: a job counts 4x its image
//! reidentify_roles = ["owner", "clinician"]
//!
//! [dicom]
//! temporal = "remove"            # or "retain-full", "retain-modified"
//! deidentify_burned_in = false   # refuse researchers' copies of Burned In Annotation = YES
//! file_requests = false          # file a RequestAccess for a retrieve refused for lack of a grant
//! [dicom.scp]                    # optional C-STORE SCP (trusted network)
//! listen = "127.0.0.1:11112"
//! ae_title = "TESSERA"
//! allowed_calling_aes = ["CT01", "PACS"]
//! owner = "spiffe://tessera.local/user/owner"
//! artim_timeout_secs = 10        # the whole A-ASSOCIATE-RQ within this
//! # stored_by = "spiffe://tessera.local/service/gateway"   # the default
//! [dicomweb]               # optional: QIDO-RS, WADO-RS, STOW-RS over mutual TLS
//! listen = "127.0.0.1:8042" # the [server.tls] certificate and CA; [server.access] roles
//! max_request_bytes = 536870912   # largest STOW-RS body (413 beyond)
//! [admin]                  # optional: plain HTTP /metrics, /live, /ready
//! listen = "127.0.0.1:9464" # loopback by default (port 0: any)
//! ```

use std::time::Duration;

use serde::Deserialize;
use tessera_runtime::{AdminConfig, ServerConfig, TelemetryConfig, Validate};
use tessera_tls::{ChannelTimeouts, Identity, Role, TlsFiles};

mod dicom;
mod vault;
use dicom::valid_ae;
pub use dicom::{
    DicomSection, DicomWebSection, MoveDestination, PeerSection, ScpSection, TemporalOption,
    validate_peers,
};
pub use vault::{VaultBackend, VaultSection};

/// Environment prefix of overrides, e.g. `TESSERA_GATEWAY__VAULT__PATH`.
pub const ENV_PREFIX: &str = "TESSERA_GATEWAY";

/// Largest image any config may allow: `MAX_SAMPLES` 16-bit words.
pub const MAX_IMAGE_BYTES_CEILING: u64 = tessera_image::MAX_SAMPLES * 2;

/// Most storage nodes a gateway places on (the segmentation service's
/// region limit).
pub const MAX_STORAGE_NODES: usize = 16;

/// The whole config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, TLS files, roles.
    pub server: ServerConfig,
    /// Plain-HTTP admin listener (`/metrics`, `/live`, `/ready`), off
    /// the mutual-TLS port; no listener when the section is absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The gateway's own certificate for every outgoing call.
    pub client_tls: TlsFiles,
    pub keyserver: Upstream,
    pub watermark: Upstream,
    pub segmentation: Upstream,
    /// The storage nodes shares and fragments are placed on (at least two).
    pub storage_nodes: Vec<StorageNode>,
    pub vault: VaultSection,
    /// Deadlines of every call to an upstream.
    #[serde(default)]
    pub upstream_timeouts: UpstreamTimeouts,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub dicom: DicomSection,
    #[serde(default)]
    pub erasure: Option<ErasureSection>,
    /// The DICOMweb listener; absent: none.
    #[serde(default)]
    pub dicomweb: Option<DicomWebSection>,
}

/// A service the gateway calls.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port`; the service's certificate must name `host`.
    pub address: String,
    /// The SPIFFE identity the service must present; default
    /// `spiffe://<server.access.trust_domain>/service/<section name>`.
    #[serde(default)]
    pub identity: Option<String>,
    /// Calls balance over every address `host` resolves to (a headless
    /// Kubernetes Service names each replica), resolved again every this
    /// many seconds; 0: one connection to the name, resolved when it
    /// connects (the default: `localhost` resolves to `::1` and
    /// `127.0.0.1` while a local service listens on one of them).
    #[serde(default)]
    pub resolve_secs: u64,
}

/// Longest re-resolution period of a balanced upstream.
pub use tessera_tls::MAX_RESOLVE_SECS;

/// One `[[storage_nodes]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StorageNode {
    /// The node's configured `node_id`; the gateway checks it at NodeInfo.
    pub name: String,
    pub address: String,
    /// The node's failure domain (its cloud or region): fragments of one
    /// object spread across zones first. Empty: the node is its own zone.
    #[serde(default)]
    pub zone: String,
    /// The SPIFFE identity the node must present; default
    /// `spiffe://<server.access.trust_domain>/service/<name>`.
    #[serde(default)]
    pub identity: Option<String>,
}

/// The `[erasure]` section: every stored object (pixel shares, sealed
/// pixels, metadata envelopes) is cut into `data` + `parity` fragments on
/// that many distinct storage nodes; any `data` of them rebuild it.
/// Absent: each object is stored whole on one node (one copy).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErasureSection {
    /// k: fragments needed to rebuild (and the number of clouds that must
    /// collude to rebuild a share): at least 2.
    pub data: usize,
    /// m: fragments that may be lost or corrupt.
    pub parity: usize,
    /// Fragments that must be durable before a store is acknowledged
    /// (default k + 1, at most k + m); the others are recorded as missing
    /// and left to repair.
    #[serde(default)]
    pub write_quorum: Option<usize>,
    /// Seconds between background scrub-and-repair passes over every
    /// object (0: only when an operator runs `tessera repair run`).
    #[serde(default = "default_repair_interval")]
    pub repair_interval_secs: u64,
    /// Objects a background pass checks per second at most (bounded rate:
    /// the clouds' disks and egress are not hammered).
    #[serde(default = "default_repair_rate")]
    pub repair_objects_per_sec: u32,
    /// Studies a repair pass scrubs and repairs at once (each checks its
    /// objects one after the other; `repair_objects_per_sec` bounds them
    /// together).
    #[serde(default = "default_repair_studies_in_flight")]
    pub repair_studies_in_flight: usize,
    /// A read starts with the k preferred fragments; each time this many
    /// milliseconds pass without k verified ones, it asks one more node
    /// (a hedged read: a slow cloud costs this delay, not its whole delay).
    #[serde(default = "default_hedge_after_ms")]
    pub hedge_after_ms: u64,
    /// A full repair pass removes objects on the nodes that no record names
    /// (what a crash left) once they are this many seconds old by the
    /// node's clock: longer than any store runs, plus clock skew.
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace_secs: u64,
}

fn default_orphan_grace() -> u64 {
    3600
}

fn default_hedge_after_ms() -> u64 {
    250
}

fn default_repair_interval() -> u64 {
    3600
}
fn default_repair_rate() -> u32 {
    20
}

/// `[erasure] repair_studies_in_flight` when not given (and for a gateway
/// without `[erasure]`).
pub const DEFAULT_REPAIR_STUDIES_IN_FLIGHT: usize = 4;

fn default_repair_studies_in_flight() -> usize {
    DEFAULT_REPAIR_STUDIES_IN_FLIGHT
}

impl ErasureSection {
    /// The write quorum in force.
    pub fn quorum(&self) -> usize {
        self.write_quorum
            .unwrap_or((self.data + 1).min(self.data + self.parity))
    }
}

/// The `[upstream_timeouts]` section, seconds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// TCP connect plus TLS handshake.
    #[serde(default = "default_connect_secs")]
    pub connect_secs: u64,
    /// Every keyserver call (all unary); also the longest wait for each
    /// message of a storage Get.
    #[serde(default = "default_call_secs")]
    pub call_secs: u64,
    /// Calls to the watermark and segmentation services and the storage
    /// nodes, until their answer starts: a whole Put upload or unary call,
    /// the first message of a Get, Protect, Restore, Segment or Process.
    #[serde(default = "default_stream_secs")]
    pub stream_secs: u64,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect_secs: default_connect_secs(),
            call_secs: default_call_secs(),
            stream_secs: default_stream_secs(),
        }
    }
}

fn default_connect_secs() -> u64 {
    5
}
fn default_call_secs() -> u64 {
    30
}
fn default_stream_secs() -> u64 {
    600
}

impl UpstreamTimeouts {
    /// Channel timeouts of the keyserver (unary calls).
    pub fn unary(&self) -> ChannelTimeouts {
        ChannelTimeouts {
            connect: Duration::from_secs(self.connect_secs),
            call: Some(Duration::from_secs(self.call_secs)),
        }
    }

    /// Channel timeouts of the streaming services and the storage nodes.
    pub fn streaming(&self) -> ChannelTimeouts {
        ChannelTimeouts {
            connect: Duration::from_secs(self.connect_secs),
            call: Some(Duration::from_secs(self.stream_secs)),
        }
    }
}

impl Config {
    /// The identity expected at `[keyserver]`, `[watermark]` or
    /// `[segmentation]` (`name`), explicit or defaulted.
    pub fn upstream_identity(&self, name: &str, u: &Upstream) -> Result<Identity, String> {
        Identity::upstream(
            u.identity.as_deref(),
            &self.server.access.trust_domain,
            name,
        )
        .map_err(|e| format!("{name}.identity: {e}"))
    }

    /// The identity expected at a storage node, explicit or from its name.
    pub fn node_identity(&self, n: &StorageNode) -> Result<Identity, String> {
        Identity::upstream(
            n.identity.as_deref(),
            &self.server.access.trust_domain,
            &n.name,
        )
        .map_err(|e| {
            format!(
                "storage_nodes {:?}: identity: {e} (set `identity` when the name is not a valid identity name)",
                n.name
            )
        })
    }
}

/// The `[gateway]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// Largest file accepted by Store, and largest decoded image (bytes).
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// Store / retrieve / verify / process jobs in flight at once.
    #[serde(default = "default_jobs")]
    pub max_concurrent_jobs: u32,
    /// Memory budget of the jobs in flight, MiB: a job is charged four
    /// times its image (file or pixels plus both shares) and waits for room.
    #[serde(default = "default_memory_mib")]
    pub max_inflight_mib: u32,
    /// Roles whose Retrieve answer carries the patient's identity.
    #[serde(default = "default_reidentify")]
    pub reidentify_roles: Vec<Role>,
    /// Seconds to wait for a storage node's NodeInfo before calling it
    /// unavailable.
    #[serde(default = "default_probe_secs")]
    pub node_probe_timeout_secs: u64,
}

impl Default for GatewaySection {
    fn default() -> Self {
        Self {
            max_image_bytes: default_max_image_bytes(),
            max_concurrent_jobs: default_jobs(),
            max_inflight_mib: default_memory_mib(),
            reidentify_roles: default_reidentify(),
            node_probe_timeout_secs: default_probe_secs(),
        }
    }
}

/// `gateway.max_image_bytes` when the config does not say (256 MiB).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 256 * 1024 * 1024;

fn default_max_image_bytes() -> u64 {
    DEFAULT_MAX_IMAGE_BYTES
}
fn default_jobs() -> u32 {
    32
}
fn default_memory_mib() -> u32 {
    1024
}
fn default_reidentify() -> Vec<Role> {
    vec![Role::Owner, Role::Clinician]
}
fn default_probe_secs() -> u64 {
    3
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        tessera_runtime::validate_service_sections(
            &self.server,
            self.admin.as_ref(),
            &self.telemetry,
        )?;
        self.vault.validate()?;
        for (what, p) in [
            ("client_tls.ca", &self.client_tls.ca),
            ("client_tls.cert", &self.client_tls.cert),
            ("client_tls.key", &self.client_tls.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(format!("{what} must not be empty"));
            }
        }
        for (what, u) in [
            ("keyserver.address", &self.keyserver),
            ("watermark.address", &self.watermark),
            ("segmentation.address", &self.segmentation),
        ] {
            if u.address.trim().is_empty() {
                return Err(format!("{what} must not be empty"));
            }
            let section = what.trim_end_matches(".address");
            tessera_tls::check_resolve_secs(&format!("{section}.resolve_secs"), u.resolve_secs)?;
        }
        self.upstream_identity("keyserver", &self.keyserver)?;
        self.upstream_identity("watermark", &self.watermark)?;
        self.upstream_identity("segmentation", &self.segmentation)?;
        for n in &self.storage_nodes {
            self.node_identity(n)?;
        }
        let t = &self.upstream_timeouts;
        for (what, v, max) in [
            ("upstream_timeouts.connect_secs", t.connect_secs, 300),
            ("upstream_timeouts.call_secs", t.call_secs, 3600),
            ("upstream_timeouts.stream_secs", t.stream_secs, 86_400),
        ] {
            if !(1..=max).contains(&v) {
                return Err(format!("{what} must be 1..={max}"));
            }
        }
        if !(2..=MAX_STORAGE_NODES).contains(&self.storage_nodes.len()) {
            return Err(format!(
                "storage_nodes must list 2..={MAX_STORAGE_NODES} nodes (two shares go to distinct nodes)"
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, n) in self.storage_nodes.iter().enumerate() {
            if n.name.is_empty()
                || n.name.len() > 64
                || !n
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(format!(
                    "storage_nodes[{i}].name must be 1..=64 of [A-Za-z0-9._-]"
                ));
            }
            if n.address.trim().is_empty() {
                return Err(format!("storage_nodes[{i}].address must not be empty"));
            }
            if !names.insert(n.name.as_str()) {
                return Err(format!(
                    "storage_nodes[{i}].name {:?} is listed twice",
                    n.name
                ));
            }
        }
        let g = &self.gateway;
        if !(1..=MAX_IMAGE_BYTES_CEILING).contains(&g.max_image_bytes) {
            return Err(format!(
                "gateway.max_image_bytes must be 1..={MAX_IMAGE_BYTES_CEILING}"
            ));
        }
        if !(1..=1024).contains(&g.max_concurrent_jobs) {
            return Err("gateway.max_concurrent_jobs must be 1..=1024".into());
        }
        if !(16..=1_048_576).contains(&g.max_inflight_mib) {
            return Err("gateway.max_inflight_mib must be 16..=1048576".into());
        }
        if !(1..=600).contains(&g.node_probe_timeout_secs) {
            return Err("gateway.node_probe_timeout_secs must be 1..=600".into());
        }
        if let Some(e) = &self.erasure {
            let n = e.data + e.parity;
            if e.data < 2 {
                return Err(format!(
                    "erasure.data must be at least 2: with {} a single cloud holds a whole share (the confidentiality threshold is k clouds)",
                    e.data
                ));
            }
            if n > self.storage_nodes.len() {
                return Err(format!(
                    "erasure.data + erasure.parity = {n} fragments need {n} storage nodes; {} are configured",
                    self.storage_nodes.len()
                ));
            }
            if e.hedge_after_ms == 0 || e.hedge_after_ms > 60_000 {
                return Err("erasure.hedge_after_ms must be 1..=60000".into());
            }
            if e.repair_objects_per_sec == 0 || e.repair_objects_per_sec > 10_000 {
                return Err("erasure.repair_objects_per_sec must be 1..=10000".into());
            }
            if !(1..=64).contains(&e.repair_studies_in_flight) {
                return Err("erasure.repair_studies_in_flight must be 1..=64".into());
            }
            if !(e.data..=n).contains(&e.quorum()) {
                return Err(format!("erasure.write_quorum must be {}..={n}", e.data));
            }
            tessera_erasure::Scheme::new(e.data, e.parity).map_err(|e| format!("erasure: {e}"))?;
        }
        if let Some(w) = &self.dicomweb
            && !(1..=(16u64 << 30)).contains(&w.max_request_bytes)
        {
            return Err("dicomweb.max_request_bytes must be 1..=17179869184".into());
        }
        if let Some(scp) = &self.dicom.scp {
            if !valid_ae(&scp.ae_title) {
                return Err("dicom.scp.ae_title must be 1..=16 printable characters".into());
            }
            if scp.allowed_calling_aes.is_empty() && scp.peers.is_empty() {
                return Err(
                    "dicom.scp.allowed_calling_aes or dicom.scp.peers must name the calling AE titles".into(),
                );
            }
            validate_peers(scp, &self.server.access.trust_domain)?;
            if let Some(bad) = scp.allowed_calling_aes.iter().find(|a| !valid_ae(a)) {
                return Err(format!(
                    "dicom.scp.allowed_calling_aes: {bad:?} is not an AE title"
                ));
            }
            crate::convert::check_owner("dicom.scp.owner", &scp.owner)
                .map_err(|e| e.to_string())?;
            if !(1..=1024).contains(&scp.max_associations) {
                return Err("dicom.scp.max_associations must be 1..=1024".into());
            }
            if !(1..=300).contains(&scp.artim_timeout_secs) {
                return Err("dicom.scp.artim_timeout_secs must be 1..=300".into());
            }
            if let Some(id) = &scp.stored_by {
                tessera_tls::Identity::parse_uri(id)
                    .map_err(|e| format!("dicom.scp.stored_by {id:?}: {e}"))?;
            }
            if !(1..=3600).contains(&scp.idle_timeout_secs) {
                return Err("dicom.scp.idle_timeout_secs must be 1..=3600".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tessera_runtime::{ConfigError, ConfigSource, load_config};

    fn text(dir: &std::path::Path) -> String {
        for f in ["ca.crt", "gw.crt", "gw.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\n\
             [client_tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\n\
             [keyserver]\naddress = \"localhost:1\"\n[watermark]\naddress = \"localhost:2\"\n[segmentation]\naddress = \"localhost:3\"\n\
             [[storage_nodes]]\nname = \"storage-1\"\naddress = \"localhost:4\"\n\
             [[storage_nodes]]\nname = \"storage-2\"\naddress = \"localhost:5\"\n\
             [vault]\npath = \"{d}/vault.redb\"\nkey_file = \"{d}/vault.key\"\n",
            d = dir.display()
        )
    }

    #[test]
    fn loads_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([(
            "TESSERA_GATEWAY__GATEWAY__MAX_CONCURRENT_JOBS".to_string(),
            "9".to_string(),
        )]);
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX).unwrap();
        assert_eq!(cfg.gateway.max_concurrent_jobs, 9);
        assert_eq!(cfg.storage_nodes.len(), 2);
        assert_eq!(
            cfg.gateway.reidentify_roles,
            vec![Role::Owner, Role::Clinician]
        );
        // Identities default from the names and the trust domain.
        assert_eq!(
            cfg.upstream_identity("keyserver", &cfg.keyserver)
                .unwrap()
                .uri(),
            "spiffe://tessera.local/service/keyserver"
        );
        assert_eq!(
            cfg.node_identity(&cfg.storage_nodes[1]).unwrap().uri(),
            "spiffe://tessera.local/service/storage-2"
        );
        assert_eq!(cfg.upstream_timeouts, UpstreamTimeouts::default());
        assert_eq!(
            cfg.upstream_timeouts.unary().call,
            Some(Duration::from_secs(30))
        );
        // Explicit ones win.
        let env = BTreeMap::from([
            (
                "TESSERA_GATEWAY__KEYSERVER__IDENTITY".to_string(),
                "spiffe://tessera.local/service/ks-east".to_string(),
            ),
            (
                "TESSERA_GATEWAY__UPSTREAM_TIMEOUTS__CALL_SECS".to_string(),
                "7".to_string(),
            ),
        ]);
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX).unwrap();
        assert_eq!(
            cfg.upstream_identity("keyserver", &cfg.keyserver)
                .unwrap()
                .uri(),
            "spiffe://tessera.local/service/ks-east"
        );
        assert_eq!(cfg.upstream_timeouts.call_secs, 7);
        // Balancing is off unless asked for (`localhost` has two addresses).
        assert_eq!(cfg.watermark.resolve_secs, 0);
        let env = BTreeMap::from([(
            "TESSERA_GATEWAY__WATERMARK__RESOLVE_SECS".to_string(),
            "10".to_string(),
        )]);
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX).unwrap();
        assert_eq!(
            (cfg.watermark.resolve_secs, cfg.segmentation.resolve_secs),
            (10, 0)
        );
    }

    #[test]
    fn rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (var, val) in [
            ("TESSERA_GATEWAY__GATEWAY__MAX_IMAGE_BYTES", "0"),
            ("TESSERA_GATEWAY__GATEWAY__MAX_CONCURRENT_JOBS", "0"),
            ("TESSERA_GATEWAY__KEYSERVER__ADDRESS", "\" \""),
            ("TESSERA_GATEWAY__VAULT__PATH", "\"\""),
            ("TESSERA_GATEWAY__WATERMARK__IDENTITY", "watermark"),
            (
                "TESSERA_GATEWAY__SEGMENTATION__IDENTITY",
                "spiffe://tessera.local/service/a/b",
            ),
            ("TESSERA_GATEWAY__UPSTREAM_TIMEOUTS__CALL_SECS", "0"),
            ("TESSERA_GATEWAY__UPSTREAM_TIMEOUTS__CONNECT_SECS", "0"),
            ("TESSERA_GATEWAY__SEGMENTATION__RESOLVE_SECS", "3601"),
        ] {
            let env = BTreeMap::from([(var.to_string(), val.to_string())]);
            let r: Result<Config, _> =
                load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
            assert!(matches!(r, Err(ConfigError::Invalid(_))), "{var}={val}");
        }
        // One storage node, or a node listed twice.
        let one = text(dir.path()).replace(
            "[[storage_nodes]]\nname = \"storage-2\"\naddress = \"localhost:5\"\n",
            "",
        );
        let r: Result<Config, _> =
            load_config(&ConfigSource::from_text(&one, BTreeMap::new()), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("storage_nodes")));
        let twice = text(dir.path()).replace("storage-2", "storage-1");
        let r: Result<Config, _> = load_config(
            &ConfigSource::from_text(&twice, BTreeMap::new()),
            ENV_PREFIX,
        );
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("twice")));
        // A node name that is no identity name needs an explicit identity.
        let upper = text(dir.path()).replace("\"storage-2\"", "\"Storage-2\"");
        let r: Result<Config, _> = load_config(
            &ConfigSource::from_text(&upper, BTreeMap::new()),
            ENV_PREFIX,
        );
        assert!(matches!(r, Err(ConfigError::Invalid(m)) if m.contains("identity")));
        let upper = upper.replace(
            "name = \"Storage-2\"\n",
            "name = \"Storage-2\"\nidentity = \"spiffe://tessera.local/service/storage-2\"\n",
        );
        let cfg: Config = load_config(
            &ConfigSource::from_text(&upper, BTreeMap::new()),
            ENV_PREFIX,
        )
        .unwrap();
        assert_eq!(
            cfg.node_identity(&cfg.storage_nodes[1]).unwrap().name(),
            "storage-2"
        );
        let env = BTreeMap::from([(
            "TESSERA_GATEWAY__GATEWAY__SURPRISE".to_string(),
            "1".to_string(),
        )]);
        let r: Result<Config, _> =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Schema(_))));
    }
}
