//! DICOM through the gateway (issue 6, papers 001/002): StoreDicom,
//! RetrieveDicom, and the sink the C-STORE SCP hands received instances to.
//!
//! A study is (owner, Patient ID, Study Instance UID): its instances share
//! one handle, one keyserver registration and one grant. Each instance is
//! split by `tessera-dicom` into
//! * the identifying elements and the container (everything else of the
//!   file's structure): each sealed in an envelope (fresh AES-256-GCM data
//!   key, wrapped under the study's metadata key, keyserver purpose
//!   `dicom-metadata`), framed into one metadata object `<handle>.<id>.m`
//!   placed on a node that holds neither pixel share when one is healthy;
//! * native pixels: protected by the watermark service into two shares
//!   `<handle>.<id>.s1/.s2` on two distinct nodes (tamper localization);
//! * compressed or unusual native pixels: the stored bytes sealed under the
//!   study's `dicom-pixels` key as `<handle>.<id>.p` (tampering detected,
//!   not localized).
//!
//! Retrieve rebuilds the file (SHA-256 checked against the original) for
//! roles allowed to re-identify, or writes the Basic Profile de-identified
//! copy for the others (UIDs mapped with a per-study key derived from the
//! metadata key, so every instance of a study maps consistently).
//!
//! `store.rs` holds StoreDicom and the SCP's entry ([`GatewayService::store_dicom_file`]);
//! `retrieve.rs` holds FindDicomStudy, Verify of a DICOM study and
//! RetrieveDicom; this file their shared constants and helpers.

pub(crate) mod get_move;
pub(crate) mod query;
mod read_ahead;
mod retrieve;
mod store;

use ring::hmac;
use tessera_dicom::{Limits as DicomLimits, Profile, Subject, Temporal, UidMap};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;

use crate::config::TemporalOption;
use crate::convert::attributes_to_proto;
use crate::durability::placement_to_proto;
use crate::envelope;
use crate::error::GatewayError;
use crate::shared::keys::Key;
use crate::shared::{GatewayService, Result};
use crate::vault::{InstanceRecord, StudyRecord};

/// Keyserver purpose of the key that wraps the metadata envelopes.
pub const PURPOSE_METADATA: &str = "dicom-metadata";

/// Keyserver purpose of the key that seals stored (compressed) pixels.
pub const PURPOSE_SEALED_PIXELS: &str = "dicom-pixels";

/// The spec recorded where no watermarked image exists (a DICOM study's own
/// record, sealed pixels).
pub(super) const NO_IMAGE: tessera_image::ImageSpec = tessera_image::ImageSpec {
    width: 0,
    height: 0,
    frames: 0,
    format: tessera_image::PixelFormat {
        bits_allocated: 8,
        bits_stored: 8,
        signed: false,
        channels: 1,
    },
};

/// `original_format` of DICOM studies in the vault.
pub const FORMAT_DICOM: i32 = 4;

/// The patient attributes a DICOM study is registered with.
pub(super) fn dicom_attributes(s: &Subject) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, v) in [
        ("patient_id", &s.patient_id),
        ("patient_name", &s.patient_name),
        ("birth_date", &s.patient_birth_date),
        ("study_instance_uid", &s.study_instance_uid),
    ] {
        if !v.is_empty() {
            out.push((name.to_owned(), v.clone()));
        }
    }
    out
}

pub(super) fn data_loss(what: String) -> GatewayError {
    GatewayError::DataLoss(what)
}

pub(super) fn dicom_limits(max_bytes: u64) -> DicomLimits {
    DicomLimits {
        max_file_bytes: max_bytes,
        max_samples: (max_bytes / 2).min(tessera_image::MAX_SAMPLES),
    }
}

/// The de-identification profile of a study (researcher files).
pub(super) fn profile_for(kmeta: &Key, temporal: TemporalOption) -> Profile {
    let k = hmac::Key::new(hmac::HMAC_SHA256, kmeta.as_slice());
    let uid_secret = hmac::sign(&k, b"tessera/dicom/uid-map/v1");
    let temporal = match temporal {
        TemporalOption::Remove => Temporal::Remove,
        TemporalOption::RetainFull => Temporal::RetainFull,
        TemporalOption::RetainModified => {
            let t = hmac::sign(&k, b"tessera/dicom/date-shift/v1");
            let b = t.as_ref();
            let n = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) % 3650;
            Temporal::RetainModified {
                shift_days: -(n as i32 + 1),
            }
        }
    };
    Profile {
        temporal,
        uids: UidMap::new(uid_secret.as_ref()),
    }
}

pub(super) fn pixel_handling(watermarked: bool) -> pb::PixelHandling {
    if watermarked {
        pb::PixelHandling::Watermarked
    } else {
        pb::PixelHandling::Sealed
    }
}

pub(super) fn stored_response(
    rec: &InstanceRecord,
    new_study: bool,
    duplicate: bool,
) -> pb::StoreDicomResponse {
    pb::StoreDicomResponse {
        study_handle: rec.study_id.clone(),
        instance_id: rec.instance_id.clone(),
        new_study,
        duplicate,
        pixels: pixel_handling(rec.watermarked).into(),
        transfer_syntax: rec.transfer_syntax.clone(),
        size: rec.size,
        sha256: hex::decode(&rec.sha256).unwrap_or_default(),
        placements: rec.placements.iter().map(placement_to_proto).collect(),
    }
}

/// One instance ready to be sent.
pub(super) struct Loaded {
    pub(super) header: pb::DicomInstanceHeader,
    pub(super) bytes: Vec<u8>,
}

/// Runs CPU work (sealing, opening, parsing) off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| GatewayError::Internal(format!("blocking task: {e}")))
}

/// Takes an instance's metadata object (share 0) out of its fetched
/// objects (in placement order); the pixel objects remain.
pub(super) fn take_metadata(
    inst: &InstanceRecord,
    objects: &mut Vec<Vec<u8>>,
) -> Option<(String, Vec<u8>)> {
    let pos = inst.placements.iter().position(|p| p.share == 0)?;
    (pos < objects.len()).then(|| (inst.placements[pos].object_id.clone(), objects.remove(pos)))
}

/// Opens both envelopes of a metadata object: (identifying, container).
pub(super) fn open_metadata(
    kmeta: &Key,
    meta_id: &str,
    meta: &[u8],
) -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    let parts = envelope::unframe(meta, 2).map_err(|e| format!("metadata object: {e}"))?;
    let open = |part: &str, b: &[u8]| {
        envelope::open(
            kmeta,
            envelope::Purpose::DicomMetadata,
            &format!("{meta_id}|{part}"),
            b,
        )
        .map_err(|e| format!("metadata object, {part}: {e}"))
    };
    Ok((open("identifying", parts[0])?, open("container", parts[1])?))
}

/// Opens an instance's sealed pixel object.
pub(super) async fn open_sealed_pixels(
    inst: &InstanceRecord,
    kpx: Option<&Key>,
    sealed: Vec<u8>,
) -> Result<std::result::Result<Vec<u8>, envelope::EnvelopeError>> {
    let kpx = kpx
        .ok_or_else(|| GatewayError::Internal("no pixel key".into()))?
        .clone();
    let ctx = format!("{}|pixels", inst.placements[0].object_id);
    blocking(move || envelope::open(&kpx, envelope::Purpose::DicomPixels, &ctx, &sealed)).await
}

impl GatewayService {
    /// A study key for sealing at store time: cached for [`KEY_TTL`] so a
    /// series does not pay an audited keyserver round trip per instance.
    pub(crate) async fn protect_key(
        &self,
        rec: &StudyRecord,
        purpose: &'static str,
    ) -> Result<Key> {
        if let Some(k) = self.inner.keys.cached_key(&rec.study_id, purpose) {
            return Ok(k);
        }
        let k = self.derive(rec, purpose, kpb::Operation::Protect).await?;
        self.inner.keys.cache_key(&rec.study_id, purpose, k.clone());
        Ok(k)
    }

    /// Asks the keyserver for a study key of `purpose` (audited there).
    pub(crate) async fn derive(
        &self,
        rec: &StudyRecord,
        purpose: &str,
        operation: kpb::Operation,
    ) -> Result<Key> {
        let mut ks = self.inner.up.keyserver.clone();
        let r = ks
            .derive_key(kpb::DeriveKeyRequest {
                study_id: rec.study_id.clone(),
                attributes: attributes_to_proto(&rec.attributes),
                purpose: purpose.into(),
                operation: operation.into(),
            })
            .await
            .map_err(|s| GatewayError::upstream("keyserver", s))?
            .into_inner();
        let raw = zeroize::Zeroizing::new(r.key);
        <[u8; 32]>::try_from(raw.as_slice())
            .map(zeroize::Zeroizing::new)
            .map_err(|_| GatewayError::Internal("keyserver: a derived key is not 32 bytes".into()))
    }
}
