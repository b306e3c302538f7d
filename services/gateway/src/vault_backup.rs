//! Online backup and checked restore of the identity vault (`gateway
//! vault-backup`, `gateway vault-restore`). The file handling is
//! `tessera_runtime::snapshot` (the gateway opens its vault so that a second
//! process may read it while it serves); this module knows the vault's
//! tables and what makes a copy restorable: the vault key opens every record.
//!
//! Records are copied byte for byte: they stay sealed under the vault key,
//! which is never written anywhere. A backup is as sensitive as the vault
//! and useless without the key.

use std::path::Path;

use tessera_runtime::snapshot::{self, SnapshotError, table_names};

use crate::error::GatewayError;
use crate::vault::{TABLE_NAMES, VaultCounts, check_sealed, copy_tables};

/// What a checked backup (or restored vault) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultSnapshotReport {
    /// Rows copied, every table.
    pub rows: u64,
    /// Records opened under the vault key.
    pub counts: VaultCounts,
}

fn copy_all(r: &redb::ReadTransaction, w: &redb::WriteTransaction) -> Result<u64, GatewayError> {
    for name in table_names(r)? {
        if !TABLE_NAMES.contains(&name.as_str()) {
            return Err(GatewayError::Vault(format!(
                "unknown table {name:?}: this gateway cannot back it up"
            )));
        }
    }
    Ok(copy_tables(r, w)?)
}

/// Refuses a database with a table the vault does not know, then opens
/// every record under `key`.
fn check(db: &redb::Database, key: &[u8; 32]) -> Result<VaultCounts, GatewayError> {
    {
        use redb::ReadableDatabase;
        let r = db.begin_read()?;
        for name in table_names(&r)? {
            if !TABLE_NAMES.contains(&name.as_str()) {
                return Err(GatewayError::Vault(format!("unknown table {name:?}")));
            }
        }
    }
    check_sealed(db, key)
}

/// `gateway vault-backup`: one consistent snapshot of the vault at `vault`
/// (the gateway may be running) into the new 0600 file `out`, then every
/// record of the copy opened under `key`. Never overwrites `out`.
pub fn backup(
    vault: &Path,
    out: &Path,
    key: &[u8; 32],
) -> Result<VaultSnapshotReport, SnapshotError> {
    let mut counts = None;
    let rows = snapshot::write_snapshot(vault, out, copy_all, |copy| {
        counts = Some(check(copy, key)?);
        Ok::<_, GatewayError>(())
    })?;
    counts
        .map(|counts| VaultSnapshotReport { rows, counts })
        .ok_or_else(|| SnapshotError::Check {
            path: out.to_owned(),
            message: "not checked".into(),
        })
}

/// `gateway vault-restore`: checks `backup` (redb integrity, every record
/// opens under `key`) and installs it as the vault at `vault`; refused while
/// a gateway has the vault open, and over a non-empty vault unless `force`.
pub fn restore(
    backup: &Path,
    vault: &Path,
    key: &[u8; 32],
    force: bool,
) -> Result<VaultSnapshotReport, SnapshotError> {
    snapshot::restore_snapshot(backup, vault, force, |copy| {
        let counts = check(copy, key)?;
        Ok::<_, GatewayError>(VaultSnapshotReport {
            rows: counts.studies + counts.instances + counts.index,
            counts,
        })
    })
}
