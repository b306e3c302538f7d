//! Reading DICOM back: FindDicomStudy, Verify of a DICOM study (every
//! instance checked, nothing released) and RetrieveDicom (the original file
//! for roles allowed to re-identify, the de-identified copy for others).

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tessera_dicom::{Pixels, Profile};
use tessera_image::Image;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
use tessera_tls::Role;

use super::read_ahead::{ReadAhead, Rebuild};
use super::{
    Loaded, PURPOSE_METADATA, PURPOSE_SEALED_PIXELS, blocking, data_loss, dicom_limits,
    open_metadata, open_sealed_pixels, pixel_handling, profile_for, take_metadata,
};
use crate::convert::{self, attributes_to_proto, check_handle, check_owner, check_request_id};
use crate::error::GatewayError;
use crate::shared::keys::Key;
use crate::shared::{BoxStream, GatewayService, Result, study_ref, with_vault};
use crate::vault::{InstanceRecord, StudyRecord, StudyState};

impl GatewayService {
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

    /// The keys that open a study's objects (derived afresh, audited): the
    /// metadata key, and the sealed-pixel key when an instance needs it.
    pub(crate) async fn restore_keys(
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
        let study_id = rec.study_id.clone();
        let rest = instances
            .into_iter()
            .zip(0u32..)
            .skip(1)
            .map(|(inst, i)| (i, inst))
            .collect();
        let rebuild = Arc::new(Rebuild {
            study: rec,
            count,
            kmeta,
            kpx,
            profile,
            reidentify,
        });
        let mut ahead = ReadAhead::start(self, rebuild, rest);
        tokio::spawn(async move {
            let mut next = Some(Ok(first));
            loop {
                let loaded = match next.take() {
                    Some(l) => l,
                    None => match ahead.next().await {
                        Some(l) => l,
                        None => return,
                    },
                };
                let loaded = match loaded {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(study = %study_id, error = %e, "DICOM retrieve stopped");
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
    pub(super) async fn load_instance(
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
    pub(crate) async fn stored_instance(
        &self,
        study: &StudyRecord,
        inst: &InstanceRecord,
    ) -> Result<Vec<u8>> {
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
