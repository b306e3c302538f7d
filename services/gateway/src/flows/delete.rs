//! Delete and repair: Delete (the owner's; crypto-shredding at the
//! keyserver after the objects are gone), Repair (one scrub-and-repair pass
//! over a study or all of them) and the background repairer.

use tessera_proto::gateway::v1 as pb;

use crate::convert::check_handle;
use std::sync::Arc;

use crate::durability::{Pacer, Pass, RepairTally, placement_to_proto};
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result, with_vault};
use crate::vault::StudyState;

/// Most studies one page of a Repair pass covers (`page_size`).
pub const MAX_REPAIR_PAGE: u32 = 1000;

impl GatewayService {
    pub(crate) async fn delete_inner(
        &self,
        caller: String,
        r: pb::DeleteStudyRequest,
    ) -> Result<pb::DeleteStudyResponse> {
        check_handle("study_handle", &r.study_handle)?;
        let h = r.study_handle.clone();
        let rec = with_vault(&self.inner.vault, move |v| v.get(&h))
            .await?
            .filter(|r| r.state != StudyState::Pending)
            .ok_or_else(|| GatewayError::NotFound(format!("study {}", r.study_handle)))?;
        if rec.owner != caller {
            return Err(crate::access::refuse(
                "Delete",
                &caller,
                format!("only the study's owner may delete {}", rec.study_id),
            ));
        }
        // Invisible from now on; a failure below leaves it `Deleting` and a
        // second Delete (or the next start) finishes the job.
        let mut deleting = rec.clone();
        deleting.state = StudyState::Deleting;
        deleting.replica = self.inner.vault.replica().to_owned();
        with_vault(&self.inner.vault, move |v| v.put(&deleting)).await?;
        let mut removed: Vec<pb::Placement> =
            rec.placements.iter().map(placement_to_proto).collect();
        if rec.is_dicom() {
            removed.extend(self.delete_instances(&rec).await?);
        }
        for p in &rec.placements {
            self.delete_placement(p).await?;
        }
        self.forget(&rec).await?;
        let r = rec.clone();
        with_vault(&self.inner.vault, move |v| {
            if r.is_dicom() {
                v.remove_dicom_study(&r)
            } else {
                v.remove(&r.study_id)
            }
        })
        .await?;
        tracing::info!(study = %rec.study_id, "deleted and key material destroyed");
        Ok(pb::DeleteStudyResponse {
            removed,
            key_destroyed: true,
        })
    }

    /// The background repairer: a scrub-and-repair pass over every object
    /// every `interval`, at most `per_sec` objects a second. Runs until the
    /// task is aborted (gateway shutdown).
    pub async fn repair_forever(self, interval: std::time::Duration, per_sec: u32) {
        loop {
            tokio::time::sleep(interval).await;
            match self
                .repair_pass(
                    pb::RepairRequest {
                        study_handle: String::new(),
                        dry_run: false,
                        evacuate_node: String::new(),
                        page_size: 0,
                        page_token: String::new(),
                    },
                    Some(per_sec),
                )
                .await
            {
                Ok(r) if r.failures.is_empty() => tracing::info!(
                    objects = r.objects,
                    rebuilt = r.fragments_rebuilt,
                    missing = r.fragments_missing,
                    corrupt = r.fragments_corrupt,
                    "background repair pass"
                ),
                Ok(r) => {
                    tracing::warn!(failures = ?r.failures, rebuilt = r.fragments_rebuilt, "background repair pass left objects short")
                }
                Err(e) => tracing::warn!(error = %e, "background repair pass failed"),
            }
        }
    }

    pub(crate) async fn repair_inner(&self, r: pb::RepairRequest) -> Result<pb::RepairResponse> {
        self.repair_pass(r, None).await
    }

    /// One scrub (and, unless `dry_run`, repair) pass, or one page of it
    /// (`page_size` studies after `page_token`); `rate` bounds the
    /// objects checked per second. Up to `[erasure]
    /// repair_studies_in_flight` studies are repaired at once (the rate
    /// holds across them); their findings are reported in study order.
    async fn repair_pass(
        &self,
        r: pb::RepairRequest,
        rate: Option<u32>,
    ) -> Result<pb::RepairResponse> {
        if r.page_size > MAX_REPAIR_PAGE {
            return Err(GatewayError::InvalidArgument(format!(
                "page_size: at most {MAX_REPAIR_PAGE} studies a page (0: every study in one answer)"
            )));
        }
        if !r.page_token.is_empty() {
            if r.page_size == 0 {
                return Err(GatewayError::InvalidArgument(
                    "page_token needs a page_size".into(),
                ));
            }
            check_handle("page_token", &r.page_token)?;
        }
        let mut ids = if r.study_handle.is_empty() {
            with_vault(&self.inner.vault, |v| v.committed_ids()).await?
        } else {
            check_handle("study_handle", &r.study_handle)?;
            vec![self.committed(&r.study_handle).await?.study_id]
        };
        // A page: the next page_size studies in id order after the token.
        let mut next_page_token = String::new();
        if r.page_size > 0 {
            ids.retain(|id| id.as_str() > r.page_token.as_str());
            if ids.len() > r.page_size as usize {
                ids.truncate(r.page_size as usize);
                next_page_token = ids.last().cloned().unwrap_or_default();
            }
        }
        if !r.evacuate_node.is_empty() {
            self.inner.up.node(&r.evacuate_node)?;
        }
        let evacuate = (!r.evacuate_node.is_empty()).then(|| r.evacuate_node.clone());
        let (healthy, _) = self.inner.up.probe().await;
        let healthy = Arc::new(healthy);
        let pacer = rate.map(|n| Arc::new(Pacer::per_sec(n)));
        let in_flight = self
            .inner
            .limits
            .erasure
            .map_or(crate::config::DEFAULT_REPAIR_STUDIES_IN_FLIGHT, |e| {
                e.repair_studies_in_flight
            })
            .max(1);
        let mut tasks = tokio::task::JoinSet::new();
        let mut done: Vec<Option<RepairTally>> = vec![None; ids.len()];
        let mut queued = ids.iter().cloned().enumerate();
        loop {
            while tasks.len() < in_flight {
                let Some((i, id)) = queued.next() else { break };
                let this = self.clone();
                let (healthy, evacuate, pacer) = (healthy.clone(), evacuate.clone(), pacer.clone());
                let dry_run = r.dry_run;
                tasks.spawn(async move {
                    let pass = Pass {
                        healthy: &healthy,
                        evacuate: evacuate.as_deref(),
                        dry_run,
                        pace: pacer.as_deref(),
                    };
                    (i, this.repair_study(&id, &pass).await)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (i, t) = joined.map_err(|e| GatewayError::Internal(format!("repair task: {e}")))?;
            done[i] = Some(t?);
        }
        let mut tally = RepairTally::default();
        for t in done.into_iter().flatten() {
            tally.merge(t);
        }
        // Whole-pass work, once: on the last page of a paged pass.
        if r.study_handle.is_empty() && r.evacuate_node.is_empty() && next_page_token.is_empty() {
            self.finish_interrupted(r.dry_run, &mut tally).await;
            let grace = self
                .inner
                .limits
                .erasure
                .map_or(crate::durability::DEFAULT_ORPHAN_GRACE_SECS, |e| {
                    e.orphan_grace_secs
                });
            self.sweep_orphans(&healthy, grace, r.dry_run, &mut tally)
                .await;
        }
        self.inner.repair_counters.add(&tally);
        tracing::info!(
            studies = ids.len(),
            objects = tally.objects,
            rebuilt = tally.rebuilt,
            moved = tally.moved,
            failures = tally.failures.len(),
            dry_run = r.dry_run,
            "repair pass"
        );
        Ok(pb::RepairResponse {
            studies: ids.len() as u64,
            objects: tally.objects,
            fragments_checked: tally.checked,
            fragments_missing: tally.missing,
            fragments_corrupt: tally.corrupt,
            fragments_unreachable: tally.unreachable,
            fragments_rebuilt: tally.rebuilt,
            fragments_moved: tally.moved,
            interrupted_finished: tally.interrupted,
            orphans_removed: tally.orphans,
            failures: tally.failures,
            actions: tally.actions,
            next_page_token,
        })
    }

    /// Scrubs and repairs one study's objects (a DICOM study's instances
    /// too), saving each record that changed. A study deleted meanwhile is
    /// skipped, not an error.
    async fn repair_study(&self, id: &str, pass: &Pass<'_>) -> Result<RepairTally> {
        let mut tally = RepairTally::default();
        let Ok(mut rec) = self.committed(id).await else {
            return Ok(tally);
        };
        if self
            .repair_placements(&mut rec.placements, pass, &mut tally)
            .await
        {
            let rr = rec.clone();
            with_vault(&self.inner.vault, move |v| v.put(&rr)).await?;
        }
        if rec.is_dicom() {
            for mut inst in self.committed_instances(&rec).await? {
                if self
                    .repair_placements(&mut inst.placements, pass, &mut tally)
                    .await
                {
                    with_vault(&self.inner.vault, move |v| v.put_instance(&inst)).await?;
                }
            }
        }
        Ok(tally)
    }
}
