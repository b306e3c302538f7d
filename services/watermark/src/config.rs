//! The watermark service's typed config: TOML plus `TESSERA_WATERMARK__*`
//! environment overrides, validated at start (exit 64 on a bad config).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7500"
//! [server.tls]
//! ca = "pki/ca.crt"
//! cert = "pki/watermark.crt"
//! key = "pki/watermark.key"
//!
//! [keyserver]                 # where study keys are derived
//! address = "localhost:7400"  # the keyserver certificate must name this host
//! # ... and carry this identity (default:
//! # spiffe://<server.access.trust_domain>/service/keyserver)
//! identity = "spiffe://tessera.local/service/keyserver"
//! connect_timeout_secs = 5    # TCP connect + TLS handshake
//! call_timeout_secs = 30      # each DeriveKey call
//! resolve_secs = 0            # > 0: balance over every address the name
//!                             # resolves to (keyserver replicas), looked up again this often
//! [keyserver.tls]             # our client certificate (the watermark identity)
//! ca = "pki/ca.crt"
//! cert = "pki/watermark.crt"
//! key = "pki/watermark.key"
//!
//! [watermark]
//! allowed_callers = ["spiffe://tessera.local/service/gateway"]
//! max_image_bytes = 268435456
//! max_concurrent_jobs = 4
//! [admin]                  # optional: plain HTTP /metrics, /live, /ready
//! listen = "127.0.0.1:9464" # loopback by default (port 0: any)
//! ```

use std::time::Duration;

use serde::Deserialize;
use tessera_runtime::{AdminConfig, ServerConfig, TelemetryConfig, Validate};
use tessera_tls::{CallerAllowList, ChannelTimeouts, Identity, TlsFiles};

/// Environment prefix of overrides, e.g. `TESSERA_WATERMARK__KEYSERVER__ADDRESS`.
pub const ENV_PREFIX: &str = "TESSERA_WATERMARK";

/// The setting that lists who may call the service.
pub const ALLOWED_CALLERS: &str = "watermark.allowed_callers";

/// Largest image any config may allow: `MAX_SAMPLES` 16-bit words.
pub const MAX_IMAGE_BYTES_CEILING: u64 = tessera_image::MAX_SAMPLES * 2;

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
    /// Logs and OTLP export.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The keyserver this service derives study keys from.
    pub keyserver: KeyserverSection,
    /// Service settings.
    #[serde(default)]
    pub watermark: WatermarkSection,
}

/// The `[keyserver]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyserverSection {
    /// `host:port`; the keyserver certificate must name `host`.
    pub address: String,
    /// The SPIFFE identity the keyserver must present; default
    /// `spiffe://<server.access.trust_domain>/service/keyserver`.
    #[serde(default)]
    pub identity: Option<String>,
    /// Seconds for TCP connect plus TLS handshake.
    #[serde(default = "default_connect_secs")]
    pub connect_timeout_secs: u64,
    /// Seconds a DeriveKey call may take.
    #[serde(default = "default_call_secs")]
    pub call_timeout_secs: u64,
    /// Calls balance over every address `host` resolves to (keyserver
    /// replicas on PostgreSQL behind a headless Service), resolved again
    /// every this many seconds; 0 (the default): one connection to the
    /// name.
    #[serde(default)]
    pub resolve_secs: u64,
    /// Client TLS material: this service's own certificate.
    pub tls: TlsFiles,
}

fn default_connect_secs() -> u64 {
    5
}
fn default_call_secs() -> u64 {
    30
}

impl KeyserverSection {
    /// The timeouts of the keyserver channel.
    pub fn timeouts(&self) -> ChannelTimeouts {
        ChannelTimeouts {
            connect: Duration::from_secs(self.connect_timeout_secs),
            call: Some(Duration::from_secs(self.call_timeout_secs)),
        }
    }
}

impl Config {
    /// The identity the keyserver must present, explicit or defaulted.
    pub fn keyserver_identity(&self) -> Result<Identity, String> {
        Identity::upstream(
            self.keyserver.identity.as_deref(),
            &self.server.access.trust_domain,
            "keyserver",
        )
        .map_err(|e| format!("keyserver.identity: {e}"))
    }
}

/// The `[watermark]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WatermarkSection {
    /// Identities allowed to call the service. The policy admits the
    /// `service` role, which storage nodes hold too; this list narrows it.
    #[serde(default = "default_callers")]
    pub allowed_callers: Vec<String>,
    /// Largest image (pixel bytes) accepted or restored.
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// Protect/restore/verify jobs in flight at once (each holds the image
    /// and its shares in memory).
    #[serde(default = "default_jobs")]
    pub max_concurrent_jobs: u32,
}

impl Default for WatermarkSection {
    fn default() -> Self {
        Self {
            allowed_callers: default_callers(),
            max_image_bytes: default_max_image_bytes(),
            max_concurrent_jobs: default_jobs(),
        }
    }
}

fn default_callers() -> Vec<String> {
    vec!["spiffe://tessera.local/service/gateway".into()]
}
fn default_max_image_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_jobs() -> u32 {
    4
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        tessera_runtime::validate_service_sections(
            &self.server,
            self.admin.as_ref(),
            &self.telemetry,
        )?;
        let k = &self.keyserver;
        if k.address.trim().is_empty() {
            return Err("keyserver.address must not be empty".into());
        }
        self.keyserver_identity()?;
        if !(1..=300).contains(&k.connect_timeout_secs) {
            return Err("keyserver.connect_timeout_secs must be 1..=300".into());
        }
        if !(1..=3600).contains(&k.call_timeout_secs) {
            return Err("keyserver.call_timeout_secs must be 1..=3600".into());
        }
        tessera_tls::check_resolve_secs("keyserver.resolve_secs", k.resolve_secs)?;
        for (what, p) in [
            ("keyserver.tls.ca", &k.tls.ca),
            ("keyserver.tls.cert", &k.tls.cert),
            ("keyserver.tls.key", &k.tls.key),
        ] {
            if p.as_os_str().is_empty() {
                return Err(format!("{what} must not be empty"));
            }
        }
        let w = &self.watermark;
        CallerAllowList::validate(ALLOWED_CALLERS, &w.allowed_callers)?;
        if !(1..=MAX_IMAGE_BYTES_CEILING).contains(&w.max_image_bytes) {
            return Err(format!(
                "watermark.max_image_bytes must be 1..={MAX_IMAGE_BYTES_CEILING}"
            ));
        }
        if !(1..=1024).contains(&w.max_concurrent_jobs) {
            return Err("watermark.max_concurrent_jobs must be 1..=1024".into());
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
        for f in ["ca.crt", "wm.crt", "wm.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/wm.crt\"\nkey = \"{d}/wm.key\"\n\
             [keyserver]\naddress = \"localhost:7400\"\n[keyserver.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/wm.crt\"\nkey = \"{d}/wm.key\"\n",
            d = dir.display()
        )
    }

    #[test]
    fn loads_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let env = BTreeMap::from([(
            "TESSERA_WATERMARK__WATERMARK__MAX_CONCURRENT_JOBS".to_string(),
            "7".to_string(),
        )]);
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX).unwrap();
        assert_eq!(cfg.watermark.max_concurrent_jobs, 7);
        assert_eq!(
            cfg.watermark.allowed_callers,
            vec!["spiffe://tessera.local/service/gateway".to_string()]
        );
        assert_eq!(cfg.watermark.max_image_bytes, 256 * 1024 * 1024);
        assert_eq!(cfg.keyserver.resolve_secs, 0, "one connection by default");
        assert_eq!(
            cfg.keyserver_identity().unwrap().uri(),
            "spiffe://tessera.local/service/keyserver"
        );
        assert_eq!(
            cfg.keyserver.timeouts(),
            ChannelTimeouts {
                connect: Duration::from_secs(5),
                call: Some(Duration::from_secs(30)),
            }
        );
    }

    #[test]
    fn rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (var, val) in [
            ("TESSERA_WATERMARK__WATERMARK__MAX_IMAGE_BYTES", "0"),
            (
                "TESSERA_WATERMARK__WATERMARK__MAX_IMAGE_BYTES",
                "1099511627776",
            ),
            ("TESSERA_WATERMARK__WATERMARK__ALLOWED_CALLERS", "[]"),
            (
                "TESSERA_WATERMARK__WATERMARK__ALLOWED_CALLERS",
                "[\"gateway\"]",
            ),
            ("TESSERA_WATERMARK__KEYSERVER__ADDRESS", "\" \""),
            ("TESSERA_WATERMARK__KEYSERVER__IDENTITY", "keyserver"),
            ("TESSERA_WATERMARK__KEYSERVER__CALL_TIMEOUT_SECS", "0"),
            ("TESSERA_WATERMARK__KEYSERVER__RESOLVE_SECS", "3601"),
        ] {
            let env = BTreeMap::from([(var.to_string(), val.to_string())]);
            let r: Result<Config, _> =
                load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
            assert!(matches!(r, Err(ConfigError::Invalid(_))), "{var}={val}");
        }
        let env = BTreeMap::from([(
            "TESSERA_WATERMARK__WATERMARK__SURPRISE".to_string(),
            "1".to_string(),
        )]);
        let r: Result<Config, _> =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Schema(_))));
    }
}
