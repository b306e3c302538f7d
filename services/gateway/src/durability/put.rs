//! Erasure-coded writes: spreading an object's `k + m` fragments over
//! distinct healthy nodes, writing them (acknowledged at the write
//! quorum), and deleting an object's fragments.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use tessera_erasure::Scheme;
use tonic::Status;

use super::placement::rank_nodes;
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result};
use crate::upstream::{self, NodeHealth};
use crate::vault::{ErasureRecord, FragmentPlacement, SharePlacement};

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
        let fragment_bound = crate::sizes::per_node_bytes(object_bound, Some((e.data, e.parity)));
        let nodes = &self.inner.up.nodes;
        let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
        for p in placements.iter_mut() {
            let ranked = rank_nodes(&p.object_id, healthy, nodes, fragment_bound);
            if ranked.len() < e.quorum() {
                if let Some(err) = crate::shared::placement::over_cap(
                    healthy,
                    &names,
                    e.quorum(),
                    fragment_bound,
                    self.inner.limits.node_cap_needed(),
                ) {
                    return Err(err);
                }
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
            // The share goes as soon as its bytes are in the data fragments.
            tessera_erasure::encode_owned(&object_id, scheme, data, digest).map(|f| (f, digest))
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
                let len = bytes.len() as u64;
                let r = tessera_storage_client::put_object_owned(&mut c, &id, bytes)
                    .await
                    .map_err(|s| node.err(s))?;
                let info = r.info.unwrap_or_default();
                if info.size != len || info.sha256.len() != 32 {
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
        if first_err.is_some() {
            // A node did not take its fragment: the next store probes anew.
            self.inner.up.forget_probe();
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
