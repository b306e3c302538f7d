//! The gRPC face of the store: `tessera.storage.v1.StorageNode`, plus
//! `Process`, which applies an operation to one region's fragment in memory
//! (nothing of it is stored or logged).

use std::pin::Pin;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tessera_proto::storage::v1 as pb;
use tessera_tls::CallerAllowList;
use tessera_wire::{ProcessDecoder, ProcessLimits, output_messages};
use tokio::sync::Semaphore;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::Error;
use crate::config::{PROCESS_CALLERS, ProcessSection};
use crate::store::{Limits, ObjectMeta, STORE_CHUNK, Store};

/// Default and maximum page size of `List`.
pub const LIST_LIMIT: usize = 1000;

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
    process: Arc<ProcessState>,
}

impl StorageService {
    /// A service with the default `[process]` settings (the gateway only,
    /// 256 MiB fragments, 2 at once); see [`Self::with_process`].
    pub fn new(store: Arc<Store>, node_id: String, max_concurrent_puts: usize) -> Self {
        Self {
            store,
            node_id,
            put_slots: Arc::new(Semaphore::new(max_concurrent_puts)),
            process: Arc::new(ProcessState::new(&ProcessSection::default())),
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
        mut stream: Streaming<pb::ProcessRequest>,
    ) -> Result<(tessera_segment::FragmentOutput, tessera_image::PixelFormat), Error> {
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

    async fn receive(
        &self,
        mut stream: Streaming<pb::PutRequest>,
    ) -> Result<pb::PutResponse, Error> {
        use pb::put_request::Part;
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

/// The stream `Get` returns: the info, then the chunks.
pub type GetStream = tokio_stream::Iter<std::vec::IntoIter<Result<pb::GetResponse, Status>>>;

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
        let id = request.into_inner().object_id;
        let (meta, pieces) = self.blocking(move |s| s.get(&id)).await?;
        let mut out = Vec::with_capacity(pieces.len() + 1);
        out.push(Ok(pb::GetResponse {
            part: Some(pb::get_response::Part::Info(info(&meta))),
        }));
        for piece in pieces {
            debug_assert!(piece.len() <= STORE_CHUNK);
            out.push(Ok(pb::GetResponse {
                part: Some(pb::get_response::Part::Chunk(piece)),
            }));
        }
        Ok(Response::new(tokio_stream::iter(out)))
    }

    async fn stat(
        &self,
        request: Request<pb::StatRequest>,
    ) -> Result<Response<pb::ObjectInfo>, Status> {
        let id = request.into_inner().object_id;
        let meta = self.blocking(move |s| s.stat(&id)).await?;
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
