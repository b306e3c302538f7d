//! Crash safety and file modes: a real process, killed with SIGKILL
//! mid-stream; a loose TLS key refused, the database owner-only.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::*;
use sha2::{Digest, Sha256};
use tessera_proto::storage::v1 as pb;
use tessera_storage_client::{client, get_object, put_object};

/// Acknowledged puts: (object id, SHA-256).
type Acked = Vec<(String, [u8; 32])>;

struct Proc {
    child: Child,
    addr: String,
}

fn start_process(config: &Path) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_storage-node"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    Proc { child, addr }
}

/// The node refuses to start (exit 64, a message naming the setting) when
/// its TLS private key is readable by group or others, and the database it
/// creates is owner-only (also when an earlier version left it 0644).
#[cfg(unix)]
#[tokio::test]
async fn loose_key_is_refused_and_the_database_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let config_path: PathBuf = env.path().join("node.toml");
    std::fs::write(&config_path, env.config_toml("127.0.0.1:0", "")).unwrap();
    let key = env.pki.key_path("storage-1");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_storage-node"))
        .arg("--config")
        .arg(&config_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("server.tls.key") && stderr.contains("0644"),
        "{stderr}"
    );
    let db = env.path().join("data").join("objects.redb");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = env.start().await;
    let mode = std::fs::metadata(&db).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "objects.redb is owner-only");
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_puts_loses_no_acknowledged_object() {
    let env = Env::new();
    let config_path: PathBuf = env.path().join("node.toml");
    std::fs::write(&config_path, env.config_toml("127.0.0.1:0", "")).unwrap();
    let tls = env.tls("gateway");
    let acked: Arc<Mutex<Acked>> = Arc::default();

    for round in 0..2u64 {
        let mut proc = tokio::task::spawn_blocking({
            let p = config_path.clone();
            move || start_process(&p)
        })
        .await
        .unwrap();
        let channel = tls.connect(&proc.addr).await.unwrap();
        // Two writers stream puts until the node dies.
        let (enough_tx, mut enough_rx) = tokio::sync::mpsc::channel::<()>(64);
        let mut writers = Vec::new();
        for w in 0..2u64 {
            let mut c = client(channel.clone());
            let acked = acked.clone();
            let enough_tx = enough_tx.clone();
            writers.push(tokio::spawn(async move {
                for i in 0u64.. {
                    let id = format!("r{round}-w{w}-{i:05}");
                    let body = data(
                        20_000 + ((i * 7919) % 200_000) as usize,
                        round * 1000 + w * 100 + i,
                    );
                    match put_object(&mut c, &id, &body).await {
                        Ok(_) => {
                            acked
                                .lock()
                                .unwrap()
                                .push((id, Sha256::digest(&body).into()));
                            let _ = enough_tx.try_send(());
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        drop(enough_tx);
        // Let at least 15 puts be acknowledged in this round, then SIGKILL
        // while the writers are still streaming.
        for _ in 0..15 {
            enough_rx.recv().await.unwrap();
        }
        proc.child.kill().unwrap();
        proc.child.wait().unwrap();
        for w in writers {
            w.await.unwrap();
        }
    }

    // Restart: every acknowledged object is there and intact, and every
    // object that is there (including any in flight at the kill) is intact.
    let mut proc = tokio::task::spawn_blocking({
        let p = config_path.clone();
        move || start_process(&p)
    })
    .await
    .unwrap();
    let mut c = client(tls.connect(&proc.addr).await.unwrap());
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 30);
    for (id, digest) in &acked {
        let (info, bytes) = get_object(&mut c, id)
            .await
            .unwrap_or_else(|e| panic!("acknowledged {id} lost: {e:?}"));
        assert_eq!(info.sha256, digest.to_vec(), "{id}");
        assert_eq!(Sha256::digest(&bytes)[..], digest[..], "{id}");
    }
    let mut start_after = String::new();
    let mut listed = 0;
    loop {
        let page = c
            .list(pb::ListRequest {
                prefix: String::new(),
                start_after: start_after.clone(),
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for o in &page.objects {
            get_object(&mut c, &o.object_id).await.unwrap();
            listed += 1;
        }
        if page.next_start_after.is_empty() {
            break;
        }
        start_after = page.next_start_after;
    }
    assert!(listed >= acked.len());
    let info = c
        .node_info(pb::NodeInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.object_count, listed as u64,
        "counters match the objects"
    );
    proc.child.kill().unwrap();
    proc.child.wait().unwrap();
}
