//! The vault's tables and ops, and the redb file's single writer thread that
//! folds every change waiting into one durable transaction (group commit)
//! and answers each caller after the commit.

use redb::{Database, ReadableTable, TableDefinition};

use crate::error::GatewayError;

type Result<T, E = GatewayError> = std::result::Result<T, E>;

pub(super) const STUDIES: TableDefinition<&str, &[u8]> = TableDefinition::new("studies");
/// DICOM instances, keyed `<study id>/<instance id>`.
pub(super) const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
/// Lookups by identifying values, keyed by an HMAC under a key derived from
/// the vault key (the values never appear): `s:<hmac(owner, patient id,
/// study uid)>` -> study id, `i:<hmac(study id, SOP instance uid)>` ->
/// instance id.
pub(super) const INDEX: TableDefinition<&str, &str> = TableDefinition::new("dicom_index");

#[derive(Clone, Copy)]
pub(super) enum Tbl {
    Studies,
    Instances,
    Index,
}

/// One write of an [`Op`].
pub(super) enum Write {
    /// Insert; fails if the key exists.
    Insert(Tbl, String, Vec<u8>),
    /// Insert or replace.
    Put(Tbl, String, Vec<u8>),
    Remove(Tbl, String),
    /// Remove the index entry only while it names this value (the record
    /// it belonged to may have been replaced meanwhile).
    RemoveIndexIf(String, String),
    /// Compare-and-set: replace the value only while it is still exactly
    /// `expected` (sealed bytes carry a fresh nonce, so equal bytes are the
    /// very write read before); otherwise the whole op is refused
    /// ([`changed_meanwhile`]).
    PutIf {
        tbl: Tbl,
        key: String,
        value: Vec<u8>,
        expected: Vec<u8>,
    },
}

/// The start of the refusal of a [`Write::PutIf`] whose row changed.
pub(super) const CHANGED_MEANWHILE: &str = "changed by another gateway replica meanwhile";

/// The refusal of a [`Write::PutIf`] (UNAVAILABLE: the caller's step did
/// not happen; a new attempt starts over).
pub(super) fn changed_meanwhile(key: &str) -> GatewayError {
    GatewayError::Unavailable(format!("{CHANGED_MEANWHILE}: {key}"))
}

/// Whether `e` is a [`Write::PutIf`] refusal.
pub(super) fn is_changed_meanwhile(e: &GatewayError) -> bool {
    matches!(e, GatewayError::Unavailable(m) if m.starts_with(CHANGED_MEANWHILE))
}

/// One change, applied atomically by the writer thread.
pub(super) struct Op(pub(super) Vec<Write>);

pub(super) type Reply = std::sync::mpsc::SyncSender<Result<()>>;

/// Most changes folded into one transaction.
pub(super) const MAX_BATCH: usize = 256;

pub(super) struct Tables<'t> {
    studies: redb::Table<'t, &'static str, &'static [u8]>,
    instances: redb::Table<'t, &'static str, &'static [u8]>,
    index: redb::Table<'t, &'static str, &'static str>,
}

impl Tables<'_> {
    fn value(&self, tbl: Tbl, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(match tbl {
            Tbl::Studies => self.studies.get(key)?.map(|v| v.value().to_vec()),
            Tbl::Instances => self.instances.get(key)?.map(|v| v.value().to_vec()),
            Tbl::Index => self.index.get(key)?.map(|v| v.value().as_bytes().to_vec()),
        })
    }

    fn exists(&self, tbl: Tbl, key: &str) -> Result<bool> {
        Ok(match tbl {
            Tbl::Studies => self.studies.get(key)?.is_some(),
            Tbl::Instances => self.instances.get(key)?.is_some(),
            Tbl::Index => self.index.get(key)?.is_some(),
        })
    }

    fn put(&mut self, tbl: Tbl, key: &str, value: &[u8]) -> Result<()> {
        match tbl {
            Tbl::Studies => {
                self.studies.insert(key, value)?;
            }
            Tbl::Instances => {
                self.instances.insert(key, value)?;
            }
            Tbl::Index => {
                let v = std::str::from_utf8(value)
                    .map_err(|_| GatewayError::Internal("index value is not text".into()))?;
                self.index.insert(key, v)?;
            }
        }
        Ok(())
    }

    fn remove(&mut self, tbl: Tbl, key: &str) -> Result<()> {
        match tbl {
            Tbl::Studies => {
                self.studies.remove(key)?;
            }
            Tbl::Instances => {
                self.instances.remove(key)?;
            }
            Tbl::Index => {
                self.index.remove(key)?;
            }
        }
        Ok(())
    }
}

/// Applies one op: every insert's key and every compare-and-set is
/// checked first, so an op is all or nothing.
pub(super) fn apply(t: &mut Tables<'_>, op: &Op) -> Result<()> {
    for w in &op.0 {
        match w {
            Write::Insert(tbl, key, _) if t.exists(*tbl, key)? => {
                return Err(GatewayError::AlreadyExists(format!(
                    "{key} is already in the vault"
                )));
            }
            Write::PutIf {
                tbl, key, expected, ..
            } if t.value(*tbl, key)?.as_deref() != Some(expected.as_slice()) => {
                return Err(changed_meanwhile(key));
            }
            Write::Insert(..)
            | Write::Put(..)
            | Write::Remove(..)
            | Write::RemoveIndexIf(..)
            | Write::PutIf { .. } => {}
        }
    }
    for w in &op.0 {
        match w {
            Write::Insert(tbl, key, v)
            | Write::Put(tbl, key, v)
            | Write::PutIf {
                tbl, key, value: v, ..
            } => t.put(*tbl, key, v)?,
            Write::Remove(tbl, key) => t.remove(*tbl, key)?,
            Write::RemoveIndexIf(key, value) => {
                let names_it = t
                    .index
                    .get(key.as_str())?
                    .is_some_and(|v| v.value() == value);
                if names_it {
                    t.remove(Tbl::Index, key)?;
                }
            }
        }
    }
    Ok(())
}

/// Applies a batch in one transaction. Per-op refusals (an id taken) are
/// answered individually; a storage failure fails the whole batch.
pub(super) fn commit_batch(db: &Database, batch: &[(Op, Reply)]) -> Result<Vec<Result<()>>> {
    let txn = db.begin_write()?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut t = Tables {
            studies: txn.open_table(STUDIES)?,
            instances: txn.open_table(INSTANCES)?,
            index: txn.open_table(INDEX)?,
        };
        for (op, _) in batch {
            results.push(match apply(&mut t, op) {
                Err(GatewayError::Vault(m)) => return Err(GatewayError::Vault(m)),
                other => other,
            });
        }
    }
    txn.commit()?;
    Ok(results)
}

pub(super) fn writer_loop(
    db: std::sync::Arc<Database>,
    rx: std::sync::mpsc::Receiver<(Op, Reply)>,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        match commit_batch(&db, &batch) {
            Ok(results) => {
                for ((_, reply), r) in batch.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(GatewayError::Vault(msg.clone())));
                }
            }
        }
    }
}
