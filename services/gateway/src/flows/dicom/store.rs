//! Storing DICOM: StoreDicom's upload, then (for it and the C-STORE SCP)
//! split, find or open the study, place, seal the metadata, protect or seal
//! the pixels, put, commit; rollback of the instance on any failure.

use tessera_dicom::{Pixels, Split, Subject};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
use tonic::Streaming;

use super::{
    FORMAT_DICOM, NO_IMAGE, PURPOSE_METADATA, PURPOSE_SEALED_PIXELS, dicom_attributes,
    dicom_limits, stored_response,
};
use crate::convert::{attributes_to_proto, check_owner};
use crate::envelope;
use crate::error::GatewayError;
use crate::shared::keys::Key;
use crate::shared::placement;
use crate::shared::upload::{Part, first_header, read_exact};
use crate::shared::{GatewayService, Result, now_unix, study_ref, with_vault};
use crate::vault::{InstanceRecord, SharePlacement, SpecRecord, StudyRecord, StudyState};

impl GatewayService {
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
        let r = match self
            .store_instance(&study, stored_by.clone(), split, size, sha)
            .await
        {
            Ok(rec) => Ok(rec),
            // Placed on a cached probe and a put failed (the probe is
            // forgotten now): once more, placed on a fresh probe. The
            // failed attempt was rolled back.
            Err(Attempt {
                error,
                stale_placement: true,
            }) => {
                tracing::info!(study = %study.study_id, error = %error, "a put failed on a cached placement; placing again");
                let limits = dicom_limits(self.inner.limits.max_image_bytes);
                let split = tokio::task::spawn_blocking(move || {
                    tessera_dicom::split_for_store(&file, &limits)
                })
                .await
                .map_err(|e| GatewayError::Internal(format!("split task: {e}")))?
                .map_err(|e| GatewayError::Internal(format!("split again: {e}")))?;
                self.store_instance(&study, stored_by, split, size, sha)
                    .await
                    .map_err(|a| a.error)
            }
            Err(a) => Err(a.error),
        }
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
        let lock = self.inner.keys.lock_for(&key);
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
            created_unix: now_unix(),
            dicom_study_uid: subject.study_instance_uid.clone(),
            replica: self.inner.vault.replica().to_owned(),
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

    /// Stores one instance: placed, intent recorded, objects put,
    /// committed; rolled back on any failure. The intent record's commit
    /// runs while the metadata is sealed and the pixels protected (no
    /// object is put before it is durable), so one vault commit per
    /// instance is on the path to the answer, not two.
    async fn store_instance(
        &self,
        study: &StudyRecord,
        stored_by: String,
        split: Split,
        size: u64,
        sha: [u8; 32],
    ) -> Result<InstanceRecord, Attempt> {
        let mut cached = false;
        self.store_instance_placed(study, stored_by, split, size, sha, &mut cached)
            .await
            .map_err(|(error, at_put)| Attempt {
                error,
                stale_placement: cached && at_put,
            })
    }

    /// [`Self::store_instance`]; an error says whether a put failed.
    /// `cached` is set when the placement used a cached probe.
    async fn store_instance_placed(
        &self,
        study: &StudyRecord,
        stored_by: String,
        split: Split,
        size: u64,
        sha: [u8; 32],
        cached: &mut bool,
    ) -> Result<InstanceRecord, (GatewayError, bool)> {
        let early = |e: GatewayError| (e, false);
        let kmeta = self
            .protect_key(study, PURPOSE_METADATA)
            .await
            .map_err(early)?;
        let instance_id = self.new_id("in").map_err(early)?;
        let base = format!("{}.{}", study.study_id, instance_id);
        let watermarked = matches!(split.pixels, Pixels::Native(_));
        let (spec, pixel_bytes) = match &split.pixels {
            Pixels::Native(image) => (*image.spec(), image.spec().byte_len() as u64),
            Pixels::Encapsulated(b) | Pixels::Opaque { bytes: b, .. } => (NO_IMAGE, b.len() as u64),
        };

        // Nodes: pixel shares on two distinct nodes, the metadata object on
        // a third when one is healthy.
        let (healthy, problems, from_cache) = self.inner.up.placement_probe().await;
        *cached = from_cache;
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
        })
        .map_err(early)?;
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
        self.spread_fragments(&mut placements, &healthy, &problems, bound)
            .map_err(early)?;

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
            created_unix: now_unix(),
            burned_in_annotation: split.subject.burned_in_annotation,
            indexed: split.subject.indexed.clone(),
            replica: self.inner.vault.replica().to_owned(),
        };
        // The intent record commits while the objects are prepared.
        let intent = {
            let (r, vault) = (rec.clone(), self.inner.vault.clone());
            tokio::spawn(async move { with_vault(&vault, move |v| v.insert_instance(&r)).await })
        };
        let prepared = self
            .instance_objects(study, &mut rec, split, kmeta, &base)
            .await;
        match intent.await {
            Ok(Ok(())) => {}
            // Refused (the SOP Instance UID is being stored meanwhile) or
            // failed: nothing was put, and the record is not ours to remove.
            Ok(Err(e)) => return Err(early(e)),
            Err(e) => {
                return Err(early(GatewayError::Internal(format!(
                    "vault intent task: {e}"
                ))));
            }
        }
        let objects = match prepared {
            Ok(o) => o,
            Err(e) => {
                self.rollback_instance(&rec).await;
                return Err(early(e));
            }
        };
        if let Err(e) = self.put_objects(&mut rec.placements, objects).await {
            if !self.rollback_instance(&rec).await && *cached {
                // A node that went away keeps the record pending (for the
                // sweep); its SOP Instance UID is freed for the new attempt.
                let r = rec.clone();
                if let Err(e2) = with_vault(&self.inner.vault, move |v| v.release_sop(&r)).await {
                    tracing::warn!(study = %rec.study_id, instance = %rec.instance_id, error = %e2, "cannot free the SOP Instance UID of a failed store");
                    return Err((e, false));
                }
            }
            return Err((e, true));
        }
        rec.state = StudyState::Committed;
        let r = rec.clone();
        if let Err(e) = with_vault(&self.inner.vault, move |v| v.put_instance(&r)).await {
            self.rollback_instance(&rec).await;
            return Err(early(e));
        }
        // A Delete of the study may have started meanwhile (it lists
        // the instances once): the instance must not outlive it.
        let sid = rec.study_id.clone();
        let alive = with_vault(&self.inner.vault, move |v| {
            Ok(v.get(&sid)?
                .is_some_and(|s| s.state == StudyState::Committed))
        })
        .await
        .map_err(early)?;
        if !alive {
            self.rollback_instance(&rec).await;
            return Err(early(GatewayError::NotFound(format!(
                "study {} was deleted while the instance was being stored",
                rec.study_id
            ))));
        }
        tracing::info!(study = %rec.study_id, instance = %rec.instance_id, watermarked, "DICOM instance stored");
        Ok(rec)
    }

    /// The instance's objects, in placement order: the pixel shares (or
    /// the sealed pixels), then the sealed metadata.
    async fn instance_objects(
        &self,
        study: &StudyRecord,
        rec: &mut InstanceRecord,
        split: Split,
        kmeta: Key,
        base: &str,
    ) -> Result<Vec<Vec<u8>>> {
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
                    envelope::seal(
                        &kmeta,
                        envelope::Purpose::DicomMetadata,
                        &format!("{meta_id}|{part}"),
                        data,
                        &rng,
                    )
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
                    envelope::seal(&kpx, envelope::Purpose::DicomPixels, &ctx, bytes, &rng)
                        .map_err(|e| GatewayError::Internal(format!("seal pixels: {e}")))
                })
                .await
                .map_err(|e| GatewayError::Internal(format!("seal task: {e}")))??;
                vec![sealed]
            }
        };
        objects.push(meta);
        Ok(objects)
    }
}

/// A failed [`GatewayService::store_instance`] (rolled back).
struct Attempt {
    error: GatewayError,
    /// A put failed on a placement made from a cached probe: placing
    /// again on a fresh probe may succeed.
    stale_placement: bool,
}
