//! The audit chain seen from outside: every refusal recorded, a broken chain, paging.

use tessera_proto::keyserver::v1 as pb;
use tonic::Code;

use crate::common::*;

async fn every_refusal_is_audited_before_the_reply(backend: Backend) {
    let env = Env::start_on(backend).await;
    let study = register(&env, "P-1").await;
    let register_req = pb::RegisterStudyRequest {
        owner: OWNER.into(),
        attributes: attrs("P-1"),
        study_id: String::new(),
    };
    // Services pass the role layer; the core refuses and audits.
    let mut wm = env.client("watermark").await;
    refused_and_audited(
        &env,
        "service/watermark",
        "RegisterStudy",
        "access.refused",
        Code::PermissionDenied,
        wm.register_study(register_req.clone()),
    )
    .await;
    let mut storage = env.client("storage-1").await;
    refused_and_audited(
        &env,
        "service/storage-1",
        "DeriveKey",
        "access.refused",
        Code::PermissionDenied,
        storage.derive_key(pb::DeriveKeyRequest {
            study_id: study.clone(),
            attributes: attrs("P-1"),
            purpose: "pixels".into(),
            operation: 0,
        }),
    )
    .await;
    // A deriver outside its purposes: the gateway derives `dicom-*` only,
    // the watermark `pixels` only.
    let mut gateway = env.client("gateway").await;
    for (client, caller, purpose) in [
        (&mut gateway, "service/gateway", "pixels"),
        (&mut wm, "service/watermark", "dicom-metadata"),
    ] {
        refused_and_audited(
            &env,
            caller,
            "DeriveKey",
            "derive.refused",
            Code::PermissionDenied,
            client.derive_key(pb::DeriveKeyRequest {
                study_id: study.clone(),
                attributes: attrs("P-1"),
                purpose: purpose.into(),
                operation: 0,
            }),
        )
        .await;
    }
    for (client, purpose) in [(&mut gateway, "dicom-metadata"), (&mut wm, "pixels")] {
        client
            .derive_key(pb::DeriveKeyRequest {
                study_id: study.clone(),
                attributes: attrs("P-1"),
                purpose: purpose.into(),
                operation: 0,
            })
            .await
            .unwrap();
    }
    let mut on_behalf = request(&study, "P-1");
    on_behalf.on_behalf_of = CLIN.into();
    refused_and_audited(
        &env,
        "service/watermark",
        "RequestKey",
        "access.refused",
        Code::PermissionDenied,
        wm.request_key(on_behalf),
    )
    .await;

    let req = env
        .client("clinician")
        .await
        .request_key(request(&study, "P-1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    let rid = req.request_id.clone();
    // clinician2 holds the owner role but does not own this study.
    let mut other = env.client("clinician2").await;
    let approve = pb::ApproveRequestRequest {
        request_id: rid.clone(),
        ttl_seconds: 60,
        uses: 1,
    };
    refused_and_audited(
        &env,
        "user/clinician2",
        "ApproveRequest",
        "approval.refused",
        Code::PermissionDenied,
        other.approve_request(approve.clone()),
    )
    .await;
    refused_and_audited(
        &env,
        "user/clinician2",
        "DenyRequest",
        "deny.refused",
        Code::PermissionDenied,
        other.deny_request(pb::DenyRequestRequest {
            request_id: rid.clone(),
            reason: String::new(),
        }),
    )
    .await;
    let mut owner = env.client("owner").await;
    owner.approve_request(approve.clone()).await.unwrap();
    refused_and_audited(
        &env,
        "user/clinician2",
        "RevokeGrant",
        "revoke.refused",
        Code::PermissionDenied,
        other.revoke_grant(pb::RevokeGrantRequest {
            request_id: rid.clone(),
            reason: String::new(),
        }),
    )
    .await;
    // A decided request is not decided again, and the attempt is recorded.
    refused_and_audited(
        &env,
        "user/owner",
        "ApproveRequest",
        "approval.refused",
        Code::FailedPrecondition,
        owner.approve_request(approve),
    )
    .await;
    refused_and_audited(
        &env,
        "user/owner",
        "DenyRequest",
        "deny.refused",
        Code::FailedPrecondition,
        owner.deny_request(pb::DenyRequestRequest {
            request_id: rid.clone(),
            reason: String::new(),
        }),
    )
    .await;
    let last = all_audit(&env).await.pop().unwrap();
    assert!(
        last.detail.contains(&format!("request={rid}")),
        "{}",
        last.detail
    );
    assert_eq!(last.study_id, study);
    env.stop().await;
}

#[tokio::test]
async fn a_broken_chain_refuses_key_operations_until_recovered() {
    let mut env = Env::start().await;
    let study = register(&env, "P-1").await;
    let mut clin = env.client("clinician").await;
    let pending = clin
        .request_key(request(&study, "P-1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    let mut marked = request(&study, "P-1");
    marked.purpose = "tamper-me".into();
    clin.request_key(marked).await.unwrap();
    let target = all_audit(&env)
        .await
        .into_iter()
        .find(|e| e.detail.contains("purpose=tamper-me"))
        .unwrap()
        .seq;
    env.halt().await;

    // One byte of that entry changed on disk while the keyserver is stopped.
    let db = env.cfg.keyserver.db_path.clone();
    let mut bytes = std::fs::read(&db).unwrap();
    let marker = b"purpose=tamper-me";
    let mut flipped = 0;
    for i in 0..bytes.len() - marker.len() {
        if &bytes[i..i + marker.len()] == marker {
            bytes[i + marker.len() - 1] ^= 0x20;
            flipped += 1;
        }
    }
    assert!(flipped >= 1);
    std::fs::write(&db, &bytes).unwrap();

    env.resume().await;
    let named = format!("entry {target}");
    let refused = |e: tonic::Status| {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(&named), "{}", e.message());
    };
    let mut gateway = env.client("gateway").await;
    let mut wm = env.client("watermark").await;
    let derive = pb::DeriveKeyRequest {
        study_id: study.clone(),
        attributes: attrs("P-1"),
        purpose: "pixels".into(),
        operation: pb::Operation::Restore.into(),
    };
    refused(wm.derive_key(derive.clone()).await.unwrap_err());
    refused(
        gateway
            .register_study(pb::RegisterStudyRequest {
                owner: OWNER.into(),
                attributes: attrs("P-2"),
                study_id: String::new(),
            })
            .await
            .unwrap_err(),
    );
    let mut owner = env.client("owner").await;
    let approve = pb::ApproveRequestRequest {
        request_id: pending.request_id.clone(),
        ttl_seconds: 60,
        uses: 1,
    };
    refused(owner.approve_request(approve.clone()).await.unwrap_err());
    let mut clin = env.client("clinician").await;
    refused(
        clin.fetch_key(pb::FetchKeyRequest {
            request_id: pending.request_id.clone(),
        })
        .await
        .unwrap_err(),
    );
    refused(clin.request_key(request(&study, "P-1")).await.unwrap_err());
    refused(
        gateway
            .redeem_grant(pb::RedeemGrantRequest {
                request_id: pending.request_id.clone(),
                on_behalf_of: CLIN.into(),
                study_id: study.clone(),
            })
            .await
            .unwrap_err(),
    );
    let v = owner
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!v.ok);
    assert_eq!(v.first_broken_seq, target);
    env.halt().await;

    // The administrator's recovery: only the first broken entry is accepted.
    let kek = keyserver::core::crypto::Kek::load(&env.cfg.keyserver.kek_file).unwrap();
    assert!(keyserver::core::recover_audit(&db, &kek, "admin", target + 1, 1).is_err());
    let rec = keyserver::core::recover_audit(&db, &kek, "admin", target, 1).unwrap();
    assert!(rec.report.ok, "{:?}", rec.report);
    assert_eq!(rec.acknowledged.seq, target);
    assert!(rec.seq > target);
    assert!(
        keyserver::core::recover_audit(&db, &kek, "admin", target, 1).is_err(),
        "nothing left to recover"
    );

    env.resume().await;
    let mut wm = env.client("watermark").await;
    wm.derive_key(derive).await.unwrap();
    let mut owner = env.client("owner").await;
    owner.approve_request(approve).await.unwrap();
    let v = owner
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{}", v.problem);
    assert_eq!(v.acknowledged_broken_seq, target, "the break stays visible");
    let log = all_audit(&env).await;
    let recovered = log.iter().find(|e| e.event == "audit.recovered").unwrap();
    assert_eq!(recovered.seq, rec.seq);
    assert!(
        recovered
            .detail
            .contains(&format!("acknowledged_broken_at={target} operator=admin")),
        "{}",
        recovered.detail
    );
    env.stop().await;
}

async fn audit_pages_fit_the_message_limit_and_owners_see_their_own(backend: Backend) {
    use prost::Message;
    let env = Env::start_on(backend).await;
    let mine = register(&env, "P-1").await;
    let theirs = env
        .client("gateway")
        .await
        .register_study(pb::RegisterStudyRequest {
            owner: "spiffe://tessera.local/user/clinician2".into(),
            attributes: attrs("P-2"),
            study_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .study_id;
    // Enough entries that 1000 of them are well over 64 KiB.
    let core = env.running.as_ref().unwrap().core().clone();
    let wm = "spiffe://tessera.local/service/watermark";
    let mut tasks = Vec::new();
    for i in 0..900 {
        let core = core.clone();
        let study = if i % 3 == 0 {
            theirs.clone()
        } else {
            mine.clone()
        };
        let patient = if i % 3 == 0 { "P-2" } else { "P-1" };
        let attributes: Vec<(String, String)> = attrs(patient)
            .into_iter()
            .map(|a| (a.name, a.value))
            .collect();
        tasks.push(tokio::spawn(async move {
            core.derive_key(
                wm,
                &study,
                &attributes,
                "pixels",
                keyserver::core::Operation::Protect,
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = core.verify_audit().unwrap().entries;
    assert!(total > 900);

    for (who, limit) in [
        ("researcher", 300),
        ("researcher", 1000),
        ("owner", 1000),
        ("owner", 300),
    ] {
        // The CLI's decode limit: the server's own 64 KiB.
        let mut c = env.client(who).await.max_decoding_message_size(64 * 1024);
        let mut from = 1;
        let mut seen = Vec::new();
        loop {
            let page = c
                .list_audit(pb::ListAuditRequest {
                    from_seq: from,
                    limit,
                })
                .await
                .unwrap_or_else(|e| panic!("{who} limit {limit} from {from}: {e:?}"))
                .into_inner();
            assert!(page.encoded_len() <= 64 * 1024);
            assert!(page.entries.len() <= limit as usize);
            seen.extend(page.entries);
            if page.next_from_seq == 0 {
                break;
            }
            assert!(page.next_from_seq > from);
            from = page.next_from_seq;
        }
        let seqs: Vec<u64> = seen.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "no entry twice");
        if who == "researcher" {
            assert_eq!(seen.len() as u64, total, "admin sees all");
        } else {
            assert!(
                seen.iter().all(|e| e.study_id != theirs),
                "owner sees only its own"
            );
            assert!(seen.iter().any(|e| e.study_id == mine));
            let own = 600 + 1; // 600 derivations and the registration
            assert!(seen.len() >= own, "{}", seen.len());
        }
    }
    env.stop().await;
}

crate::on_both_backends!(
    every_refusal_is_audited_before_the_reply,
    audit_pages_fit_the_message_limit_and_owners_see_their_own,
);
