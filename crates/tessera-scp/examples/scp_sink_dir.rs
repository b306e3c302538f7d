//! A C-STORE SCP writing each received instance to a directory.
//!
//! ```text
//! cargo run -p tessera-scp --example scp_sink_dir -- \
//!     --out /tmp/received --listen 127.0.0.1:0 --ae TESSERA --allow MODALITY
//! ```
//!
//! Prints `listening=ADDR`, then serves until Ctrl-C (or SIGTERM). Files are
//! named `<SOP Instance UID>.dcm`. Logs go to stderr (RUST_LOG, default info).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tessera_scp::{InstanceSink, Received, Scp, ScpConfig, StoreOutcome};

struct DirSink {
    dir: PathBuf,
}

impl InstanceSink for DirSink {
    async fn store(&self, received: Received) -> StoreOutcome {
        // The SCP hands over only syntactically valid UIDs (digits and dots),
        // so the name stays inside the directory.
        let name = format!("{}.dcm", received.sop_instance_uid);
        let tmp = self.dir.join(format!(".{name}.part"));
        let path = self.dir.join(&name);
        let written = async {
            tokio::fs::write(&tmp, &received.file).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        match written {
            Ok(()) => {
                println!(
                    "stored={} from={} ts={} bytes={}",
                    path.display(),
                    received.calling_ae,
                    received.transfer_syntax,
                    received.file.len()
                );
                StoreOutcome::Stored
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                StoreOutcome::Refused {
                    status: 0xA700,
                    reason: format!("cannot write: {e}"),
                }
            }
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: scp_sink_dir --out DIR [--listen ADDR] [--ae AE] --allow CALLING_AE [--allow ...] \
         [--max-instance-bytes N] [--max-associations N] [--idle-timeout-secs N]"
    );
    std::process::exit(2)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let mut cfg = ScpConfig::default();
    let mut listen: SocketAddr = "127.0.0.1:11112".parse()?;
    let mut out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--out" => out = Some(value.into()),
            "--listen" => listen = value.parse()?,
            "--ae" => cfg.ae_title = value,
            "--allow" => cfg.allowed_calling_aes.push(value),
            "--max-instance-bytes" => cfg.max_instance_bytes = value.parse()?,
            "--max-associations" => cfg.max_associations = value.parse()?,
            "--idle-timeout-secs" => cfg.idle_timeout = Duration::from_secs(value.parse()?),
            _ => usage(),
        }
    }
    let Some(dir) = out else { usage() };
    if cfg.allowed_calling_aes.is_empty() {
        usage();
    }
    std::fs::create_dir_all(&dir)?;

    let scp = Scp::bind(listen, cfg).await?;
    println!("listening={}", scp.local_addr());
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    scp.serve(Arc::new(DirSink { dir }), shutdown).await?;
    Ok(())
}
