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
//! [keyserver]
//! address = "localhost:7400"
//! [watermark]
//! address = "localhost:7500"
//! [segmentation]
//! address = "localhost:7550"
//!
//! [[storage_nodes]]
//! name = "storage-1"        # must equal the node's node_id (checked)
//! address = "localhost:7601"
//! [[storage_nodes]]
//! name = "storage-2"
//! address = "localhost:7602"
//!
//! [vault]
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
//! [dicom.scp]                    # optional C-STORE SCP (trusted network)
//! listen = "127.0.0.1:11112"
//! ae_title = "TESSERA"
//! allowed_calling_aes = ["CT01", "PACS"]
//! owner = "spiffe://tessera.local/user/owner"
//! artim_timeout_secs = 10        # the whole A-ASSOCIATE-RQ within this
//! # stored_by = "spiffe://tessera.local/service/gateway"   # the default
//! ```

use std::path::PathBuf;

use serde::Deserialize;
use tessera_runtime::{ServerConfig, TelemetryConfig, Validate};
use tessera_tls::{Role, TlsFiles};

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
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub dicom: DicomSection,
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
    #[serde(default = "default_ae_title")]
    pub ae_title: String,
    /// Calling AE titles accepted; any other is rejected.
    pub allowed_calling_aes: Vec<String>,
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

fn valid_ae(ae: &str) -> bool {
    !ae.trim().is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

/// A service the gateway calls.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    /// `host:port`; the service's certificate must name `host`.
    pub address: String,
}

/// One `[[storage_nodes]]` entry.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StorageNode {
    /// The node's configured `node_id`; the gateway checks it at NodeInfo.
    pub name: String,
    pub address: String,
}

/// The `[vault]` section: the identity vault.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VaultSection {
    /// redb file of sealed study records.
    pub path: PathBuf,
    /// 32-byte vault key (raw or 64 hex characters), owner-only permissions.
    pub key_file: PathBuf,
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

fn default_max_image_bytes() -> u64 {
    256 * 1024 * 1024
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
        self.server.validate()?;
        self.telemetry.validate()?;
        for (what, p) in [
            ("client_tls.ca", &self.client_tls.ca),
            ("client_tls.cert", &self.client_tls.cert),
            ("client_tls.key", &self.client_tls.key),
            ("vault.path", &self.vault.path),
            ("vault.key_file", &self.vault.key_file),
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
        if let Some(scp) = &self.dicom.scp {
            if !valid_ae(&scp.ae_title) {
                return Err("dicom.scp.ae_title must be 1..=16 printable characters".into());
            }
            if scp.allowed_calling_aes.is_empty() {
                return Err(
                    "dicom.scp.allowed_calling_aes must list the AE titles allowed to send".into(),
                );
            }
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
    }

    #[test]
    fn rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (var, val) in [
            ("TESSERA_GATEWAY__GATEWAY__MAX_IMAGE_BYTES", "0"),
            ("TESSERA_GATEWAY__GATEWAY__MAX_CONCURRENT_JOBS", "0"),
            ("TESSERA_GATEWAY__KEYSERVER__ADDRESS", "\" \""),
            ("TESSERA_GATEWAY__VAULT__PATH", "\"\""),
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
        let env = BTreeMap::from([(
            "TESSERA_GATEWAY__GATEWAY__SURPRISE".to_string(),
            "1".to_string(),
        )]);
        let r: Result<Config, _> =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Schema(_))));
    }
}
