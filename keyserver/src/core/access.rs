//! Access that fits clinical work (issue 19): standing approvals,
//! break-glass review and settings, the grants listing and the live event
//! feed. The rules are pure in [`policy::access`]; every decision here goes
//! through the gate like the rest of the core, and every change is one
//! write job that appends its audit entry.

use tokio::sync::broadcast;

use crate::core::Core;
use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::gate::{Context, authorize_in_txn};
use crate::core::ids::{ApprovalId, RequestId, StudyId, validate_label};
use crate::core::kv::{KvRead, KvWrite};
use crate::core::policy::{Action, Rpc};
use crate::core::replica_feed;
use crate::core::store::{
    GrantState, Grantee, OWNER_SETTINGS, OWNER_STANDING, OWNER_STUDIES, OwnerSettings,
    REQUESTER_REQUESTS, REQUESTS, RequestRecord, STANDING, STUDIES, STUDY_REQUESTS, StandingRecord,
    StudyRecord, get_json, index_key, index_scan, to_json,
};
use crate::error::{KeyServerError, Result};

/// Most studies a standing approval lists.
pub const STANDING_STUDIES_MAX: usize = 100;
/// Most standing approvals one owner keeps (live or not).
pub const STANDING_PER_OWNER_MAX: usize = 1000;
/// Most grants or break-glass uses one listing returns.
pub const ACCESS_LIST_MAX: usize = 5000;

pub use super::access_types::{AccessConfig, AccessEvent};

/// Owner-chosen fields of a new standing approval.
#[derive(Debug, Clone, Default)]
pub struct NewStanding {
    /// An identity, or empty.
    pub grantee_identity: String,
    /// A role or group, or empty.
    pub grantee_role: String,
    /// Access purpose.
    pub access_purpose: String,
    /// Studies (empty: all of the owner's).
    pub studies: Vec<String>,
    /// Lifetime of the approval, seconds.
    pub ttl_secs: u64,
    /// Approvals it may make (0: unlimited).
    pub budget: u32,
    /// Per grant (0: defaults).
    pub grant_ttl_secs: u64,
    /// Per grant (0: default 1).
    pub grant_uses: u32,
}

/// One grant as `tessera grants` shows it.
#[derive(Debug, Clone)]
pub struct GrantView {
    /// The request.
    pub request: RequestRecord,
    /// Usable now.
    pub valid: bool,
    /// Usable, and expiring soon.
    pub expiring_soon: bool,
    /// Seconds until expiry (0 when expired or not approved).
    pub seconds_left: u64,
}

/// Is `rec`'s grant usable at `now` (its approval `revoked` or not)?
pub fn grant_valid(rec: &RequestRecord, now: u64, revoked_approval: bool) -> (bool, u64) {
    match rec.state {
        GrantState::Approved {
            expires_at,
            uses_left,
            ..
        } => {
            let left = expires_at.saturating_sub(now);
            (left > 0 && uses_left > 0 && !revoked_approval, left)
        }
        GrantState::Pending | GrantState::Denied { .. } | GrantState::Revoked { .. } => (false, 0),
    }
}

pub(crate) fn load_standing<R: KvRead + ?Sized>(r: &R, id: &str) -> Result<Option<StandingRecord>> {
    get_json(r, STANDING, id)
}

impl Core {
    /// Roles and groups of `identity` (standing approvals to a role).
    pub(crate) fn roles_of(&self, identity: &str) -> Vec<String> {
        let a = &self.inner.access;
        let mut out: Vec<String> = tessera_tls::Identity::parse_uri(identity)
            .map(|id| {
                a.roles
                    .roles_of(&id)
                    .into_iter()
                    .map(|r| r.as_str().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.extend(
            a.groups
                .iter()
                .filter(|(_, members)| members.iter().any(|m| m == identity))
                .map(|(g, _)| g.clone()),
        );
        out
    }

    /// The live feed of requests filed and decided.
    pub fn subscribe(&self) -> broadcast::Receiver<AccessEvent> {
        self.inner.events.subscribe()
    }

    pub(crate) fn publish(&self, kind: &'static str, owner: &str, rec: &RequestRecord) {
        if matches!(kind, "requested" | "break_glass") {
            self.queue_webhook(kind, owner, rec);
        }
        let mut request = rec.clone();
        request.wrapped_key = None;
        let ev = AccessEvent {
            kind,
            owner: owner.to_owned(),
            request,
        };
        replica_feed::tell(
            &self.inner.store,
            &self.inner.origin,
            ev.kind,
            &ev.owner,
            &ev.request.id,
        );
        // No watcher is not an error.
        let _ = self.inner.events.send(ev);
    }

    /// The owner `actor` grants in advance. Refused (and audited): naming
    /// itself, a study it does not own, a purpose outside the vocabulary.
    pub async fn create_standing(&self, actor: &str, n: NewStanding) -> Result<StandingRecord> {
        self.ensure_chain_intact()?;
        let grantee = match (n.grantee_identity.is_empty(), n.grantee_role.is_empty()) {
            (false, true) => {
                self.identity("grantee_identity", &n.grantee_identity)?;
                Grantee::Identity(n.grantee_identity.clone())
            }
            (true, false) => {
                validate_label("grantee_role", &n.grantee_role)?;
                Grantee::Role(n.grantee_role.clone())
            }
            (true, true) | (false, false) => {
                return Err(KeyServerError::InvalidArgument(
                    "name exactly one of grantee_identity and grantee_role".into(),
                ));
            }
        };
        let shown = if validate_label("access_purpose", &n.access_purpose).is_ok() {
            n.access_purpose.as_str()
        } else {
            "<malformed>"
        };
        self.authorize(
            actor,
            Action::Purpose {
                rpc: Rpc::CreateStandingApproval,
                purpose: &n.access_purpose,
            },
            Context::rpc("", format!("access_purpose={shown}")),
        )
        .await?;
        if n.studies.len() > STANDING_STUDIES_MAX {
            return Err(KeyServerError::InvalidArgument(format!(
                "at most {STANDING_STUDIES_MAX} studies"
            )));
        }
        let mut studies = Vec::with_capacity(n.studies.len());
        for s in &n.studies {
            studies.push(StudyId::parse(s)?.as_str().to_owned());
        }
        studies.sort();
        studies.dedup();
        let max_ttl = self.inner.max_ttl;
        if n.ttl_secs == 0 || n.ttl_secs > max_ttl {
            return Err(KeyServerError::InvalidArgument(format!(
                "ttl_seconds must be 1..={max_ttl}"
            )));
        }
        let grant_ttl = match n.grant_ttl_secs {
            0 => max_ttl.min(3600),
            t if t > max_ttl => {
                return Err(KeyServerError::InvalidArgument(format!(
                    "grant_ttl_seconds must be 0..={max_ttl}"
                )));
            }
            t => t,
        };
        let grant_uses = match n.grant_uses {
            0 => 1,
            u if u > self.inner.max_uses => {
                return Err(KeyServerError::InvalidArgument(format!(
                    "grant_uses must be 0..={}",
                    self.inner.max_uses
                )));
            }
            u => u,
        };
        let id = ApprovalId::random(&self.inner.rng)?;
        let owner = actor.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let now = ctx.now_secs();
                let owned = {
                    let t = ctx.txn;
                    let mut all = true;
                    for s in &studies {
                        let rec: Option<StudyRecord> = get_json(t, STUDIES, s)?;
                        all &= rec.is_some_and(|r| r.owner == owner && !r.is_forgotten());
                    }
                    all
                };
                let grantee_identity = match &grantee {
                    Grantee::Identity(i) => Some(i.as_str()),
                    Grantee::Role(_) => None,
                };
                let action = Action::CreateStanding {
                    grantee_identity,
                    studies_owned: owned,
                };
                let audit = Context::rpc("", format!("grantee={}", grantee_text(&grantee)));
                if let Err(e) = authorize_in_txn(ctx, &rules, &owner, &action, audit)? {
                    return Ok(Err(e));
                }
                if index_scan(ctx.txn, OWNER_STANDING, &owner)?.len() >= STANDING_PER_OWNER_MAX {
                    return Ok(Err(KeyServerError::FailedPrecondition(format!(
                        "at most {STANDING_PER_OWNER_MAX} standing approvals per owner"
                    ))));
                }
                let rec = StandingRecord {
                    id: id.as_str().to_owned(),
                    owner: owner.clone(),
                    grantee,
                    access_purpose: n.access_purpose,
                    studies,
                    created_at: now,
                    expires_at: now.saturating_add(n.ttl_secs),
                    budget_left: (n.budget > 0).then_some(n.budget),
                    grant_ttl_secs: grant_ttl,
                    grant_uses,
                    approvals_made: 0,
                    revoked_at: None,
                };
                ctx.txn
                    .put_str(OWNER_STANDING, &index_key(&owner, &rec.id), &[])?;
                ctx.txn
                    .put_str(STANDING, &rec.id, to_json(&rec)?.as_slice())?;
                ctx.append(NewEntry {
                    actor: owner,
                    event: AuditEvent::StandingCreated,
                    study: String::new(),
                    detail: format!(
                        "approval={} grantee={} access_purpose={} studies={} expires_at={} budget={}",
                        rec.id,
                        grantee_text(&rec.grantee),
                        rec.access_purpose,
                        if rec.studies.is_empty() {
                            "all".to_owned()
                        } else {
                            rec.studies.join(",")
                        },
                        rec.expires_at,
                        rec.budget_left
                            .map_or_else(|| "none".to_owned(), |b| b.to_string())
                    ),
                })?;
                Ok(Ok(rec))
            })
            .await
    }

    /// The owner's standing approvals (live only unless `include_inactive`).
    pub fn list_standing(
        &self,
        actor: &str,
        include_inactive: bool,
    ) -> Result<Vec<StandingRecord>> {
        let now = self.inner.clock.now_ms() / 1000;
        let r = self.inner.store.read()?;
        let mut out = Vec::new();
        for id in index_scan(r.as_ref(), OWNER_STANDING, actor)? {
            if let Some(sa) = load_standing(r.as_ref(), &id)?
                && (include_inactive || (sa.revoked_at.is_none() && now < sa.expires_at))
            {
                out.push(sa);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// The owner changes one of its approvals: a new lifetime from now
    /// (`ttl_secs` > 0) and/or a new remaining budget (`budget` > 0), or no
    /// budget at all (`clear_budget`).
    pub async fn update_standing(
        &self,
        actor: &str,
        approval_id: &str,
        ttl_secs: u64,
        budget: u32,
        clear_budget: bool,
    ) -> Result<StandingRecord> {
        if ttl_secs > self.inner.max_ttl {
            return Err(KeyServerError::InvalidArgument(format!(
                "ttl_seconds must be 0..={}",
                self.inner.max_ttl
            )));
        }
        if budget > 0 && clear_budget {
            return Err(KeyServerError::InvalidArgument(
                "budget and clear_budget exclude each other".into(),
            ));
        }
        self.change_standing(
            Rpc::UpdateStandingApproval,
            actor,
            approval_id,
            move |sa, now| {
                if ttl_secs > 0 {
                    sa.expires_at = now.saturating_add(ttl_secs);
                }
                if budget > 0 {
                    sa.budget_left = Some(budget);
                }
                if clear_budget {
                    sa.budget_left = None;
                }
                (
                    AuditEvent::StandingUpdated,
                    format!(
                        "approval={} expires_at={} budget={}",
                        sa.id,
                        sa.expires_at,
                        sa.budget_left
                            .map_or_else(|| "none".to_owned(), |b| b.to_string())
                    ),
                )
            },
        )
        .await
    }

    /// The owner revokes one of its approvals: from this commit on, no
    /// request is approved by it and no grant it approved releases a key.
    pub async fn revoke_standing(&self, actor: &str, approval_id: &str) -> Result<StandingRecord> {
        self.change_standing(
            Rpc::RevokeStandingApproval,
            actor,
            approval_id,
            |sa, now| {
                sa.revoked_at = Some(now);
                (
                    AuditEvent::StandingRevoked,
                    format!("approval={} approvals_made={}", sa.id, sa.approvals_made),
                )
            },
        )
        .await
    }

    async fn change_standing<F>(
        &self,
        rpc: Rpc,
        actor: &str,
        approval_id: &str,
        f: F,
    ) -> Result<StandingRecord>
    where
        F: FnOnce(&mut StandingRecord, u64) -> (AuditEvent, String) + Send + 'static,
    {
        self.ensure_chain_intact()?;
        let id = ApprovalId::parse(approval_id)?;
        let actor = actor.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let Some(mut sa) = load_standing(ctx.txn, id.as_str())? else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "standing approval {}",
                        id.as_str()
                    ))));
                };
                let action = Action::ChangeStanding {
                    rpc,
                    owner: &sa.owner,
                    revoked: sa.revoked_at.is_some(),
                };
                let audit = Context::rpc("", format!("approval={}", sa.id));
                if let Err(e) = authorize_in_txn(ctx, &rules, &actor, &action, audit)? {
                    return Ok(Err(e));
                }
                let (event, detail) = f(&mut sa, ctx.now_secs());
                put_standing(ctx.txn, &sa)?;
                ctx.append(NewEntry {
                    actor,
                    event,
                    study: String::new(),
                    detail,
                })?;
                Ok(Ok(sa))
            })
            .await
    }

    /// The owner `actor` allows or forbids break-glass on its studies.
    pub async fn set_break_glass(&self, actor: &str, disabled: bool) -> Result<bool> {
        self.ensure_chain_intact()?;
        let owner = actor.to_owned();
        self.inner
            .writer
            .submit(move |ctx| {
                let mut s = owner_settings(ctx.txn, &owner)?;
                s.break_glass_disabled = disabled;
                ctx.txn
                    .put_str(OWNER_SETTINGS, &owner, to_json(&s)?.as_slice())?;
                ctx.append(NewEntry {
                    actor: owner,
                    event: AuditEvent::BreakGlassSet,
                    study: String::new(),
                    detail: format!("disabled={disabled}"),
                })?;
                Ok(Ok(disabled))
            })
            .await
    }

    /// Break-glass uses: on `actor`'s studies, or every one for an admin;
    /// unreviewed only unless `include_reviewed`. Newest first.
    pub fn list_break_glass(
        &self,
        actor: &str,
        admin: bool,
        include_reviewed: bool,
    ) -> Result<Vec<RequestRecord>> {
        let r = self.inner.store.read()?;
        let r = r.as_ref();
        let keep = |rec: &RequestRecord| {
            rec.break_glass
                .as_ref()
                .is_some_and(|b| include_reviewed || b.reviewed.is_none())
        };
        let mut out = Vec::new();
        if admin {
            r.scan_all(REQUESTS, &mut |_, v| {
                let rec: RequestRecord = serde_json::from_slice(v)
                    .map_err(|e| KeyServerError::Corrupt(format!("request: {e}")))?;
                if keep(&rec) {
                    out.push(rec);
                }
                Ok(true)
            })?;
        } else {
            for s in index_scan(r, OWNER_STUDIES, actor)? {
                for rid in index_scan(r, STUDY_REQUESTS, &s)? {
                    if let Some(rec) = get_json::<RequestRecord, _>(r, REQUESTS, &rid)?
                        && keep(&rec)
                    {
                        out.push(rec);
                    }
                }
            }
        }
        for rec in &mut out {
            rec.wrapped_key = None;
        }
        out.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
        out.truncate(ACCESS_LIST_MAX);
        Ok(out)
    }

    /// The study's owner or an admin marks a break-glass use reviewed.
    pub async fn mark_reviewed(
        &self,
        actor: &str,
        admin: bool,
        request_id: &str,
    ) -> Result<RequestRecord> {
        self.ensure_chain_intact()?;
        let rid = RequestId::parse(request_id)?;
        let actor = actor.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let Some(mut rec) = get_json::<RequestRecord, _>(ctx.txn, REQUESTS, rid.as_str())?
                else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "request {}",
                        rid.as_str()
                    ))));
                };
                let owner = get_json::<StudyRecord, _>(ctx.txn, STUDIES, &rec.study_id)?
                    .ok_or_else(|| KeyServerError::Corrupt(format!("study {}", rec.study_id)))?
                    .owner;
                let action = Action::Review {
                    owner: &owner,
                    admin,
                    break_glass: rec.break_glass.is_some(),
                    reviewed: rec
                        .break_glass
                        .as_ref()
                        .is_some_and(|b| b.reviewed.is_some()),
                };
                let audit = Context::rpc(rec.study_id.clone(), format!("request={}", rec.id));
                if let Err(e) = authorize_in_txn(ctx, &rules, &actor, &action, audit)? {
                    return Ok(Err(e));
                }
                let now = ctx.now_secs();
                if let Some(b) = rec.break_glass.as_mut() {
                    b.reviewed = Some((actor.clone(), now));
                }
                ctx.txn
                    .put_str(REQUESTS, &rec.id, to_json(&rec)?.as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::BreakGlassReviewed,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={} break_glass=1",
                        rec.id, rec.requester
                    ),
                })?;
                rec.wrapped_key = None;
                Ok(Ok(rec))
            })
            .await
    }

    /// Grants (approved or revoked requests): the caller's own, or on its
    /// studies (`as_owner`); valid only unless `include_spent`. Oldest first.
    pub fn list_grants(
        &self,
        actor: &str,
        as_owner: bool,
        include_spent: bool,
    ) -> Result<Vec<GrantView>> {
        let now = self.inner.clock.now_ms() / 1000;
        let soon = self.inner.access.expiring_soon_secs;
        let r = self.inner.store.read()?;
        let r = r.as_ref();
        let ids = if as_owner {
            let mut ids = Vec::new();
            for s in index_scan(r, OWNER_STUDIES, actor)? {
                ids.extend(index_scan(r, STUDY_REQUESTS, &s)?);
            }
            ids
        } else {
            index_scan(r, REQUESTER_REQUESTS, actor)?
        };
        let mut out = Vec::new();
        for rid in ids {
            let Some(mut rec) = get_json::<RequestRecord, _>(r, REQUESTS, &rid)? else {
                continue;
            };
            if matches!(rec.state, GrantState::Pending | GrantState::Denied { .. }) {
                continue;
            }
            let revoked_approval = match &rec.standing {
                Some(id) => load_standing(r, id)?.is_none_or(|sa| sa.revoked_at.is_some()),
                None => false,
            };
            let (valid, left) = grant_valid(&rec, now, revoked_approval);
            if !valid && !include_spent {
                continue;
            }
            rec.wrapped_key = None;
            out.push(GrantView {
                request: rec,
                valid,
                expiring_soon: valid && left <= soon,
                seconds_left: if valid { left } else { 0 },
            });
            if out.len() >= ACCESS_LIST_MAX {
                break;
            }
        }
        out.sort_by(|a, b| {
            (a.request.created_at, &a.request.id).cmp(&(b.request.created_at, &b.request.id))
        });
        Ok(out)
    }
}

/// `identity:<uri>` or `role:<name>`, for audit details.
pub fn grantee_text(g: &Grantee) -> String {
    match g {
        Grantee::Identity(i) => format!("identity:{i}"),
        Grantee::Role(r) => format!("role:{r}"),
    }
}

/// The standing approvals of `owner`, read inside a transaction.
pub(crate) fn owner_standing(txn: &dyn KvWrite, owner: &str) -> Result<Vec<StandingRecord>> {
    let mut out = Vec::new();
    for id in index_scan(txn, OWNER_STANDING, owner)? {
        if let Some(sa) = load_standing(txn, &id)? {
            out.push(sa);
        }
    }
    out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    Ok(out)
}

/// Is the standing approval `id` revoked (or gone)? Inside a transaction.
pub(crate) fn standing_revoked(txn: &dyn KvWrite, id: &str) -> Result<bool> {
    Ok(load_standing(txn, id)?.is_none_or(|sa| sa.revoked_at.is_some()))
}

/// Writes back a standing approval inside a transaction.
pub(crate) fn put_standing(txn: &dyn KvWrite, sa: &StandingRecord) -> Result<()> {
    txn.put_str(STANDING, &sa.id, to_json(sa)?.as_slice())
}

/// The owner's settings, inside a transaction.
pub(crate) fn owner_settings(txn: &dyn KvWrite, owner: &str) -> Result<OwnerSettings> {
    Ok(get_json(txn, OWNER_SETTINGS, owner)?.unwrap_or_default())
}

/// Indexes a new request under its requester, inside a transaction.
pub(crate) fn index_requester(txn: &dyn KvWrite, rec: &RequestRecord) -> Result<()> {
    txn.put_str(REQUESTER_REQUESTS, &index_key(&rec.requester, &rec.id), &[])
}
