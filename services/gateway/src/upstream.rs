//! Clients of the services the gateway orchestrates, all over mutual TLS
//! with the gateway's own certificate. Each channel accepts one identity
//! only (the keyserver channel refuses a storage node's certificate) and
//! has the `[upstream_timeouts]` deadlines. Channels are lazy: the gateway
//! starts while its peers are still coming up and reconnects after a peer
//! restarts. The keyserver, watermark and segmentation channels balance
//! over every address their name resolves to (`resolve_secs`), so every
//! replica behind a headless Service gets calls; a storage node is one
//! address.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::segmentation::v1::segmentation_client::SegmentationClient;
use tessera_proto::storage::v1 as spb;
use tessera_proto::storage::v1::storage_node_client::StorageNodeClient;
use tessera_proto::watermark::v1::watermark_client::WatermarkClient;
use tessera_runtime::MAX_MESSAGE_BYTES;
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsError};
use tonic::{Code, Status};

use crate::config::{Config, Upstream};
use crate::error::GatewayError;

/// `tokio::spawn` inside the current span: the task's upstream calls
/// carry the RPC's trace context (a bare spawn starts outside any span).
pub(crate) fn spawn_traced<F>(task: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    use tracing::Instrument;
    tokio::spawn(task.in_current_span())
}

/// One configured storage node.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub address: String,
    /// Failure domain (the node's own name when the config gives none).
    pub zone: String,
    pub client: StorageNodeClient<Channel>,
    /// Longest wait for each message of a Get after the first.
    pub message_timeout: Duration,
}

impl Node {
    /// "storage node storage-2 (localhost:7602)": how errors name it.
    pub fn label(&self) -> String {
        format!("storage node {} ({})", self.name, self.address)
    }

    /// Wraps a node's answer so the error names the node.
    pub fn err(&self, status: Status) -> GatewayError {
        GatewayError::upstream(self.label(), status)
    }
}

/// What a probe learned about a node.
#[derive(Clone, Debug)]
pub struct NodeHealth {
    /// Index into [`Upstreams::nodes`].
    pub index: usize,
    pub instance_id: String,
    pub free_bytes: u64,
    pub max_object_bytes: u64,
}

/// How long a store reuses the last NodeInfo probe
/// ([`Upstreams::placement_probe`]). A failed put forgets it at once, and
/// the DICOM store then places again on a fresh probe.
pub const PLACEMENT_PROBE_TTL: Duration = Duration::from_secs(2);

/// A probe's answer and when it was asked.
type CachedProbe = (Instant, Vec<NodeHealth>, Vec<String>);

/// Every client the gateway needs.
#[derive(Clone)]
pub struct Upstreams {
    pub keyserver: KeyServerClient<Channel>,
    pub watermark: WatermarkClient<Channel>,
    pub segmentation: SegmentationClient<Channel>,
    pub nodes: Vec<Node>,
    probe_timeout: Duration,
    /// The last probe, for [`Self::placement_probe`] (shared by clones).
    last_probe: Arc<Mutex<Option<CachedProbe>>>,
    /// The per-object cap every node needs for `gateway.max_image_bytes`
    /// ([`crate::sizes::node_object_bytes_needed`]).
    pub cap_needed: u64,
    /// Caps already warned about, by node index (one warning per value).
    cap_warned: Arc<Mutex<std::collections::BTreeMap<usize, u64>>>,
    /// The client TLS every channel above uses (one source, one reload
    /// timer), for channels made elsewhere.
    pub tls: ClientTls,
}

impl Upstreams {
    /// Loads the client TLS material and prepares lazy channels, each
    /// expecting its upstream's identity.
    pub fn new(cfg: &Config) -> Result<Self, TlsError> {
        Self::with_resolver(cfg, tessera_tls::dns_resolver())
    }

    /// [`Self::new`] with the balanced channels (`resolve_secs` > 0)
    /// resolving their names through `resolver` (tests inject theirs).
    pub fn with_resolver(cfg: &Config, resolver: tessera_tls::Resolver) -> Result<Self, TlsError> {
        let tls = ClientTls::from_files(&cfg.client_tls)?;
        if let Some(every) = cfg.server.tls_reload() {
            let _watching = tls.watch(every);
        }
        let t = &cfg.upstream_timeouts;
        let (unary, streaming) = (t.unary(), t.streaming());
        let bad_identity = |address: &str, detail: String| TlsError::Endpoint {
            endpoint: address.to_owned(),
            detail,
        };
        let channel = |name: &str, u: &Upstream, timeouts| {
            let id = cfg
                .upstream_identity(name, u)
                .map_err(|e| bad_identity(&u.address, e))?;
            let tls = tls.expecting(&id).with_timeouts(timeouts);
            tls.connect_resolving(&u.address, u.resolve_secs, resolver.clone())
        };
        let keyserver = KeyServerClient::new(channel("keyserver", &cfg.keyserver, unary)?);
        let watermark = WatermarkClient::new(channel("watermark", &cfg.watermark, streaming)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let segmentation =
            SegmentationClient::new(channel("segmentation", &cfg.segmentation, streaming)?)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut nodes = Vec::with_capacity(cfg.storage_nodes.len());
        for n in &cfg.storage_nodes {
            let id = cfg
                .node_identity(n)
                .map_err(|e| bad_identity(&n.address, e))?;
            let ch = tls
                .expecting(&id)
                .with_timeouts(streaming)
                .connect_lazy(&n.address)?;
            nodes.push(Node {
                name: n.name.clone(),
                address: n.address.clone(),
                zone: if n.zone.is_empty() {
                    n.name.clone()
                } else {
                    n.zone.clone()
                },
                client: tessera_storage_client::client(ch),
                message_timeout: Duration::from_secs(t.call_secs),
            });
        }
        Ok(Self {
            keyserver,
            watermark,
            segmentation,
            nodes,
            probe_timeout: Duration::from_secs(cfg.gateway.node_probe_timeout_secs),
            last_probe: Arc::default(),
            cap_needed: crate::sizes::node_object_bytes_needed(
                cfg.gateway.max_image_bytes,
                cfg.erasure.map(|e| (e.data, e.parity)),
            ),
            cap_warned: Arc::default(),
            tls,
        })
    }

    fn last_probe(&self) -> std::sync::MutexGuard<'_, Option<CachedProbe>> {
        // Whole values only are ever stored: a poisoned lock is still sound.
        self.last_probe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`Self::probe`], reused for [`PLACEMENT_PROBE_TTL`] (a series stored
    /// instance by instance costs one probe per TTL, not one per instance).
    /// The flag is true when the answer came from the cache: a put that
    /// then fails may have been placed on a stale answer.
    pub async fn placement_probe(&self) -> (Vec<NodeHealth>, Vec<String>, bool) {
        if let Some((at, healthy, problems)) = self.last_probe().as_ref()
            && at.elapsed() < PLACEMENT_PROBE_TTL
        {
            return (healthy.clone(), problems.clone(), true);
        }
        let asked = Instant::now();
        let (healthy, problems) = self.probe().await;
        *self.last_probe() = Some((asked, healthy.clone(), problems.clone()));
        (healthy, problems, false)
    }

    /// Drops the cached probe (a put failed: a node went away, filled up
    /// or restarted as another instance).
    pub fn forget_probe(&self) {
        self.last_probe().take();
    }

    /// The node with this configured name.
    pub fn node(&self, name: &str) -> Result<&Node, GatewayError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            GatewayError::Unavailable(format!(
                "storage node {name} is not in this gateway's configuration"
            ))
        })
    }

    /// Asks every node for its NodeInfo in parallel. A node that does not
    /// answer in time, or answers with another name, is unhealthy (with the
    /// reason); the others are returned in configuration order.
    pub async fn probe(&self) -> (Vec<NodeHealth>, Vec<String>) {
        let mut tasks = Vec::with_capacity(self.nodes.len());
        for (index, node) in self.nodes.iter().enumerate() {
            let node = node.clone();
            let timeout = self.probe_timeout;
            tasks.push(tokio::spawn(async move {
                let mut c = node.client.clone();
                let r = tokio::time::timeout(timeout, c.node_info(spb::NodeInfoRequest {})).await;
                match r {
                    Err(_) => Err(format!("{}: no answer within {timeout:?}", node.label())),
                    Ok(Err(s)) => Err(format!("{}: {:?}: {}", node.label(), s.code(), s.message())),
                    Ok(Ok(info)) => {
                        let info = info.into_inner();
                        if info.node_id != node.name {
                            Err(format!(
                                "{}: answers as {:?}; refusing to place on it",
                                node.label(),
                                info.node_id
                            ))
                        } else {
                            Ok(NodeHealth {
                                index,
                                instance_id: info.instance_id,
                                free_bytes: info.capacity_bytes.saturating_sub(info.used_bytes),
                                max_object_bytes: info.max_object_bytes,
                            })
                        }
                    }
                }
            }));
        }
        let mut healthy = Vec::new();
        let mut problems = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(h)) => healthy.push(h),
                Ok(Err(p)) => problems.push(p),
                Err(e) => problems.push(format!("probe task failed: {e}")),
            }
        }
        self.warn_small_caps(&healthy);
        // Two configured addresses reaching the same node would put both
        // shares in one cloud: keep only the first of each instance.
        let mut seen = std::collections::BTreeSet::new();
        healthy.retain(|h| {
            if seen.insert(h.instance_id.clone()) {
                true
            } else {
                problems.push(format!(
                    "{}: same instance as another configured node",
                    self.nodes[h.index].label()
                ));
                false
            }
        });
        (healthy, problems)
    }
}

impl Upstreams {
    /// Logs a warning (once per node and cap value) for every node whose
    /// per-object cap is below what `gateway.max_image_bytes` needs: images
    /// near the limit would be refused with RESOURCE_EXHAUSTED.
    fn warn_small_caps(&self, healthy: &[NodeHealth]) {
        let mut warned = self
            .cap_warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for h in healthy {
            if h.max_object_bytes >= self.cap_needed {
                warned.remove(&h.index);
                continue;
            }
            if warned.insert(h.index, h.max_object_bytes) == Some(h.max_object_bytes) {
                continue;
            }
            tracing::warn!(
                node = %self.nodes[h.index].name,
                max_object_bytes = h.max_object_bytes,
                needed = self.cap_needed,
                "the node's per-object cap (max_object_bytes) is below what gateway.max_image_bytes needs: \
                 large images will be refused with RESOURCE_EXHAUSTED; raise the node's max_object_bytes \
                 or lower gateway.max_image_bytes"
            );
        }
    }
}

/// Streams an object out of a node, refusing more than `limit` bytes before
/// allocating them. Returns the SHA-256 the node announced (checked against
/// the bytes received) and the bytes.
pub async fn get_object(
    node: &Node,
    object_id: &str,
    limit: u64,
) -> Result<(Vec<u8>, Vec<u8>), GatewayError> {
    let mut c = node.client.clone();
    let mut stream = c
        .get(spb::GetRequest {
            object_id: object_id.to_owned(),
        })
        .await
        .map_err(|s| node.err(s))?
        .into_inner();
    let info = match stream.message().await.map_err(|s| node.err(s))? {
        Some(spb::GetResponse {
            part: Some(spb::get_response::Part::Info(info)),
        }) => info,
        Some(_) | None => {
            return Err(node.err(Status::internal(
                "get: the first message was not the object info",
            )));
        }
    };
    if info.size > limit {
        return Err(GatewayError::DataLoss(format!(
            "{}: object {object_id} is {} bytes, more than the {limit} expected",
            node.label(),
            info.size
        )));
    }
    let mut data = Vec::with_capacity(info.size as usize);
    // The channel's timeout ends when the answer starts: bound each further
    // message, so a node that stalls mid-object cannot hold the job.
    let wait = node.message_timeout;
    loop {
        let next = tokio::time::timeout(wait, stream.message())
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "no data for {wait:?} in the middle of a get"
                )))
            });
        let Some(msg) = next.map_err(|s| node.err(s))? else {
            break;
        };
        match msg.part {
            Some(spb::get_response::Part::Chunk(c)) => {
                if data.len() as u64 + c.len() as u64 > info.size {
                    return Err(node.err(Status::data_loss(format!(
                        "object {object_id}: more bytes than announced"
                    ))));
                }
                data.extend_from_slice(&c);
            }
            Some(spb::get_response::Part::Info(_)) | None => {
                return Err(node.err(Status::internal("get: unexpected message")));
            }
        }
    }
    if data.len() as u64 != info.size || Sha256::digest(&data)[..] != info.sha256[..] {
        return Err(node.err(Status::data_loss(format!(
            "object {object_id}: received bytes do not match the node's SHA-256"
        ))));
    }
    Ok((info.sha256, data))
}

/// Deletes an object; one that is already gone counts as deleted.
pub async fn delete_object(node: &Node, object_id: &str) -> Result<(), GatewayError> {
    let mut c = node.client.clone();
    match c
        .delete(spb::DeleteRequest {
            object_id: object_id.to_owned(),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(node.err(s)),
    }
}
