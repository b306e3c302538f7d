//! `gateway --config FILE`: serve until SIGINT/SIGTERM. Prints
//! `listening=ADDR` once serving (the launcher and e2e scripts wait for it).
//!
//! ```text
//! gateway [--config FILE]                                     serve
//! gateway --config FILE vault-backup --out FILE               online vault snapshot (the gateway may run)
//! gateway --config FILE vault-restore --backup FILE [--force] check a backup, install it (gateway stopped)
//! ```
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gateway_service::config::{Config, ENV_PREFIX, VaultBackend, VaultSection};
use gateway_service::vault_backup::{self, VaultSnapshotReport};
use gateway_service::{App, AppError, RunningApp};
use tessera_runtime::{ConfigSource, EXIT_CONFIG, Service, Serving, StartError, load_config};

const SERVICE: Service<Config> = Service::new(
    "gateway",
    "Tessera gateway (CloudSec)",
    ENV_PREFIX,
    |c: &Config| &c.telemetry,
);

#[derive(Parser)]
#[command(name = "gateway", about = "Tessera gateway (CloudSec)", version)]
struct Cli {
    /// TOML config; `TESSERA_GATEWAY__SECTION__KEY` variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Online backup: one consistent snapshot of the vault named by
    /// --config (the gateway may be running) into a new 0600 file; every
    /// record checked to open under the vault key. Never overwrites.
    VaultBackup {
        /// The backup file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a vault backup (redb integrity, the vault key opens every
    /// record) and install it as `vault.path` (gateway stopped).
    VaultRestore {
        /// The backup file.
        #[arg(long)]
        backup: PathBuf,
        /// Replace a non-empty vault.
        #[arg(long)]
        force: bool,
    },
}

/// jemalloc, returning freed memory to the OS (decision 25).
#[global_allocator]
static ALLOC: tessera_runtime::memory::Allocator = tessera_runtime::memory::ALLOCATOR;

fn main() -> ExitCode {
    tessera_runtime::memory::start();
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::VaultBackup { out }) => snapshot(cli.config.as_deref(), |vault, key| {
            match vault.backend {
                VaultBackend::Redb => {
                    vault_backup::backup(&vault.path, &out, key).map_err(|e| e.to_string())
                }
                // A redb copy of the rows, sealed as stored (restorable
                // into a redb vault); the database's own dumps work too.
                VaultBackend::Postgres => {
                    let url = vault.postgres_url()?;
                    let v =
                        gateway_service::vault::Vault::open_postgres(&url, key, vault.lease_secs)
                            .map_err(|e| e.to_string())?;
                    let counts = v.export_redb(&out).map_err(|e| e.to_string())?;
                    Ok(VaultSnapshotReport {
                        rows: counts.studies + counts.instances + counts.index,
                        counts,
                    })
                }
            }
        }),
        Some(Cmd::VaultRestore { backup, force }) => {
            snapshot(cli.config.as_deref(), |vault, key| match vault.backend {
                VaultBackend::Redb => vault_backup::restore(&backup, &vault.path, key, force)
                    .map_err(|e| e.to_string()),
                VaultBackend::Postgres => Err(
                    "the vault is on PostgreSQL: restore it with the database's own tools".into(),
                ),
            })
        }
        None => SERVICE.serve(cli.config.as_deref(), async |cfg| {
            let app = App::build(&cfg).map_err(start_error)?;
            let running = app.spawn().await.map_err(start_error)?;
            if let Some(addr) = running.dicom_addr() {
                // Scripts read this line like `listening=` (a failed write
                // would also fail that one).
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "dicom_listening={addr}");
            }
            if let Some(addr) = running.dicom_tls_addr() {
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "dicom_tls_listening={addr}");
            }
            if let Some(addr) = running.dicomweb_addr() {
                use std::io::Write;
                let _ = writeln!(std::io::stdout(), "dicomweb_listening={addr}");
            }
            Ok(Gateway(running))
        }),
    }
}

/// `vault-backup` / `vault-restore`: one JSON line on success, exit 1 on
/// refusal, 64 on a bad config or vault key.
fn snapshot(
    config: Option<&Path>,
    run: impl FnOnce(&VaultSection, &[u8; 32]) -> Result<VaultSnapshotReport, String>,
) -> ExitCode {
    let cfg: Config = match load_config(&ConfigSource::from_process(config), ENV_PREFIX) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let key = match gateway_service::vault::load_key_file(&cfg.vault.key_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("gateway: vault key: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match run(&cfg.vault, &key) {
        Ok(r) => {
            println!(
                "{{\"ok\":true,\"rows\":{},\"studies\":{},\"instances\":{},\"indexEntries\":{}}}",
                r.rows, r.counts.studies, r.counts.instances, r.counts.index
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: refused: {e}");
            ExitCode::from(1)
        }
    }
}

/// A bad vault key or client TLS material exits 64.
fn start_error(e: AppError) -> StartError {
    if e.is_config() {
        StartError::config(e)
    } else {
        StartError::other(e)
    }
}

struct Gateway(RunningApp);

impl Serving for Gateway {
    fn local_addr(&self) -> SocketAddr {
        self.0.local_addr()
    }

    fn shutdown(self, grace: Duration) -> impl Future<Output = ()> + Send {
        self.0.shutdown(grace)
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.0.admin_addr()
    }
}
