//! The orphan sweep: objects on a node that no vault record names.

use super::counters::RepairTally;
use crate::shared::GatewayService;
use crate::upstream::{self, NodeHealth};
use crate::vault::SharePlacement;

/// Seconds an object must have existed on its node before the orphan sweep
/// may remove it (`[erasure] orphan_grace_secs`): longer than any store.
pub(crate) const DEFAULT_ORPHAN_GRACE_SECS: u64 = 3600;

impl GatewayService {
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
