//! `tessera doctor`: is this dev directory usable? Checks, each printed as
//! `ok`, `warn` or `FAIL` with what it saw:
//!
//! * this binary's version;
//! * the PKI in `DIR/pki`: the CA and every certificate present, issued by
//!   the CA, valid now and for how long (a warning under 30 days), each key
//!   file present and readable by its owner only;
//! * `DIR/endpoints.toml`: every gRPC endpoint reachable over mutual TLS,
//!   presenting the identity recorded there (or `service/<name>`), and
//!   answering health for the API it serves (`tessera.gateway.v1.Gateway`,
//!   ...), with the round trip; the DICOM SCP answering C-ECHO.
//!
//! Exits non-zero when a check fails (warnings do not).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde_json::{Value, json};
use tessera_tls::{ChannelTimeouts, ClientTls, Identity, TlsFiles};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::client::{ENDPOINTS_FILE, Endpoints, OutputArgs, PKI_DIR, error_chain, now_secs, utc};

/// Fewer days of validity left than this is a warning.
const WARN_DAYS: i64 = 30;

#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Dev directory made by `tessera dev up` (endpoints.toml and pki/).
    #[arg(
        long,
        value_name = "DIR",
        env = "TESSERA_DIR",
        default_value = ".tessera"
    )]
    pub dir: PathBuf,
    /// Identity to connect as (DIR/pki/NAME.crt): health answers anyone
    /// the CA signed.
    #[arg(
        long = "as",
        value_name = "NAME",
        env = "TESSERA_AS",
        default_value = "owner"
    )]
    pub as_name: String,
    /// Seconds to wait for each endpoint.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub timeout: u64,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn word(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

struct Check {
    level: Level,
    what: String,
    detail: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, level: Level, what: impl Into<String>, detail: impl Into<String>) {
        self.0.push(Check {
            level,
            what: what.into(),
            detail: detail.into(),
        });
    }
}

/// The API each dev endpoint serves (its health service name).
fn api_of(name: &str) -> Option<&'static str> {
    match name {
        "gateway" => Some("tessera.gateway.v1.Gateway"),
        "keyserver" => Some("tessera.keyserver.v1.KeyServer"),
        "watermark" => Some("tessera.watermark.v1.Watermark"),
        "segmentation" => Some("tessera.segmentation.v1.Segmentation"),
        n if n.starts_with("storage-") => Some("tessera.storage.v1.StorageNode"),
        _ => None,
    }
}

/// A certificate's identity, issuer check and validity.
struct CertInfo {
    identity: String,
    not_before: i64,
    not_after: i64,
    issued_by_ca: bool,
}

fn read_cert(path: &Path, ca_subject: Option<&[u8]>) -> Result<CertInfo> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes)
        .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
    let identity = Identity::from_cert_der_any_domain(&pem.contents)
        .map(|i| i.uri())
        .unwrap_or_else(|_| "(no SPIFFE identity)".into());
    let v = cert.validity();
    Ok(CertInfo {
        identity,
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
        issued_by_ca: ca_subject.is_some_and(|s| cert.issuer().as_raw() == s),
    })
}

fn ca_subject(path: &Path) -> Result<(Vec<u8>, CertInfo)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes)
        .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| anyhow!("{}: not an X.509 certificate: {e}", path.display()))?;
    let subject = cert.subject().as_raw().to_vec();
    let info = read_cert(path, Some(&subject))?;
    Ok((subject, info))
}

/// "valid until 2027-12-06 18:35:09Z (365 days)" and its level.
fn validity(info: &CertInfo, now: i64) -> (Level, String) {
    let until = utc(u64::try_from(info.not_after).unwrap_or(0));
    if now < info.not_before {
        let from = utc(u64::try_from(info.not_before).unwrap_or(0));
        return (Level::Fail, format!("not valid before {from}"));
    }
    let days = (info.not_after - now) / 86_400;
    if info.not_after <= now {
        (Level::Fail, format!("EXPIRED at {until}"))
    } else if days < WARN_DAYS {
        (
            Level::Warn,
            format!("valid until {until} (only {days} days left)"),
        )
    } else {
        (Level::Ok, format!("valid until {until} ({days} days)"))
    }
}

fn check_pki(dir: &Path, checks: &mut Checks) {
    let pki = dir.join(PKI_DIR);
    let ca_path = pki.join("ca.crt");
    if !ca_path.is_file() {
        checks.add(
            Level::Fail,
            "PKI",
            format!(
                "{} not found (run `tessera dev up --dir {}`)",
                ca_path.display(),
                dir.display()
            ),
        );
        return;
    }
    let now = i64::try_from(now_secs()).unwrap_or(i64::MAX);
    let subject = match ca_subject(&ca_path) {
        Ok((subject, info)) => {
            let (level, text) = validity(&info, now);
            checks.add(level, "PKI CA", format!("{}: {text}", ca_path.display()));
            subject
        }
        Err(e) => {
            checks.add(Level::Fail, "PKI CA", format!("{e:#}"));
            return;
        }
    };
    let names = tessera_pki::SERVICES
        .iter()
        .chain(tessera_pki::USERS.iter());
    // Every certificate fine: one line with the first to expire; else a
    // line for each that is not.
    let mut fine: Vec<(&str, i64)> = Vec::new();
    for name in names {
        let cert = pki.join(format!("{name}.crt"));
        let key = pki.join(format!("{name}.key"));
        let what = format!("cert {name}");
        if !cert.is_file() {
            checks.add(Level::Fail, what, format!("{} not found", cert.display()));
            continue;
        }
        let info = match read_cert(&cert, Some(&subject)) {
            Ok(i) => i,
            Err(e) => {
                checks.add(Level::Fail, what, format!("{e:#}"));
                continue;
            }
        };
        let (mut level, mut text) = validity(&info, now);
        text = format!("{}: {text}", info.identity);
        if !info.issued_by_ca {
            level = Level::Fail;
            text.push_str("; NOT issued by this CA");
        }
        match key_mode(&key) {
            Ok(mode) if mode & 0o077 != 0 => {
                level = level_max(level, Level::Warn);
                text.push_str(&format!(
                    "; {} is readable by others (mode {mode:o}: chmod 600)",
                    key.display()
                ));
            }
            Ok(_) => {}
            Err(e) => {
                level = Level::Fail;
                text.push_str(&format!("; key: {e}"));
            }
        }
        if level == Level::Ok {
            fine.push((name, info.not_after));
        } else {
            checks.add(level, what, text);
        }
    }
    if let Some((first, until)) = fine.iter().min_by_key(|(_, t)| *t) {
        let names: Vec<&str> = fine.iter().map(|(n, _)| *n).collect();
        checks.add(
            Level::Ok,
            "PKI identities",
            format!(
                "{} certificates issued by the CA, keys mode 0600 ({}); the first to expire, {first}, is valid until {} ({} days)",
                fine.len(),
                names.join(", "),
                utc(u64::try_from(*until).unwrap_or(0)),
                (until - now) / 86_400
            ),
        );
    }
}

fn level_max(a: Level, b: Level) -> Level {
    match (a, b) {
        (Level::Fail, _) | (_, Level::Fail) => Level::Fail,
        (Level::Warn, _) | (_, Level::Warn) => Level::Warn,
        (Level::Ok, Level::Ok) => Level::Ok,
    }
}

#[cfg(unix)]
fn key_mode(path: &Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path).with_context(|| format!("{} not found", path.display()))?;
    Ok(m.permissions().mode() & 0o777)
}

#[cfg(not(unix))]
fn key_mode(path: &Path) -> Result<u32> {
    std::fs::metadata(path).with_context(|| format!("{} not found", path.display()))?;
    Ok(0o600)
}

async fn check_grpc(
    tls: &ClientTls,
    name: &str,
    addr: &str,
    expected: &str,
    api: &str,
    timeout: Duration,
) -> (Level, String) {
    let identity = match Identity::parse_uri(expected) {
        Ok(i) => i,
        Err(e) => return (Level::Fail, format!("identity {expected:?}: {e}")),
    };
    let t = Instant::now();
    let channel = match tls.expecting(&identity).connect(addr).await {
        Ok(c) => c,
        Err(e) => {
            return (
                Level::Fail,
                format!(
                    "{addr}: cannot reach the {name} as {expected}: {}",
                    error_chain(&e)
                ),
            );
        }
    };
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: api.to_owned(),
    });
    req.set_timeout(timeout);
    match HealthClient::new(channel).check(req).await {
        Ok(r) => {
            let status = r.into_inner().status;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if status == ServingStatus::Serving as i32 {
                (
                    Level::Ok,
                    format!("{addr}, {expected}, serves {api} ({ms:.0} ms)"),
                )
            } else {
                (
                    Level::Fail,
                    format!(
                        "{addr}, {expected}: {api} is {:?}",
                        ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown)
                    ),
                )
            }
        }
        Err(s) => (
            Level::Fail,
            format!("{addr}, {expected}: health of {api}: {}", s.message()),
        ),
    }
}

async fn check_dicom(addr: &str, timeout: Duration) -> (Level, String) {
    let calling = tessera_devstack::DICOM_CALLING_AES[0];
    let called = tessera_devstack::DICOM_AE_TITLE;
    let opts = tessera_scp::scu::ScuOptions {
        calling_ae: calling.into(),
        called_ae: called.into(),
        timeout,
        ..Default::default()
    };
    match tessera_scp::scu::echo(addr, &opts).await {
        Ok(0) => (
            Level::Ok,
            format!("{addr}, C-ECHO {calling} -> {called}: success (the C-STORE SCP)"),
        ),
        Ok(status) => (
            Level::Fail,
            format!("{addr}, C-ECHO {calling} -> {called}: status 0x{status:04X}"),
        ),
        Err(e) => (
            Level::Fail,
            format!("{addr}, C-ECHO {calling} -> {called}: {e}"),
        ),
    }
}

/// The DICOMweb listener: TCP reachability only (its HTTPS handshake is
/// the gRPC listener's certificate and CA, checked on `gateway`).
async fn check_dicomweb(addr: &str, timeout: Duration) -> (Level, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (
            Level::Ok,
            format!("{addr}: accepts connections (DICOMweb, HTTPS with mutual TLS)"),
        ),
        Ok(Err(e)) => (Level::Fail, format!("{addr}: {e}")),
        Err(_) => (
            Level::Fail,
            format!("{addr}: no connection within {}s", timeout.as_secs()),
        ),
    }
}

/// The DICOM TLS listener: TCP reachability only (its handshake is the
/// gRPC listener's certificate and CA, checked on `gateway`).
async fn check_dicom_tls(addr: &str, timeout: Duration) -> (Level, String) {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (
            Level::Ok,
            format!("{addr}: accepts connections (DICOM TLS, client certificate required)"),
        ),
        Ok(Err(e)) => (Level::Fail, format!("{addr}: {e}")),
        Err(_) => (
            Level::Fail,
            format!("{addr}: no connection within {}s", timeout.as_secs()),
        ),
    }
}

async fn check_endpoints(a: &DoctorArgs, checks: &mut Checks) {
    let file = a.dir.join(ENDPOINTS_FILE);
    if !file.is_file() {
        checks.add(
            Level::Fail,
            "endpoints",
            format!(
                "{} not found (is `tessera dev up --dir {}` running?)",
                file.display(),
                a.dir.display()
            ),
        );
        return;
    }
    let endpoints = match Endpoints::load(&a.dir) {
        Ok(e) => e,
        Err(e) => {
            checks.add(Level::Fail, "endpoints", format!("{}: {e}", file.display()));
            return;
        }
    };
    checks.add(
        Level::Ok,
        "endpoints",
        format!(
            "{}: {} endpoint(s)",
            file.display(),
            endpoints.endpoints.len()
        ),
    );
    let timeout = Duration::from_secs(a.timeout.max(1));
    let files = TlsFiles::from_pki_dir(&a.dir.join(PKI_DIR), &a.as_name);
    let tls = match ClientTls::from_files(&files) {
        Ok(t) => t.with_timeouts(ChannelTimeouts {
            connect: timeout,
            call: Some(timeout),
        }),
        Err(e) => {
            checks.add(
                Level::Fail,
                "endpoints",
                format!("cannot load the identity {:?}: {e}", a.as_name),
            );
            return;
        }
    };
    for (name, addr) in &endpoints.endpoints {
        let (level, detail) = if name == "dicom" {
            check_dicom(addr, timeout).await
        } else if name == "dicomweb" {
            check_dicomweb(addr, timeout).await
        } else if name == "dicom-tls" {
            check_dicom_tls(addr, timeout).await
        } else if let Some(api) = api_of(name) {
            let expected = endpoints
                .identity(name)
                .map(str::to_owned)
                .unwrap_or_else(|| tessera_devstack::service_identity(name));
            check_grpc(&tls, name, addr, &expected, api, timeout).await
        } else {
            (
                Level::Warn,
                format!("{addr}: unknown endpoint, not checked"),
            )
        };
        checks.add(level, name.clone(), detail);
    }
}

/// `tessera doctor`.
pub fn doctor(a: DoctorArgs) -> Result<()> {
    let mut checks = Checks::default();
    checks.add(
        Level::Ok,
        "version",
        format!("tessera {} (this binary)", env!("CARGO_PKG_VERSION")),
    );
    let dir = crate::demo::absolute(&a.dir);
    if !a.dir.is_dir() {
        checks.add(
            Level::Fail,
            "dev directory",
            format!(
                "{} does not exist (run `tessera dev up --dir {}`)",
                dir.display(),
                a.dir.display()
            ),
        );
    } else {
        check_pki(&a.dir, &mut checks);
        crate::client::block_on(async {
            check_endpoints(&a, &mut checks).await;
            Ok(())
        })?;
    }
    let failed = checks.0.iter().filter(|c| c.level == Level::Fail).count();
    let warned = checks.0.iter().filter(|c| c.level == Level::Warn).count();
    let value = json!({
        "dir": dir,
        "checks": checks.0.iter().map(|c| json!({
            "level": c.level.word(), "what": c.what, "detail": c.detail,
        })).collect::<Vec<Value>>(),
        "failed": failed,
        "warnings": warned,
    });
    a.out.emit(&value, || {
        println!("tessera doctor: {}", dir.display());
        let width = checks.0.iter().map(|c| c.what.len()).max().unwrap_or(0);
        for c in &checks.0 {
            println!("  {:<4}  {:<width$}  {}", c.level.word(), c.what, c.detail);
        }
        println!(
            "doctor: {} checks, {failed} failed, {warned} warning(s)",
            checks.0.len()
        );
    })?;
    if failed > 0 {
        bail!("doctor: {failed} check(s) failed (see above)");
    }
    Ok(())
}
