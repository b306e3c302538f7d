//! C-GET and C-MOVE: the instances a Study Root identifier selects (from
//! the query index, as C-FIND sees them), each study read under the peer's
//! usable grant on it (the one that expires first; a DICOM client cannot
//! name a request) and one use spent per study and request, as
//! RetrieveDicom does: checked before anything is read, spent once the
//! study's first instance is rebuilt. Files are byte-identical for roles
//! that may re-identify, de-identified for the others.

use std::sync::Arc;

use tessera_dicom::query::TagPair;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as kpb;
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

/// What a retrieve does with the caller's grant on each study.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantUse {
    /// C-GET, C-MOVE, WADO-RS retrieve: one use spent per study, once its
    /// first instance is rebuilt.
    Spend,
    /// WADO-RS `/metadata`: the grant must be usable (checked at the
    /// keyserver), no use is spent (docs/DICOM.md, "WADO-RS metadata").
    Check,
}

/// The refusal of a retrieve for lack of a grant: names how to ask.
pub(crate) fn no_grant(identity: &str, study: &str) -> String {
    format!(
        "{identity} holds no valid grant on study {study}: ask the owner with `tessera request-key {study}` (RequestAccess), then retrieve again once approved"
    )
}

/// The refusal when an access request was filed (or is pending) on the
/// caller's behalf (`[dicom] file_requests`): names it and how the owner
/// approves it.
fn no_grant_filed(identity: &str, study: &str, rid: &str, new: bool) -> String {
    let how = if new {
        "was filed on your behalf"
    } else {
        "filed on your behalf earlier is still pending"
    };
    format!(
        "{identity} holds no valid grant on study {study}: access request {rid} {how}; the owner approves it with `tessera approve {rid}` (ApproveRequest), then retrieve again"
    )
}

/// The request id a refusal names as filed on the caller's behalf.
pub(crate) fn filed_request(reason: &str) -> Option<&str> {
    if !reason.contains("on your behalf") {
        return None;
    }
    reason
        .split(|c: char| c.is_whitespace() || c == '`')
        .find(|w| {
            w.len() == 35 && w.starts_with("rq-") && w[3..].bytes().all(|b| b.is_ascii_hexdigit())
        })
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
        grant_use: GrantUse,
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
                let filed = if request.is_none() && self.inner.limits.dicom_file_requests {
                    self.file_for_caller(&peer.identity, &study, operation)
                        .await
                } else {
                    None
                };
                let reason = match filed {
                    Some((rid, new)) => no_grant_filed(&peer.identity, &study, &rid, new),
                    None => no_grant(&peer.identity, &study),
                };
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
                        Ok(l) if spent || grant_use == GrantUse::Check => Ok(l.bytes),
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

impl GatewayService {
    /// Files an access request for `identity` on `study` after a refused
    /// retrieve (`[dicom] file_requests`), as RequestAccess does (the
    /// keyserver audits it as filed by the gateway on the caller's
    /// behalf), unless the one filed here before is still pending. The
    /// request id and whether it is new; None when filing failed (logged,
    /// the refusal then names `tessera request-key`).
    async fn file_for_caller(
        &self,
        identity: &str,
        study: &str,
        operation: &str,
    ) -> Option<(String, bool)> {
        let key = (identity.to_owned(), study.to_owned());
        let earlier = self
            .inner
            .filed_requests
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned());
        if let Some(rid) = earlier {
            let mut ks = self.inner.up.keyserver.clone();
            let answer = ks
                .check_grant(kpb::RedeemGrantRequest {
                    request_id: rid.clone(),
                    on_behalf_of: identity.to_owned(),
                    study_id: study.to_owned(),
                })
                .await;
            if let Err(s) = answer
                && s.code() == tonic::Code::PermissionDenied
                && s.message().contains("pending")
            {
                return Some((rid, false));
            }
        }
        let filed = self
            .request_access_inner(
                identity.to_owned(),
                pb::RequestAccessRequest {
                    study_handle: study.to_owned(),
                    justification: format!(
                        "filed by the gateway for a {operation} refused for lack of a grant"
                    ),
                    ..Default::default()
                },
            )
            .await;
        match filed.map(|r| r.request.map(|q| q.request_id)) {
            Ok(Some(rid)) => {
                tracing::info!(caller = %identity, %study, %operation, request = %rid, "access request filed for a refused DICOM retrieve");
                if let Ok(mut m) = self.inner.filed_requests.lock() {
                    // Bounded: an old entry only saves a duplicate request.
                    if m.len() >= MAX_FILED {
                        m.clear();
                    }
                    m.insert(key, rid.clone());
                }
                Some((rid, true))
            }
            Ok(None) => {
                tracing::warn!(caller = %identity, %study, "filing an access request: the keyserver answered no request");
                None
            }
            Err(e) => {
                tracing::warn!(caller = %identity, %study, error = %e, "filing an access request for a refused DICOM retrieve failed");
                None
            }
        }
    }
}

/// Requests remembered as filed here (per gateway replica).
const MAX_FILED: usize = 10_000;

#[cfg(test)]
mod tests {
    use crate::flows::dicom::get_move::{filed_request, no_grant, no_grant_filed};

    #[test]
    fn a_filed_refusal_names_its_request() {
        let rid = format!("rq-{}", "0a".repeat(16));
        let text = no_grant_filed("spiffe://t/user/c", "st-1", &rid, true);
        assert_eq!(filed_request(&text), Some(rid.as_str()));
        assert!(text.contains(&format!("`tessera approve {rid}`")));
        let pending = no_grant_filed("spiffe://t/user/c", "st-1", &rid, false);
        assert!(pending.contains("still pending"));
        assert_eq!(filed_request(&pending), Some(rid.as_str()));
        assert_eq!(filed_request(&no_grant("spiffe://t/user/c", "st-1")), None);
    }
}
