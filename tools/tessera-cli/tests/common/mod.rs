//! The shared kit of the keyserver CLI tests: a dev directory with a
//! generated PKI, the real keyserver in-process and endpoints.toml, and
//! helpers to run the built `tessera` binary as different identities.

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

pub const OWNER: &str = "spiffe://tessera.local/user/owner";

pub struct Stack {
    pub tmp: tempfile::TempDir,
    pub addr: String,
    pub running: Option<RunningApp>,
}

impl Stack {
    /// A dev directory with a PKI, a keyserver and endpoints.toml.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Like [`Stack::start`] with more keyserver config appended (`{pki}`
    /// stands for the PKI directory).
    pub async fn start_with(extra: &str) -> Self {
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
             [keyserver.access]\nemergency = [\"spiffe://tessera.local/user/clinician\"]\n{}",
            tmp.path().join("ks.redb").display(),
            kek.display(),
            extra.replace("{pki}", &d.to_string()),
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

    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("dev")
    }

    pub fn pki(&self) -> PathBuf {
        self.dir().join("pki")
    }

    pub async fn client(&self, name: &str) -> KeyServerClient<Channel> {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki(), name)).unwrap();
        KeyServerClient::new(tls.connect(&self.addr).await.unwrap())
    }

    /// Runs `tessera ARGS --dir DIR` (plus `--as NAME` when given) with no
    /// TESSERA_* variables inherited.
    pub async fn tessera(&self, who: Option<&str>, args: &[&str]) -> Output {
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        full.extend(["--dir".into(), p(&self.dir()).into()]);
        if let Some(w) = who {
            full.extend(["--as".into(), w.into()]);
        }
        run(full, Vec::new()).await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }
}

pub async fn run(args: Vec<String>, env: Vec<(String, String)>) -> Output {
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

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

pub fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tessera failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The command failed; returns its stderr.
pub fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tessera succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("valid JSON on stdout")
}

pub fn attrs() -> Vec<pb::Attribute> {
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

pub async fn request_as(stack: &Stack, who: &str, study: &str) -> String {
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

pub async fn break_glass_as(stack: &Stack, study: &str, who: &str) -> Output {
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

pub async fn register(stack: &Stack) -> String {
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
