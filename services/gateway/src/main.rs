//! `gateway --config FILE`: serve until SIGINT/SIGTERM. Prints
//! `listening=ADDR` once serving (the launcher and e2e scripts wait for it).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use gateway_service::App;
use gateway_service::config::{Config, ENV_PREFIX};
use tessera_runtime::{ConfigSource, EXIT_CONFIG, load_config, shutdown_signal, telemetry};

#[derive(Parser)]
#[command(name = "gateway", about = "Tessera gateway (CloudSec)", version)]
struct Cli {
    /// TOML config; `TESSERA_GATEWAY__SECTION__KEY` variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg: Config = match load_config(
        &ConfigSource::from_process(cli.config.as_deref()),
        ENV_PREFIX,
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gateway: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let _telemetry = match telemetry::init("gateway", &cfg.telemetry) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("gateway: telemetry: {e}");
                return ExitCode::FAILURE;
            }
        };
        let running = match App::build(&cfg) {
            Ok(app) => app.spawn().await,
            Err(e) => Err(e),
        };
        let running = match running {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("gateway: {e}");
                return if e.is_config() {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                };
            }
        };
        tracing::info!(addr = %running.local_addr(), "gateway listening");
        println!("listening={}", running.local_addr());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown(Duration::from_secs(10)).await;
        ExitCode::SUCCESS
    })
}
