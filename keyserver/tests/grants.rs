//! Key requests and grants over mutual TLS: the whole flow, bad input, expiry and rotation.

use tessera_proto::keyserver::v1 as pb;
use tonic::Code;

use crate::common::*;

async fn key_flow_over_mutual_tls(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let mut owner = env.client("owner").await;
    let mut clin = env.client("clinician").await;

    // The watermark derives the pixel key (the gateway only `dicom-*`).
    let derived = env
        .client("watermark")
        .await
        .derive_key(pb::DeriveKeyRequest {
            study_id: study.clone(),
            attributes: attrs("P-1"),
            purpose: "pixels".into(),
            operation: pb::Operation::Protect.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(derived.key.len(), 32);

    // Only the gateway registers; a clinician may not even call it.
    let e = clin
        .register_study(pb::RegisterStudyRequest {
            owner: OWNER.into(),
            attributes: attrs("P-1"),
            study_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A storage node holds the service role but is not a trusted deriver.
    let e = env
        .client("storage-1")
        .await
        .derive_key(pb::DeriveKeyRequest {
            study_id: study.clone(),
            attributes: attrs("P-1"),
            purpose: "pixels".into(),
            operation: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let req = clin
        .request_key(request(&study, "P-1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(req.state, pb::RequestState::Pending as i32);
    assert_eq!(req.requester, CLIN);
    let fetch = pb::FetchKeyRequest {
        request_id: req.request_id.clone(),
    };
    assert_eq!(
        clin.fetch_key(fetch.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    let listed = owner
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].request_id, req.request_id);
    // The clinician cannot list or approve.
    assert_eq!(
        clin.list_requests(pb::ListRequestsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let approve = pb::ApproveRequestRequest {
        request_id: req.request_id.clone(),
        ttl_seconds: 600,
        uses: 1,
    };
    assert_eq!(
        clin.approve_request(approve.clone())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let approved = owner
        .approve_request(approve)
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(approved.state, pb::RequestState::Approved as i32);
    assert_eq!(approved.uses_left, 1);

    // Another clinician cannot use the grant.
    assert_eq!(
        env.client("clinician2")
            .await
            .fetch_key(fetch.clone())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let released = clin.fetch_key(fetch.clone()).await.unwrap().into_inner();
    assert_eq!(released.key, derived.key);
    assert_eq!(released.uses_left, 0);
    assert_eq!(
        clin.fetch_key(fetch).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Outsider: no role, refused by the policy layer.
    assert_eq!(
        env.client("outsider")
            .await
            .request_key(request(&study, "P-1"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Self-approval.
    let own = owner
        .request_key(request(&study, "P-1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    let e = owner
        .approve_request(pb::ApproveRequestRequest {
            request_id: own.request_id.clone(),
            ttl_seconds: 60,
            uses: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("own request"), "{}", e.message());

    // Deny, then revoke a second grant.
    owner
        .deny_request(pb::DenyRequestRequest {
            request_id: own.request_id,
            reason: "no".into(),
        })
        .await
        .unwrap();
    let r2 = clin
        .request_key(request(&study, "P-1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    owner
        .approve_request(pb::ApproveRequestRequest {
            request_id: r2.request_id.clone(),
            ttl_seconds: 60,
            uses: 3,
        })
        .await
        .unwrap();
    let revoked = owner
        .revoke_grant(pb::RevokeGrantRequest {
            request_id: r2.request_id.clone(),
            reason: "done".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(revoked.state, pb::RequestState::Revoked as i32);
    assert_eq!(
        clin.fetch_key(pb::FetchKeyRequest {
            request_id: r2.request_id,
        })
        .await
        .unwrap_err()
        .code(),
        Code::PermissionDenied
    );

    let v = owner
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{}", v.problem);
    assert!(v.entries >= 12, "{}", v.entries);
    assert!(v.checkpoints_verified >= 3);
    assert_eq!(v.audit_public_key.len(), 32);
    assert_eq!(
        clin.verify_audit(pb::VerifyAuditRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    // An admin reads every entry (an owner only those about its studies).
    let log = env
        .client("researcher")
        .await
        .list_audit(pb::ListAuditRequest {
            from_seq: 1,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    // Plus the clinician's VerifyAudit, refused by the layer and audited.
    assert_eq!(log.len() as u64, v.entries + 1);
    assert_eq!(log.last().unwrap().event, "access.refused");
    for ev in [
        "study.registered",
        "key.derived",
        "key.requested",
        "grant.approved",
        "request.denied",
        "key.released",
        "grant.revoked",
        "fetch.refused",
        "approval.refused",
    ] {
        assert!(log.iter().any(|e| e.event == ev), "{ev}");
    }
    // No patient attribute ever reaches the log.
    assert!(log.iter().all(|e| !e.detail.contains("P-1")));
    env.stop().await;
}

async fn bad_input_gets_clear_statuses(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-2").await;
    let mut gateway = env.client("gateway").await;
    let mut clin = env.client("clinician").await;
    let derive = |study: &str, patient: &str, op: i32| pb::DeriveKeyRequest {
        study_id: study.into(),
        attributes: attrs(patient),
        purpose: "dicom-pixels".into(),
        operation: op,
    };
    let code =
        |r: Result<tonic::Response<pb::DeriveKeyResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(gateway.derive_key(derive("st-nope", "P-2", 1)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            gateway
                .derive_key(derive("st-0123456789abcdef0123456789abcdef", "P-2", 1))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(gateway.derive_key(derive(&study, "P-2", 99)).await),
        Code::InvalidArgument
    );
    let e = gateway
        .derive_key(derive(&study, "P-3", 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(!e.message().contains("patient_id") && !e.message().contains("birth_date"));

    let mut big = derive(&study, "P-2", 1);
    big.attributes[0].value = "x".repeat(200 * 1024);
    assert_eq!(code(gateway.derive_key(big).await), Code::ResourceExhausted);

    let mut empty = derive(&study, "P-2", 1);
    empty.attributes.clear();
    assert_eq!(code(gateway.derive_key(empty).await), Code::InvalidArgument);
    let mut dup = derive(&study, "P-2", 1);
    dup.attributes.push(dup.attributes[0].clone());
    assert_eq!(code(gateway.derive_key(dup).await), Code::InvalidArgument);

    assert_eq!(
        clin.fetch_key(pb::FetchKeyRequest {
            request_id: "../../etc/passwd".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::InvalidArgument
    );
    assert_eq!(
        clin.fetch_key(pb::FetchKeyRequest {
            request_id: "rq-0123456789abcdef0123456789abcdef".into()
        })
        .await
        .unwrap_err()
        .code(),
        Code::NotFound
    );
    let mut owner = env.client("owner").await;
    let r = clin
        .request_key(request(&study, "P-2"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    for (ttl, uses) in [(0, 1), (3601, 1), (60, 0), (60, 6)] {
        assert_eq!(
            owner
                .approve_request(pb::ApproveRequestRequest {
                    request_id: r.request_id.clone(),
                    ttl_seconds: ttl,
                    uses,
                })
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument,
            "ttl={ttl} uses={uses}"
        );
    }
    assert_eq!(
        owner
            .list_audit(pb::ListAuditRequest {
                from_seq: 0,
                limit: 5000
            })
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // The server is still healthy after all of that.
    assert!(
        owner
            .verify_audit(pb::VerifyAuditRequest {})
            .await
            .unwrap()
            .into_inner()
            .ok
    );
    env.stop().await;
}

async fn grants_expire_on_the_injected_clock_and_rotation_needs_admin(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-4").await;
    let mut owner = env.client("owner").await;
    let mut clin = env.client("clinician").await;
    let r = clin
        .request_key(request(&study, "P-4"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    owner
        .approve_request(pb::ApproveRequestRequest {
            request_id: r.request_id.clone(),
            ttl_seconds: 30,
            uses: 5,
        })
        .await
        .unwrap();
    let fetch = pb::FetchKeyRequest {
        request_id: r.request_id,
    };
    assert_eq!(
        clin.fetch_key(fetch.clone())
            .await
            .unwrap()
            .into_inner()
            .uses_left,
        4
    );
    env.clock.advance_secs(31);
    let e = clin.fetch_key(fetch).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("expired"));

    assert_eq!(
        owner
            .rotate_master(pb::RotateMasterRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let v = env
        .client("researcher")
        .await
        .rotate_master(pb::RotateMasterRequest {})
        .await
        .unwrap()
        .into_inner()
        .master_version;
    assert_eq!(v, 2);
    env.stop().await;
}

/// An owner with more pending requests than one 64 KiB message holds lists
/// them all, page by page: every page under the limit, none twice, oldest
/// first, and a token the keyserver never gave is refused.
async fn list_requests_pages_past_the_message_limit(backend: Backend) {
    let env = Env::start_on(backend).await;
    let mut owner = env.client("owner").await;
    let mut want = Vec::new();
    let long = "x".repeat(400);
    for i in 0..12 {
        let patient = format!("P-PAGE-{i}");
        let study = register(&env, &patient).await;
        for who in ["clinician", "clinician2", "researcher"] {
            let mut c = env.client(who).await;
            for _ in 0..5 {
                let mut r = request(&study, &patient);
                r.justification = long.clone();
                want.push(
                    c.request_key(r)
                        .await
                        .unwrap()
                        .into_inner()
                        .request
                        .unwrap()
                        .request_id,
                );
            }
        }
    }
    // 180 requests of ~500 bytes: more than one 64 KiB message.
    let mut got = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = owner
            .list_requests(pb::ListRequestsRequest {
                page_size: 500,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(prost::Message::encoded_len(&page) <= 64 * 1024);
        got.extend(page.requests.into_iter().map(|r| r.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 100, "paging does not end");
    }
    assert!(pages >= 2, "{} requests fit in one page", got.len());
    assert_eq!(got.len(), want.len());
    let mut a = got.clone();
    a.sort();
    a.dedup();
    assert_eq!(a.len(), got.len(), "a request listed twice");
    let mut w = want.clone();
    w.sort();
    assert_eq!(a, w);
    // Small pages give the same sequence.
    let mut small = Vec::new();
    let mut token = String::new();
    loop {
        let page = owner
            .list_requests(pb::ListRequestsRequest {
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.requests.len() <= 7);
        small.extend(page.requests.into_iter().map(|r| r.request_id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(small, got);
    for bad in ["nonsense", "12:", "x:rq-1"] {
        let e = owner
            .list_requests(pb::ListRequestsRequest {
                page_token: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
    }
    let e = owner
        .list_requests(pb::ListRequestsRequest {
            page_size: 501,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    env.stop().await;
}

crate::on_both_backends!(
    key_flow_over_mutual_tls,
    bad_input_gets_clear_statuses,
    grants_expire_on_the_injected_clock_and_rotation_needs_admin,
    list_requests_pages_past_the_message_limit,
);
