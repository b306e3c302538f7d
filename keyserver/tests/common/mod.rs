//! The shared test kit: the real keyserver in-process on 127.0.0.1:0
//! with a generated development PKI, a client per identity, and helpers to
//! read the audit log and run the `keyserver` binary.

use std::path::PathBuf;
use std::sync::Arc;

use keyserver::config::{Config, ENV_PREFIX};
use keyserver::core::clock::ManualClock;
use keyserver::{App, RunningApp};
use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_runtime::{ConfigSource, load_config};
use tessera_tls::Channel;
use tessera_tls::{ClientTls, TlsFiles};
use tonic::Code;

pub const OWNER: &str = "spiffe://tessera.local/user/owner";
pub const CLIN: &str = "spiffe://tessera.local/user/clinician";

/// Where a test keyserver keeps its state: every test written over a
/// `Backend` runs on both (see [`on_both_backends!`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A redb file in the test's folder.
    Redb,
    /// A real PostgreSQL server of the test's own (tessera-testkit).
    Postgres,
}

/// Runs each named `async fn name(backend: Backend)` as two tests,
/// `name::redb` and `name::pg`: one test body, both storage backends.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn redb() {
                super::$name($crate::common::Backend::Redb).await
            }
            #[tokio::test]
            async fn pg() {
                super::$name($crate::common::Backend::Postgres).await
            }
        }
    )*};
}

pub struct Env {
    /// The PostgreSQL server (backend `Postgres`), kept running while the
    /// keyserver uses it and stopped on drop.
    _pg: Option<Arc<tessera_testkit::postgres::Postgres>>,
    _tmp: tempfile::TempDir,
    pub pki: PathBuf,
    pub addr: String,
    pub clock: Arc<ManualClock>,
    pub cfg: Config,
    /// The same config as a file, for the `keyserver` binary.
    pub config_file: PathBuf,
    pub running: Option<RunningApp>,
}

impl Env {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// [`Env::start`] on `backend`.
    pub async fn start_on(backend: Backend) -> Self {
        Self::start_with_on(backend, "").await
    }

    /// Like [`Env::start`] with more config appended (`{pki}` stands for
    /// the development PKI's directory).
    pub async fn start_with(extra: &str) -> Self {
        Self::start_with_on(Backend::Redb, extra).await
    }

    /// [`Env::start_with`] on `backend`.
    pub async fn start_with_on(backend: Backend, extra: &str) -> Self {
        let pg = match backend {
            Backend::Redb => None,
            Backend::Postgres => Some(Arc::new(tessera_testkit::postgres::Postgres::start())),
        };
        Self::start_on_store(pg, "ks", extra).await
    }

    /// A keyserver on database `db` of `pg` (a replica beside others on
    /// the same database), or on a redb file when `pg` is `None`.
    pub async fn start_on_store(
        pg: Option<Arc<tessera_testkit::postgres::Postgres>>,
        db: &str,
        extra: &str,
    ) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let store = match &pg {
            None => format!("db_path = \"{}\"\n", tmp.path().join("ks.redb").display()),
            Some(pg) => {
                let url = if pg
                    .psql(
                        "postgres",
                        &format!("SELECT 1 FROM pg_database WHERE datname = '{db}'"),
                    )
                    .trim()
                    .is_empty()
                {
                    pg.create_db(db)
                } else {
                    pg.url(db)
                };
                let url_file = tmp.path().join("pg.url");
                std::fs::write(&url_file, url).unwrap();
                format!(
                    "[keyserver.store]\nbackend = \"postgres\"\npostgres_url_file = \"{}\"\n",
                    url_file.display()
                )
            }
        };
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
             [keyserver]\nkek_file = \"{}\"\ncheckpoint_every = 4\nmax_grant_ttl_secs = 3600\nmax_grant_uses = 5\n{}\
             [keyserver.access]\nemergency = [\"spiffe://tessera.local/user/clinician\"]\nbreak_glass_minutes = 10\nbreak_glass_uses = 2\nexpiring_soon_secs = 600\n\
             [keyserver.access.groups]\n\"care-team-x\" = [\"spiffe://tessera.local/user/clinician\"]\n{}",
            kek.display(),
            store,
            extra.replace("{pki}", &d.to_string()),
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
            _pg: pg,
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
    pub async fn halt(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }

    /// Starts the keyserver again on the same database.
    pub async fn resume(&mut self) {
        let running = App::build_with_clock(&self.cfg, self.clock.clone())
            .unwrap()
            .spawn()
            .await
            .unwrap();
        self.addr = running.local_addr().to_string();
        self.running = Some(running);
    }

    pub async fn client(&self, name: &str) -> KeyServerClient<Channel> {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&self.pki, name)).unwrap();
        KeyServerClient::new(tls.connect(&self.addr).await.unwrap())
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(std::time::Duration::from_secs(5)).await;
        }
    }
}

pub fn attrs(patient: &str) -> Vec<pb::Attribute> {
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

pub async fn register(env: &Env, patient: &str) -> String {
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

pub fn request(study: &str, patient: &str) -> pb::RequestKeyRequest {
    pb::RequestKeyRequest {
        study_id: study.into(),
        attributes: attrs(patient),
        purpose: "pixels".into(),
        justification: "tumour board".into(),
        on_behalf_of: String::new(),
        access_purpose: String::new(),
    }
}

/// `who` files a key request for `patient`'s `study` on `env`.
pub async fn file_request(env: &Env, who: &str, study: &str, patient: &str) -> pb::KeyRequest {
    env.client(who)
        .await
        .request_key(request(study, patient))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap()
}

/// `who`'s live feed on `env` (as the studies' owner, or as requester).
pub async fn watch(env: &Env, who: &str, as_owner: bool) -> tonic::Streaming<pb::RequestEvent> {
    env.client(who)
        .await
        .watch_requests(pb::WatchRequestsRequest { as_owner })
        .await
        .unwrap()
        .into_inner()
}

/// Every audit entry, read by an admin page by page.
pub async fn all_audit(env: &Env) -> Vec<pb::AuditEntry> {
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
pub async fn refused_and_audited<F, T>(
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

/// Runs the real `keyserver` binary; (exit code, stdout, stderr).
pub fn keyserver_cli(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
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

pub async fn derive(env: &Env, study: &str, patient: &str) -> Result<Vec<u8>, tonic::Status> {
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

pub fn json_field(line: &str, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    v[name].as_u64().unwrap()
}
