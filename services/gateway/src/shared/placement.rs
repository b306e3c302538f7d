//! Placement: which storage nodes receive a study's shares. A policy object,
//! so k-of-n erasure-coded placement can replace it without touching the
//! store flow.
//!
//! [`DistinctNodes`] (the default) ranks the healthy nodes by rendezvous
//! hashing of the study id (SHA-256 of id and node name): studies spread
//! evenly, the choice for a study is stable while the node set is, and it
//! never depends on who the patient is. Nodes without room for the share
//! are skipped. Both shares never land on one node (nor on one node
//! instance reached by two names: the probe removes those).

use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::upstream::NodeHealth;

/// Chooses nodes for `shares` shares of `share_bytes` each.
pub trait PlacementPolicy: Send + Sync {
    /// Indices into `healthy` (one per share, distinct), or why not.
    fn place(
        &self,
        study_id: &str,
        healthy: &[NodeHealth],
        node_names: &[String],
        shares: usize,
        share_bytes: u64,
    ) -> Result<Vec<usize>, String>;
}

/// One share per node, on distinct nodes, by rendezvous hashing.
#[derive(Clone, Copy, Debug, Default)]
pub struct DistinctNodes;

impl PlacementPolicy for DistinctNodes {
    fn place(
        &self,
        study_id: &str,
        healthy: &[NodeHealth],
        node_names: &[String],
        shares: usize,
        share_bytes: u64,
    ) -> Result<Vec<usize>, String> {
        let mut ranked: Vec<(Vec<u8>, usize)> = healthy
            .iter()
            .enumerate()
            .filter(|(_, h)| h.free_bytes >= share_bytes && h.max_object_bytes >= share_bytes)
            .map(|(i, h)| {
                let name = node_names.get(h.index).map(String::as_str).unwrap_or("");
                let mut d = Sha256::new();
                d.update(study_id.as_bytes());
                d.update([0u8]);
                d.update(name.as_bytes());
                (d.finalize().to_vec(), i)
            })
            .collect();
        if ranked.len() < shares {
            return Err(format!(
                "{shares} distinct storage nodes with room for {share_bytes} bytes are needed, {} are available",
                ranked.len()
            ));
        }
        ranked.sort();
        Ok(ranked.into_iter().take(shares).map(|(_, i)| i).collect())
    }
}

/// Runs a policy and turns a refusal into UNAVAILABLE naming the nodes that
/// did not answer.
pub fn place(
    policy: &dyn PlacementPolicy,
    study_id: &str,
    healthy: &[NodeHealth],
    problems: &[String],
    node_names: &[String],
    shares: usize,
    share_bytes: u64,
) -> Result<Vec<usize>, GatewayError> {
    policy
        .place(study_id, healthy, node_names, shares, share_bytes)
        .map_err(|why| {
            if problems.is_empty() {
                GatewayError::Unavailable(why)
            } else {
                GatewayError::Unavailable(format!("{why}; {}", problems.join("; ")))
            }
        })
}

#[cfg(test)]
mod tests {
    use crate::shared::placement::*;

    fn health(index: usize, free: u64) -> NodeHealth {
        NodeHealth {
            index,
            instance_id: format!("i{index}"),
            free_bytes: free,
            max_object_bytes: u64::MAX,
        }
    }

    #[test]
    fn distinct_stable_and_spread() {
        let names: Vec<String> = (1..=3).map(|i| format!("storage-{i}")).collect();
        let healthy: Vec<NodeHealth> = (0..3).map(|i| health(i, 1 << 30)).collect();
        let mut counts = [0usize; 3];
        for s in 0..600 {
            let id = format!("st-{s:032x}");
            let p = DistinctNodes.place(&id, &healthy, &names, 2, 10).unwrap();
            assert_eq!(p.len(), 2);
            assert_ne!(p[0], p[1]);
            assert_eq!(
                p,
                DistinctNodes.place(&id, &healthy, &names, 2, 10).unwrap()
            );
            for i in p {
                counts[i] += 1;
            }
        }
        // 1200 shares over 3 nodes: each gets a fair part.
        for c in counts {
            assert!((300..=500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn refuses_without_two_nodes_with_room_and_names_problems() {
        let names: Vec<String> = (1..=3).map(|i| format!("storage-{i}")).collect();
        let healthy = vec![health(0, 1 << 30), health(1, 5)];
        let e = place(
            &DistinctNodes,
            "st-1",
            &healthy,
            &["storage node storage-3 (x): no answer".to_string()],
            &names,
            2,
            10,
        )
        .unwrap_err();
        let GatewayError::Unavailable(m) = e else {
            panic!("{e:?}")
        };
        assert!(m.contains("storage-3"), "{m}");
    }
}
