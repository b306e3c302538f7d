//! The rules of access that fits clinical work (issue 19), pure like the
//! rest of [`super`]: the purpose vocabulary, standing approvals (when one
//! approves a request by itself) and break-glass (who may open a study at
//! once, and when the owner has forbidden it).

use crate::core::store::{Grantee, StandingRecord};

/// The purposes every keyserver knows unless its config says otherwise.
pub const DEFAULT_PURPOSES: [&str; 4] = ["treatment", "research", "audit", "emergency"];

/// The access purpose of a break-glass grant.
pub const EMERGENCY: &str = "emergency";

/// Longest break-glass reason, characters.
pub const REASON_MAX: usize = 500;

/// The access part of the rules (keyserver config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRules {
    /// The closed vocabulary of access purposes.
    pub purposes: Vec<String>,
    /// The purpose of a request that names none.
    pub default_purpose: String,
    /// Identities with the `emergency` permission (may break the glass).
    pub emergency: Vec<String>,
}

impl Default for AccessRules {
    fn default() -> Self {
        Self {
            purposes: DEFAULT_PURPOSES.map(str::to_owned).to_vec(),
            default_purpose: DEFAULT_PURPOSES[0].to_owned(),
            emergency: Vec::new(),
        }
    }
}

impl AccessRules {
    /// The purpose a request means: `purpose`, or the default when empty.
    pub fn resolve<'a>(&'a self, purpose: &'a str) -> &'a str {
        if purpose.is_empty() {
            &self.default_purpose
        } else {
            purpose
        }
    }

    /// True when `purpose` is in the vocabulary.
    pub fn known(&self, purpose: &str) -> bool {
        self.purposes.iter().any(|p| p == purpose)
    }

    /// True when `identity` holds the `emergency` permission.
    pub fn may_break_glass(&self, identity: &str) -> bool {
        self.emergency.iter().any(|e| e == identity)
    }
}

/// What a key request offers a standing approval to match.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// Who will use the grant.
    pub requester: &'a str,
    /// The requester's roles and groups.
    pub roles: &'a [String],
    /// The study asked for.
    pub study: &'a str,
    /// Its owner.
    pub study_owner: &'a str,
    /// The request's access purpose.
    pub purpose: &'a str,
    /// Unix seconds now.
    pub now: u64,
}

/// Why a standing approval does not approve a request (`Ok`: it does).
/// Checked in this order; each reason is a refusal the tests name.
pub fn standing_applies(sa: &StandingRecord, f: &RequestFacts<'_>) -> Result<(), &'static str> {
    if sa.owner != f.study_owner {
        return Err("another owner's approval");
    }
    // Self-approval stays impossible: an owner's standing approval never
    // approves a request its owner made.
    if f.requester == sa.owner {
        return Err("the owner's own request");
    }
    if sa.revoked_at.is_some() {
        return Err("revoked");
    }
    if f.now >= sa.expires_at {
        return Err("expired");
    }
    if sa.access_purpose != f.purpose {
        return Err("wrong purpose");
    }
    if !sa.studies.is_empty() && !sa.studies.iter().any(|s| s == f.study) {
        return Err("study not in the approval");
    }
    match &sa.grantee {
        Grantee::Identity(id) if id != f.requester => return Err("identity not in the approval"),
        Grantee::Role(r) if !f.roles.iter().any(|x| x == r) => {
            return Err("role not in the approval");
        }
        Grantee::Identity(_) | Grantee::Role(_) => {}
    }
    if sa.budget_left == Some(0) {
        return Err("budget spent");
    }
    Ok(())
}

/// The first of `approvals` that approves the request, else the reasons
/// each one gave (`id:reason`, for the audit entry).
pub fn first_standing<'a>(
    approvals: &'a [StandingRecord],
    f: &RequestFacts<'_>,
) -> Result<&'a StandingRecord, Vec<String>> {
    let mut misses = Vec::new();
    for sa in approvals {
        match standing_applies(sa, f) {
            Ok(()) => return Ok(sa),
            Err(why) => misses.push(format!("{}:{}", sa.id, why.replace(' ', "_"))),
        }
    }
    Err(misses)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "spiffe://tessera.local/user/owner";
    const CLIN: &str = "spiffe://tessera.local/user/clinician";
    const CLIN2: &str = "spiffe://tessera.local/user/clinician2";

    fn sa(grantee: Grantee) -> StandingRecord {
        StandingRecord {
            id: "sa-1".into(),
            owner: OWNER.into(),
            grantee,
            access_purpose: "treatment".into(),
            studies: vec![],
            created_at: 10,
            expires_at: 100,
            budget_left: None,
            grant_ttl_secs: 60,
            grant_uses: 1,
            approvals_made: 0,
            revoked_at: None,
        }
    }

    fn facts<'a>(requester: &'a str, roles: &'a [String]) -> RequestFacts<'a> {
        RequestFacts {
            requester,
            roles,
            study: "st-a",
            study_owner: OWNER,
            purpose: "treatment",
            now: 50,
        }
    }

    #[test]
    fn an_identity_approval_matches_its_identity_only() {
        let a = sa(Grantee::Identity(CLIN.into()));
        assert_eq!(standing_applies(&a, &facts(CLIN, &[])), Ok(()));
        assert_eq!(
            standing_applies(&a, &facts(CLIN2, &[])),
            Err("identity not in the approval")
        );
    }

    #[test]
    fn a_role_approval_matches_holders_of_the_role_only() {
        let a = sa(Grantee::Role("care-team-x".into()));
        let member = ["clinician".to_owned(), "care-team-x".to_owned()];
        let other = ["clinician".to_owned()];
        assert_eq!(standing_applies(&a, &facts(CLIN, &member)), Ok(()));
        assert_eq!(
            standing_applies(&a, &facts(CLIN2, &other)),
            Err("role not in the approval")
        );
    }

    #[test]
    fn each_refusal_has_its_reason() {
        let roles = ["clinician".to_owned()];
        let f = facts(CLIN, &roles);
        let mut a = sa(Grantee::Role("clinician".into()));
        a.expires_at = 50;
        assert_eq!(standing_applies(&a, &f), Err("expired"));
        let mut a = sa(Grantee::Role("clinician".into()));
        a.access_purpose = "research".into();
        assert_eq!(standing_applies(&a, &f), Err("wrong purpose"));
        let mut a = sa(Grantee::Role("clinician".into()));
        a.budget_left = Some(0);
        assert_eq!(standing_applies(&a, &f), Err("budget spent"));
        a.budget_left = Some(1);
        assert_eq!(standing_applies(&a, &f), Ok(()));
        let mut a = sa(Grantee::Role("clinician".into()));
        a.revoked_at = Some(20);
        assert_eq!(standing_applies(&a, &f), Err("revoked"));
        let mut a = sa(Grantee::Role("clinician".into()));
        a.studies = vec!["st-b".into()];
        assert_eq!(standing_applies(&a, &f), Err("study not in the approval"));
        a.studies.push("st-a".into());
        assert_eq!(standing_applies(&a, &f), Ok(()));
    }

    #[test]
    fn no_approval_approves_its_owner_or_another_owners_study() {
        // The owner holds the role it named: still never auto-approved.
        let a = sa(Grantee::Role("clinician".into()));
        let roles = ["clinician".to_owned()];
        assert_eq!(
            standing_applies(&a, &facts(OWNER, &roles)),
            Err("the owner's own request")
        );
        let mut f = facts(CLIN, &roles);
        f.study_owner = CLIN2;
        assert_eq!(standing_applies(&a, &f), Err("another owner's approval"));
    }

    #[test]
    fn the_first_matching_approval_wins_and_misses_are_named() {
        let mut a = sa(Grantee::Identity(CLIN2.into()));
        a.id = "sa-a".into();
        let mut b = sa(Grantee::Identity(CLIN.into()));
        b.id = "sa-b".into();
        let list = [a, b];
        assert_eq!(first_standing(&list, &facts(CLIN, &[])).unwrap().id, "sa-b");
        assert_eq!(
            first_standing(&list[..1], &facts(CLIN, &[])).unwrap_err(),
            vec!["sa-a:identity_not_in_the_approval".to_owned()]
        );
    }

    #[test]
    fn the_vocabulary_is_closed_and_has_a_default() {
        let r = AccessRules::default();
        assert_eq!(r.resolve(""), "treatment");
        assert_eq!(r.resolve("research"), "research");
        assert!(r.known("audit") && r.known("emergency"));
        assert!(!r.known("curiosity") && !r.known(""));
        assert!(!r.may_break_glass(CLIN));
    }
}
