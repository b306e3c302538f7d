//! Typed configuration: a TOML file, then environment overrides, layered by
//! `figment`, then validation. The source is a value, so tests pass their own environment
//! and never touch the process's.
//!
//! An override `PREFIX__A__B=value` sets key `a.b`. The value is read as a
//! TOML value when it parses as one (`8080`, `true`, `["a","b"]`) and as a
//! string otherwise (`127.0.0.1:7101`, `/tmp/x`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use serde::de::DeserializeOwned;

/// Exit code for a bad configuration (`EX_CONFIG` from sysexits).
pub const EXIT_CONFIG: u8 = 64;

/// Semantic checks after parsing; return a message naming the bad key.
pub trait Validate {
    fn validate(&self) -> Result<(), String>;
}

/// The checks every service's config starts with: its `[server]`, its
/// optional `[admin]` listener (which must not take the gRPC address) and
/// its `[telemetry]`.
pub fn validate_service_sections(
    server: &crate::ServerConfig,
    admin: Option<&crate::AdminConfig>,
    telemetry: &crate::TelemetryConfig,
) -> Result<(), String> {
    server.validate()?;
    if let Some(admin) = admin {
        admin.validate(server.listen)?;
    }
    telemetry.validate()
}

/// Where configuration comes from.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    /// TOML text used instead of (or when there is no) file; for tests.
    pub text: Option<String>,
    pub env: BTreeMap<String, String>,
}

/// Why configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {origin} is not valid TOML: {detail}")]
    Syntax { origin: String, detail: String },
    #[error("environment variable {var}: {detail}")]
    Env { var: String, detail: String },
    #[error("config: {0}")]
    Schema(String),
    #[error("config: {0}")]
    Invalid(String),
}

impl ConfigSource {
    /// A file plus an explicit environment (tests).
    pub fn new(file: Option<PathBuf>, env: BTreeMap<String, String>) -> Self {
        Self {
            file,
            text: None,
            env,
        }
    }

    /// TOML text plus an explicit environment (tests).
    pub fn from_text(text: &str, env: BTreeMap<String, String>) -> Self {
        Self {
            file: None,
            text: Some(text.to_owned()),
            env,
        }
    }

    /// A file plus the process environment (binaries).
    pub fn from_process(file: Option<&Path>) -> Self {
        Self::new(file.map(Path::to_owned), std::env::vars().collect())
    }
}

fn read_text(source: &ConfigSource) -> Result<(String, String), ConfigError> {
    Ok(match (&source.text, &source.file) {
        (Some(text), _) => (text.clone(), "text".to_owned()),
        (None, Some(path)) => (
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
                path: path.clone(),
                source: e,
            })?,
            path.display().to_string(),
        ),
        (None, None) => (String::new(), "defaults".to_owned()),
    })
}

/// The layered configuration (figment): the TOML text, then one
/// `PREFIX__A__B` override per environment variable at key `a.b`, each value
/// read as figment reads environment values (TOML-like scalars and arrays,
/// a string otherwise).
pub fn figment(source: &ConfigSource, env_prefix: &str) -> Result<Figment, ConfigError> {
    let (text, origin) = read_text(source)?;
    // Checked here so a syntax error names its file, not a figment provider.
    text.parse::<toml::Table>()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            origin,
            detail: e.to_string(),
        })?;
    let mut fig = Figment::from(Toml::string(&text));
    let prefix = format!("{env_prefix}__");
    for (var, raw) in &source.env {
        let Some(rest) = var.strip_prefix(&prefix) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var: var.clone(),
                detail: "empty key segment".to_owned(),
            });
        }
        // An override never turns a value into a table under it.
        for n in 1..path.len() {
            let parent = path[..n].join(".");
            if let Ok(v) = fig.find_value(&parent)
                && v.as_dict().is_none()
            {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    detail: format!("{parent} is not a table"),
                });
            }
        }
        let value: Value = raw.parse().unwrap_or_else(|e: Infallible| match e {});
        fig = fig.merge(Serialized::default(&path.join("."), value));
    }
    Ok(fig)
}

/// A figment error as one line naming the key and where its value came
/// from (the file, or the environment variable that overrode it).
fn schema_message(e: &figment::Error, source: &ConfigSource, env_prefix: &str) -> String {
    let key = e
        .path
        .iter()
        .skip_while(|p| p.as_str() == "default")
        .cloned()
        .collect::<Vec<_>>()
        .join(".");
    let var = format!("{env_prefix}__{}", key.to_uppercase().replace('.', "__"));
    let origin = if !key.is_empty() && source.env.contains_key(&var) {
        format!("environment variable {var}")
    } else if let (None, Some(path)) = (&source.text, &source.file) {
        path.display().to_string()
    } else {
        "the configuration".to_owned()
    };
    if key.is_empty() {
        format!("{} (in {origin})", e.kind)
    } else {
        format!("{key}: {} (in {origin})", e.kind)
    }
}

/// Loads, overrides and validates a typed config.
pub fn load_config<T: DeserializeOwned + Validate>(
    source: &ConfigSource,
    env_prefix: &str,
) -> Result<T, ConfigError> {
    let config: T = figment(source, env_prefix)?
        .extract()
        .map_err(|e| ConfigError::Schema(schema_message(&e, source, env_prefix)))?;
    config.validate().map_err(ConfigError::Invalid)?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        name: String,
        #[serde(default)]
        inner: Inner,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        port: u16,
        addr: String,
        tags: Vec<String>,
        on: bool,
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), String> {
            if self.name.is_empty() {
                return Err("name must not be empty".into());
            }
            Ok(())
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn env_overrides_file() {
        let src = ConfigSource::from_text(
            "name = \"a\"\n[inner]\nport = 1\n",
            env(&[
                ("APP__INNER__PORT", "8080"),
                ("APP__INNER__ADDR", "127.0.0.1:7101"),
                ("APP__INNER__TAGS", "[\"x\", \"y\"]"),
                ("APP__INNER__ON", "true"),
                ("OTHER__NAME", "ignored"),
            ]),
        );
        let cfg: Cfg = load_config(&src, "APP").unwrap();
        assert_eq!(cfg.name, "a");
        assert_eq!(cfg.inner.port, 8080);
        assert_eq!(cfg.inner.addr, "127.0.0.1:7101");
        assert_eq!(cfg.inner.tags, ["x", "y"]);
        assert!(cfg.inner.on);
    }

    #[test]
    fn errors_are_typed() {
        let bad_syntax = ConfigSource::from_text("name = ", BTreeMap::new());
        assert!(matches!(
            load_config::<Cfg>(&bad_syntax, "APP"),
            Err(ConfigError::Syntax { .. })
        ));
        let unknown = ConfigSource::from_text("name = \"a\"\nnope = 1\n", BTreeMap::new());
        assert!(matches!(
            load_config::<Cfg>(&unknown, "APP"),
            Err(ConfigError::Schema(_))
        ));
        let invalid = ConfigSource::from_text("name = \"\"\n", BTreeMap::new());
        assert!(matches!(
            load_config::<Cfg>(&invalid, "APP"),
            Err(ConfigError::Invalid(_))
        ));
        let wrong_type = ConfigSource::from_text(
            "name = \"a\"\n",
            env(&[("APP__INNER__PORT", "not-a-number")]),
        );
        assert!(matches!(
            load_config::<Cfg>(&wrong_type, "APP"),
            Err(ConfigError::Schema(_))
        ));
        let wrong_type = ConfigSource::from_text(
            "name = \"a\"\n",
            env(&[("APP__INNER__PORT", "not-a-number")]),
        );
        let Err(ConfigError::Schema(m)) = load_config::<Cfg>(&wrong_type, "APP") else {
            panic!("a bad override is a schema error");
        };
        assert!(
            m.starts_with("inner.port: ")
                && m.ends_with("(in environment variable APP__INNER__PORT)"),
            "{m}"
        );
        let Err(ConfigError::Schema(m)) = load_config::<Cfg>(&unknown, "APP") else {
            panic!("an unknown key is a schema error");
        };
        assert!(m.starts_with("nope: unknown field"), "{m}");
        let through_scalar =
            ConfigSource::from_text("name = \"a\"\n", env(&[("APP__NAME__X", "1")]));
        assert!(matches!(
            load_config::<Cfg>(&through_scalar, "APP"),
            Err(ConfigError::Env { .. })
        ));
        let missing = ConfigSource::new(Some("/nonexistent/x.toml".into()), BTreeMap::new());
        assert!(matches!(
            load_config::<Cfg>(&missing, "APP"),
            Err(ConfigError::Read { .. })
        ));
    }
}
