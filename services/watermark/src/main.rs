//! `watermark --config FILE`: serve until SIGINT/SIGTERM. Prints
//! `listening=ADDR` once serving (the launcher and e2e scripts wait for it).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use tessera_runtime::Service;
use watermark_service::App;
use watermark_service::config::{Config, ENV_PREFIX};

const SERVICE: Service<Config> = Service::new(
    "watermark",
    "Tessera watermark service",
    ENV_PREFIX,
    |c: &Config| &c.telemetry,
);

/// jemalloc, returning freed memory to the OS (decision 25).
#[global_allocator]
static ALLOC: tessera_runtime::memory::Allocator = tessera_runtime::memory::ALLOCATOR;

fn main() -> ExitCode {
    tessera_runtime::memory::start();
    SERVICE.main(async |cfg| Ok(App::build(&cfg)?.spawn().await?))
}
