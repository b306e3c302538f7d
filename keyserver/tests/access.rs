//! Access that fits clinical work (issue 19) over mutual TLS: the purpose
//! vocabulary, standing approvals and each way one does not apply,
//! break-glass and its review, the grants listing, the live feed.

use tessera_proto::keyserver::v1 as pb;
use tonic::Code;

use crate::common::*;

const CLIN2: &str = "spiffe://tessera.local/user/clinician2";

fn ask(study: &str, patient: &str, purpose: &str) -> pb::RequestKeyRequest {
    pb::RequestKeyRequest {
        access_purpose: purpose.into(),
        ..request(study, patient)
    }
}

async fn file(env: &Env, who: &str, study: &str, purpose: &str) -> pb::KeyRequest {
    env.client(who)
        .await
        .request_key(ask(study, "P-1", purpose))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap()
}

fn standing_to(identity: &str, role: &str, purpose: &str) -> pb::CreateStandingApprovalRequest {
    pb::CreateStandingApprovalRequest {
        grantee_identity: identity.into(),
        grantee_role: role.into(),
        access_purpose: purpose.into(),
        ttl_seconds: 3600,
        grant_ttl_seconds: 300,
        grant_uses: 2,
        ..Default::default()
    }
}

async fn create(env: &Env, r: pb::CreateStandingApprovalRequest) -> pb::StandingApproval {
    env.client("owner")
        .await
        .create_standing_approval(r)
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap()
}

/// The `key.requested` entry of a request.
async fn requested_entry(env: &Env, request_id: &str) -> pb::AuditEntry {
    all_audit(env)
        .await
        .into_iter()
        .find(|e| e.event == "key.requested" && e.detail.contains(request_id))
        .unwrap()
}

fn fetch(id: &str) -> pb::FetchKeyRequest {
    pb::FetchKeyRequest {
        request_id: id.into(),
    }
}

async fn purposes_are_a_closed_vocabulary(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let mut clin = env.client("clinician").await;
    // Empty: the default purpose, carried by the request and its entry.
    let r = file(&env, "clinician", &study, "").await;
    assert_eq!(r.access_purpose, "treatment");
    assert!(
        requested_entry(&env, &r.request_id)
            .await
            .detail
            .contains("access_purpose=treatment")
    );
    let r = file(&env, "clinician", &study, "research").await;
    assert_eq!(r.access_purpose, "research");
    // Anything else is refused and audited.
    refused_and_audited(
        &env,
        "user/clinician",
        "RequestKey",
        "request.refused",
        Code::InvalidArgument,
        clin.request_key(ask(&study, "P-1", "curiosity")),
    )
    .await;
    refused_and_audited(
        &env,
        "user/owner",
        "CreateStandingApproval",
        "standing.refused",
        Code::InvalidArgument,
        env.client("owner")
            .await
            .create_standing_approval(standing_to(CLIN, "", "marketing")),
    )
    .await;
    env.stop().await;
}

async fn a_standing_approval_approves_and_its_revocation_stops_releases_at_once(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let sa = create(&env, standing_to(CLIN, "", "treatment")).await;
    assert!(sa.approval_id.starts_with("sa-") && !sa.has_budget);
    let r = file(&env, "clinician", &study, "treatment").await;
    assert_eq!(r.state, pb::RequestState::Approved as i32);
    assert_eq!(r.standing_approval, sa.approval_id);
    assert_eq!(r.uses_left, 2);
    let approved = all_audit(&env)
        .await
        .into_iter()
        .find(|e| e.event == "grant.approved" && e.detail.contains(&r.request_id))
        .unwrap();
    assert_eq!(approved.actor, "keyserver");
    assert!(
        approved
            .detail
            .contains(&format!("standing={}", sa.approval_id)),
        "{}",
        approved.detail
    );
    let mut clin = env.client("clinician").await;
    let key = clin
        .fetch_key(fetch(&r.request_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(key.uses_left, 1);

    // The owner sees it, changes it, revokes it.
    let mut owner = env.client("owner").await;
    let listed = owner
        .list_standing_approvals(pb::ListStandingApprovalsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].approvals_made, 1);
    let changed = owner
        .update_standing_approval(pb::UpdateStandingApprovalRequest {
            approval_id: sa.approval_id.clone(),
            budget: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert!(changed.has_budget && changed.budget_left == 5);
    // Only its owner changes it (clinician2 holds the owner role).
    refused_and_audited(
        &env,
        "user/clinician2",
        "RevokeStandingApproval",
        "standing.refused",
        Code::PermissionDenied,
        env.client("clinician2").await.revoke_standing_approval(
            pb::RevokeStandingApprovalRequest {
                approval_id: sa.approval_id.clone(),
            },
        ),
    )
    .await;
    owner
        .revoke_standing_approval(pb::RevokeStandingApprovalRequest {
            approval_id: sa.approval_id.clone(),
        })
        .await
        .unwrap();
    // The grant it approved releases nothing more, and the refusal is audited.
    let e = clin.fetch_key(fetch(&r.request_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("revoked"), "{e:?}");
    let last = all_audit(&env).await.pop().unwrap();
    assert_eq!(last.event, "fetch.refused");
    // A new request waits for the owner.
    let r2 = file(&env, "clinician", &study, "treatment").await;
    assert_eq!(r2.state, pb::RequestState::Pending as i32);
    assert!(
        requested_entry(&env, &r2.request_id)
            .await
            .detail
            .contains(&format!("standing_misses={}:revoked", sa.approval_id))
    );
    // Revoked once.
    let e = owner
        .revoke_standing_approval(pb::RevokeStandingApprovalRequest {
            approval_id: sa.approval_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let all = owner
        .list_standing_approvals(pb::ListStandingApprovalsRequest {
            include_inactive: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .approvals;
    assert!(all.len() == 1 && all[0].revoked);
    env.stop().await;
}

/// Files a request by `who` for `purpose` and expects it pending, its entry
/// naming why `sa` did not apply.
async fn stays_pending(env: &Env, who: &str, study: &str, purpose: &str, sa: &str, why: &str) {
    let r = file(env, who, study, purpose).await;
    assert_eq!(r.state, pb::RequestState::Pending as i32, "{why}");
    let detail = requested_entry(env, &r.request_id).await.detail;
    assert!(detail.contains(&format!("{sa}:{why}")), "{why}: {detail}");
}

async fn each_way_a_standing_approval_does_not_apply(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    // Wrong purpose.
    let sa = create(&env, standing_to(CLIN, "", "research")).await;
    stays_pending(
        &env,
        "clinician",
        &study,
        "treatment",
        &sa.approval_id,
        "wrong_purpose",
    )
    .await;
    // Identity not in it.
    stays_pending(
        &env,
        "clinician2",
        &study,
        "research",
        &sa.approval_id,
        "identity_not_in_the_approval",
    )
    .await;
    // Role (group) not held: clinician is in care-team-x, clinician2 is not.
    let team = create(&env, standing_to("", "care-team-x", "audit")).await;
    stays_pending(
        &env,
        "clinician2",
        &study,
        "audit",
        &team.approval_id,
        "role_not_in_the_approval",
    )
    .await;
    let r = file(&env, "clinician", &study, "audit").await;
    assert_eq!(r.standing_approval, team.approval_id);
    // Budget spent.
    let mut one = standing_to(CLIN2, "", "treatment");
    one.budget = 1;
    let one = create(&env, one).await;
    let r = file(&env, "clinician2", &study, "treatment").await;
    assert_eq!(r.standing_approval, one.approval_id);
    stays_pending(
        &env,
        "clinician2",
        &study,
        "treatment",
        &one.approval_id,
        "budget_spent",
    )
    .await;
    // Expired.
    env.clock.advance_secs(3600);
    stays_pending(
        &env,
        "clinician",
        &study,
        "audit",
        &team.approval_id,
        "expired",
    )
    .await;
    // A study outside its set.
    let other = register(&env, "P-2").await;
    let mut set = standing_to(CLIN, "", "treatment");
    set.study_ids = vec![other.clone()];
    let set = create(&env, set).await;
    stays_pending(
        &env,
        "clinician",
        &study,
        "treatment",
        &set.approval_id,
        "study_not_in_the_approval",
    )
    .await;
    env.stop().await;
}

async fn self_approval_stays_impossible(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let mut owner = env.client("owner").await;
    // Naming oneself is refused and audited.
    refused_and_audited(
        &env,
        "user/owner",
        "CreateStandingApproval",
        "standing.refused",
        Code::PermissionDenied,
        owner.create_standing_approval(standing_to(OWNER, "", "treatment")),
    )
    .await;
    // A role the owner holds approves others, never the owner's own request.
    let sa = create(&env, standing_to("", "owner", "treatment")).await;
    stays_pending(
        &env,
        "owner",
        &study,
        "treatment",
        &sa.approval_id,
        "the_owner's_own_request",
    )
    .await;
    // No approval covers another owner's studies: clinician2 (an owner
    // too) cannot name a study of `owner`.
    let mut theirs = standing_to(CLIN, "", "treatment");
    theirs.study_ids = vec![study.clone()];
    refused_and_audited(
        &env,
        "user/clinician2",
        "CreateStandingApproval",
        "standing.refused",
        Code::PermissionDenied,
        env.client("clinician2")
            .await
            .create_standing_approval(theirs),
    )
    .await;
    // An approval by clinician2 on all "its" studies approves nothing of owner's.
    let mut c2 = env.client("clinician2").await;
    let all_mine = c2
        .create_standing_approval(standing_to(CLIN, "", "research"))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    let r = file(&env, "clinician", &study, "research").await;
    assert_eq!(r.state, pb::RequestState::Pending as i32);
    assert!(r.standing_approval.is_empty() && !all_mine.approval_id.is_empty());
    env.stop().await;
}

fn glass(study: &str, reason: &str) -> pb::BreakGlassRequest {
    pb::BreakGlassRequest {
        study_id: study.into(),
        attributes: attrs("P-1"),
        purpose: "pixels".into(),
        reason: reason.into(),
        on_behalf_of: String::new(),
    }
}

async fn break_glass_opens_at_once_loudly_and_is_reviewed(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let mut clin = env.client("clinician").await;
    let mut owner = env.client("owner").await;
    // Without the emergency permission, without a reason: refused, audited.
    refused_and_audited(
        &env,
        "user/clinician2",
        "BreakGlass",
        "breakglass.refused",
        Code::PermissionDenied,
        env.client("clinician2")
            .await
            .break_glass(glass(&study, "cardiac arrest")),
    )
    .await;
    refused_and_audited(
        &env,
        "user/clinician",
        "BreakGlass",
        "breakglass.refused",
        Code::InvalidArgument,
        clin.break_glass(glass(&study, "  ")),
    )
    .await;
    refused_and_audited(
        &env,
        "user/clinician",
        "BreakGlass",
        "breakglass.refused",
        Code::InvalidArgument,
        clin.break_glass(glass(&study, &"x".repeat(501))),
    )
    .await;
    // Disabled by the owner: refused; enabled again: open.
    owner
        .set_break_glass(pb::SetBreakGlassRequest { disabled: true })
        .await
        .unwrap();
    refused_and_audited(
        &env,
        "user/clinician",
        "BreakGlass",
        "breakglass.refused",
        Code::PermissionDenied,
        clin.break_glass(glass(&study, "cardiac arrest")),
    )
    .await;
    owner
        .set_break_glass(pb::SetBreakGlassRequest { disabled: false })
        .await
        .unwrap();
    let r = clin
        .break_glass(glass(&study, "cardiac arrest, owner unreachable"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.state, pb::RequestState::Approved as i32);
    assert!(r.break_glass);
    assert_eq!(r.access_purpose, "emergency");
    assert_eq!(
        r.expires_at_unix - r.decided_at_unix,
        600,
        "10 configured minutes"
    );
    assert_eq!(r.uses_granted, 2);
    clin.fetch_key(fetch(&r.request_id)).await.unwrap();
    // Flagged in every entry about it.
    let about: Vec<_> = all_audit(&env)
        .await
        .into_iter()
        .filter(|e| e.detail.contains(&format!("request={}", r.request_id)))
        .collect();
    let events: Vec<&str> = about.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["key.requested", "grant.approved", "key.released"]);
    assert!(about.iter().all(|e| e.detail.contains("break_glass=1")));
    // Short: gone after its minutes.
    env.clock.advance_secs(600);
    assert_eq!(
        clin.fetch_key(fetch(&r.request_id))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // The review list: the owner's, the admin's (researcher); a clinician
    // may not mark.
    let list = owner
        .list_break_glass(pb::ListBreakGlassRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(list.len(), 1);
    assert_eq!(
        list[0].break_glass_reason,
        "cardiac arrest, owner unreachable"
    );
    let mut admin = env.client("researcher").await;
    assert_eq!(
        admin
            .list_break_glass(pb::ListBreakGlassRequest::default())
            .await
            .unwrap()
            .into_inner()
            .requests
            .len(),
        1
    );
    let e = clin
        .mark_reviewed(pb::MarkReviewedRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let done = admin
        .mark_reviewed(pb::MarkReviewedRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(done.reviewed_by, "spiffe://tessera.local/user/researcher");
    let e = owner
        .mark_reviewed(pb::MarkReviewedRequest {
            request_id: r.request_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        owner
            .list_break_glass(pb::ListBreakGlassRequest::default())
            .await
            .unwrap()
            .into_inner()
            .requests
            .is_empty()
    );
    assert_eq!(
        owner
            .list_break_glass(pb::ListBreakGlassRequest {
                include_reviewed: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .requests
            .len(),
        1
    );
    assert!(
        all_audit(&env)
            .await
            .iter()
            .any(|e| e.event == "breakglass.reviewed")
    );
    env.stop().await;
}

async fn grants_show_expiry_uses_and_purpose_paged(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let mut owner = env.client("owner").await;
    let mut ids = Vec::new();
    for (ttl, purpose) in [(300, "treatment"), (3600, "research"), (60, "audit")] {
        let r = file(&env, "clinician", &study, purpose).await;
        owner
            .approve_request(pb::ApproveRequestRequest {
                request_id: r.request_id.clone(),
                ttl_seconds: ttl,
                uses: 3,
            })
            .await
            .unwrap();
        ids.push(r.request_id);
        env.clock.advance_secs(1);
    }
    // A pending one is not a grant.
    file(&env, "clinician", &study, "treatment").await;
    let mut clin = env.client("clinician").await;
    let mine = clin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.grants.len(), 3);
    let g = &mine.grants[0];
    let req = g.request.as_ref().unwrap();
    assert_eq!(req.request_id, ids[0]);
    assert_eq!(
        (req.uses_left, req.access_purpose.as_str()),
        (3, "treatment")
    );
    assert!(g.valid && g.expiring_soon && g.seconds_left == 297);
    assert!(mine.grants[1].valid && !mine.grants[1].expiring_soon);
    // Paged.
    let p1 = clin
        .list_grants(pb::ListGrantsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p1.grants.len(), 2);
    let p2 = clin
        .list_grants(pb::ListGrantsRequest {
            page_size: 2,
            page_token: p1.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.grants.len(), 1);
    assert!(p2.next_page_token.is_empty());
    assert_eq!(p2.grants[0].request.as_ref().unwrap().request_id, ids[2]);
    // Expired: gone unless asked for; the owner's view is the same grants.
    env.clock.advance_secs(100);
    let live = clin
        .list_grants(pb::ListGrantsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(live.len(), 2);
    let on_mine = owner
        .list_grants(pb::ListGrantsRequest {
            as_owner: true,
            include_spent: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(on_mine.len(), 3);
    assert!(!on_mine[2].valid && on_mine[2].seconds_left == 0);
    // Another user sees none of them.
    assert!(
        env.client("clinician2")
            .await
            .list_grants(pb::ListGrantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .grants
            .is_empty()
    );
    env.stop().await;
}

async fn owners_and_requesters_watch_requests_live(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let mut owner = env.client("owner").await;
    let mut feed = watch(&env, "owner", true).await;
    let mut mine = watch(&env, "clinician", false).await;
    let r = file(&env, "clinician", &study, "treatment").await;
    let within = std::time::Duration::from_secs(10);
    let ev = tokio::time::timeout(within, feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, "requested");
    assert_eq!(ev.request.unwrap().request_id, r.request_id);
    owner
        .approve_request(pb::ApproveRequestRequest {
            request_id: r.request_id.clone(),
            ttl_seconds: 60,
            uses: 1,
        })
        .await
        .unwrap();
    // The requester hears the decision (and not its own filing).
    let ev = tokio::time::timeout(within, mine.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, "approved");
    assert_eq!(ev.request.unwrap().request_id, r.request_id);
    // Break-glass is told to the owner.
    env.client("clinician")
        .await
        .break_glass(glass(&study, "stroke"))
        .await
        .unwrap();
    let ev = tokio::time::timeout(within, feed.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, "break_glass");
    // A storage node may not watch.
    let e = env
        .client("storage-1")
        .await
        .watch_requests(pb::WatchRequestsRequest { as_owner: true })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    env.stop().await;
}

crate::on_both_backends!(
    purposes_are_a_closed_vocabulary,
    a_standing_approval_approves_and_its_revocation_stops_releases_at_once,
    each_way_a_standing_approval_does_not_apply,
    self_approval_stays_impossible,
    break_glass_opens_at_once_loudly_and_is_reviewed,
    grants_show_expiry_uses_and_purpose_paged,
    owners_and_requesters_watch_requests_live,
);
