//! Access that fits clinical work (issue 19) through the `tessera` binary:
//! standing approvals (`standing create|list|update|revoke`), grants,
//! break-glass and its review, the live feed (`requests --watch`, as owner
//! and `--mine` as requester), the owner's webhook (`webhook set|show|clear`).

use crate::common::*;
use tessera_proto::keyserver::v1 as pb;

#[tokio::test]
async fn standing_approvals_grants_break_glass_and_review_through_the_cli() {
    let stack = Stack::start().await;
    let study = register(&stack).await;
    // The owner approves the clinician in advance for treatment.
    let sa = json(
        &stack
            .tessera(
                Some("owner"),
                &[
                    "standing",
                    "create",
                    "--to",
                    "clinician",
                    "--purpose",
                    "treatment",
                    "--ttl",
                    "1d",
                    "--budget",
                    "3",
                    "--grant-uses",
                    "2",
                    "--json",
                ],
            )
            .await,
    );
    let sa_id = sa["approval_id"].as_str().unwrap().to_owned();
    assert_eq!(sa["budget_left"], 3);
    // A purpose outside the vocabulary is refused.
    let err = failed(
        &stack
            .tessera(
                Some("owner"),
                &[
                    "standing",
                    "create",
                    "--to",
                    "clinician",
                    "--purpose",
                    "gossip",
                ],
            )
            .await,
    );
    assert!(err.contains("create standing approval"), "{err}");
    // The owner watches; the clinician's request is approved at once.
    let watcher = {
        let args: Vec<String> = [
            "requests", "--watch", "--count", "1", "--json", "--as", "owner", "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([p(&stack.dir()).to_owned()])
        .collect();
        tokio::spawn(run(args, Vec::new()))
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = stack
        .client("clinician")
        .await
        .request_key(pb::RequestKeyRequest {
            study_id: study.clone(),
            attributes: attrs(),
            purpose: "pixels".into(),
            justification: "ward round".into(),
            on_behalf_of: String::new(),
            access_purpose: "treatment".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(r.standing_approval, sa_id);
    let seen = json(
        &tokio::time::timeout(std::time::Duration::from_secs(20), watcher)
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(seen["event"], "requested");
    assert_eq!(seen["request_id"], r.request_id.as_str());
    // `tessera grants`: the clinician's, with purpose, uses and expiry.
    let grants = json(
        &stack
            .tessera(Some("clinician"), &["grants", "--json"])
            .await,
    );
    assert_eq!(grants[0]["request_id"], r.request_id.as_str());
    assert_eq!(grants[0]["access_purpose"], "treatment");
    assert_eq!(grants[0]["uses_left"], 2);
    assert_eq!(grants[0]["valid"], true);
    let table = ok(&stack.tessera(Some("owner"), &["grants", "--owner"]).await);
    assert!(
        table.contains(&sa_id) && table.contains("treatment"),
        "{table}"
    );
    let list = ok(&stack.tessera(Some("owner"), &["standing", "list"]).await);
    assert!(list.contains(&sa_id) && list.contains("live"), "{list}");
    ok(&stack
        .tessera(Some("owner"), &["standing", "revoke", &sa_id])
        .await);
    let grants = json(
        &stack
            .tessera(Some("clinician"), &["grants", "--json"])
            .await,
    );
    assert_eq!(
        grants,
        serde_json::json!([]),
        "revoked approval: no valid grant"
    );

    // Break-glass: refused without the permission, open with it, reviewed.
    let err = failed(&break_glass_as(&stack, &study, "clinician2").await);
    assert!(err.contains("break glass"), "{err}");
    let opened = json(&break_glass_as(&stack, &study, "clinician").await);
    assert_eq!(opened["break_glass"], true);
    assert_eq!(opened["state"], "approved");
    let rid = opened["request_id"].as_str().unwrap().to_owned();
    let review = json(&stack.tessera(Some("owner"), &["review", "--json"]).await);
    assert_eq!(review[0]["request_id"], rid.as_str());
    assert_eq!(review[0]["break_glass_reason"], "arrest in ward 4");
    ok(&stack
        .tessera(Some("owner"), &["review", "--mark", &rid])
        .await);
    let out = ok(&stack.tessera(Some("owner"), &["review"]).await);
    assert!(out.contains("no break-glass uses to review"), "{out}");
    // Disabled by the owner: refused.
    ok(&stack
        .tessera(Some("owner"), &["break-glass-setting", "--disable"])
        .await);
    let err = failed(&break_glass_as(&stack, &study, "clinician").await);
    assert!(err.contains("disabled"), "{err}");
    stack.stop().await;
}

#[tokio::test]
async fn requester_watches_its_decisions_and_owner_updates_a_standing_approval() {
    let stack = Stack::start().await;
    let study = register(&stack).await;
    // `requests --watch --mine`: the clinician sees the owner's decision.
    let watcher = {
        let args: Vec<String> = [
            "requests",
            "--watch",
            "--mine",
            "--count",
            "1",
            "--json",
            "--as",
            "clinician",
            "--dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([p(&stack.dir()).to_owned()])
        .collect();
        tokio::spawn(run(args, Vec::new()))
    };
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let rid = request_as(&stack, "clinician", &study).await;
    ok(&stack
        .tessera(Some("owner"), &["approve", &rid, "--uses", "2"])
        .await);
    let seen = json(
        &tokio::time::timeout(std::time::Duration::from_secs(20), watcher)
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(seen["event"], "approved");
    assert_eq!(seen["request_id"], rid.as_str());
    assert_eq!(seen["uses_left"], 2);
    // --mine needs --watch.
    let err = failed(
        &stack
            .tessera(Some("clinician"), &["requests", "--mine"])
            .await,
    );
    assert!(err.contains("--watch"), "{err}");

    // `standing update`: a new budget, then none, then a new lifetime.
    let sa = json(
        &stack
            .tessera(
                Some("owner"),
                &[
                    "standing",
                    "create",
                    "--to",
                    "clinician",
                    "--purpose",
                    "research",
                    "--ttl",
                    "1h",
                    "--budget",
                    "1",
                    "--json",
                ],
            )
            .await,
    );
    let id = sa["approval_id"].as_str().unwrap().to_owned();
    let created_expiry = sa["expires_at_unix"].as_u64().unwrap();
    let up = json(
        &stack
            .tessera(
                Some("owner"),
                &["standing", "update", &id, "--budget", "5", "--json"],
            )
            .await,
    );
    assert_eq!(up["budget_left"], 5);
    assert_eq!(up["expires_at_unix"], created_expiry);
    let up = json(
        &stack
            .tessera(
                Some("owner"),
                &[
                    "standing",
                    "update",
                    &id,
                    "--no-budget",
                    "--ttl",
                    "3d",
                    "--json",
                ],
            )
            .await,
    );
    assert_eq!(up["budget_left"], serde_json::Value::Null);
    assert!(up["expires_at_unix"].as_u64().unwrap() >= created_expiry + 2 * 86_400);
    let human = ok(&stack
        .tessera(Some("owner"), &["standing", "update", &id, "--budget", "2"])
        .await);
    assert!(human.contains(&id), "{human}");
    // Nothing to change; both --budget and --no-budget; not the owner.
    let err = failed(
        &stack
            .tessera(Some("owner"), &["standing", "update", &id])
            .await,
    );
    assert!(err.contains("say what changes"), "{err}");
    let err = failed(
        &stack
            .tessera(
                Some("owner"),
                &["standing", "update", &id, "--budget", "2", "--no-budget"],
            )
            .await,
    );
    assert!(
        err.contains("--no-budget") || err.contains("--budget"),
        "{err}"
    );
    let err = failed(
        &stack
            .tessera(
                Some("clinician"),
                &["standing", "update", &id, "--budget", "9"],
            )
            .await,
    );
    assert!(err.contains("update standing approval"), "{err}");
    // The budget of 2 approves two research requests, then no more.
    for expected in ["approved", "approved", "pending"] {
        let r = stack
            .client("clinician")
            .await
            .request_key(pb::RequestKeyRequest {
                study_id: study.clone(),
                attributes: attrs(),
                purpose: "pixels".into(),
                justification: "cohort".into(),
                on_behalf_of: String::new(),
                access_purpose: "research".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .request
            .unwrap();
        let state = pb::RequestState::try_from(r.state).unwrap();
        assert_eq!(
            state.as_str_name().to_lowercase(),
            format!("request_state_{expected}")
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn owner_sets_shows_and_clears_its_webhook() {
    let stack = Stack::start_with("[keyserver.webhook]\nca_file = \"{pki}/ca.crt\"\n").await;
    let out = ok(&stack.tessera(Some("owner"), &["webhook", "show"]).await);
    assert!(out.contains("no webhook set"), "{out}");
    let err = failed(
        &stack
            .tessera(
                Some("owner"),
                &["webhook", "set", "http://127.0.0.1:9/hook"],
            )
            .await,
    );
    assert!(
        err.contains("set webhook") && err.contains("https://"),
        "{err}"
    );
    let url = "https://127.0.0.1:9/hook";
    let out = ok(&stack.tessera(Some("owner"), &["webhook", "set", url]).await);
    assert!(out.contains(url), "{out}");
    let shown = json(
        &stack
            .tessera(Some("owner"), &["webhook", "show", "--json"])
            .await,
    );
    assert_eq!(shown["webhook"], url);
    // Another identity sees only its own (and a clinician may not set one).
    let err = failed(
        &stack
            .tessera(Some("clinician"), &["webhook", "set", url])
            .await,
    );
    assert!(err.contains("set webhook"), "{err}");
    let out = ok(&stack.tessera(Some("owner"), &["webhook", "clear"]).await);
    assert!(out.contains("no webhook set"), "{out}");
    let shown = json(
        &stack
            .tessera(Some("owner"), &["webhook", "show", "--json"])
            .await,
    );
    assert_eq!(shown["webhook"], "");
    stack.stop().await;

    // A keyserver without [keyserver.webhook] says so.
    let plain = Stack::start().await;
    let err = failed(&plain.tessera(Some("owner"), &["webhook", "set", url]).await);
    assert!(err.contains("keyserver.webhook"), "{err}");
    plain.stop().await;
}
