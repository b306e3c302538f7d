//! The `main` of every Tessera service binary, written once.
//!
//! [`Service::main`] parses `[--config FILE]`; [`Service::serve`] (also for
//! binaries with subcommands of their own) then:
//!
//! 1. loads the typed config (TOML, then `PREFIX__SECTION__KEY` variables,
//!    then validation); a bad config prints `NAME: <why>` on stderr and
//!    exits [`EXIT_CONFIG`] (64);
//! 2. builds a multi-thread tokio runtime and installs telemetry from the
//!    config's `[telemetry]` section;
//! 3. runs the service's start closure; a [`StartError`] is logged, printed
//!    as `NAME: <why>` and exits 64 when it is a configuration error (an
//!    unreadable or too-open key file), 1 otherwise;
//! 4. prints `listening=ADDR` on stdout, then `admin=ADDR` when the
//!    `[admin]` listener serves, and flushes (launchers and the e2e scripts
//!    wait for the first line);
//! 5. waits for SIGINT/SIGTERM, shuts down gracefully (in-flight RPCs get
//!    [`SHUTDOWN_GRACE`]) and exits 0.
//!
//! ```no_run
//! # use std::process::ExitCode;
//! # use tessera_runtime::{GrpcServer, ServerConfig, Service, TelemetryConfig};
//! # use tessera_tls::Policy;
//! #[derive(serde::Deserialize)]
//! struct Config { server: ServerConfig, #[serde(default)] telemetry: TelemetryConfig }
//! impl tessera_runtime::Validate for Config {
//!     fn validate(&self) -> Result<(), String> { self.server.validate() }
//! }
//!
//! const SERVICE: Service<Config> =
//!     Service::new("example", "An example service", "TESSERA_EXAMPLE", |c: &Config| &c.telemetry);
//!
//! fn main() -> ExitCode {
//!     SERVICE.main(async |cfg| Ok(GrpcServer::new(&cfg.server, Policy::new())?.spawn().await?))
//! }
//! ```

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::config::{ConfigSource, EXIT_CONFIG, Validate, load_config};
use crate::server::{RunningServer, ServerError};
use crate::telemetry::{self, TelemetryConfig};

/// How long in-flight RPCs may run after SIGINT/SIGTERM before they are
/// aborted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A listening service, as a start closure hands it back.
pub trait Serving {
    /// The address actually bound.
    fn local_addr(&self) -> SocketAddr;
    /// Stops accepting, drains for at most `grace`, then releases whatever
    /// the service holds (databases, files).
    fn shutdown(self, grace: Duration) -> impl Future<Output = ()> + Send;
    /// Where the admin listener serves, when configured.
    fn admin_addr(&self) -> Option<SocketAddr> {
        None
    }
}

impl Serving for RunningServer {
    fn local_addr(&self) -> SocketAddr {
        RunningServer::local_addr(self)
    }

    fn shutdown(self, grace: Duration) -> impl Future<Output = ()> + Send {
        RunningServer::shutdown(self, grace)
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        RunningServer::admin_addr(self)
    }
}

/// Why a service did not start, and whether fixing the configuration fixes
/// it (exit 64) or not (exit 1).
#[derive(Debug)]
pub struct StartError {
    message: String,
    config: bool,
}

impl StartError {
    /// A configuration problem, e.g. a missing, unreadable or too-open key
    /// file: exit [`EXIT_CONFIG`].
    pub fn config(why: impl fmt::Display) -> Self {
        Self {
            message: why.to_string(),
            config: true,
        }
    }

    /// Any other failure (cannot listen, cannot open the database): exit 1.
    pub fn other(why: impl fmt::Display) -> Self {
        Self {
            message: why.to_string(),
            config: false,
        }
    }

    /// True when fixing the configuration fixes the error.
    pub fn is_config(&self) -> bool {
        self.config
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        if self.config {
            ExitCode::from(EXIT_CONFIG)
        } else {
            ExitCode::FAILURE
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StartError {}

/// The gRPC server could not start (TLS material, bind): exit 1.
impl From<ServerError> for StartError {
    fn from(e: ServerError) -> Self {
        match e {
            ServerError::KeyPermissions(m) => Self::config(m),
            e @ (ServerError::Tls(_) | ServerError::Bind { .. } | ServerError::Reflection(_)) => {
                Self::other(e)
            }
        }
    }
}

/// A service binary: its name, its configuration and where that comes
/// from. Usually a `const` in `main.rs`.
pub struct Service<C> {
    name: &'static str,
    about: &'static str,
    env_prefix: &'static str,
    config_env: Option<&'static str>,
    telemetry: fn(&C) -> &TelemetryConfig,
}

impl<C> Service<C> {
    /// `name` is the binary's: the stderr prefix, `--help` and the
    /// telemetry service name. `about` is one line for `--help`;
    /// `env_prefix` that of the overrides (`PREFIX__SECTION__KEY=value`);
    /// `telemetry` picks the config's `[telemetry]` section.
    pub const fn new(
        name: &'static str,
        about: &'static str,
        env_prefix: &'static str,
        telemetry: fn(&C) -> &TelemetryConfig,
    ) -> Self {
        Self {
            name,
            about,
            env_prefix,
            config_env: None,
            telemetry,
        }
    }

    /// Also read the config file's path from `var` when `--config` is not
    /// given.
    pub const fn config_env(mut self, var: &'static str) -> Self {
        self.config_env = Some(var);
        self
    }

    /// The binary's name.
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl<C: DeserializeOwned + Validate> Service<C> {
    /// The command line: `NAME [--config FILE]`, `--help`, `--version`.
    pub fn command(&self) -> clap::Command {
        let mut config = clap::Arg::new("config")
            .long("config")
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .help(format!(
                "TOML config; `{}__SECTION__KEY` variables override it.",
                self.env_prefix
            ));
        if let Some(var) = self.config_env {
            config = config.env(var);
        }
        clap::Command::new(self.name)
            .about(self.about)
            .version(env!("CARGO_PKG_VERSION"))
            .arg(config)
    }

    /// Parses the command line (usage errors exit 2, as clap does), then
    /// [`Self::serve`]s.
    pub fn main<S: Serving>(
        &self,
        start: impl AsyncFnOnce(C) -> Result<S, StartError>,
    ) -> ExitCode {
        let config = self.command().get_matches().remove_one::<PathBuf>("config");
        self.serve(config.as_deref(), start)
    }

    /// Loads the config from `config_file` (plus the environment), starts
    /// the service with `start` and serves until SIGINT/SIGTERM; see the
    /// module docs for the messages and exit codes.
    pub fn serve<S: Serving>(
        &self,
        config_file: Option<&Path>,
        start: impl AsyncFnOnce(C) -> Result<S, StartError>,
    ) -> ExitCode {
        let name = self.name;
        let cfg: C = match load_config(&ConfigSource::from_process(config_file), self.env_prefix) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("{name}: cannot start runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        rt.block_on(async move {
            // Dropped last: spans of the shutdown are still exported.
            let _telemetry = match telemetry::init(name, (self.telemetry)(&cfg)) {
                Ok(g) => g,
                Err(e) => {
                    eprintln!("{name}: telemetry: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let running = match start(cfg).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start");
                    eprintln!("{name}: {e}");
                    return e.exit_code();
                }
            };
            let addr = running.local_addr();
            tracing::info!(service = name, %addr, "listening");
            if let Err(e) = announce(addr, running.admin_addr()) {
                tracing::error!(error = %e, "cannot announce the address");
                eprintln!("{name}: cannot write to stdout: {e}");
                running.shutdown(SHUTDOWN_GRACE).await;
                return ExitCode::FAILURE;
            }
            crate::shutdown_signal().await;
            tracing::info!("shutting down");
            running.shutdown(SHUTDOWN_GRACE).await;
            ExitCode::SUCCESS
        })
    }
}

/// The line launchers and the e2e scripts wait for.
/// `admin=ADDR` follows on its own line when the admin listener serves.
fn announce(addr: SocketAddr, admin: Option<SocketAddr>) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening={addr}")?;
    if let Some(admin) = admin {
        writeln!(out, "admin={admin}")?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Cfg {
        #[serde(default)]
        telemetry: TelemetryConfig,
    }

    impl Validate for Cfg {
        fn validate(&self) -> Result<(), String> {
            self.telemetry.validate()
        }
    }

    const SVC: Service<Cfg> = Service::new(
        "example",
        "An example service",
        "TESSERA_EXAMPLE",
        |c: &Cfg| &c.telemetry,
    )
    .config_env("TESSERA_EXAMPLE_CONFIG_FILE_FOR_TEST");

    #[test]
    fn command_line_is_well_formed() {
        SVC.command().debug_assert();
        let m = SVC
            .command()
            .try_get_matches_from(["example", "--config", "/etc/x.toml"])
            .unwrap();
        assert_eq!(
            m.get_one::<PathBuf>("config"),
            Some(&PathBuf::from("/etc/x.toml"))
        );
        let m = SVC.command().try_get_matches_from(["example"]).unwrap();
        assert_eq!(m.get_one::<PathBuf>("config"), None);
        let e = SVC
            .command()
            .try_get_matches_from(["example", "--bogus"])
            .unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
        let help = SVC.command().render_long_help().to_string();
        assert!(help.contains("TESSERA_EXAMPLE__SECTION__KEY"), "{help}");
        assert_eq!(SVC.name(), "example");
        assert!(
            help.contains("TESSERA_EXAMPLE_CONFIG_FILE_FOR_TEST"),
            "{help}"
        );
    }

    #[test]
    fn start_errors_choose_the_exit_code() {
        let c = StartError::config("kek file /k is too open (mode 644)");
        assert!(c.is_config());
        assert_eq!(c.exit_code(), ExitCode::from(EXIT_CONFIG));
        assert_eq!(c.to_string(), "kek file /k is too open (mode 644)");
        let o = StartError::other("database locked");
        assert!(!o.is_config());
        assert_eq!(o.exit_code(), ExitCode::FAILURE);
        let bind = ServerError::Bind {
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        let s = StartError::from(bind);
        assert!(!s.is_config());
        assert!(s.to_string().starts_with("cannot listen on 127.0.0.1:1"));
    }

    #[test]
    fn a_bad_config_exits_64_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "telemetry = 3\n").unwrap();
        let missing = dir.path().join("missing.toml");
        for path in [bad, missing] {
            let code = SVC.serve(Some(&path), async |_cfg| -> Result<RunningServer, _> {
                panic!("must not start with a bad config")
            });
            assert_eq!(code, ExitCode::from(EXIT_CONFIG), "{}", path.display());
        }
    }

    // The only test that gets as far as telemetry (a process installs it
    // once).
    #[test]
    fn a_start_error_is_reported_with_its_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.toml");
        std::fs::write(&path, "[telemetry]\nlog = \"warn\"\n").unwrap();
        let code = SVC.serve(Some(&path), async |cfg| -> Result<RunningServer, _> {
            assert_eq!(cfg.telemetry.log, "warn");
            Err(StartError::config("key file /k is too open"))
        });
        assert_eq!(code, ExitCode::from(EXIT_CONFIG));
    }
}
