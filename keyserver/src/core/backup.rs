//! Online backup and checked restore of the keyserver database (`keyserver
//! backup`, `keyserver restore`). The file handling (a running keyserver
//! shares its file read-only, new 0600 files, fsync, no overwrite, redb's
//! integrity check) is `tessera_runtime::snapshot`; this module knows the
//! tables and what makes a copy restorable.
//!
//! A backup is one redb read transaction of the live database copied table
//! by table, byte for byte, into a new redb file: master secrets and the
//! audit signing key stay wrapped under the KEK exactly as stored (nothing
//! is unwrapped to copy them), so a backup is as sensitive as the database
//! and useless without the KEK.

use std::path::Path;

use redb::{ReadTransaction, ReadableDatabase, ReadableTableMetadata, WriteTransaction};
use tessera_runtime::snapshot::{self, SnapshotError, table_names};

use super::crypto::{Kek, master_aad};
use super::kv::{self, KvRead, Tbl};
use super::store::{MASTERS, META, META_MASTER_CURRENT, STUDIES, get_bytes};
use super::{load_signer, verify_database};
use crate::error::{KeyServerError, Result};

/// Every table of the keyserver (see `store.rs`), sorted. A database with
/// any other table is refused rather than backed up in part.
const TABLES: [&str; 14] = [
    "audit",
    "audit_checkpoints",
    "audit_recoveries",
    "delegates",
    "masters",
    "meta",
    "owner_settings",
    "owner_standing",
    "owner_studies",
    "requester_requests",
    "requests",
    "standing",
    "studies",
    "study_requests",
];

/// What a checked backup (or restored database) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Rows copied, every table.
    pub rows: u64,
    /// Studies (tombstones of forgotten ones included).
    pub studies: u64,
    /// Master secret versions; each one unwrapped under the KEK.
    pub masters: u64,
    /// Audit entries; the whole chain verified under the KEK's signing key.
    pub audit_entries: u64,
}

fn copy_all(r: &ReadTransaction, w: &WriteTransaction) -> Result<u64> {
    for name in table_names(r)? {
        if !TABLES.contains(&name.as_str()) {
            return Err(KeyServerError::Corrupt(format!(
                "unknown table {name:?}: this keyserver cannot back it up"
            )));
        }
    }
    let mut rows = 0;
    for t in Tbl::ALL {
        rows += kv::copy_redb_table(r, w, t)?.unwrap_or(0);
    }
    Ok(rows)
}

/// Checks that a database is one the keyserver would serve from under
/// `kek`: only known tables, the audit signing key and every master secret
/// unwrap (AEAD tag and version-bound AAD), the current master exists, and
/// the whole audit chain verifies under the KEK-authenticated signing key
/// (acknowledged breaks before a signed recovery are accepted, as at start).
pub fn check_restorable(db: &impl ReadableDatabase, kek: &Kek) -> Result<SnapshotReport> {
    let (public_key, masters, studies, rows) = {
        let r = db.begin_read()?;
        let mut rows = 0;
        for name in table_names(&r)? {
            if !TABLES.contains(&name.as_str()) {
                return Err(KeyServerError::Corrupt(format!("unknown table {name:?}")));
            }
        }
        for handle in r.list_tables()? {
            rows += r.open_untyped_table(handle)?.len()?;
        }
        let r = kv::RedbRead(r);
        let signer = load_signer(&r, kek)?
            .ok_or_else(|| KeyServerError::Corrupt("no audit signing key".into()))?;
        let mut masters = 0;
        let r: &dyn KvRead = &r;
        r.scan_all(MASTERS, &mut |k, v| {
            let version = u32::try_from(k.num())
                .map_err(|_| KeyServerError::Corrupt(format!("master version {}", k.num())))?;
            // Dropped (and wiped) at once: only that it unwraps matters.
            kek.unwrap_secret(&master_aad(version), v)?;
            masters += 1;
            Ok(true)
        })?;
        let current = get_bytes(r, META, META_MASTER_CURRENT)?
            .and_then(|b| b.as_slice().try_into().ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| KeyServerError::Corrupt("no current master version".into()))?;
        if r.get_num(MASTERS, u64::from(current))?.is_none() {
            return Err(KeyServerError::Corrupt(format!(
                "current master version {current} is missing"
            )));
        }
        let studies = r.len(STUDIES)?;
        (signer.public_key(), masters, studies, rows)
    };
    let rep = verify_database(&kv::redb_read(db)?, &public_key)?;
    if !rep.ok {
        return Err(KeyServerError::Corrupt(format!(
            "audit chain broken at entry {}: {}",
            rep.first_broken_seq.unwrap_or(0),
            rep.problem
        )));
    }
    Ok(SnapshotReport {
        rows,
        studies,
        masters,
        audit_entries: rep.entries,
    })
}

/// `keyserver backup`: snapshots the database at `db` (the keyserver may be
/// running) into the new file `out`, then checks the copy with
/// [`check_restorable`]: a backup that is written is one `restore` accepts.
pub fn backup(db: &Path, out: &Path, kek: &Kek) -> Result<SnapshotReport, SnapshotError> {
    let mut checked = None;
    let rows = snapshot::write_snapshot(db, out, copy_all, |copy| {
        checked = Some(check_restorable(copy, kek)?);
        Ok::<_, KeyServerError>(())
    })?;
    match checked {
        Some(rep) if rep.rows == rows => Ok(rep),
        _ => Err(SnapshotError::Check {
            path: out.to_owned(),
            message: format!("the copy does not hold the {rows} rows read"),
        }),
    }
}

/// `keyserver restore`: checks `backup` (redb integrity, then
/// [`check_restorable`] under `kek`) and installs it as `db`; refused while
/// a keyserver has `db` open, and over a non-empty `db` unless `force`.
pub fn restore(
    backup: &Path,
    db: &Path,
    kek: &Kek,
    force: bool,
) -> Result<SnapshotReport, SnapshotError> {
    snapshot::restore_snapshot(backup, db, force, |copy| check_restorable(copy, kek))
}
