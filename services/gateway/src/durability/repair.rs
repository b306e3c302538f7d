//! Scrub and repair of stored objects: every fragment re-hashed on its
//! node, what is missing or corrupt rebuilt (on the same node or another),
//! fragments moved off a node being evacuated; and the roll-back of stores
//! an earlier process left pending.

use std::collections::BTreeSet;

use tessera_erasure::Scheme;

use super::counters::RepairTally;
use super::placement::rank_nodes;
use crate::shared::GatewayService;
use crate::upstream::{self, NodeHealth};
use crate::vault::{FragmentPlacement, SharePlacement};

/// The settings of one scrub/repair pass.
pub(crate) struct Pass<'a> {
    pub healthy: &'a [NodeHealth],
    /// Move every fragment off this node.
    pub evacuate: Option<&'a str>,
    pub dry_run: bool,
    /// The background pass's bounded rate, shared by the studies it
    /// repairs at once.
    pub pace: Option<&'a Pacer>,
}

/// Spaces objects `interval` apart across every task that waits on it (a
/// rate bound that holds however many studies are repaired at once).
#[derive(Debug)]
pub(crate) struct Pacer {
    interval: std::time::Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pacer {
    /// At most `per_sec` objects a second.
    pub(crate) fn per_sec(per_sec: u32) -> Self {
        Self {
            interval: std::time::Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1))),
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for the next free slot and takes it.
    pub(crate) async fn wait(&self) {
        let at = {
            let mut next = self
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
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
            if let Some(pace) = pass.pace {
                pace.wait().await;
            }
            changed |= self
                .repair_placement(p, pass.healthy, pass.evacuate, pass.dry_run, tally)
                .await;
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
    /// was down then). This process's own records may be in flight and
    /// are left alone (unstamped ones from before replicas: those created
    /// since this process started), and so are the records of other
    /// replicas whose lease is live (a shared PostgreSQL vault);
    /// interrupted deletes are finished at the next start.
    pub(crate) async fn finish_interrupted(&self, dry_run: bool, tally: &mut RepairTally) {
        use crate::vault::StudyState;
        let started = self.inner.started_unix;
        let found = crate::shared::with_vault(&self.inner.vault, |v| {
            Ok((v.recoverable_studies()?, v.recoverable_instances()?))
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
        for rec in studies.iter().filter(|r| {
            r.state == StudyState::Pending && (!r.replica.is_empty() || r.created_unix < started)
        }) {
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
        for rec in instances
            .iter()
            .filter(|r| !r.replica.is_empty() || r.created_unix < started)
        {
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
}

#[cfg(test)]
mod tests {
    use crate::durability::repair::Pacer;

    /// Several studies repaired at once share one rate: 3 tasks x 4
    /// objects at 100 a second take at least 11 intervals (the first slot
    /// is now), not 3.
    #[tokio::test]
    async fn the_rate_holds_across_tasks() {
        let pacer = std::sync::Arc::new(Pacer::per_sec(100));
        let t0 = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..3 {
            let p = pacer.clone();
            tasks.spawn(async move {
                for _ in 0..4 {
                    p.wait().await;
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        assert!(
            t0.elapsed() >= std::time::Duration::from_millis(110),
            "{:?}",
            t0.elapsed()
        );
    }
}
