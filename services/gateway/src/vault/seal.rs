//! Sealing vault records: JSON, sealed with `tessera-envelope` under the
//! vault key, bound to the record's kind (the envelope's purpose) and id
//! (its context).

use serde::Serialize;
use serde::de::DeserializeOwned;
use tessera_envelope::{EnvelopeError, Purpose};
use zeroize::Zeroizing;

use crate::error::GatewayError;

type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// The vault key (wiped on drop).
pub(super) struct VaultKey(Zeroizing<[u8; 32]>);

impl VaultKey {
    pub(super) fn new(bytes: &[u8; 32]) -> Result<Self> {
        Ok(Self(Zeroizing::new(*bytes)))
    }
}

/// What a sealed record is bound to: its kind and its id.
pub(super) struct Binding(Purpose, String);

/// A study record, under its study id.
pub(super) fn study_aad(study_id: &str) -> Binding {
    Binding(Purpose::VaultStudy, study_id.to_owned())
}

/// A DICOM instance record, under `<study id>/<instance id>`.
pub(super) fn instance_aad(key: &str) -> Binding {
    Binding(Purpose::VaultInstance, key.to_owned())
}

/// Seals one record (JSON; the plaintext copy is wiped).
pub(super) fn seal_record<T: Serialize>(
    vk: &VaultKey,
    rng: &dyn ring::rand::SecureRandom,
    rec: &T,
    binding: Binding,
) -> Result<Vec<u8>> {
    let json =
        Zeroizing::new(serde_json::to_vec(rec).map_err(|e| GatewayError::Internal(e.to_string()))?);
    tessera_envelope::seal(&vk.0, binding.0, binding.1.as_bytes(), &json, rng)
        .map_err(|e| GatewayError::Internal(format!("seal: {e}")))
}

/// Opens one sealed record bound to `binding`; `key` names it in errors.
pub(super) fn open_sealed<T: DeserializeOwned>(
    vk: &VaultKey,
    key: &str,
    binding: Binding,
    sealed: &[u8],
) -> Result<T> {
    let plain = tessera_envelope::open(&vk.0, binding.0, binding.1.as_bytes(), sealed).map_err(
        |e| match e {
            EnvelopeError::Forged => GatewayError::Vault(format!(
                "record {key} does not open under the vault key (tampered, moved, or wrong key)"
            )),
            EnvelopeError::Truncated
            | EnvelopeError::BadMagic
            | EnvelopeError::UnsupportedVersion(_)
            | EnvelopeError::WrongPurpose { .. }
            | EnvelopeError::Rng => GatewayError::Vault(format!("record {key}: {e}")),
        },
    )?;
    serde_json::from_slice(&plain).map_err(|e| GatewayError::Vault(format!("record {key}: {e}")))
}
