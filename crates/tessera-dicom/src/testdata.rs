//! Where the real DICOM test files are: pydicom-data (PyPI), which `./x`
//! installs into the project's `.venv`. Tests that need them call
//! [`pydicom_data_dir`] and fail, never skip, when the files are absent.

use std::path::PathBuf;

/// `TESSERA_DICOM_DATA` if set, else pydicom-data's `data` folder in the
/// workspace's `.venv`; an error saying how to install it otherwise.
pub fn pydicom_data_dir() -> Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("TESSERA_DICOM_DATA") {
        return Ok(PathBuf::from(d));
    }
    let venv_lib = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/lib"));
    if let Ok(entries) = std::fs::read_dir(&venv_lib) {
        for e in entries.flatten() {
            let d = e.path().join("site-packages/data_store/data");
            if d.is_dir() {
                return Ok(d);
            }
        }
    }
    Err(format!(
        "pydicom-data not found: set TESSERA_DICOM_DATA or run `./x unit` once (it installs e2e/requirements.txt into .venv; looked in {})",
        venv_lib.display()
    ))
}
