//! `storage-node`: run one untrusted storage node.
//!
//! `storage-node --config node.toml` (or `TESSERA_STORAGE_CONFIG=node.toml`);
//! every key can be overridden with `TESSERA_STORAGE__<KEY>__<SUBKEY>=value`.
//! Prints `listening=<addr>` on stdout once serving.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use storage_node::config::ENV_PREFIX;
use storage_node::{App, Config};
use tessera_runtime::Service;

const SERVICE: Service<Config> = Service::new(
    "storage-node",
    "Tessera storage node",
    ENV_PREFIX,
    |c: &Config| &c.telemetry,
)
.config_env("TESSERA_STORAGE_CONFIG");

/// jemalloc, returning freed memory to the OS (decision 25).
#[global_allocator]
static ALLOC: tessera_runtime::memory::Allocator = tessera_runtime::memory::ALLOCATOR;

fn main() -> ExitCode {
    tessera_runtime::memory::start();
    SERVICE.main(async |config| {
        let node_id = config.node_id.clone();
        let server = App::build(config)?.spawn().await?;
        tracing::info!(%node_id, "storage node ready");
        Ok(server)
    })
}
