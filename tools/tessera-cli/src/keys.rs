//! Offline key material for `tessera image`: a 256-bit key file (64 hex
//! digits, or 32 raw bytes) or a passphrase file stretched with
//! PBKDF2-HMAC-SHA256. Secrets come from files, never from the command line.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use tessera_cryptomark::{StudyKey, hex, unhex};

/// PBKDF2 iterations (OWASP 2023 guidance for PBKDF2-HMAC-SHA256).
const PBKDF2_ITERATIONS: u32 = 600_000;

#[derive(Args, Debug, Clone)]
pub struct KeyArgs {
    /// File holding the 256-bit study key (64 hex digits or 32 bytes).
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// File holding a passphrase; the key is PBKDF2-HMAC-SHA256 of it,
    /// salted with the object id.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

fn check_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by group or others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
    Ok(())
}

impl KeyArgs {
    /// The study key for `object_id`.
    pub fn load(&self, object_id: &str) -> Result<StudyKey> {
        match (&self.key_file, &self.passphrase_file) {
            (Some(path), None) => {
                check_permissions(path)?;
                let bytes =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                parse_key(&bytes).with_context(|| format!("key file {}", path.display()))
            }
            (None, Some(path)) => {
                check_permissions(path)?;
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let pass = text.trim_end_matches(['\n', '\r']);
                if pass.len() < 12 {
                    bail!(
                        "passphrase in {} is shorter than 12 characters",
                        path.display()
                    );
                }
                Ok(from_passphrase(pass, object_id))
            }
            _ => {
                bail!("give --key-file FILE or --passphrase-file FILE (see `tessera image keygen`)")
            }
        }
    }
}

pub fn parse_key(bytes: &[u8]) -> Result<StudyKey> {
    if bytes.len() == 32 {
        return Ok(StudyKey::from_bytes(bytes.try_into().expect("32 bytes")));
    }
    let text = std::str::from_utf8(bytes).context("neither 32 raw bytes nor hex text")?;
    let raw = unhex(text.trim()).context("not hex")?;
    let arr: [u8; 32] = raw
        .try_into()
        .map_err(|v: Vec<u8>| anyhow::anyhow!("key is {} bytes, need 32", v.len()))?;
    Ok(StudyKey::from_bytes(arr))
}

pub fn from_passphrase(pass: &str, object_id: &str) -> StudyKey {
    let mut out = [0u8; 32];
    let salt = format!("tessera-offline-key/{object_id}");
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(PBKDF2_ITERATIONS).expect("non-zero"),
        salt.as_bytes(),
        pass.as_bytes(),
        &mut out,
    );
    StudyKey::from_bytes(out)
}

/// A fresh random key, as hex.
pub fn generate_hex() -> Result<String> {
    let mut k = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
        .map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    Ok(hex(&k))
}

/// Writes a secret file readable only by its owner, refusing to overwrite.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_and_raw_keys_and_rejects_others() {
        let hexkey = "ab".repeat(32);
        assert_eq!(
            parse_key(hexkey.as_bytes()).unwrap().as_bytes(),
            &[0xab; 32]
        );
        assert_eq!(parse_key(&[7u8; 32]).unwrap().as_bytes(), &[7; 32]);
        assert!(parse_key(b"abcd").is_err());
        assert!(parse_key("zz".repeat(32).as_bytes()).is_err());
    }

    #[test]
    fn passphrase_keys_depend_on_object_and_passphrase() {
        let a = from_passphrase("correct horse battery", "a");
        assert_eq!(a, from_passphrase("correct horse battery", "a"));
        assert_ne!(a, from_passphrase("correct horse battery", "b"));
        assert_ne!(a, from_passphrase("correct horse batterz", "a"));
    }
}
