//! Request, approve, deny, revoke, fetch; derivation and rotation.

use super::*;

#[tokio::test]
async fn full_key_flow() {
    let (_dir, _clock, core) = setup();
    assert!(matches!(
        core.register_study(CLIN, OWNER, &attrs("P1"), None).await,
        Err(KeyServerError::PermissionDenied(_))
    ));
    let study = core
        .register_study(GW, OWNER, &attrs("P1"), None)
        .await
        .unwrap();
    assert_eq!(study.master_version, 1);
    let derived = core
        .derive_key(GW, &study.id, &attrs("P1"), "pixels", Operation::Protect)
        .await
        .unwrap();
    let again = core
        .derive_key(WM, &study.id, &attrs("P1"), "pixels", Operation::Restore)
        .await
        .unwrap();
    assert_eq!(derived, again);
    assert!(matches!(
        core.derive_key(GW, &study.id, &attrs("P2"), "pixels", Operation::Protect)
            .await,
        Err(KeyServerError::AttributeMismatch)
    ));
    assert!(matches!(
        core.derive_key(
            STORAGE,
            &study.id,
            &attrs("P1"),
            "pixels",
            Operation::Protect
        )
        .await,
        Err(KeyServerError::PermissionDenied(_))
    ));

    assert!(matches!(
        core.request_key(CLIN, &study.id, &attrs("P9"), "pixels", "", "")
            .await,
        Err(KeyServerError::AttributeMismatch)
    ));
    let req = core
        .request_key(
            CLIN,
            &study.id,
            &attrs("P1"),
            "pixels",
            "second opinion",
            "",
        )
        .await
        .unwrap();
    assert_eq!(req.state, GrantState::Pending);
    assert!(req.wrapped_key.is_none(), "never hand out the wrapped key");
    assert!(matches!(
        core.fetch_key(CLIN, &req.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("pending")
    ));

    let listed = core.list_requests(OWNER, "", false).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, req.id);
    assert!(
        core.list_requests(CLIN, "", false)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        core.list_requests(CLIN, &study.id, false).await,
        Err(KeyServerError::PermissionDenied(m)) if m == "only the study owner lists its requests"
    ));
    // That refusal is in the chain, told apart from the layer's.
    let last = core.list_audit(1, 10_000).unwrap().pop().unwrap();
    assert_eq!(
        (
            last.event.as_str(),
            last.actor.as_str(),
            last.study.as_str()
        ),
        ("access.refused", CLIN, study.id.as_str())
    );
    assert_eq!(
        last.detail,
        "rpc=ListRequests reason=only the study owner lists its requests"
    );

    assert!(matches!(
        core.approve(CLIN, &req.id, 60, 1).await,
        Err(KeyServerError::PermissionDenied(_))
    ));
    assert!(matches!(
        core.approve(OWNER, &req.id, 0, 1).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    assert!(matches!(
        core.approve(OWNER, &req.id, 60, 11).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    let approved = core.approve(OWNER, &req.id, 60, 1).await.unwrap();
    assert!(matches!(
        approved.state,
        GrantState::Approved { uses_left: 1, .. }
    ));
    assert!(matches!(
        core.approve(OWNER, &req.id, 60, 1).await,
        Err(KeyServerError::FailedPrecondition(_))
    ));

    assert!(matches!(
        core.fetch_key(CLIN2, &req.id).await,
        Err(KeyServerError::PermissionDenied(_))
    ));
    let released = core.fetch_key(CLIN, &req.id).await.unwrap();
    assert_eq!(released.key, derived.key);
    assert_eq!(released.uses_left, 0);
    assert!(matches!(
        core.fetch_key(CLIN, &req.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("used up")
    ));
    assert!(
        core.list_requests(OWNER, "", false)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        core.list_requests(OWNER, &study.id, true)
            .await
            .unwrap()
            .len(),
        1
    );

    let ev = events(&core);
    for want in [
        "master.created",
        "study.registered",
        "key.derived",
        "derive.refused",
        "request.refused",
        "key.requested",
        "fetch.refused",
        "grant.approved",
        "key.released",
    ] {
        assert!(ev.iter().any(|e| e == want), "{want} missing from {ev:?}");
    }
    let rep = core.verify_audit().unwrap();
    assert!(rep.ok, "{rep:?}");
    assert_eq!(rep.entries, ev.len() as u64);
    assert!(rep.checkpoints_verified >= 3);
}

#[tokio::test]
async fn expiry_uses_the_injected_clock() {
    let (_dir, clock, core) = setup();
    let study = core
        .register_study(GW, OWNER, &attrs("P1"), None)
        .await
        .unwrap();
    let req = core
        .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &req.id, 10, 5).await.unwrap();
    assert_eq!(core.fetch_key(CLIN, &req.id).await.unwrap().uses_left, 4);
    clock.advance_secs(10);
    assert!(matches!(
        core.fetch_key(CLIN, &req.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("expired")
    ));
}

#[tokio::test]
async fn self_approval_deny_and_revoke() {
    let (_dir, _clock, core) = setup();
    let study = core
        .register_study(GW, OWNER, &attrs("P1"), None)
        .await
        .unwrap();
    let own = core
        .request_key(OWNER, &study.id, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    assert!(matches!(
        core.approve(OWNER, &own.id, 60, 1).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("own request")
    ));
    assert!(events(&core).iter().any(|e| e == "approval.refused"));

    let r1 = core
        .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    assert!(matches!(
        core.revoke(OWNER, &r1.id, "").await,
        Err(KeyServerError::FailedPrecondition(_))
    ));
    let denied_rec = core.deny(OWNER, &r1.id, "not needed").await.unwrap();
    assert!(matches!(denied_rec.state, GrantState::Denied { .. }));
    assert!(matches!(
        core.fetch_key(CLIN, &r1.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("denied")
    ));

    let r2 = core
        .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &r2.id, 60, 3).await.unwrap();
    core.fetch_key(CLIN, &r2.id).await.unwrap();
    assert!(matches!(
        core.revoke(CLIN, &r2.id, "").await,
        Err(KeyServerError::PermissionDenied(_))
    ));
    core.revoke(OWNER, &r2.id, "left the team").await.unwrap();
    assert!(matches!(
        core.fetch_key(CLIN, &r2.id).await,
        Err(KeyServerError::PermissionDenied(m)) if m.contains("revoked")
    ));
    let ev = events(&core);
    assert!(ev.iter().any(|e| e == "request.denied"));
    assert!(ev.iter().any(|e| e == "grant.revoked"));
    assert!(core.verify_audit().unwrap().ok);
}

#[tokio::test]
async fn gateway_presents_attributes_for_a_user() {
    let (_dir, _clock, core) = setup();
    let study = core
        .register_study(GW, OWNER, &attrs("P1"), None)
        .await
        .unwrap();
    assert!(matches!(
        core.request_key(CLIN2, &study.id, &attrs("P1"), "pixels", "", CLIN)
            .await,
        Err(KeyServerError::PermissionDenied(_))
    ));
    assert!(matches!(
        core.request_key(GW, &study.id, &attrs("P1"), "pixels", "", "not-an-identity")
            .await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    let req = core
        .request_key(GW, &study.id, &attrs("P1"), "pixels", "restore", CLIN)
        .await
        .unwrap();
    assert_eq!(req.requester, CLIN);
    assert_eq!(req.presented_by, GW);
    core.approve(OWNER, &req.id, 60, 1).await.unwrap();
    assert!(
        core.fetch_key(GW, &req.id).await.is_err(),
        "only the requester fetches"
    );
    core.fetch_key(CLIN, &req.id).await.unwrap();
}

#[tokio::test]
async fn bad_ids_and_unknown_objects() {
    let (_dir, _clock, core) = setup();
    assert!(matches!(
        core.derive_key(GW, "nope", &attrs("P1"), "pixels", Operation::Protect)
            .await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    let unknown = "st-00000000000000000000000000000000";
    assert!(matches!(
        core.derive_key(GW, unknown, &attrs("P1"), "pixels", Operation::Protect)
            .await,
        Err(KeyServerError::NotFound(_))
    ));
    assert!(matches!(
        core.fetch_key(CLIN, "rq-00000000000000000000000000000000")
            .await,
        Err(KeyServerError::NotFound(_))
    ));
    assert!(matches!(
        core.approve(OWNER, "rq-0", 1, 1).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    let s = core
        .register_study(GW, OWNER, &attrs("P1"), Some(unknown))
        .await
        .unwrap();
    assert_eq!(s.id, unknown);
    assert!(matches!(
        core.register_study(GW, OWNER, &attrs("P1"), Some(unknown))
            .await,
        Err(KeyServerError::AlreadyExists(_))
    ));
    assert!(matches!(
        core.register_study(GW, "owner", &attrs("P1"), None).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn one_use_is_released_once_under_concurrency() {
    let (_dir, _clock, core) = setup();
    let study = core
        .register_study(GW, OWNER, &attrs("P1"), None)
        .await
        .unwrap();
    let req = core
        .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &req.id, 60, 1).await.unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let core = core.clone();
            let id = req.id.clone();
            tokio::spawn(async move { core.fetch_key(CLIN, &id).await.is_ok() })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap());
    }
    assert_eq!(ok, 1);
}

#[tokio::test]
async fn rotation_keeps_old_studies_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.redb");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_secs(5));
    let core = open_with(&path, [1; 32], clock.clone(), 0).unwrap();
    let a = core
        .register_study(GW, OWNER, &attrs("A"), None)
        .await
        .unwrap();
    let ka = core
        .derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Protect)
        .await
        .unwrap();
    assert_eq!(
        core.rotate_master("spiffe://tessera.local/user/admin")
            .await
            .unwrap(),
        2
    );
    let b = core
        .register_study(GW, OWNER, &attrs("B"), None)
        .await
        .unwrap();
    assert_eq!(b.master_version, 2);
    let kb = core
        .derive_key(GW, &b.id, &attrs("B"), "pixels", Operation::Protect)
        .await
        .unwrap();
    assert_eq!(
        core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
            .await
            .unwrap(),
        ka
    );
    drop(core);

    assert!(matches!(
        open_with(&path, [2; 32], clock.clone(), 0),
        Err(KeyServerError::Kek(_))
    ));
    let core = open_with(&path, [1; 32], clock, 0).unwrap();
    assert_eq!(core.current_master_version(), 2);
    for (s, id, k) in [(&a, "A", &ka), (&b, "B", &kb)] {
        let again = core
            .derive_key(GW, &s.id, &attrs(id), "pixels", Operation::Restore)
            .await
            .unwrap();
        assert_eq!(&again, k);
    }
    let rep = core.verify_audit().unwrap();
    assert!(rep.ok, "{rep:?}");
}
