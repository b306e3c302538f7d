//! Where the vault's rows live: a small key-value interface over three
//! tables (studies, instances, dicom_index) that only ever sees sealed
//! records and HMAC index keys, with two implementations: the local redb
//! file (one gateway) and PostgreSQL (`pg.rs`: several gateway replicas
//! sharing one database). Decision 22 in docs/ARCHITECTURE.md.

use std::collections::HashMap;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::store::{INDEX, INSTANCES, Op, Reply, STUDIES, Tbl, writer_loop};
use crate::error::GatewayError;

type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// Rows of one table, in key order.
pub(super) type Rows = Vec<(String, Vec<u8>)>;

/// The storage under the vault. Every call is synchronous and may block
/// (callers run vault work through `shared::with_vault`, off the async
/// threads); none may panic.
pub(super) trait Backend: Send + Sync {
    /// The value of `key`, if any (index values are their UTF-8 bytes).
    fn get(&self, tbl: Tbl, key: &str) -> Result<Option<Vec<u8>>>;
    /// Rows with `from <= key < to` (`to` absent: to the end), key order.
    fn range(&self, tbl: Tbl, from: &str, to: Option<&str>) -> Result<Rows>;
    /// Number of rows.
    fn len(&self, tbl: Tbl) -> Result<u64>;
    /// Applies one change atomically and durably; answers after the
    /// commit. An insert whose key exists refuses the whole op
    /// (AlreadyExists) and nothing else.
    fn submit(&self, op: Op) -> Result<()>;
    /// Records that `replica` is alive now.
    fn beat(&self, replica: &str) -> Result<()>;
    /// Whether `replica` beat within the last `lease_secs`.
    fn alive(&self, replica: &str, lease_secs: u64) -> Result<bool>;
    /// Shared by several gateway processes (what recovery must respect).
    fn shared(&self) -> bool;
}

/// The redb file: one gateway process holds it (the file is locked), so
/// the only live replica is this process.
pub(super) struct RedbBackend {
    db: std::sync::Arc<Database>,
    writer: std::sync::Mutex<Option<std::sync::mpsc::Sender<(Op, Reply)>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    beats: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

impl Drop for RedbBackend {
    fn drop(&mut self) {
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
        if let Ok(mut t) = self.thread.lock()
            && let Some(t) = t.take()
        {
            let _ = t.join();
        }
    }
}

impl RedbBackend {
    /// Opens (or creates) the file, owner-only, and starts its writer.
    pub(super) fn open(path: &std::path::Path) -> Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| GatewayError::Vault(format!("{}: {e}", parent.display())))?;
        }
        // Owner-only (the vault maps pseudonyms to patients), and shared
        // read-only with `gateway vault-backup` while serving.
        let db = tessera_runtime::snapshot::open_shared_writer(path)
            .map_err(|e| GatewayError::Vault(format!("{}: {e}", path.display())))?;
        let txn = db.begin_write()?;
        txn.open_table(STUDIES)?;
        txn.open_table(INSTANCES)?;
        txn.open_table(INDEX)?;
        txn.commit()?;
        let db = std::sync::Arc::new(db);
        let (tx, rx) = std::sync::mpsc::channel();
        let wdb = db.clone();
        let thread = std::thread::Builder::new()
            .name("vault-writer".into())
            .spawn(move || writer_loop(wdb, rx))
            .map_err(|e| GatewayError::Vault(format!("cannot start the writer: {e}")))?;
        Ok(Self {
            db,
            writer: std::sync::Mutex::new(Some(tx)),
            thread: std::sync::Mutex::new(Some(thread)),
            beats: Default::default(),
        })
    }
}

fn rows<V: redb::Value + 'static>(
    t: &impl ReadableTable<&'static str, V>,
    from: &str,
    to: Option<&str>,
    bytes: impl Fn(V::SelfType<'_>) -> Vec<u8>,
) -> Result<Rows> {
    let mut out = Vec::new();
    let iter = match to {
        Some(to) => t.range(from..to)?,
        None => t.range(from..)?,
    };
    for item in iter {
        let (k, v) = item?;
        out.push((k.value().to_owned(), bytes(v.value())));
    }
    Ok(out)
}

impl Backend for RedbBackend {
    fn get(&self, tbl: Tbl, key: &str) -> Result<Option<Vec<u8>>> {
        let txn = self.db.begin_read()?;
        Ok(match tbl {
            Tbl::Studies => txn
                .open_table(STUDIES)?
                .get(key)?
                .map(|v| v.value().to_vec()),
            Tbl::Instances => txn
                .open_table(INSTANCES)?
                .get(key)?
                .map(|v| v.value().to_vec()),
            Tbl::Index => txn
                .open_table(INDEX)?
                .get(key)?
                .map(|v| v.value().as_bytes().to_vec()),
        })
    }

    fn range(&self, tbl: Tbl, from: &str, to: Option<&str>) -> Result<Rows> {
        let txn = self.db.begin_read()?;
        match tbl {
            Tbl::Studies => rows(&txn.open_table(STUDIES)?, from, to, |v| v.to_vec()),
            Tbl::Instances => rows(&txn.open_table(INSTANCES)?, from, to, |v| v.to_vec()),
            Tbl::Index => rows(&txn.open_table(INDEX)?, from, to, |v| v.as_bytes().to_vec()),
        }
    }

    fn len(&self, tbl: Tbl) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(match tbl {
            Tbl::Studies => txn.open_table(STUDIES)?.len()?,
            Tbl::Instances => txn.open_table(INSTANCES)?.len()?,
            Tbl::Index => txn.open_table(INDEX)?.len()?,
        })
    }

    fn submit(&self, op: Op) -> Result<()> {
        let (reply_tx, reply_rx) = std::sync::mpsc::sync_channel(1);
        {
            let w = self
                .writer
                .lock()
                .map_err(|_| GatewayError::Vault("writer lock poisoned".into()))?;
            let w = w
                .as_ref()
                .ok_or_else(|| GatewayError::Vault("the vault is closed".into()))?;
            w.send((op, reply_tx))
                .map_err(|_| GatewayError::Vault("the vault writer stopped".into()))?;
        }
        reply_rx
            .recv()
            .map_err(|_| GatewayError::Vault("the vault writer stopped".into()))?
    }

    fn beat(&self, replica: &str) -> Result<()> {
        self.beats
            .lock()
            .map_err(|_| GatewayError::Vault("beat lock poisoned".into()))?
            .insert(replica.to_owned(), std::time::Instant::now());
        Ok(())
    }

    fn alive(&self, replica: &str, lease_secs: u64) -> Result<bool> {
        Ok(self
            .beats
            .lock()
            .map_err(|_| GatewayError::Vault("beat lock poisoned".into()))?
            .get(replica)
            .is_some_and(|t| t.elapsed().as_secs() < lease_secs))
    }

    fn shared(&self) -> bool {
        false
    }
}
