//! Key requests and grants: request, list, approve, deny, revoke (using a
//! grant, fetch, redeem and check, is in `grant_use.rs`). Every decision goes through
//! [`gate`] (before the transaction, or inside it when it depends on the
//! request's state); every change is one write job that also appends its
//! audit entry.

use crate::core::access;
use crate::core::attrs::CanonicalAttributes;
use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::crypto::grant_aad;
use crate::core::gate::{self, Context, audit_study, authorize_in_txn};
use crate::core::ids::{RequestId, StudyId, validate_label, validate_text};
use crate::core::policy::access::{EMERGENCY, RequestFacts, first_standing};
use crate::core::policy::{Action, Rpc};
use crate::core::store::{
    BreakGlass, GrantState, OWNER_STUDIES, REQUESTS, RequestRecord, STUDIES, STUDY_REQUESTS,
    StudyRecord, get_json, index_key, index_scan, to_json,
};
use crate::core::types::Ask;
use crate::core::{Core, SELF_ACTOR, deleted, forgotten_in_txn, writer};
use crate::error::{KeyServerError, Result};

impl Core {
    /// A user (or the gateway on a user's behalf) requests a study key, for
    /// the configured default access purpose.
    pub async fn request_key(
        &self,
        actor: &str,
        study_id: &str,
        attributes: &[(String, String)],
        purpose: &str,
        justification: &str,
        on_behalf_of: &str,
    ) -> Result<RequestRecord> {
        let ask = Ask {
            study_id,
            attributes,
            purpose,
            access_purpose: "",
            justification,
            on_behalf_of,
        };
        self.request_access(actor, &ask).await
    }

    /// A user (or the gateway on a user's behalf) requests a study key for
    /// an access purpose of the configured vocabulary (empty: the default).
    /// A live standing approval of the study's owner that matches approves
    /// it at once (audited as `grant.approved ... standing=<id>`).
    pub async fn request_access(&self, actor: &str, ask: &Ask<'_>) -> Result<RequestRecord> {
        self.file_request(actor, ask, None).await
    }

    /// Break-glass: `actor` (with the `emergency` permission) opens one
    /// study at once with a written reason; the grant is short, flagged in
    /// every audit entry and listed for review. The gateway breaks it on
    /// a user's behalf (`on_behalf_of`): the permission is that user's.
    pub async fn break_glass(
        &self,
        actor: &str,
        study_id: &str,
        attributes: &[(String, String)],
        purpose: &str,
        reason: &str,
        on_behalf_of: &str,
    ) -> Result<RequestRecord> {
        let ask = Ask {
            study_id,
            attributes,
            purpose,
            access_purpose: EMERGENCY,
            justification: "",
            on_behalf_of,
        };
        self.file_request(actor, &ask, Some(reason)).await
    }

    async fn file_request(
        &self,
        actor: &str,
        ask: &Ask<'_>,
        break_glass: Option<&str>,
    ) -> Result<RequestRecord> {
        let Ask {
            study_id,
            attributes,
            purpose,
            access_purpose,
            justification,
            on_behalf_of,
        } = *ask;
        let rpc = if break_glass.is_some() {
            Rpc::BreakGlass
        } else {
            Rpc::RequestKey
        };
        let for_user = if self.user_identity("on_behalf_of", on_behalf_of).is_ok() {
            format!("on_behalf_of={on_behalf_of}")
        } else {
            String::new()
        };
        self.authorize(
            actor,
            Action::RequestKey { on_behalf_of },
            Context::rpc(audit_study(study_id), for_user),
        )
        .await?;
        let access_purpose = self.inner.rules.access.resolve(access_purpose).to_owned();
        let shown = if validate_label("access_purpose", &access_purpose).is_ok() {
            access_purpose.as_str()
        } else {
            "<malformed>"
        };
        self.authorize(
            actor,
            Action::Purpose {
                rpc,
                purpose: &access_purpose,
            },
            Context::rpc(audit_study(study_id), format!("access_purpose={shown}")),
        )
        .await?;
        let id = StudyId::parse(study_id)?;
        validate_label("purpose", purpose)?;
        validate_text("justification", justification)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let requester = if on_behalf_of.is_empty() {
            actor.to_owned()
        } else {
            self.user_identity("on_behalf_of", on_behalf_of)?;
            on_behalf_of.to_owned()
        };
        let study = self.study(&id)?;
        if let Some(reason) = break_glass {
            // Permission and reason before the attributes are even looked
            // at; the owner's setting is read again in the transaction.
            let action = Action::BreakGlass {
                reason,
                owner: &study.owner,
                disabled: false,
            };
            let via = if requester == actor {
                String::new()
            } else {
                format!("presented_by={actor}")
            };
            self.authorize(&requester, action, Context::rpc(id.as_str(), via))
                .await?;
        }
        let master = self
            .check_attributes(
                actor,
                &study,
                &attrs,
                if break_glass.is_some() {
                    AuditEvent::BreakGlassRefused
                } else {
                    AuditEvent::RequestRefused
                },
                format!("requester={requester} purpose={purpose} access_purpose={access_purpose}"),
            )
            .await?;
        let key = master.derive_study_key(&study.salt, &study.id, &attrs, purpose)?;
        let rid = RequestId::random(&self.inner.rng)?;
        let wrapped = self
            .inner
            .kek
            .wrap(&self.inner.rng, &grant_aad(rid.as_str()), &key[..])?;
        let roles = self.roles_of(&requester);
        let rec = RequestRecord {
            id: rid.as_str().to_owned(),
            study_id: study.id.clone(),
            requester,
            presented_by: actor.to_owned(),
            purpose: purpose.to_owned(),
            justification: justification.to_owned(),
            created_at: 0,
            master_version: master.version,
            state: GrantState::Pending,
            wrapped_key: Some(wrapped),
            access_purpose,
            standing: None,
            break_glass: break_glass.map(|r| BreakGlass {
                reason: r.to_owned(),
                reviewed: None,
            }),
        };
        let owner = study.owner.clone();
        let rules = self.inner.rules.clone();
        let (bg_ttl, bg_uses) = (
            self.inner.access.break_glass_ttl_secs,
            self.inner.access.break_glass_uses,
        );
        let r = self
            .inner
            .writer
            .submit(move |ctx| {
                let mut rec = rec;
                let now = ctx.now_secs();
                rec.created_at = now;
                let txn = ctx.txn;
                if forgotten_in_txn(txn, &rec.study_id)? {
                    return Ok(Err(deleted(&rec.study_id)));
                }
                let mut approval = None;
                let mut misses = String::new();
                if let Some(bg) = &rec.break_glass {
                    let disabled = access::owner_settings(txn, &owner)?.break_glass_disabled;
                    let action = Action::BreakGlass {
                        reason: &bg.reason,
                        owner: &owner,
                        disabled,
                    };
                    let audit = Context::rpc(rec.study_id.clone(), "");
                    if let Err(e) = authorize_in_txn(ctx, &rules, &rec.requester, &action, audit)? {
                        return Ok(Err(e));
                    }
                    let expires_at = now.saturating_add(bg_ttl);
                    rec.state = GrantState::Approved {
                        by: rec.requester.clone(),
                        at: now,
                        expires_at,
                        uses_granted: bg_uses,
                        uses_left: bg_uses,
                    };
                    approval = Some((expires_at, bg_uses, " break_glass=1".to_owned()));
                } else {
                    let approvals = access::owner_standing(txn, &owner)?;
                    let facts = RequestFacts {
                        requester: &rec.requester,
                        roles: &roles,
                        study: &rec.study_id,
                        study_owner: &owner,
                        purpose: &rec.access_purpose,
                        now,
                    };
                    match first_standing(&approvals, &facts) {
                        Ok(sa) => {
                            let mut sa = sa.clone();
                            let expires_at = now.saturating_add(sa.grant_ttl_secs).min(sa.expires_at);
                            rec.state = GrantState::Approved {
                                by: sa.owner.clone(),
                                at: now,
                                expires_at,
                                uses_granted: sa.grant_uses,
                                uses_left: sa.grant_uses,
                            };
                            rec.standing = Some(sa.id.clone());
                            sa.approvals_made = sa.approvals_made.saturating_add(1);
                            if let Some(b) = sa.budget_left.as_mut() {
                                *b = b.saturating_sub(1);
                            }
                            access::put_standing(txn, &sa)?;
                            approval = Some((expires_at, sa.grant_uses, format!(" standing={}", sa.id)));
                        }
                        Err(m) if !m.is_empty() => {
                            misses = format!(
                                " standing_misses={}",
                                m.into_iter().take(8).collect::<Vec<_>>().join(",")
                            );
                        }
                        Err(_) => {}
                    }
                }
                txn.put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
                txn.put_str(STUDY_REQUESTS, &index_key(&rec.study_id, &rec.id), &[])?;
                access::index_requester(txn, &rec)?;
                let flag = if rec.break_glass.is_some() {
                    " break_glass=1"
                } else {
                    ""
                };
                ctx.append(NewEntry {
                    actor: rec.presented_by.clone(),
                    event: AuditEvent::KeyRequested,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={} purpose={} access_purpose={}{flag}{misses}",
                        rec.id, rec.requester, rec.purpose, rec.access_purpose
                    ),
                })?;
                if let Some((expires_at, uses, by)) = approval {
                    ctx.append(NewEntry {
                        actor: if rec.break_glass.is_some() {
                            rec.requester.clone()
                        } else {
                            SELF_ACTOR.to_owned()
                        },
                        event: AuditEvent::GrantApproved,
                        study: rec.study_id.clone(),
                        detail: format!(
                            "request={} requester={} expires_at={expires_at} uses={uses} access_purpose={}{by}",
                            rec.id, rec.requester, rec.access_purpose
                        ),
                    })?;
                }
                rec.wrapped_key = None;
                Ok(Ok(rec))
            })
            .await;
        if matches!(r, Err(KeyServerError::NotFound(_))) {
            self.uncache_study(id.as_str());
        }
        if let Ok(rec) = &r {
            if rec.break_glass.is_some() {
                self.publish("break_glass", &study.owner, rec);
            } else {
                self.publish("requested", &study.owner, rec);
            }
            if rec.standing.is_some() {
                self.publish("approved", &study.owner, rec);
            }
        }
        r
    }
    /// The owner lists requests on its studies (one study if `study_id` is
    /// not empty). Pending only unless `include_decided`. Naming a study one
    /// does not own is refused and recorded (`access.refused`, `rpc=ListRequests`).
    pub async fn list_requests(
        &self,
        actor: &str,
        study_id: &str,
        include_decided: bool,
    ) -> Result<Vec<RequestRecord>> {
        let study = if study_id.is_empty() {
            None
        } else {
            let id = StudyId::parse(study_id)?;
            let owner = self.study_any(&id)?.owner.clone();
            let action = Action::ListRequests { owner: &owner };
            let audit = Context::rpc(id.as_str(), "");
            // A read: no chain check, but a refusal is still recorded.
            if let Err(r) = gate::judge(&self.inner.rules, actor, &action, audit) {
                return Err(self.record(r).await);
            }
            Some(id)
        };
        // The scan reads every request of the owner's studies: keep it off
        // the async workers.
        let core = self.clone();
        let actor = actor.to_owned();
        tokio::task::spawn_blocking(move || core.scan_requests(&actor, study, include_decided))
            .await
            .map_err(|e| KeyServerError::Storage(format!("request listing stopped: {e}")))?
    }

    /// The listing of [`Core::list_requests`], its decision taken: the
    /// requests on `study` (or on every study `owner` owns), oldest first,
    /// without their held keys.
    fn scan_requests(
        &self,
        owner: &str,
        study: Option<StudyId>,
        include_decided: bool,
    ) -> Result<Vec<RequestRecord>> {
        let r = self.inner.store.read()?;
        let r = r.as_ref();
        let studies = match study {
            Some(id) => vec![id.as_str().to_owned()],
            None => index_scan(r, OWNER_STUDIES, owner)?,
        };
        let mut out = Vec::new();
        for s in studies {
            for rid in index_scan(r, STUDY_REQUESTS, &s)? {
                if let Some(mut rec) = get_json::<RequestRecord, _>(r, REQUESTS, &rid)?
                    && (include_decided || rec.state == GrantState::Pending)
                {
                    rec.wrapped_key = None;
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Shared frame of approve / deny / revoke: loads the request and its
    /// study inside the write transaction and asks the gate (owner only,
    /// never one's own request, decided once); a refusal is appended to the
    /// audit chain in that transaction, before the reply.
    async fn decide_request<F>(
        &self,
        rpc: Rpc,
        actor: &str,
        request_id: &str,
        f: F,
    ) -> Result<RequestRecord>
    where
        F: FnOnce(&mut writer::TxnCtx<'_>, &mut RequestRecord, &str) -> Result<Result<NewEntry>>
            + Send
            + 'static,
    {
        self.ensure_chain_intact()?;
        let rid = RequestId::parse(request_id)?;
        // Only the owner decides: on success the decider is the owner.
        let owner_of_decider = actor.to_owned();
        let actor = actor.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let Some(mut rec) = get_json::<RequestRecord, _>(txn, REQUESTS, rid.as_str())?
                else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "request {}",
                        rid.as_str()
                    ))));
                };
                let owner = {
                    get_json::<StudyRecord, _>(txn, STUDIES, &rec.study_id)?
                        .ok_or_else(|| KeyServerError::Corrupt(format!("study {}", rec.study_id)))?
                        .owner
                };
                let action = Action::Decide {
                    rpc,
                    owner: &owner,
                    requester: &rec.requester,
                    state: &rec.state,
                };
                let audit = Context::rpc(rec.study_id.clone(), format!("request={}", rec.id));
                if let Err(e) = authorize_in_txn(ctx, &rules, &actor, &action, audit)? {
                    return Ok(Err(e));
                }
                let entry = match f(ctx, &mut rec, &actor)? {
                    Ok(e) => e,
                    Err(e) => return Ok(Err(e)),
                };
                txn.put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
                ctx.append(entry)?;
                rec.wrapped_key = None;
                Ok(Ok(rec))
            })
            .await
            .inspect(|rec| {
                let kind = match rpc {
                    Rpc::ApproveRequest => "approved",
                    Rpc::DenyRequest => "denied",
                    Rpc::RevokeGrant
                    | Rpc::RegisterStudy
                    | Rpc::DeriveKey
                    | Rpc::RequestKey
                    | Rpc::ListRequests
                    | Rpc::FetchKey
                    | Rpc::RedeemGrant
                    | Rpc::CheckGrant
                    | Rpc::ForgetStudy
                    | Rpc::AddDelegate
                    | Rpc::RemoveDelegate
                    | Rpc::CheckDelegate
                    | Rpc::CreateStandingApproval
                    | Rpc::UpdateStandingApproval
                    | Rpc::RevokeStandingApproval
                    | Rpc::BreakGlass
                    | Rpc::MarkReviewed => "revoked",
                };
                self.publish(kind, &owner_of_decider, rec);
            })
    }

    /// The owner approves a pending request (never its own).
    pub async fn approve(
        &self,
        actor: &str,
        request_id: &str,
        ttl_secs: u64,
        uses: u32,
    ) -> Result<RequestRecord> {
        if ttl_secs == 0 || ttl_secs > self.inner.max_ttl {
            return Err(KeyServerError::InvalidArgument(format!(
                "ttl_seconds must be 1..={}",
                self.inner.max_ttl
            )));
        }
        if uses == 0 || uses > self.inner.max_uses {
            return Err(KeyServerError::InvalidArgument(format!(
                "uses must be 1..={}",
                self.inner.max_uses
            )));
        }
        self.decide_request(
            Rpc::ApproveRequest,
            actor,
            request_id,
            move |ctx, rec, actor| {
                let now = ctx.now_secs();
                let expires_at = now.saturating_add(ttl_secs);
                rec.state = GrantState::Approved {
                    by: actor.to_owned(),
                    at: now,
                    expires_at,
                    uses_granted: uses,
                    uses_left: uses,
                };
                Ok(Ok(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::GrantApproved,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={} expires_at={expires_at} uses={uses}",
                        rec.id, rec.requester
                    ),
                }))
            },
        )
        .await
    }

    /// The owner denies a pending request.
    pub async fn deny(&self, actor: &str, request_id: &str, reason: &str) -> Result<RequestRecord> {
        validate_text("reason", reason)?;
        let reason = reason.to_owned();
        self.decide_request(
            Rpc::DenyRequest,
            actor,
            request_id,
            move |ctx, rec, actor| {
                rec.state = GrantState::Denied {
                    by: actor.to_owned(),
                    at: ctx.now_secs(),
                    reason,
                };
                rec.wrapped_key = None;
                Ok(Ok(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::RequestDenied,
                    study: rec.study_id.clone(),
                    detail: format!("request={} requester={}", rec.id, rec.requester),
                }))
            },
        )
        .await
    }

    /// The owner revokes an approved grant.
    pub async fn revoke(
        &self,
        actor: &str,
        request_id: &str,
        reason: &str,
    ) -> Result<RequestRecord> {
        validate_text("reason", reason)?;
        let reason = reason.to_owned();
        self.decide_request(
            Rpc::RevokeGrant,
            actor,
            request_id,
            move |ctx, rec, actor| {
                // The gate admitted only an approved grant.
                let GrantState::Approved {
                    expires_at,
                    uses_granted,
                    uses_left,
                    ..
                } = rec.state
                else {
                    return Err(KeyServerError::Corrupt(format!(
                        "request {} is not approved",
                        rec.id
                    )));
                };
                rec.state = GrantState::Revoked {
                    by: actor.to_owned(),
                    at: ctx.now_secs(),
                    reason,
                    expires_at,
                    uses_granted,
                    uses_left,
                };
                rec.wrapped_key = None;
                Ok(Ok(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::GrantRevoked,
                    study: rec.study_id.clone(),
                    detail: format!("request={} requester={}", rec.id, rec.requester),
                }))
            },
        )
        .await
    }
}
