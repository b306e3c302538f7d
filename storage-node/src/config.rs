//! The storage node's typed configuration (TOML, then `TESSERA_STORAGE__*`
//! environment overrides, then validation).

use std::path::PathBuf;

use serde::Deserialize;
use tessera_runtime::{AdminConfig, ServerConfig, TelemetryConfig, Validate};
use tessera_tls::CallerAllowList;

/// Environment prefix: `TESSERA_STORAGE__SERVER__LISTEN=127.0.0.1:0`.
pub const ENV_PREFIX: &str = "TESSERA_STORAGE";

/// The setting that lists who may call `Process`.
pub const PROCESS_CALLERS: &str = "process.allowed_callers";

/// Objects are buffered in memory until committed, so one object may not
/// exceed this whatever the config says.
pub const HARD_MAX_OBJECT_BYTES: u64 = 1024 * 1024 * 1024;

/// A fragment being processed is held in memory (with its output), so one
/// may not exceed this whatever the config says.
pub const HARD_MAX_FRAGMENT_BYTES: u64 = 1024 * 1024 * 1024;

/// Most `Process` calls at once any config may allow.
pub const MAX_CONCURRENT_PROCESS: usize = 64;

/// `storage-node` configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name (e.g. `storage-1`): how placers tell nodes apart.
    pub node_id: String,
    /// Directory holding `objects.redb`.
    pub data_dir: PathBuf,
    /// Sum of object sizes this node accepts.
    #[serde(default = "default_capacity")]
    pub capacity_bytes: u64,
    /// Largest single object.
    #[serde(default = "default_max_object")]
    pub max_object_bytes: u64,
    /// Uploads buffered at once (memory bound: this x max_object_bytes).
    #[serde(default = "default_concurrent_puts")]
    pub max_concurrent_puts: usize,
    /// Downloads served at once. Each holds at most a few chunks in memory
    /// (a few 1 MiB chunks) and one redb read snapshot.
    #[serde(default = "default_concurrent_gets")]
    pub max_concurrent_gets: usize,
    /// A `Get` beyond `max_concurrent_gets` waits this long for a slot, then
    /// fails with RESOURCE_EXHAUSTED (0: refuse at once).
    #[serde(default = "default_get_wait_ms")]
    pub get_wait_ms: u64,
    /// Region-wise processing (`Process`).
    #[serde(default)]
    pub process: ProcessSection,
    pub server: ServerConfig,
    /// Plain-HTTP admin listener (`/metrics`, `/live`, `/ready`), off
    /// the mutual-TLS port; no listener when the section is absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

/// The `[process]` section: who may have fragments processed and how much
/// one call may make the node hold.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProcessSection {
    /// Identities allowed to call `Process`. The policy admits the `service`
    /// role, which every Tessera service holds; this list narrows it.
    #[serde(default = "default_process_callers")]
    pub allowed_callers: Vec<String>,
    /// Memory one fragment may take (2 bytes per sample, block list, tile
    /// records, the histeq mapping); the output needs at most as much again.
    #[serde(default = "default_max_fragment_bytes")]
    pub max_fragment_bytes: u64,
    /// `Process` calls at once (memory bound: about this x 2 x
    /// max_fragment_bytes); further calls wait.
    #[serde(default = "default_concurrent_process")]
    pub max_concurrent: usize,
}

impl Default for ProcessSection {
    fn default() -> Self {
        Self {
            allowed_callers: default_process_callers(),
            max_fragment_bytes: default_max_fragment_bytes(),
            max_concurrent: default_concurrent_process(),
        }
    }
}

fn default_process_callers() -> Vec<String> {
    vec!["spiffe://tessera.local/service/gateway".into()]
}
fn default_max_fragment_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_concurrent_process() -> usize {
    2
}

fn default_capacity() -> u64 {
    10 * 1024 * 1024 * 1024
}
fn default_max_object() -> u64 {
    64 * 1024 * 1024
}
fn default_concurrent_puts() -> usize {
    8
}
fn default_concurrent_gets() -> usize {
    16
}
fn default_get_wait_ms() -> u64 {
    5000
}

impl Config {
    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("objects.redb")
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self
                .node_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(format!("node_id {:?}: use 1-64 of [a-z0-9-]", self.node_id));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir must be set".into());
        }
        if self.capacity_bytes == 0 {
            return Err("capacity_bytes must be positive".into());
        }
        if self.max_object_bytes == 0
            || self.max_object_bytes > self.capacity_bytes
            || self.max_object_bytes > HARD_MAX_OBJECT_BYTES
        {
            return Err(format!(
                "max_object_bytes must be in 1..=min(capacity_bytes, {HARD_MAX_OBJECT_BYTES})"
            ));
        }
        if self.max_concurrent_puts == 0 {
            return Err("max_concurrent_puts must be at least 1".into());
        }
        if self.max_concurrent_gets == 0 {
            return Err("max_concurrent_gets must be at least 1".into());
        }
        if self.get_wait_ms > 600_000 {
            return Err("get_wait_ms must be at most 600000 (10 minutes)".into());
        }
        let p = &self.process;
        CallerAllowList::validate(PROCESS_CALLERS, &p.allowed_callers)?;
        if p.max_fragment_bytes == 0 || p.max_fragment_bytes > HARD_MAX_FRAGMENT_BYTES {
            return Err(format!(
                "process.max_fragment_bytes must be in 1..={HARD_MAX_FRAGMENT_BYTES}"
            ));
        }
        if p.max_concurrent == 0 || p.max_concurrent > MAX_CONCURRENT_PROCESS {
            return Err(format!(
                "process.max_concurrent must be in 1..={MAX_CONCURRENT_PROCESS}"
            ));
        }
        tessera_runtime::validate_service_sections(
            &self.server,
            self.admin.as_ref(),
            &self.telemetry,
        )
    }
}
