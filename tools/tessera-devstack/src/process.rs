//! The suite's services as child processes ([`crate::DevOptions::bin_dir`]):
//! each service's generated TOML config written to `DIR/config/NAME.toml`,
//! its binary started as `BIN_DIR/BINARY --config FILE` (stderr to
//! `DIR/logs/NAME.log`), its `listening=` / `admin=` lines read from stdout.
//! Memory budgets are per process (per pod), so `tessera bench memory`
//! measures each service this way. A child is killed when its handle is
//! dropped: an ended or failed run leaves no process behind.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{DevError, io, svc};

/// How long a service may take to print `listening=` and `admin=`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running service process; killed (SIGKILL) and reaped on drop.
pub(crate) struct ChildService {
    child: Child,
    /// The `key=value` lines it printed before serving (`listening`,
    /// `admin`, `dicom_listening`, ...).
    lines: BTreeMap<String, String>,
}

impl ChildService {
    /// Writes `config` to `DIR/config/NAME.toml`, starts `BIN_DIR/BINARY`
    /// on it and waits for its `listening=` and `admin=` lines.
    pub(crate) async fn start(
        dir: &Path,
        bin_dir: &Path,
        binary: &str,
        name: &str,
        config: &str,
    ) -> Result<Self, DevError> {
        let conf_dir = dir.join("config");
        let log_dir = dir.join("logs");
        for d in [&conf_dir, &log_dir] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let conf = conf_dir.join(format!("{name}.toml"));
        std::fs::write(&conf, config).map_err(io(&conf))?;
        let log = log_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log).map_err(io(&log))?;
        let bin = bin_dir.join(binary);
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| svc(name)(format!("starting {}: {e}", bin.display())))?;
        let Some(stdout) = child.stdout.take() else {
            kill(&mut child);
            return Err(svc(name)("no stdout pipe".into()));
        };
        let mut service = ChildService {
            child,
            lines: BTreeMap::new(),
        };
        // A thread reads stdout to its end (so the pipe never fills) and
        // hands the `key=value` lines over until `admin=`.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { return };
                    // The receiver is gone once the service serves.
                    let _ = tx.send(line);
                }
            })
            .map_err(|e| svc(name)(format!("stdout reader: {e}")))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(line)) => {
                    if let Some((k, v)) = line.split_once('=') {
                        service.lines.insert(k.to_owned(), v.trim().to_owned());
                    }
                    if service.lines.contains_key("listening")
                        && service.lines.contains_key("admin")
                    {
                        return Ok(service);
                    }
                }
                Ok(None) => {
                    let status = service.child.wait().ok();
                    return Err(svc(name)(format!(
                        "{} exited before serving ({}): {}",
                        bin.display(),
                        status.map_or("unknown status".into(), |s| s.to_string()),
                        log_tail(&log)
                    )));
                }
                Err(_) => {
                    return Err(svc(name)(format!(
                        "{} did not print listening= and admin= within {}s: {}",
                        bin.display(),
                        START_TIMEOUT.as_secs(),
                        log_tail(&log)
                    )));
                }
            }
        }
    }

    /// An address it printed (`listening`, `admin`, `dicom_listening`, ...).
    pub(crate) fn addr(&self, key: &str) -> Option<SocketAddr> {
        self.lines.get(key)?.parse().ok()
    }

    /// Its process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (through `kill(1)`: the workspace has no unsafe code for
    /// `kill(2)`), then SIGKILL if it has not exited within `grace`.
    pub(crate) async fn shutdown(mut self, grace: Duration) {
        let termed = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if termed {
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Drop kills what is left.
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn kill(child: &mut Child) {
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

/// The last lines of a service's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    format!("log {}: {tail}", log.display())
}

/// Where the service binaries are: `TESSERA_BIN_DIR`, else the directory
/// of the running executable.
pub fn default_bin_dir() -> Result<PathBuf, DevError> {
    if let Some(d) = std::env::var_os("TESSERA_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(|e| svc("bin-dir")(e.to_string()))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| svc("bin-dir")(format!("{} has no directory", exe.display())))
}
