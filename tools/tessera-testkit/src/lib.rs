//! Fixtures shared by Tessera's test crates (dev-dependencies only).
//!
//! * [`Pki`]: a development PKI (every service and user identity of
//!   `tessera pki init`) in its own temporary folder, with mutual-TLS
//!   client settings and channels as any of those identities;
//! * [`pydicom_data_dir`]: the real DICOM files (pydicom-data) a test needs,
//!   or an error saying how to install them: tests fail, never skip;
//! * [`postgres::Postgres`]: a real PostgreSQL server on a private unix
//!   socket and data folder (the gateway vault's PostgreSQL backend);
//! * [`suite`] (feature `suite`): the whole suite running in-process, clients
//!   of its services as any identity, the owner/clinician grant flow, and
//!   the objects its storage nodes hold.

use std::path::Path;

use tessera_pki::DevPki;
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsFiles};

#[cfg(feature = "suite")]
pub mod suite;

pub mod postgres;

/// Where pydicom-data is: `TESSERA_DICOM_DATA`, else the project's `.venv`.
/// One function for every test crate (tessera-dicom keeps it so that its own
/// tests need no kit).
pub use tessera_dicom::testdata::pydicom_data_dir;

/// The development owner's SPIFFE ID (`tessera pki init`, `dev up`).
pub const OWNER: &str = "spiffe://tessera.local/user/owner";

/// [`pydicom_data_dir`], panicking with how to install the files: the call
/// for a test whose subject needs them.
pub fn pydicom_data() -> std::path::PathBuf {
    pydicom_data_dir().unwrap_or_else(|e| panic!("{e}"))
}

/// Mutual-TLS client settings for PKI name `who` from the PKI in `dir`.
pub fn client_tls(dir: &Path, who: &str) -> ClientTls {
    ClientTls::from_files(&TlsFiles::from_pki_dir(dir, who))
        .unwrap_or_else(|e| panic!("TLS files of {who} in {}: {e}", dir.display()))
}

/// A mutual-TLS channel to `addr` as `who`, from the PKI in `dir`.
pub async fn channel_to(dir: &Path, who: &str, addr: &str) -> Channel {
    client_tls(dir, who)
        .connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connecting to {addr} as {who}: {e}"))
}

/// A development PKI in a temporary folder (removed on drop), which also
/// holds whatever else a test writes under [`Pki::path`].
pub struct Pki {
    tmp: tempfile::TempDir,
    pub pki: DevPki,
}

impl Pki {
    /// A fresh PKI under `<tmp>/pki`.
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("a temporary folder");
        let pki = tessera_pki::generate(&tmp.path().join("pki")).expect("a development PKI");
        Self { tmp, pki }
    }

    /// The temporary folder (the PKI is its `pki` subfolder).
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Client settings as `who`.
    pub fn tls(&self, who: &str) -> ClientTls {
        client_tls(&self.pki.dir, who)
    }

    /// A channel to `addr` as `who`.
    pub async fn channel(&self, who: &str, addr: &str) -> Channel {
        channel_to(&self.pki.dir, who, addr).await
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
