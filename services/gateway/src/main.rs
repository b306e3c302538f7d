//! `gateway --config FILE`: serve until SIGINT/SIGTERM. Prints
//! `listening=ADDR` once serving (the launcher and e2e scripts wait for it).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use gateway_service::config::{Config, ENV_PREFIX};
use gateway_service::{App, AppError, RunningApp};
use tessera_runtime::{Service, Serving, StartError};

const SERVICE: Service<Config> = Service::new(
    "gateway",
    "Tessera gateway (CloudSec)",
    ENV_PREFIX,
    |c: &Config| &c.telemetry,
);

fn main() -> ExitCode {
    SERVICE.main(async |cfg| {
        let app = App::build(&cfg).map_err(start_error)?;
        let running = app.spawn().await.map_err(start_error)?;
        if let Some(addr) = running.dicom_addr() {
            // Scripts read this line like `listening=` (a failed write
            // would also fail that one).
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "dicom_listening={addr}");
        }
        Ok(Gateway(running))
    })
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
}
