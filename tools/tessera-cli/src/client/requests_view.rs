//! Key requests as people and scripts read them: the state name, one
//! request as JSON, a list as a table (used by `requests`, `grants`,
//! `review` and `requests --watch`).

use serde_json::{Value, json};
use tessera_proto::keyserver::v1 as pb;

use super::{Table, now_secs, short_identity, utc};

/// Lower-case state name of a request.
pub fn state_name(state: i32) -> String {
    match pb::RequestState::try_from(state) {
        Ok(pb::RequestState::Unspecified) => "unspecified".into(),
        Ok(pb::RequestState::Pending) => "pending".into(),
        Ok(pb::RequestState::Approved) => "approved".into(),
        Ok(pb::RequestState::Denied) => "denied".into(),
        Ok(pb::RequestState::Revoked) => "revoked".into(),
        Err(_) => format!("unknown({state})"),
    }
}

/// A request as JSON (ids and identities in full, times as Unix seconds).
pub fn request_json(r: &pb::KeyRequest) -> Value {
    json!({
        "request_id": r.request_id,
        "study_id": r.study_id,
        "requester": r.requester,
        "presented_by": r.presented_by,
        "purpose": r.purpose,
        "justification": r.justification,
        "state": state_name(r.state),
        "created_at_unix": r.created_at_unix,
        "decided_by": r.decided_by,
        "decided_at_unix": r.decided_at_unix,
        "expires_at_unix": r.expires_at_unix,
        "uses_granted": r.uses_granted,
        "uses_left": r.uses_left,
        "reason": r.reason,
        "access_purpose": r.access_purpose,
        "standing_approval": r.standing_approval,
        "break_glass": r.break_glass,
        "break_glass_reason": r.break_glass_reason,
        "reviewed_by": r.reviewed_by,
    })
}

/// Requests as a human table.
pub fn requests_table(list: &[pb::KeyRequest]) -> Table {
    let now = now_secs();
    let mut t = Table::new([
        "REQUEST",
        "STUDY",
        "REQUESTER",
        "PURPOSE",
        "STATE",
        "USES",
        "EXPIRES",
        "CREATED",
        "NOTE",
    ]);
    for r in list {
        let mut state = state_name(r.state);
        let granted = r.uses_granted > 0;
        if r.state == pb::RequestState::Approved as i32 {
            if r.expires_at_unix <= now {
                state.push_str(" (expired)");
            } else if r.uses_left == 0 {
                state.push_str(" (used up)");
            }
        }
        let note = if r.reason.is_empty() {
            r.justification.clone()
        } else {
            format!("reason: {}", r.reason)
        };
        t.row([
            r.request_id.clone(),
            r.study_id.clone(),
            short_identity(&r.requester).to_owned(),
            r.purpose.clone(),
            state,
            if granted {
                format!("{}/{}", r.uses_left, r.uses_granted)
            } else {
                String::new()
            },
            utc(r.expires_at_unix),
            utc(r.created_at_unix),
            note,
        ]);
    }
    t
}
