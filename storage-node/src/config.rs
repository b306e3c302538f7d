//! The storage node's typed configuration (TOML, then `TESSERA_STORAGE__*`
//! environment overrides, then validation).

use std::path::PathBuf;

use serde::Deserialize;
use tessera_runtime::{ServerConfig, TelemetryConfig, Validate};

/// Environment prefix: `TESSERA_STORAGE__SERVER__LISTEN=127.0.0.1:0`.
pub const ENV_PREFIX: &str = "TESSERA_STORAGE";

/// Objects are buffered in memory until committed, so one object may not
/// exceed this whatever the config says.
pub const HARD_MAX_OBJECT_BYTES: u64 = 1024 * 1024 * 1024;

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
    pub server: ServerConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
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
        self.server.validate()?;
        self.telemetry.validate()
    }
}
