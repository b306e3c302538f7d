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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ring::hmac;
use sha2::{Digest, Sha256};
use tessera_dicom::{Limits as DicomLimits, Pixels, Profile, Split, Subject, Temporal, UidMap};
use tessera_image::Image;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
use tessera_tls::Role;
use tonic::Streaming;

use crate::config::TemporalOption;
use crate::convert::{self, attributes_to_proto, check_handle, check_owner, check_request_id};
use crate::durability::placement_to_proto;
use crate::envelope;
use crate::error::GatewayError;
use crate::placement;
use crate::service::{
    BoxStream, GatewayService, Part, Result, first_header, read_exact, study_ref, with_vault,
};
use crate::vault::{InstanceRecord, SharePlacement, SpecRecord, StudyRecord, StudyState};

/// Keyserver purpose of the key that wraps the metadata envelopes.
pub const PURPOSE_METADATA: &str = "dicom-metadata";
/// Keyserver purpose of the key that seals stored (compressed) pixels.
pub const PURPOSE_SEALED_PIXELS: &str = "dicom-pixels";

/// The spec recorded where no watermarked image exists (a DICOM study's own
/// record, sealed pixels).
const NO_IMAGE: tessera_image::ImageSpec = tessera_image::ImageSpec {
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

/// Shared DICOM state: one lock per study key so concurrent first
/// instances of a study open it once.
#[derive(Default)]
pub struct DicomState {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Store-side study keys, (study id, purpose) -> key and when it was
    /// derived: a series of instances costs one audited derivation per
    /// study and [`KEY_TTL`], not one per instance. Never used to open.
    protect_keys: Mutex<KeyCache>,
}

/// (study id, purpose) -> (key, derived at).
type KeyCache = HashMap<(String, &'static str), (Key, std::time::Instant)>;

/// How long a store-side study key is reused.
pub const KEY_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Most store-side keys held at once.
const MAX_CACHED_KEYS: usize = 1024;

impl DicomState {
    fn cached_key(&self, study: &str, purpose: &'static str) -> Option<Key> {
        let mut m = self.protect_keys.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (k, at)| {
            let keep = at.elapsed() < KEY_TTL;
            if !keep {
                k.fill(0);
            }
            keep
        });
        m.get(&(study.to_owned(), purpose)).map(|(k, _)| k.clone())
    }

    fn cache_key(&self, study: &str, purpose: &'static str, key: Key) {
        let mut m = self.protect_keys.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < MAX_CACHED_KEYS {
            m.insert(
                (study.to_owned(), purpose),
                (key, std::time::Instant::now()),
            );
        }
    }

    /// Drops a study's cached keys (delete, rollback).
    pub(crate) fn forget_keys(&self, study: &str) {
        let mut m = self.protect_keys.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|(s, _), (k, _)| {
            if s == study {
                k.fill(0);
                false
            } else {
                true
            }
        });
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, l| Arc::strong_count(l) > 1);
        m.entry(key.to_owned()).or_default().clone()
    }
}

/// A study key from the keyserver: wiped when the last copy is dropped.
type Key = zeroize::Zeroizing<[u8; 32]>;

/// The patient attributes a DICOM study is registered with.
fn dicom_attributes(s: &Subject) -> Vec<(String, String)> {
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

fn data_loss(what: String) -> GatewayError {
    GatewayError::DataLoss(what)
}

fn dicom_limits(max_bytes: u64) -> DicomLimits {
    DicomLimits {
        max_file_bytes: max_bytes,
        max_samples: (max_bytes / 2).min(tessera_image::MAX_SAMPLES),
    }
}

/// The de-identification profile of a study (researcher files).
fn profile_for(kmeta: &Key, temporal: TemporalOption) -> Profile {
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

fn pixel_handling(watermarked: bool) -> pb::PixelHandling {
    if watermarked {
        pb::PixelHandling::Watermarked
    } else {
        pb::PixelHandling::Sealed
    }
}

fn stored_response(
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
struct Loaded {
    header: pb::DicomInstanceHeader,
    bytes: Vec<u8>,
}

impl GatewayService {
    /// A study key for sealing at store time: cached for [`KEY_TTL`] so a
    /// series does not pay an audited keyserver round trip per instance.
    async fn protect_key(&self, rec: &StudyRecord, purpose: &'static str) -> Result<Key> {
        if let Some(k) = self.inner.dicom.cached_key(&rec.study_id, purpose) {
            return Ok(k);
        }
        let k = self.derive(rec, purpose, kpb::Operation::Protect).await?;
        self.inner
            .dicom
            .cache_key(&rec.study_id, purpose, k.clone());
        Ok(k)
    }

    /// Asks the keyserver for a study key of `purpose` (audited there).
    async fn derive(
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

    // ---- store ------------------------------------------------------------

    pub(crate) async fn store_dicom_inner(
        &self,
        caller: String,
        roles: std::collections::BTreeSet<tessera_tls::Role>,
        stream: Streaming<pb::StoreDicomRequest>,
    ) -> Result<pb::StoreDicomResponse> {
        let mut stream = tessera_runtime::IdleStream::new(stream, self.inner.limits.stream_idle);
        let mut header = first_header(&mut stream, |m: pb::StoreDicomRequest| match m.part {
            Some(pb::store_dicom_request::Part::Header(h)) => Some(h),
            Some(pb::store_dicom_request::Part::Chunk(_)) | None => None,
        })
        .await?;
        if header.owner.is_empty() {
            header.owner.clone_from(&caller);
        }
        check_owner("header.owner", &header.owner)?;
        self.require_store_for("StoreDicom", &caller, &roles, &header.owner)
            .await?;
        let max = self.inner.limits.max_image_bytes;
        if header.size == 0 || header.size > max {
            return Err(GatewayError::TooLarge(format!(
                "header.size: {} bytes; a DICOM file must be 1..={max} bytes",
                header.size
            )));
        }
        let _permit = self.job_permit(header.size).await?;
        let file = read_exact(
            &mut stream,
            header.size,
            |m: pb::StoreDicomRequest| match m.part {
                Some(pb::store_dicom_request::Part::Chunk(c)) => Part::Chunk(c),
                Some(pb::store_dicom_request::Part::Header(_)) => Part::Header,
                None => Part::Empty,
            },
        )
        .await?;
        self.store_dicom_file(caller, header.owner, file).await
    }

    /// Stores one Part 10 file for `owner` (gRPC and C-STORE both end
    /// here). The caller holds a job permit for the file.
    pub async fn store_dicom_file(
        &self,
        stored_by: String,
        owner: String,
        file: Vec<u8>,
    ) -> Result<pb::StoreDicomResponse> {
        let limits = dicom_limits(self.inner.limits.max_image_bytes);
        let size = file.len() as u64;
        // The container records the original's SHA-256: no second pass.
        let (split, file) = tokio::task::spawn_blocking(move || {
            tessera_dicom::split_for_store(&file, &limits).map(|s| (s, file))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("split task: {e}")))?
        .map_err(|e| {
            if matches!(e, tessera_dicom::DicomError::TooLarge { .. }) {
                GatewayError::TooLarge(format!("file: {e}"))
            } else {
                GatewayError::InvalidArgument(format!("file: {e}"))
            }
        })?;
        let sha = split.container.original_sha256();
        if split.subject.sop_instance_uid.is_empty() {
            return Err(GatewayError::InvalidArgument(
                "file: no SOP Instance UID (0008,0018)".into(),
            ));
        }
        let (study, new_study) = self.dicom_study(&owner, &stored_by, &split.subject).await?;
        let sop = split.subject.sop_instance_uid.clone();
        let (sid, s) = (study.study_id.clone(), sop.clone());
        if let Some(existing) =
            with_vault(&self.inner.vault, move |v| v.instance_by_sop(&sid, &s)).await?
        {
            if existing.state != StudyState::Committed {
                return Err(GatewayError::AlreadyExists(format!(
                    "study {} is storing this SOP Instance UID",
                    study.study_id
                )));
            }
            // Other bytes may still be the same instance (an SCP writes its
            // own file meta group): compare the data sets.
            if existing.sha256 != hex::encode(sha) {
                let old = self.stored_instance(&study, &existing).await?;
                if let Err(d) = tessera_dicom::same_instance(&old, &file) {
                    let named: Vec<String> = d.iter().take(8).map(|d| d.to_string()).collect();
                    return Err(GatewayError::AlreadyExists(format!(
                        "study {} already holds this SOP Instance UID with another data set ({} element(s) differ, first = stored, second = this file: {}; file meta and padding ignored)",
                        study.study_id,
                        d.len(),
                        named.join("; ")
                    )));
                }
            }
            return Ok(stored_response(&existing, false, true));
        }
        let r = self
            .store_instance(&study, stored_by, split, size, sha)
            .await
            .map(|rec| stored_response(&rec, new_study, false));
        if let Err(e) = &r {
            tracing::warn!(study = %study.study_id, error = %e, "DICOM store failed");
        }
        r
    }

    /// Finds the study of (owner, Patient ID, Study Instance UID) or opens
    /// it (registered at the keyserver, committed in the vault).
    async fn dicom_study(
        &self,
        owner: &str,
        stored_by: &str,
        subject: &Subject,
    ) -> Result<(StudyRecord, bool)> {
        if subject.study_instance_uid.is_empty() {
            return Err(GatewayError::InvalidArgument(
                "file: no Study Instance UID (0020,000D)".into(),
            ));
        }
        let key = format!(
            "{owner}\0{}\0{}",
            subject.patient_id, subject.study_instance_uid
        );
        let lock = self.inner.dicom.lock_for(&key);
        let _guard = lock.lock().await;
        let (o, p, u) = (
            owner.to_owned(),
            subject.patient_id.clone(),
            subject.study_instance_uid.clone(),
        );
        if let Some(rec) =
            with_vault(&self.inner.vault, move |v| v.find_dicom_study(&o, &p, &u)).await?
        {
            return Ok((rec, false));
        }
        let mut rec = StudyRecord {
            study_id: self.new_study_id()?,
            state: StudyState::Pending,
            owner: owner.to_owned(),
            stored_by: stored_by.to_owned(),
            attributes: dicom_attributes(subject),
            original_format: FORMAT_DICOM,
            spec: SpecRecord::from_spec(&NO_IMAGE),
            header_json: String::new(),
            placements: Vec::new(),
            created_unix: crate::service::now_unix(),
            dicom_study_uid: subject.study_instance_uid.clone(),
        };
        let r = rec.clone();
        with_vault(&self.inner.vault, move |v| v.insert_new(&r)).await?;
        let mut ks = self.inner.up.keyserver.clone();
        if let Err(s) = ks
            .register_study(kpb::RegisterStudyRequest {
                owner: rec.owner.clone(),
                attributes: attributes_to_proto(&rec.attributes),
                study_id: rec.study_id.clone(),
            })
            .await
        {
            self.rollback(&rec).await;
            return Err(GatewayError::upstream("keyserver", s));
        }
        rec.state = StudyState::Committed;
        let (r, pid) = (rec.clone(), subject.patient_id.clone());
        if let Err(e) = with_vault(&self.inner.vault, move |v| v.put_dicom_study(&r, &pid)).await {
            self.rollback(&rec).await;
            return Err(e);
        }
        tracing::info!(study = %rec.study_id, "DICOM study opened");
        Ok((rec, true))
    }

    async fn store_instance(
        &self,
        study: &StudyRecord,
        stored_by: String,
        split: Split,
        size: u64,
        sha: [u8; 32],
    ) -> Result<InstanceRecord> {
        let kmeta = self.protect_key(study, PURPOSE_METADATA).await?;
        let instance_id = self.new_id("in")?;
        let base = format!("{}.{}", study.study_id, instance_id);
        let watermarked = matches!(split.pixels, Pixels::Native(_));
        let (spec, pixel_bytes) = match &split.pixels {
            Pixels::Native(image) => (*image.spec(), image.spec().byte_len() as u64),
            Pixels::Encapsulated(b) | Pixels::Opaque { bytes: b, .. } => (NO_IMAGE, b.len() as u64),
        };

        // Nodes: pixel shares on two distinct nodes, the metadata object on
        // a third when one is healthy.
        let (healthy, problems) = self.inner.up.probe().await;
        let names: Vec<String> = self.inner.up.nodes.iter().map(|n| n.name.clone()).collect();
        let bound = pixel_bytes + pixel_bytes / 8 + size / 4 + 128 * 1024;
        let pixel_objects = if watermarked { 2 } else { 1 };
        let chosen = placement::place(
            self.inner.placement.as_ref(),
            &base,
            &healthy,
            &problems,
            &names,
            pixel_objects + 1,
            bound,
        )
        .or_else(|_| {
            placement::place(
                self.inner.placement.as_ref(),
                &base,
                &healthy,
                &problems,
                &names,
                2,
                bound,
            )
        })?;
        let at = |i: usize| {
            let h = &healthy[chosen[i.min(chosen.len() - 1)]];
            (names[h.index].clone(), h.instance_id.clone())
        };
        let mut placements = Vec::with_capacity(3);
        for share in 1..=pixel_objects {
            let (node, instance) = at(share - 1);
            placements.push(SharePlacement {
                share: share as u32,
                node,
                instance_id: instance,
                object_id: if watermarked {
                    format!("{base}.s{share}")
                } else {
                    format!("{base}.p")
                },
                size: 0,
                sha256: String::new(),
                erasure: None,
            });
        }
        // With only two nodes the metadata object shares a node with the
        // first pixel object (still a separate object under another key).
        let meta_at = if chosen.len() > pixel_objects {
            pixel_objects
        } else {
            0
        };
        let (node, instance) = at(meta_at);
        placements.push(SharePlacement {
            share: 0,
            node,
            instance_id: instance,
            object_id: format!("{base}.m"),
            size: 0,
            sha256: String::new(),
            erasure: None,
        });
        self.spread_fragments(&mut placements, &healthy, &problems, bound)?;

        let mut rec = InstanceRecord {
            study_id: study.study_id.clone(),
            instance_id,
            state: StudyState::Pending,
            seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            sop_instance_uid: split.subject.sop_instance_uid.clone(),
            size,
            sha256: hex::encode(sha),
            transfer_syntax: split.container.transfer_syntax().to_owned(),
            watermarked,
            spec: SpecRecord::from_spec(&spec),
            header_json: String::new(),
            placements,
            stored_by,
            created_unix: crate::service::now_unix(),
            burned_in_annotation: split.subject.burned_in_annotation,
        };
        let r = rec.clone();
        with_vault(&self.inner.vault, move |v| v.insert_instance(&r)).await?;
        match self
            .store_instance_steps(study, &mut rec, split, kmeta, &base)
            .await
        {
            Ok(()) => {
                rec.state = StudyState::Committed;
                let r = rec.clone();
                if let Err(e) = with_vault(&self.inner.vault, move |v| v.put_instance(&r)).await {
                    self.rollback_instance(&rec).await;
                    return Err(e);
                }
                // A Delete of the study may have started meanwhile (it lists
                // the instances once): the instance must not outlive it.
                let sid = rec.study_id.clone();
                let alive = with_vault(&self.inner.vault, move |v| {
                    Ok(v.get(&sid)?
                        .is_some_and(|s| s.state == StudyState::Committed))
                })
                .await?;
                if !alive {
                    self.rollback_instance(&rec).await;
                    return Err(GatewayError::NotFound(format!(
                        "study {} was deleted while the instance was being stored",
                        rec.study_id
                    )));
                }
                tracing::info!(study = %rec.study_id, instance = %rec.instance_id, watermarked, "DICOM instance stored");
                Ok(rec)
            }
            Err(e) => {
                self.rollback_instance(&rec).await;
                Err(e)
            }
        }
    }

    async fn store_instance_steps(
        &self,
        study: &StudyRecord,
        rec: &mut InstanceRecord,
        split: Split,
        kmeta: Key,
        base: &str,
    ) -> Result<()> {
        let Split {
            container,
            identifying,
            pixels,
            ..
        } = split;
        let meta_id = format!("{base}.m");
        let rng = ring::rand::SystemRandom::new();
        let meta = {
            let rng = rng.clone();
            tokio::task::spawn_blocking(move || -> Result<Vec<u8>> {
                let seal = |part: &str, data: &[u8]| {
                    envelope::seal(&kmeta, &format!("{meta_id}|{part}"), data, &rng)
                        .map_err(|e| GatewayError::Internal(format!("seal {part}: {e}")))
                };
                let id = seal("identifying", &identifying)?;
                let ct = seal("container", &container.to_bytes())?;
                Ok(envelope::frame(&[&id, &ct]))
            })
            .await
            .map_err(|e| GatewayError::Internal(format!("seal task: {e}")))??
        };
        let mut objects = match pixels {
            Pixels::Native(image) => {
                let (header_json, shares) = self
                    .protect(study_ref(study), base.to_owned(), None, image)
                    .await?;
                rec.header_json = header_json;
                shares
            }
            stored @ (Pixels::Encapsulated(_) | Pixels::Opaque { .. }) => {
                let kpx = self.protect_key(study, PURPOSE_SEALED_PIXELS).await?;
                let ctx = format!("{base}.p|pixels");
                let sealed = tokio::task::spawn_blocking(move || {
                    let bytes = stored.stored_bytes().unwrap_or_default();
                    envelope::seal(&kpx, &ctx, bytes, &rng)
                        .map_err(|e| GatewayError::Internal(format!("seal pixels: {e}")))
                })
                .await
                .map_err(|e| GatewayError::Internal(format!("seal task: {e}")))??;
                vec![sealed]
            }
        };
        objects.push(meta);
        self.put_objects(&mut rec.placements, objects).await
    }

    /// Removes a failed instance's objects and record (kept for the next
    /// start's sweep when a node cannot be reached).
    pub(crate) async fn rollback_instance(&self, rec: &InstanceRecord) -> bool {
        let mut clean = self
            .delete_objects_logged(&rec.study_id, &rec.placements)
            .await;
        if clean {
            let r = rec.clone();
            if let Err(e) = with_vault(&self.inner.vault, move |v| v.remove_instance(&r)).await {
                tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot remove instance record");
                clean = false;
            }
        }
        clean
    }

    /// Deletes every instance of a DICOM study (objects, then records).
    /// Returns the removed placements, or the first failure.
    pub(crate) async fn delete_instances(&self, study: &StudyRecord) -> Result<Vec<pb::Placement>> {
        let id = study.study_id.clone();
        let instances = with_vault(&self.inner.vault, move |v| v.instances(&id)).await?;
        let mut removed = Vec::new();
        for inst in instances {
            for p in &inst.placements {
                self.delete_placement(p).await?;
                removed.push(placement_to_proto(p));
            }
            with_vault(&self.inner.vault, move |v| v.remove_instance(&inst)).await?;
        }
        Ok(removed)
    }

    /// Finishes instances a crash left pending (called once at start).
    pub(crate) async fn sweep_instances(&self) {
        match with_vault(&self.inner.vault, |v| v.unfinished_instances()).await {
            Ok(recs) => {
                for rec in recs {
                    tracing::info!(study = %rec.study_id, instance = %rec.instance_id, "removing an interrupted DICOM store");
                    self.rollback_instance(&rec).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "vault sweep of instances failed"),
        }
    }

    pub(crate) async fn find_dicom_study_inner(
        &self,
        caller: String,
        mut r: pb::FindDicomStudyRequest,
    ) -> Result<pb::FindDicomStudyResponse> {
        if r.owner.is_empty() {
            r.owner.clone_from(&caller);
        }
        check_owner("owner", &r.owner)?;
        self.require_acts_for("FindDicomStudy", &caller, &r.owner)
            .await?;
        if r.study_instance_uid.is_empty() || r.study_instance_uid.len() > 64 {
            return Err(GatewayError::InvalidArgument(
                "study_instance_uid: 1..=64 characters".into(),
            ));
        }
        if r.patient_id.len() > 256 {
            return Err(GatewayError::InvalidArgument(
                "patient_id: at most 256 bytes".into(),
            ));
        }
        let found = with_vault(&self.inner.vault, move |v| {
            let Some(rec) = v.find_dicom_study(&r.owner, &r.patient_id, &r.study_instance_uid)?
            else {
                return Ok(None);
            };
            let n = v
                .instances(&rec.study_id)?
                .iter()
                .filter(|i| i.state == StudyState::Committed)
                .count();
            Ok(Some((rec.study_id, n)))
        })
        .await?;
        match found {
            Some((study_handle, n)) => Ok(pb::FindDicomStudyResponse {
                study_handle,
                instances: u32::try_from(n).unwrap_or(u32::MAX),
            }),
            None => Err(GatewayError::NotFound(
                "no DICOM study for this owner, patient and study UID".into(),
            )),
        }
    }

    // ---- verify -----------------------------------------------------------

    /// The committed instances of a DICOM study, in store order.
    pub(crate) async fn committed_instances(
        &self,
        rec: &StudyRecord,
    ) -> Result<Vec<InstanceRecord>> {
        let id = rec.study_id.clone();
        Ok(with_vault(&self.inner.vault, move |v| v.instances(&id))
            .await?
            .into_iter()
            .filter(|i| i.state == StudyState::Committed)
            .collect())
    }

    /// The keys that open a study's objects (derived afresh, audited): the
    /// metadata key, and the sealed-pixel key when an instance needs it.
    async fn restore_keys(
        &self,
        rec: &StudyRecord,
        instances: &[InstanceRecord],
    ) -> Result<(Key, Option<Key>)> {
        let kmeta = self
            .derive(rec, PURPOSE_METADATA, kpb::Operation::Restore)
            .await?;
        let kpx = if instances.iter().any(|i| !i.watermarked) {
            Some(
                self.derive(rec, PURPOSE_SEALED_PIXELS, kpb::Operation::Restore)
                    .await?,
            )
        } else {
            None
        };
        Ok((kmeta, kpx))
    }

    /// Checks every instance without releasing anything: the pixel shares
    /// through the watermark service, the sealed metadata and pixels by
    /// opening them in the gateway.
    pub(crate) async fn verify_dicom(&self, rec: &StudyRecord) -> Result<pb::VerifyStudyResponse> {
        let instances = self.committed_instances(rec).await?;
        let (kmeta, kpx) = self.restore_keys(rec, &instances).await?;
        let mut total = tessera_proto::watermark::v1::VerificationReport {
            intact: true,
            ..Default::default()
        };
        let mut out = Vec::with_capacity(instances.len());
        for (i, inst) in instances.iter().enumerate() {
            let v = self
                .verify_instance(rec, inst, i as u32, &kmeta, kpx.as_ref())
                .await?;
            total.intact &= v.intact;
            if let Some(r) = &v.report {
                total.roi_blocks += r.roi_blocks;
                total.tiles += r.tiles;
                total.tampered_block_count += r.tampered_block_count;
                total.tampered_tile_count += r.tampered_tile_count;
            }
            out.push(v);
        }
        Ok(pb::VerifyStudyResponse {
            report: Some(total),
            instances: out,
            fragment_problems: Vec::new(),
        })
    }

    async fn verify_instance(
        &self,
        study: &StudyRecord,
        inst: &InstanceRecord,
        index: u32,
        kmeta: &Key,
        kpx: Option<&Key>,
    ) -> Result<pb::InstanceVerification> {
        let _permit = self.job_permit(inst.size).await?;
        let mut v = pb::InstanceVerification {
            instance_id: inst.instance_id.clone(),
            index,
            intact: false,
            pixels: pixel_handling(inst.watermarked).into(),
            report: None,
            problem: String::new(),
        };
        let limit = inst.size.saturating_mul(2) + (1 << 20);
        let mut objects = match self
            .fetch_objects(&inst.study_id, &inst.placements, limit)
            .await
        {
            Ok(o) => o,
            // A stopped node is not a verdict on the data.
            Err(e) if e.code() == tonic::Code::Unavailable => return Err(e),
            Err(e) => {
                v.problem = e.to_string();
                return Ok(v);
            }
        };
        let Some((meta_id, meta)) = take_metadata(inst, &mut objects) else {
            v.problem = "no metadata object recorded".into();
            return Ok(v);
        };
        let km = kmeta.clone();
        if let Err(problem) = blocking(move || open_metadata(&km, &meta_id, &meta)).await? {
            v.problem = problem;
            return Ok(v);
        }
        if inst.watermarked {
            let report = self
                .verify_parts(study_ref(study), inst.header_json.clone(), objects)
                .await?;
            v.intact = report.intact;
            v.report = Some(report);
        } else {
            let sealed = objects.into_iter().next().unwrap_or_default();
            match open_sealed_pixels(inst, kpx, sealed).await? {
                Ok(_) => v.intact = true,
                Err(e) => v.problem = format!("pixel object: {e}"),
            }
        }
        Ok(v)
    }

    // ---- retrieve ---------------------------------------------------------

    pub(crate) async fn retrieve_dicom_inner(
        &self,
        caller: String,
        roles: std::collections::BTreeSet<Role>,
        r: pb::RetrieveRequest,
    ) -> Result<BoxStream<pb::RetrieveDicomResponse>> {
        check_handle("study_handle", &r.study_handle)?;
        check_request_id("key_request_id", &r.key_request_id)?;
        let rec = self.committed(&r.study_handle).await?;
        if !rec.is_dicom() {
            return Err(GatewayError::WrongKind(format!(
                "study {} is an image, not DICOM: use Retrieve",
                r.study_handle
            )));
        }
        self.check_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        let instances = self.committed_instances(&rec).await?;
        if instances.is_empty() {
            return Err(GatewayError::NotFound(format!(
                "study {} holds no instance",
                rec.study_id
            )));
        }
        let reidentify = roles
            .iter()
            .any(|r| self.inner.limits.reidentify_roles.contains(r));
        if !reidentify && !self.inner.limits.deidentify_burned_in {
            let burned: Vec<&str> = instances
                .iter()
                .filter(|i| i.burned_in_annotation)
                .map(|i| i.instance_id.as_str())
                .collect();
            if !burned.is_empty() {
                return Err(GatewayError::WrongKind(format!(
                    "study {}: {} instance(s) have Burned In Annotation = YES ({}): their pixels may show identity, so no de-identified copy is released and no grant use was spent (the deployment may opt in with dicom.deidentify_burned_in)",
                    rec.study_id,
                    burned.len(),
                    burned.join(", ")
                )));
            }
        }
        let (kmeta, kpx) = self.restore_keys(&rec, &instances).await?;
        let profile = (!reidentify).then(|| profile_for(&kmeta, self.inner.limits.temporal));
        let count = instances.len() as u32;
        // The first instance is ready before the grant's use is spent.
        let first = self
            .load_instance(
                &rec,
                &instances[0],
                0,
                count,
                &kmeta,
                kpx.as_ref(),
                profile.as_ref(),
                reidentify,
            )
            .await?;
        self.redeem_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        tracing::info!(study = %rec.study_id, caller = %caller, reidentified = reidentify, instances = count, "DICOM study retrieved");
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut next = Some(first);
            for (i, inst) in instances.iter().enumerate() {
                let loaded = match next.take() {
                    Some(l) => Ok(l),
                    None => {
                        this.load_instance(
                            &rec,
                            inst,
                            i as u32,
                            count,
                            &kmeta,
                            kpx.as_ref(),
                            profile.as_ref(),
                            reidentify,
                        )
                        .await
                    }
                };
                let loaded = match loaded {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let head = pb::RetrieveDicomResponse {
                    part: Some(pb::retrieve_dicom_response::Part::Instance(loaded.header)),
                };
                if tx.send(Ok(head)).await.is_err() {
                    return;
                }
                for c in convert::chunks(&loaded.bytes) {
                    let m = pb::RetrieveDicomResponse {
                        part: Some(pb::retrieve_dicom_response::Part::Chunk(c)),
                    };
                    if tx.send(Ok(m)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Fetches, opens and rebuilds one instance (de-identified when
    /// `profile` is given).
    #[allow(clippy::too_many_arguments)]
    async fn load_instance(
        &self,
        study: &StudyRecord,
        inst: &InstanceRecord,
        index: u32,
        count: u32,
        kmeta: &Key,
        kpx: Option<&Key>,
        profile: Option<&Profile>,
        reidentify: bool,
    ) -> Result<Loaded> {
        let _permit = self.job_permit(inst.size).await?;
        self.rebuild_instance(study, inst, index, count, kmeta, kpx, profile, reidentify)
            .await
    }

    /// The stored file of a committed instance, rebuilt byte for byte (for
    /// a store that holds a permit already).
    async fn stored_instance(&self, study: &StudyRecord, inst: &InstanceRecord) -> Result<Vec<u8>> {
        let (kmeta, kpx) = self.restore_keys(study, std::slice::from_ref(inst)).await?;
        let loaded = self
            .rebuild_instance(study, inst, 0, 1, &kmeta, kpx.as_ref(), None, false)
            .await?;
        Ok(loaded.bytes)
    }

    #[allow(clippy::too_many_arguments)]
    async fn rebuild_instance(
        &self,
        study: &StudyRecord,
        inst: &InstanceRecord,
        index: u32,
        count: u32,
        kmeta: &Key,
        kpx: Option<&Key>,
        profile: Option<&Profile>,
        reidentify: bool,
    ) -> Result<Loaded> {
        let name = format!("instance {} of study {}", inst.instance_id, inst.study_id);
        let limit = inst.size.saturating_mul(2) + (1 << 20);
        let mut objects = self
            .fetch_objects(&inst.study_id, &inst.placements, limit)
            .await?;
        let (meta_id, meta) = take_metadata(inst, &mut objects)
            .ok_or_else(|| data_loss(format!("{name}: no metadata object recorded")))?;
        let km = kmeta.clone();
        let (container, identifying) = blocking(move || {
            let (identifying, container) = open_metadata(&km, &meta_id, &meta)?;
            let container = tessera_dicom::Container::from_bytes(&container)
                .map_err(|e| format!("metadata object, container: {e}"))?;
            Ok::<_, String>((container, identifying))
        })
        .await?
        .map_err(|e| data_loss(format!("{name}: {e}")))?;

        let mut report = None;
        let pixels = if inst.watermarked {
            let spec = inst.spec.to_spec();
            let (rep, bytes) = self
                .restore_parts(
                    study_ref(study),
                    inst.header_json.clone(),
                    spec.byte_len(),
                    objects,
                )
                .await?;
            if !rep.intact {
                return Err(data_loss(format!(
                    "{name}: the pixel shares were altered ({} tiles, {} ROI blocks); nothing of it is returned",
                    rep.tampered_tile_count, rep.tampered_block_count
                )));
            }
            report = Some(rep);
            let image = Image::from_le_bytes(spec, &bytes)
                .map_err(|e| data_loss(format!("{name}: restored pixels: {e}")))?;
            Pixels::Native(image)
        } else {
            let sealed = objects
                .into_iter()
                .next()
                .ok_or_else(|| data_loss(format!("{name}: no pixel object recorded")))?;
            let bytes = open_sealed_pixels(inst, kpx, sealed)
                .await?
                .map_err(|e| data_loss(format!("{name}: pixel object: {e}")))?;
            container
                .stored_pixels(bytes)
                .map_err(|e| data_loss(format!("{name}: {e}")))?
        };
        let profile = profile.cloned();
        let max = self.inner.limits.max_image_bytes;
        let burned_in_ok = self.inner.limits.deidentify_burned_in;
        let stored_ts = inst.transfer_syntax.clone();
        let instance_name = name.clone();
        let (bytes, deidentified, transfer_syntax) =
            tokio::task::spawn_blocking(move || -> Result<_> {
                let original = tessera_dicom::join(&container, &identifying, &pixels)
                    .map_err(|e| data_loss(format!("rebuilding the file: {e}")))?;
                match profile {
                    None => Ok((original, false, stored_ts)),
                    Some(p) => {
                        drop(pixels);
                        let s = tessera_dicom::split(
                            &original,
                            &dicom_limits(max.max(original.len() as u64)),
                            &p,
                        )
                        .map_err(|e| GatewayError::Internal(format!("de-identify: {e}")))?;
                        if s.subject.burned_in_annotation && !burned_in_ok {
                            return Err(GatewayError::WrongKind(format!(
                                "{instance_name}: Burned In Annotation is YES (the pixels may show identity); a de-identified copy is not released (the deployment may opt in with dicom.deidentify_burned_in)"
                            )));
                        }
                        let out = tessera_dicom::write_deidentified(&s.deidentified, &s.pixels)
                            .map_err(|e| GatewayError::Internal(format!("de-identify: {e}")))?;
                        // Native pixels are written Explicit VR Little Endian;
                        // compressed ones keep their transfer syntax.
                        let ts = match s.pixels {
                            Pixels::Encapsulated(_) => stored_ts,
                            Pixels::Native(_) | Pixels::Opaque { .. } => {
                                tessera_dicom::EXPLICIT_VR_LE.to_owned()
                            }
                        };
                        Ok((out, true, ts))
                    }
                }
            })
            .await
            .map_err(|e| GatewayError::Internal(format!("join task: {e}")))?
            .map_err(|e| {
                if let GatewayError::DataLoss(m) = e {
                    data_loss(format!("{name}: {m}"))
                } else {
                    e
                }
            })?;
        let digest = Sha256::digest(&bytes);
        if !deidentified && hex::encode(digest) != inst.sha256 {
            return Err(data_loss(format!(
                "{name}: the rebuilt file differs from the stored one"
            )));
        }
        Ok(Loaded {
            header: pb::DicomInstanceHeader {
                instance_id: inst.instance_id.clone(),
                index,
                count,
                deidentified,
                size: bytes.len() as u64,
                sha256: digest.to_vec(),
                transfer_syntax,
                pixels: pixel_handling(inst.watermarked).into(),
                report,
                patient_attributes: if reidentify {
                    attributes_to_proto(&study.attributes)
                } else {
                    Vec::new()
                },
            },
            bytes,
        })
    }
}

/// Runs CPU work (sealing, opening, parsing) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| GatewayError::Internal(format!("blocking task: {e}")))
}

/// Takes an instance's metadata object (share 0) out of its fetched
/// objects (in placement order); the pixel objects remain.
fn take_metadata(inst: &InstanceRecord, objects: &mut Vec<Vec<u8>>) -> Option<(String, Vec<u8>)> {
    let pos = inst.placements.iter().position(|p| p.share == 0)?;
    (pos < objects.len()).then(|| (inst.placements[pos].object_id.clone(), objects.remove(pos)))
}

/// Opens both envelopes of a metadata object: (identifying, container).
fn open_metadata(
    kmeta: &Key,
    meta_id: &str,
    meta: &[u8],
) -> std::result::Result<(Vec<u8>, Vec<u8>), String> {
    let parts = envelope::unframe(meta, 2).map_err(|e| format!("metadata object: {e}"))?;
    let open = |part: &str, b: &[u8]| {
        envelope::open(kmeta, &format!("{meta_id}|{part}"), b)
            .map_err(|e| format!("metadata object, {part}: {e}"))
    };
    Ok((open("identifying", parts[0])?, open("container", parts[1])?))
}

/// Opens an instance's sealed pixel object.
async fn open_sealed_pixels(
    inst: &InstanceRecord,
    kpx: Option<&Key>,
    sealed: Vec<u8>,
) -> Result<std::result::Result<Vec<u8>, envelope::EnvelopeError>> {
    let kpx = kpx
        .ok_or_else(|| GatewayError::Internal("no pixel key".into()))?
        .clone();
    let ctx = format!("{}|pixels", inst.placements[0].object_id);
    blocking(move || envelope::open(&kpx, &ctx, &sealed)).await
}
