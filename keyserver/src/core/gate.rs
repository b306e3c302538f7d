//! The gate: every authorization decision of the core passes here.
//!
//! [`judge`] asks the pure rules ([`policy::decide`]) and, when they refuse,
//! builds the refusal's audit record in the one format every refusal uses.
//! The record is then written **before** the error goes back: outside a
//! transaction by [`Core::authorize`] (or [`Core::record`]), inside the
//! caller's write transaction by [`authorize_in_txn`] (so the refusal and
//! the state it was decided on commit together). The authorization layer's
//! role refusals come in through [`Core::audit_access_refusal`].
//!
//! The one decision deliberately answered without a record is CheckGrant's
//! grant-state answer ([`answer_unrecorded`]; see the README, "Gateway
//! grants").

use std::sync::Arc;

use crate::core::Core;
use crate::core::attrs::CanonicalAttributes;
use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::crypto::Master;
use crate::core::ids::{RequestId, StudyId};
use crate::core::policy::{self, Action, Rpc, Rules};
use crate::core::store::StudyRecord;
use crate::core::writer::TxnCtx;
use crate::error::{KeyServerError, Result};

/// How the detail of a refusal's audit record reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `rpc=<Method>[ <context>] reason=<why>` (most refusals).
    Rpc,
    /// `<context> reason=<why>`: the grant-use records (`fetch.refused`,
    /// and `redeem.refused` decided in the transaction), whose format
    /// predates the `rpc=` field; scripts and tools read them as they are.
    Bare,
}

/// Where a refusal is recorded: the study it concerns (empty when there is
/// none or the id is malformed) and the context written before `reason=`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Context {
    /// Study id of the record.
    pub study: String,
    /// Caller-supplied context (request, purpose, `on_behalf_of`, ...).
    pub detail: String,
    /// Its layout.
    pub form: Form,
}

impl Context {
    /// `rpc=<Method> <detail> reason=...` about `study`.
    pub fn rpc(study: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            study: study.into(),
            detail: detail.into(),
            form: Form::Rpc,
        }
    }

    /// `<detail> reason=...` about `study`.
    pub fn bare(study: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            study: study.into(),
            detail: detail.into(),
            form: Form::Bare,
        }
    }
}

/// A refusal decided: the caller's error and the audit record to write.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// What the caller gets.
    pub error: KeyServerError,
    /// What the chain gets.
    pub entry: NewEntry,
}

/// The audit record of a refusal of `rpc`: caller, event, study, detail.
pub(crate) fn refusal_entry(actor: &str, rpc: Rpc, ctx: Context, reason: &str) -> NewEntry {
    let detail = match ctx.form {
        Form::Rpc if ctx.detail.is_empty() => format!("rpc={} reason={reason}", rpc.name()),
        Form::Rpc => format!("rpc={} {} reason={reason}", rpc.name(), ctx.detail),
        Form::Bare => format!("{} reason={reason}", ctx.detail),
    };
    NewEntry {
        actor: actor.to_owned(),
        event: rpc.refused_event(),
        study: ctx.study,
        detail,
    }
}

/// The one decision function: may `actor` do `action`? On a refusal, the
/// error and its audit record (context `ctx`).
pub(crate) fn judge(
    rules: &Rules,
    actor: &str,
    action: &Action<'_>,
    ctx: Context,
) -> std::result::Result<(), Refusal> {
    policy::decide(rules, actor, action).map_err(|r| Refusal {
        entry: refusal_entry(actor, action.rpc(), ctx, &r.reason),
        error: r.into_error(),
    })
}

/// [`judge`] inside a write transaction: a refusal is appended to this
/// transaction's audit records and returned as the inner `Err` (the job
/// returns it to its caller; the record commits with the batch).
pub(crate) fn authorize_in_txn(
    tx: &mut TxnCtx<'_>,
    rules: &Rules,
    actor: &str,
    action: &Action<'_>,
    ctx: Context,
) -> Result<Result<()>> {
    match judge(rules, actor, action, ctx) {
        Ok(()) => Ok(Ok(())),
        Err(r) => {
            tx.append(r.entry)?;
            Ok(Err(r.error))
        }
    }
}

/// The decision without a record: only for reads whose refusal is an
/// answer about an object's state, not about the caller (CheckGrant on a
/// grant that is not usable; the gateway must still redeem it, which is
/// recorded either way).
pub(crate) fn answer_unrecorded(rules: &Rules, actor: &str, action: &Action<'_>) -> Result<()> {
    policy::decide(rules, actor, action).map_err(policy::Refused::into_error)
}

/// `study` if it is a well-formed study id, else empty (only parsed ids
/// reach the audit log).
pub(crate) fn audit_study(study_id: &str) -> String {
    StudyId::parse(study_id)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

impl Core {
    /// Appends one record (its own transaction in the group commit).
    pub(crate) async fn audit_only(&self, e: NewEntry) -> Result<()> {
        self.inner
            .writer
            .submit(move |ctx| {
                ctx.append(e)?;
                Ok(Ok(()))
            })
            .await
    }

    /// Writes a refusal decided outside a transaction, then returns its
    /// error. If the audit write fails the caller is refused all the same
    /// (and the failure logged).
    pub(crate) async fn record(&self, r: Refusal) -> KeyServerError {
        let event = r.entry.event.as_str();
        let caller = r.entry.actor.clone();
        if let Err(e) = self.audit_only(r.entry).await {
            tracing::error!(error = %e, event, caller = %caller, "refusal not audited; refused anyway");
        }
        r.error
    }

    /// The gate of every key operation decided before its transaction: the
    /// chain must verify, then [`judge`]; a refusal is recorded before it
    /// is returned.
    pub(crate) async fn authorize(
        &self,
        actor: &str,
        action: Action<'_>,
        ctx: Context,
    ) -> Result<()> {
        self.ensure_chain_intact()?;
        match judge(&self.inner.rules, actor, &action, ctx) {
            Ok(()) => Ok(()),
            Err(r) => Err(self.record(r).await),
        }
    }

    /// The attribute check of DeriveKey and RequestKey: the attributes must
    /// open the study's commitment. A mismatch is recorded as `refused`
    /// (detail as given, no reason: which attribute differs is never said)
    /// and fails with [`KeyServerError::AttributeMismatch`].
    pub(crate) async fn check_attributes(
        &self,
        actor: &str,
        study: &StudyRecord,
        attrs: &CanonicalAttributes,
        refused: AuditEvent,
        detail: String,
    ) -> Result<Arc<Master>> {
        let master = self.master(study.master_version)?;
        if master.verify_commitment(&study.id, &study.salt, attrs, &study.commitment) {
            return Ok(master);
        }
        let refusal = Refusal {
            error: KeyServerError::AttributeMismatch,
            entry: NewEntry {
                actor: actor.to_owned(),
                event: refused,
                study: study.id.clone(),
                detail,
            },
        };
        Err(self.record(refusal).await)
    }

    /// Refuses (and records) any caller but the gateway. Only ids that
    /// parse reach the audit record.
    pub(crate) async fn gateway_only(
        &self,
        actor: &str,
        rpc: Rpc,
        study_id: &str,
        request_id: Option<&str>,
    ) -> Result<()> {
        let request = request_id
            .and_then(|r| RequestId::parse(r).ok())
            .map(|r| format!(" request={}", r.as_str()))
            .unwrap_or_default();
        self.authorize(
            actor,
            Action::GatewayOnly(rpc),
            Context::rpc(audit_study(study_id), format!("op={}{request}", rpc.verb())),
        )
        .await
    }

    /// Appends a refusal of the authorization layer (caller, RPC, reason)
    /// to the chain; a failed write is logged (the call is refused anyway).
    pub async fn audit_access_refusal(&self, caller: &str, rpc: &str, reason: &str) {
        let entry = NewEntry {
            actor: caller.chars().take(256).collect(),
            event: AuditEvent::AccessRefused,
            study: String::new(),
            detail: format!(
                "rpc={} layer=authz reason={reason}",
                rpc.rsplit('/')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(128)
                    .collect::<String>()
            ),
        };
        if let Err(e) = self.audit_only(entry).await {
            tracing::error!(error = %e, rpc, caller, "layer refusal not audited; refused anyway");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::GrantState;

    const GW: &str = "spiffe://tessera.local/service/gateway";
    const WM: &str = "spiffe://tessera.local/service/watermark";
    const OWNER: &str = "spiffe://tessera.local/user/owner";
    const CLIN: &str = "spiffe://tessera.local/user/clinician";

    fn rules() -> Rules {
        Rules {
            gateway: GW.into(),
            derivers: vec![(WM.into(), vec!["pixels".into()])],
            access: crate::core::policy::access::AccessRules::default(),
        }
    }

    #[test]
    fn a_refusal_carries_its_record_in_the_rpc_form() {
        let r = judge(
            &rules(),
            WM,
            &Action::RegisterStudy,
            Context::rpc("st-x", ""),
        )
        .unwrap_err();
        assert!(
            matches!(r.error, KeyServerError::PermissionDenied(ref m) if m == "only the gateway registers studies")
        );
        assert_eq!(r.entry.event, AuditEvent::RegisterRefused);
        assert_eq!(r.entry.actor, WM);
        assert_eq!(r.entry.study, "st-x");
        assert_eq!(
            r.entry.detail,
            "rpc=RegisterStudy reason=only the gateway registers studies"
        );
        let r = judge(
            &rules(),
            WM,
            &Action::DeriveKey { purpose: "dicom" },
            Context::rpc("", "purpose=dicom operation=protect"),
        )
        .unwrap_err();
        assert_eq!(r.entry.event, AuditEvent::DeriveRefused);
        assert_eq!(
            r.entry.detail,
            "rpc=DeriveKey purpose=dicom operation=protect reason=this service may not derive keys for purpose dicom"
        );
    }

    #[test]
    fn grant_use_refusals_keep_the_bare_form() {
        let action = Action::UseGrant {
            rpc: Rpc::FetchKey,
            user: OWNER,
            study: None,
            requester: CLIN,
            grant_study: "st-a",
            state: &GrantState::Pending,
            now: 1,
        };
        let r = judge(
            &rules(),
            OWNER,
            &action,
            Context::bare("st-a", "request=rq-1"),
        )
        .unwrap_err();
        assert_eq!(r.entry.event, AuditEvent::FetchRefused);
        assert_eq!(
            r.entry.detail,
            "request=rq-1 reason=only the requester may fetch this key"
        );
        assert!(answer_unrecorded(&rules(), OWNER, &action).is_err());
    }

    #[test]
    fn an_allowed_action_has_no_record() {
        assert!(judge(&rules(), GW, &Action::RegisterStudy, Context::rpc("", "")).is_ok());
        assert!(answer_unrecorded(&rules(), GW, &Action::RegisterStudy).is_ok());
    }

    #[test]
    fn only_parsed_study_ids_reach_the_record() {
        let id = "st-0123456789abcdef0123456789abcdef";
        assert_eq!(audit_study(id), id);
        assert_eq!(audit_study("st-<script>"), "");
    }
}
