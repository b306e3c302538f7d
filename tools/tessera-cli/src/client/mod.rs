//! Client plumbing shared by every networked `tessera` subcommand: where the
//! services are, who we are (mutual TLS), connected channels, gRPC status
//! to plain words, and human or JSON output.
//!
//! A subcommand flattens [`ConnArgs`] (and usually [`OutputArgs`]) into its
//! clap arguments, then:
//!
//! ```text
//! let channel = args.conn.channel(Service::Gateway).await?;   // mTLS, connected
//! let reply = GatewayClient::new(channel)
//!     .thing(args.conn.request(msg))                          // with the deadline
//!     .await
//!     .map_err(|s| status_error("thing", &s))?;               // "refused: ..." etc.
//! ```
//!
//! Resolution order: `--keyserver/--gateway ADDR` over `DIR/endpoints.toml`;
//! `--cert/--key` over `--as NAME` (`DIR/pki/NAME.crt|key`); `--ca` over
//! `DIR/pki/ca.crt`. `DIR` is `--dir`, else `$TESSERA_DIR`, else `.tessera`.
//!
//! The server must present the identity expected there, always checked:
//! `--keyserver-identity/--gateway-identity URI`, else the `[identities]`
//! of `DIR/endpoints.toml`, else `spiffe://<our trust domain>/service/<name>`.

pub mod access_cmd;
pub mod dicom_cmd;
pub mod gateway_cmd;
pub mod keyserver_cmd;
pub mod pipeline;
pub mod repair_cmd;
pub mod requests_view;
pub mod webhook_cmd;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use tessera_tls::Channel;
use tessera_tls::{ChannelTimeouts, ClientTls, DEFAULT_TRUST_DOMAIN, Identity, TlsFiles};
use tonic::{Code, Status};

pub use tessera_devstack::{ENDPOINTS_FILE, Endpoints};

/// Subdirectory of a dev directory holding the PKI.
pub const PKI_DIR: &str = "pki";

/// A service the CLI talks to (users only ever call these two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The keyserver (`--keyserver` overrides its address).
    Keyserver,
    /// The gateway (`--gateway` overrides its address).
    Gateway,
}

impl Service {
    /// Its name in `endpoints.toml` (and in the dev PKI).
    pub fn name(self) -> &'static str {
        match self {
            Service::Keyserver => "keyserver",
            Service::Gateway => "gateway",
        }
    }
}

/// Where the services are and who we are. Flatten into a subcommand:
/// `#[command(flatten)] pub conn: ConnArgs`.
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ConnArgs {
    /// Dev directory made by `tessera dev up`: endpoints.toml and pki/.
    #[arg(
        long,
        value_name = "DIR",
        env = "TESSERA_DIR",
        default_value = ".tessera"
    )]
    pub dir: PathBuf,
    /// Act as NAME: uses DIR/pki/NAME.crt and DIR/pki/NAME.key (owner,
    /// clinician, clinician2, researcher, ...).
    #[arg(long = "as", value_name = "NAME", env = "TESSERA_AS")]
    pub as_name: Option<String>,
    /// Client certificate (PEM); takes precedence over --as.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM), with --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// CA certificate that signs the servers (default DIR/pki/ca.crt).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Keyserver address (host:port), instead of DIR/endpoints.toml.
    #[arg(long, value_name = "ADDR", env = "TESSERA_KEYSERVER")]
    pub keyserver: Option<String>,
    /// Gateway address (host:port), instead of DIR/endpoints.toml.
    #[arg(long, value_name = "ADDR", env = "TESSERA_GATEWAY")]
    pub gateway: Option<String>,
    /// SPIFFE identity the keyserver must present (default: from
    /// DIR/endpoints.toml, else spiffe://<trust domain>/service/keyserver).
    #[arg(long, value_name = "URI", env = "TESSERA_KEYSERVER_IDENTITY")]
    pub keyserver_identity: Option<String>,
    /// SPIFFE identity the gateway must present (default: from
    /// DIR/endpoints.toml, else spiffe://<trust domain>/service/gateway).
    #[arg(long, value_name = "URI", env = "TESSERA_GATEWAY_IDENTITY")]
    pub gateway_identity: Option<String>,
    /// Deadline of each call, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub timeout: u64,
    /// Deadline of connecting (TCP plus TLS handshake), seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub connect_timeout: u64,
}

impl ConnArgs {
    /// `DIR/pki`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join(PKI_DIR)
    }

    /// The TLS files to use; fails with a clear message when no identity was
    /// given, the name is not a plain name, or a file is missing.
    pub fn tls_files(&self) -> Result<TlsFiles> {
        let pki = self.pki_dir();
        let ca = self.ca.clone().unwrap_or_else(|| pki.join("ca.crt"));
        let (cert, key) = match (&self.cert, &self.key, &self.as_name) {
            (Some(c), Some(k), _) => (c.clone(), k.clone()),
            (None, None, Some(name)) => {
                validate_name(name)?;
                let f = TlsFiles::from_pki_dir(&pki, name);
                (f.cert, f.key)
            }
            (Some(_), None, _) | (None, Some(_), _) => {
                bail!("--cert and --key go together")
            }
            (None, None, None) => bail!(
                "who are you? pass --as NAME (e.g. --as owner; or set TESSERA_AS), \
                 or --cert FILE --key FILE"
            ),
        };
        for (what, path) in [
            ("CA certificate", &ca),
            ("certificate", &cert),
            ("key", &key),
        ] {
            if !path.is_file() {
                bail!(
                    "{what} {} not found (run `tessera dev up --dir {}` first, or pass --cert/--key/--ca)",
                    path.display(),
                    self.dir.display()
                );
            }
        }
        Ok(TlsFiles { ca, cert, key })
    }

    /// Who we act as, for messages: the --as name or the certificate path.
    pub fn who(&self) -> String {
        match (&self.as_name, &self.cert) {
            (_, Some(c)) => c.display().to_string(),
            (Some(n), None) => n.clone(),
            (None, None) => "nobody".into(),
        }
    }

    /// Address of `service`: the override flag, else `DIR/endpoints.toml`.
    pub fn endpoint(&self, service: Service) -> Result<String> {
        let flag = match service {
            Service::Keyserver => self.keyserver.as_ref(),
            Service::Gateway => self.gateway.as_ref(),
        };
        if let Some(addr) = flag {
            return Ok(addr.clone());
        }
        let name = service.name();
        let file = self.dir.join(ENDPOINTS_FILE);
        if !file.is_file() {
            bail!(
                "no address for the {name}: {} not found (run `tessera dev up --dir {}` or pass --{name} ADDR)",
                file.display(),
                self.dir.display()
            );
        }
        let endpoints = Endpoints::load(&self.dir).map_err(|e| anyhow!("{e}"))?;
        endpoints
            .get(name)
            .map(str::to_owned)
            .map_err(|e| anyhow!("{e} ({})", file.display()))
    }

    /// Our TLS client with this command's timeouts (no server identity
    /// chosen yet: see [`ConnArgs::channel`] and [`ConnArgs::service_identity`]).
    pub fn client_tls(&self) -> Result<ClientTls> {
        let files = self.tls_files()?;
        let tls = ClientTls::from_files(&files)
            .with_context(|| format!("loading the TLS identity of {}", self.who()))?;
        Ok(tls.with_timeouts(ChannelTimeouts {
            connect: Duration::from_secs(self.connect_timeout.max(1)),
            call: Some(Duration::from_secs(self.timeout.max(1))),
        }))
    }

    /// The identity expected at `service`: the flag, else
    /// `DIR/endpoints.toml`, else the service name in our trust domain.
    pub fn identity(&self, service: Service, tls: &ClientTls) -> Result<Identity> {
        let flag = match service {
            Service::Keyserver => self.keyserver_identity.as_ref(),
            Service::Gateway => self.gateway_identity.as_ref(),
        };
        let name = service.name();
        if let Some(uri) = flag {
            return Identity::parse_uri(uri).map_err(|e| anyhow!("--{name}-identity: {e}"));
        }
        if self.dir.join(ENDPOINTS_FILE).is_file() {
            let endpoints = Endpoints::load(&self.dir).map_err(|e| anyhow!("{e}"))?;
            if let Some(uri) = endpoints.identity(name) {
                return Identity::parse_uri(uri).map_err(|e| {
                    anyhow!(
                        "{}: identity of the {name}: {e}",
                        self.dir.join(ENDPOINTS_FILE).display()
                    )
                });
            }
        }
        self.service_identity(tls, name)
    }

    /// `spiffe://<our trust domain>/service/<name>`: a storage node named
    /// by the gateway, or a service the endpoints file does not describe.
    pub fn service_identity(&self, tls: &ClientTls, name: &str) -> Result<Identity> {
        let td = tls
            .identity()
            .map_or(DEFAULT_TRUST_DOMAIN, |id| id.trust_domain());
        Identity::new(td, "service", name)
            .map_err(|e| anyhow!("{name:?} is not a service identity name: {e}"))
    }

    /// A connected mutual-TLS channel to `service`, which must present the
    /// identity expected there.
    pub async fn channel(&self, service: Service) -> Result<Channel> {
        let addr = self.endpoint(service)?;
        let tls = self.client_tls()?;
        let expected = self.identity(service, &tls)?;
        tls.expecting(&expected)
            .connect(&addr)
            .await
            .map_err(|e| anyhow!("{}", error_chain(&e)))
            .with_context(|| format!("cannot reach the {} at {addr}", service.name()))
    }

    /// A request carrying this command's deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(message);
        r.set_timeout(Duration::from_secs(self.timeout.max(1)));
        r
    }
}

/// An error and its causes on one line (a refused server identity is
/// deep in the chain of a connect error).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

/// `--as` names are file stems in DIR/pki: 1..=63 of `[a-z0-9-]`.
fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        bail!("--as {name:?}: expected a name like owner or clinician ([a-z0-9-], 1..63 chars)")
    }
}

/// Human table (default) or JSON for scripts.
#[derive(Args, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl OutputArgs {
    /// Prints `value` as pretty JSON when --json, else runs `human`.
    pub fn emit(&self, value: &serde_json::Value, human: impl FnOnce()) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human();
        }
        Ok(())
    }

    /// Prints a list: a JSON array of `json(item)` when --json; else
    /// `none` when the list is empty, or `human(list)`.
    pub fn emit_list<T>(
        &self,
        list: &[T],
        json: impl Fn(&T) -> serde_json::Value,
        none: &str,
        human: impl FnOnce(&[T]),
    ) -> Result<()> {
        let value = serde_json::Value::Array(list.iter().map(json).collect());
        self.emit(&value, || {
            if list.is_empty() {
                println!("{none}");
            } else {
                human(list);
            }
        })
    }
}

/// Every item of a paged list RPC: `fetch(token)` answers one page (its
/// items and the next page token, empty after the last page).
pub async fn all_pages<T>(
    mut fetch: impl AsyncFnMut(String) -> Result<(Vec<T>, String)>,
) -> Result<Vec<T>> {
    let mut list = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = fetch(std::mem::take(&mut token)).await?;
        list.extend(items);
        if next.is_empty() {
            return Ok(list);
        }
        token = next;
    }
}

/// The page size the CLI asks for (every page stays under the message limit).
pub const PAGE_SIZE: u32 = 500;

/// Turns a gRPC status from `what` (e.g. "approve") into a one-line error
/// in plain words: `refused: ...`, `not found: ...`, ...
pub fn status_error(what: &str, s: &Status) -> anyhow::Error {
    let m = s.message();
    let words = match s.code() {
        Code::PermissionDenied => "refused",
        Code::Unauthenticated => "not authenticated",
        Code::NotFound => "not found",
        Code::InvalidArgument => "invalid",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "not possible now",
        Code::OutOfRange => "out of range",
        Code::ResourceExhausted => "too large or too many",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "timed out",
        Code::Cancelled if tessera_tls::timed_out(s) => "timed out",
        Code::Cancelled => "cancelled",
        Code::Aborted => "aborted",
        Code::Unimplemented => "not supported by the server",
        Code::DataLoss => "data loss on the server",
        Code::Internal => "server error",
        Code::Unknown => "unknown error",
        Code::Ok => "unexpected OK status",
    };
    // Some servers already lead with the same words ("already exists: ...")
    // or with the code's own name ("data loss: ..."): not twice.
    let code_name = match s.code() {
        Code::PermissionDenied => "permission denied",
        Code::InvalidArgument => "invalid argument",
        Code::FailedPrecondition => "failed precondition",
        Code::ResourceExhausted => "resource exhausted",
        Code::DataLoss => "data loss",
        Code::Unauthenticated
        | Code::NotFound
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Aborted
        | Code::Unimplemented
        | Code::Internal
        | Code::Unknown
        | Code::Ok => words,
    };
    let m = [words, code_name]
        .iter()
        .find_map(|w| m.strip_prefix(w).and_then(|rest| rest.strip_prefix(": ")))
        .unwrap_or(m);
    if m.is_empty() {
        anyhow!("{what}: {words}")
    } else {
        anyhow!("{what}: {words}: {m}")
    }
}

/// Runs an async command body on a fresh runtime (the CLI is synchronous),
/// inside one `tessera` span: every call the command makes carries its
/// trace context (`traceparent`), so the services' spans of one command
/// share a trace. With `OTEL_EXPORTER_OTLP_ENDPOINT` set
/// (`http://host:4317`) the command's own span is exported there too.
pub fn block_on<F: Future<Output = Result<()>>>(f: F) -> Result<()> {
    use tracing::Instrument;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty());
        // A second command in the same process (tests) keeps the first
        // one's tracer: tracing is best effort, the command runs anyway.
        let telemetry =
            tessera_runtime::telemetry::init_client("tessera-cli", endpoint.as_deref()).ok();
        let command = std::env::args()
            .nth(1)
            .filter(|c| c.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or_default();
        let span = tracing::info_span!("command", otel.name = %format!("tessera {command}"));
        let result = f.instrument(span).await;
        if let Some(mut t) = telemetry {
            t.shutdown();
        }
        result
    })
}

/// Parses a duration: plain seconds (`90`) or number+unit groups
/// (`30s`, `15m`, `1h`, `1h30m`, `7d`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use s, m, h, d)")),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a number before {c:?}"))?;
        num.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?}: too long"))?;
    }
    if !num.is_empty() {
        return Err(format!("{s:?}: missing unit after {num} (use s, m, h, d)"));
    }
    Ok(Duration::from_secs(total))
}

/// `spiffe://tessera.local/user/owner` -> `user/owner` (other trust
/// domains are shown in full).
pub fn short_identity(uri: &str) -> &str {
    uri.strip_prefix("spiffe://tessera.local/").unwrap_or(uri)
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SSZ` (UTC); empty for 0, `@SECS` past
/// the calendar's range.
pub fn utc(secs: u64) -> String {
    if secs == 0 {
        return String::new();
    }
    let at = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok());
    let Some(t) = at else {
        return format!("@{secs}");
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Seconds since the Unix epoch now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A plain-text table: a header row, then rows, columns padded to the
/// widest cell (cells longer than `max_cell` chars are cut with `…`).
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    max_cell: usize,
}

impl Table {
    /// A table with these column titles.
    pub fn new<I, S>(header: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            max_cell: 48,
        }
    }

    /// Longest cell shown in full.
    pub fn max_cell(mut self, n: usize) -> Self {
        self.max_cell = n.max(2);
        self
    }

    /// Adds a row (missing cells are blank, extra cells dropped).
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut r: Vec<String> = cells
            .into_iter()
            .map(|c| {
                let c: String = c.into();
                cut(&one_line(&c), self.max_cell)
            })
            .collect();
        r.resize(self.header.len(), String::new());
        self.rows.push(r);
    }

    /// The table as text, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max - 1).collect();
        t.push('…');
        t
    }
}

/// A user name (`owner`) as its identity URI in the development trust
/// domain; a full `spiffe://` URI is kept as given.
pub(crate) fn owner_uri(owner: &str) -> String {
    if owner.starts_with("spiffe://") {
        owner.to_owned()
    } else {
        format!("spiffe://{}/user/{owner}", tessera_pki::TRUST_DOMAIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn durations() {
        for (s, secs) in [
            ("90", 90),
            ("30s", 30),
            ("15m", 900),
            ("1h", 3600),
            ("1h30m", 5400),
            ("7d", 604_800),
        ] {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        for bad in ["", "h", "1x", "1h30", "-5", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "");
        assert_eq!(utc(1), "1970-01-01 00:00:01Z");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(utc(u64::MAX), format!("@{}", u64::MAX));
    }

    #[test]
    fn tables_pad_and_cut() {
        let mut t = Table::new(["A", "LONG HEADER"]).max_cell(5);
        t.row(["x", "y"]);
        t.row(["abcdefgh", "line\nbreak"]);
        t.row(["only"]);
        assert_eq!(
            t.render(),
            "A      LONG HEADER\nx      y\nabcd…  line…\nonly\n"
        );
    }

    #[test]
    fn status_words() {
        let e = status_error("approve", &Status::permission_denied("not yours"));
        assert_eq!(e.to_string(), "approve: refused: not yours");
        let e = status_error(
            "store",
            &Status::already_exists("already exists: study st-1"),
        );
        assert_eq!(e.to_string(), "store: already exists: study st-1");
        let e = status_error(
            "retrieve",
            &Status::data_loss("data loss: study st-1 is tampered"),
        );
        assert_eq!(
            e.to_string(),
            "retrieve: data loss on the server: study st-1 is tampered"
        );
        let e = status_error("list", &Status::not_found(""));
        assert_eq!(e.to_string(), "list: not found");
    }

    fn conn(dir: &Path, name: &str) -> ConnArgs {
        ConnArgs {
            dir: dir.to_owned(),
            as_name: Some(name.to_owned()),
            cert: None,
            key: None,
            ca: None,
            keyserver: None,
            gateway: None,
            keyserver_identity: None,
            gateway_identity: None,
            timeout: 30,
            connect_timeout: 5,
        }
    }

    #[test]
    fn identity_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = conn(dir.path(), "owner");
        let e = a.tls_files().unwrap_err().to_string();
        assert!(e.contains("tessera dev up"), "{e}");
        tessera_pki::generate(&dir.path().join(PKI_DIR)).unwrap();
        let f = a.tls_files().unwrap();
        assert_eq!(f.cert, dir.path().join("pki/owner.crt"));
        a.as_name = Some("../ca".into());
        assert!(a.tls_files().is_err());
        a.as_name = None;
        assert!(a.tls_files().unwrap_err().to_string().contains("--as"));

        let e = conn(dir.path(), "owner")
            .endpoint(Service::Keyserver)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--keyserver"), "{e}");
        let mut eps = Endpoints::default();
        eps.endpoints
            .insert("keyserver".into(), "localhost:7400".into());
        eps.save(dir.path()).unwrap();
        let mut a = conn(dir.path(), "owner");
        assert_eq!(a.endpoint(Service::Keyserver).unwrap(), "localhost:7400");
        assert!(a.endpoint(Service::Gateway).is_err());
        a.gateway = Some("127.0.0.1:1".into());
        assert_eq!(a.endpoint(Service::Gateway).unwrap(), "127.0.0.1:1");

        // Identities: the flag, else endpoints.toml, else the default.
        let tls = a.client_tls().unwrap();
        assert_eq!(
            a.identity(Service::Gateway, &tls).unwrap().uri(),
            "spiffe://tessera.local/service/gateway"
        );
        eps.identities.insert(
            "gateway".into(),
            "spiffe://tessera.local/service/gw-east".into(),
        );
        eps.save(dir.path()).unwrap();
        assert_eq!(
            a.identity(Service::Gateway, &tls).unwrap().uri(),
            "spiffe://tessera.local/service/gw-east"
        );
        a.gateway_identity = Some("spiffe://tessera.local/service/gw-west".into());
        assert_eq!(
            a.identity(Service::Gateway, &tls).unwrap().uri(),
            "spiffe://tessera.local/service/gw-west"
        );
        a.gateway_identity = Some("gateway".into());
        assert!(a.identity(Service::Gateway, &tls).is_err());
        assert_eq!(
            a.service_identity(&tls, "storage-2").unwrap().uri(),
            "spiffe://tessera.local/service/storage-2"
        );
    }
}
