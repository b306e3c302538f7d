//! `keyserver`: serve (default) or verify an audit log offline.
//!
//! ```text
//! keyserver [--config FILE]                      serve until SIGINT/SIGTERM
//! keyserver audit-verify --db FILE [--kek-file F] verify the audit chain of a stopped keyserver
//! keyserver audit-recover --config FILE --acknowledge-broken-at N
//!                                                 re-open a broken chain (stopped keyserver)
//! keyserver --config FILE backup --out FILE      online snapshot (the keyserver may run)
//! keyserver --config FILE restore --backup FILE [--db FILE] [--force]
//!                                                 check a backup and install it (stopped keyserver)
//! keyserver bench [--clients 64] [--requests 20000]
//! ```
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyserver::App;
use keyserver::config::{Config, ENV_PREFIX, StoreBackend};
use keyserver::core::backend::Store;
use keyserver::core::clock::{Clock, SystemClock};
use keyserver::core::crypto::Kek;
use tessera_runtime::{ConfigSource, EXIT_CONFIG, Service, load_config};

const SERVICE: Service<Config> = Service::new(
    "keyserver",
    "Tessera keyserver",
    ENV_PREFIX,
    |c: &Config| &c.telemetry,
);

#[derive(Parser)]
#[command(name = "keyserver", about = "Tessera keyserver", version)]
struct Cli {
    /// TOML config; `TESSERA_KEYSERVER__SECTION__KEY` variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Recompute the audit hash chain of a database file (server stopped),
    /// or without --db of the store named by --config (redb file or
    /// PostgreSQL; replicas may run). Exit 0 if intact, 1 if broken (the
    /// first broken entry is named).
    AuditVerify {
        /// The keyserver's redb file (default: the store of --config).
        #[arg(long)]
        db: Option<PathBuf>,
        /// KEK file: authenticates the signing key (otherwise the public key
        /// stored in the file is used).
        #[arg(long)]
        kek_file: Option<PathBuf>,
    },
    /// Acknowledge a broken audit chain so the keyserver serves key
    /// operations again (server stopped; KEK and database from --config).
    /// Appends a signed `audit.recovered` entry naming the operator ($USER)
    /// and the acknowledged entry, which must be the first broken one.
    AuditRecover {
        /// The first broken entry, as named by `audit-verify` or by the
        /// keyserver's FAILED_PRECONDITION refusals.
        #[arg(long, value_name = "SEQ")]
        acknowledge_broken_at: u64,
    },
    /// Online backup: one consistent snapshot of the database named by
    /// --config (the keyserver may be running) into a new 0600 file,
    /// checked restorable under the configured KEK. Never overwrites.
    Backup {
        /// The backup file to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check a backup (redb integrity, KEK unwraps every secret, audit
    /// chain verifies) and install it as the database (keyserver stopped).
    Restore {
        /// The backup file.
        #[arg(long)]
        backup: PathBuf,
        /// The database to create (default: keyserver.db_path of --config).
        #[arg(long)]
        db: Option<PathBuf>,
        /// Replace a non-empty database.
        #[arg(long)]
        force: bool,
    },
    /// Derivations per second over mTLS gRPC vs in-process (temporary PKI,
    /// database and server on 127.0.0.1; bounded by count).
    Bench {
        /// Concurrent clients.
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Derivations per phase.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
    },
}

/// jemalloc, returning freed memory to the OS (decision 25).
#[global_allocator]
static ALLOC: tessera_runtime::memory::Allocator = tessera_runtime::memory::ALLOCATOR;

fn main() -> ExitCode {
    tessera_runtime::memory::start();
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::AuditVerify { db, kek_file }) => {
            audit_verify(cli.config.as_deref(), db.as_deref(), kek_file.as_deref())
        }
        Some(Cmd::AuditRecover {
            acknowledge_broken_at,
        }) => audit_recover(cli.config.as_deref(), acknowledge_broken_at),
        Some(Cmd::Backup { out }) => snapshot(cli.config.as_deref(), |cfg, kek| {
            redb_only(cfg)?;
            keyserver::core::backup::backup(&cfg.keyserver.db_path, &out, kek)
        }),
        Some(Cmd::Restore { backup, db, force }) => snapshot(cli.config.as_deref(), |cfg, kek| {
            redb_only(cfg)?;
            let db = db.as_deref().unwrap_or(&cfg.keyserver.db_path);
            keyserver::core::backup::restore(&backup, db, kek, force)
        }),
        Some(Cmd::Bench { clients, requests }) => bench(clients, requests),
        None => SERVICE.serve(cli.config.as_deref(), async |cfg| {
            Ok(App::build(&cfg)?.spawn().await?)
        }),
    }
}

fn bench(clients: usize, requests: usize) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyserver: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(keyserver::bench_derive(keyserver::BenchOptions {
        clients,
        requests,
    })) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyserver: bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(config: Option<&std::path::Path>) -> Result<(Config, Kek), ExitCode> {
    let cfg: Config =
        load_config(&ConfigSource::from_process(config), ENV_PREFIX).map_err(|e| {
            eprintln!("keyserver: {e}");
            ExitCode::from(EXIT_CONFIG)
        })?;
    let kek = Kek::load(&cfg.keyserver.kek_file).map_err(|e| {
        eprintln!("keyserver: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    Ok((cfg, kek))
}

/// `backup` and `restore` copy redb files: a PostgreSQL store is backed up
/// with the database's own tools.
fn redb_only(cfg: &Config) -> Result<(), tessera_runtime::snapshot::SnapshotError> {
    match cfg.keyserver.store.backend {
        StoreBackend::Redb => Ok(()),
        StoreBackend::Postgres => Err(tessera_runtime::snapshot::SnapshotError::Check {
            path: PathBuf::from("keyserver.store"),
            message: "backend \"postgres\": back up the database with pg_dump (decision 24)".into(),
        }),
    }
}

/// The store of `cfg`, opened (PostgreSQL) for the offline commands.
fn open_pg(cfg: &Config) -> Result<Store, String> {
    let url = cfg.keyserver.store.postgres_url()?;
    let pg = keyserver::core::backend::PgStore::open(&url).map_err(|e| e.to_string())?;
    Ok(Store::Pg(std::sync::Arc::new(pg)))
}

/// `backup` / `restore`: one JSON line on success, exit 1 on refusal.
fn snapshot(
    config: Option<&std::path::Path>,
    run: impl FnOnce(
        &Config,
        &Kek,
    ) -> Result<
        keyserver::core::backup::SnapshotReport,
        tessera_runtime::snapshot::SnapshotError,
    >,
) -> ExitCode {
    let (cfg, kek) = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match run(&cfg, &kek) {
        Ok(r) => {
            println!(
                "{{\"ok\":true,\"rows\":{},\"studies\":{},\"masters\":{},\"auditEntries\":{}}}",
                r.rows, r.studies, r.masters, r.audit_entries
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyserver: refused: {e}");
            ExitCode::from(1)
        }
    }
}

fn audit_recover(config: Option<&std::path::Path>, seq: u64) -> ExitCode {
    let (cfg, kek) = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let operator = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let db = &cfg.keyserver.db_path;
    let now = SystemClock.now_ms();
    let recovered = match cfg.keyserver.store.backend {
        StoreBackend::Redb => keyserver::core::recover_audit(db, &kek, &operator, seq, now),
        StoreBackend::Postgres => match open_pg(&cfg) {
            Ok(store) => keyserver::core::recover_audit_in(&store, &kek, &operator, seq, now),
            Err(e) => {
                eprintln!("keyserver: {e}");
                return ExitCode::from(1);
            }
        },
    };
    match recovered {
        Ok(r) => {
            println!(
                "{{\"ok\":{},\"recoveredAt\":{},\"acknowledgedBrokenAt\":{},\"acknowledgedProblem\":{:?},\"entries\":{}}}",
                r.report.ok, r.seq, r.acknowledged.seq, r.acknowledged.problem, r.report.entries
            );
            if r.report.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!("keyserver: still broken: {}", r.report.problem);
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("keyserver: cannot recover {}: {e}", db.display());
            ExitCode::from(1)
        }
    }
}

fn audit_verify(
    config: Option<&std::path::Path>,
    db: Option<&std::path::Path>,
    kek_file: Option<&std::path::Path>,
) -> ExitCode {
    let kek = match kek_file.map(Kek::load).transpose() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("keyserver: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (verified, what) = match db {
        Some(db) => (
            keyserver::core::verify_audit_file(db, kek.as_ref()),
            db.display().to_string(),
        ),
        None => {
            let cfg: Config = match load_config(&ConfigSource::from_process(config), ENV_PREFIX) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("keyserver: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let k = &cfg.keyserver;
            match k.store.backend {
                StoreBackend::Redb => (
                    keyserver::core::verify_audit_file(&k.db_path, kek.as_ref()),
                    k.db_path.display().to_string(),
                ),
                StoreBackend::Postgres => match open_pg(&cfg) {
                    Ok(store) => (
                        store.read().and_then(|r| {
                            keyserver::core::verify_audit_in(r.as_ref(), kek.as_ref())
                        }),
                        "the keyserver database".to_owned(),
                    ),
                    Err(e) => {
                        eprintln!("keyserver: {e}");
                        return ExitCode::from(2);
                    }
                },
            }
        }
    };
    match verified {
        Ok((rep, pk)) => {
            println!(
                "{{\"ok\":{},\"entries\":{},\"firstBrokenSeq\":{},\"problem\":{:?},\"checkpointsVerified\":{},\"auditPublicKey\":\"{}\",\"acknowledgedBrokenSeq\":{}}}",
                rep.ok,
                rep.entries,
                rep.first_broken_seq.unwrap_or(0),
                rep.problem,
                rep.checkpoints_verified,
                hex::encode(pk),
                rep.acknowledged.as_ref().map_or(0, |a| a.0)
            );
            if rep.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("keyserver: cannot verify {what}: {e}");
            ExitCode::from(2)
        }
    }
}
