//! The `[vault]` section: where the identity vault lives (decision 22).
//!
//! ```toml
//! [vault]
//! backend = "redb"                    # the default: one gateway, a local file
//! path = "data/vault.redb"
//! key_file = "secrets/vault.key"      # 32 random bytes (or 64 hex), mode 0600/0400
//!
//! [vault]                             # several gateway replicas, one database
//! backend = "postgres"
//! key_file = "secrets/vault.key"      # the same key on every replica
//! postgres_url_file = "secrets/vault-pg.url"  # or postgres_url_env = "TESSERA_VAULT_PG_URL"
//! lease_secs = 30                     # a crashed replica's unfinished stores wait this long
//! ```
//!
//! The connection string (which may carry a password) is never in the TOML:
//! it is read from a file (trailing whitespace trimmed) or an environment
//! variable when the gateway starts.

use std::path::PathBuf;

use serde::Deserialize;

/// Which store holds the vault's rows.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VaultBackend {
    /// One local redb file (one gateway process).
    #[default]
    Redb,
    /// PostgreSQL, shared by every gateway replica.
    Postgres,
}

/// The `[vault]` section: the identity vault.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VaultSection {
    #[serde(default)]
    pub backend: VaultBackend,
    /// redb file of sealed study records (backend `redb`).
    #[serde(default)]
    pub path: PathBuf,
    /// 32-byte vault key (raw or 64 hex characters), owner-only permissions.
    pub key_file: PathBuf,
    /// A file holding the PostgreSQL connection string (backend `postgres`).
    #[serde(default)]
    pub postgres_url_file: Option<PathBuf>,
    /// An environment variable holding it instead.
    #[serde(default)]
    pub postgres_url_env: Option<String>,
    /// Seconds a replica's heartbeat protects its unfinished stores from
    /// another replica's recovery.
    #[serde(default = "default_lease")]
    pub lease_secs: u64,
}

fn default_lease() -> u64 {
    crate::vault::DEFAULT_LEASE_SECS
}

impl VaultSection {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.key_file.as_os_str().is_empty() {
            return Err("vault.key_file must not be empty".into());
        }
        if !(3..=3600).contains(&self.lease_secs) {
            return Err("vault.lease_secs must be 3..=3600".into());
        }
        let url_set = self.postgres_url_file.is_some() || self.postgres_url_env.is_some();
        match self.backend {
            VaultBackend::Redb => {
                if self.path.as_os_str().is_empty() {
                    return Err("vault.path must not be empty".into());
                }
                if url_set {
                    return Err(
                        "vault.postgres_url_file/postgres_url_env need backend = \"postgres\""
                            .into(),
                    );
                }
            }
            VaultBackend::Postgres => {
                match (&self.postgres_url_file, &self.postgres_url_env) {
                    (Some(f), None) if !f.as_os_str().is_empty() => {}
                    (None, Some(v)) if !v.trim().is_empty() => {}
                    (Some(_), Some(_)) => {
                        return Err(
                            "vault: set one of postgres_url_file and postgres_url_env".into()
                        );
                    }
                    _ => {
                        return Err(
                            "vault: backend \"postgres\" needs postgres_url_file or postgres_url_env"
                                .into(),
                        );
                    }
                }
                if !self.path.as_os_str().is_empty() {
                    return Err(
                        "vault.path is the redb file: unset it for backend \"postgres\"".into(),
                    );
                }
            }
        }
        Ok(())
    }

    /// The PostgreSQL connection string, read now from its file or
    /// variable.
    pub fn postgres_url(&self) -> Result<String, String> {
        tessera_runtime::connection_string(
            "vault.postgres_url",
            self.postgres_url_file.as_ref(),
            self.postgres_url_env.as_ref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(json: &str) -> VaultSection {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn backends_are_validated() {
        let redb = section(r#"{"path": "v.redb", "key_file": "k"}"#);
        assert_eq!(redb.backend, VaultBackend::Redb);
        assert_eq!(redb.lease_secs, crate::vault::DEFAULT_LEASE_SECS);
        redb.validate().unwrap();
        let pg =
            section(r#"{"backend": "postgres", "key_file": "k", "postgres_url_env": "PGURL"}"#);
        pg.validate().unwrap();
        for (text, why) in [
            (
                r#"{"backend": "postgres", "key_file": "k"}"#,
                "needs postgres_url_file",
            ),
            (
                r#"{"backend": "postgres", "key_file": "k", "postgres_url_env": "A", "postgres_url_file": "f"}"#,
                "set one of",
            ),
            (
                r#"{"backend": "postgres", "path": "v.redb", "key_file": "k", "postgres_url_env": "A"}"#,
                "unset it",
            ),
            (
                r#"{"key_file": "k", "postgres_url_env": "A", "path": "v"}"#,
                "need backend",
            ),
            (r#"{"key_file": "k"}"#, "vault.path"),
            (
                r#"{"path": "v", "key_file": "k", "lease_secs": 1}"#,
                "lease_secs",
            ),
        ] {
            let e = section(text).validate().unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        assert!(
            serde_json::from_str::<VaultSection>(r#"{"backend": "sqlite", "key_file": "k"}"#)
                .is_err()
        );
    }

    #[test]
    fn the_connection_string_comes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("url");
        std::fs::write(
            &f,
            "host=/run/pg user=tessera password=s3cret dbname=vault\n",
        )
        .unwrap();
        let mut s = section(r#"{"backend": "postgres", "key_file": "k"}"#);
        s.postgres_url_file = Some(f.clone());
        assert_eq!(
            s.postgres_url().unwrap(),
            "host=/run/pg user=tessera password=s3cret dbname=vault"
        );
        std::fs::write(&f, "  \n").unwrap();
        assert!(s.postgres_url().unwrap_err().contains("empty"));
        s.postgres_url_file = Some(dir.path().join("absent"));
        assert!(s.postgres_url().is_err());
    }
}
