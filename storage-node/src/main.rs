//! `storage-node`: run one untrusted storage node.
//!
//! `storage-node --config node.toml` (or `TESSERA_STORAGE_CONFIG=node.toml`);
//! every key can be overridden with `TESSERA_STORAGE__<KEY>__<SUBKEY>=value`.
//! Prints `listening=<addr>` on stdout once serving.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use storage_node::config::ENV_PREFIX;
use storage_node::{App, Config};
use tessera_runtime::{ConfigSource, EXIT_CONFIG, load_config, telemetry};

const GRACE: Duration = Duration::from_secs(10);

fn config_path() -> Result<Option<PathBuf>, String> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (None, _, _) => Ok(std::env::var_os("TESSERA_STORAGE_CONFIG").map(PathBuf::from)),
        (Some(flag), Some(path), None) if flag == "--config" => Ok(Some(PathBuf::from(path))),
        _ => Err("usage: storage-node [--config FILE]".to_owned()),
    }
}

fn main() -> ExitCode {
    let config: Config = match config_path().and_then(|path| {
        load_config(&ConfigSource::from_process(path.as_deref()), ENV_PREFIX)
            .map_err(|e| e.to_string())
    }) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("storage-node: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("storage-node: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storage-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut telemetry = telemetry::init("storage-node", &config.telemetry)?;
    let node_id = config.node_id.clone();
    let app = App::build(config)?;
    let server = app.spawn().await?;
    tracing::info!(%node_id, addr = %server.local_addr(), "storage node ready");
    let mut out = std::io::stdout();
    writeln!(out, "listening={}", server.local_addr())?;
    out.flush()?;
    tessera_runtime::shutdown_signal().await;
    tracing::info!("shutting down");
    server.shutdown(GRACE).await;
    telemetry.shutdown();
    Ok(())
}
