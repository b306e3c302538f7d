//! The gRPC edge: reads the request stream with a buffer bounded by the
//! declared spec, runs GA-ES and the fragment cut on a blocking thread
//! (at most `max_concurrent_jobs` at once) and streams the summary and the
//! fragments back in chunks. Role checks happen before this in the
//! `tessera_tls::AuthzLayer` driven by [`policy`]; the caller allow-list is
//! checked here, first thing in the handler (fail closed).

use std::pin::Pin;
use std::sync::Arc;

use tessera_image::Image;
use tessera_proto::segmentation::v1 as pb;
use tessera_proto::segmentation::v1::segmentation_server::{Segmentation, SegmentationServer};
use tessera_runtime::IdleStream;
use tessera_tls::{CallerAllowList, Policy};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use tessera_wire::{CHUNK_BYTES, fragment_messages, summary_to_proto};

use crate::convert::{MAX_REQUEST_MESSAGE, MAX_RESPONSE_MESSAGE, SegmentPlan, fragment_samples};
use crate::error::SegmentationError;

/// gRPC service name, for the policy table and health.
pub const SERVICE: &str = "tessera.segmentation.v1.Segmentation";

/// Fragments may hold at most this many times `max_image_bytes` (halos
/// overlap; tiny blocks with a wide halo multiply the pixels).
pub const FRAGMENT_EXPANSION: u64 = 4;

/// The policy table: the gateway only (the matrix); [`SegmentationService`] narrows
/// it to the configured callers.
pub fn policy() -> Policy {
    Policy::for_service(SERVICE)
}

type Result<T, E = SegmentationError> = std::result::Result<T, E>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Settings the handler needs.
#[derive(Clone, Debug)]
pub struct Limits {
    pub allowed_callers: CallerAllowList,
    pub max_image_bytes: u64,
    /// A request stream that sends nothing this long ends with
    /// DEADLINE_EXCEEDED (`server.stream_idle_timeout_secs`).
    pub stream_idle: std::time::Duration,
}

/// The tonic service.
#[derive(Clone)]
pub struct SegmentationService {
    limits: Arc<Limits>,
    jobs: Arc<Semaphore>,
}

impl SegmentationService {
    pub fn new(limits: Limits, max_jobs: usize) -> Self {
        Self {
            limits: Arc::new(limits),
            jobs: Arc::new(Semaphore::new(max_jobs)),
        }
    }

    /// The generated server with explicit message limits.
    pub fn into_server(self) -> SegmentationServer<Self> {
        SegmentationServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(MAX_RESPONSE_MESSAGE)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.limits.allowed_callers.check(request, |who| {
            SegmentationError::CallerNotAllowed(format!("{who} may not call {SERVICE}"))
        })
    }

    async fn job_permit(&self) -> Result<OwnedSemaphorePermit> {
        self.jobs
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SegmentationError::Internal("job semaphore closed".into()))
    }

    async fn segment_inner(
        &self,
        stream: Streaming<pb::SegmentRequest>,
    ) -> Result<BoxStream<pb::SegmentResponse>> {
        let mut stream = IdleStream::new(stream, self.limits.stream_idle);
        let plan = match next(&mut stream).await? {
            Some(pb::SegmentRequest {
                msg: Some(pb::segment_request::Msg::Start(s)),
            }) => SegmentPlan::try_from(s)?,
            Some(pb::SegmentRequest {
                msg: Some(pb::segment_request::Msg::Pixels(_)),
            }) => {
                return Err(SegmentationError::InvalidArgument(
                    "the first message must be `start`".into(),
                ));
            }
            Some(pb::SegmentRequest { msg: None }) => return Err(empty_message()),
            None => {
                return Err(SegmentationError::InvalidArgument(
                    "empty request stream: send `start` first".into(),
                ));
            }
        };
        let want = plan.pixel_bytes();
        let max = self.limits.max_image_bytes;
        if want > max {
            return Err(SegmentationError::TooLarge(format!(
                "start.spec: image of {want} bytes exceeds the limit of {max} bytes"
            )));
        }
        let _permit = self.job_permit().await?;
        // Grows with what actually arrives (never beyond `want`, which the
        // validated spec and the configured limit bound).
        let mut pixels: Vec<u8> = Vec::new();
        while let Some(m) = next(&mut stream).await? {
            match m.msg {
                Some(pb::segment_request::Msg::Pixels(chunk)) => {
                    if chunk.is_empty() || chunk.len() > CHUNK_BYTES {
                        return Err(SegmentationError::InvalidArgument(format!(
                            "pixels: chunks must be 1..={CHUNK_BYTES} bytes, got {}",
                            chunk.len()
                        )));
                    }
                    if pixels.len() as u64 + chunk.len() as u64 > want {
                        return Err(SegmentationError::InvalidArgument(format!(
                            "pixels: more than the {want} bytes start.spec declares"
                        )));
                    }
                    pixels.extend_from_slice(&chunk);
                }
                Some(pb::segment_request::Msg::Start(_)) => {
                    return Err(SegmentationError::InvalidArgument(
                        "`start` may appear only once, first".into(),
                    ));
                }
                None => return Err(empty_message()),
            }
        }
        if pixels.len() as u64 != want {
            return Err(SegmentationError::InvalidArgument(format!(
                "pixels: received {} bytes, start.spec declares {want}",
                pixels.len()
            )));
        }
        let fragment_limit = max.saturating_mul(FRAGMENT_EXPANSION);
        let (segmentation, fragments) = tokio::task::spawn_blocking(move || -> Result<_> {
            let image = Image::from_le_bytes(plan.spec, &pixels)
                .map_err(|e| SegmentationError::InvalidArgument(format!("pixels: {e}")))?;
            drop(pixels);
            let seg = tessera_segment::segment(&image, &plan.config)?;
            let halo = plan.operation.halo();
            let bytes = fragment_samples(&seg.region_map, halo, image.spec())
                * plan.spec.format.bytes_per_sample() as u64;
            if bytes > fragment_limit {
                return Err(SegmentationError::TooLarge(format!(
                    "start.block_size: the fragments would hold {bytes} bytes, more than \
                     {fragment_limit} ({FRAGMENT_EXPANSION} x max_image_bytes); use larger blocks"
                )));
            }
            let fragments = tessera_segment::make_fragments(&image, &seg.region_map, halo)?;
            Ok((seg, fragments))
        })
        .await
        .map_err(|e| SegmentationError::Internal(format!("segment task: {e}")))??;
        let halo = plan.operation.halo();
        tracing::info!(
            regions = segmentation.region_map.regions,
            fragments = fragments.len(),
            generations = segmentation.generations,
            "segmented"
        );
        let first = summary_to_proto(&segmentation, halo, fragments.len());
        drop(segmentation);
        let out = std::iter::once(first)
            .chain(fragments.into_iter().flat_map(fragment_messages))
            .map(Ok);
        Ok(Box::pin(tokio_stream::iter(out)))
    }
}

#[tonic::async_trait]
impl Segmentation for SegmentationService {
    type SegmentStream = BoxStream<pb::SegmentResponse>;

    async fn segment(
        &self,
        request: Request<Streaming<pb::SegmentRequest>>,
    ) -> Result<Response<Self::SegmentStream>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(
            self.segment_inner(request.into_inner()).await?,
        ))
    }
}

async fn next<T>(stream: &mut IdleStream<T>) -> Result<Option<T>> {
    stream.message().await.map_err(SegmentationError::Stream)
}

fn empty_message() -> SegmentationError {
    SegmentationError::InvalidArgument("message with no `msg` set".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_tls::Role;

    #[test]
    fn policy_admits_the_gateway_only() {
        let p = policy();
        let roles = p.allowed(&format!("/{SERVICE}/Segment")).unwrap();
        assert_eq!(
            roles.iter().copied().collect::<Vec<_>>(),
            vec![Role::Gateway]
        );
    }
}
