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
    pub(crate) async fn rollback(&self, rec: &StudyRecord) {
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
    }

    /// Removes a failed instance's objects and record (kept for the next
    /// start's sweep when a node cannot be reached).
    pub(crate) async fn rollback_instance(&self, rec: &InstanceRecord) -> bool {
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
