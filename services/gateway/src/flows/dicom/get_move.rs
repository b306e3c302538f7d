//! C-GET and C-MOVE: the instances a Study Root identifier selects (from
//! the query index, as C-FIND sees them), each study read under the peer's
//! usable grant on it (the one that expires first; a DICOM client cannot
//! name a request) and one use spent per study and request, as
//! RetrieveDicom does: checked before anything is read, spent once the
//! study's first instance is rebuilt. Files are byte-identical for roles
//! that may re-identify, de-identified for the others.

use std::sync::Arc;

use tessera_dicom::query::TagPair;
use tokio::sync::mpsc;

use super::profile_for;
use super::query::{DicomPeer, Seen, Visible};
use super::read_ahead::{ReadAhead, Rebuild};
use crate::error::GatewayError;
use crate::shared::{GatewayService, Result};

/// What a retrieve will send: `count` files on `files` (an `Err` is one
/// failed instance, with its reason).
pub struct RetrievePlan {
    pub count: usize,
    pub files: mpsc::Receiver<std::result::Result<Vec<u8>, String>>,
}

/// The refusal of a retrieve for lack of a grant: names how to ask.
pub(crate) fn no_grant(identity: &str, study: &str) -> String {
    format!(
        "{identity} holds no valid grant on study {study}: ask the owner with `tessera request-key {study}` (RequestAccess), then retrieve again once approved"
    )
}

impl GatewayService {
    /// C-GET / C-MOVE / WADO-RS: selects, checks every study's grant
    /// (nothing is read or spent when one is missing), then reads in the
    /// background. `request` (DICOMweb's `X-Tessera-Request`, a DIMSE
    /// peer's `[[dicom.scp.peers]] request`) names the grant to use instead
    /// of the one that expires first.
    pub(crate) async fn dicom_retrieve_with(
        &self,
        peer: &DicomPeer,
        operation: &str,
        keys: &[(TagPair, String)],
        request: Option<&str>,
    ) -> Result<RetrievePlan> {
        let found = self.matching_instances(peer, keys).await?;
        let reidentify = peer
            .roles
            .iter()
            .any(|r| self.inner.limits.reidentify_roles.contains(r));
        let mut plan: Vec<(Visible, String, Vec<Seen>)> = Vec::new();
        for (vis, seen) in found {
            let study = vis.study.study_id.clone();
            let chosen = match request {
                Some(rid) => vis.grants.iter().find(|g| g.request_id == rid),
                None => vis.grants.first(),
            };
            let Some(grant) = chosen else {
                let reason = no_grant(&peer.identity, &study);
                tessera_tls::security::refused("gateway", &peer.identity, operation, &reason);
                return Err(GatewayError::PermissionDenied(reason));
            };
            if !reidentify && !self.inner.limits.deidentify_burned_in {
                let burned = seen
                    .iter()
                    .filter(|s| s.instance.burned_in_annotation)
                    .count();
                if burned > 0 {
                    return Err(GatewayError::WrongKind(format!(
                        "study {study}: {burned} instance(s) have Burned In Annotation = YES: no de-identified copy is released and no grant use was spent"
                    )));
                }
            }
            let rid = grant.request_id.clone();
            self.check_grant(&peer.identity, &rid, &study).await?;
            plan.push((vis, rid, seen));
        }
        let count = plan.iter().map(|(_, _, s)| s.len()).sum();
        let (tx, rx) = mpsc::channel(2);
        let this = self.clone();
        let identity = peer.identity.clone();
        let operation = operation.to_owned();
        tokio::spawn(async move {
            for (vis, rid, seen) in plan {
                let study = vis.study;
                let instances: Vec<_> = seen.into_iter().map(|s| s.instance).collect();
                let keys = this.restore_keys(&study, &instances).await;
                let (kmeta, kpx) = match keys {
                    Ok(k) => k,
                    Err(e) => {
                        for _ in &instances {
                            if tx.send(Err(e.to_string())).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                };
                let profile =
                    (!reidentify).then(|| profile_for(&kmeta, this.inner.limits.temporal));
                let n = instances.len() as u32;
                let study_id = study.study_id.clone();
                let rebuild = Arc::new(Rebuild {
                    study,
                    count: n,
                    kmeta,
                    kpx,
                    profile,
                    reidentify,
                });
                let mut ahead = ReadAhead::start(&this, rebuild, (0u32..).zip(instances).collect());
                let mut spent = false;
                while let Some(loaded) = ahead.next().await {
                    let item = match loaded {
                        Ok(l) if spent => Ok(l.bytes),
                        Ok(l) => match this.redeem_grant(&identity, &rid, &study_id).await {
                            Ok(()) => {
                                spent = true;
                                tracing::info!(study = %study_id, caller = %identity, %operation,
                                    reidentified = reidentify, instances = n, "DICOM study retrieved over DIMSE");
                                Ok(l.bytes)
                            }
                            Err(e) => Err(format!("grant {rid}: {e}")),
                        },
                        Err(e) => Err(e.to_string()),
                    };
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(RetrievePlan { count, files: rx })
    }
}
