//! The gRPC edge: converts protos to core calls and core errors to
//! `tonic::Status`. Authorization by role happens before this, in the
//! `tessera_tls::AuthzLayer` driven by [`policy`]; the finer rules (gateway
//! only, owner only, requester only, no self-approval) are in the core.

use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_server::KeyServer;
use tessera_tls::{Policy, Role};
use tonic::{Request, Response, Status};

use crate::core::access::NewStanding;
use crate::core::{Ask, AuditScope, Core};
use crate::error::KeyServerError;

mod convert;
mod lists;
use convert::{audit_entry, audit_entry_size, key_request, operation, pairs, redeemed, standing};

/// gRPC service name, for the policy table and health.
pub const SERVICE: &str = "tessera.keyserver.v1.KeyServer";
/// Largest request or response this service accepts (keys and ids are tiny;
/// 32 attributes of 1 KiB fit with room to spare).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The policy table: this service's rows of the one authorization matrix
/// ([`tessera_tls::matrix::MATRIX`]). Anything not listed is refused by the
/// layer; the handlers check ownership, grants and purposes on top.
pub fn policy() -> Policy {
    Policy::for_service(SERVICE)
}

impl From<KeyServerError> for Status {
    fn from(e: KeyServerError) -> Self {
        // Exhaustive on purpose: a new variant must choose its status here.
        match e {
            KeyServerError::InvalidArgument(m) => Status::invalid_argument(m),
            KeyServerError::NotFound(m) => Status::not_found(m),
            KeyServerError::AlreadyExists(m) => Status::already_exists(m),
            KeyServerError::PermissionDenied(m) => Status::permission_denied(m),
            KeyServerError::AttributeMismatch => {
                Status::permission_denied("attributes do not match the study")
            }
            KeyServerError::FailedPrecondition(m) => Status::failed_precondition(m),
            KeyServerError::Audit(m) => {
                tracing::error!(error = %m, "audit append failed");
                Status::unavailable("audit log unavailable; the operation was not performed")
            }
            KeyServerError::Unavailable => Status::unavailable("keyserver is shutting down"),
            KeyServerError::StoreUnavailable(m) => {
                tracing::error!(error = %m, "keyserver database unavailable");
                Status::unavailable("keyserver database unavailable; nothing was done")
            }
            KeyServerError::Corrupt(m) => {
                tracing::error!(error = %m, "corrupt record");
                Status::data_loss("stored data is damaged")
            }
            e @ (KeyServerError::Kek(_)
            | KeyServerError::Storage(_)
            | KeyServerError::Crypto(_)) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct KeyServerService {
    core: Core,
}

impl KeyServerService {
    /// Wraps a core.
    pub fn new(core: Core) -> Self {
        Self { core }
    }

    /// The generated server with explicit message limits.
    pub fn into_server(self) -> pb::key_server_server::KeyServerServer<Self> {
        pb::key_server_server::KeyServerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn who<T>(req: &Request<T>) -> Result<String, Status> {
    Ok(tessera_tls::caller(req)?.uri())
}

fn is_admin<T>(req: &Request<T>) -> bool {
    tessera_tls::caller_roles(req).contains(&Role::Admin)
}

/// The live feed's answer stream.
pub type RequestEventStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::RequestEvent, Status>> + Send>>;

/// What a `ListAuditResponse` page may hold: the message limit less room for
/// `next_from_seq` (tag and a 10-byte varint) and a margin.
const AUDIT_PAGE_BUDGET: usize = MAX_MESSAGE_BYTES - 64;

#[tonic::async_trait]
impl KeyServer for KeyServerService {
    async fn register_study(
        &self,
        req: Request<pb::RegisterStudyRequest>,
    ) -> Result<Response<pb::RegisterStudyResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let id = (!m.study_id.is_empty()).then_some(m.study_id.as_str());
        let s = self
            .core
            .register_study(&actor, &m.owner, &pairs(m.attributes), id)
            .await?;
        Ok(Response::new(pb::RegisterStudyResponse {
            study_id: s.id,
            master_version: s.master_version,
        }))
    }

    async fn derive_key(
        &self,
        req: Request<pb::DeriveKeyRequest>,
    ) -> Result<Response<pb::DeriveKeyResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let op = operation(m.operation)?;
        let d = self
            .core
            .derive_key(&actor, &m.study_id, &pairs(m.attributes), &m.purpose, op)
            .await?;
        Ok(Response::new(pb::DeriveKeyResponse {
            key: d.key.to_vec(),
            master_version: d.master_version,
        }))
    }

    async fn request_key(
        &self,
        req: Request<pb::RequestKeyRequest>,
    ) -> Result<Response<pb::RequestKeyResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let attributes = pairs(m.attributes);
        let ask = Ask {
            study_id: &m.study_id,
            attributes: &attributes,
            purpose: &m.purpose,
            access_purpose: &m.access_purpose,
            justification: &m.justification,
            on_behalf_of: &m.on_behalf_of,
        };
        let r = self.core.request_access(&actor, &ask).await?;
        Ok(Response::new(pb::RequestKeyResponse {
            request: Some(key_request(r)),
        }))
    }

    async fn list_requests(
        &self,
        req: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let actor = who(&req)?;
        Ok(Response::new(
            self.requests_page(actor, req.into_inner()).await?,
        ))
    }

    async fn approve_request(
        &self,
        req: Request<pb::ApproveRequestRequest>,
    ) -> Result<Response<pb::ApproveRequestResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self
            .core
            .approve(&actor, &m.request_id, m.ttl_seconds, m.uses)
            .await?;
        Ok(Response::new(pb::ApproveRequestResponse {
            request: Some(key_request(r)),
        }))
    }

    async fn deny_request(
        &self,
        req: Request<pb::DenyRequestRequest>,
    ) -> Result<Response<pb::DenyRequestResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self.core.deny(&actor, &m.request_id, &m.reason).await?;
        Ok(Response::new(pb::DenyRequestResponse {
            request: Some(key_request(r)),
        }))
    }

    async fn fetch_key(
        &self,
        req: Request<pb::FetchKeyRequest>,
    ) -> Result<Response<pb::FetchKeyResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self.core.fetch_key(&actor, &m.request_id).await?;
        Ok(Response::new(pb::FetchKeyResponse {
            key: r.key.to_vec(),
            study_id: r.study_id,
            purpose: r.purpose,
            master_version: r.master_version,
            expires_at_unix: r.expires_at,
            uses_left: r.uses_left,
        }))
    }

    async fn revoke_grant(
        &self,
        req: Request<pb::RevokeGrantRequest>,
    ) -> Result<Response<pb::RevokeGrantResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self.core.revoke(&actor, &m.request_id, &m.reason).await?;
        Ok(Response::new(pb::RevokeGrantResponse {
            request: Some(key_request(r)),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let actor = who(&req)?;
        let core = self.core.clone();
        // A full chain walk is CPU and I/O bound: keep it off the reactor.
        let rep = tokio::task::spawn_blocking(move || core.verify_audit())
            .await
            .map_err(|_| Status::internal("internal error"))??;
        tracing::info!(caller = %actor, ok = rep.ok, entries = rep.entries, "audit verified");
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: rep.ok,
            entries: rep.entries,
            first_broken_seq: rep.first_broken_seq.unwrap_or(0),
            problem: rep.problem,
            head_hash: rep.head_hash.to_vec(),
            checkpoints_verified: rep.checkpoints_verified,
            last_checkpoint_seq: rep.last_checkpoint_seq,
            audit_public_key: self.core.audit_public_key().to_vec(),
            acknowledged_broken_seq: rep.acknowledged.as_ref().map_or(0, |a| a.0),
            acknowledged_problem: rep.acknowledged.map(|a| a.1).unwrap_or_default(),
        }))
    }

    async fn list_audit(
        &self,
        req: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let actor = who(&req)?;
        // Admins read the whole log; an owner only what concerns it.
        let scope = if tessera_tls::caller_roles(&req).contains(&Role::Admin) {
            AuditScope::All
        } else {
            AuditScope::Owner(actor)
        };
        let m = req.into_inner();
        let limit = match m.limit {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(Status::invalid_argument("limit must be 0..=1000")),
        };
        let core = self.core.clone();
        let page = tokio::task::spawn_blocking(move || {
            core.list_audit_page(
                m.from_seq,
                limit,
                &scope,
                AUDIT_PAGE_BUDGET,
                audit_entry_size,
            )
        })
        .await
        .map_err(|_| Status::internal("internal error"))??;
        Ok(Response::new(pb::ListAuditResponse {
            entries: page.entries.into_iter().map(audit_entry).collect(),
            next_from_seq: page.next_from_seq,
        }))
    }

    async fn rotate_master(
        &self,
        req: Request<pb::RotateMasterRequest>,
    ) -> Result<Response<pb::RotateMasterResponse>, Status> {
        let actor = who(&req)?;
        let v = self.core.rotate_master(&actor).await?;
        Ok(Response::new(pb::RotateMasterResponse {
            master_version: v,
        }))
    }

    async fn redeem_grant(
        &self,
        req: Request<pb::RedeemGrantRequest>,
    ) -> Result<Response<pb::RedeemGrantResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self
            .core
            .redeem_grant(&actor, &m.request_id, &m.on_behalf_of, &m.study_id)
            .await?;
        Ok(Response::new(redeemed(r)))
    }

    async fn check_grant(
        &self,
        req: Request<pb::RedeemGrantRequest>,
    ) -> Result<Response<pb::RedeemGrantResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self
            .core
            .check_grant(&actor, &m.request_id, &m.on_behalf_of, &m.study_id)
            .await?;
        Ok(Response::new(redeemed(r)))
    }

    async fn add_delegate(
        &self,
        req: Request<pb::AddDelegateRequest>,
    ) -> Result<Response<pb::AddDelegateResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        self.core.add_delegate(&actor, &m.delegate).await?;
        Ok(Response::new(pb::AddDelegateResponse {}))
    }

    async fn remove_delegate(
        &self,
        req: Request<pb::RemoveDelegateRequest>,
    ) -> Result<Response<pb::RemoveDelegateResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        self.core.remove_delegate(&actor, &m.delegate).await?;
        Ok(Response::new(pb::RemoveDelegateResponse {}))
    }

    async fn list_delegates(
        &self,
        req: Request<pb::ListDelegatesRequest>,
    ) -> Result<Response<pb::ListDelegatesResponse>, Status> {
        let actor = who(&req)?;
        Ok(Response::new(
            self.delegates_page(actor, req.into_inner()).await?,
        ))
    }

    async fn check_delegate(
        &self,
        req: Request<pb::CheckDelegateRequest>,
    ) -> Result<Response<pb::CheckDelegateResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let allowed = self
            .core
            .check_delegate(&actor, &m.owner, &m.delegate)
            .await?;
        Ok(Response::new(pb::CheckDelegateResponse { allowed }))
    }

    async fn find_grants(
        &self,
        req: Request<pb::FindGrantsRequest>,
    ) -> Result<Response<pb::FindGrantsResponse>, Status> {
        let actor = who(&req)?;
        Ok(Response::new(
            self.found_grants_page(actor, req.into_inner()).await?,
        ))
    }

    async fn forget_study(
        &self,
        req: Request<pb::ForgetStudyRequest>,
    ) -> Result<Response<pb::ForgetStudyResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self
            .core
            .forget_study(&actor, &m.study_id, &m.on_behalf_of)
            .await?;
        Ok(Response::new(pb::ForgetStudyResponse {
            grants_revoked: r.grants_revoked,
        }))
    }

    async fn create_standing_approval(
        &self,
        req: Request<pb::CreateStandingApprovalRequest>,
    ) -> Result<Response<pb::StandingApprovalResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let sa = self
            .core
            .create_standing(
                &actor,
                NewStanding {
                    grantee_identity: m.grantee_identity,
                    grantee_role: m.grantee_role,
                    access_purpose: m.access_purpose,
                    studies: m.study_ids,
                    ttl_secs: m.ttl_seconds,
                    budget: m.budget,
                    grant_ttl_secs: m.grant_ttl_seconds,
                    grant_uses: m.grant_uses,
                },
            )
            .await?;
        Ok(Response::new(pb::StandingApprovalResponse {
            approval: Some(standing(sa)),
        }))
    }

    async fn list_standing_approvals(
        &self,
        req: Request<pb::ListStandingApprovalsRequest>,
    ) -> Result<Response<pb::ListStandingApprovalsResponse>, Status> {
        let actor = who(&req)?;
        Ok(Response::new(
            self.standing_page(actor, req.into_inner()).await?,
        ))
    }

    async fn update_standing_approval(
        &self,
        req: Request<pb::UpdateStandingApprovalRequest>,
    ) -> Result<Response<pb::StandingApprovalResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let sa = self
            .core
            .update_standing(
                &actor,
                &m.approval_id,
                m.ttl_seconds,
                m.budget,
                m.clear_budget,
            )
            .await?;
        Ok(Response::new(pb::StandingApprovalResponse {
            approval: Some(standing(sa)),
        }))
    }

    async fn revoke_standing_approval(
        &self,
        req: Request<pb::RevokeStandingApprovalRequest>,
    ) -> Result<Response<pb::StandingApprovalResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let sa = self.core.revoke_standing(&actor, &m.approval_id).await?;
        Ok(Response::new(pb::StandingApprovalResponse {
            approval: Some(standing(sa)),
        }))
    }

    async fn break_glass(
        &self,
        req: Request<pb::BreakGlassRequest>,
    ) -> Result<Response<pb::BreakGlassResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let r = self
            .core
            .break_glass(
                &actor,
                &m.study_id,
                &pairs(m.attributes),
                &m.purpose,
                &m.reason,
                &m.on_behalf_of,
            )
            .await?;
        Ok(Response::new(pb::BreakGlassResponse {
            request: Some(key_request(r)),
        }))
    }

    async fn set_break_glass(
        &self,
        req: Request<pb::SetBreakGlassRequest>,
    ) -> Result<Response<pb::SetBreakGlassResponse>, Status> {
        let actor = who(&req)?;
        let m = req.into_inner();
        let disabled = self.core.set_break_glass(&actor, m.disabled).await?;
        Ok(Response::new(pb::SetBreakGlassResponse { disabled }))
    }

    async fn list_break_glass(
        &self,
        req: Request<pb::ListBreakGlassRequest>,
    ) -> Result<Response<pb::ListBreakGlassResponse>, Status> {
        let actor = who(&req)?;
        let admin = is_admin(&req);
        let page = self
            .break_glass_page(actor, admin, req.into_inner())
            .await?;
        Ok(Response::new(page))
    }

    async fn mark_reviewed(
        &self,
        req: Request<pb::MarkReviewedRequest>,
    ) -> Result<Response<pb::MarkReviewedResponse>, Status> {
        let actor = who(&req)?;
        let admin = is_admin(&req);
        let m = req.into_inner();
        let r = self
            .core
            .mark_reviewed(&actor, admin, &m.request_id)
            .await?;
        Ok(Response::new(pb::MarkReviewedResponse {
            request: Some(key_request(r)),
        }))
    }

    async fn list_grants(
        &self,
        req: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let actor = who(&req)?;
        Ok(Response::new(
            self.grants_page(actor, req.into_inner()).await?,
        ))
    }

    type WatchRequestsStream = RequestEventStream;

    async fn watch_requests(
        &self,
        req: Request<pb::WatchRequestsRequest>,
    ) -> Result<Response<Self::WatchRequestsStream>, Status> {
        let actor = who(&req)?;
        let as_owner = req.into_inner().as_owner;
        let mut feed = self.core.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let item = match feed.recv().await {
                    Ok(ev) if ev.for_watcher(&actor, as_owner) => Ok(pb::RequestEvent {
                        kind: ev.kind.to_owned(),
                        request: Some(key_request(ev.request)),
                    }),
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        Err(Status::resource_exhausted(format!(
                            "watcher too slow: {n} events missed; list requests and watch again"
                        )))
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn set_webhook(
        &self,
        req: Request<pb::SetWebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        let actor = who(&req)?;
        let url = self.core.set_webhook(&actor, &req.into_inner().url).await?;
        Ok(Response::new(pb::WebhookResponse { url }))
    }

    async fn get_webhook(
        &self,
        req: Request<pb::GetWebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        let actor = who(&req)?;
        let url = self.core.webhook(&actor)?.unwrap_or_default();
        Ok(Response::new(pb::WebhookResponse { url }))
    }

    async fn clear_webhook(
        &self,
        req: Request<pb::ClearWebhookRequest>,
    ) -> Result<Response<pb::WebhookResponse>, Status> {
        let actor = who(&req)?;
        self.core.clear_webhook(&actor).await?;
        Ok(Response::new(pb::WebhookResponse { url: String::new() }))
    }
}

#[cfg(test)]
mod tests;
