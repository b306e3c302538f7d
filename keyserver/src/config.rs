//! The keyserver's typed config: TOML plus `TESSERA_KEYSERVER__*`
//! environment overrides, validated at start (exit 64 on a bad config).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7400"
//! [server.tls]
//! ca = "pki/ca.crt"
//! cert = "pki/keyserver.crt"
//! key = "pki/keyserver.key"
//! [server.access]          # roles by identity (dev defaults on)
//! roles = { "spiffe://tessera.local/user/owner" = ["owner", "admin"] }
//!
//! [keyserver]
//! db_path = "data/keyserver.redb"
//! kek_file = "secrets/keyserver.kek"   # 32 raw bytes or 64 hex, mode 0600/0400
//! ```

use std::path::PathBuf;

use serde::Deserialize;
use tessera_runtime::{ServerConfig, TelemetryConfig, Validate};

use crate::core::ids::validate_identity;

/// Environment prefix of overrides, e.g. `TESSERA_KEYSERVER__KEYSERVER__KEK_FILE`.
pub const ENV_PREFIX: &str = "TESSERA_KEYSERVER";

/// The whole config file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener, TLS files, roles.
    pub server: ServerConfig,
    /// Logs and OTLP export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Keyserver settings.
    pub keyserver: KeyserverSection,
}

/// The `[keyserver]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyserverSection {
    /// redb database file (created on first start).
    pub db_path: PathBuf,
    /// File holding the key-encryption key (`*_FILE`: never the key itself
    /// in config or flags). Must be mode 0600 or 0400.
    pub kek_file: PathBuf,
    /// The gateway's identity.
    #[serde(default = "default_gateway")]
    pub gateway_identity: String,
    /// Services allowed to derive keys.
    #[serde(default = "default_derivers")]
    pub derive_identities: Vec<String>,
    /// A signed audit checkpoint every this many entries.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Longest grant an owner may approve.
    #[serde(default = "default_max_ttl")]
    pub max_grant_ttl_secs: u64,
    /// Most uses per grant.
    #[serde(default = "default_max_uses")]
    pub max_grant_uses: u32,
}

fn default_gateway() -> String {
    "spiffe://tessera.local/service/gateway".into()
}
fn default_derivers() -> Vec<String> {
    vec![
        "spiffe://tessera.local/service/gateway".into(),
        "spiffe://tessera.local/service/watermark".into(),
    ]
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_max_ttl() -> u64 {
    7 * 24 * 3600
}
fn default_max_uses() -> u32 {
    100
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        self.server.validate()?;
        self.telemetry.validate()?;
        let k = &self.keyserver;
        if k.db_path.as_os_str().is_empty() {
            return Err("keyserver.db_path must not be empty".into());
        }
        if k.kek_file.as_os_str().is_empty() {
            return Err("keyserver.kek_file must not be empty".into());
        }
        validate_identity("keyserver.gateway_identity", &k.gateway_identity)
            .map_err(|e| e.to_string())?;
        for d in &k.derive_identities {
            validate_identity("keyserver.derive_identities", d).map_err(|e| e.to_string())?;
        }
        if !(1..=10_000_000).contains(&k.checkpoint_every) {
            return Err("keyserver.checkpoint_every must be 1..=10000000".into());
        }
        if !(1..=365 * 24 * 3600).contains(&k.max_grant_ttl_secs) {
            return Err("keyserver.max_grant_ttl_secs must be 1..=31536000".into());
        }
        if !(1..=1_000_000).contains(&k.max_grant_uses) {
            return Err("keyserver.max_grant_uses must be 1..=1000000".into());
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
        for f in ["ca.crt", "ks.crt", "ks.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/ks.crt\"\nkey = \"{d}/ks.key\"\n[keyserver]\ndb_path = \"{d}/ks.redb\"\nkek_file = \"{d}/kek\"\n",
            d = dir.display()
        )
    }

    #[test]
    fn loads_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([(
            "TESSERA_KEYSERVER__KEYSERVER__MAX_GRANT_USES".to_string(),
            "7".to_string(),
        )]);
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX).unwrap();
        assert_eq!(cfg.keyserver.max_grant_uses, 7);
        assert_eq!(cfg.keyserver.checkpoint_every, 1000);
        assert_eq!(cfg.keyserver.derive_identities.len(), 2);
    }

    #[test]
    fn rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (var, val) in [
            ("TESSERA_KEYSERVER__KEYSERVER__MAX_GRANT_USES", "0"),
            ("TESSERA_KEYSERVER__KEYSERVER__GATEWAY_IDENTITY", "gateway"),
            ("TESSERA_KEYSERVER__KEYSERVER__CHECKPOINT_EVERY", "0"),
        ] {
            let env = BTreeMap::from([(var.to_string(), val.to_string())]);
            let r: Result<Config, _> =
                load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
            assert!(matches!(r, Err(ConfigError::Invalid(_))), "{var}={val}");
        }
        let env = BTreeMap::from([(
            "TESSERA_KEYSERVER__KEYSERVER__SURPRISE".to_string(),
            "1".to_string(),
        )]);
        let r: Result<Config, _> =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Schema(_))));
    }
}
