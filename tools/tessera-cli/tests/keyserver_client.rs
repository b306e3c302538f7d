//! `tessera requests | approve | deny | revoke | audit | delegate` against the real
//! keyserver, in-process on 127.0.0.1:0 with a generated development PKI in
//! a dev directory (`DIR/pki`, `DIR/endpoints.toml`), run through the built
//! `tessera` binary as different identities.

use crate::common::*;
use tessera_proto::keyserver::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_lists_approves_denies_revokes_and_verifies_the_audit() {
    let stack = Stack::start().await;
    // The gateway registers a study for the owner; a clinician asks for its key.
    let study = register(&stack).await;
    let rq = request_as(&stack, "clinician", &study).await;

    let table = ok(&stack.tessera(Some("owner"), &["requests"]).await);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("REQUEST") && header.contains("STATE"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.contains(&rq))
        .expect("request listed");
    assert!(
        row.contains("user/clinician") && row.contains("pending"),
        "{row}"
    );
    assert!(row.contains("second opinion"), "{row}");
    let listed = json(
        &stack
            .tessera(Some("owner"), &["requests", "--study", &study, "--json"])
            .await,
    );
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["request_id"], rq.as_str());
    assert_eq!(listed[0]["state"], "pending");
    assert_eq!(
        listed[0]["requester"],
        "spiffe://tessera.local/user/clinician"
    );

    // Not the owner: refused, non-zero exit, plain words.
    let err = failed(&stack.tessera(Some("clinician"), &["approve", &rq]).await);
    assert!(err.contains("approve: refused:"), "{err}");
    let err = failed(&stack.tessera(Some("clinician"), &["requests"]).await);
    assert!(err.contains("refused"), "{err}");
    // Bad input is refused before or by the server with a clear message.
    let err = failed(
        &stack
            .tessera(Some("owner"), &["approve", &rq, "--ttl", "5x"])
            .await,
    );
    assert!(err.contains("unknown unit"), "{err}");
    let err = failed(&stack.tessera(Some("owner"), &["approve", "rq-1"]).await);
    assert!(err.contains("approve: invalid:"), "{err}");
    let err = failed(
        &stack
            .tessera(Some("owner"), &["approve", &rq, "--uses", "1000000000"])
            .await,
    );
    assert!(err.contains("invalid") && err.contains("uses"), "{err}");

    let out = ok(&stack
        .tessera(
            Some("owner"),
            &["approve", &rq, "--ttl", "10m", "--uses", "2"],
        )
        .await);
    assert!(out.starts_with(&format!("approved {rq}")), "{out}");
    assert!(out.contains("2/2"), "{out}");
    let err = failed(&stack.tessera(Some("owner"), &["approve", &rq]).await);
    assert!(err.contains("not possible now"), "{err}");

    // The grant works for the clinician.
    let released = stack
        .client("clinician")
        .await
        .fetch_key(pb::FetchKeyRequest {
            request_id: rq.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.uses_left, 1);

    let pending = ok(&stack.tessera(Some("owner"), &["requests"]).await);
    assert_eq!(pending.trim(), "no pending requests");
    let all = json(
        &stack
            .tessera(Some("owner"), &["requests", "--all", "--json"])
            .await,
    );
    assert_eq!(all[0]["state"], "approved");
    assert_eq!(all[0]["uses_left"], 1);
    assert_eq!(all[0]["uses_granted"], 2);
    assert_eq!(all[0]["decided_by"], OWNER);

    // Deny a second request, revoke the grant.
    let rq2 = request_as(&stack, "clinician2", &study).await;
    let denied = json(
        &stack
            .tessera(
                Some("owner"),
                &["deny", &rq2, "--reason", "not on the team", "--json"],
            )
            .await,
    );
    assert_eq!(denied["state"], "denied");
    assert_eq!(denied["reason"], "not on the team");
    let out = ok(&stack
        .tessera(Some("owner"), &["revoke", &rq, "--reason", "done"])
        .await);
    assert!(
        out.contains("revoked") && out.contains("reason: done"),
        "{out}"
    );
    let err = failed(&stack.tessera(Some("owner"), &["revoke", &rq]).await);
    assert!(err.contains("revoke: not possible now"), "{err}");

    // The audit log.
    let out = ok(&stack.tessera(Some("owner"), &["audit", "--verify"]).await);
    assert!(out.starts_with("audit log OK"), "{out}");
    let v = json(
        &stack
            .tessera(Some("owner"), &["audit", "--verify", "--json"])
            .await,
    );
    assert_eq!(v["ok"], true);
    let entries = v["entries"].as_u64().unwrap();
    assert!(entries >= 7, "{v}");
    assert!(v["checkpoints_verified"].as_u64().unwrap() >= 2, "{v}");
    let log = json(
        &stack
            .tessera(Some("owner"), &["audit", "--json", "--limit", "1000"])
            .await,
    );
    let log = log.as_array().unwrap();
    assert_eq!(log.len() as u64, entries);
    for ev in [
        "study.registered",
        "key.requested",
        "grant.approved",
        "key.released",
        "request.denied",
        "grant.revoked",
    ] {
        assert!(log.iter().any(|e| e["event"] == ev), "{ev} missing");
    }
    let page = json(
        &stack
            .tessera(
                Some("owner"),
                &["audit", "--from", "2", "--limit", "2", "--json"],
            )
            .await,
    );
    let seqs: Vec<u64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3]);
    let table = ok(&stack
        .tessera(Some("owner"), &["audit", "--limit", "3"])
        .await);
    assert!(
        table.contains("EVENT") && table.contains("--from 4"),
        "{table}"
    );
    assert!(!table.contains("P-77"), "no patient data in the log");
    let err = failed(
        &stack
            .tessera(Some("clinician"), &["audit", "--verify"])
            .await,
    );
    assert!(err.contains("verify audit: refused"), "{err}");
    let err = failed(
        &stack
            .tessera(Some("owner"), &["audit", "--limit", "5000"])
            .await,
    );
    assert!(err.contains("5000"), "{err}");

    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_options_and_their_errors() {
    let stack = Stack::start().await;
    let pki = stack.pki();
    let dir = stack.dir();

    // TESSERA_DIR and TESSERA_AS stand in for --dir and --as.
    let out = run(
        vec!["requests".into()],
        vec![
            ("TESSERA_DIR".into(), p(&dir).into()),
            ("TESSERA_AS".into(), "owner".into()),
        ],
    )
    .await;
    assert_eq!(ok(&out).trim(), "no pending requests");

    // Explicit files and address, with a directory that has neither.
    let empty = stack.tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = run(
        vec![
            "requests".into(),
            "--dir".into(),
            p(&empty).into(),
            "--cert".into(),
            p(&pki.join("owner.crt")).into(),
            "--key".into(),
            p(&pki.join("owner.key")).into(),
            "--ca".into(),
            p(&pki.join("ca.crt")).into(),
            "--keyserver".into(),
            stack.addr.clone(),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(ok(&out).trim(), "no pending requests");

    // No identity.
    let err = failed(&stack.tessera(None, &["requests"]).await);
    assert!(err.contains("--as NAME"), "{err}");
    // An --as name that is not a plain name.
    let err = failed(&stack.tessera(Some("../ca"), &["requests"]).await);
    assert!(err.contains("--as"), "{err}");
    // An identity with no files.
    let err = failed(&stack.tessera(Some("nobody"), &["requests"]).await);
    assert!(
        err.contains("nobody.crt") && err.contains("not found"),
        "{err}"
    );
    // No endpoints.toml.
    let err = failed(
        &run(
            vec![
                "requests".into(),
                "--dir".into(),
                p(&empty).into(),
                "--as".into(),
                "owner".into(),
            ],
            Vec::new(),
        )
        .await,
    );
    assert!(err.contains("tessera dev up"), "{err}");
    // A keyserver that is not there.
    let err = failed(
        &stack
            .tessera(Some("owner"), &["requests", "--keyserver", "127.0.0.1:1"])
            .await,
    );
    assert!(
        err.contains("cannot reach the keyserver at 127.0.0.1:1"),
        "{err}"
    );
    // A certificate from another CA is refused by the TLS handshake.
    let foreign = stack.tmp.path().join("foreign");
    tessera_pki::generate(&foreign).unwrap();
    let err = failed(
        &stack
            .tessera(
                None,
                &[
                    "requests",
                    "--cert",
                    p(&foreign.join("owner.crt")),
                    "--key",
                    p(&foreign.join("owner.key")),
                    "--ca",
                    p(&pki.join("ca.crt")),
                ],
            )
            .await,
    );
    assert!(!err.is_empty());

    // The server at the keyserver address must be the keyserver: expecting
    // anyone else there (as if a storage node had its address) is refused
    // by our side of the handshake, naming both identities.
    let err = failed(
        &stack
            .tessera(
                Some("owner"),
                &[
                    "requests",
                    "--keyserver-identity",
                    "spiffe://tessera.local/service/storage-1",
                ],
            )
            .await,
    );
    assert!(
        err.contains(
            "expected spiffe://tessera.local/service/storage-1, \
             the server presented spiffe://tessera.local/service/keyserver"
        ),
        "{err}"
    );
    let err = failed(
        &stack
            .tessera(
                Some("owner"),
                &["requests", "--keyserver-identity", "keyserver"],
            )
            .await,
    );
    assert!(err.contains("--keyserver-identity"), "{err}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_adds_lists_and_removes_delegates_by_short_name() {
    let stack = Stack::start().await;
    let clin = "spiffe://tessera.local/user/clinician";
    let out = ok(&stack
        .tessera(Some("owner"), &["delegate", "add", "clinician"])
        .await);
    assert!(out.contains("user/clinician"), "{out}");
    let list = json(
        &stack
            .tessera(Some("owner"), &["delegate", "list", "--json"])
            .await,
    );
    assert_eq!(list, serde_json::json!([clin]));
    let mut gateway = stack.client("gateway").await;
    let check = |delegate: &str| pb::CheckDelegateRequest {
        owner: OWNER.into(),
        delegate: delegate.into(),
    };
    assert!(
        gateway
            .check_delegate(check(clin))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    let err = failed(
        &stack
            .tessera(Some("owner"), &["delegate", "add", "clinician"])
            .await,
    );
    assert!(err.contains("add delegate"), "{err}");
    let err = failed(
        &stack
            .tessera(Some("clinician"), &["delegate", "add", "clinician2"])
            .await,
    );
    assert!(err.contains("refused"), "{err}");
    ok(&stack
        .tessera(Some("owner"), &["delegate", "remove", "clinician"])
        .await);
    let out = ok(&stack.tessera(Some("owner"), &["delegate", "list"]).await);
    assert!(out.contains("no delegates"), "{out}");
    assert!(
        !gateway
            .check_delegate(check(clin))
            .await
            .unwrap()
            .into_inner()
            .allowed
    );
    stack.stop().await;
}

/// More pending requests than one 64 KiB message holds (the issue failed
/// at 375): `tessera requests` follows every page and lists all 400, each
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_lists_every_page_past_the_message_limit() {
    let stack = Stack::start().await;
    let study = register(&stack).await;
    let mut want = Vec::new();
    for _ in 0..400 {
        want.push(request_as(&stack, "clinician", &study).await);
    }
    // One page of all of them would not fit in a message.
    let one_page = stack
        .client("owner")
        .await
        .list_requests(pb::ListRequestsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(one_page.requests.len() < 400 && !one_page.next_page_token.is_empty());

    let listed = json(&stack.tessera(Some("owner"), &["requests", "--json"]).await);
    let mut got: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), 400);
    got.sort();
    got.dedup();
    want.sort();
    assert_eq!(got, want);

    // The audit log of those 400 requests is more than one 64 KiB page
    // too: `tessera audit --limit 1000` follows the pages to the end.
    let audit = json(
        &stack
            .tessera(Some("owner"), &["audit", "--json", "--limit", "1000"])
            .await,
    );
    let seqs: Vec<u64> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    let requested = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "key.requested")
        .count();
    assert_eq!(requested, 400, "every key.requested entry listed");
    let one_page = stack
        .client("owner")
        .await
        .list_audit(pb::ListAuditRequest {
            from_seq: 1,
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(one_page.entries.len() < seqs.len() && one_page.next_from_seq != 0);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, none twice");
    stack.stop().await;
}
