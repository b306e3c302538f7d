//! The gRPC edge of the gateway and the flows behind it: store, request
//! access, retrieve, verify, locate, delete (and process, in `process.rs`).
//! Roles are checked before this by the `tessera_tls::AuthzLayer` driven by
//! [`policy`]; ownership and grants are checked here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};
use tessera_image::Image;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_server::{Gateway, GatewayServer};
use tessera_proto::keyserver::v1 as kpb;
use tessera_proto::watermark::v1 as wpb;
use tessera_runtime::IdleStream;
use tessera_runtime::MAX_MESSAGE_BYTES;
use tessera_tls::{Policy, Role};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::convert::{self, StorePlan, attributes_to_proto, check_handle, check_request_id};
use crate::durability::placement_to_proto;
use crate::error::GatewayError;
use crate::placement::{self, DistinctNodes, PlacementPolicy};
use crate::upstream::Upstreams;
use crate::vault::{SharePlacement, SpecRecord, StudyRecord, StudyState, Vault};

/// gRPC service name, for the policy table and health.
pub const SERVICE: &str = "tessera.gateway.v1.Gateway";

/// The key purpose of pixel keys and grants.
pub const PURPOSE_PIXELS: &str = "pixels";

/// Shares per study.
const SHARES: usize = 2;

pub(crate) type Result<T, E = GatewayError> = std::result::Result<T, E>;
pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Who may call what: this service's rows of the one authorization matrix
/// ([`tessera_tls::matrix::MATRIX`]). Ownership, delegation and grants are
/// checked in the handlers.
pub fn policy() -> Policy {
    Policy::for_service(SERVICE)
}

/// Settings the handlers need.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_image_bytes: u64,
    pub reidentify_roles: Vec<Role>,
    /// Retain Longitudinal Temporal Information for de-identified DICOM.
    pub temporal: crate::config::TemporalOption,
    /// Release de-identified copies of Burned In Annotation = YES instances.
    pub deidentify_burned_in: bool,
    /// Erasure coding of stored objects (None: whole objects, one copy).
    pub erasure: Option<crate::config::ErasureSection>,
    /// An upload that sends nothing this long ends with DEADLINE_EXCEEDED,
    /// releasing its job permit (`server.stream_idle_timeout_secs`).
    pub stream_idle: std::time::Duration,
}

/// The shared state behind every handler.
pub struct Inner {
    pub(crate) up: Upstreams,
    pub(crate) vault: Arc<Vault>,
    pub(crate) limits: Limits,
    jobs: Arc<Semaphore>,
    /// In-flight memory budget in MiB (an image, its file and its shares
    /// held at once by a job count about four times the image).
    memory_mib: Arc<Semaphore>,
    memory_total_mib: u32,
    pub(crate) placement: Box<dyn PlacementPolicy>,
    rng: SystemRandom,
    pub(crate) dicom: crate::dicom::DicomState,
}

/// Held while a job runs.
pub(crate) struct JobPermit {
    _job: OwnedSemaphorePermit,
    _memory: OwnedSemaphorePermit,
}

/// The tonic service.
#[derive(Clone)]
pub struct GatewayService {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs a vault operation off the async threads.
pub(crate) async fn with_vault<T: Send + 'static>(
    vault: &Arc<Vault>,
    f: impl FnOnce(&Vault) -> Result<T> + Send + 'static,
) -> Result<T> {
    let v = vault.clone();
    tokio::task::spawn_blocking(move || f(&v))
        .await
        .map_err(|e| GatewayError::Internal(format!("vault task: {e}")))?
}

impl GatewayService {
    pub fn new(
        up: Upstreams,
        vault: Arc<Vault>,
        limits: Limits,
        max_jobs: usize,
        memory_mib: u32,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                up,
                vault,
                limits,
                jobs: Arc::new(Semaphore::new(max_jobs)),
                memory_mib: Arc::new(Semaphore::new(memory_mib as usize)),
                memory_total_mib: memory_mib,
                placement: Box::new(DistinctNodes),
                rng: SystemRandom::new(),
                dicom: Default::default(),
            }),
        }
    }

    /// The generated server with explicit message limits.
    pub fn into_server(self) -> GatewayServer<Self> {
        GatewayServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Waits for a job slot and for `image_bytes` x 4 of the memory budget
    /// (a job holds the file or image and both shares at once).
    pub(crate) async fn job_permit(&self, image_bytes: u64) -> Result<JobPermit> {
        let closed = |_| GatewayError::Internal("job semaphore closed".into());
        let job = self
            .inner
            .jobs
            .clone()
            .acquire_owned()
            .await
            .map_err(closed)?;
        let mib = (image_bytes.saturating_mul(4).div_ceil(1 << 20)).max(1);
        let mib = u32::try_from(mib)
            .unwrap_or(u32::MAX)
            .min(self.inner.memory_total_mib);
        let memory = self
            .inner
            .memory_mib
            .clone()
            .acquire_many_owned(mib)
            .await
            .map_err(closed)?;
        Ok(JobPermit {
            _job: job,
            _memory: memory,
        })
    }

    pub(crate) fn new_study_id(&self) -> Result<String> {
        self.new_id("st")
    }

    /// `<prefix>-` + 32 random hex characters.
    pub(crate) fn new_id(&self, prefix: &str) -> Result<String> {
        let mut b = [0u8; 16];
        self.inner
            .rng
            .fill(&mut b)
            .map_err(|_| GatewayError::Internal("no randomness".into()))?;
        Ok(format!("{prefix}-{}", hex::encode(b)))
    }

    // ---- store ------------------------------------------------------------

    async fn store_inner(
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
        let file = read_exact(&mut stream, plan.size, |m: pb::StoreRequest| match m.part {
            Some(pb::store_request::Part::Chunk(c)) => Part::Chunk(c),
            Some(pb::store_request::Part::Header(_)) => Part::Header,
            None => Part::Empty,
        })
        .await?;
        let image = decode(&plan, file).await?;
        if let Some(roi) = &plan.roi {
            image
                .check_rect(roi)
                .map_err(|e| GatewayError::InvalidArgument(format!("header.roi: {e}")))?;
        }
        let pixel_bytes = image.spec().byte_len() as u64;
        if pixel_bytes > self.inner.limits.max_image_bytes {
            return Err(GatewayError::TooLarge(format!(
                "the decoded image is {pixel_bytes} bytes, over the limit of {} bytes",
                self.inner.limits.max_image_bytes
            )));
        }

        let study_id = self.new_study_id()?;
        // Choose the nodes before anything is written anywhere.
        let (healthy, problems) = self.inner.up.probe().await;
        let names: Vec<String> = self.inner.up.nodes.iter().map(|n| n.name.clone()).collect();
        // A share is at most the image plus per-tile framing.
        let share_bound = pixel_bytes + pixel_bytes / 8 + 64 * 1024;
        let chosen = placement::place(
            self.inner.placement.as_ref(),
            &study_id,
            &healthy,
            &problems,
            &names,
            SHARES,
            share_bound,
        )?;
        let mut rec = StudyRecord {
            study_id: study_id.clone(),
            state: StudyState::Pending,
            owner: plan.owner.clone(),
            stored_by: caller,
            attributes: plan.attributes.clone(),
            original_format: plan.format.into(),
            spec: SpecRecord::from_spec(image.spec()),
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
        };
        self.spread_fragments(&mut rec.placements, &healthy, &problems, share_bound)?;
        // The intent record: a crash from here on is cleaned up at start.
        let r = rec.clone();
        with_vault(&self.inner.vault, move |v| v.insert_new(&r)).await?;
        match self.store_steps(&mut rec, &plan, image).await {
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

    /// Register, protect, place both shares.
    async fn store_steps(
        &self,
        rec: &mut StudyRecord,
        plan: &StorePlan,
        image: Image,
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
            .protect(study_ref(rec), rec.study_id.clone(), plan.roi, image)
            .await?;
        rec.header_json = header_json;
        self.put_objects(&mut rec.placements, shares).await
    }

    /// Puts `data[i]` as `placements[i]` in parallel and records each
    /// object's size and SHA-256 as the node confirmed them (erasure-coded
    /// objects: every fragment, acknowledged at the write quorum).
    pub(crate) async fn put_objects(
        &self,
        placements: &mut [SharePlacement],
        data: Vec<Vec<u8>>,
    ) -> Result<()> {
        let up = &self.inner.up;
        let mut puts = Vec::with_capacity(placements.len());
        for (p, data) in placements.iter().zip(data) {
            let this = self.clone();
            let mut p = p.clone();
            if p.erasure.is_some() {
                puts.push(tokio::spawn(async move {
                    this.put_fragments(&mut p, data).await?;
                    Ok::<_, GatewayError>(p)
                }));
                continue;
            }
            let node = up.node(&p.node)?.clone();
            puts.push(tokio::spawn(async move {
                let mut c = node.client.clone();
                // The node answers with the SHA-256 it verified against the
                // one the client sent: record that, no second pass here.
                let r = tessera_storage_client::put_object(&mut c, &p.object_id, &data)
                    .await
                    .map_err(|s| node.err(s))?;
                let info = r.info.unwrap_or_default();
                if info.size != data.len() as u64 || info.sha256.len() != 32 {
                    return Err(node.err(Status::internal(
                        "put: the node answered without the object's size and SHA-256",
                    )));
                }
                p.size = info.size;
                p.sha256 = hex::encode(info.sha256);
                Ok(p)
            }));
        }
        let mut first_err = None;
        for (i, t) in puts.into_iter().enumerate() {
            match t.await {
                Ok(Ok(p)) => placements[i] = p,
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(GatewayError::Internal(format!("put task: {e}")));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Has the watermark service protect the image: the header and both
    /// shares.
    pub(crate) async fn protect(
        &self,
        study: wpb::StudyRef,
        object_id: String,
        roi: Option<tessera_image::Rect>,
        image: Image,
    ) -> Result<(String, Vec<Vec<u8>>)> {
        let spec = *image.spec();
        let bytes = image.to_le_bytes();
        drop(image);
        let mut msgs = Vec::with_capacity(bytes.len() / convert::CHUNK_BYTES + 2);
        msgs.push(wpb::ProtectRequest {
            msg: Some(wpb::protect_request::Msg::Start(wpb::ProtectStart {
                study: Some(study),
                object_id,
                spec: Some(convert::spec_to_proto(&spec)),
                roi: roi.map(|r| tessera_wire::convert::watermark::rect_to_proto(&r)),
                profile: wpb::Profile::Secure.into(),
            })),
        });
        for c in convert::chunks(&bytes) {
            msgs.push(wpb::ProtectRequest {
                msg: Some(wpb::protect_request::Msg::Pixels(c)),
            });
        }
        drop(bytes);
        let wm = |s: Status| GatewayError::upstream("watermark", s);
        let mut out = self
            .inner
            .up
            .watermark
            .clone()
            .protect(tokio_stream::iter(msgs))
            .await
            .map_err(wm)?
            .into_inner();
        let header = match out.message().await.map_err(wm)? {
            Some(wpb::ProtectResponse {
                msg: Some(wpb::protect_response::Msg::Header(h)),
            }) => h,
            Some(_) | None => {
                return Err(wm(Status::internal("protect: no header first")));
            }
        };
        let bound = (spec.byte_len() as u64) * 2 + (1 << 20);
        if header.share1_bytes > bound || header.share2_bytes > bound {
            return Err(wm(Status::internal("protect: shares larger than possible")));
        }
        let mut shares = vec![
            Vec::with_capacity(header.share1_bytes as usize),
            Vec::with_capacity(header.share2_bytes as usize),
        ];
        let want = [header.share1_bytes, header.share2_bytes];
        while let Some(m) = out.message().await.map_err(wm)? {
            match m.msg {
                Some(wpb::protect_response::Msg::Share(c)) if c.share == 1 || c.share == 2 => {
                    let i = c.share as usize - 1;
                    if shares[i].len() as u64 + c.data.len() as u64 > want[i] {
                        return Err(wm(Status::internal("protect: share longer than announced")));
                    }
                    shares[i].extend_from_slice(&c.data);
                }
                Some(_) | None => {
                    return Err(wm(Status::internal("protect: unexpected message")));
                }
            }
        }
        if shares[0].len() as u64 != want[0] || shares[1].len() as u64 != want[1] {
            return Err(wm(Status::internal(
                "protect: share shorter than announced",
            )));
        }
        Ok((header.header_json, shares))
    }

    /// Removes what a failed store (or an unfinished delete) left: the
    /// shares, the study at the keyserver, then the vault record. Anything
    /// that fails keeps the record, and the next start tries again.
    pub(crate) async fn rollback(&self, rec: &StudyRecord) {
        let mut clean = true;
        if rec.is_dicom()
            && let Err(e) = self.delete_instances(rec).await
        {
            clean = false;
            tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot delete the study's instances");
        }
        clean &= self
            .delete_objects_logged(&rec.study_id, &rec.placements)
            .await;
        if let Err(e) = self.forget(rec).await {
            clean = false;
            tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot forget study");
        }
        if clean {
            let r = rec.clone();
            let removed = with_vault(&self.inner.vault, move |v| {
                if r.is_dicom() {
                    v.remove_dicom_study(&r)
                } else {
                    v.remove(&r.study_id)
                }
            });
            if let Err(e) = removed.await {
                tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot remove vault record");
            }
        }
    }

    /// Best-effort removal of objects for a cleanup: every object is tried,
    /// each failure logged; true when all are gone.
    pub(crate) async fn delete_objects_logged(
        &self,
        study: &str,
        placements: &[SharePlacement],
    ) -> bool {
        let mut clean = true;
        for p in placements {
            if let Err(e) = self.delete_placement(p).await {
                clean = false;
                tracing::warn!(%study, object = %p.object_id, error = %e, "cleanup: cannot delete object");
            }
        }
        clean
    }

    /// Crypto-shredding at the keyserver; a study it does not know is done.
    async fn forget(&self, rec: &StudyRecord) -> Result<bool> {
        self.inner.dicom.forget_keys(&rec.study_id);
        let mut ks = self.inner.up.keyserver.clone();
        match ks
            .forget_study(kpb::ForgetStudyRequest {
                study_id: rec.study_id.clone(),
                on_behalf_of: rec.owner.clone(),
            })
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(GatewayError::upstream("keyserver", s)),
        }
    }

    /// Finishes what a crash interrupted (called once at start).
    pub async fn sweep_unfinished(&self) {
        self.sweep_instances().await;
        let recs = match with_vault(&self.inner.vault, |v| v.unfinished()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "vault sweep failed");
                return;
            }
        };
        for rec in recs {
            tracing::info!(study = %rec.study_id, state = ?rec.state, "finishing an interrupted store/delete");
            self.rollback(&rec).await;
        }
    }

    // ---- shared retrieval steps --------------------------------------------

    /// Checks (without spending) that `caller` holds a valid grant for the
    /// study.
    pub(crate) async fn check_grant(&self, caller: &str, rid: &str, study: &str) -> Result<()> {
        let mut ks = self.inner.up.keyserver.clone();
        ks.check_grant(kpb::RedeemGrantRequest {
            request_id: rid.to_owned(),
            on_behalf_of: caller.to_owned(),
            study_id: study.to_owned(),
        })
        .await
        .map_err(|s| GatewayError::upstream("keyserver", s))?;
        Ok(())
    }

    /// Spends one use of the grant: the last step before pixels leave.
    pub(crate) async fn redeem_grant(&self, caller: &str, rid: &str, study: &str) -> Result<()> {
        let mut ks = self.inner.up.keyserver.clone();
        ks.redeem_grant(kpb::RedeemGrantRequest {
            request_id: rid.to_owned(),
            on_behalf_of: caller.to_owned(),
            study_id: study.to_owned(),
        })
        .await
        .map_err(|s| GatewayError::upstream("keyserver", s))?;
        Ok(())
    }

    /// Fetches both shares in parallel. A stopped node is UNAVAILABLE naming
    /// it. A share whose bytes differ from what was stored is still passed
    /// on: the watermark check localizes the damage.
    pub(crate) async fn fetch_shares(&self, rec: &StudyRecord) -> Result<Vec<Vec<u8>>> {
        let limit = rec.spec.to_spec().byte_len() as u64 * 2 + (1 << 20);
        self.fetch_objects(&rec.study_id, &rec.placements, limit)
            .await
    }

    /// Fetches objects in parallel (each at most `limit` bytes).
    pub(crate) async fn fetch_objects(
        &self,
        label: &str,
        placements: &[SharePlacement],
        limit: u64,
    ) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .fetch_objects_reported(label, placements, limit, false)
            .await?
            .0)
    }

    /// [`Self::fetch_objects`], also naming the erasure-coded fragments that
    /// were missing, unreachable or corrupt (rebuilt from the others).
    pub(crate) async fn fetch_objects_reported(
        &self,
        label: &str,
        placements: &[SharePlacement],
        limit: u64,
        thorough: bool,
    ) -> Result<(Vec<Vec<u8>>, Vec<crate::durability::FragmentProblem>)> {
        let mut tasks = Vec::with_capacity(placements.len());
        for p in placements {
            let this = self.clone();
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                this.read_object(&p, limit, thorough).await
            }));
        }
        let mut objects = Vec::with_capacity(tasks.len());
        let mut problems = Vec::new();
        for t in tasks {
            let (data, mut pr) = t
                .await
                .map_err(|e| GatewayError::Internal(format!("fetch task ({label}): {e}")))??;
            objects.push(data);
            problems.append(&mut pr);
        }
        Ok((objects, problems))
    }

    fn open_messages<T>(
        study: wpb::StudyRef,
        header_json: String,
        shares: Vec<Vec<u8>>,
        start: impl Fn(wpb::OpenStart) -> T,
        chunk: impl Fn(wpb::ShareChunk) -> T,
    ) -> Vec<T> {
        let mut msgs = vec![start(wpb::OpenStart {
            study: Some(study),
            header_json,
        })];
        for (i, s) in shares.iter().enumerate() {
            for c in convert::chunks(s) {
                msgs.push(chunk(wpb::ShareChunk {
                    share: i as u32 + 1,
                    data: c,
                }));
            }
        }
        msgs
    }

    /// Restores the pixels through the watermark service; the report says
    /// which blocks and tiles were tampered with.
    pub(crate) async fn restore(
        &self,
        rec: &StudyRecord,
        shares: Vec<Vec<u8>>,
    ) -> Result<(wpb::VerificationReport, Vec<u8>)> {
        let want = rec.spec.to_spec().byte_len();
        self.restore_parts(study_ref(rec), rec.header_json.clone(), want, shares)
            .await
    }

    /// Restores `want` pixel bytes from the shares of one object.
    pub(crate) async fn restore_parts(
        &self,
        study: wpb::StudyRef,
        header_json: String,
        want: usize,
        shares: Vec<Vec<u8>>,
    ) -> Result<(wpb::VerificationReport, Vec<u8>)> {
        let msgs = Self::open_messages(
            study,
            header_json,
            shares,
            |s| wpb::RestoreRequest {
                msg: Some(wpb::restore_request::Msg::Start(s)),
            },
            |c| wpb::RestoreRequest {
                msg: Some(wpb::restore_request::Msg::Share(c)),
            },
        );
        let wm = |s: Status| GatewayError::upstream("watermark", s);
        let mut out = self
            .inner
            .up
            .watermark
            .clone()
            .restore(tokio_stream::iter(msgs))
            .await
            .map_err(wm)?
            .into_inner();
        let restored = match out.message().await.map_err(wm)? {
            Some(wpb::RestoreResponse {
                msg: Some(wpb::restore_response::Msg::Restored(r)),
            }) => r,
            Some(_) | None => return Err(wm(Status::internal("restore: no header first"))),
        };
        let mut pixels = Vec::with_capacity(want);
        while let Some(m) = out.message().await.map_err(wm)? {
            match m.msg {
                Some(wpb::restore_response::Msg::Pixels(p)) => {
                    if pixels.len() + p.len() > want {
                        return Err(wm(Status::internal(
                            "restore: more pixels than the study has",
                        )));
                    }
                    pixels.extend_from_slice(&p);
                }
                Some(wpb::restore_response::Msg::Restored(_)) | None => {
                    return Err(wm(Status::internal("restore: unexpected message")));
                }
            }
        }
        if pixels.len() != want {
            return Err(wm(Status::internal(
                "restore: fewer pixels than the study has",
            )));
        }
        Ok((restored.report.unwrap_or_default(), pixels))
    }

    async fn verify_shares(
        &self,
        rec: &StudyRecord,
        shares: Vec<Vec<u8>>,
    ) -> Result<wpb::VerificationReport> {
        self.verify_parts(study_ref(rec), rec.header_json.clone(), shares)
            .await
    }

    /// The watermark check of one object's shares.
    pub(crate) async fn verify_parts(
        &self,
        study: wpb::StudyRef,
        header_json: String,
        shares: Vec<Vec<u8>>,
    ) -> Result<wpb::VerificationReport> {
        let msgs = Self::open_messages(
            study,
            header_json,
            shares,
            |s| wpb::VerifyRequest {
                msg: Some(wpb::verify_request::Msg::Start(s)),
            },
            |c| wpb::VerifyRequest {
                msg: Some(wpb::verify_request::Msg::Share(c)),
            },
        );
        let r = self
            .inner
            .up
            .watermark
            .clone()
            .verify(tokio_stream::iter(msgs))
            .await
            .map_err(|s| GatewayError::upstream("watermark", s))?
            .into_inner();
        Ok(r.report.unwrap_or_default())
    }

    pub(crate) async fn committed(&self, handle: &str) -> Result<StudyRecord> {
        let h = handle.to_owned();
        with_vault(&self.inner.vault, move |v| v.committed(&h)).await
    }

    /// A committed study of one image (not a DICOM study).
    pub(crate) async fn committed_image(&self, handle: &str) -> Result<StudyRecord> {
        let rec = self.committed(handle).await?;
        if rec.is_dicom() {
            return Err(GatewayError::WrongKind(format!(
                "study {handle} holds DICOM instances: use RetrieveDicom"
            )));
        }
        Ok(rec)
    }

    // ---- handlers ---------------------------------------------------------

    async fn request_access_inner(
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
        let rec = self.committed(&r.study_handle).await?;
        let mut ks = self.inner.up.keyserver.clone();
        let resp = ks
            .request_key(kpb::RequestKeyRequest {
                study_id: rec.study_id.clone(),
                attributes: attributes_to_proto(&rec.attributes),
                purpose: PURPOSE_PIXELS.into(),
                justification: r.justification,
                on_behalf_of: caller,
            })
            .await
            .map_err(|s| GatewayError::upstream("keyserver", s))?
            .into_inner();
        Ok(pb::RequestAccessResponse {
            request: resp.request,
        })
    }

    async fn retrieve_inner(
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
        let mut msgs = vec![Ok(pb::RetrieveResponse {
            part: Some(pb::retrieve_response::Part::Header(header)),
        })];
        msgs.extend(convert::chunks(&pixels).map(|c| {
            Ok(pb::RetrieveResponse {
                part: Some(pb::retrieve_response::Part::Chunk(c)),
            })
        }));
        Ok(Box::pin(tokio_stream::iter(msgs)))
    }

    async fn verify_inner(
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

    async fn locate_inner(
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
    async fn fetch_share_inner(
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
        let msgs: Vec<_> = convert::chunks(&data)
            .map(|c| Ok(pb::FetchShareResponse { chunk: c }))
            .collect();
        Ok(Box::pin(tokio_stream::iter(msgs)))
    }

    /// The background repairer: a scrub-and-repair pass over every object
    /// every `interval`, at most `per_sec` objects a second. Runs until the
    /// task is aborted (gateway shutdown).
    pub async fn repair_forever(self, interval: std::time::Duration, per_sec: u32) {
        loop {
            tokio::time::sleep(interval).await;
            match self
                .repair_pass(
                    pb::RepairRequest {
                        study_handle: String::new(),
                        dry_run: false,
                        evacuate_node: String::new(),
                    },
                    Some(per_sec),
                )
                .await
            {
                Ok(r) if r.failures.is_empty() => tracing::info!(
                    objects = r.objects,
                    rebuilt = r.fragments_rebuilt,
                    missing = r.fragments_missing,
                    corrupt = r.fragments_corrupt,
                    "background repair pass"
                ),
                Ok(r) => {
                    tracing::warn!(failures = ?r.failures, rebuilt = r.fragments_rebuilt, "background repair pass left objects short")
                }
                Err(e) => tracing::warn!(error = %e, "background repair pass failed"),
            }
        }
    }

    async fn repair_inner(&self, r: pb::RepairRequest) -> Result<pb::RepairResponse> {
        self.repair_pass(r, None).await
    }

    /// One scrub (and, unless `dry_run`, repair) pass; `rate` bounds the
    /// objects checked per second.
    async fn repair_pass(
        &self,
        r: pb::RepairRequest,
        rate: Option<u32>,
    ) -> Result<pb::RepairResponse> {
        let pause = rate.map(|n| std::time::Duration::from_secs_f64(1.0 / f64::from(n.max(1))));
        let ids = if r.study_handle.is_empty() {
            with_vault(&self.inner.vault, |v| v.committed_ids()).await?
        } else {
            check_handle("study_handle", &r.study_handle)?;
            vec![self.committed(&r.study_handle).await?.study_id]
        };
        if !r.evacuate_node.is_empty() {
            self.inner.up.node(&r.evacuate_node)?;
        }
        let evacuate = (!r.evacuate_node.is_empty()).then_some(r.evacuate_node.as_str());
        let (healthy, _) = self.inner.up.probe().await;
        let mut tally = crate::durability::RepairTally::default();
        for id in &ids {
            // A study deleted meanwhile is skipped, not an error.
            let Ok(mut rec) = self.committed(id).await else {
                continue;
            };
            let pass = crate::durability::Pass {
                healthy: &healthy,
                evacuate,
                dry_run: r.dry_run,
                pause,
            };
            if self
                .repair_placements(&mut rec.placements, &pass, &mut tally)
                .await
            {
                let rr = rec.clone();
                with_vault(&self.inner.vault, move |v| v.put(&rr)).await?;
            }
            if rec.is_dicom() {
                for mut inst in self.committed_instances(&rec).await? {
                    if self
                        .repair_placements(&mut inst.placements, &pass, &mut tally)
                        .await
                    {
                        with_vault(&self.inner.vault, move |v| v.put_instance(&inst)).await?;
                    }
                }
            }
        }
        tracing::info!(
            studies = ids.len(),
            objects = tally.objects,
            rebuilt = tally.rebuilt,
            moved = tally.moved,
            failures = tally.failures.len(),
            dry_run = r.dry_run,
            "repair pass"
        );
        Ok(pb::RepairResponse {
            studies: ids.len() as u64,
            objects: tally.objects,
            fragments_checked: tally.checked,
            fragments_missing: tally.missing,
            fragments_corrupt: tally.corrupt,
            fragments_unreachable: tally.unreachable,
            fragments_rebuilt: tally.rebuilt,
            fragments_moved: tally.moved,
            failures: tally.failures,
            actions: tally.actions,
        })
    }

    async fn delete_inner(
        &self,
        caller: String,
        r: pb::DeleteStudyRequest,
    ) -> Result<pb::DeleteStudyResponse> {
        check_handle("study_handle", &r.study_handle)?;
        let h = r.study_handle.clone();
        let rec = with_vault(&self.inner.vault, move |v| v.get(&h))
            .await?
            .filter(|r| r.state != StudyState::Pending)
            .ok_or_else(|| GatewayError::NotFound(format!("study {}", r.study_handle)))?;
        if rec.owner != caller {
            return Err(crate::access::refuse(
                "Delete",
                &caller,
                format!("only the study's owner may delete {}", rec.study_id),
            ));
        }
        // Invisible from now on; a failure below leaves it `Deleting` and a
        // second Delete (or the next start) finishes the job.
        let mut deleting = rec.clone();
        deleting.state = StudyState::Deleting;
        with_vault(&self.inner.vault, move |v| v.put(&deleting)).await?;
        let mut removed: Vec<pb::Placement> =
            rec.placements.iter().map(placement_to_proto).collect();
        if rec.is_dicom() {
            removed.extend(self.delete_instances(&rec).await?);
        }
        for p in &rec.placements {
            self.delete_placement(p).await?;
        }
        self.forget(&rec).await?;
        let r = rec.clone();
        with_vault(&self.inner.vault, move |v| {
            if r.is_dicom() {
                v.remove_dicom_study(&r)
            } else {
                v.remove(&r.study_id)
            }
        })
        .await?;
        tracing::info!(study = %rec.study_id, "deleted and key material destroyed");
        Ok(pb::DeleteStudyResponse {
            removed,
            key_destroyed: true,
        })
    }
}

/// The study reference the watermark service derives the key with.
pub(crate) fn study_ref(rec: &StudyRecord) -> wpb::StudyRef {
    wpb::StudyRef {
        study_id: rec.study_id.clone(),
        attributes: attributes_to_proto(&rec.attributes),
    }
}

pub(crate) fn stream_err(s: Status) -> GatewayError {
    match s.code() {
        Code::ResourceExhausted | Code::OutOfRange => GatewayError::TooLarge(s.message().into()),
        Code::DeadlineExceeded => GatewayError::Idle(s.message().into()),
        Code::Ok
        | Code::Cancelled
        | Code::Unknown
        | Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unavailable
        | Code::DataLoss
        | Code::Unauthenticated => {
            GatewayError::InvalidArgument(format!("request stream: {}", s.message()))
        }
    }
}

/// The first message of an upload stream, which must be its header.
pub(crate) async fn first_header<M, H>(
    stream: &mut IdleStream<M>,
    header: impl Fn(M) -> Option<H>,
) -> Result<H> {
    match stream.message().await.map_err(stream_err)? {
        Some(m) => header(m).ok_or_else(|| {
            GatewayError::InvalidArgument("the first message must be the header".into())
        }),
        None => Err(GatewayError::InvalidArgument("empty request stream".into())),
    }
}

/// What a message of an upload stream after its header carries.
pub(crate) enum Part {
    Chunk(Vec<u8>),
    Header,
    Empty,
}

/// Reads exactly `size` bytes of chunks, refusing more before storing them.
pub(crate) async fn read_exact<M>(
    stream: &mut IdleStream<M>,
    size: u64,
    part: impl Fn(M) -> Part,
) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size as usize);
    while let Some(m) = stream.message().await.map_err(stream_err)? {
        match part(m) {
            Part::Chunk(c) => {
                if c.len() > convert::CHUNK_BYTES {
                    return Err(GatewayError::InvalidArgument(format!(
                        "chunk: {} bytes, at most {} per message",
                        c.len(),
                        convert::CHUNK_BYTES
                    )));
                }
                if data.len() as u64 + c.len() as u64 > size {
                    return Err(GatewayError::InvalidArgument(format!(
                        "chunk: more than the {size} bytes header.size declares"
                    )));
                }
                data.extend_from_slice(&c);
            }
            Part::Header => {
                return Err(GatewayError::InvalidArgument("header: sent twice".into()));
            }
            Part::Empty => {
                return Err(GatewayError::InvalidArgument("chunk: empty message".into()));
            }
        }
    }
    if data.len() as u64 != size {
        return Err(GatewayError::InvalidArgument(format!(
            "chunk: {} bytes received, header.size declares {size}",
            data.len()
        )));
    }
    Ok(data)
}

/// The pixel bytes a store will hold: raw declares them; PNG/TIFF are
/// charged at their file size here and checked after decoding.
fn pixel_estimate(plan: &StorePlan) -> u64 {
    plan.raw_spec.map_or(plan.size, |s| s.byte_len() as u64)
}

/// Decodes the file on a blocking thread.
async fn decode(plan: &StorePlan, file: Vec<u8>) -> Result<Image> {
    let format = plan.format;
    let raw = plan.raw_spec;
    tokio::task::spawn_blocking(move || match (format, raw) {
        (pb::ImageFormat::Raw, Some(spec)) => tessera_image::codec::decode_raw(spec, &file),
        (pb::ImageFormat::Png | pb::ImageFormat::Tiff, _) => tessera_image::codec::decode(&file),
        (pb::ImageFormat::Raw | pb::ImageFormat::Unspecified | pb::ImageFormat::Dicom, _) => Err(
            tessera_image::ImageError::Codec("no spec for raw pixels".into()),
        ),
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("decode task: {e}")))?
    .map_err(|e| GatewayError::InvalidArgument(format!("chunk: the file does not decode: {e}")))
}

pub(crate) fn caller_uri<T>(req: &Request<T>) -> Result<String, Status> {
    Ok(tessera_tls::caller(req)?.uri())
}

#[tonic::async_trait]
impl Gateway for GatewayService {
    async fn store(
        &self,
        request: Request<Streaming<pb::StoreRequest>>,
    ) -> Result<Response<pb::StoreResponse>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.store_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }

    async fn request_access(
        &self,
        request: Request<pb::RequestAccessRequest>,
    ) -> Result<Response<pb::RequestAccessResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.request_access_inner(caller, request.into_inner())
                .await?,
        ))
    }

    type RetrieveStream = BoxStream<pb::RetrieveResponse>;

    async fn retrieve(
        &self,
        request: Request<pb::RetrieveRequest>,
    ) -> Result<Response<Self::RetrieveStream>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.retrieve_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyStudyRequest>,
    ) -> Result<Response<pb::VerifyStudyResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.verify_inner(caller, request.into_inner()).await?,
        ))
    }

    type ProcessStream = BoxStream<pb::ProcessResponse>;

    async fn process(
        &self,
        request: Request<pb::ProcessRequest>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.process_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.locate_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn repair(
        &self,
        request: Request<pb::RepairRequest>,
    ) -> Result<Response<pb::RepairResponse>, Status> {
        Ok(Response::new(
            self.repair_inner(request.into_inner()).await?,
        ))
    }

    type FetchShareStream = BoxStream<pb::FetchShareResponse>;

    async fn fetch_share(
        &self,
        request: Request<pb::FetchShareRequest>,
    ) -> Result<Response<Self::FetchShareStream>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.fetch_share_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteStudyRequest>,
    ) -> Result<Response<pb::DeleteStudyResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.delete_inner(caller, request.into_inner()).await?,
        ))
    }

    async fn store_dicom(
        &self,
        request: Request<Streaming<pb::StoreDicomRequest>>,
    ) -> Result<Response<pb::StoreDicomResponse>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.store_dicom_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }

    async fn find_dicom_study(
        &self,
        request: Request<pb::FindDicomStudyRequest>,
    ) -> Result<Response<pb::FindDicomStudyResponse>, Status> {
        let caller = caller_uri(&request)?;
        Ok(Response::new(
            self.find_dicom_study_inner(caller, request.into_inner())
                .await?,
        ))
    }

    type RetrieveDicomStream = BoxStream<pb::RetrieveDicomResponse>;

    async fn retrieve_dicom(
        &self,
        request: Request<pb::RetrieveRequest>,
    ) -> Result<Response<Self::RetrieveDicomStream>, Status> {
        let caller = caller_uri(&request)?;
        let roles = tessera_tls::caller_roles(&request);
        Ok(Response::new(
            self.retrieve_dicom_inner(caller, roles, request.into_inner())
                .await?,
        ))
    }
}
