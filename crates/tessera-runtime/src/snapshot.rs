//! Online backups of the suite's redb files (keyserver database, gateway
//! vault) and their checked restore. The services own which tables to copy
//! and what "restorable" means; this module owns the files: how a live
//! database is shared, how a snapshot is written (new file, 0600, fsync,
//! never over an existing file) and how a checked copy replaces a database.
//!
//! A service opens its database with [`open_shared_writer`]
//! ([`ConcurrencyMode::SingleWriter`]): redb then lets another process open
//! the same file read-only ([`open_live_read_only`]) while the service
//! writes, and one read transaction in that process is a consistent
//! snapshot however many commits the service makes meanwhile. In redb's
//! default mode (`ExclusiveWriter`) even a read-only open by a second
//! process fails with `DatabaseAlreadyOpen` (see the tests below).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, Key, MultimapTableHandle, ReadOnlyDatabase,
    ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableError, TableHandle,
    Value, WriteTransaction,
};

/// What went wrong writing a snapshot or restoring one.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The output (or the database to restore into) already holds data.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// Another process (a running service) has the database open.
    #[error("{0} is open in another process (stop the service first)")]
    InUse(PathBuf),
    /// Another process holds the database in redb's exclusive mode (a
    /// service built before it shared its file, or an offline tool).
    #[error(
        "{0} is held exclusively by another process; only a service opening it in the shared mode can be backed up while it runs"
    )]
    Exclusive(PathBuf),
    /// A file operation failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// redb refused the file (corrupt, truncated, altered, not a database).
    #[error("{path}: not a sound database: {message}")]
    Database {
        /// The file.
        path: PathBuf,
        /// redb's error.
        message: String,
    },
    /// The service's own check of the content failed.
    #[error("{path}: {message}")]
    Check {
        /// The file.
        path: PathBuf,
        /// The service's reason.
        message: String,
    },
}

fn io(path: &Path, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Io {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Database {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

fn check(path: &Path, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Check {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

/// The mode every service database is opened in, so that a backup process
/// can read it while the service runs.
pub const SHARED_MODE: ConcurrencyMode = ConcurrencyMode::SingleWriter;

/// Opens (creating if absent, 0600) a service database: one writer (this
/// process), any number of read-only handles in other processes.
pub fn open_shared_writer(path: &Path) -> Result<Database, DatabaseError> {
    crate::private_db_file(path)?;
    Builder::new()
        .set_concurrency_mode(SHARED_MODE)
        .create(path)
}

/// Opens a service database read-only beside its running writer (or with
/// no writer at all). A file left by a crash is refused
/// (`RepairAborted`): start the service once so redb repairs it.
pub fn open_live_read_only(path: &Path) -> Result<ReadOnlyDatabase, DatabaseError> {
    // An absent file would otherwise be reported as a redb I/O error.
    std::fs::metadata(path)?;
    Builder::new()
        .set_concurrency_mode(SHARED_MODE)
        .open_read_only(path)
}

/// The names of the (normal and multimap) tables a read transaction sees,
/// sorted: a snapshot refuses a table it does not know how to copy rather
/// than leave it behind.
pub fn table_names(r: &ReadTransaction) -> Result<Vec<String>, redb::Error> {
    let mut names: Vec<String> = r.list_tables()?.map(|t| t.name().to_owned()).collect();
    names.extend(r.list_multimap_tables()?.map(|t| t.name().to_owned()));
    names.sort();
    Ok(names)
}

/// Copies every row of `def` byte for byte from `r` into `w` (creating the
/// table, possibly empty, when `r` has it); returns the rows copied, `None`
/// when `r` has no such table.
pub fn copy_table<K: Key + 'static, V: Value + 'static>(
    r: &ReadTransaction,
    w: &WriteTransaction,
    def: TableDefinition<K, V>,
) -> Result<Option<u64>, redb::Error> {
    let src = match r.open_table(def) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut dst = w.open_table(def)?;
    let mut n = 0;
    for item in src.iter()? {
        let (k, v) = item?;
        dst.insert(k.value(), v.value())?;
        n += 1;
    }
    Ok(Some(n))
}

/// `<dir>/.<name>.<tag>-<pid>`: a temporary file in the same directory as
/// `path`, so the final rename or link stays on one file system.
fn sibling(path: &Path, tag: &str) -> Result<PathBuf, SnapshotError> {
    let name = path
        .file_name()
        .ok_or_else(|| io(path, "not a file name"))?
        .to_string_lossy()
        .into_owned();
    Ok(path.with_file_name(format!(".{name}.{tag}-{}", std::process::id())))
}

/// Creates `path` exclusively (it must not exist) with mode 0600.
fn create_private(path: &Path) -> Result<File, SnapshotError> {
    let mut opts = OpenOptions::new();
    opts.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path).map_err(|e| io(path, e))
}

fn sync_file(path: &Path) -> Result<(), SnapshotError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| io(path, e))
}

/// Makes a rename or link in the directory of `path` durable.
fn sync_parent(path: &Path) -> Result<(), SnapshotError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    #[cfg(unix)]
    sync_file(dir)?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Removes a temporary file on every exit path but success.
struct TempGuard(Option<PathBuf>);

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes a snapshot of `source` to `out`: one read transaction of the
/// (possibly live) database is handed to `fill` with a write transaction of
/// a new database; `after` then checks the committed copy. The copy is
/// built in a temporary 0600 file beside `out`, committed, fsynced, and
/// linked to `out` only if `out` does not exist (never overwritten, even by
/// a race); the directory is fsynced. On any failure nothing is left at
/// `out`.
pub fn write_snapshot<T, E: std::fmt::Display>(
    source: &Path,
    out: &Path,
    fill: impl FnOnce(&ReadTransaction, &WriteTransaction) -> Result<T, E>,
    after: impl FnOnce(&Database) -> Result<(), E>,
) -> Result<T, SnapshotError> {
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(SnapshotError::Exists(out.to_owned()));
    }
    let live = open_live_read_only(source).map_err(|e| {
        if matches!(e, DatabaseError::DatabaseAlreadyOpen) {
            SnapshotError::Exclusive(source.to_owned())
        } else {
            db_err(source, e)
        }
    })?;
    let tmp = sibling(out, "partial")?;
    drop(create_private(&tmp)?);
    let mut guard = TempGuard(Some(tmp.clone()));
    let result = {
        // redb initialises the empty 0600 file as a new database.
        let db = Builder::new().create(&tmp).map_err(|e| db_err(&tmp, e))?;
        let r = live.begin_read().map_err(|e| db_err(source, e))?;
        let w = db.begin_write().map_err(|e| db_err(&tmp, e))?;
        let result = fill(&r, &w).map_err(|e| check(source, e))?;
        w.commit().map_err(|e| db_err(&tmp, e))?;
        drop(r);
        after(&db).map_err(|e| check(&tmp, e))?;
        db.close().map_err(|e| db_err(&tmp, e))?;
        result
    };
    drop(live);
    sync_file(&tmp)?;
    std::fs::hard_link(&tmp, out).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            SnapshotError::Exists(out.to_owned())
        } else {
            io(out, e)
        }
    })?;
    std::fs::remove_file(&tmp).map_err(|e| io(&tmp, e))?;
    guard.0 = None;
    sync_parent(out)?;
    Ok(result)
}

/// Restores `backup` as the database `db`: the backup is copied to a
/// temporary 0600 file beside `db`, opened with redb's full integrity check
/// (every page checksum: a truncated or altered file fails here), handed to
/// the service's `verify`, closed, fsynced and renamed over `db`.
///
/// Refused when `db` is open in another process, and when `db` holds data
/// (a non-empty file) unless `force`. `db` is untouched on any failure.
pub fn restore_snapshot<T, E: std::fmt::Display>(
    backup: &Path,
    db: &Path,
    force: bool,
    verify: impl FnOnce(&Database) -> Result<T, E>,
) -> Result<T, SnapshotError> {
    match std::fs::metadata(db) {
        Ok(m) if m.len() > 0 => {
            if !force {
                return Err(SnapshotError::Exists(db.to_owned()));
            }
            // A running service holds the file; a damaged one (the reason
            // to restore) may fail to open in other ways, which is fine.
            match ReadOnlyDatabase::open(db) {
                Err(DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(SnapshotError::InUse(db.to_owned()));
                }
                Ok(h) => drop(h),
                Err(_) => {}
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(db, e)),
    }
    let tmp = sibling(db, "restore")?;
    let mut guard = TempGuard(Some(tmp.clone()));
    {
        let mut dst = create_private(&tmp)?;
        let mut src = File::open(backup).map_err(|e| io(backup, e))?;
        std::io::copy(&mut src, &mut dst).map_err(|e| io(&tmp, e))?;
        dst.sync_all().map_err(|e| io(&tmp, e))?;
    }
    let result = {
        let handle = Builder::new()
            .set_check_integrity_on_open(true)
            .open(&tmp)
            .map_err(|e| db_err(backup, e))?;
        let result = verify(&handle).map_err(|e| check(backup, e))?;
        handle.close().map_err(|e| db_err(backup, e))?;
        result
    };
    sync_file(&tmp)?;
    std::fs::rename(&tmp, db).map_err(|e| io(db, e))?;
    guard.0 = None;
    sync_parent(db)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    fn put(db: &Database, k: u64) {
        let w = db.begin_write().unwrap();
        w.open_table(T).unwrap().insert(k, b"v".as_slice()).unwrap();
        w.commit().unwrap();
    }

    fn rows(db: &impl ReadableDatabase) -> Vec<u64> {
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        t.iter().unwrap().map(|i| i.unwrap().0.value()).collect()
    }

    fn copy_t(r: &ReadTransaction, w: &WriteTransaction) -> Result<Option<u64>, String> {
        copy_table(r, w, T).map_err(|e| e.to_string())
    }

    #[test]
    fn a_default_mode_writer_excludes_readers_the_shared_mode_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let excl = dir.path().join("excl.redb");
        let held = Database::create(&excl).unwrap();
        put(&held, 1);
        assert!(matches!(
            ReadOnlyDatabase::open(&excl),
            Err(DatabaseError::DatabaseAlreadyOpen)
        ));
        assert!(matches!(
            open_live_read_only(&excl),
            Err(DatabaseError::DatabaseAlreadyOpen)
        ));
        let out = dir.path().join("out.redb");
        let e = write_snapshot(&excl, &out, copy_t, |_| Ok(())).unwrap_err();
        assert!(matches!(e, SnapshotError::Exclusive(_)), "{e}");
        assert!(!out.exists());
        drop(held);

        let shared = dir.path().join("shared.redb");
        let live = open_shared_writer(&shared).unwrap();
        put(&live, 1);
        let ro = open_live_read_only(&shared).unwrap();
        let r = ro.begin_read().unwrap();
        put(&live, 2);
        // The read transaction is a snapshot: the later commit is not in it.
        let t = r.open_table(T).unwrap();
        assert_eq!(t.len().unwrap(), 1);
        assert_eq!(rows(&ro), vec![1, 2]);
    }

    #[test]
    fn snapshot_of_a_live_database_is_private_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("live.redb");
        let live = open_shared_writer(&src).unwrap();
        put(&live, 1);
        put(&live, 2);
        let out = dir.path().join("backup.redb");
        let n = write_snapshot(&src, &out, copy_t, |_| Ok(())).unwrap();
        assert_eq!(n, Some(2));
        put(&live, 3);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(rows(&ReadOnlyDatabase::open(&out).unwrap()), vec![1, 2]);
        let before = std::fs::read(&out).unwrap();
        assert!(matches!(
            write_snapshot(&src, &out, copy_t, |_| Ok(())),
            Err(SnapshotError::Exists(_))
        ));
        assert_eq!(std::fs::read(&out).unwrap(), before);
        // A failed check leaves nothing behind.
        let other = dir.path().join("other.redb");
        let e = write_snapshot(&src, &other, copy_t, |_| Err("no".to_string())).unwrap_err();
        assert!(matches!(e, SnapshotError::Check { .. }), "{e}");
        assert!(!other.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn restore_checks_the_file_and_refuses_live_or_full_targets() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("live.redb");
        let live = open_shared_writer(&src).unwrap();
        put(&live, 7);
        let out = dir.path().join("backup.redb");
        write_snapshot(&src, &out, copy_t, |_| Ok::<_, String>(())).unwrap();

        // Into the live database: refused without and with --force.
        let count = |db: &Database| Ok::<_, String>(rows(db).len());
        assert!(matches!(
            restore_snapshot(&out, &src, false, count),
            Err(SnapshotError::Exists(_))
        ));
        assert!(matches!(
            restore_snapshot(&out, &src, true, count),
            Err(SnapshotError::InUse(_))
        ));
        drop(live);
        assert_eq!(restore_snapshot(&out, &src, true, count).unwrap(), 1);
        let fresh = dir.path().join("fresh.redb");
        assert_eq!(restore_snapshot(&out, &fresh, false, count).unwrap(), 1);
        assert_eq!(rows(&ReadOnlyDatabase::open(&fresh).unwrap()), vec![7]);

        // Truncated: refused, the target untouched.
        let bytes = std::fs::read(&out).unwrap();
        let cut = dir.path().join("cut.redb");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let target = dir.path().join("target.redb");
        let e = restore_snapshot(&cut, &target, false, count).unwrap_err();
        assert!(matches!(e, SnapshotError::Database { .. }), "{e}");
        assert!(!target.exists());
    }
}
