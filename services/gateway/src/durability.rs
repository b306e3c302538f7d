//! Erasure-coded placement, writes, reads and deletes of stored objects
//! (`[erasure]` in the config; `tessera-erasure` does the coding).
//!
//! * **Placement**: each object's `k + m` fragments go to `k + m` distinct
//!   healthy nodes, ranked by rendezvous hashing of the object id and
//!   spread across zones first, so no node holds two fragments of one
//!   object and a zone loses as few as it can.
//! * **Writes** are acknowledged once `write_quorum` fragments (default
//!   k + 1) are durable; a fragment that could not be written is recorded
//!   as missing (for repair), never silently dropped.
//! * **Reads** start with the `k` preferred fragments and fetch another
//!   at once when one is missing, unreachable or fails its recorded
//!   SHA-256 (every such fragment is named in the log and the reports), and
//!   one more each `hedge_after_ms` while k verified fragments are not in
//!   (a slow cloud costs that delay, not its own).
//!
//! An object without an erasure record is stored whole on one node (the
//! records written before erasure coding, or a gateway without
//! `[erasure]`): the functions here fall back to that.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

use sha2::{Digest, Sha256};
use tessera_erasure::Scheme;
use tonic::Status;

use crate::error::GatewayError;
use crate::shared::{GatewayService, Result};
use crate::upstream::{self, Node, NodeHealth};
use crate::vault::{ErasureRecord, FragmentPlacement, SharePlacement};

/// Milliseconds a read waits for its k fragments before asking one more
/// node, when the config does not say (`[erasure] hedge_after_ms`).
const DEFAULT_HEDGE_AFTER_MS: u64 = 250;

/// Seconds an object must have existed on its node before the orphan sweep
/// may remove it (`[erasure] orphan_grace_secs`): longer than any store.
pub(crate) const DEFAULT_ORPHAN_GRACE_SECS: u64 = 3600;

/// A fetched object: its SHA-256 as the node computed it, and its bytes.
type Fetched = (Vec<u8>, Vec<u8>);

/// A fragment a read could not use, named for the reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentProblem {
    pub object_id: String,
    pub index: u32,
    pub node: String,
    /// `missing` (never written, or gone), `unreachable`, `corrupt`.
    pub kind: &'static str,
    pub detail: String,
}

impl std::fmt::Display for FragmentProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} fragment {} on {}: {} ({})",
            self.object_id, self.index, self.node, self.kind, self.detail
        )
    }
}

/// Orders `healthy` for `object_id`: rendezvous hashing, then one node per
/// zone in turn, so consecutive picks fall in different zones first.
fn rank_nodes<'a>(
    object_id: &str,
    healthy: &'a [NodeHealth],
    nodes: &[Node],
    need_bytes: u64,
) -> Vec<&'a NodeHealth> {
    let mut ranked: Vec<(Vec<u8>, &NodeHealth)> = healthy
        .iter()
        .filter(|h| h.free_bytes >= need_bytes && h.max_object_bytes >= need_bytes)
        .map(|h| {
            let name = nodes.get(h.index).map(|n| n.name.as_str()).unwrap_or("");
            let mut d = Sha256::new();
            d.update(object_id.as_bytes());
            d.update([0u8]);
            d.update(name.as_bytes());
            (d.finalize().to_vec(), h)
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0));
    // Round-robin over zones in rank order.
    let mut zones: Vec<(String, Vec<&NodeHealth>)> = Vec::new();
    for (_, h) in ranked {
        let zone = nodes
            .get(h.index)
            .map(|n| n.zone.clone())
            .unwrap_or_default();
        match zones.iter_mut().find(|(z, _)| *z == zone) {
            Some((_, v)) => v.push(h),
            None => zones.push((zone, vec![h])),
        }
    }
    let mut out = Vec::new();
    let mut round = 0;
    loop {
        let before = out.len();
        for (_, v) in &zones {
            if let Some(h) = v.get(round) {
                out.push(*h);
            }
        }
        if out.len() == before {
            return out;
        }
        round += 1;
    }
}

impl GatewayService {
    /// With `[erasure]`: replaces each placement's single node by its
    /// `k + m` fragments on distinct healthy nodes (zones first). Without,
    /// leaves the placements as they are.
    pub(crate) fn spread_fragments(
        &self,
        placements: &mut [SharePlacement],
        healthy: &[NodeHealth],
        problems: &[String],
        object_bound: u64,
    ) -> Result<()> {
        let Some(e) = self.inner.limits.erasure else {
            return Ok(());
        };
        let scheme = Scheme {
            k: e.data,
            m: e.parity,
        };
        let n = scheme.n();
        let fragment_bound = scheme.shard_len(object_bound) as u64 + 512;
        let nodes = &self.inner.up.nodes;
        for p in placements.iter_mut() {
            let ranked = rank_nodes(&p.object_id, healthy, nodes, fragment_bound);
            if ranked.len() < e.quorum() {
                let mut msg = format!(
                    "{} fragments of {} need at least {} healthy storage nodes with room for {fragment_bound} bytes (write quorum); {} are available",
                    n,
                    p.object_id,
                    e.quorum(),
                    ranked.len()
                );
                if !problems.is_empty() {
                    msg.push_str(&format!(": {}", problems.join("; ")));
                }
                return Err(GatewayError::Unavailable(msg));
            }
            // Fewer healthy nodes than fragments (but a quorum): the rest are
            // recorded missing, on the configured nodes that are down, so a
            // repair can rebuild them there or elsewhere.
            let mut used: BTreeSet<usize> = BTreeSet::new();
            let mut fragments = Vec::with_capacity(n);
            for index in 0..n {
                let (node, instance, missing) = match ranked.get(index) {
                    Some(h) => {
                        used.insert(h.index);
                        (nodes[h.index].name.clone(), h.instance_id.clone(), false)
                    }
                    None => {
                        let spare = (0..nodes.len()).find(|i| !used.contains(i));
                        let i = spare.unwrap_or(0);
                        used.insert(i);
                        (nodes[i].name.clone(), String::new(), true)
                    }
                };
                fragments.push(FragmentPlacement {
                    index: index as u32,
                    node,
                    instance_id: instance,
                    object_id: tessera_erasure::fragment_object_id(&p.object_id, index),
                    size: 0,
                    sha256: String::new(),
                    missing,
                });
            }
            p.node = String::new();
            p.instance_id = String::new();
            p.erasure = Some(ErasureRecord {
                k: scheme.k as u32,
                m: scheme.m as u32,
                fragments,
            });
        }
        Ok(())
    }

    /// Writes one erasure-coded object: encodes, puts every fragment in
    /// parallel, acknowledges at the write quorum (the rest marked missing).
    pub(crate) async fn put_fragments(&self, p: &mut SharePlacement, data: Vec<u8>) -> Result<()> {
        let Some(rec) = p.erasure.as_mut() else {
            return Err(GatewayError::Internal(format!(
                "{}: no erasure record",
                p.object_id
            )));
        };
        let scheme = Scheme {
            k: rec.k as usize,
            m: rec.m as usize,
        };
        let quorum = self
            .inner
            .limits
            .erasure
            .map(|e| e.quorum())
            .unwrap_or(scheme.k + 1)
            .min(scheme.n());
        let object_id = p.object_id.clone();
        p.size = data.len() as u64;
        // One SHA-256 pass: the record's digest is the fragments' too.
        let (frags, digest) = tokio::task::spawn_blocking(move || {
            let digest: [u8; 32] = Sha256::digest(&data).into();
            tessera_erasure::encode_hashed(&object_id, scheme, &data, digest).map(|f| (f, digest))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("encode task: {e}")))?
        .map_err(|e| GatewayError::Internal(format!("erasure encode: {e}")))?;
        p.sha256 = hex::encode(digest);
        let mut tasks = Vec::new();
        for (f, bytes) in rec.fragments.iter().zip(frags) {
            if f.missing {
                tasks.push(None);
                continue;
            }
            let node = self.inner.up.node(&f.node)?.clone();
            let id = f.object_id.clone();
            tasks.push(Some(crate::upstream::spawn_traced(async move {
                let mut c = node.client.clone();
                let r = tessera_storage_client::put_object(&mut c, &id, &bytes)
                    .await
                    .map_err(|s| node.err(s))?;
                let info = r.info.unwrap_or_default();
                if info.size != bytes.len() as u64 || info.sha256.len() != 32 {
                    return Err(node.err(Status::internal(
                        "put: the node answered without the fragment's size and SHA-256",
                    )));
                }
                Ok::<_, GatewayError>((info.size, hex::encode(info.sha256)))
            })));
        }
        let mut durable = 0usize;
        let mut first_err = None;
        for (f, t) in rec.fragments.iter_mut().zip(tasks) {
            let Some(t) = t else { continue };
            match t.await {
                Ok(Ok((size, sha))) => {
                    f.size = size;
                    f.sha256 = sha;
                    durable += 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(object = %f.object_id, node = %f.node, error = %e, "fragment not written; recorded for repair");
                    f.missing = true;
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    f.missing = true;
                    first_err.get_or_insert(GatewayError::Internal(format!("put task: {e}")));
                }
            }
        }
        if durable >= quorum {
            Ok(())
        } else {
            Err(first_err.unwrap_or_else(|| {
                GatewayError::Unavailable(format!(
                    "{}: {durable} fragments durable, the write quorum is {quorum}",
                    p.object_id
                ))
            }))
        }
    }

    /// Reads one object: whole from its node, or rebuilt from `k` verified
    /// fragments. Returns the bytes and the fragments it could not use.
    /// `thorough` (Verify) fetches and checks every fragment, so every
    /// missing or corrupt one is named; otherwise only what is needed.
    pub(crate) async fn read_object(
        &self,
        p: &SharePlacement,
        limit: u64,
        thorough: bool,
    ) -> Result<(Vec<u8>, Vec<FragmentProblem>)> {
        let Some(rec) = &p.erasure else {
            let node = self.inner.up.node(&p.node)?.clone();
            let (sha, data) = upstream::get_object(&node, &p.object_id, limit).await?;
            if hex::encode(sha) != p.sha256 {
                tracing::warn!(object = %p.object_id, node = %p.node, share = p.share, "object differs from the stored one");
            }
            return Ok((data, Vec::new()));
        };
        let scheme = Scheme {
            k: rec.k as usize,
            m: rec.m as usize,
        };
        let frag_limit = scheme.shard_len(limit) as u64 + 1024;
        let hedge_after = std::time::Duration::from_millis(
            self.inner
                .limits
                .erasure
                .map_or(DEFAULT_HEDGE_AFTER_MS, |e| e.hedge_after_ms),
        );
        let mut problems = Vec::new();
        let mut good: Vec<(usize, Vec<u8>)> = Vec::new();
        // Preferred: the data fragments (no decoding work), then parity.
        let mut order: Vec<&FragmentPlacement> = rec.fragments.iter().collect();
        order.sort_by_key(|f| (f.missing, f.index));
        let problem = |f: &FragmentPlacement, kind: &'static str, detail: String| FragmentProblem {
            object_id: p.object_id.clone(),
            index: f.index,
            node: f.node.clone(),
            kind,
            detail,
        };
        // Each task answers with its position in `order`.
        let mut tasks: tokio::task::JoinSet<(usize, Result<Fetched>)> = tokio::task::JoinSet::new();
        let next = std::sync::atomic::AtomicUsize::new(0);
        // Starts the next fetchable fragment; false when none is left.
        let launch = |tasks: &mut tokio::task::JoinSet<_>, problems: &mut Vec<FragmentProblem>| {
            while next.load(Relaxed) < order.len() {
                let pos = next.fetch_add(1, Relaxed);
                let f = order[pos];
                if f.missing {
                    problems.push(problem(f, "missing", "not written at store".into()));
                    continue;
                }
                let Ok(node) = self.inner.up.node(&f.node).cloned() else {
                    problems.push(problem(f, "unreachable", "not a configured node".into()));
                    continue;
                };
                let id = f.object_id.clone();
                tasks.spawn(tracing::Instrument::in_current_span(async move {
                    (pos, upstream::get_object(&node, &id, frag_limit).await)
                }));
                return true;
            }
            false
        };
        let wanted = if thorough { order.len() } else { scheme.k };
        for _ in 0..wanted {
            if !launch(&mut tasks, &mut problems) {
                break;
            }
        }
        let hedge = tokio::time::sleep(hedge_after);
        tokio::pin!(hedge);
        let mut hedged = 0usize;
        while thorough || good.len() < scheme.k {
            if tasks.is_empty() {
                // Every started fetch answered and k are not good yet.
                if !launch(&mut tasks, &mut problems) {
                    break;
                }
                continue;
            }
            tokio::select! {
                joined = tasks.join_next() => {
                    let Some(joined) = joined else { continue };
                    let (pos, r) = match joined {
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(object = %p.object_id, error = %e, "fragment fetch task failed");
                            continue;
                        }
                    };
                    let f = order[pos];
                    let usable = match r {
                        Ok((sha, data)) if hex::encode(&sha) == f.sha256 => {
                            good.push((f.index as usize, data));
                            true
                        }
                        Ok(_) => {
                            problems.push(problem(f, "corrupt", "SHA-256 differs from the one recorded at store".into()));
                            false
                        }
                        Err(e) => {
                            let code = e.code();
                            let kind = if code == tonic::Code::NotFound {
                                "missing"
                            } else if code == tonic::Code::DataLoss {
                                "corrupt"
                            } else {
                                "unreachable"
                            };
                            problems.push(problem(f, kind, e.to_string()));
                            false
                        }
                    };
                    // An unusable fragment is replaced by the next at once.
                    if !usable && !thorough && good.len() + tasks.len() < scheme.k {
                        launch(&mut tasks, &mut problems);
                    }
                }
                () = &mut hedge, if !thorough && next.load(Relaxed) < order.len() => {
                    if launch(&mut tasks, &mut problems) {
                        hedged += 1;
                    }
                    hedge.as_mut().reset(tokio::time::Instant::now() + hedge_after);
                }
            }
        }
        // Fetches still running (slow nodes a hedge overtook) are dropped.
        tasks.abort_all();
        if hedged > 0 {
            tracing::info!(object = %p.object_id, hedged, "read hedged to further fragments (slow nodes)");
        }
        for pr in &problems {
            tracing::warn!(object = %pr.object_id, fragment = pr.index, node = %pr.node, kind = pr.kind, detail = %pr.detail, "fragment unusable; queued for repair");
        }
        if good.len() < scheme.k {
            let named: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
            return Err(GatewayError::DataLoss(format!(
                "{}: {} of the {} fragments needed are usable: {}",
                p.object_id,
                good.len(),
                scheme.k,
                named.join("; ")
            )));
        }
        let object_id = p.object_id.clone();
        good.sort_by_key(|(i, _)| *i);
        good.truncate(scheme.k);
        // The fragments name the object's SHA-256 and decode checks the
        // rebuilt bytes against it: it must be the digest the vault
        // recorded at store (no second hashing pass here).
        let named = tessera_erasure::parse(&good[0].1)
            .map(|(h, _)| hex::encode(h.object_sha256))
            .unwrap_or_default();
        if named != p.sha256 {
            return Err(GatewayError::DataLoss(format!(
                "{}: the fragments describe another object than the one stored",
                p.object_id
            )));
        }
        let data = tokio::task::spawn_blocking(move || {
            let given: Vec<(usize, &[u8])> = good.iter().map(|(i, d)| (*i, d.as_slice())).collect();
            tessera_erasure::decode(&object_id, scheme, &given)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("decode task: {e}")))?
        .map_err(|e| GatewayError::DataLoss(format!("{}: {e}", p.object_id)))?;
        Ok((data, problems))
    }

    /// Deletes one object: every fragment (or the whole object). An
    /// already-missing fragment counts as deleted.
    pub(crate) async fn delete_placement(&self, p: &SharePlacement) -> Result<()> {
        match &p.erasure {
            None => {
                let node = self.inner.up.node(&p.node)?;
                upstream::delete_object(node, &p.object_id).await
            }
            Some(rec) => {
                let mut first_err = None;
                for f in &rec.fragments {
                    let r = match self.inner.up.node(&f.node) {
                        Ok(node) => upstream::delete_object(node, &f.object_id).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = r {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
        }
    }
}

/// The proto form of a placement (its fragments included).
pub(crate) fn placement_to_proto(p: &SharePlacement) -> tessera_proto::gateway::v1::Placement {
    use tessera_proto::gateway::v1 as pb;
    pb::Placement {
        share: p.share,
        node: p.node.clone(),
        object_id: p.object_id.clone(),
        size: p.size,
        sha256: hex::decode(&p.sha256).unwrap_or_default(),
        fragments: p
            .erasure
            .iter()
            .flat_map(|e| e.fragments.iter())
            .map(|f| pb::Fragment {
                index: f.index,
                node: f.node.clone(),
                object_id: f.object_id.clone(),
                size: f.size,
                missing: f.missing,
            })
            .collect(),
    }
}

/// What a scrub or repair found and did (the RPC's counters).
#[derive(Clone, Debug, Default)]
pub struct RepairTally {
    pub objects: u64,
    pub checked: u64,
    pub missing: u64,
    pub corrupt: u64,
    pub unreachable: u64,
    pub rebuilt: u64,
    pub moved: u64,
    /// Stores a crashed gateway left pending, rolled back by this pass.
    pub interrupted: u64,
    /// Objects on a node that no record names (a crash between a node's
    /// write and the record), removed.
    pub orphans: u64,
    pub failures: Vec<String>,
    pub actions: Vec<String>,
}

/// Repair passes since start, summed (read by `/metrics`).
#[derive(Debug, Default)]
pub struct RepairCounters {
    pub passes: AtomicU64,
    pub checked: AtomicU64,
    pub missing: AtomicU64,
    pub corrupt: AtomicU64,
    pub unreachable: AtomicU64,
    pub rebuilt: AtomicU64,
    pub moved: AtomicU64,
    pub orphans: AtomicU64,
    pub interrupted: AtomicU64,
    pub failures: AtomicU64,
}

impl RepairCounters {
    /// Each counter with its metric name and help text (`/metrics`).
    pub fn fields(&self) -> [(&'static str, &'static str, &AtomicU64); 10] {
        [
            (
                "gateway_repair_passes",
                "Scrub/repair passes run (background and Repair RPCs)",
                &self.passes,
            ),
            (
                "gateway_repair_fragments_checked",
                "Fragments re-hashed on their nodes by repair passes",
                &self.checked,
            ),
            (
                "gateway_repair_fragments_missing",
                "Fragments found missing by repair passes",
                &self.missing,
            ),
            (
                "gateway_repair_fragments_corrupt",
                "Fragments found corrupt by repair passes",
                &self.corrupt,
            ),
            (
                "gateway_repair_fragments_unreachable",
                "Fragments on unreachable nodes at repair passes",
                &self.unreachable,
            ),
            (
                "gateway_repair_fragments_rebuilt",
                "Fragments rebuilt by repair passes",
                &self.rebuilt,
            ),
            (
                "gateway_repair_fragments_moved",
                "Fragments moved to another node by repair passes",
                &self.moved,
            ),
            (
                "gateway_repair_orphans_removed",
                "Objects no record names, removed by repair passes",
                &self.orphans,
            ),
            (
                "gateway_repair_interrupted_finished",
                "Interrupted stores rolled back by repair passes",
                &self.interrupted,
            ),
            (
                "gateway_repair_failures",
                "Objects repair passes could not bring back to full redundancy",
                &self.failures,
            ),
        ]
    }

    /// Adds one pass's tally.
    pub(crate) fn add(&self, t: &RepairTally) {
        self.passes.fetch_add(1, Relaxed);
        for (c, v) in [
            (&self.checked, t.checked),
            (&self.missing, t.missing),
            (&self.corrupt, t.corrupt),
            (&self.unreachable, t.unreachable),
            (&self.rebuilt, t.rebuilt),
            (&self.moved, t.moved),
            (&self.orphans, t.orphans),
            (&self.interrupted, t.interrupted),
            (&self.failures, t.failures.len() as u64),
        ] {
            c.fetch_add(v, Relaxed);
        }
    }
}

/// The settings of one scrub/repair pass.
pub(crate) struct Pass<'a> {
    pub healthy: &'a [NodeHealth],
    /// Move every fragment off this node.
    pub evacuate: Option<&'a str>,
    pub dry_run: bool,
    /// Wait between objects (the background pass's bounded rate).
    pub pause: Option<std::time::Duration>,
}

/// One fragment's state on its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FragmentState {
    Good,
    Missing,
    Corrupt,
    Unreachable,
}

impl GatewayService {
    /// Re-hashes a fragment on its node (no bytes move): its state.
    async fn scrub_fragment(&self, f: &FragmentPlacement) -> FragmentState {
        if f.missing {
            return FragmentState::Missing;
        }
        let Ok(node) = self.inner.up.node(&f.node) else {
            return FragmentState::Unreachable;
        };
        let mut c = node.client.clone();
        let r = c
            .stat(tessera_proto::storage::v1::StatRequest {
                object_id: f.object_id.clone(),
                verify: true,
            })
            .await;
        match r {
            Ok(info) if hex::encode(&info.get_ref().sha256) == f.sha256 => FragmentState::Good,
            // Another object's bytes under this id: not ours.
            Ok(_) => FragmentState::Corrupt,
            Err(s) if s.code() == tonic::Code::NotFound => FragmentState::Missing,
            Err(s) if s.code() == tonic::Code::DataLoss => FragmentState::Corrupt,
            Err(_) => FragmentState::Unreachable,
        }
    }

    /// [`Self::repair_placement`] over a record's objects; true when any
    /// changed (the caller saves the record).
    pub(crate) async fn repair_placements(
        &self,
        placements: &mut [SharePlacement],
        pass: &Pass<'_>,
        tally: &mut RepairTally,
    ) -> bool {
        let mut changed = false;
        for p in placements.iter_mut() {
            changed |= self
                .repair_placement(p, pass.healthy, pass.evacuate, pass.dry_run, tally)
                .await;
            if let Some(d) = pass.pause {
                tokio::time::sleep(d).await;
            }
        }
        changed
    }

    /// Scrubs one stored object and, unless `dry_run`, rebuilds what is
    /// missing or corrupt (and moves fragments off `evacuate`). Returns true
    /// when the placement changed (the caller saves the record).
    pub(crate) async fn repair_placement(
        &self,
        p: &mut SharePlacement,
        healthy: &[NodeHealth],
        evacuate: Option<&str>,
        dry_run: bool,
        tally: &mut RepairTally,
    ) -> bool {
        tally.objects += 1;
        let Some(rec) = p.erasure.clone() else {
            // A whole object, one copy: checked, never repairable here.
            tally.checked += 1;
            let f = FragmentPlacement {
                index: 0,
                node: p.node.clone(),
                instance_id: p.instance_id.clone(),
                object_id: p.object_id.clone(),
                size: p.size,
                sha256: p.sha256.clone(),
                missing: false,
            };
            let state = self.scrub_fragment(&f).await;
            if state != FragmentState::Good {
                match state {
                    FragmentState::Missing => tally.missing += 1,
                    FragmentState::Corrupt => tally.corrupt += 1,
                    FragmentState::Unreachable | FragmentState::Good => tally.unreachable += 1,
                }
                tally.failures.push(format!(
                    "{} on {}: {state:?}; stored whole (no [erasure]), nothing to rebuild from",
                    p.object_id, p.node
                ));
            }
            return false;
        };
        let scheme = Scheme {
            k: rec.k as usize,
            m: rec.m as usize,
        };
        let mut bad: Vec<(usize, FragmentState)> = Vec::new();
        // Every fragment re-hashed on its node at once (each node hashes
        // its own; nothing moves).
        let mut scrubs = tokio::task::JoinSet::new();
        for (i, f) in rec.fragments.iter().enumerate() {
            let this = self.clone();
            let f = f.clone();
            scrubs.spawn(async move { (i, this.scrub_fragment(&f).await) });
        }
        let mut states = vec![FragmentState::Unreachable; rec.fragments.len()];
        while let Some(joined) = scrubs.join_next().await {
            if let Ok((i, state)) = joined {
                states[i] = state;
            }
        }
        for (i, f) in rec.fragments.iter().enumerate() {
            tally.checked += 1;
            let state = states[i];
            match state {
                FragmentState::Good => {}
                FragmentState::Missing => tally.missing += 1,
                FragmentState::Corrupt => tally.corrupt += 1,
                FragmentState::Unreachable => tally.unreachable += 1,
            }
            let evacuating = evacuate.is_some_and(|e| e == f.node);
            if state != FragmentState::Good || evacuating {
                bad.push((i, state));
                tally.actions.push(format!(
                    "{}{} fragment {} on {}: {}{}",
                    if dry_run { "would rebuild " } else { "" },
                    p.object_id,
                    f.index,
                    f.node,
                    format!("{state:?}").to_lowercase(),
                    if evacuating {
                        " (evacuating the node)"
                    } else {
                        ""
                    }
                ));
            }
        }
        if bad.is_empty() || dry_run {
            return false;
        }
        let limit = p.size.max(1);
        let data = match self.read_object(p, limit, false).await {
            Ok((d, _)) => d,
            Err(e) => {
                tally
                    .failures
                    .push(format!("{}: cannot rebuild: {e}", p.object_id));
                return false;
            }
        };
        let object_id = p.object_id.clone();
        // read_object checked the bytes against the recorded digest.
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(&p.sha256, &mut digest).is_err() {
            tally.failures.push(format!(
                "{}: the recorded SHA-256 does not parse",
                p.object_id
            ));
            return false;
        }
        let frags = match tokio::task::spawn_blocking(move || {
            tessera_erasure::encode_hashed(&object_id, scheme, &data, digest)
        })
        .await
        {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tally.failures.push(format!("{}: encode: {e}", p.object_id));
                return false;
            }
            Err(e) => {
                tally
                    .failures
                    .push(format!("{}: encode task: {e}", p.object_id));
                return false;
            }
        };
        let Some(rec) = p.erasure.as_mut() else {
            return false;
        };
        let nodes = &self.inner.up.nodes;
        let mut changed = false;
        for (i, state) in bad {
            let old = rec.fragments[i].clone();
            let evacuating = evacuate.is_some_and(|e| e == old.node);
            // The same node when it answers and is not being drained;
            // otherwise a healthy node holding no fragment of this object.
            let holding: BTreeSet<String> = rec.fragments.iter().map(|f| f.node.clone()).collect();
            let same_ok = !evacuating
                && state != FragmentState::Unreachable
                && healthy
                    .iter()
                    .any(|h| nodes.get(h.index).is_some_and(|n| n.name == old.node));
            let target = if same_ok {
                healthy
                    .iter()
                    .find(|h| nodes.get(h.index).is_some_and(|n| n.name == old.node))
            } else {
                rank_nodes(&p.object_id, healthy, nodes, frags[i].len() as u64)
                    .into_iter()
                    .find(|h| {
                        nodes.get(h.index).is_some_and(|n| {
                            !holding.contains(&n.name) && evacuate != Some(n.name.as_str())
                        })
                    })
            };
            let Some(target) = target else {
                tally.failures.push(format!(
                    "{} fragment {}: no healthy node without a fragment of this object to rebuild it on",
                    p.object_id, old.index
                ));
                continue;
            };
            let node = nodes[target.index].clone();
            let mut c = node.client.clone();
            // A corrupt copy is replaced: remove it first (idempotent put
            // would keep the old bytes under the same id).
            if same_ok && state == FragmentState::Corrupt {
                let _ = upstream::delete_object(&node, &old.object_id).await;
            }
            match tessera_storage_client::put_object(&mut c, &old.object_id, &frags[i]).await {
                Ok(r) => {
                    let info = r.info.unwrap_or_default();
                    let f = &mut rec.fragments[i];
                    f.node = node.name.clone();
                    f.instance_id = target.instance_id.clone();
                    f.size = info.size;
                    f.sha256 = hex::encode(info.sha256);
                    f.missing = false;
                    changed = true;
                    if same_ok {
                        tally.rebuilt += 1;
                        tally.actions.push(format!(
                            "rebuilt {} fragment {} on {}",
                            p.object_id, old.index, node.name
                        ));
                    } else {
                        tally.moved += 1;
                        if state == FragmentState::Missing || state == FragmentState::Corrupt {
                            tally.rebuilt += 1;
                        }
                        tally.actions.push(format!(
                            "rebuilt {} fragment {} on {} (was on {})",
                            p.object_id, old.index, node.name, old.node
                        ));
                        // Best effort: the old copy off the old node.
                        if let Ok(oldn) = self.inner.up.node(&old.node) {
                            let _ = upstream::delete_object(oldn, &old.object_id).await;
                        }
                    }
                    tracing::info!(object = %p.object_id, fragment = old.index, from = %old.node, to = %node.name, "fragment rebuilt");
                }
                Err(s) => tally.failures.push(format!(
                    "{} fragment {}: writing to {} failed: {}",
                    p.object_id,
                    old.index,
                    node.name,
                    s.message()
                )),
            }
        }
        changed
    }

    /// Rolls back the stores an earlier gateway process left pending (a
    /// crash mid-store) that its start-up sweep could not finish (a node
    /// was down then). Records created since this process started may be
    /// in flight and are left alone; interrupted deletes are finished at
    /// the next start.
    pub(crate) async fn finish_interrupted(&self, dry_run: bool, tally: &mut RepairTally) {
        use crate::vault::StudyState;
        let started = self.inner.started_unix;
        let found = crate::shared::with_vault(&self.inner.vault, |v| {
            Ok((v.unfinished()?, v.unfinished_instances()?))
        })
        .await;
        let (studies, instances) = match found {
            Ok(v) => v,
            Err(e) => {
                tally
                    .failures
                    .push(format!("reading unfinished records: {e}"));
                return;
            }
        };
        for rec in studies
            .iter()
            .filter(|r| r.state == StudyState::Pending && r.created_unix < started)
        {
            tally.actions.push(format!(
                "{}roll back the interrupted store of {}",
                if dry_run { "would " } else { "" },
                rec.study_id
            ));
            if !dry_run {
                self.rollback(rec).await;
                tally.interrupted += 1;
            }
        }
        for rec in instances.iter().filter(|r| r.created_unix < started) {
            tally.actions.push(format!(
                "{}roll back the interrupted store of instance {} of {}",
                if dry_run { "would " } else { "" },
                rec.instance_id,
                rec.study_id
            ));
            if !dry_run && self.rollback_instance(rec).await {
                tally.interrupted += 1;
            }
        }
    }

    /// Removes objects that no record names from every healthy node: what a
    /// crash left between a node's write and the vault, or a moved
    /// fragment's old copy on a node that was away. Only objects older
    /// than `grace_secs` (by the node's clock) are touched: a store writes
    /// its intent record before its objects, so an object older than the
    /// record listing below is either named there or an orphan.
    pub(crate) async fn sweep_orphans(
        &self,
        healthy: &[NodeHealth],
        grace_secs: u64,
        dry_run: bool,
        tally: &mut RepairTally,
    ) {
        let listed_at = crate::shared::now_unix();
        let referenced = crate::shared::with_vault(&self.inner.vault, |v| {
            let mut ids = std::collections::HashSet::new();
            let mut add = |ps: &[SharePlacement]| {
                for p in ps {
                    ids.insert(p.object_id.clone());
                    for f in p.erasure.iter().flat_map(|e| e.fragments.iter()) {
                        ids.insert(f.object_id.clone());
                    }
                }
            };
            // Unfinished first: a store that commits meanwhile is then seen
            // by one read or the other.
            let mut studies = v.unfinished()?;
            for id in v.committed_ids()? {
                studies.extend(v.get(&id)?);
            }
            for r in &studies {
                add(&r.placements);
                for i in v.instances(&r.study_id)? {
                    add(&i.placements);
                }
            }
            for i in v.unfinished_instances()? {
                add(&i.placements);
            }
            Ok(ids)
        })
        .await;
        let referenced = match referenced {
            Ok(r) => r,
            Err(e) => {
                tally
                    .failures
                    .push(format!("orphan sweep: reading the vault: {e}"));
                return;
            }
        };
        for h in healthy {
            let Some(node) = self.inner.up.nodes.get(h.index) else {
                continue;
            };
            let mut c = node.client.clone();
            let mut start_after = String::new();
            loop {
                let page = match c
                    .list(tessera_proto::storage::v1::ListRequest {
                        prefix: String::new(),
                        start_after: start_after.clone(),
                        limit: 1000,
                    })
                    .await
                {
                    Ok(r) => r.into_inner(),
                    Err(s) => {
                        tally.failures.push(format!(
                            "orphan sweep: listing {}: {}",
                            node.name,
                            s.message()
                        ));
                        break;
                    }
                };
                for o in &page.objects {
                    if referenced.contains(&o.object_id)
                        || o.created_unix.saturating_add(grace_secs) >= listed_at
                    {
                        continue;
                    }
                    tally.actions.push(format!(
                        "{}remove orphan {} on {} ({} bytes, named by no record)",
                        if dry_run { "would " } else { "" },
                        o.object_id,
                        node.name,
                        o.size
                    ));
                    if dry_run {
                        continue;
                    }
                    match upstream::delete_object(node, &o.object_id).await {
                        Ok(()) => {
                            tally.orphans += 1;
                            tracing::info!(object = %o.object_id, node = %node.name, "orphan removed");
                        }
                        Err(e) => tally
                            .failures
                            .push(format!("orphan {} on {}: {e}", o.object_id, node.name)),
                    }
                }
                if page.next_start_after.is_empty() || page.objects.is_empty() {
                    break;
                }
                start_after = page.next_start_after;
            }
        }
    }
}
