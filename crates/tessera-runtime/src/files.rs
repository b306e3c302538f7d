//! Files that hold secrets: databases created owner-only, key files whose
//! permissions are checked before use.

use std::path::{Path, PathBuf};

/// A connection string (which may carry a password, so it is never in the
/// TOML) read now from `<key>_file` (trailing whitespace trimmed) or the
/// environment variable `<key>_env` names; errors name the config key.
/// Used for the PostgreSQL URLs of the gateway's vault and the keyserver's
/// store.
pub fn connection_string(
    key: &str,
    file: Option<&PathBuf>,
    env: Option<&String>,
) -> Result<String, String> {
    let text = match (file, env) {
        (Some(f), _) => {
            std::fs::read_to_string(f).map_err(|e| format!("{key}_file {}: {e}", f.display()))?
        }
        (None, Some(v)) => std::env::var(v).map_err(|_| format!("{key}_env: {v} is not set"))?,
        (None, None) => return Err("no PostgreSQL connection string configured".into()),
    };
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err("the PostgreSQL connection string is empty".into());
    }
    Ok(text)
}

/// Makes sure `path` exists and only its owner can read or write it (mode
/// 0600 on Unix) before a database opens it: an absent file is created
/// empty with mode 0600 (redb initialises an empty file as a new database),
/// an existing one with group or other bits is narrowed to 0600. Every
/// redb file of the suite (storage objects, keyserver, gateway vault) is
/// opened through this, so none is ever world-readable, not even between
/// its creation and a later chmod.
pub fn private_db_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        let file = opts.open(path)?;
        let mode = file.metadata()?.permissions().mode();
        if mode & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700))?;
        }
    }
    #[cfg(not(unix))]
    opts.open(path)?;
    Ok(())
}

/// Refuses a private-key file that its group or others may read or write
/// (Unix mode bits 0o077): `what` names the setting in the message.
pub fn check_key_file_mode(what: &str, path: &Path) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("{what}: {}: {e}", path.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{what}: {} has permissions {mode:04o}, so its group or others can read \
                 the private key; make it 0600 or 0400 (chmod 600 {})",
                path.display(),
                path.display()
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (what, path);
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn db_files_are_created_and_narrowed_to_0600() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh.redb");
        private_db_file(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o600);
        assert_eq!(std::fs::metadata(&fresh).unwrap().len(), 0);

        let old = dir.path().join("old.redb");
        std::fs::write(&old, b"existing bytes").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        private_db_file(&old).unwrap();
        assert_eq!(mode(&old), 0o600);
        assert_eq!(
            std::fs::read(&old).unwrap(),
            b"existing bytes",
            "not truncated"
        );
    }

    #[test]
    fn key_files_readable_by_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("svc.key");
        std::fs::write(&key, b"k").unwrap();
        for bad in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = check_key_file_mode("server.tls.key", &key).unwrap_err();
            assert!(e.contains("server.tls.key") && e.contains("0600"), "{e}");
        }
        for good in [0o600, 0o400] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(good)).unwrap();
            check_key_file_mode("server.tls.key", &key).unwrap();
        }
    }
}
