//! Keyserver records as `tessera.keyserver.v1` messages, and the request
//! fields the core takes as plain values. Pure conversion, no policy.

use prost::Message;
use tessera_proto::keyserver::v1 as pb;
use tonic::Status;

use crate::core::audit::AuditEntry;
use crate::core::store::{GrantState, Grantee, RequestRecord, StandingRecord};
use crate::core::{Operation, Redeemed};

pub(super) fn pairs(attrs: Vec<pb::Attribute>) -> Vec<(String, String)> {
    attrs.into_iter().map(|a| (a.name, a.value)).collect()
}

pub(super) fn operation(v: i32) -> Result<Operation, Status> {
    match pb::Operation::try_from(v) {
        Ok(pb::Operation::Unspecified) => Ok(Operation::Unspecified),
        Ok(pb::Operation::Protect) => Ok(Operation::Protect),
        Ok(pb::Operation::Restore) => Ok(Operation::Restore),
        Err(_) => Err(Status::invalid_argument("unknown operation")),
    }
}

pub(super) fn key_request(r: RequestRecord) -> pb::KeyRequest {
    let (break_glass, break_glass_reason, reviewed_by, reviewed_at_unix) = match r.break_glass {
        Some(b) => {
            let (by, at) = b.reviewed.unwrap_or_default();
            (true, b.reason, by, at)
        }
        None => (false, String::new(), String::new(), 0),
    };
    let mut out = pb::KeyRequest {
        access_purpose: r.access_purpose,
        standing_approval: r.standing.unwrap_or_default(),
        break_glass,
        break_glass_reason,
        reviewed_by,
        reviewed_at_unix,
        request_id: r.id,
        study_id: r.study_id,
        requester: r.requester,
        presented_by: r.presented_by,
        purpose: r.purpose,
        justification: r.justification,
        created_at_unix: r.created_at,
        ..Default::default()
    };
    match r.state {
        GrantState::Pending => out.state = pb::RequestState::Pending.into(),
        GrantState::Approved {
            by,
            at,
            expires_at,
            uses_granted,
            uses_left,
        } => {
            out.state = pb::RequestState::Approved.into();
            out.decided_by = by;
            out.decided_at_unix = at;
            out.expires_at_unix = expires_at;
            out.uses_granted = uses_granted;
            out.uses_left = uses_left;
        }
        GrantState::Denied { by, at, reason } => {
            out.state = pb::RequestState::Denied.into();
            out.decided_by = by;
            out.decided_at_unix = at;
            out.reason = reason;
        }
        GrantState::Revoked {
            by,
            at,
            reason,
            expires_at,
            uses_granted,
            uses_left,
        } => {
            out.state = pb::RequestState::Revoked.into();
            out.decided_by = by;
            out.decided_at_unix = at;
            out.reason = reason;
            out.expires_at_unix = expires_at;
            out.uses_granted = uses_granted;
            out.uses_left = uses_left;
        }
    }
    out
}

pub(super) fn standing(sa: StandingRecord) -> pb::StandingApproval {
    let (grantee_identity, grantee_role) = match sa.grantee {
        Grantee::Identity(i) => (i, String::new()),
        Grantee::Role(r) => (String::new(), r),
    };
    pb::StandingApproval {
        approval_id: sa.id,
        owner: sa.owner,
        grantee_identity,
        grantee_role,
        access_purpose: sa.access_purpose,
        study_ids: sa.studies,
        created_at_unix: sa.created_at,
        expires_at_unix: sa.expires_at,
        has_budget: sa.budget_left.is_some(),
        budget_left: sa.budget_left.unwrap_or(0),
        grant_ttl_seconds: sa.grant_ttl_secs,
        grant_uses: sa.grant_uses,
        approvals_made: sa.approvals_made,
        revoked: sa.revoked_at.is_some(),
        revoked_at_unix: sa.revoked_at.unwrap_or(0),
    }
}

pub(super) fn audit_entry(e: AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        seq: e.seq,
        timestamp_unix_ms: e.timestamp_ms,
        actor: e.actor,
        event: e.event,
        study_id: e.study,
        detail: e.detail,
        prev_hash: e.prev_hash.to_vec(),
        hash: e.hash.to_vec(),
    }
}

/// Bytes an entry adds to a `ListAuditResponse` (tag, length, message).
pub(super) fn audit_entry_size(e: &AuditEntry) -> usize {
    let n = audit_entry(e.clone()).encoded_len();
    1 + prost::length_delimiter_len(n) + n
}

pub(super) fn redeemed(r: Redeemed) -> pb::RedeemGrantResponse {
    pb::RedeemGrantResponse {
        study_id: r.study_id,
        purpose: r.purpose,
        expires_at_unix: r.expires_at,
        uses_left: r.uses_left,
    }
}
