//! Integration tests: the real keyserver in-process on 127.0.0.1:0 with a
//! generated development PKI, called over mutual TLS by one client per
//! identity.

use std::path::PathBuf;
use std::sync::Arc;

use keyserver::config::{Config, ENV_PREFIX};
use keyserver::core::clock::ManualClock;
use keyserver::{App, RunningApp};
use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_runtime::{ConfigSource, load_config};
use tessera_tls::{ClientTls, TlsFiles};
use tonic::Code;
use tonic::transport::Channel;

const OWNER: &str = "spiffe://tessera.local/user/owner";
const CLIN: &str = "spiffe://tessera.local/user/clinician";

struct Env {
    _tmp: tempfile::TempDir,
    pki: PathBuf,
    addr: String,
    clock: Arc<ManualClock>,
    cfg: Config,
    /// The same config as a file, for the `keyserver` binary.
    config_file: PathBuf,
    running: Option<RunningApp>,
}

impl Env {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap().dir;
        let kek = tmp.path().join("kek");
        std::fs::write(&kek, [42u8; 32]).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let d = pki.display();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/keyserver.crt\"\nkey = \"{d}/keyserver.key\"\n\
             [server.access]\nroles = {{ \"spiffe://tessera.local/user/researcher\" = [\"researcher\", \"admin\"], \"spiffe://tessera.local/user/clinician2\" = [\"clinician\", \"owner\"] }}\n\
             [keyserver]\ndb_path = \"{}\"\nkek_file = \"{}\"\ncheckpoint_every = 4\nmax_grant_ttl_secs = 3600\nmax_grant_uses = 5\n",
            tmp.path().join("ks.redb").display(),
            kek.display()
        );
        let cfg: Config = load_config(
            &ConfigSource::from_text(&text, Default::default()),
            ENV_PREFIX,
        )
        .unwrap();
        let config_file = tmp.path().join("keyserver.toml");
        std::fs::write(&config_file, &text).unwrap();
        let clock = Arc::new(ManualClock::at_secs(1_700_000_000));
        let running = App::build_with_clock(&cfg, clock.clone())
            .unwrap()
            .spawn()
            .await
            .unwrap();
        let addr = running.local_addr().to_string();
        Self {
            _tmp: tmp,
            pki,
            addr,
            clock,
            cfg,
            config_file,
            running: Some(running),
        }
    }

    /// Stops the keyserver cleanly (the database is closed).
    async fn halt(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }

    /// Starts the keyserver again on the same database.
    async fn resume(&mut self) {
        let running = App::build_with_clock(&self.cfg, self.clock.clone())
            .unwrap()
            .spawn()
            .await
            .unwrap();
        self.addr = running.local_addr().to_string();
        self.running = Some(running);
    }

    async fn client(&self, name: &str) -> KeyServerClient<Channel> {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki, name)).unwrap();
        KeyServerClient::new(tls.connect(&self.addr).await.unwrap())
    }

    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }
}

fn attrs(patient: &str) -> Vec<pb::Attribute> {
    vec![
        pb::Attribute {
            name: "patient_id".into(),
            value: patient.into(),
        },
        pb::Attribute {
            name: "birth_date".into(),
            value: "19700101".into(),
        },
    ]
}

async fn register(env: &Env, patient: &str) -> String {
    env.client("gateway")
        .await
        .register_study(pb::RegisterStudyRequest {
            owner: OWNER.into(),
            attributes: attrs(patient),
            study_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .study_id
}

fn request(study: &str, patient: &str) -> pb::RequestKeyRequest {
    pb::RequestKeyRequest {
        study_id: study.into(),
        attributes: attrs(patient),
        purpose: "pixels".into(),
        justification: "tumour board".into(),
        on_behalf_of: String::new(),
    }
}

#[tokio::test]
async fn key_flow_over_mutual_tls() {
    let env = Env::start().await;
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

#[tokio::test]
async fn bad_input_gets_clear_statuses() {
    let env = Env::start().await;
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

#[tokio::test]
async fn grants_expire_on_the_injected_clock_and_rotation_needs_admin() {
    let env = Env::start().await;
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

/// Every audit entry, read by an admin page by page.
async fn all_audit(env: &Env) -> Vec<pb::AuditEntry> {
    let mut admin = env.client("researcher").await;
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let page = admin
            .list_audit(pb::ListAuditRequest {
                from_seq: from,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.entries);
        if page.next_from_seq == 0 {
            return out;
        }
        from = page.next_from_seq;
    }
}

/// Runs `call`, expects `code`, and checks that exactly one audit entry was
/// appended: `event` by `caller`, naming the RPC and a reason.
async fn refused_and_audited<F, T>(
    env: &Env,
    caller: &str,
    rpc: &str,
    event: &str,
    code: Code,
    call: F,
) where
    F: Future<Output = Result<T, tonic::Status>>,
    T: std::fmt::Debug,
{
    let before = all_audit(env).await.len();
    let e = call.await.unwrap_err();
    assert_eq!(e.code(), code, "{rpc}: {e:?}");
    let after = all_audit(env).await;
    assert_eq!(after.len(), before + 1, "{rpc}: one refusal entry");
    let last = after.last().unwrap();
    assert_eq!(last.event, event, "{rpc}");
    assert_eq!(
        last.actor,
        format!("spiffe://tessera.local/{caller}"),
        "{rpc}"
    );
    assert!(
        last.detail.contains(&format!("rpc={rpc}")) && last.detail.contains("reason="),
        "{rpc}: {}",
        last.detail
    );
}

#[tokio::test]
async fn every_refusal_is_audited_before_the_reply() {
    let env = Env::start().await;
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
async fn audit_pages_fit_the_message_limit_and_owners_see_their_own() {
    use prost::Message;
    let env = Env::start().await;
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

/// Runs the real `keyserver` binary; (exit code, stdout, stderr).
fn keyserver_cli(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyserver"))
        .args(args)
        .env_remove("TESSERA_KEYSERVER__KEYSERVER__DB_PATH")
        .env_remove("TESSERA_KEYSERVER__KEYSERVER__KEK_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn derive(env: &Env, study: &str, patient: &str) -> Result<Vec<u8>, tonic::Status> {
    env.client("watermark")
        .await
        .derive_key(pb::DeriveKeyRequest {
            study_id: study.into(),
            attributes: attrs(patient),
            purpose: "pixels".into(),
            operation: pb::Operation::Restore.into(),
        })
        .await
        .map(|r| r.into_inner().key)
}

fn json_field(line: &str, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    v[name].as_u64().unwrap()
}

#[tokio::test]
async fn online_backup_restores_the_older_studies_and_only_those() {
    use std::ffi::OsStr;
    let mut env = Env::start().await;
    let older: Vec<(String, String)> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let p = format!("OLD-{i}");
            v.push((register(&env, &p).await, p));
        }
        v
    };
    let mut keys = Vec::new();
    for (study, patient) in &older {
        keys.push(derive(&env, study, patient).await.unwrap());
    }

    // Backup by a second process while the keyserver serves.
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("ks-backup.redb");
    let config_file = env.config_file.clone();
    let cfg = config_file.as_os_str();
    let started = std::time::Instant::now();
    let (code, out, err) = keyserver_cli(&[
        OsStr::new("--config"),
        cfg,
        OsStr::new("backup"),
        OsStr::new("--out"),
        backup.as_os_str(),
    ]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_field(&out, "studies"), 3, "{out}");
    assert_eq!(json_field(&out, "masters"), 1, "{out}");
    let snapshot_entries = json_field(&out, "auditEntries");
    let at_backup = all_audit(&env).await;
    assert_eq!(at_backup.len() as u64, snapshot_entries);
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&backup).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        eprintln!(
            "backup of {} audit entries: {} bytes in {took:?}",
            snapshot_entries,
            meta.len()
        );
    }
    // The master secret is copied wrapped: its clear bytes are nowhere.
    let raw = std::fs::read(&backup).unwrap();
    assert!(!raw.windows(32).any(|w| keys.iter().any(|k| k == w)));
    // Never over an existing file.
    let (code, _, err) = keyserver_cli(&[
        OsStr::new("--config"),
        cfg,
        OsStr::new("backup"),
        OsStr::new("--out"),
        backup.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&backup).unwrap(), raw);

    // N newer studies after the snapshot.
    let mut newer = Vec::new();
    for i in 0..2 {
        let p = format!("NEW-{i}");
        let s = register(&env, &p).await;
        derive(&env, &s, &p).await.unwrap();
        newer.push((s, p));
    }

    // Not into the database of a running keyserver, even with --force.
    let db = env.cfg.keyserver.db_path.clone();
    let restore = |extra: &[&OsStr], backup: &std::path::Path| {
        let mut args = vec![
            OsStr::new("--config"),
            cfg,
            OsStr::new("restore"),
            OsStr::new("--backup"),
            backup.as_os_str(),
        ];
        args.extend_from_slice(extra);
        keyserver_cli(&args)
    };
    let (code, _, err) = restore(&[OsStr::new("--force")], &backup);
    assert_eq!(code, 1);
    assert!(err.contains("open in another process"), "{err}");
    env.halt().await;
    let (code, _, err) = restore(&[], &backup);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    // A tampered backup (one audit byte) and a truncated one are refused,
    // the database left as it was.
    let before = std::fs::read(&db).unwrap();
    let mut tampered = raw.clone();
    let marker = b"master_version=1";
    let at = tampered
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    tampered[at + marker.len() - 1] = b'2';
    let bad = dir.path().join("tampered.redb");
    std::fs::write(&bad, &tampered).unwrap();
    let (code, _, err) = restore(&[OsStr::new("--force")], &bad);
    assert_eq!(code, 1);
    assert!(err.contains("not a sound database"), "{err}");
    let cut = dir.path().join("cut.redb");
    std::fs::write(&cut, &raw[..raw.len() / 2]).unwrap();
    let (code, _, err) = restore(&[OsStr::new("--force")], &cut);
    assert_eq!(code, 1);
    assert!(err.contains("not a sound database"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // Rewritten through redb (valid page checksums) but not by the
    // keyserver: the audit chain names the entry.
    let forged = dir.path().join("forged.redb");
    std::fs::write(&forged, &raw).unwrap();
    {
        use redb::ReadableTable;
        let db = redb::Database::open(&forged).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut t = w.open_table(keyserver::core::store::AUDIT).unwrap();
            let mut v = t.get(2).unwrap().unwrap().value().to_vec();
            let last = v.len() - 1;
            v[last] ^= 1;
            t.insert(2, v.as_slice()).unwrap();
        }
        w.commit().unwrap();
    }
    let (code, _, err) = restore(&[OsStr::new("--force")], &forged);
    assert_eq!(code, 1);
    assert!(err.contains("audit chain broken at entry 2"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // Another KEK cannot unwrap the backup's secrets: refused.
    let other_kek = dir.path().join("other.kek");
    std::fs::write(&other_kek, [7u8; 32]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other_kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let other_cfg = dir.path().join("other.toml");
    std::fs::write(
        &other_cfg,
        std::fs::read_to_string(&env.config_file).unwrap().replace(
            &env.cfg.keyserver.kek_file.display().to_string(),
            &other_kek.display().to_string(),
        ),
    )
    .unwrap();
    let fresh = dir.path().join("fresh.redb");
    let (code, _, err) = keyserver_cli(&[
        OsStr::new("--config"),
        other_cfg.as_os_str(),
        OsStr::new("restore"),
        OsStr::new("--backup"),
        backup.as_os_str(),
        OsStr::new("--db"),
        fresh.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("key-encryption key"), "{err}");
    assert!(!fresh.exists());

    // The database is lost; the backup is installed in its place.
    std::fs::remove_file(&db).unwrap();
    let (code, out, err) = restore(&[], &backup);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_field(&out, "auditEntries"), snapshot_entries);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&db).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    env.resume().await;
    for ((study, patient), key) in older.iter().zip(&keys) {
        assert_eq!(&derive(&env, study, patient).await.unwrap(), key);
    }
    for (study, patient) in &newer {
        let e = derive(&env, study, patient).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let v = env
        .client("owner")
        .await
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{}", v.problem);
    let log = all_audit(&env).await;
    assert_eq!(&log[..at_backup.len()], &at_backup[..]);
    assert!(log.len() > at_backup.len());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_registrations_is_one_consistent_commit() {
    use std::ffi::OsStr;
    let env = Env::start().await;
    let gw = env.client("gateway").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                gw.register_study(pb::RegisterStudyRequest {
                    owner: OWNER.into(),
                    attributes: attrs(&format!("P-{t}-{i}")),
                    study_id: String::new(),
                })
                .await
                .unwrap();
            }
        }));
    }
    // Wait until writes are under way, then back up beside them.
    while all_audit(&env).await.len() < 50 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.redb");
    let cfg = env.config_file.clone();
    let out2 = out.clone();
    let started = std::time::Instant::now();
    let (code, o, e) = tokio::task::spawn_blocking(move || {
        keyserver_cli(&[
            OsStr::new("--config"),
            cfg.as_os_str(),
            OsStr::new("backup"),
            OsStr::new("--out"),
            out2.as_os_str(),
        ])
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(code, 0, "{e}");
    for t in tasks {
        t.await.unwrap();
    }
    // A snapshot of one commit (whenever it fell among the registrations):
    // its chain verified (backup checks it) and it holds as many studies as
    // its audit entries say (one `master.created`, then one
    // `study.registered` each).
    let studies = json_field(&o, "studies");
    let entries = json_field(&o, "auditEntries");
    assert_eq!(entries, studies + 1, "{o}");
    eprintln!(
        "backup during writes: {studies} studies, {} bytes in {took:?}",
        std::fs::metadata(&out).unwrap().len()
    );
    let fresh = dir.path().join("fresh.redb");
    let (code, r, e) = keyserver_cli(&[
        OsStr::new("--config"),
        env.config_file.as_os_str(),
        OsStr::new("restore"),
        OsStr::new("--backup"),
        out.as_os_str(),
        OsStr::new("--db"),
        fresh.as_os_str(),
    ]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(json_field(&r, "studies"), studies);
    env.stop().await;
}
