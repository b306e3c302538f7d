//! The gRPC face of the store: `tessera.storage.v1.StorageNode`, plus
//! `Process`, which applies an operation to one region's fragment in memory
//! (nothing of it is stored or logged).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tessera_proto::storage::v1 as pb;
use tessera_runtime::{DEFAULT_IDLE_TIMEOUT, IdleStream};
use tessera_tls::CallerAllowList;
use tessera_wire::{ProcessDecoder, ProcessLimits, output_messages};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::Error;
use crate::config::{PROCESS_CALLERS, ProcessSection};
use crate::store::{Limits, ObjectMeta, ObjectReader, STORE_CHUNK, Store};

/// Default and maximum page size of `List`.
pub const LIST_LIMIT: usize = 1000;
// A full List page (ids of at most MAX_ID_LEN, a SHA-256, size and time
// per object, with their field overhead) stays far below the message limit.
const _: () =
    assert!(LIST_LIMIT * (crate::store::MAX_ID_LEN + 64) < tessera_runtime::MAX_MESSAGE_BYTES / 4);

/// Chunks a `Get` reads ahead of its reader (each at most [`STORE_CHUNK`]).
pub const GET_CHUNKS_IN_FLIGHT: usize = 2;

/// How many `Get`s run at once, and how long one beyond waits for a slot.
#[derive(Debug)]
struct GetSlots {
    slots: Arc<Semaphore>,
    max: usize,
    wait: Duration,
}

/// `Process` settings: who may call it, and its limits.
#[derive(Debug)]
struct ProcessState {
    allowed_callers: CallerAllowList,
    limits: ProcessLimits,
    slots: Arc<Semaphore>,
}

impl ProcessState {
    fn new(s: &ProcessSection) -> Self {
        Self {
            allowed_callers: CallerAllowList::new(PROCESS_CALLERS, s.allowed_callers.clone()),
            limits: ProcessLimits::new(s.max_fragment_bytes),
            slots: Arc::new(Semaphore::new(s.max_concurrent)),
        }
    }
}

/// The service implementation, shared across connections.
#[derive(Clone, Debug)]
pub struct StorageService {
    store: Arc<Store>,
    node_id: String,
    put_slots: Arc<Semaphore>,
    gets: Arc<GetSlots>,
    idle: Duration,
    process: Arc<ProcessState>,
}

impl StorageService {
    /// A service with the default `[process]` settings (the gateway only,
    /// 256 MiB fragments, 2 at once), 16 `Get`s at once waiting 5 s for a
    /// slot, and the default stream idle timeout; see [`Self::with_process`],
    /// [`Self::with_gets`], [`Self::with_idle_timeout`].
    pub fn new(store: Arc<Store>, node_id: String, max_concurrent_puts: usize) -> Self {
        Self {
            store,
            node_id,
            put_slots: Arc::new(Semaphore::new(max_concurrent_puts)),
            gets: Arc::new(GetSlots {
                slots: Arc::new(Semaphore::new(16)),
                max: 16,
                wait: Duration::from_secs(5),
            }),
            idle: DEFAULT_IDLE_TIMEOUT,
            process: Arc::new(ProcessState::new(&ProcessSection::default())),
        }
    }

    /// At most `max` `Get`s at once; one more waits up to `wait` for a slot,
    /// then fails with RESOURCE_EXHAUSTED.
    pub fn with_gets(mut self, max: usize, wait: Duration) -> Self {
        self.gets = Arc::new(GetSlots {
            slots: Arc::new(Semaphore::new(max)),
            max,
            wait,
        });
        self
    }

    /// Uploads (`Put`, `Process`) that send nothing, and downloads whose
    /// reader takes nothing, for `idle` end with DEADLINE_EXCEEDED.
    pub fn with_idle_timeout(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }

    /// A `Get` slot, waiting at most the configured bound.
    async fn get_slot(&self) -> Result<OwnedSemaphorePermit, Error> {
        let g = &self.gets;
        let busy = || Error::Busy {
            max: g.max,
            waited_ms: u64::try_from(g.wait.as_millis()).unwrap_or(u64::MAX),
        };
        if g.wait.is_zero() {
            return g.slots.clone().try_acquire_owned().map_err(|_| busy());
        }
        match tokio::time::timeout(g.wait, g.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(Error::Task("get slots closed".into())),
            Err(_) => Err(busy()),
        }
    }

    /// The `Process` callers and limits of the config's `[process]`.
    pub fn with_process(mut self, settings: &ProcessSection) -> Self {
        self.process = Arc::new(ProcessState::new(settings));
        self
    }

    /// `Process` is narrowed to `process.allowed_callers` (the policy layer
    /// already required the service role). Fails closed.
    fn authorize_process<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.process
            .allowed_callers
            .check(request, Error::CallerNotAllowed)
    }

    /// Reads and checks the whole request (bounded by the limits), then runs
    /// the operation on a blocking thread. Nothing is stored.
    async fn run_process(
        &self,
        stream: Streaming<pb::ProcessRequest>,
    ) -> Result<(tessera_segment::FragmentOutput, tessera_image::PixelFormat), Error> {
        let mut stream = IdleStream::new(stream, self.idle);
        let mut decoder = ProcessDecoder::new(self.process.limits);
        while let Some(m) = stream.message().await.map_err(Error::Stream)? {
            decoder.push(m)?;
        }
        tokio::task::spawn_blocking(move || {
            let job = decoder.finish()?;
            Ok((job.run()?, job.fragment.spec.format))
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    /// Runs blocking store work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, Error> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
    }

    async fn receive(&self, stream: Streaming<pb::PutRequest>) -> Result<pb::PutResponse, Error> {
        use pb::put_request::Part;
        let mut stream = IdleStream::new(stream, self.idle);
        let header = match stream.message().await.map_err(Error::Stream)? {
            Some(pb::PutRequest {
                part: Some(Part::Header(h)),
            }) => h,
            Some(_) => return Err(Error::Protocol("the first message must be the header")),
            None => return Err(Error::Protocol("empty stream")),
        };
        let id = header.object_id;
        let size = header.size;
        let declared: Option<[u8; 32]> = match header.sha256.len() {
            0 => None,
            32 => header.sha256[..].try_into().ok(),
            n => return Err(Error::BadDigestLength(n)),
        };
        // Refuse before receiving (and before allocating) anything.
        {
            let id = id.clone();
            self.blocking(move |s| s.admit(&id, size)).await?;
        }
        // admit() bounded size by max_object_bytes, itself bounded by
        // HARD_MAX_OBJECT_BYTES, so this allocation is safe.
        let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        let mut hasher = Sha256::new();
        while let Some(msg) = stream.message().await.map_err(Error::Stream)? {
            match msg.part {
                Some(Part::Chunk(chunk)) => {
                    let received = buf.len() as u64 + chunk.len() as u64;
                    if received > size {
                        return Err(Error::SizeMismatch {
                            id,
                            declared: size,
                            received,
                        });
                    }
                    hasher.update(&chunk);
                    buf.extend_from_slice(&chunk);
                }
                Some(Part::Header(_)) => return Err(Error::Protocol("a second header")),
                None => return Err(Error::Protocol("a message with neither header nor chunk")),
            }
        }
        if buf.len() as u64 != size {
            return Err(Error::SizeMismatch {
                id,
                declared: size,
                received: buf.len() as u64,
            });
        }
        let digest: [u8; 32] = hasher.finalize().into();
        if declared.is_some_and(|d| d != digest) {
            return Err(Error::DigestMismatch(id));
        }
        let (meta, created) = self
            .blocking(move |s| s.put_hashed(&id, &buf, digest))
            .await?;
        if created {
            tracing::info!(object = %meta.id, size = meta.size, "stored");
        }
        Ok(pb::PutResponse {
            info: Some(info(&meta)),
            created,
        })
    }
}

fn info(meta: &ObjectMeta) -> pb::ObjectInfo {
    pb::ObjectInfo {
        object_id: meta.id.clone(),
        size: meta.size,
        sha256: meta.sha256.to_vec(),
        created_unix: meta.created_unix,
    }
}

/// The stream `Get` returns: the info, then the chunks, read from the store
/// by a task at most [`GET_CHUNKS_IN_FLIGHT`] chunks ahead of the reader.
/// The task holds the `Get` slot; it ends (releasing the slot and the read
/// snapshot) when the object is sent, when the reader goes away, or when the
/// reader takes nothing for the idle timeout, and the stream then ends with
/// DEADLINE_EXCEEDED instead of looking complete.
#[derive(Debug)]
pub struct GetStream {
    rx: mpsc::Receiver<Result<pb::GetResponse, Status>>,
    complete: Arc<AtomicBool>,
    idle: Duration,
    done: bool,
}

impl Stream for GetStream {
    type Item = Result<pb::GetResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(item)),
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                self.done = true;
                if self.complete.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                        "the reader took nothing for {} s (server.stream_idle_timeout_secs); \
                         the download is ended",
                        self.idle.as_secs_f64()
                    )))))
                }
            }
        }
    }
}

/// Sends the object's chunks into `tx`, one read at a time off the async
/// threads; gives up when the reader is gone or idle for `idle`.
async fn feed_object(
    reader: ObjectReader,
    tx: mpsc::Sender<Result<pb::GetResponse, Status>>,
    complete: Arc<AtomicBool>,
    idle: Duration,
    _slot: OwnedSemaphorePermit,
) {
    let id = reader.meta().id.clone();
    let mut reader = Some(reader);
    while let Some(mut r) = reader.take() {
        let read = tokio::task::spawn_blocking(move || {
            let next = r.next_chunk();
            (r, next)
        })
        .await;
        let (msg, last) = match read {
            Ok((r, Ok(Some(piece)))) => {
                reader = Some(r);
                debug_assert!(piece.len() <= STORE_CHUNK);
                (
                    Ok(pb::GetResponse {
                        part: Some(pb::get_response::Part::Chunk(piece)),
                    }),
                    false,
                )
            }
            Ok((_, Ok(None))) => {
                complete.store(true, Ordering::Release);
                return;
            }
            Ok((_, Err(e))) => (Err(Status::from(e)), true),
            Err(e) => (Err(Status::from(Error::Task(e.to_string()))), true),
        };
        match tokio::time::timeout(idle, tx.send(msg)).await {
            Ok(Ok(())) if !last => {}
            Ok(Ok(())) => {
                // The error is the stream's last item.
                complete.store(true, Ordering::Release);
                return;
            }
            Ok(Err(_)) => return, // the reader went away
            Err(_) => {
                tracing::info!(object = %id, ?idle, "download reader idle; ending the download");
                return;
            }
        }
    }
}

/// The stream `Process` returns: the output header, then each tile's core
/// and samples, encoded lazily.
pub type ProcessStream = Pin<Box<dyn Stream<Item = Result<pb::ProcessResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::storage_node_server::StorageNode for StorageService {
    async fn put(
        &self,
        request: Request<Streaming<pb::PutRequest>>,
    ) -> Result<Response<pb::PutResponse>, Status> {
        let _slot = self
            .put_slots
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        Ok(Response::new(self.receive(request.into_inner()).await?))
    }

    type GetStream = GetStream;

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<Self::GetStream>, Status> {
        let slot = self.get_slot().await?;
        let id = request.into_inner().object_id;
        // Verifies size and SHA-256 chunk by chunk before anything is sent.
        let reader = self.blocking(move |s| s.open_object(&id)).await?;
        let (tx, rx) = mpsc::channel(GET_CHUNKS_IN_FLIGHT);
        tx.try_send(Ok(pb::GetResponse {
            part: Some(pb::get_response::Part::Info(info(reader.meta()))),
        }))
        .map_err(|_| Status::internal("internal storage error"))?;
        let complete = Arc::new(AtomicBool::new(false));
        tokio::spawn(feed_object(reader, tx, complete.clone(), self.idle, slot));
        Ok(Response::new(GetStream {
            rx,
            complete,
            idle: self.idle,
            done: false,
        }))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::ObjectInfo>, Status> {
        let req = request.into_inner();
        let id = req.object_id;
        let meta = if req.verify {
            // One pass over the chunks from one snapshot, one chunk in memory.
            self.blocking(move |s| s.open_object(&id).map(|r| r.meta().clone()))
                .await?
        } else {
            self.blocking(move |s| s.stat(&id)).await?
        };
        Ok(Response::new(info(&meta)))
    }

    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit as usize {
            0 => LIST_LIMIT,
            n => n.min(LIST_LIMIT),
        };
        let (page, next) = self
            .blocking(move |s| s.list(&req.prefix, &req.start_after, limit))
            .await?;
        Ok(Response::new(pb::ListResponse {
            objects: page.iter().map(info).collect(),
            next_start_after: next.unwrap_or_default(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let id = request.into_inner().object_id;
        let size = {
            let id = id.clone();
            self.blocking(move |s| s.delete(&id)).await?
        };
        tracing::info!(object = %id, size, "deleted");
        Ok(Response::new(pb::DeleteResponse { size }))
    }

    type ProcessStream = ProcessStream;

    async fn process(
        &self,
        request: Request<Streaming<pb::ProcessRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        self.authorize_process(&request)?;
        // Held until the response stream is dropped: it bounds the fragments
        // and outputs in memory.
        let slot = self
            .process
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        let (out, format) = self.run_process(request.into_inner()).await?;
        let messages = output_messages(out, format).map(move |m| {
            let _held = &slot;
            Ok(m)
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(messages))))
    }

    async fn node_info(
        &self,
        _request: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoResponse>, Status> {
        let usage = self.blocking(|s| s.usage()).await?;
        let Limits {
            capacity_bytes,
            max_object_bytes,
        } = self.store.limits();
        Ok(Response::new(pb::NodeInfoResponse {
            node_id: self.node_id.clone(),
            instance_id: self.store.instance_id().to_owned(),
            capacity_bytes,
            used_bytes: usage.used_bytes,
            object_count: usage.object_count,
            max_object_bytes,
        }))
    }
}
