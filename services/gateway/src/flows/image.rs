//! The image flow (papers 000/003): Store (decode, place, protect through
//! the watermark service, put both shares, commit), RequestAccess, Retrieve
//! (restore with the tamper report, re-identify for allowed roles), Verify,
//! Locate and FetchShare (ciphertext relayed for a grant holder).

use sha2::{Digest, Sha256};
use tessera_image::ImageSpec;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
use tessera_runtime::IdleStream;
use tessera_tls::Role;
use tonic::Streaming;

use crate::convert::{self, StorePlan, attributes_to_proto, check_handle, check_request_id};
use crate::durability::placement_to_proto;
use crate::error::GatewayError;
use crate::shared::placement;
use crate::shared::upload::{Part, first_header, read_exact};
use crate::shared::{
    BoxStream, GatewayService, PURPOSE_PIXELS, Result, SHARES, now_unix, study_ref, with_vault,
};
use crate::vault::{SharePlacement, SpecRecord, StudyRecord, StudyState};

impl GatewayService {
    pub(crate) async fn store_inner(
        &self,
        caller: String,
        roles: std::collections::BTreeSet<Role>,
        stream: Streaming<pb::StoreRequest>,
    ) -> Result<pb::StoreResponse> {
        let mut stream = IdleStream::new(stream, self.inner.limits.stream_idle);
        let mut header = first_header(&mut stream, |m: pb::StoreRequest| match m.part {
            Some(pb::store_request::Part::Header(h)) => Some(h),
            Some(pb::store_request::Part::Chunk(_)) | None => None,
        })
        .await?;
        if header.owner.is_empty() {
            header.owner.clone_from(&caller);
        }
        let plan = StorePlan::from_header(header, self.inner.limits.max_image_bytes)?;
        self.require_store_for("Store", &caller, &roles, &plan.owner)
            .await?;
        // A compressed file decodes to more than its size; the decoded size
        // is bounded by max_image_bytes and checked below.
        let _permit = self
            .job_permit(plan.size.max(pixel_estimate(&plan)))
            .await?;
        let max = self.inner.limits.max_image_bytes;
        let file = read_exact(
            &mut stream,
            plan.size,
            |m: pb::StoreRequest| match m.part {
                Some(pb::store_request::Part::Chunk(c)) => Part::Chunk(c),
                Some(pb::store_request::Part::Header(_)) => Part::Header,
                None => Part::Empty,
            },
            // A PNG declares its dimensions in its first bytes: refuse an
            // over-size one there, before its pixels are read.
            |head| match png_min_decoded_bytes(head) {
                Some(bytes) if bytes > max => {
                    Err(over_limit("the image the PNG's IHDR declares", bytes, max))
                }
                Some(_) | None => Ok(()),
            },
        )
        .await?;
        let (spec, pixels) = decode(&plan, file).await?;
        if let Some(roi) = &plan.roi
            && !roi.fits(spec.width, spec.height)
        {
            let e = tessera_image::ImageError::RectOutside {
                rect: *roi,
                width: spec.width,
                height: spec.height,
            };
            return Err(GatewayError::InvalidArgument(format!("header.roi: {e}")));
        }
        let pixel_bytes = spec.byte_len() as u64;
        if pixel_bytes > max {
            return Err(over_limit("the decoded image", pixel_bytes, max));
        }

        let study_id = self.new_study_id()?;
        // Choose the nodes before anything is written anywhere.
        let (healthy, problems) = self.inner.up.probe().await;
        let names: Vec<String> = self.inner.up.nodes.iter().map(|n| n.name.clone()).collect();
        // A share is at most the image plus per-tile framing; a node holds
        // the share or (erasure-coded) one fragment of it.
        let share_bound = crate::sizes::image_share_bound(pixel_bytes);
        let limits = &self.inner.limits;
        let chosen = placement::place(
            self.inner.placement.as_ref(),
            &study_id,
            &healthy,
            &problems,
            &names,
            SHARES,
            crate::sizes::per_node_bytes(share_bound, limits.erasure_scheme()),
            limits.node_cap_needed(),
        )?;
        let mut rec = StudyRecord {
            study_id: study_id.clone(),
            state: StudyState::Pending,
            owner: plan.owner.clone(),
            stored_by: caller,
            attributes: plan.attributes.clone(),
            original_format: plan.format.into(),
            spec: SpecRecord::from_spec(&spec),
            header_json: String::new(),
            placements: chosen
                .iter()
                .enumerate()
                .map(|(i, &h)| {
                    let share = i as u32 + 1;
                    SharePlacement {
                        share,
                        node: names[healthy[h].index].clone(),
                        instance_id: healthy[h].instance_id.clone(),
                        object_id: format!("{study_id}.s{share}"),
                        size: 0,
                        sha256: String::new(),
                        erasure: None,
                    }
                })
                .collect(),
            created_unix: now_unix(),
            dicom_study_uid: String::new(),
            replica: self.inner.vault.replica().to_owned(),
        };
        self.spread_fragments(&mut rec.placements, &healthy, &problems, share_bound)?;
        // The intent record: a crash from here on is cleaned up at start.
        let r = rec.clone();
        with_vault(&self.inner.vault, move |v| v.insert_new(&r)).await?;
        match self.store_steps(&mut rec, &plan, spec, pixels).await {
            Ok(()) => {
                rec.state = StudyState::Committed;
                let r = rec.clone();
                if let Err(e) = with_vault(&self.inner.vault, move |v| v.put(&r)).await {
                    self.rollback(&rec).await;
                    return Err(e);
                }
                tracing::info!(study = %study_id, "stored");
                Ok(pb::StoreResponse {
                    study_handle: study_id,
                    placements: rec.placements.iter().map(placement_to_proto).collect(),
                    spec: Some(convert::spec_to_proto(&rec.spec.to_spec())),
                })
            }
            Err(e) => {
                tracing::warn!(study = %study_id, error = %e, "store failed; rolling back");
                self.rollback(&rec).await;
                Err(e)
            }
        }
    }

    /// Register, protect, place both shares. The pixels go to the
    /// watermark service and are released as they are sent; the shares go
    /// to their nodes the same way.
    async fn store_steps(
        &self,
        rec: &mut StudyRecord,
        plan: &StorePlan,
        spec: ImageSpec,
        pixels: Vec<u8>,
    ) -> Result<()> {
        let up = &self.inner.up;
        let mut ks = up.keyserver.clone();
        ks.register_study(kpb::RegisterStudyRequest {
            owner: rec.owner.clone(),
            attributes: attributes_to_proto(&rec.attributes),
            study_id: rec.study_id.clone(),
        })
        .await
        .map_err(|s| GatewayError::upstream("keyserver", s))?;

        let (header_json, shares) = self
            .protect_pixels(study_ref(rec), rec.study_id.clone(), plan.roi, spec, pixels)
            .await?;
        rec.header_json = header_json;
        self.put_objects(&mut rec.placements, shares).await
    }

    pub(crate) async fn request_access_inner(
        &self,
        caller: String,
        r: pb::RequestAccessRequest,
    ) -> Result<pb::RequestAccessResponse> {
        check_handle("study_handle", &r.study_handle)?;
        if r.justification.len() > 1024 {
            return Err(GatewayError::InvalidArgument(
                "justification: at most 1024 bytes".into(),
            ));
        }
        if r.access_purpose.len() > 64 {
            return Err(GatewayError::InvalidArgument(
                "access_purpose: at most 64 bytes".into(),
            ));
        }
        let rec = self.committed(&r.study_handle).await?;
        let mut ks = self.inner.up.keyserver.clone();
        if !r.break_glass_reason.is_empty() {
            // Break-glass on the caller's behalf: the keyserver checks the
            // caller's `emergency` permission, the reason and the owner's
            // setting, and audits every step as break-glass.
            if !matches!(r.access_purpose.as_str(), "" | "emergency") {
                return Err(GatewayError::InvalidArgument(format!(
                    "access_purpose {:?}: break-glass access is for the \"emergency\" purpose (leave it empty)",
                    r.access_purpose
                )));
            }
            let resp = ks
                .break_glass(kpb::BreakGlassRequest {
                    study_id: rec.study_id.clone(),
                    attributes: attributes_to_proto(&rec.attributes),
                    purpose: PURPOSE_PIXELS.into(),
                    reason: r.break_glass_reason,
                    on_behalf_of: caller,
                })
                .await
                .map_err(|s| GatewayError::upstream("keyserver", s))?
                .into_inner();
            return Ok(pb::RequestAccessResponse {
                request: resp.request,
            });
        }
        let resp = ks
            .request_key(kpb::RequestKeyRequest {
                study_id: rec.study_id.clone(),
                attributes: attributes_to_proto(&rec.attributes),
                purpose: PURPOSE_PIXELS.into(),
                justification: r.justification,
                on_behalf_of: caller,
                // Empty: the keyserver's default access purpose.
                access_purpose: r.access_purpose,
            })
            .await
            .map_err(|s| GatewayError::upstream("keyserver", s))?
            .into_inner();
        Ok(pb::RequestAccessResponse {
            request: resp.request,
        })
    }

    pub(crate) async fn retrieve_inner(
        &self,
        caller: String,
        roles: std::collections::BTreeSet<Role>,
        r: pb::RetrieveRequest,
    ) -> Result<BoxStream<pb::RetrieveResponse>> {
        check_handle("study_handle", &r.study_handle)?;
        check_request_id("key_request_id", &r.key_request_id)?;
        let rec = self.committed_image(&r.study_handle).await?;
        self.check_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        let _permit = self
            .job_permit(rec.spec.to_spec().byte_len() as u64)
            .await?;
        let shares = self.fetch_shares(&rec).await?;
        let (report, pixels) = self.restore(&rec, shares).await?;
        if !report.intact && !r.allow_tampered {
            tracing::warn!(study = %rec.study_id, tiles = report.tampered_tile_count, blocks = report.tampered_block_count, "retrieve refused: tampered");
            return Err(crate::access::tampered(&rec.study_id, &report));
        }
        // The use is spent only when the pixels are about to leave.
        self.redeem_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        let reidentify = roles
            .iter()
            .any(|r| self.inner.limits.reidentify_roles.contains(r));
        tracing::info!(study = %rec.study_id, caller = %caller, reidentified = reidentify, intact = report.intact, "retrieved");
        let header = pb::RetrieveHeader {
            spec: Some(convert::spec_to_proto(&rec.spec.to_spec())),
            report: Some(report),
            patient_attributes: if reidentify {
                attributes_to_proto(&rec.attributes)
            } else {
                Vec::new()
            },
            original_format: rec.original_format,
            pixels_sha256: Sha256::digest(&pixels).to_vec(),
        };
        // Chunks copied as the answer goes out; the pixels released after
        // the last one.
        let first = pb::RetrieveResponse {
            part: Some(pb::retrieve_response::Part::Header(header)),
        };
        let msgs = std::iter::once(first)
            .chain(
                tessera_wire::stream::owned_chunks(pixels).map(|c| pb::RetrieveResponse {
                    part: Some(pb::retrieve_response::Part::Chunk(c)),
                }),
            )
            .map(Ok);
        Ok(Box::pin(tokio_stream::iter(msgs)))
    }

    pub(crate) async fn verify_inner(
        &self,
        caller: String,
        r: pb::VerifyStudyRequest,
    ) -> Result<pb::VerifyStudyResponse> {
        check_handle("study_handle", &r.study_handle)?;
        let rec = self.committed(&r.study_handle).await?;
        self.require_verify_access(&caller, &rec, &r.key_request_id)
            .await?;
        if rec.is_dicom() {
            return self.verify_dicom(&rec).await;
        }
        let _permit = self
            .job_permit(rec.spec.to_spec().byte_len() as u64)
            .await?;
        let limit = rec.spec.to_spec().byte_len() as u64 * 2 + (1 << 20);
        let (shares, problems) = self
            .fetch_objects_reported(&rec.study_id, &rec.placements, limit, true)
            .await?;
        let report = self.verify_shares(&rec, shares).await?;
        Ok(pb::VerifyStudyResponse {
            report: Some(report),
            instances: Vec::new(),
            fragment_problems: problems.iter().map(|p| p.to_string()).collect(),
        })
    }

    pub(crate) async fn locate_inner(
        &self,
        caller: String,
        r: pb::LocateRequest,
    ) -> Result<pb::LocateResponse> {
        check_handle("study_handle", &r.study_handle)?;
        check_request_id("key_request_id", &r.key_request_id)?;
        let rec = self.committed_image(&r.study_handle).await?;
        self.check_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        Ok(pb::LocateResponse {
            study_handle: rec.study_id.clone(),
            header_json: rec.header_json.clone(),
            placements: rec.placements.iter().map(placement_to_proto).collect(),
        })
    }

    /// One share's ciphertext, relayed from its node for a grant holder.
    pub(crate) async fn fetch_share_inner(
        &self,
        caller: String,
        r: pb::FetchShareRequest,
    ) -> Result<BoxStream<pb::FetchShareResponse>> {
        check_handle("study_handle", &r.study_handle)?;
        check_request_id("key_request_id", &r.key_request_id)?;
        if !(1..=SHARES as u32).contains(&r.share) {
            return Err(GatewayError::InvalidArgument(format!(
                "share: {} is not 1..={SHARES}",
                r.share
            )));
        }
        let rec = self.committed_image(&r.study_handle).await?;
        self.check_grant(&caller, &r.key_request_id, &rec.study_id)
            .await?;
        let placement = rec
            .placements
            .iter()
            .find(|p| p.share == r.share)
            .cloned()
            .ok_or_else(|| {
                GatewayError::DataLoss(format!("study {}: no share {}", rec.study_id, r.share))
            })?;
        let limit = rec.spec.to_spec().byte_len() as u64 * 2 + (1 << 20);
        let _permit = self.job_permit(limit).await?;
        let mut objects = self
            .fetch_objects(&rec.study_id, std::slice::from_ref(&placement), limit)
            .await?;
        let data = objects.pop().unwrap_or_default();
        tracing::info!(study = %rec.study_id, share = r.share, caller = %caller, "share relayed");
        let msgs = tessera_wire::stream::owned_chunks(data)
            .map(|c| Ok(pb::FetchShareResponse { chunk: c }));
        Ok(Box::pin(tokio_stream::iter(msgs)))
    }
}

/// The pixel bytes a store will hold: raw declares them; PNG/TIFF are
/// charged at their file size here and checked after decoding.
/// RESOURCE_EXHAUSTED naming the limit and its setting.
pub(crate) fn over_limit(what: &str, bytes: u64, max: u64) -> GatewayError {
    GatewayError::TooLarge(format!(
        "{what} is {bytes} bytes, the limit is {max} (gateway.max_image_bytes)"
    ))
}

/// The fewest bytes a PNG decodes to, from its IHDR (width x height x
/// samples x bytes per sample, counting alpha and palette entries as
/// nothing): `None` when `head` is not a PNG's start.
fn png_min_decoded_bytes(head: &[u8]) -> Option<u64> {
    const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
    if head.len() < 26 || head[..8] != SIGNATURE || &head[12..16] != b"IHDR" {
        return None;
    }
    let word = |at: usize| {
        u64::from(u32::from_be_bytes([
            head[at],
            head[at + 1],
            head[at + 2],
            head[at + 3],
        ]))
    };
    let (width, height) = (word(16), word(20));
    let bytes_per_sample = if head[24] > 8 { 2 } else { 1 };
    let samples = match head[25] {
        2 | 6 => 3,
        _ => 1,
    };
    Some(width * height * samples * bytes_per_sample)
}

fn pixel_estimate(plan: &StorePlan) -> u64 {
    plan.raw_spec.map_or(plan.size, |s| s.byte_len() as u64)
}

/// Decodes the file on a blocking thread into its spec and packed
/// little-endian pixels (what the watermark service takes). Raw pixels of
/// a valid spec and the right length are those bytes already (every 8- or
/// 16-bit word fits its container): they are passed on as received, not
/// copied into an image and back (issue 20: two fewer copies of the image).
async fn decode(plan: &StorePlan, file: Vec<u8>) -> Result<(ImageSpec, Vec<u8>)> {
    let format = plan.format;
    let raw = plan.raw_spec;
    tokio::task::spawn_blocking(move || match (format, raw) {
        (pb::ImageFormat::Raw, Some(spec))
            if spec.validate().is_ok() && file.len() as u64 == spec.byte_len() as u64 =>
        {
            Ok((spec, file))
        }
        // Refused with decode_raw's own error.
        (pb::ImageFormat::Raw, Some(spec)) => {
            tessera_image::codec::decode_raw(spec, &file).map(|image| (spec, image.to_le_bytes()))
        }
        (pb::ImageFormat::Png | pb::ImageFormat::Tiff, _) => {
            let image = tessera_image::codec::decode(&file)?;
            drop(file);
            Ok((*image.spec(), image.to_le_bytes()))
        }
        (pb::ImageFormat::Raw | pb::ImageFormat::Unspecified | pb::ImageFormat::Dicom, _) => Err(
            tessera_image::ImageError::Codec("no spec for raw pixels".into()),
        ),
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("decode task: {e}")))?
    .map_err(|e| GatewayError::InvalidArgument(format!("chunk: the file does not decode: {e}")))
}
