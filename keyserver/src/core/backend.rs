//! Which store the core runs on ([`StoreAt`], from config) and the open
//! handle ([`Store`]): a redb file ([`kv`](super::kv)) or PostgreSQL
//! ([`PgStore`]). Kept apart from both so neither imports the other.

use std::path::PathBuf;
use std::sync::Arc;

use redb::{Database, ReadableDatabase};

use super::kv::{self, KvRead, KvTxn, RedbRead, RedbWrite};
pub use super::kv_pg::PgStore;
use crate::error::Result;

/// Where the core keeps its state.
#[derive(Clone)]
pub enum StoreAt {
    /// A redb file (one keyserver process).
    Redb(PathBuf),
    /// A PostgreSQL database (libpq connection string or URL), shared by
    /// keyserver replicas.
    Postgres(String),
}

impl std::fmt::Debug for StoreAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreAt::Redb(p) => write!(f, "Redb({})", p.display()),
            // The connection string may hold a password.
            StoreAt::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

impl StoreAt {
    /// Opens the store (a redb file is created with every table).
    pub fn open(&self) -> Result<Store> {
        match self {
            StoreAt::Redb(path) => {
                // 0600, and shared read-only with `keyserver backup` while serving.
                let db = tessera_runtime::snapshot::open_shared_writer(path)?;
                let w = db.begin_write()?;
                // Create every table so later reads never meet a missing one.
                kv::create_redb_tables(&w)?;
                w.commit()?;
                Ok(Store::Redb(Arc::new(db)))
            }
            StoreAt::Postgres(url) => Ok(Store::Pg(Arc::new(PgStore::open(url)?))),
        }
    }
}

/// Where the state lives.
#[derive(Clone)]
pub enum Store {
    /// A redb file.
    Redb(Arc<Database>),
    /// A PostgreSQL database shared by replicas.
    Pg(Arc<PgStore>),
}

impl Store {
    /// A read snapshot.
    pub fn read(&self) -> Result<Box<dyn KvRead>> {
        match self {
            Store::Redb(db) => Ok(Box::new(RedbRead(db.begin_read()?))),
            Store::Pg(pg) => Ok(Box::new(pg.begin(false)?)),
        }
    }

    /// A write transaction. On PostgreSQL it first takes the chain lock
    /// (transaction-scoped), so one write transaction at a time runs across
    /// every replica and each one sees every earlier commit.
    pub fn write(&self) -> Result<Box<dyn KvTxn>> {
        match self {
            Store::Redb(db) => Ok(Box::new(RedbWrite(db.begin_write()?))),
            Store::Pg(pg) => Ok(Box::new(pg.begin(true)?)),
        }
    }

    /// True when several keyserver processes may write (state cached in
    /// memory must then be re-read inside the transaction).
    pub fn shared(&self) -> bool {
        matches!(self, Store::Pg(_))
    }

    /// The redb file, when that is the backend (backup, snapshots).
    pub fn redb(&self) -> Option<&Arc<Database>> {
        match self {
            Store::Redb(db) => Some(db),
            Store::Pg(_) => None,
        }
    }
}
