//! The gateway's RedeemGrant and CheckGrant.

use super::*;

#[tokio::test]
async fn gateway_redeems_and_checks_grants() {
    let (_dir, clock, core) = setup();
    let study = core
        .register_study(GW, OWNER, &attrs("P1"), None)
        .await
        .unwrap();
    let other = core
        .register_study(GW, OWNER, &attrs("P2"), None)
        .await
        .unwrap();
    let req = core
        .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    let (rid, sid) = (req.id.as_str(), study.id.as_str());

    // Pending: neither check nor redeem.
    assert!(matches!(
        core.check_grant(GW, rid, CLIN, sid).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("pending")
    ));
    assert!(matches!(
        core.redeem_grant(GW, rid, CLIN, sid).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("pending")
    ));
    core.approve(OWNER, rid, 60, 3).await.unwrap();

    // Only the gateway; the refusal is audited with the parsed ids only.
    for who in [WM, CLIN, OWNER] {
        assert!(matches!(
            core.redeem_grant(who, rid, CLIN, sid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("only the gateway")
        ));
        assert!(matches!(
            core.check_grant(who, rid, CLIN, sid).await,
            Err(KeyServerError::PermissionDenied(_))
        ));
    }
    let refused = core
        .list_audit(1, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event == "redeem.refused")
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 7, "3 redeem + 3 check + 1 pending redeem");
    assert!(
        refused
            .iter()
            .any(|e| e.actor == WM && e.study == study.id && e.detail.contains("op=check grants"))
    );

    // Checking spends nothing and writes nothing.
    let before = audit_len(&core);
    let c = core.check_grant(GW, rid, CLIN, sid).await.unwrap();
    assert_eq!(
        c,
        Redeemed {
            study_id: study.id.clone(),
            purpose: "pixels".into(),
            expires_at: 1_000_060,
            uses_left: 3,
        }
    );
    assert_eq!(audit_len(&core), before);

    let r = core.redeem_grant(GW, rid, CLIN, sid).await.unwrap();
    assert_eq!(r.uses_left, 2);
    assert_eq!(
        core.check_grant(GW, rid, CLIN, sid)
            .await
            .unwrap()
            .uses_left,
        2
    );

    // Wrong user, wrong study, malformed input, unknown request.
    assert!(matches!(
        core.redeem_grant(GW, rid, CLIN2, sid).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("another user")
    ));
    assert!(matches!(
        core.redeem_grant(GW, rid, CLIN, &other.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("another study")
    ));
    assert!(matches!(
        core.check_grant(GW, rid, CLIN, &other.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("another study")
    ));
    assert!(matches!(
        core.redeem_grant(GW, rid, CLIN, "st-x").await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.redeem_grant(GW, "rq-1", CLIN, sid).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.redeem_grant(GW, rid, "clinician", sid).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.redeem_grant(GW, rid, GW, sid).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.redeem_grant(GW, "rq-00000000000000000000000000000000", CLIN, sid)
            .await,
        Err(KeyServerError::NotFound(_))
    ));
    assert!(matches!(
        core.check_grant(GW, "rq-00000000000000000000000000000000", CLIN, sid)
            .await,
        Err(KeyServerError::NotFound(_))
    ));

    // Redemptions and fetches share the uses.
    assert_eq!(core.fetch_key(CLIN, rid).await.unwrap().uses_left, 1);
    assert_eq!(
        core.redeem_grant(GW, rid, CLIN, sid)
            .await
            .unwrap()
            .uses_left,
        0
    );
    for r in [
        core.redeem_grant(GW, rid, CLIN, sid).await,
        core.check_grant(GW, rid, CLIN, sid).await,
    ] {
        assert!(matches!(r, Err(KeyServerError::PermissionDenied(m)) if m.contains("used up")));
    }
    assert!(matches!(
        core.fetch_key(CLIN, rid).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("used up")
    ));

    // Expiry on the injected clock, for check and redeem alike.
    let r2 = core
        .request_key(CLIN, sid, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &r2.id, 10, 5).await.unwrap();
    core.check_grant(GW, &r2.id, CLIN, sid).await.unwrap();
    clock.advance_secs(10);
    assert!(matches!(
        core.check_grant(GW, &r2.id, CLIN, sid).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("expired")
    ));
    assert!(matches!(
        core.redeem_grant(GW, &r2.id, CLIN, sid).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("expired")
    ));

    let log = core.list_audit(1, 10_000).unwrap();
    let redeemed: Vec<_> = log.iter().filter(|e| e.event == "grant.redeemed").collect();
    assert_eq!(redeemed.len(), 2);
    assert!(redeemed.iter().all(|e| e.actor == GW
        && e.detail.contains(&format!("request={rid}"))
        && e.detail.contains(&format!("requester={CLIN}"))));
    assert!(log.iter().any(|e| e.event == "redeem.refused"
        && e.detail.contains("asked_study=")
        && e.detail.contains("another study")));
    let rep = core.verify_audit().unwrap();
    assert!(rep.ok, "{rep:?}");
}
