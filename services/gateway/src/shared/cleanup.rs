//! Rollback: removing what a failed store, an unfinished delete or a crash
//! left (objects, instance records, the keyserver registration, the vault
//! record), shared by the image, DICOM and delete flows and by the sweep at
//! start. Anything that fails keeps its record for the next attempt.

use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
use tonic::Code;

use crate::durability::placement::placement_to_proto;
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result, with_vault};
use crate::vault::{InstanceRecord, SharePlacement, StudyRecord};

impl GatewayService {
    /// Removes what a failed store (or an unfinished delete) left: the
    /// shares, the study at the keyserver, then the vault record. Anything
    /// that fails keeps the record, and the next start tries again.
    ///
    /// The record is claimed first ([`crate::vault::Vault::claim`]): one
    /// that another replica committed, took over or removed meanwhile is
    /// left to it. When the vault cannot be read the rollback goes ahead
    /// (its last step, removing the record, then fails too, and the record
    /// stays for the next attempt).
    pub(crate) async fn rollback(&self, rec: &StudyRecord) {
        let r = rec.clone();
        match with_vault(&self.inner.vault, move |v| v.claim(&r)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(study = %rec.study_id, "cleanup: the record was committed, taken over or removed by another replica; left to it");
                return;
            }
            Err(e) => {
                tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot claim the record; rolling back anyway")
            }
        }
        let mut clean = true;
        if rec.is_dicom()
            && let Err(e) = self.delete_instances(rec).await
        {
            clean = false;
            tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot delete the study's instances");
        }
        clean &= self
            .delete_objects_logged(&rec.study_id, &rec.placements)
            .await;
        if let Err(e) = self.forget(rec).await {
            clean = false;
            tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot forget study");
        }
        if clean {
            let r = rec.clone();
            let removed = with_vault(&self.inner.vault, move |v| {
                if r.is_dicom() {
                    v.remove_dicom_study(&r)
                } else {
                    v.remove(&r.study_id)
                }
            });
            if let Err(e) = removed.await {
                tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot remove vault record");
            }
        }
    }

    /// Best-effort removal of objects for a cleanup: every object is tried,
    /// each failure logged; true when all are gone.
    pub(crate) async fn delete_objects_logged(
        &self,
        study: &str,
        placements: &[SharePlacement],
    ) -> bool {
        let mut clean = true;
        for p in placements {
            if let Err(e) = self.delete_placement(p).await {
                clean = false;
                tracing::warn!(%study, object = %p.object_id, error = %e, "cleanup: cannot delete object");
            }
        }
        clean
    }

    /// Crypto-shredding at the keyserver; a study it does not know is done.
    pub(crate) async fn forget(&self, rec: &StudyRecord) -> Result<bool> {
        self.inner.keys.forget_keys(&rec.study_id);
        let mut ks = self.inner.up.keyserver.clone();
        match ks
            .forget_study(kpb::ForgetStudyRequest {
                study_id: rec.study_id.clone(),
                on_behalf_of: rec.owner.clone(),
            })
            .await
        {
            Ok(_) => {
                self.forget_at_watermark(&rec.study_id).await;
                Ok(true)
            }
            Err(s) if s.code() == Code::NotFound => {
                self.forget_at_watermark(&rec.study_id).await;
                Ok(false)
            }
            Err(s) => Err(GatewayError::upstream("keyserver", s)),
        }
    }

    /// Drops the protect keys the watermark service keeps for a forgotten
    /// study. Best effort: when it cannot be reached, its kept key expires
    /// within its 30 s anyway, and the keyserver refuses any new derivation.
    async fn forget_at_watermark(&self, study_id: &str) {
        let mut wm = self.inner.up.watermark.clone();
        if let Err(s) = wm
            .forget_study(tessera_proto::watermark::v1::ForgetStudyRequest {
                study_id: study_id.to_owned(),
            })
            .await
        {
            tracing::warn!(study = %study_id, code = ?s.code(), error = %s.message(), "the watermark service did not drop the study's kept protect keys (they expire within 30 s)");
        }
    }

    /// Finishes what a crash interrupted (called once at start): records
    /// of this process and of other live replicas are left alone.
    pub async fn sweep_unfinished(&self) {
        self.sweep_instances().await;
        let recs = match with_vault(&self.inner.vault, |v| v.recoverable_studies()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "vault sweep failed");
                return;
            }
        };
        for rec in recs {
            tracing::info!(study = %rec.study_id, state = ?rec.state, "finishing an interrupted store/delete");
            self.rollback(&rec).await;
        }
        self.watch_held().await;
    }

    /// Looks again, every lease, at the unfinished records the sweep had to
    /// leave to another live replica, until each is committed, removed, or
    /// finished here once its writer's lease lapsed. The writer may be an
    /// earlier run of this very gateway restarted within its lease (a new
    /// replica id: its interrupted store or delete would otherwise wait for
    /// the next start), or a replica that dies before finishing.
    pub(crate) async fn watch_held(&self) {
        let (mut studies, mut instances) = match with_vault(&self.inner.vault, |v| v.held()).await {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "vault sweep: cannot list the records held by other replicas");
                return;
            }
        };
        let every = std::time::Duration::from_secs(self.inner.vault.lease_secs() + 1);
        while !studies.is_empty() || !instances.is_empty() {
            tracing::info!(
                studies = studies.len(),
                instances = instances.len(),
                "unfinished records held by live replicas; looking again after the lease"
            );
            tokio::time::sleep(every).await;
            let (s, i) = (studies.clone(), instances.clone());
            let ((ready_s, ready_i), (held_s, held_i)) = match with_vault(
                &self.inner.vault,
                move |v| v.recheck(&s, &i),
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "vault sweep: cannot look at the held records again");
                    continue;
                }
            };
            for rec in ready_i {
                tracing::info!(study = %rec.study_id, instance = %rec.instance_id, "removing an interrupted DICOM store (its writer's lease lapsed)");
                self.rollback_instance(&rec).await;
            }
            for rec in ready_s {
                tracing::info!(study = %rec.study_id, state = ?rec.state, "finishing an interrupted store/delete (its writer's lease lapsed)");
                self.rollback(&rec).await;
            }
            (studies, instances) = (held_s, held_i);
        }
    }

    /// Removes a failed instance's objects and record (kept for the next
    /// start's sweep when a node cannot be reached).
    /// Claimed first, as in [`Self::rollback`]: false when another replica
    /// committed, took over or removed it meanwhile.
    pub(crate) async fn rollback_instance(&self, rec: &InstanceRecord) -> bool {
        let r = rec.clone();
        match with_vault(&self.inner.vault, move |v| v.claim_instance(&r)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(study = %rec.study_id, instance = %rec.instance_id, "cleanup: the instance record was committed, taken over or removed by another replica; left to it");
                return false;
            }
            Err(e) => {
                tracing::warn!(study = %rec.study_id, instance = %rec.instance_id, error = %e, "cleanup: cannot claim the instance record; rolling back anyway")
            }
        }
        let mut clean = self
            .delete_objects_logged(&rec.study_id, &rec.placements)
            .await;
        if clean {
            let r = rec.clone();
            if let Err(e) = with_vault(&self.inner.vault, move |v| v.remove_instance(&r)).await {
                tracing::warn!(study = %rec.study_id, error = %e, "cleanup: cannot remove instance record");
                clean = false;
            }
        }
        clean
    }

    /// Deletes every instance of a DICOM study (objects, then records).
    /// Returns the removed placements, or the first failure.
    pub(crate) async fn delete_instances(&self, study: &StudyRecord) -> Result<Vec<pb::Placement>> {
        let id = study.study_id.clone();
        let instances = with_vault(&self.inner.vault, move |v| v.instances(&id)).await?;
        let mut removed = Vec::new();
        for inst in instances {
            for p in &inst.placements {
                self.delete_placement(p).await?;
                removed.push(placement_to_proto(p));
            }
            with_vault(&self.inner.vault, move |v| v.remove_instance(&inst)).await?;
        }
        Ok(removed)
    }

    /// Finishes instances a crash left pending (called once at start).
    pub(crate) async fn sweep_instances(&self) {
        match with_vault(&self.inner.vault, |v| v.recoverable_instances()).await {
            Ok(recs) => {
                for rec in recs {
                    tracing::info!(study = %rec.study_id, instance = %rec.instance_id, "removing an interrupted DICOM store");
                    self.rollback_instance(&rec).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "vault sweep of instances failed"),
        }
    }
}
