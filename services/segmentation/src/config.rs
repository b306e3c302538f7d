//! The segmentation service's typed config: TOML plus
//! `TESSERA_SEGMENTATION__*` environment overrides, validated at start (exit
//! 64 on a bad config).
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7600"
//! [server.tls]
//! ca = "pki/ca.crt"
//! cert = "pki/segmentation.crt"
//! key = "pki/segmentation.key"
//!
//! [segmentation]
//! allowed_callers = ["spiffe://tessera.local/service/gateway"]
//! max_image_bytes = 268435456
//! max_concurrent_jobs = 2
//! [admin]                  # optional: plain HTTP /metrics, /live, /ready
//! listen = "127.0.0.1:9464" # loopback by default (port 0: any)
//! ```

use serde::Deserialize;
use tessera_runtime::{AdminConfig, ServerConfig, TelemetryConfig, Validate};
use tessera_tls::CallerAllowList;

/// Environment prefix of overrides, e.g.
/// `TESSERA_SEGMENTATION__SEGMENTATION__MAX_CONCURRENT_JOBS`.
pub const ENV_PREFIX: &str = "TESSERA_SEGMENTATION";

/// The setting that lists who may call the service.
pub const ALLOWED_CALLERS: &str = "segmentation.allowed_callers";

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
    /// Service settings.
    #[serde(default)]
    pub segmentation: SegmentationSection,
}

/// The `[segmentation]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SegmentationSection {
    /// Identities allowed to call the service. The policy admits the
    /// `service` role, which storage nodes hold too; this list narrows it.
    #[serde(default = "default_callers")]
    pub allowed_callers: Vec<String>,
    /// Largest image (pixel bytes) accepted. Fragments may hold at most
    /// `FRAGMENT_EXPANSION` times this (halos overlap).
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// Segment jobs in flight at once (each holds the image, its fragments
    /// and a CPU for the GA).
    #[serde(default = "default_jobs")]
    pub max_concurrent_jobs: u32,
}

impl Default for SegmentationSection {
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
    2
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        tessera_runtime::validate_service_sections(
            &self.server,
            self.admin.as_ref(),
            &self.telemetry,
        )?;
        let s = &self.segmentation;
        CallerAllowList::validate(ALLOWED_CALLERS, &s.allowed_callers)?;
        if !(1..=MAX_IMAGE_BYTES_CEILING).contains(&s.max_image_bytes) {
            return Err(format!(
                "segmentation.max_image_bytes must be 1..={MAX_IMAGE_BYTES_CEILING}"
            ));
        }
        if !(1..=1024).contains(&s.max_concurrent_jobs) {
            return Err("segmentation.max_concurrent_jobs must be 1..=1024".into());
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
        for f in ["ca.crt", "seg.crt", "seg.key"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/seg.crt\"\nkey = \"{d}/seg.key\"\n",
            d = dir.display()
        )
    }

    #[test]
    fn loads_with_defaults_and_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let cfg: Config = load_config(
            &ConfigSource::from_text(&text(dir.path()), BTreeMap::new()),
            ENV_PREFIX,
        )
        .unwrap();
        assert_eq!(cfg.segmentation, SegmentationSection::default());
        assert_eq!(cfg.segmentation.max_concurrent_jobs, 2);
        assert_eq!(cfg.segmentation.max_image_bytes, 256 * 1024 * 1024);
        assert_eq!(
            cfg.segmentation.allowed_callers,
            vec!["spiffe://tessera.local/service/gateway".to_string()]
        );
        let env = BTreeMap::from([(
            "TESSERA_SEGMENTATION__SEGMENTATION__MAX_CONCURRENT_JOBS".to_string(),
            "7".to_string(),
        )]);
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX).unwrap();
        assert_eq!(cfg.segmentation.max_concurrent_jobs, 7);
    }

    #[test]
    fn rejects_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        for (var, val) in [
            ("MAX_IMAGE_BYTES", "0"),
            ("MAX_IMAGE_BYTES", "1099511627776"),
            ("MAX_CONCURRENT_JOBS", "0"),
            ("ALLOWED_CALLERS", "[]"),
            ("ALLOWED_CALLERS", "[\"gateway\"]"),
        ] {
            let env = BTreeMap::from([(
                format!("TESSERA_SEGMENTATION__SEGMENTATION__{var}"),
                val.to_string(),
            )]);
            let r: Result<Config, _> =
                load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
            assert!(matches!(r, Err(ConfigError::Invalid(_))), "{var}={val}");
        }
        let env = BTreeMap::from([(
            "TESSERA_SEGMENTATION__SEGMENTATION__SURPRISE".to_string(),
            "1".to_string(),
        )]);
        let r: Result<Config, _> =
            load_config(&ConfigSource::from_text(&text(dir.path()), env), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Schema(_))));
    }
}
