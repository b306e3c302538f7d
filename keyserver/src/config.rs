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
//! db_path = "data/keyserver.redb"      # the redb file; for PostgreSQL see [keyserver.store]
//! kek_file = "secrets/keyserver.kek"   # 32 raw bytes or 64 hex, mode 0600/0400
//! # Identities default to the trust domain of [server.access]:
//! # gateway_identity = "spiffe://<trust_domain>/service/gateway"
//! # derive_identities = [gateway, "spiffe://<trust_domain>/service/watermark"]
//! [keyserver.derive_purposes]          # per deriving identity; default:
//! "spiffe://tessera.local/service/gateway" = ["dicom-*"]
//! "spiffe://tessera.local/service/watermark" = ["pixels"]
//! [keyserver.access]      # issue 19; every key optional, defaults shown
//! purposes = ["treatment", "research", "audit", "emergency"]
//! default_purpose = "treatment"
//! emergency = []           # identities that may break the glass
//! break_glass_minutes = 15
//! break_glass_uses = 5
//! expiring_soon_secs = 3600
//! [keyserver.access.groups] # standing approvals to a group approve its members
//! "care-team-x" = ["spiffe://tessera.local/user/clinician"]
//! [keyserver.webhook]     # optional: owner webhooks (absent: none sent)
//! ca_file = "pki/webhook-ca.pem"  # receivers verified against this bundle only
//! attempts = 5             # tries per delivery, waits doubling from backoff_ms
//! backoff_ms = 1000
//! timeout_secs = 10
//! queue_max = 1000         # waiting deliveries; when full the oldest is dropped (audited)
//! [keyserver.store]       # optional: backend = "postgres" (replicas), see config/store.rs
//! [admin]                  # optional: plain HTTP /metrics, /live, /ready
//! listen = "127.0.0.1:9464" # loopback by default (port 0: any)
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use tessera_runtime::{AdminConfig, ServerConfig, TelemetryConfig, Validate};
use tessera_tls::{Identity, SERVICE_KIND};

use crate::core::ids::{parse_identity, validate_label};

pub mod store;
pub use store::{StoreBackend, StoreSection};

/// Environment prefix of overrides, e.g. `TESSERA_KEYSERVER__KEYSERVER__KEK_FILE`.
pub const ENV_PREFIX: &str = "TESSERA_KEYSERVER";

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
    /// Keyserver settings.
    pub keyserver: KeyserverSection,
}

impl KeyserverSection {
    /// Where the core keeps its state (reads the PostgreSQL connection
    /// string now).
    pub fn store_at(&self) -> Result<crate::core::StoreAt, String> {
        match self.store.backend {
            StoreBackend::Redb => Ok(crate::core::StoreAt::Redb(self.db_path.clone())),
            StoreBackend::Postgres => {
                Ok(crate::core::StoreAt::Postgres(self.store.postgres_url()?))
            }
        }
    }
}

/// The `[keyserver]` section.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyserverSection {
    /// redb database file (created on first start); empty with
    /// `[keyserver.store] backend = "postgres"`.
    #[serde(default)]
    pub db_path: PathBuf,
    /// Where the state lives (default: the redb file `db_path`).
    #[serde(default)]
    pub store: StoreSection,
    /// File holding the key-encryption key (`*_FILE`: never the key itself
    /// in config or flags). Must be mode 0600 or 0400.
    pub kek_file: PathBuf,
    /// The gateway's identity (default `spiffe://<trust_domain>/service/gateway`,
    /// trust domain from `[server.access]`); see [`KeyserverSection::gateway`].
    #[serde(default)]
    pub gateway_identity: Option<String>,
    /// Services allowed to derive keys (default the gateway and
    /// `spiffe://<trust_domain>/service/watermark`).
    #[serde(default)]
    pub derive_identities: Option<Vec<String>>,
    /// Purposes each deriving identity may derive: exact labels or
    /// `prefix*` (`*` alone: any). Default: the gateway `dicom-*` (DICOM
    /// metadata and sealed pixels), the watermark `pixels`. A deriving
    /// identity without an entry is a config error.
    #[serde(default)]
    pub derive_purposes: Option<BTreeMap<String, Vec<String>>>,
    /// A signed audit checkpoint every this many entries.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Longest grant an owner may approve.
    #[serde(default = "default_max_ttl")]
    pub max_grant_ttl_secs: u64,
    /// Most uses per grant.
    #[serde(default = "default_max_uses")]
    pub max_grant_uses: u32,
    #[serde(default)]
    pub access: AccessSection,
    /// Owner webhooks; none sent (and `SetWebhook` refused) when absent.
    #[serde(default)]
    pub webhook: Option<WebhookSection>,
}

/// `[keyserver.webhook]`: how owner webhooks are sent (issue 19).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookSection {
    /// PEM bundle of the CAs receivers' certificates must chain to.
    pub ca_file: PathBuf,
    /// Tries per delivery.
    #[serde(default = "default_webhook_attempts")]
    pub attempts: u32,
    /// Wait before the second try, doubled after each failure.
    #[serde(default = "default_webhook_backoff_ms")]
    pub backoff_ms: u64,
    /// Limit on one try.
    #[serde(default = "default_webhook_timeout_secs")]
    pub timeout_secs: u64,
    /// Most deliveries waiting.
    #[serde(default = "default_webhook_queue_max")]
    pub queue_max: usize,
}

fn default_webhook_attempts() -> u32 {
    5
}
fn default_webhook_backoff_ms() -> u64 {
    1000
}
fn default_webhook_timeout_secs() -> u64 {
    10
}
fn default_webhook_queue_max() -> usize {
    1000
}

impl WebhookSection {
    /// The core's webhook config (reads the CA bundle).
    pub fn core_config(
        &self,
    ) -> Result<crate::core::webhook::WebhookConfig, tessera_tls::TlsError> {
        let mut c = crate::core::webhook::WebhookConfig::new(&self.ca_file)?;
        c.attempts = self.attempts;
        c.backoff = std::time::Duration::from_millis(self.backoff_ms);
        c.timeout = std::time::Duration::from_secs(self.timeout_secs);
        c.queue_max = self.queue_max;
        Ok(c)
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=20).contains(&self.attempts) {
            return Err("keyserver.webhook.attempts must be 1..=20".into());
        }
        if !(1..=600_000).contains(&self.backoff_ms) {
            return Err("keyserver.webhook.backoff_ms must be 1..=600000".into());
        }
        if !(1..=300).contains(&self.timeout_secs) {
            return Err("keyserver.webhook.timeout_secs must be 1..=300".into());
        }
        if !(1..=1_000_000).contains(&self.queue_max) {
            return Err("keyserver.webhook.queue_max must be 1..=1000000".into());
        }
        Ok(())
    }
}

/// `[keyserver.access]`: purposes, groups, break-glass (issue 19).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSection {
    /// The closed vocabulary of access purposes.
    pub purposes: Vec<String>,
    /// The purpose of a request that names none.
    pub default_purpose: String,
    /// Identities with the `emergency` permission.
    pub emergency: Vec<String>,
    /// Lifetime of a break-glass grant, minutes.
    pub break_glass_minutes: u64,
    /// Uses of a break-glass grant.
    pub break_glass_uses: u32,
    /// Valid grants expiring within this many seconds are flagged.
    pub expiring_soon_secs: u64,
    /// Group name -> member identities.
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Default for AccessSection {
    fn default() -> Self {
        let d = crate::core::policy::access::AccessRules::default();
        Self {
            purposes: d.purposes,
            default_purpose: d.default_purpose,
            emergency: Vec::new(),
            break_glass_minutes: 15,
            break_glass_uses: 5,
            expiring_soon_secs: 3600,
            groups: BTreeMap::new(),
        }
    }
}

impl AccessSection {
    /// The core's access config, roles from `[server.access]`.
    pub fn core_config(&self, roles: tessera_tls::RoleMap) -> crate::core::access::AccessConfig {
        crate::core::access::AccessConfig {
            rules: crate::core::policy::access::AccessRules {
                purposes: self.purposes.clone(),
                default_purpose: self.default_purpose.clone(),
                emergency: self.emergency.clone(),
            },
            groups: self.groups.clone(),
            roles,
            break_glass_ttl_secs: self.break_glass_minutes * 60,
            break_glass_uses: self.break_glass_uses,
            expiring_soon_secs: self.expiring_soon_secs,
            webhook: None,
        }
    }

    fn validate(&self, td: &str) -> Result<(), String> {
        if self.purposes.is_empty() {
            return Err("keyserver.access.purposes must not be empty".into());
        }
        for p in &self.purposes {
            validate_label("", p).map_err(|_| {
                format!("keyserver.access.purposes: {p:?} is not a purpose ([a-z0-9_.-]{{1,64}})")
            })?;
        }
        if !self.purposes.contains(&self.default_purpose) {
            return Err(format!(
                "keyserver.access.default_purpose {:?} is not in keyserver.access.purposes",
                self.default_purpose
            ));
        }
        for id in &self.emergency {
            parse_identity("keyserver.access.emergency", id, td).map_err(|e| e.to_string())?;
        }
        for (g, members) in &self.groups {
            validate_label("", g).map_err(|_| {
                format!("keyserver.access.groups: {g:?} is not a group name ([a-z0-9_.-]{{1,64}})")
            })?;
            for id in members {
                parse_identity("keyserver.access.groups", id, td).map_err(|e| e.to_string())?;
            }
        }
        if !(1..=24 * 60).contains(&self.break_glass_minutes) {
            return Err("keyserver.access.break_glass_minutes must be 1..=1440".into());
        }
        if !(1..=1000).contains(&self.break_glass_uses) {
            return Err("keyserver.access.break_glass_uses must be 1..=1000".into());
        }
        Ok(())
    }
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

impl KeyserverSection {
    /// The gateway's identity in `trust_domain` (configured or default).
    pub fn gateway(&self, trust_domain: &str) -> String {
        self.gateway_identity
            .clone()
            .unwrap_or_else(|| Identity::format_uri(trust_domain, SERVICE_KIND, "gateway"))
    }

    /// The deriving identities with the purposes each may derive. An
    /// identity with no purposes configured gets none (fails closed;
    /// validation reports it).
    pub fn derivers(&self, trust_domain: &str) -> Vec<(String, Vec<String>)> {
        let gateway = self.gateway(trust_domain);
        let watermark = Identity::format_uri(trust_domain, SERVICE_KIND, "watermark");
        let ids = self
            .derive_identities
            .clone()
            .unwrap_or_else(|| vec![gateway.clone(), watermark.clone()]);
        let purposes = self.derive_purposes.clone().unwrap_or_else(|| {
            BTreeMap::from([
                (gateway, vec!["dicom-*".to_owned()]),
                (watermark, vec!["pixels".to_owned()]),
            ])
        });
        ids.into_iter()
            .map(|id| {
                let p = purposes.get(&id).cloned().unwrap_or_default();
                (id, p)
            })
            .collect()
    }
}

/// `label` or `label-prefix*` or `*`.
fn validate_purpose_pattern(p: &str) -> Result<(), String> {
    let ok = match p.strip_suffix('*') {
        Some("") => true,
        Some(prefix) => validate_label("", prefix).is_ok(),
        None => validate_label("", p).is_ok(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "keyserver.derive_purposes: {p:?} is not a purpose ([a-z0-9_.-]{{1,64}}) or a prefix ending in *"
        ))
    }
}

impl Validate for Config {
    fn validate(&self) -> Result<(), String> {
        tessera_runtime::validate_service_sections(
            &self.server,
            self.admin.as_ref(),
            &self.telemetry,
        )?;
        let k = &self.keyserver;
        k.store.validate(&k.db_path)?;
        if k.kek_file.as_os_str().is_empty() {
            return Err("keyserver.kek_file must not be empty".into());
        }
        let td = &self.server.access.trust_domain;
        parse_identity("keyserver.gateway_identity", &k.gateway(td), td)
            .map_err(|e| e.to_string())?;
        for (id, purposes) in k.derivers(td) {
            parse_identity("keyserver.derive_identities", &id, td).map_err(|e| e.to_string())?;
            if purposes.is_empty() {
                return Err(format!(
                    "keyserver.derive_purposes: no purposes for deriving identity {id}"
                ));
            }
            purposes
                .iter()
                .try_for_each(|p| validate_purpose_pattern(p))?;
        }
        for id in k.derive_purposes.iter().flat_map(|m| m.keys()) {
            parse_identity("keyserver.derive_purposes", id, td).map_err(|e| e.to_string())?;
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
        k.access.validate(td)?;
        if let Some(w) = &k.webhook {
            w.validate()?;
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
        let derivers = cfg.keyserver.derivers("tessera.local");
        assert_eq!(
            derivers,
            vec![
                (
                    "spiffe://tessera.local/service/gateway".to_owned(),
                    vec!["dicom-*".to_owned()]
                ),
                (
                    "spiffe://tessera.local/service/watermark".to_owned(),
                    vec!["pixels".to_owned()]
                ),
            ]
        );
    }

    #[test]
    fn identities_follow_the_configured_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "{}[server.access]\ntrust_domain = \"hospital.example\"\n",
            text(dir.path())
        );
        let cfg: Config =
            load_config(&ConfigSource::from_text(&text, BTreeMap::new()), ENV_PREFIX).unwrap();
        let td = &cfg.server.access.trust_domain;
        assert_eq!(
            cfg.keyserver.gateway(td),
            "spiffe://hospital.example/service/gateway"
        );
        assert!(
            cfg.keyserver.derivers(td).iter().all(|(id, p)| id
                .starts_with("spiffe://hospital.example/service/")
                && !p.is_empty())
        );
        // An identity of another trust domain is a config error.
        let env = BTreeMap::from([(
            "TESSERA_KEYSERVER__KEYSERVER__GATEWAY_IDENTITY".to_string(),
            "spiffe://tessera.local/service/gateway".to_string(),
        )]);
        let r: Result<Config, _> = load_config(&ConfigSource::from_text(&text, env), ENV_PREFIX);
        assert!(matches!(r, Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn purposes_are_per_identity_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = text(dir.path());
        let with = |extra: &str| {
            load_config::<Config>(
                &ConfigSource::from_text(&format!("{base}{extra}"), BTreeMap::new()),
                ENV_PREFIX,
            )
        };
        let cfg = with(
            "[keyserver.derive_purposes]\n\"spiffe://tessera.local/service/gateway\" = [\"dicom-*\", \"pixels\"]\n\"spiffe://tessera.local/service/watermark\" = [\"pixels\"]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.keyserver.derivers("tessera.local")[0].1,
            vec!["dicom-*".to_owned(), "pixels".to_owned()]
        );
        // The watermark (a default deriver) has no purposes: refused.
        assert!(matches!(
            with(
                "[keyserver.derive_purposes]\n\"spiffe://tessera.local/service/gateway\" = [\"dicom-*\"]\n"
            ),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            with(
                "[keyserver.derive_purposes]\n\"spiffe://tessera.local/service/gateway\" = [\"Dicom*\"]\n\"spiffe://tessera.local/service/watermark\" = [\"pixels\"]\n"
            ),
            Err(ConfigError::Invalid(_))
        ));
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
