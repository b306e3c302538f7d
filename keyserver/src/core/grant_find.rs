//! FindGrants (gateway only): the usable grants a user holds, for the
//! gateway's DICOM query/retrieve SCP, whose clients cannot name a request.
//! A read: nothing is spent (the gateway still redeems, audited, before it
//! serves anything) and nothing is recorded unless the caller is refused.

use crate::core::Core;
use crate::core::access::load_standing;
use crate::core::ids::StudyId;
use crate::core::policy::Rpc;
use crate::core::store::{GrantState, REQUESTS, RequestRecord};
use crate::error::{KeyServerError, Result};

/// One usable grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundGrant {
    pub request_id: String,
    pub study_id: String,
    pub purpose: String,
    pub expires_at: u64,
    pub uses_left: u32,
}

/// Whether `rec` is a grant `user` may use now (on `study`, if given).
fn usable(rec: &RequestRecord, user: &str, study: Option<&str>, now: u64) -> Option<FoundGrant> {
    let GrantState::Approved {
        expires_at,
        uses_left,
        ..
    } = rec.state
    else {
        return None;
    };
    (rec.requester == user
        && study.is_none_or(|s| s == rec.study_id)
        && expires_at > now
        && uses_left > 0)
        .then(|| FoundGrant {
            request_id: rec.id.clone(),
            study_id: rec.study_id.clone(),
            purpose: rec.purpose.clone(),
            expires_at,
            uses_left,
        })
}

impl Core {
    /// Gateway only (refused, and audited, for anyone else, like
    /// CheckGrant): the grants `on_behalf_of` may use now, optionally on
    /// `study_id` only, soonest expiry first.
    pub async fn find_grants(
        &self,
        actor: &str,
        on_behalf_of: &str,
        study_id: &str,
    ) -> Result<Vec<FoundGrant>> {
        self.gateway_only(actor, Rpc::CheckGrant, study_id, None)
            .await?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let study = if study_id.is_empty() {
            None
        } else {
            Some(StudyId::parse(study_id)?.as_str().to_owned())
        };
        let now = self.inner.clock.now_ms() / 1000;
        let r = self.inner.store.read()?;
        let r = r.as_ref();
        let mut out = Vec::new();
        r.scan_all(REQUESTS, &mut |k, v| {
            let rec: RequestRecord = serde_json::from_slice(v)
                .map_err(|e| KeyServerError::Corrupt(format!("{}: {e}", k.text())))?;
            // A grant made by a standing approval the owner has revoked (or
            // that is gone) is not usable: RedeemGrant would refuse it, and
            // the study must not stay visible to C-FIND either.
            if let Some(sa) = &rec.standing
                && load_standing(r, sa)?.is_none_or(|s| s.revoked_at.is_some())
            {
                return Ok(true);
            }
            if let Some(g) = usable(&rec, on_behalf_of, study.as_deref(), now) {
                out.push(g);
            }
            Ok(true)
        })?;
        out.sort_by(|a, b| (a.expires_at, &a.request_id).cmp(&(b.expires_at, &b.request_id)));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(requester: &str, study: &str, state: GrantState) -> RequestRecord {
        RequestRecord {
            id: "rq-1".into(),
            study_id: study.into(),
            requester: requester.into(),
            presented_by: requester.into(),
            purpose: "pixels".into(),
            justification: String::new(),
            created_at: 1,
            master_version: 1,
            state,
            wrapped_key: None,
            access_purpose: "treatment".into(),
            standing: None,
            break_glass: None,
        }
    }

    fn approved(expires_at: u64, uses_left: u32) -> GrantState {
        GrantState::Approved {
            by: "spiffe://tessera.local/user/owner".into(),
            at: 1,
            expires_at,
            uses_granted: 3,
            uses_left,
        }
    }

    #[test]
    fn only_usable_grants_of_the_user_are_found() {
        let u = "spiffe://tessera.local/user/clinician";
        let g = usable(&rec(u, "st-a", approved(100, 1)), u, None, 50).unwrap();
        assert_eq!((g.study_id.as_str(), g.uses_left), ("st-a", 1));
        assert!(usable(&rec(u, "st-a", approved(100, 1)), u, Some("st-a"), 50).is_some());
        assert!(usable(&rec(u, "st-a", approved(100, 1)), u, Some("st-b"), 50).is_none());
        assert!(usable(&rec(u, "st-a", approved(100, 0)), u, None, 50).is_none());
        assert!(usable(&rec(u, "st-a", approved(100, 1)), u, None, 100).is_none());
        assert!(
            usable(
                &rec("spiffe://tessera.local/user/x", "st-a", approved(100, 1)),
                u,
                None,
                50
            )
            .is_none()
        );
        assert!(usable(&rec(u, "st-a", GrantState::Pending), u, None, 50).is_none());
    }
}
