//! ForgetStudy: crypto-shredding and the tombstone.

use super::*;

#[tokio::test]
async fn forget_study_shreds_key_material_and_leaves_a_tombstone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.redb");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_secs(1_000_000));
    let core = open_with(&path, [3; 32], clock.clone(), 3).unwrap();
    let a = core
        .register_study(GW, OWNER, &attrs("A"), None)
        .await
        .unwrap();
    let b = core
        .register_study(GW, OWNER, &attrs("B"), None)
        .await
        .unwrap();
    let kb = core
        .derive_key(GW, &b.id, &attrs("B"), "pixels", Operation::Protect)
        .await
        .unwrap();
    let pending = core
        .request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "")
        .await
        .unwrap();
    let approved = core
        .request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &approved.id, 60, 5).await.unwrap();
    let denied_req = core
        .request_key(CLIN2, &a.id, &attrs("A"), "pixels", "", "")
        .await
        .unwrap();
    core.deny(OWNER, &denied_req.id, "no").await.unwrap();
    let on_b = core
        .request_key(CLIN, &b.id, &attrs("B"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &on_b.id, 60, 5).await.unwrap();
    assert!(stored_request(&core, &approved.id).wrapped_key.is_some());

    // Only the gateway, and only for the owner; both refusals audited.
    assert!(matches!(
        core.forget_study(WM, &a.id, OWNER).await,
        Err(KeyServerError::PermissionDenied(_))
    ));
    assert!(matches!(
        core.forget_study(GW, &a.id, CLIN).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("owner")
    ));
    assert_eq!(
        events(&core)
            .iter()
            .filter(|e| *e == "forget.refused")
            .count(),
        2
    );
    assert!(matches!(
        core.forget_study(GW, "st-nope", OWNER).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.forget_study(GW, &a.id, "").await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.forget_study(GW, "st-00000000000000000000000000000000", OWNER)
            .await,
        Err(KeyServerError::NotFound(_))
    ));
    // Nothing changed so far.
    core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
        .await
        .unwrap();

    let rep = core.forget_study(GW, &a.id, OWNER).await.unwrap();
    assert_eq!(
        rep,
        ForgetReport {
            grants_revoked: 1,
            requests_denied: 1,
        }
    );

    let tomb = stored_study(&core, &a.id);
    assert_eq!(tomb.salt, [0u8; 32]);
    assert_eq!(tomb.commitment, [0u8; 32]);
    assert_eq!(
        tomb.forgotten,
        Some(Forgotten {
            at: 1_000_000,
            by: GW.into(),
            on_behalf_of: OWNER.into(),
        })
    );
    for id in [&pending.id, &approved.id, &denied_req.id] {
        assert!(stored_request(&core, id).wrapped_key.is_none(), "{id}");
    }
    assert!(matches!(
        stored_request(&core, &pending.id).state,
        GrantState::Denied { ref reason, .. } if reason == "study forgotten"
    ));
    assert!(matches!(
        stored_request(&core, &approved.id).state,
        GrantState::Revoked { uses_left: 5, ref by, .. } if by == GW
    ));
    // The other study is untouched.
    assert!(stored_request(&core, &on_b.id).wrapped_key.is_some());

    let gone = |r: Result<Derived>| matches!(r, Err(KeyServerError::NotFound(m)) if m.contains("was deleted"));
    assert!(gone(
        core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
            .await
    ));
    assert!(matches!(
        core.request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "").await,
        Err(KeyServerError::NotFound(m)) if m.contains("was deleted")
    ));
    assert!(matches!(
        core.register_study(GW, OWNER, &attrs("A"), Some(&a.id)).await,
        Err(KeyServerError::AlreadyExists(m)) if m.contains("deleted")
    ));
    assert!(matches!(
        core.fetch_key(CLIN, &approved.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("revoked")
    ));
    assert!(matches!(
        core.redeem_grant(GW, &approved.id, CLIN, &a.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("revoked")
    ));
    assert!(matches!(
        core.forget_study(GW, &a.id, OWNER).await,
        Err(KeyServerError::NotFound(m)) if m.contains("was deleted")
    ));
    // The owner still sees the history of its requests.
    assert_eq!(
        core.list_requests(OWNER, &a.id, true).await.unwrap().len(),
        3
    );
    assert!(
        core.list_requests(OWNER, &a.id, false)
            .await
            .unwrap()
            .is_empty()
    );

    // A copy cached before the forget committed cannot be used: the
    // write job re-checks and the stale copy is evicted.
    let mut stale = stored_study(&core, &b.id);
    stale.id = a.id.clone();
    // Make the stale copy pass the attribute check so the request reaches
    // the write job.
    let m = core.master(stale.master_version).unwrap();
    stale.commitment = m.commitment(
        &a.id,
        &stale.salt,
        &CanonicalAttributes::new(&attrs("A")).unwrap(),
    );
    core.cache_study(Arc::new(stale.clone()));
    assert!(gone(
        core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
            .await
    ));
    core.cache_study(Arc::new(stale));
    assert!(matches!(
        core.request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "").await,
        Err(KeyServerError::NotFound(m)) if m.contains("was deleted")
    ));
    assert!(
        core.study_any(&StudyId::parse(&a.id).unwrap())
            .unwrap()
            .is_forgotten(),
        "the stale copy was evicted"
    );

    let log = core.list_audit(1, 10_000).unwrap();
    let f: Vec<_> = log
        .iter()
        .filter(|e| e.event == "study.forgotten")
        .collect();
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].actor, GW);
    assert_eq!(f[0].study, a.id);
    assert!(f[0].detail.contains(&format!("on_behalf_of={OWNER}")));
    assert!(f[0].detail.contains("grants_revoked=1"));
    assert!(
        !log.iter()
            .any(|e| e.event == "key.derived" && e.study == a.id && e.seq > f[0].seq)
    );
    assert!(core.verify_audit().unwrap().ok);
    drop(core);

    // The tombstone survives a restart (empty cache).
    let core = open_with(&path, [3; 32], clock, 3).unwrap();
    assert!(gone(
        core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
            .await
    ));
    assert_eq!(
        core.derive_key(GW, &b.id, &attrs("B"), "pixels", Operation::Restore)
            .await
            .unwrap(),
        kb
    );
    assert!(core.verify_audit().unwrap().ok);
}
