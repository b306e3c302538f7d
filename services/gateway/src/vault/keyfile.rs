//! The vault key file: 32 bytes (raw or hex), owner-only, wiped on drop.

use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Reads a 32-byte key file (raw, or 64 hex characters plus optional
/// newline) and refuses one other users can read. The key and every copy
/// made while reading it are wiped when dropped.
pub fn load_key_file(path: &Path) -> Result<Zeroizing<[u8; 32]>, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{shown}: permissions {mode:04o} are too open; use 0600 or 0400"
            ));
        }
    }
    if meta.len() > 1024 {
        return Err(format!("{shown}: not a key file (too long)"));
    }
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?);
    if bytes.len() == 32 {
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&bytes);
        return Ok(k);
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("{shown}: expected 32 bytes or 64 hex characters"))?
        .trim();
    let decoded = Zeroizing::new(
        hex::decode(text)
            .map_err(|_| format!("{shown}: expected 32 bytes or 64 hex characters"))?,
    );
    <[u8; 32]>::try_from(decoded.as_slice())
        .map(Zeroizing::new)
        .map_err(|_| format!("{shown}: expected 32 bytes or 64 hex characters"))
}

/// Writes a fresh random key file (mode 0600) unless one exists.
pub fn create_key_file(path: &Path) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut k = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(k.as_mut_slice())
        .map_err(|_| std::io::Error::other("no randomness"))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    let text = Zeroizing::new(hex::encode(k.as_slice()));
    std::io::Write::write_all(&mut f, text.as_bytes())?;
    f.sync_all()
}
