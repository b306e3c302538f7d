//! The gateway's RPCs (redeem, check, forget, delegates) and the bench.

use tessera_proto::keyserver::v1 as pb;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn gateway_redeems_checks_and_forgets_over_mutual_tls() {
    let env = Env::start().await;
    let study = register(&env, "P-5").await;
    let mut gateway = env.client("gateway").await;
    let mut owner = env.client("owner").await;
    let mut clin = env.client("clinician").await;
    let mut watermark = env.client("watermark").await;
    let r = clin
        .request_key(request(&study, "P-5"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    owner
        .approve_request(pb::ApproveRequestRequest {
            request_id: r.request_id.clone(),
            ttl_seconds: 600,
            uses: 2,
        })
        .await
        .unwrap();
    let redeem = pb::RedeemGrantRequest {
        request_id: r.request_id.clone(),
        on_behalf_of: CLIN.into(),
        study_id: study.clone(),
    };
    // Neither a user nor another service reaches these RPCs: the matrix
    // admits the gateway role only (the layer refuses, security-logged).
    assert_eq!(
        clin.redeem_grant(redeem.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        owner.check_grant(redeem.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let e = watermark.redeem_grant(redeem.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("may not call"), "{}", e.message());

    let c = gateway
        .check_grant(redeem.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        c,
        pb::RedeemGrantResponse {
            study_id: study.clone(),
            purpose: "pixels".into(),
            expires_at_unix: 1_700_000_600,
            uses_left: 2,
        }
    );
    let got = gateway
        .redeem_grant(redeem.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.uses_left, 1);
    let mut wrong = redeem.clone();
    wrong.on_behalf_of = "spiffe://tessera.local/user/clinician2".into();
    assert_eq!(
        gateway.redeem_grant(wrong).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let mut bad = redeem.clone();
    bad.study_id = "nope".into();
    assert_eq!(
        gateway.check_grant(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    let forget = pb::ForgetStudyRequest {
        study_id: study.clone(),
        on_behalf_of: OWNER.into(),
    };
    assert_eq!(
        owner.forget_study(forget.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        watermark
            .forget_study(forget.clone())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let done = gateway
        .forget_study(forget.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.grants_revoked, 1);
    let e = gateway.forget_study(forget).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = gateway
        .derive_key(pb::DeriveKeyRequest {
            study_id: study.clone(),
            attributes: attrs("P-5"),
            purpose: "dicom-metadata".into(),
            operation: pb::Operation::Restore.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("was deleted"), "{}", e.message());
    assert_eq!(
        clin.request_key(request(&study, "P-5"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let e = gateway.redeem_grant(redeem).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("revoked"), "{}", e.message());
    let e = gateway
        .register_study(pb::RegisterStudyRequest {
            owner: OWNER.into(),
            attributes: attrs("P-5"),
            study_id: study.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    let v = owner
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{}", v.problem);
    let log = owner
        .list_audit(pb::ListAuditRequest {
            from_seq: 1,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    for ev in ["grant.redeemed", "redeem.refused", "study.forgotten"] {
        assert!(log.iter().any(|e| e.event == ev), "{ev}");
    }
    // The watermark's ForgetStudy was refused by the authorization layer:
    // audited too (an admin sees it; it names no study an owner owns).
    let all = all_audit(&env).await;
    assert!(
        all.iter().any(|e| e.event == "access.refused"
            && e.actor.ends_with("/service/watermark")
            && e.detail.contains("rpc=ForgetStudy")),
        "layer refusal of ForgetStudy audited"
    );
    let f = log.iter().find(|e| e.event == "study.forgotten").unwrap();
    assert_eq!(f.actor, "spiffe://tessera.local/service/gateway");
    assert!(f.detail.contains(OWNER), "{}", f.detail);
    assert!(log.iter().all(|e| !e.detail.contains("P-5")));
    env.stop().await;
}

#[tokio::test]
async fn bench_reports_both_rates() {
    let report = keyserver::bench_derive(keyserver::BenchOptions {
        clients: 4,
        requests: 40,
    })
    .await
    .unwrap();
    assert!(report.contains("gRPC over mTLS, 4 clients: 40"), "{report}");
    assert!(report.contains("in-process core"), "{report}");
    assert!(report.contains("ratio gRPC / in-process"), "{report}");
    assert!(report.contains("verified ok"), "{report}");
}

#[tokio::test]
async fn owners_manage_delegates_and_the_gateway_checks_them() {
    let env = Env::start().await;
    let mut owner = env.client("owner").await;
    let clin2 = "spiffe://tessera.local/user/clinician2";
    owner
        .add_delegate(pb::AddDelegateRequest {
            delegate: CLIN.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        owner
            .add_delegate(pb::AddDelegateRequest {
                delegate: CLIN.into(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::AlreadyExists
    );
    for bad in [OWNER, "clinician", "spiffe://tessera.local/user/Bad"] {
        assert_eq!(
            owner
                .add_delegate(pb::AddDelegateRequest {
                    delegate: bad.into(),
                })
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument,
            "{bad}"
        );
    }
    let listed = owner
        .list_delegates(pb::ListDelegatesRequest {})
        .await
        .unwrap()
        .into_inner()
        .delegates;
    assert_eq!(listed, vec![CLIN.to_owned()]);
    // A clinician has no owner role: refused by the policy layer.
    assert_eq!(
        env.client("clinician")
            .await
            .add_delegate(pb::AddDelegateRequest {
                delegate: clin2.into(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let check = |delegate: &str| pb::CheckDelegateRequest {
        owner: OWNER.into(),
        delegate: delegate.into(),
    };
    let mut gateway = env.client("gateway").await;
    assert!(
        gateway
            .check_delegate(check(CLIN))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert!(
        !gateway
            .check_delegate(check(clin2))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let mut wm = env.client("watermark").await;
    refused_and_audited(
        &env,
        "service/watermark",
        "CheckDelegate",
        "access.refused",
        Code::PermissionDenied,
        wm.check_delegate(check(CLIN)),
    )
    .await;
    owner
        .remove_delegate(pb::RemoveDelegateRequest {
            delegate: CLIN.into(),
        })
        .await
        .unwrap();
    assert_eq!(
        owner
            .remove_delegate(pb::RemoveDelegateRequest {
                delegate: CLIN.into(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert!(
        !gateway
            .check_delegate(check(CLIN))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    assert!(
        owner
            .list_delegates(pb::ListDelegatesRequest {})
            .await
            .unwrap()
            .into_inner()
            .delegates
            .is_empty()
    );
    let log = all_audit(&env).await;
    for event in ["delegate.added", "delegate.removed"] {
        let e = log.iter().find(|e| e.event == event).unwrap();
        assert_eq!(e.actor, OWNER);
        assert_eq!(e.detail, format!("delegate={CLIN}"));
    }
    env.stop().await;
}

#[tokio::test]
async fn gateway_breaks_the_glass_on_a_users_behalf_with_that_users_permission() {
    let env = Env::start().await;
    let study = register(&env, "P-6").await;
    let glass = |on_behalf_of: &str| pb::BreakGlassRequest {
        study_id: study.clone(),
        attributes: attrs("P-6"),
        purpose: "pixels".into(),
        reason: "arrest in theatre".into(),
        on_behalf_of: on_behalf_of.into(),
    };
    // Only the gateway presents for someone else.
    let e = env
        .client("clinician2")
        .await
        .break_glass(glass(CLIN))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The gateway for clinician2 (no emergency permission): refused, the
    // refusal recorded against clinician2, naming the gateway.
    let mut gw = env.client("gateway").await;
    let e = gw
        .break_glass(glass("spiffe://tessera.local/user/clinician2"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let last = all_audit(&env).await.pop().unwrap();
    assert_eq!(last.event, "breakglass.refused");
    assert_eq!(last.actor, "spiffe://tessera.local/user/clinician2");
    assert!(
        last.detail
            .contains("presented_by=spiffe://tessera.local/service/gateway"),
        "{}",
        last.detail
    );
    // The gateway itself holds no emergency permission either.
    let e = gw.break_glass(glass("")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // For the clinician (who holds it): open, the clinician the requester
    // and the one the approval names.
    let r = gw
        .break_glass(glass(CLIN))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert!(r.break_glass);
    assert_eq!(r.requester, CLIN);
    assert_eq!(r.state, pb::RequestState::Approved as i32);
    let approved = all_audit(&env)
        .await
        .into_iter()
        .find(|e| e.event == "grant.approved" && e.detail.contains(&r.request_id))
        .unwrap();
    assert_eq!(approved.actor, CLIN);
    env.stop().await;
}
