//! Where an object's fragments go, and how a placement is shown: pure
//! functions over the probe's answer and the vault's records.

use sha2::{Digest, Sha256};

use crate::upstream::{Node, NodeHealth};
use crate::vault::SharePlacement;

/// Orders `healthy` for `object_id`: rendezvous hashing, then one node per
/// zone in turn, so consecutive picks fall in different zones first.
pub(super) fn rank_nodes<'a>(
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
