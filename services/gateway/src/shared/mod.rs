//! The gateway's shared core: the state every flow works on
//! ([`GatewayService`] over one [`Inner`]), its limits and job permits,
//! vault access off the async threads, and the steps the flows share:
//! upload framing ([`upload`]), study keys and their cache ([`keys`]),
//! node placement ([`placement`]), object puts and fetches (`objects`), the
//! watermark service's protect/restore/verify (`watermark`), and rollback of
//! what a failed or interrupted flow left behind (`cleanup`).
//!
//! Nothing here imports a flow (`crate::flows`) or the gRPC edge
//! (`crate::service`): the layers point one way, flows -> shared.

mod cleanup;
pub mod keys;
mod objects;
pub mod placement;
pub mod upload;
mod watermark;

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};
use tessera_proto::keyserver::v1 as kpb;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::Role;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Status};

use crate::convert::attributes_to_proto;
use crate::error::GatewayError;
use crate::upstream::Upstreams;
use crate::vault::{InstanceRecord, StudyRecord, StudyState, Vault};
use keys::StudyKeys;
use placement::{DistinctNodes, PlacementPolicy};

/// The key purpose of pixel keys and grants.
pub const PURPOSE_PIXELS: &str = "pixels";

/// Shares per study.
pub(crate) const SHARES: usize = 2;

pub(crate) type Result<T, E = GatewayError> = std::result::Result<T, E>;

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Settings the handlers need.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_image_bytes: u64,
    pub reidentify_roles: Vec<Role>,
    /// Retain Longitudinal Temporal Information for de-identified DICOM.
    pub temporal: crate::config::TemporalOption,
    /// Release de-identified copies of Burned In Annotation = YES instances.
    pub deidentify_burned_in: bool,
    /// File an access request for a DICOM retrieve refused for lack of a
    /// grant (`[dicom] file_requests`).
    pub dicom_file_requests: bool,
    /// Erasure coding of stored objects (None: whole objects, one copy).
    pub erasure: Option<crate::config::ErasureSection>,
    /// An upload that sends nothing this long ends with DEADLINE_EXCEEDED,
    /// releasing its job permit (`server.stream_idle_timeout_secs`).
    pub stream_idle: std::time::Duration,
}

impl Limits {
    /// The erasure coding `(k, m)` of stored objects, if any.
    pub fn erasure_scheme(&self) -> Option<(usize, usize)> {
        self.erasure.map(|e| (e.data, e.parity))
    }

    /// The per-object cap every storage node needs for images and DICOM
    /// instances up to `max_image_bytes` ([`crate::sizes`]).
    pub fn node_cap_needed(&self) -> u64 {
        crate::sizes::node_object_bytes_needed(self.max_image_bytes, self.erasure_scheme())
    }
}

/// The shared state behind every handler.
pub struct Inner {
    pub(crate) up: Upstreams,
    pub(crate) vault: Arc<Vault>,
    pub(crate) limits: Limits,
    jobs: Arc<Semaphore>,
    max_jobs: usize,
    /// In-flight memory budget in MiB (an image, its file and its shares
    /// held at once by a job count about four times the image).
    memory_mib: Arc<Semaphore>,
    memory_total_mib: u32,
    pub(crate) placement: Box<dyn PlacementPolicy>,
    rng: SystemRandom,
    pub(crate) keys: StudyKeys,
    /// When this process started (unix seconds): unfinished records older
    /// than this are not in flight here (the repair pass finishes them).
    pub(crate) started_unix: u64,
    /// Scrub and repair counters since start (`/metrics`).
    pub(crate) repair_counters: Arc<crate::durability::counters::RepairCounters>,
    /// Access requests filed for refused DICOM retrieves, by (identity,
    /// study): not filed again while pending (`[dicom] file_requests`).
    pub(crate) filed_requests:
        std::sync::Mutex<std::collections::HashMap<(String, String), String>>,
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
                max_jobs,
                memory_mib: Arc::new(Semaphore::new(memory_mib as usize)),
                memory_total_mib: memory_mib,
                placement: Box::new(DistinctNodes),
                rng: SystemRandom::new(),
                keys: Default::default(),
                started_unix: now_unix(),
                repair_counters: Default::default(),
                filed_requests: Default::default(),
            }),
        }
    }

    /// Job permits held and MiB of the memory budget held, now
    /// (`/metrics`).
    pub fn capacity_in_use(&self) -> (usize, usize) {
        let i = &self.inner;
        (
            i.max_jobs.saturating_sub(i.jobs.available_permits()),
            (i.memory_total_mib as usize).saturating_sub(i.memory_mib.available_permits()),
        )
    }

    /// The vault, for the gauges read at scrape time.
    pub fn vault(&self) -> &Arc<Vault> {
        &self.inner.vault
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
}

/// The study reference the watermark service derives the key with.
pub(crate) fn study_ref(rec: &StudyRecord) -> wpb::StudyRef {
    wpb::StudyRef {
        study_id: rec.study_id.clone(),
        attributes: attributes_to_proto(&rec.attributes),
    }
}

pub(crate) fn caller_uri<T>(req: &Request<T>) -> Result<String, Status> {
    Ok(tessera_tls::caller(req)?.uri())
}

impl GatewayService {
    /// The scrub and repair counters since start.
    pub fn repair_counters(&self) -> Arc<crate::durability::counters::RepairCounters> {
        self.inner.repair_counters.clone()
    }
}
