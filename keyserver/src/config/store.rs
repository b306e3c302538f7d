//! The `[keyserver.store]` section: where the keyserver's state and audit
//! log live (decision 23; the gateway vault's `[vault]` convention).
//!
//! ```toml
//! [keyserver]
//! db_path = "data/keyserver.redb"     # backend "redb" (the default, no section needed)
//!
//! [keyserver.store]                   # several keyserver replicas, one database
//! backend = "postgres"
//! postgres_url_file = "secrets/keyserver-pg.url"  # or postgres_url_env = "TESSERA_KS_PG_URL"
//! ```
//!
//! The connection string (which may carry a password) is never in the TOML:
//! it is read from a file (trailing whitespace trimmed) or an environment
//! variable when the keyserver starts. Every replica has the same KEK.

use std::path::PathBuf;

use serde::Deserialize;

/// Which store holds the keyserver's tables.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// One local redb file (`keyserver.db_path`), one keyserver process.
    #[default]
    Redb,
    /// PostgreSQL, shared by every keyserver replica.
    Postgres,
}

/// The `[keyserver.store]` section.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub backend: StoreBackend,
    /// A file holding the PostgreSQL connection string (backend `postgres`).
    #[serde(default)]
    pub postgres_url_file: Option<PathBuf>,
    /// An environment variable holding it instead.
    #[serde(default)]
    pub postgres_url_env: Option<String>,
}

impl StoreSection {
    /// Checks the section against `db_path` (the redb file).
    pub fn validate(&self, db_path: &std::path::Path) -> Result<(), String> {
        let url_set = self.postgres_url_file.is_some() || self.postgres_url_env.is_some();
        match self.backend {
            StoreBackend::Redb => {
                if db_path.as_os_str().is_empty() {
                    return Err("keyserver.db_path must not be empty".into());
                }
                if url_set {
                    return Err("keyserver.store.postgres_url_file/postgres_url_env need \
                                backend = \"postgres\""
                        .into());
                }
            }
            StoreBackend::Postgres => {
                match (&self.postgres_url_file, &self.postgres_url_env) {
                    (Some(f), None) if !f.as_os_str().is_empty() => {}
                    (None, Some(v)) if !v.trim().is_empty() => {}
                    (Some(_), Some(_)) => {
                        return Err("keyserver.store: set one of postgres_url_file and \
                                    postgres_url_env"
                            .into());
                    }
                    _ => {
                        return Err("keyserver.store: backend \"postgres\" needs \
                                    postgres_url_file or postgres_url_env"
                            .into());
                    }
                }
                if !db_path.as_os_str().is_empty() {
                    return Err("keyserver.db_path is the redb file: unset it for \
                                keyserver.store.backend = \"postgres\""
                        .into());
                }
            }
        }
        Ok(())
    }

    /// The PostgreSQL connection string, read now from its file or
    /// variable.
    pub fn postgres_url(&self) -> Result<String, String> {
        tessera_runtime::connection_string(
            "keyserver.store.postgres_url",
            self.postgres_url_file.as_ref(),
            self.postgres_url_env.as_ref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn section(json: &str) -> StoreSection {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn backends_are_validated() {
        let redb = StoreSection::default();
        assert_eq!(redb.backend, StoreBackend::Redb);
        redb.validate(Path::new("ks.redb")).unwrap();
        assert!(redb.validate(Path::new("")).is_err());
        let pg = section(r#"{"backend": "postgres", "postgres_url_env": "PGURL"}"#);
        pg.validate(Path::new("")).unwrap();
        for (text, db, why) in [
            (r#"{"backend": "postgres"}"#, "", "needs postgres_url_file"),
            (
                r#"{"backend": "postgres", "postgres_url_env": "A", "postgres_url_file": "f"}"#,
                "",
                "set one of",
            ),
            (
                r#"{"backend": "postgres", "postgres_url_env": "A"}"#,
                "ks.redb",
                "unset it",
            ),
            (r#"{"postgres_url_env": "A"}"#, "ks.redb", "need backend"),
        ] {
            let e = section(text).validate(Path::new(db)).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn the_url_comes_from_a_file_or_a_variable() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("url");
        std::fs::write(&f, "host=/tmp dbname=ks\n").unwrap();
        let s = StoreSection {
            backend: StoreBackend::Postgres,
            postgres_url_file: Some(f),
            postgres_url_env: None,
        };
        assert_eq!(s.postgres_url().unwrap(), "host=/tmp dbname=ks");
        let s = StoreSection {
            backend: StoreBackend::Postgres,
            postgres_url_file: None,
            postgres_url_env: Some("TESSERA_KS_TEST_UNSET_VARIABLE".into()),
        };
        assert!(s.postgres_url().unwrap_err().contains("is not set"));
    }
}
