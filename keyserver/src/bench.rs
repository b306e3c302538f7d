//! `bench_derive`: key derivations per second over mutual-TLS gRPC from many
//! concurrent clients, every one durably audited, beside the in-process rate
//! of the same core (so the ratio shows what gRPC + TLS cost). Request
//! loops are bounded by count; everything runs on 127.0.0.1.

use std::sync::Arc;
use std::time::Instant;

use tessera_proto::keyserver::v1 as pb;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_runtime::{ConfigSource, load_config};
use tessera_tls::{ClientTls, Identity, TlsFiles, USER_KIND};

use crate::app::App;
use crate::config::{Config, ENV_PREFIX};
use crate::core::{Core, Operation};

/// Boxed error for the bench (it spans PKI, TLS, config and core).
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// What to run.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Concurrent clients (one mTLS connection each) and in-process tasks.
    pub clients: usize,
    /// Derivations per phase, split evenly over the clients.
    pub requests: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            clients: 64,
            requests: 20_000,
        }
    }
}

fn attrs() -> Vec<(String, String)> {
    vec![
        ("patient_id".into(), "BENCH-0001".into()),
        ("birth_date".into(), "19700101".into()),
    ]
}

/// Runs both phases in a temporary directory and returns a printable report.
pub async fn bench_derive(opts: BenchOptions) -> Result<String, BenchError> {
    let clients = opts.clients.max(1);
    let per_client = (opts.requests / clients).max(1);
    let total = per_client * clients;

    let tmp = tempfile::tempdir()?;
    let pki = tessera_pki::generate(&tmp.path().join("pki"))?;
    let kek = tmp.path().join("kek");
    std::fs::write(
        &kek,
        hex::encode(crate::core::crypto::random_secret(
            &ring::rand::SystemRandom::new(),
        )?),
    )?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600))?;
    }
    let d = pki.dir.display();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nmax_concurrent_streams = 1024\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/keyserver.crt\"\nkey = \"{d}/keyserver.key\"\n[keyserver]\ndb_path = \"{}\"\nkek_file = \"{}\"\n",
        tmp.path().join("ks.redb").display(),
        kek.display()
    );
    let cfg: Config = load_config(
        &ConfigSource::from_text(&text, Default::default()),
        ENV_PREFIX,
    )?;
    let running = App::build(&cfg)?.spawn().await?;
    let addr = running.local_addr().to_string();
    let core = running.core().clone();

    // The identities of the configured trust domain (the default one here).
    let td = &cfg.server.access.trust_domain;
    let gateway = cfg.keyserver.gateway(td);
    let owner = Identity::format_uri(td, USER_KIND, "owner");
    let study = core
        .register_study(&gateway, &owner, &attrs(), None)
        .await?;
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway"))?;
    let request = pb::DeriveKeyRequest {
        study_id: study.id.clone(),
        attributes: attrs()
            .into_iter()
            .map(|(name, value)| pb::Attribute { name, value })
            .collect(),
        purpose: "dicom-pixels".into(),
        operation: pb::Operation::Protect.into(),
    };
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = KeyServerClient::new(tls.connect(&addr).await?);
        // Warm-up: TLS handshake and HTTP/2 setup happen outside the timing.
        c.derive_key(request.clone()).await?;
        conns.push(c);
    }
    let (b0, j0) = core.writer_stats();

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for mut c in conns {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_client {
                c.derive_key(request.clone()).await?;
            }
            Ok::<(), tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let grpc_secs = start.elapsed().as_secs_f64();
    let (b1, j1) = core.writer_stats();

    let inproc_secs = in_process(&core, &gateway, &study.id, clients, per_client).await?;
    let (b2, j2) = core.writer_stats();

    let report = core.verify_audit()?;
    running.shutdown(std::time::Duration::from_secs(5)).await;

    let grpc_rate = total as f64 / grpc_secs;
    let inproc_rate = total as f64 / inproc_secs;
    let batch = |b: u64, j: u64| if b == 0 { 0.0 } else { j as f64 / b as f64 };
    Ok(format!(
        "keyserver: study-key derivations (HKDF-SHA256 + attribute commitment check), each durably audited (group commit to redb)\n\
         \x20 gRPC over mTLS, {clients} clients: {total} in {grpc_secs:.2} s = {grpc_rate:.0}/s (mean audit batch {:.1})\n\
         \x20 in-process core, {clients} tasks:  {total} in {inproc_secs:.2} s = {inproc_rate:.0}/s (mean audit batch {:.1})\n\
         \x20 ratio gRPC / in-process: {:.2}\n\
         \x20 audit log: {} entries, chain {}, {} signed checkpoints verified",
        batch(b1 - b0, j1 - j0),
        batch(b2 - b1, j2 - j1),
        grpc_rate / inproc_rate,
        report.entries,
        if report.ok { "verified ok" } else { "BROKEN" },
        report.checkpoints_verified,
    ))
}

async fn in_process(
    core: &Core,
    gateway: &str,
    study_id: &str,
    clients: usize,
    per_client: usize,
) -> Result<f64, BenchError> {
    let study_id: Arc<str> = Arc::from(study_id);
    let gateway: Arc<str> = Arc::from(gateway);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let core = core.clone();
        let study_id = study_id.clone();
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            let a = attrs();
            for _ in 0..per_client {
                core.derive_key(&gateway, &study_id, &a, "dicom-pixels", Operation::Protect)
                    .await?;
            }
            Ok::<(), crate::KeyServerError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}
