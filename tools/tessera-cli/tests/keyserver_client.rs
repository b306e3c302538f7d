//! `tessera requests | approve | deny | revoke | audit | delegate` against the real
//! keyserver, in-process on 127.0.0.1:0 with a generated development PKI in
//! a dev directory (`DIR/pki`, `DIR/endpoints.toml`), run through the built
//! `tessera` binary as different identities.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keyserver::config::{Config, ENV_PREFIX};
use keyserver::{App, RunningApp};
use tessera_devstack::Endpoints;
use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_runtime::{ConfigSource, load_config};
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsFiles};

const OWNER: &str = "spiffe://tessera.local/user/owner";

struct Stack {
    tmp: tempfile::TempDir,
    addr: String,
    running: Option<RunningApp>,
}

impl Stack {
    /// A dev directory with a PKI, a keyserver and endpoints.toml.
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev");
        let pki = tessera_pki::generate(&dir.join("pki")).unwrap().dir;
        let kek = tmp.path().join("kek");
        std::fs::write(&kek, [7u8; 32]).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let d = pki.display();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/keyserver.crt\"\nkey = \"{d}/keyserver.key\"\n\
             [server.access]\nroles = {{ \"{OWNER}\" = [\"owner\", \"admin\"] }}\n\
             [keyserver]\ndb_path = \"{}\"\nkek_file = \"{}\"\ncheckpoint_every = 3\n\
             [keyserver.access]\nemergency = [\"spiffe://tessera.local/user/clinician\"]\n",
            tmp.path().join("ks.redb").display(),
            kek.display()
        );
        let cfg: Config = load_config(
            &ConfigSource::from_text(&text, Default::default()),
            ENV_PREFIX,
        )
        .unwrap();
        let running = App::build(&cfg).unwrap().spawn().await.unwrap();
        let addr = running.local_addr().to_string();
        let mut endpoints = Endpoints::default();
        endpoints.endpoints.insert("keyserver".into(), addr.clone());
        endpoints.save(&dir).unwrap();
        Self {
            tmp,
            addr,
            running: Some(running),
        }
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().join("dev")
    }

    fn pki(&self) -> PathBuf {
        self.dir().join("pki")
    }

    async fn client(&self, name: &str) -> KeyServerClient<Channel> {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki(), name)).unwrap();
        KeyServerClient::new(tls.connect(&self.addr).await.unwrap())
    }

    /// Runs `tessera ARGS --dir DIR` (plus `--as NAME` when given) with no
    /// TESSERA_* variables inherited.
    async fn tessera(&self, who: Option<&str>, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend(["--dir".into(), p(&self.dir()).into()]);
        if let Some(w) = who {
            full.extend(["--as".into(), w.into()]);
        }
        run(full, Vec::new()).await
    }

    async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }
}

async fn run(args: Vec<String>, env: Vec<(String, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
        for v in [
            "TESSERA_DIR",
            "TESSERA_AS",
            "TESSERA_KEYSERVER",
            "TESSERA_GATEWAY",
            "TESSERA_KEYSERVER_IDENTITY",
            "TESSERA_GATEWAY_IDENTITY",
        ] {
            c.env_remove(v);
        }
        c.args(&args).envs(env).output().expect("run tessera")
    })
    .await
    .unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tessera failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The command failed; returns its stderr.
fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tessera succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("valid JSON on stdout")
}

fn attrs() -> Vec<pb::Attribute> {
    vec![
        pb::Attribute {
            name: "patient_id".into(),
            value: "P-77".into(),
        },
        pb::Attribute {
            name: "birth_date".into(),
            value: "19800101".into(),
        },
    ]
}

async fn request_as(stack: &Stack, who: &str, study: &str) -> String {
    stack
        .client(who)
        .await
        .request_key(pb::RequestKeyRequest {
            study_id: study.into(),
            attributes: attrs(),
            purpose: "pixels".into(),
            justification: "second opinion".into(),
            on_behalf_of: String::new(),
            access_purpose: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap()
        .request_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_lists_approves_denies_revokes_and_verifies_the_audit() {
    let stack = Stack::start().await;
    // The gateway registers a study for the owner; a clinician asks for its key.
    let study = stack
        .client("gateway")
        .await
        .register_study(pb::RegisterStudyRequest {
            owner: OWNER.into(),
            attributes: attrs(),
            study_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .study_id;
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

async fn break_glass_as(stack: &Stack, study: &str, who: &str) -> Output {
    stack
        .tessera(
            Some(who),
            &[
                "break-glass",
                study,
                "--reason",
                "arrest in ward 4",
                "--attr",
                "patient_id=P-77",
                "--attr",
                "birth_date=19800101",
                "--json",
            ],
        )
        .await
}

async fn register(stack: &Stack) -> String {
    stack
        .client("gateway")
        .await
        .register_study(pb::RegisterStudyRequest {
            owner: OWNER.into(),
            attributes: attrs(),
            study_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .study_id
}

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
