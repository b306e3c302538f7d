//! Spending grants: the requester's fetch, the gateway's redeem (a use
//! spent, no key leaves) and check (a read, nothing spent). Each use is one
//! write job that re-reads the request inside the transaction (on
//! PostgreSQL under the chain lock, so a use is spent once across
//! replicas) and appends its audit entry; filing and deciding requests are
//! in `grants.rs`.

use crate::core::access;
use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::crypto::grant_aad;
use crate::core::gate::{self, Context, authorize_in_txn};
use crate::core::ids::{RequestId, StudyId};
use crate::core::policy::{Action, Rpc};
use crate::core::store::{GrantState, REQUESTS, RequestRecord, get_json, to_json};
use crate::core::types::{Redeemed, Released};
use crate::core::{Core, writer};
use crate::error::{KeyServerError, Result};

/// The grant-use question about `rec`: may `user` use it (for `study`, if
/// said) at `now`?
fn use_grant<'a>(
    rpc: Rpc,
    rec: &'a RequestRecord,
    user: &'a str,
    study: Option<&'a str>,
    now: u64,
) -> Action<'a> {
    Action::UseGrant {
        rpc,
        user,
        study,
        requester: &rec.requester,
        grant_study: &rec.study_id,
        state: &rec.state,
        now,
    }
}

/// Drops the held key of a grant seen expired; true when `rec` changed and
/// must be written back.
fn drop_expired_key(rec: &mut RequestRecord, now: u64) -> bool {
    matches!(rec.state, GrantState::Approved { expires_at, .. } if now >= expires_at)
        && rec.wrapped_key.take().is_some()
}

/// The request a write job is about to use (NotFound as the job's refusal).
/// An expired grant is refused later whoever asks: its held key goes now,
/// written back in this transaction.
fn request_for_use(ctx: &writer::TxnCtx<'_>, rid: &RequestId) -> Result<Result<RequestRecord>> {
    let txn = ctx.txn;
    let Some(mut rec) = get_json::<RequestRecord, _>(txn, REQUESTS, rid.as_str())? else {
        return Ok(Err(KeyServerError::NotFound(format!(
            "request {}",
            rid.as_str()
        ))));
    };
    if drop_expired_key(&mut rec, ctx.now_secs()) {
        txn.put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
    }
    Ok(Ok(rec))
}

/// Spends one use of a grant the policy accepted; returns
/// `(expires_at, uses_left)`. The held key goes with the last use.
fn take_use(rec: &mut RequestRecord) -> Result<(u64, u32)> {
    let GrantState::Approved {
        expires_at,
        uses_left,
        ..
    } = &mut rec.state
    else {
        return Err(KeyServerError::Corrupt(format!(
            "request {} is not approved",
            rec.id
        )));
    };
    *uses_left = uses_left
        .checked_sub(1)
        .ok_or_else(|| KeyServerError::Corrupt(format!("request {} has no use left", rec.id)))?;
    let out = (*expires_at, *uses_left);
    if out.1 == 0 {
        rec.wrapped_key = None;
    }
    Ok(out)
}

/// The audit flags of a grant's use: its break-glass mark, its standing
/// approval.
fn flags(rec: &RequestRecord) -> String {
    let mut out = String::new();
    if rec.break_glass.is_some() {
        out.push_str(" break_glass=1");
    }
    if let Some(sa) = &rec.standing {
        out.push_str(" standing=");
        out.push_str(sa);
    }
    out
}

/// After the grant-use rule: a grant approved by a standing approval stops
/// releasing keys once that approval is revoked (checked in the transaction,
/// so the revocation's commit is the cut-off).
fn standing_gate(
    ctx: &mut writer::TxnCtx<'_>,
    rules: &crate::core::policy::Rules,
    actor: &str,
    rpc: Rpc,
    rec: &RequestRecord,
    audit: Context,
) -> Result<Result<()>> {
    let Some(sa) = &rec.standing else {
        return Ok(Ok(()));
    };
    let revoked = access::standing_revoked(ctx.txn, sa)?;
    authorize_in_txn(
        ctx,
        rules,
        actor,
        &Action::StandingGrant { rpc, revoked },
        audit,
    )
}

impl Core {
    /// The requester fetches its key while the grant is valid; uses one use.
    pub async fn fetch_key(&self, actor: &str, request_id: &str) -> Result<Released> {
        self.ensure_chain_intact()?;
        let rid = RequestId::parse(request_id)?;
        let actor = actor.to_owned();
        let kek = self.inner.kek.clone();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut rec = match request_for_use(ctx, &rid)? {
                    Ok(rec) => rec,
                    Err(e) => return Ok(Err(e)),
                };
                let now = ctx.now_secs();
                let action = use_grant(Rpc::FetchKey, &rec, &actor, None, now);
                let audit = Context::bare(rec.study_id.clone(), format!("request={}", rec.id));
                if let Err(e) = authorize_in_txn(ctx, &rules, &actor, &action, audit.clone())? {
                    return Ok(Err(e));
                }
                if let Err(e) = standing_gate(ctx, &rules, &actor, Rpc::FetchKey, &rec, audit)? {
                    return Ok(Err(e));
                }
                let wrapped = rec.wrapped_key.clone().ok_or_else(|| {
                    KeyServerError::Corrupt(format!("request {} holds no key", rec.id))
                })?;
                let key = kek.unwrap_secret(&grant_aad(&rec.id), &wrapped)?;
                let (expires_at, uses_left) = take_use(&mut rec)?;
                txn.put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::KeyReleased,
                    study: rec.study_id.clone(),
                    detail: format!("request={} uses_left={uses_left}{}", rec.id, flags(&rec)),
                })?;
                Ok(Ok(Released {
                    key,
                    study_id: rec.study_id,
                    purpose: rec.purpose,
                    master_version: rec.master_version,
                    expires_at,
                    uses_left,
                }))
            })
            .await
    }

    /// Gateway only: spends one use of `on_behalf_of`'s grant on `study_id`
    /// (same checks as [`Core::fetch_key`] with `on_behalf_of` as the
    /// requester, plus the study must match). No key leaves the keyserver.
    /// Audited as `grant.redeemed`; refusals as `redeem.refused`.
    pub async fn redeem_grant(
        &self,
        actor: &str,
        request_id: &str,
        on_behalf_of: &str,
        study_id: &str,
    ) -> Result<Redeemed> {
        self.gateway_only(actor, Rpc::RedeemGrant, study_id, Some(request_id))
            .await?;
        let rid = RequestId::parse(request_id)?;
        let sid = StudyId::parse(study_id)?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let actor = actor.to_owned();
        let requester = on_behalf_of.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut rec = match request_for_use(ctx, &rid)? {
                    Ok(rec) => rec,
                    Err(e) => return Ok(Err(e)),
                };
                let now = ctx.now_secs();
                let other = if rec.study_id == sid.as_str() {
                    String::new()
                } else {
                    format!(" asked_study={}", sid.as_str())
                };
                let audit = Context::bare(
                    rec.study_id.clone(),
                    format!("op=redeem request={} requester={requester}{other}", rec.id),
                );
                let action = use_grant(Rpc::RedeemGrant, &rec, &requester, Some(sid.as_str()), now);
                if let Err(e) = authorize_in_txn(ctx, &rules, &actor, &action, audit.clone())? {
                    return Ok(Err(e));
                }
                if let Err(e) = standing_gate(ctx, &rules, &actor, Rpc::RedeemGrant, &rec, audit)? {
                    return Ok(Err(e));
                }
                let (expires_at, uses_left) = take_use(&mut rec)?;
                txn.put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::GrantRedeemed,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={requester} purpose={} uses_left={uses_left}{}",
                        rec.id,
                        rec.purpose,
                        flags(&rec)
                    ),
                })?;
                Ok(Ok(Redeemed {
                    study_id: rec.study_id,
                    purpose: rec.purpose,
                    expires_at,
                    uses_left,
                }))
            })
            .await
    }

    /// Gateway only: would [`Core::redeem_grant`] succeed now? Spends
    /// nothing and, being a read, writes no audit record, neither on success
    /// nor when the grant is not usable (the gateway must still redeem, which
    /// is audited, before serving anyone). A caller other than the gateway is
    /// refused and that refusal is audited (`redeem.refused`, `op=check`).
    pub async fn check_grant(
        &self,
        actor: &str,
        request_id: &str,
        on_behalf_of: &str,
        study_id: &str,
    ) -> Result<Redeemed> {
        self.gateway_only(actor, Rpc::CheckGrant, study_id, Some(request_id))
            .await?;
        let rid = RequestId::parse(request_id)?;
        let sid = StudyId::parse(study_id)?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let rec = {
            let r = self.inner.store.read()?;
            get_json::<RequestRecord, _>(r.as_ref(), REQUESTS, rid.as_str())?
                .ok_or_else(|| KeyServerError::NotFound(format!("request {}", rid.as_str())))?
        };
        let now = self.inner.clock.now_ms() / 1000;
        // A read: a grant that is not usable is answered, not recorded
        // (README, "Gateway grants").
        let action = use_grant(Rpc::CheckGrant, &rec, on_behalf_of, Some(sid.as_str()), now);
        gate::answer_unrecorded(&self.inner.rules, actor, &action)?;
        if let Some(sa) = &rec.standing {
            let revoked = {
                let r = self.inner.store.read()?;
                get_json::<crate::core::store::StandingRecord, _>(
                    r.as_ref(),
                    crate::core::store::STANDING,
                    sa,
                )?
                .is_none_or(|s| s.revoked_at.is_some())
            };
            let action = Action::StandingGrant {
                rpc: Rpc::CheckGrant,
                revoked,
            };
            gate::answer_unrecorded(&self.inner.rules, actor, &action)?;
        }
        let GrantState::Approved {
            expires_at,
            uses_left,
            ..
        } = rec.state
        else {
            return Err(KeyServerError::Corrupt(format!(
                "request {} is not approved",
                rec.id
            )));
        };
        Ok(Redeemed {
            study_id: rec.study_id,
            purpose: rec.purpose,
            expires_at,
            uses_left,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(state: GrantState) -> RequestRecord {
        RequestRecord {
            id: "rq-1".into(),
            study_id: "st-a".into(),
            requester: "spiffe://tessera.local/user/clinician".into(),
            presented_by: "spiffe://tessera.local/user/clinician".into(),
            purpose: "pixels".into(),
            justification: String::new(),
            created_at: 1,
            master_version: 1,
            state,
            wrapped_key: Some(vec![1, 2, 3]),
            access_purpose: String::new(),
            standing: None,
            break_glass: None,
        }
    }

    fn approved(expires_at: u64, uses_left: u32) -> GrantState {
        GrantState::Approved {
            by: "spiffe://tessera.local/user/owner".into(),
            at: 1,
            expires_at,
            uses_granted: 2,
            uses_left,
        }
    }

    #[test]
    fn a_use_is_spent_and_the_key_goes_with_the_last() {
        let mut rec = grant(approved(100, 2));
        assert_eq!(take_use(&mut rec).unwrap(), (100, 1));
        assert!(rec.wrapped_key.is_some());
        assert_eq!(take_use(&mut rec).unwrap(), (100, 0));
        assert!(rec.wrapped_key.is_none());
        // The policy refuses a used-up grant first; reaching here is damage.
        assert!(matches!(
            take_use(&mut rec),
            Err(KeyServerError::Corrupt(_))
        ));
        assert!(matches!(
            take_use(&mut grant(GrantState::Pending)),
            Err(KeyServerError::Corrupt(_))
        ));
    }

    #[test]
    fn an_expired_grant_loses_its_key_once() {
        let mut rec = grant(approved(100, 1));
        assert!(!drop_expired_key(&mut rec, 99));
        assert!(rec.wrapped_key.is_some());
        assert!(drop_expired_key(&mut rec, 100));
        assert!(rec.wrapped_key.is_none());
        assert!(
            !drop_expired_key(&mut rec, 101),
            "nothing left to write back"
        );
        let mut pending = grant(GrantState::Pending);
        assert!(!drop_expired_key(&mut pending, u64::MAX));
        assert!(pending.wrapped_key.is_some());
    }
}
