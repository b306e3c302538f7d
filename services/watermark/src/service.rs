//! The gRPC edge: reads the request streams with bounded buffers, derives
//! the study key, runs the core on a blocking thread and streams the result
//! back in chunks. Role checks happen before this in the
//! `tessera_tls::AuthzLayer` driven by [`policy`]; the caller allow-list is
//! checked here, first thing in every handler (fail closed).

use std::pin::Pin;
use std::sync::Arc;

use tessera_cryptomark::layout::Layout;
use tessera_cryptomark::{Header, ProtectKey, RestoreKey, SHARE_PREAMBLE};
use tessera_proto::watermark::v1 as pb;
use tessera_proto::watermark::v1::watermark_server::{Watermark, WatermarkServer};
use tessera_runtime::IdleStream;
use tessera_tls::{CallerAllowList, Policy};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use tessera_wire::report::report_to_proto;
use tessera_wire::stream::owned_chunks as chunks;

use crate::convert::{self, CHUNK_BYTES, MAX_REQUEST_MESSAGE, OpenPlan, ProtectPlan};
use crate::error::WatermarkError;
use crate::keys::{KeyClient, Purpose};
use crate::pixels::{SampleSink, image_chunks};

/// gRPC service name, for the policy table and health.
pub const SERVICE: &str = "tessera.watermark.v1.Watermark";

/// Responses are chunks of at most 1 MiB plus framing.
pub const MAX_RESPONSE_MESSAGE: usize = CHUNK_BYTES + 64 * 1024;

/// Slack for per-tile tags and padding when bounding a share from its header
/// (the core then checks the exact length).
const SHARE_SLACK_PER_TILE: u64 = 64;

/// The policy table: the gateway only (the matrix); [`WatermarkService`] narrows it
/// to the configured callers.
pub fn policy() -> Policy {
    Policy::for_service(SERVICE)
}

type Result<T, E = WatermarkError> = std::result::Result<T, E>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Settings the handlers need.
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
pub struct WatermarkService {
    keys: KeyClient,
    limits: Arc<Limits>,
    jobs: Arc<Semaphore>,
}

impl WatermarkService {
    pub fn new(keys: KeyClient, limits: Limits, max_jobs: usize) -> Self {
        Self {
            keys,
            limits: Arc::new(limits),
            jobs: Arc::new(Semaphore::new(max_jobs)),
        }
    }

    /// The generated server with explicit message limits.
    pub fn into_server(self) -> WatermarkServer<Self> {
        WatermarkServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_MESSAGE)
            .max_encoding_message_size(MAX_RESPONSE_MESSAGE)
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.limits.allowed_callers.check(request, |who| {
            WatermarkError::CallerNotAllowed(format!("{who} may not call {SERVICE}"))
        })
    }

    async fn job_permit(&self) -> Result<OwnedSemaphorePermit> {
        self.jobs
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| WatermarkError::Internal("job semaphore closed".into()))
    }

    fn check_image_size(&self, field: &str, bytes: u64) -> Result<()> {
        if bytes > self.limits.max_image_bytes {
            return Err(WatermarkError::TooLarge(format!(
                "{field}: image of {bytes} bytes exceeds the limit of {} bytes",
                self.limits.max_image_bytes
            )));
        }
        Ok(())
    }

    async fn protect_inner(
        &self,
        stream: Streaming<pb::ProtectRequest>,
    ) -> Result<BoxStream<pb::ProtectResponse>> {
        let mut stream = IdleStream::new(stream, self.limits.stream_idle);
        let plan = match next(&mut stream).await? {
            Some(pb::ProtectRequest {
                msg: Some(pb::protect_request::Msg::Start(s)),
            }) => ProtectPlan::try_from(s)?,
            Some(_) => return Err(first_not_start()),
            None => return Err(empty_stream()),
        };
        let want = plan.pixel_bytes();
        self.check_image_size("start.spec", want)?;
        // Refuse wrong attributes before a single pixel is received.
        let key = self.keys.derive(&plan.study, Purpose::Protect).await?;
        let _permit = self.job_permit().await?;
        // Decoded into samples as the chunks arrive: the image is held
        // once, not as bytes and then as samples.
        let mut pixels = SampleSink::new(&plan.spec);
        let mut received = 0u64;
        while let Some(m) = next(&mut stream).await? {
            match m.msg {
                Some(pb::protect_request::Msg::Pixels(chunk)) => {
                    check_chunk("pixels", chunk.len())?;
                    if received + chunk.len() as u64 > want {
                        return Err(WatermarkError::InvalidArgument(format!(
                            "pixels: more than the {want} bytes start.spec declares"
                        )));
                    }
                    received += chunk.len() as u64;
                    pixels.push(&chunk);
                }
                Some(pb::protect_request::Msg::Start(_)) => return Err(second_start()),
                None => return Err(empty_message()),
            }
        }
        if received != want {
            return Err(WatermarkError::InvalidArgument(format!(
                "pixels: received {received} bytes, start.spec declares {want}"
            )));
        }
        let protected = tokio::task::spawn_blocking(move || -> Result<_> {
            let image = pixels
                .finish(plan.spec)
                .map_err(|e| WatermarkError::InvalidArgument(format!("pixels: {e}")))?;
            let salt = tessera_cryptomark::random_salt()?;
            Ok(tessera_cryptomark::protect(
                &image,
                plan.roi,
                &plan.object_id,
                ProtectKey::Secure { key: &key, salt },
            )?)
        })
        .await
        .map_err(|e| WatermarkError::Internal(format!("protect task: {e}")))??;
        let [s1, s2] = protected.shares;
        let first = pb::ProtectResponse {
            msg: Some(pb::protect_response::Msg::Header(pb::ProtectHeader {
                header_json: protected.header.to_json(),
                share1_bytes: s1.len() as u64,
                share2_bytes: s2.len() as u64,
            })),
        };
        let share = |share: u32| {
            move |data: Vec<u8>| pb::ProtectResponse {
                msg: Some(pb::protect_response::Msg::Share(pb::ShareChunk {
                    share,
                    data,
                })),
            }
        };
        let out = std::iter::once(first)
            .chain(chunks(s1).map(share(1)))
            .chain(chunks(s2).map(share(2)))
            .map(Ok);
        Ok(Box::pin(tokio_stream::iter(out)))
    }

    /// Reads an Open stream (start, then share chunks), derives the key and
    /// runs the core's restore.
    async fn open<M: OpenMessage>(
        &self,
        stream: Streaming<M>,
    ) -> Result<tessera_cryptomark::Restored> {
        let mut stream = IdleStream::new(stream, self.limits.stream_idle);
        let plan = match next(&mut stream).await? {
            Some(m) => match m.into_part() {
                Some(OpenPart::Start(s)) => OpenPlan::try_from(s)?,
                Some(OpenPart::Share(_)) => return Err(first_not_start()),
                None => return Err(empty_message()),
            },
            None => return Err(empty_stream()),
        };
        let image_bytes = plan.header.spec.byte_len() as u64;
        self.check_image_size("start.header_json", image_bytes)?;
        let bound = share_bound(&plan.header);
        let key = self.keys.derive(&plan.study, Purpose::Restore).await?;
        let _permit = self.job_permit().await?;
        // Reserved at the header's bound (address space only until bytes
        // arrive): growing by doubling would copy each share on the way.
        let cap = usize::try_from(bound).unwrap_or(0);
        let mut shares: [Vec<u8>; 2] = [Vec::with_capacity(cap), Vec::with_capacity(cap)];
        while let Some(m) = next(&mut stream).await? {
            match m.into_part() {
                Some(OpenPart::Share(c)) => {
                    check_chunk("share.data", c.data.len())?;
                    let buf = match c.share {
                        1 => &mut shares[0],
                        2 => &mut shares[1],
                        other => {
                            return Err(WatermarkError::InvalidArgument(format!(
                                "share.share must be 1 or 2, got {other}"
                            )));
                        }
                    };
                    if buf.len() as u64 + c.data.len() as u64 > bound {
                        return Err(WatermarkError::InvalidArgument(format!(
                            "share {}: more than the {bound} bytes the header allows",
                            c.share
                        )));
                    }
                    buf.extend_from_slice(&c.data);
                }
                Some(OpenPart::Start(_)) => return Err(second_start()),
                None => return Err(empty_message()),
            }
        }
        for (i, s) in shares.iter().enumerate() {
            if s.is_empty() {
                return Err(WatermarkError::InvalidArgument(format!(
                    "share {} is missing",
                    i + 1
                )));
            }
        }
        let header = plan.header;
        tokio::task::spawn_blocking(move || {
            let [s1, s2] = &shares;
            Ok(tessera_cryptomark::restore(
                &header,
                s1,
                s2,
                RestoreKey::Secure(&key),
            )?)
        })
        .await
        .map_err(|e| WatermarkError::Internal(format!("restore task: {e}")))?
    }
}

#[tonic::async_trait]
impl Watermark for WatermarkService {
    type ProtectStream = BoxStream<pb::ProtectResponse>;
    type RestoreStream = BoxStream<pb::RestoreResponse>;

    async fn protect(
        &self,
        request: Request<Streaming<pb::ProtectRequest>>,
    ) -> Result<Response<Self::ProtectStream>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(
            self.protect_inner(request.into_inner()).await?,
        ))
    }

    async fn restore(
        &self,
        request: Request<Streaming<pb::RestoreRequest>>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        self.authorize(&request)?;
        let restored = self.open(request.into_inner()).await?;
        let first = pb::RestoreResponse {
            msg: Some(pb::restore_response::Msg::Restored(pb::Restored {
                spec: Some(convert::spec_to_proto(restored.image.spec())),
                report: Some(report_to_proto(&restored.report)),
            })),
        };
        // Encoded one chunk at a time as the answer goes out.
        let out = std::iter::once(first)
            .chain(
                image_chunks(restored.image).map(|data| pb::RestoreResponse {
                    msg: Some(pb::restore_response::Msg::Pixels(data)),
                }),
            )
            .map(Ok);
        Ok(Response::new(Box::pin(tokio_stream::iter(out))))
    }

    async fn verify(
        &self,
        request: Request<Streaming<pb::VerifyRequest>>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        self.authorize(&request)?;
        let restored = self.open(request.into_inner()).await?;
        Ok(Response::new(pb::VerifyResponse {
            report: Some(report_to_proto(&restored.report)),
        }))
    }

    async fn forget_study(
        &self,
        request: Request<pb::ForgetStudyRequest>,
    ) -> Result<Response<pb::ForgetStudyResponse>, Status> {
        self.authorize(&request)?;
        let study_id = request.into_inner().study_id;
        if study_id.is_empty() {
            return Err(WatermarkError::InvalidArgument("study_id: empty".into()).into());
        }
        let dropped = self.keys.forget(&study_id);
        tracing::info!(study = %study_id, dropped, "protect keys of a forgotten study dropped");
        Ok(Response::new(pb::ForgetStudyResponse {
            keys_dropped: u32::try_from(dropped).unwrap_or(u32::MAX),
        }))
    }
}

/// The two request types of Restore and Verify, which carry the same parts.
enum OpenPart {
    Start(pb::OpenStart),
    Share(pb::ShareChunk),
}

trait OpenMessage: Send + 'static {
    fn into_part(self) -> Option<OpenPart>;
}

impl OpenMessage for pb::RestoreRequest {
    fn into_part(self) -> Option<OpenPart> {
        self.msg.map(|m| match m {
            pb::restore_request::Msg::Start(s) => OpenPart::Start(s),
            pb::restore_request::Msg::Share(c) => OpenPart::Share(c),
        })
    }
}

impl OpenMessage for pb::VerifyRequest {
    fn into_part(self) -> Option<OpenPart> {
        self.msg.map(|m| match m {
            pb::verify_request::Msg::Start(s) => OpenPart::Start(s),
            pb::verify_request::Msg::Share(c) => OpenPart::Share(c),
        })
    }
}

async fn next<T>(stream: &mut IdleStream<T>) -> Result<Option<T>> {
    stream.message().await.map_err(WatermarkError::Stream)
}

/// Largest plausible share for a validated header: the packed image, tags
/// and padding per tile, and the preamble. Bounds buffering; the core checks
/// the exact length.
fn share_bound(header: &Header) -> u64 {
    let tiles = Layout::new(header).tile_count();
    header.spec.byte_len() as u64 + tiles * SHARE_SLACK_PER_TILE + SHARE_PREAMBLE as u64
}

fn check_chunk(field: &str, len: usize) -> Result<()> {
    if len == 0 || len > CHUNK_BYTES {
        return Err(WatermarkError::InvalidArgument(format!(
            "{field}: chunks must be 1..={CHUNK_BYTES} bytes, got {len}"
        )));
    }
    Ok(())
}

fn first_not_start() -> WatermarkError {
    WatermarkError::InvalidArgument("the first message must be `start`".into())
}
fn second_start() -> WatermarkError {
    WatermarkError::InvalidArgument("`start` may appear only once, first".into())
}
fn empty_stream() -> WatermarkError {
    WatermarkError::InvalidArgument("empty request stream: send `start` first".into())
}
fn empty_message() -> WatermarkError {
    WatermarkError::InvalidArgument("message with no `msg` set".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_tls::Role;

    #[test]
    fn policy_admits_the_gateway_only() {
        let p = policy();
        let roles = p.allowed(&format!("/{SERVICE}/Protect")).unwrap();
        assert_eq!(
            roles.iter().copied().collect::<Vec<_>>(),
            vec![Role::Gateway]
        );
    }
}
