//! `watermark --config FILE`: serve until SIGINT/SIGTERM. Prints
//! `listening=ADDR` once serving (the launcher and e2e scripts wait for it).
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tessera_runtime::{ConfigSource, EXIT_CONFIG, load_config, shutdown_signal, telemetry};
use watermark_service::config::{Config, ENV_PREFIX};
use watermark_service::{App, AppError};

#[derive(Parser)]
#[command(name = "watermark", about = "Tessera watermark service", version)]
struct Cli {
    /// TOML config; `TESSERA_WATERMARK__SECTION__KEY` variables override it.
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
            eprintln!("watermark: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("watermark: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let _telemetry = match telemetry::init("watermark", &cfg.telemetry) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("watermark: telemetry: {e}");
                return ExitCode::FAILURE;
            }
        };
        let app = match App::build(&cfg) {
            Ok(a) => a,
            Err(e @ AppError::KeyserverTls(_)) => {
                // Unreadable client TLS material is a configuration error.
                tracing::error!(error = %e, "cannot start");
                eprintln!("watermark: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("watermark: {e}");
                return ExitCode::FAILURE;
            }
        };
        let running = match app.spawn().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen");
                eprintln!("watermark: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(addr = %running.local_addr(), "watermark listening");
        println!("listening={}", running.local_addr());
        let _ = std::io::Write::flush(&mut std::io::stdout());
        shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown(Duration::from_secs(10)).await;
        ExitCode::SUCCESS
    })
}
