//! The whole Tessera suite in one process, on loopback, from one directory:
//!
//! ```text
//! DIR/pki/            development PKI (made once, kept)
//! DIR/secrets/        keyserver KEK and gateway vault key (0600, made once)
//! DIR/data/           keyserver.redb, vault.redb, storage-N/objects.redb
//! DIR/endpoints.toml  service name -> address, for clients (`tessera --dir DIR`)
//! ```
//!
//! Every service is the real one (the same `App` its binary runs) with
//! real mutual TLS between them. With [`DevOptions::bin_dir`] each service
//! runs as its own process instead (its binary, its config written to
//! `DIR/config/NAME.toml`, its log in `DIR/logs/NAME.log`), as in a pod. Used by `tessera dev up`, `tessera demo`,
//! `tessera bench e2e` and the gateway's integration tests.
#![forbid(unsafe_code)]

mod bench_storage;
mod process;

pub use bench_storage::{BenchError, BenchOptions, BenchReport, bench_storage};
pub use process::default_bin_dir;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use tessera_runtime::{ConfigSource, RunningServer, load_config};

/// File name of the endpoints map inside a dev directory.
pub const ENDPOINTS_FILE: &str = "endpoints.toml";

/// Why the stack could not start.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{service}: {detail}")]
    Service { service: String, detail: String },
    #[error("endpoints: {0}")]
    Endpoints(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.to_owned(),
        source,
    }
}

fn svc(service: &str) -> impl FnOnce(String) -> DevError + '_ {
    move |detail| DevError::Service {
        service: service.to_owned(),
        detail,
    }
}

/// `DIR/endpoints.toml`: where each service listens and who answers there.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    /// Service name (`gateway`, `keyserver`, `storage-1`, ...) -> `host:port`.
    pub endpoints: BTreeMap<String, String>,
    /// Service name -> the SPIFFE identity its certificate must carry
    /// (clients refuse any other server there).
    #[serde(default)]
    pub identities: BTreeMap<String, String>,
    /// Service name -> its admin listener (`host:port`, plain HTTP:
    /// `/metrics`, `/live`, `/ready`); the `[admin]` table.
    #[serde(default)]
    pub admin: BTreeMap<String, String>,
}

impl Endpoints {
    /// Reads `DIR/endpoints.toml`.
    pub fn load(dir: &Path) -> Result<Self, DevError> {
        let path = dir.join(ENDPOINTS_FILE);
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        toml::from_str(&text).map_err(|e| DevError::Endpoints(format!("{}: {e}", path.display())))
    }

    /// Writes `DIR/endpoints.toml` atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<(), DevError> {
        let path = dir.join(ENDPOINTS_FILE);
        let tmp = dir.join(".endpoints.toml.tmp");
        let text = toml::to_string(self).map_err(|e| DevError::Endpoints(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// The identity expected at `service`, when the file names one.
    pub fn identity(&self, service: &str) -> Option<&str> {
        self.identities.get(service).map(String::as_str)
    }

    /// The address of `service`.
    pub fn get(&self, service: &str) -> Result<&str, DevError> {
        self.endpoints
            .get(service)
            .map(String::as_str)
            .ok_or_else(|| {
                DevError::Endpoints(format!("no endpoint named {service:?} in {ENDPOINTS_FILE}"))
            })
    }
}

/// How to start the stack.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Storage nodes (2..=16).
    pub storage_nodes: usize,
    /// First port: keyserver = base, watermark = base+1, segmentation =
    /// base+2, gateway = base+3, storage-N = base+10+N. `None`: free ports
    /// chosen by the OS (tests, demo).
    pub base_port: Option<u16>,
    /// Erasure coding `(k, m)` of every stored object across the nodes
    /// (each node its own zone, `zone-a`, `zone-b`, ...); `None`: whole
    /// objects, one copy each.
    pub erasure: Option<(usize, usize)>,
    /// With `erasure`: seconds between the gateway's background repair
    /// passes (`None`: the gateway's default, hourly).
    pub repair_interval_secs: Option<u64>,
    /// Storage nodes per zone: 1 gives each node its own zone; 2 puts
    /// storage-1 and -2 in `zone-a`, -3 and -4 in `zone-b`, ...
    pub nodes_per_zone: usize,
    /// The one size limit: the gateway's, the watermark and segmentation
    /// services' `max_image_bytes`, and the storage nodes' per-object cap
    /// derived from it ([`gateway_service::sizes::node_object_bytes_needed`]).
    pub max_image_bytes: u64,
    /// Overrides the derived per-object cap of every storage node (tests
    /// of a misconfigured suite); `None`: derived from `max_image_bytes`.
    pub storage_max_object_bytes: Option<u64>,
    /// The gateway's identity vault on this PostgreSQL database (a libpq
    /// connection string, written to `DIR/secrets/vault-pg.url`) instead
    /// of `DIR/data/vault.redb`.
    pub vault_postgres_url: Option<String>,
    /// Gateway processes' worth of replicas on the one vault (1..=8; more
    /// than one needs `vault_postgres_url`). Replicas 2.. are named
    /// `gateway-2`, ... in `endpoints.toml`, carry the gateway's identity
    /// and run no DICOM listeners.
    pub gateway_replicas: usize,
    /// Run every service as a child process from the binaries in this
    /// directory (`keyserver`, `storage-node`, `watermark`,
    /// `segmentation`, `gateway`) instead of in this process; killed when
    /// the stack shuts down or is dropped. One gateway only; no restarts.
    pub bin_dir: Option<PathBuf>,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            storage_nodes: 3,
            base_port: None,
            erasure: None,
            repair_interval_secs: None,
            nodes_per_zone: 1,
            max_image_bytes: gateway_service::config::DEFAULT_MAX_IMAGE_BYTES,
            storage_max_object_bytes: None,
            vault_postgres_url: None,
            gateway_replicas: 1,
            bin_dir: None,
        }
    }
}

impl DevOptions {
    /// What `tessera dev up` and the demo run: 5 storage nodes, each its
    /// own zone, every object erasure-coded 3 + 2 (any 2 nodes may be lost;
    /// 3 clouds must collude to rebuild a share).
    pub fn dev_up() -> Self {
        Self {
            storage_nodes: 5,
            erasure: auto_erasure(5),
            ..Self::default()
        }
    }
}

/// The erasure coding `dev up` picks for `nodes` storage nodes: 3 + 2 from
/// 5 nodes, 2 + 2 on 4, 2 + 1 on 3 (any one node lost), whole objects on
/// 2. Never k = 1: at least two clouds must collude to rebuild a share.
pub fn auto_erasure(nodes: usize) -> Option<(usize, usize)> {
    match nodes {
        0..=2 => None,
        3 => Some((2, 1)),
        4 => Some((2, 2)),
        _ => Some((3, 2)),
    }
}

/// The zone of the `i`-th storage node (1-based): `zone-a`, `zone-b`, ...
pub fn dev_zone(i: usize) -> String {
    let letter = (b'a' + ((i.saturating_sub(1)) % 26) as u8) as char;
    format!("zone-{letter}")
}

enum Running {
    Keyserver(keyserver::RunningApp),
    Storage(RunningServer),
    Watermark(watermark_service::RunningApp),
    Segmentation(segmentation_service::RunningApp),
    Gateway(gateway_service::RunningApp),
    Process(process::ChildService),
}

impl Running {
    fn admin_addr(&self) -> Option<SocketAddr> {
        match self {
            Running::Keyserver(a) => a.admin_addr(),
            Running::Storage(a) => a.admin_addr(),
            Running::Watermark(a) => a.admin_addr(),
            Running::Segmentation(a) => a.admin_addr(),
            Running::Gateway(a) => a.admin_addr(),
            Running::Process(p) => p.addr("admin"),
        }
    }

    async fn shutdown(self, grace: Duration) {
        match self {
            Running::Keyserver(a) => a.shutdown(grace).await,
            Running::Storage(a) => a.shutdown(grace).await,
            Running::Watermark(a) => a.shutdown(grace).await,
            Running::Segmentation(a) => a.shutdown(grace).await,
            Running::Gateway(a) => a.shutdown(grace).await,
            Running::Process(p) => p.shutdown(grace).await,
        }
    }
}

/// The running suite.
pub struct DevStack {
    dir: PathBuf,
    endpoints: Endpoints,
    /// In start order; shut down in reverse.
    services: Vec<(String, Option<Running>)>,
    storage_configs: BTreeMap<String, storage_node::Config>,
    gateway_config: Option<gateway_service::Config>,
    dicom_addr: Option<SocketAddr>,
    /// The DICOM TLS listener (`dicom.scp.tls_listen`).
    dicom_tls_addr: Option<SocketAddr>,
    dicomweb_addr: Option<SocketAddr>,
    /// [`DevOptions::bin_dir`]: the services are child processes.
    bin_dir: Option<PathBuf>,
}

/// The AE title of the dev gateway's C-STORE SCP.
pub const DICOM_AE_TITLE: &str = "TESSERA";
/// Calling AE titles the dev SCP accepts.
pub const DICOM_CALLING_AES: [&str; 3] = ["STORESCU", "MODALITY", "TESSERA-BENCH"];
/// Query/retrieve peers of the dev SCP: (calling AE title, user, network).
/// `FARVIEWER` is bound to a network loopback is not in (always refused).
pub const DICOM_PEERS: [(&str, &str, &str); 5] = [
    ("VIEWER", "clinician", "127.0.0.0/8"),
    ("VIEWER2", "clinician2", "127.0.0.0/8"),
    ("RESEARCH", "researcher", "127.0.0.0/8"),
    ("OWNERVIEW", "owner", "127.0.0.0/8"),
    ("FARVIEWER", "clinician", "192.0.2.0/24"),
];
/// The data owner of studies the dev SCP receives.
pub const DICOM_OWNER: &str = "spiffe://tessera.local/user/owner";
/// The development identity with the `emergency` permission (may break
/// the glass); `clinician2` has none.
pub const DEV_EMERGENCY: &str = "spiffe://tessera.local/user/clinician";
/// The development delegates: `(owner, delegate)`. `clinician` may store
/// studies on `owner`'s behalf; `clinician2` may not.
pub const DEV_DELEGATES: [(&str, &str); 1] = [(
    "spiffe://tessera.local/user/owner",
    "spiffe://tessera.local/user/clinician",
)];

/// Makes the development delegates (through the keyserver core, audited as
/// `delegate.added` by the owner, before the keyserver listens). Already
/// present (a restart on the same data) is fine.
async fn seed_delegates(core: &keyserver::core::Core) -> Result<(), DevError> {
    for (owner, delegate) in DEV_DELEGATES {
        match core.add_delegate(owner, delegate).await {
            Ok(()) | Err(keyserver::KeyServerError::AlreadyExists(_)) => {}
            Err(e) => return Err(svc("keyserver")(format!("seeding delegates: {e}"))),
        }
    }
    Ok(())
}

fn listen(base: Option<u16>, offset: u16) -> String {
    match base {
        Some(b) => format!("127.0.0.1:{}", b.saturating_add(offset)),
        None => "127.0.0.1:0".into(),
    }
}

fn tls_section(pki: &Path, name: &str, table: &str) -> String {
    let d = pki.display();
    format!("[{table}]\nca = \"{d}/ca.crt\"\ncert = \"{d}/{name}.crt\"\nkey = \"{d}/{name}.key\"\n")
}

fn server_section(pki: &Path, name: &str, listen: &str) -> String {
    format!(
        "[server]\nlisten = \"{listen}\"\n{}[admin]\nlisten = \"127.0.0.1:0\"\n",
        tls_section(pki, name, "server.tls")
    )
}

/// The identity of a dev service: `spiffe://tessera.local/service/<name>`.
pub fn service_identity(name: &str) -> String {
    format!("spiffe://{}/service/{name}", tessera_pki::TRUST_DOMAIN)
}

/// The gateway's `[vault]`: the redb file, or the PostgreSQL database
/// whose connection string goes to `secrets/vault-pg.url` (owner-only).
fn vault_section(data: &Path, vault_key: &Path, opts: &DevOptions) -> Result<String, DevError> {
    if !(1..=8).contains(&opts.gateway_replicas) {
        return Err(svc("gateway")("gateway replicas must be 1..=8".into()));
    }
    let Some(url) = &opts.vault_postgres_url else {
        if opts.gateway_replicas > 1 {
            return Err(svc("gateway")(
                "several gateway replicas share one vault: they need PostgreSQL".into(),
            ));
        }
        return Ok(format!(
            "[vault]\npath = \"{}\"\nkey_file = \"{}\"\n",
            data.join("vault.redb").display(),
            vault_key.display()
        ));
    };
    let url_file = vault_key.with_file_name("vault-pg.url");
    write_private(&url_file, url.as_bytes())?;
    Ok(format!(
        "[vault]\nbackend = \"postgres\"\nkey_file = \"{}\"\npostgres_url_file = \"{}\"\n",
        vault_key.display(),
        url_file.display()
    ))
}

/// `localhost:PORT`: the dev certificates name `localhost`.
fn local(addr: SocketAddr) -> String {
    format!("localhost:{}", addr.port())
}

fn parse<T: serde::de::DeserializeOwned + tessera_runtime::Validate>(
    service: &str,
    text: &str,
    prefix: &str,
) -> Result<T, DevError> {
    load_config(&ConfigSource::from_text(text, BTreeMap::new()), prefix).map_err(|e| {
        DevError::Service {
            service: service.into(),
            detail: e.to_string(),
        }
    })
}

/// Writes 32 random bytes to `path` (0600) unless it exists.
fn ensure_secret(path: &Path) -> Result<(), DevError> {
    if path.exists() {
        return Ok(());
    }
    let mut k = [0u8; 32];
    SystemRandom::new()
        .fill(&mut k)
        .map_err(|_| svc("secrets")("no randomness".into()))?;
    write_private(path, &k)
}

/// Writes `bytes` to a new owner-only (0600) file at `path`, replacing one
/// that is there, and syncs it.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io(path))?;
    std::io::Write::write_all(&mut f, bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

impl DevStack {
    /// Creates what is missing under `dir` and starts every service.
    pub async fn start(dir: &Path, opts: &DevOptions) -> Result<Self, DevError> {
        if !(2..=16).contains(&opts.storage_nodes) {
            return Err(svc("options")("storage nodes must be 2..=16".into()));
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
        let pki = dir.join("pki");
        if !pki.join("ca.crt").exists() {
            tessera_pki::init_dir(&pki, false).map_err(|e| svc("pki")(e.to_string()))?;
        }
        let secrets = dir.join("secrets");
        let data = dir.join("data");
        for d in [&secrets, &data] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        let kek = secrets.join("keyserver.kek");
        let vault_key = secrets.join("vault.key");
        ensure_secret(&kek)?;
        ensure_secret(&vault_key)?;

        let mut stack = DevStack {
            dir: dir.clone(),
            endpoints: Endpoints::default(),
            services: Vec::new(),
            storage_configs: BTreeMap::new(),
            gateway_config: None,
            dicom_addr: None,
            dicom_tls_addr: None,
            dicomweb_addr: None,
            bin_dir: opts.bin_dir.clone(),
        };
        let base = opts.base_port;
        let r = stack
            .start_all(&pki, &data, &kek, &vault_key, base, opts)
            .await;
        if let Err(e) = r {
            stack.shutdown().await;
            return Err(e);
        }
        stack.endpoints.save(&dir)?;
        Ok(stack)
    }

    async fn start_all(
        &mut self,
        pki: &Path,
        data: &Path,
        kek: &Path,
        vault_key: &Path,
        base: Option<u16>,
        opts: &DevOptions,
    ) -> Result<(), DevError> {
        // Keyserver: `clinician` holds the `emergency` permission
        // (break-glass) and owners may set webhooks to receivers whose
        // certificates the development CA signed.
        let text = format!(
            "{}[keyserver]\ndb_path = \"{}\"\nkek_file = \"{}\"\n\
             [keyserver.access]\nemergency = [\"{DEV_EMERGENCY}\"]\n\
             [keyserver.webhook]\nca_file = \"{}\"\n",
            server_section(pki, "keyserver", &listen(base, 0)),
            data.join("keyserver.redb").display(),
            kek.display(),
            pki.join("ca.crt").display()
        );
        let cfg: keyserver::Config = parse("keyserver", &text, keyserver::config::ENV_PREFIX)?;
        let ks = match &opts.bin_dir {
            Some(bin) => {
                if opts.gateway_replicas > 1 {
                    return Err(svc("options")(
                        "gateway replicas run in this process only".into(),
                    ));
                }
                // Delegates seeded through a core of our own (no webhook
                // worker), closed again before the keyserver process opens
                // the database.
                let mut seed = cfg.clone();
                seed.keyserver.webhook = None;
                let app =
                    keyserver::App::build(&seed).map_err(|e| svc("keyserver")(e.to_string()))?;
                seed_delegates(app.core()).await?;
                drop(app);
                local(
                    self.spawn_process(bin, "keyserver", "keyserver", &text)
                        .await?,
                )
            }
            None => {
                let app =
                    keyserver::App::build(&cfg).map_err(|e| svc("keyserver")(e.to_string()))?;
                seed_delegates(app.core()).await?;
                let app = app
                    .spawn()
                    .await
                    .map_err(|e| svc("keyserver")(e.to_string()))?;
                let ks = local(app.local_addr());
                self.add("keyserver", ks.clone(), Running::Keyserver(app));
                ks
            }
        };

        // Storage nodes, their per-object cap derived from the one limit.
        let max_image = opts.max_image_bytes;
        let cap = opts.storage_max_object_bytes.unwrap_or_else(|| {
            gateway_service::sizes::node_object_bytes_needed(max_image, opts.erasure)
        });
        let mut nodes = Vec::new();
        for i in 1..=opts.storage_nodes {
            let name = format!("storage-{i}");
            if !pki.join(format!("{name}.crt")).exists() {
                return Err(svc(&name)(format!(
                    "the PKI in {} has no certificate for {name}",
                    pki.display()
                )));
            }
            let text = format!(
                "node_id = \"{name}\"\ndata_dir = \"{}\"\nmax_object_bytes = {cap}\n{}",
                data.join(&name).display(),
                server_section(pki, &name, &listen(base, 10 + i as u16)),
            );
            let cfg: storage_node::Config = parse(&name, &text, storage_node::config::ENV_PREFIX)?;
            let addr = match &opts.bin_dir {
                Some(bin) => {
                    self.spawn_process(bin, "storage-node", &name, &text)
                        .await?
                }
                None => self.spawn_storage(&name, cfg.clone()).await?,
            };
            // Restarts reuse the bound address so the gateway finds it.
            let mut fixed = cfg;
            fixed.server.listen = addr;
            self.storage_configs.insert(name.clone(), fixed);
            nodes.push((name, local(addr)));
        }

        // Watermark and segmentation.
        let text = format!(
            "{}[keyserver]\naddress = \"{ks}\"\nidentity = \"{}\"\n{}[watermark]\nmax_concurrent_jobs = 8\nmax_image_bytes = {max_image}\n",
            server_section(pki, "watermark", &listen(base, 1)),
            service_identity("keyserver"),
            tls_section(pki, "watermark", "keyserver.tls"),
        );
        let cfg: watermark_service::Config =
            parse("watermark", &text, watermark_service::config::ENV_PREFIX)?;
        let wm = match &opts.bin_dir {
            Some(bin) => local(
                self.spawn_process(bin, "watermark", "watermark", &text)
                    .await?,
            ),
            None => {
                let app = watermark_service::App::build(&cfg)
                    .map_err(|e| svc("watermark")(e.to_string()))?
                    .spawn()
                    .await
                    .map_err(|e| svc("watermark")(e.to_string()))?;
                let wm = local(app.local_addr());
                self.add("watermark", wm.clone(), Running::Watermark(app));
                wm
            }
        };

        let text = format!(
            "{}[segmentation]\nmax_image_bytes = {max_image}\n",
            server_section(pki, "segmentation", &listen(base, 2))
        );
        let cfg: segmentation_service::Config = parse(
            "segmentation",
            &text,
            segmentation_service::config::ENV_PREFIX,
        )?;
        let seg = match &opts.bin_dir {
            Some(bin) => local(
                self.spawn_process(bin, "segmentation", "segmentation", &text)
                    .await?,
            ),
            None => {
                let app = segmentation_service::App::build(&cfg)
                    .map_err(|e| svc("segmentation")(e.to_string()))?
                    .spawn()
                    .await
                    .map_err(|e| svc("segmentation")(e.to_string()))?;
                let seg = local(app.local_addr());
                self.add("segmentation", seg.clone(), Running::Segmentation(app));
                seg
            }
        };

        // Gateway.
        // Every upstream with the identity it must present.
        let mut text = format!(
            "{}{}[keyserver]\naddress = \"{ks}\"\nidentity = \"{}\"\n\
             [watermark]\naddress = \"{wm}\"\nidentity = \"{}\"\n\
             [segmentation]\naddress = \"{seg}\"\nidentity = \"{}\"\n\
             [gateway]\nmax_image_bytes = {max_image}\n",
            server_section(pki, "gateway", &listen(base, 3)),
            tls_section(pki, "gateway", "client_tls"),
            service_identity("keyserver"),
            service_identity("watermark"),
            service_identity("segmentation"),
        );
        text.push_str(&vault_section(data, vault_key, opts)?);
        for (i, (name, addr)) in nodes.iter().enumerate() {
            text.push_str(&format!(
                "[[storage_nodes]]\nname = \"{name}\"\naddress = \"{addr}\"\nzone = \"{}\"\nidentity = \"{}\"\n",
                dev_zone(i / opts.nodes_per_zone.max(1) + 1),
                service_identity(name)
            ));
        }
        if let Some((k, m)) = opts.erasure {
            text.push_str(&format!("[erasure]\ndata = {k}\nparity = {m}\n"));
            if let Some(s) = opts.repair_interval_secs {
                text.push_str(&format!("repair_interval_secs = {s}\n"));
            }
        }
        // `[dicom] file_requests` (a refused DICOM retrieve files an access
        // request for its caller) when TESSERA_DEV_DICOM_FILE_REQUESTS=1.
        if std::env::var("TESSERA_DEV_DICOM_FILE_REQUESTS").is_ok_and(|v| v.trim() == "1") {
            text.push_str("[dicom]\nfile_requests = true\n");
        }
        // The C-STORE SCP (plain DICOM on loopback) for the dev AE titles.
        text.push_str(&format!(
            "[dicom.scp]\nlisten = \"{}\"\ntls_listen = \"{}\"\nae_title = \"{DICOM_AE_TITLE}\"\nallowed_calling_aes = {:?}\nowner = \"{DICOM_OWNER}\"\n",
            listen(base, 4),
            listen(base, 6),
            DICOM_CALLING_AES,
        ));
        // DICOMweb (HTTPS, mutual TLS with the suite's certificates); its
        // STOW-RS bound from TESSERA_DEV_DICOMWEB_MAX_REQUEST_BYTES, if set.
        text.push_str(&format!("[dicomweb]\nlisten = \"{}\"\n", listen(base, 5)));
        if let Ok(max) = std::env::var("TESSERA_DEV_DICOMWEB_MAX_REQUEST_BYTES") {
            text.push_str(&format!("max_request_bytes = {}\n", max.trim()));
        }
        // Query/retrieve peers on loopback (and one bound to a network the
        // loopback is not in), and the C-MOVE destination named by
        // TESSERA_DEV_MOVE_DESTINATION=AE=host:port, if set.
        for (ae, user, net) in DICOM_PEERS {
            text.push_str(&format!(
                "[[dicom.scp.peers]]\nae_title = \"{ae}\"\nidentity = \"spiffe://tessera.local/user/{user}\"\nnetworks = [\"{net}\"]\n"
            ));
        }
        if let Ok(dest) = std::env::var("TESSERA_DEV_MOVE_DESTINATION")
            && let Some((ae, addr)) = dest.split_once('=')
        {
            text.push_str(&format!(
                "[[dicom.scp.move_destinations]]\nae_title = {ae:?}\naddress = {addr:?}\n"
            ));
        }
        let cfg: gateway_service::Config =
            parse("gateway", &text, gateway_service::config::ENV_PREFIX)?;
        let mut fixed = cfg.clone();
        let addr = match &opts.bin_dir {
            Some(bin) => self.spawn_gateway_process(bin, &text).await?,
            None => self.spawn_gateway(&cfg).await?,
        };
        fixed.server.listen = addr;
        if let (Some(scp), Some(bound)) = (fixed.dicom.scp.as_mut(), self.dicom_addr) {
            scp.listen = bound;
            if let Some(tls) = self.dicom_tls_addr {
                scp.tls_listen = Some(tls);
            }
        }
        if let (Some(w), Some(bound)) = (fixed.dicomweb.as_mut(), self.dicomweb_addr) {
            w.listen = bound;
        }
        // Replicas on the same vault database: the same config on a free
        // port, without the DICOM listeners.
        for i in 2..=opts.gateway_replicas {
            let name = format!("gateway-{i}");
            let mut replica = cfg.clone();
            replica.server.listen = "127.0.0.1:0"
                .parse()
                .map_err(|e| svc(&name)(format!("{e}")))?;
            replica.dicom.scp = None;
            replica.dicomweb = None;
            let app = gateway_service::App::build(&replica)
                .map_err(|e| svc(&name)(e.to_string()))?
                .spawn()
                .await
                .map_err(|e| svc(&name)(e.to_string()))?;
            let addr = local(app.local_addr());
            self.add(&name, addr, Running::Gateway(app));
            // A replica is the gateway: it presents the gateway's identity.
            self.endpoints
                .identities
                .insert(name, service_identity("gateway"));
        }
        self.gateway_config = Some(fixed);
        Ok(())
    }

    /// Starts `BIN_DIR/BINARY --config DIR/config/NAME.toml` and records it
    /// under `name`; its bound address.
    async fn spawn_process(
        &mut self,
        bin_dir: &Path,
        binary: &str,
        name: &str,
        config: &str,
    ) -> Result<SocketAddr, DevError> {
        let child = process::ChildService::start(&self.dir, bin_dir, binary, name, config).await?;
        let addr = child
            .addr("listening")
            .ok_or_else(|| svc(name)("printed no listening= address".into()))?;
        self.add(name, local(addr), Running::Process(child));
        Ok(addr)
    }

    /// [`Self::spawn_gateway`] as a process: its DICOM listeners from the
    /// `dicom_listening=`, `dicom_tls_listening=` and `dicomweb_listening=`
    /// lines.
    async fn spawn_gateway_process(
        &mut self,
        bin_dir: &Path,
        config: &str,
    ) -> Result<SocketAddr, DevError> {
        let child =
            process::ChildService::start(&self.dir, bin_dir, "gateway", "gateway", config).await?;
        let addr = child
            .addr("listening")
            .ok_or_else(|| svc("gateway")("printed no listening= address".into()))?;
        for (key, endpoint) in [
            ("dicom_listening", "dicom"),
            ("dicom_tls_listening", "dicom-tls"),
            ("dicomweb_listening", "dicomweb"),
        ] {
            let Some(a) = child.addr(key) else { continue };
            match endpoint {
                "dicom" => self.dicom_addr = Some(a),
                "dicom-tls" => self.dicom_tls_addr = Some(a),
                _ => self.dicomweb_addr = Some(a),
            }
            self.endpoints.endpoints.insert(endpoint.into(), local(a));
        }
        self.add("gateway", local(addr), Running::Process(child));
        Ok(addr)
    }

    /// The process id of a service run as a process ([`DevOptions::bin_dir`]).
    pub fn pid(&self, name: &str) -> Option<u32> {
        let (_, running) = self.services.iter().find(|(n, _)| n == name)?;
        match running.as_ref()? {
            Running::Process(p) => Some(p.pid()),
            Running::Keyserver(_)
            | Running::Storage(_)
            | Running::Watermark(_)
            | Running::Segmentation(_)
            | Running::Gateway(_) => None,
        }
    }

    /// Restarts re-run a service in this process: not for a stack of
    /// processes.
    fn in_process_only(&self, name: &str) -> Result<(), DevError> {
        match self.bin_dir {
            Some(_) => Err(svc(name)(
                "restart: the services run as processes (bin_dir)".into(),
            )),
            None => Ok(()),
        }
    }

    async fn spawn_gateway(
        &mut self,
        cfg: &gateway_service::Config,
    ) -> Result<SocketAddr, DevError> {
        let app = gateway_service::App::build(cfg)
            .map_err(|e| svc("gateway")(e.to_string()))?
            .spawn()
            .await
            .map_err(|e| svc("gateway")(e.to_string()))?;
        let addr = app.local_addr();
        if let Some(dicom) = app.dicom_addr() {
            self.dicom_addr = Some(dicom);
            self.endpoints
                .endpoints
                .insert("dicom".into(), local(dicom));
        }
        if let Some(tls) = app.dicom_tls_addr() {
            self.dicom_tls_addr = Some(tls);
            self.endpoints
                .endpoints
                .insert("dicom-tls".into(), local(tls));
        }
        if let Some(web) = app.dicomweb_addr() {
            self.dicomweb_addr = Some(web);
            self.endpoints
                .endpoints
                .insert("dicomweb".into(), local(web));
        }
        self.add("gateway", local(addr), Running::Gateway(app));
        Ok(addr)
    }

    /// The gateway's config (its vault path and key file, for tests that
    /// inspect the vault while the gateway is stopped).
    pub fn gateway_config(&self) -> Option<&gateway_service::Config> {
        self.gateway_config.as_ref()
    }

    /// Replaces the config [`Self::restart_gateway`] starts the gateway
    /// with (stop it first; tests of settings that need ids known only
    /// once the suite runs, such as an AE-to-request rule).
    pub fn set_gateway_config(&mut self, cfg: gateway_service::Config) {
        self.gateway_config = Some(cfg);
    }

    /// Starts a stopped gateway again on its old address (a restart after a
    /// crash: it finishes interrupted stores and deletes).
    pub async fn restart_gateway(&mut self) -> Result<(), DevError> {
        self.in_process_only("gateway")?;
        let cfg = self
            .gateway_config
            .clone()
            .ok_or_else(|| svc("gateway")("not started".into()))?;
        let mut last = None;
        for _ in 0..50 {
            match self.spawn_gateway(&cfg).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| svc("gateway")("cannot restart".into())))
    }

    async fn spawn_storage(
        &mut self,
        name: &str,
        cfg: storage_node::Config,
    ) -> Result<SocketAddr, DevError> {
        let app = storage_node::App::build(cfg)
            .map_err(|e| svc(name)(e.to_string()))?
            .spawn()
            .await
            .map_err(|e| svc(name)(e.to_string()))?;
        let addr = app.local_addr();
        self.add(name, local(addr), Running::Storage(app));
        Ok(addr)
    }

    fn add(&mut self, name: &str, addr: String, running: Running) {
        self.endpoints.endpoints.insert(name.to_owned(), addr);
        if let Some(admin) = running.admin_addr() {
            self.endpoints
                .admin
                .insert(name.to_owned(), admin.to_string());
        }
        self.endpoints
            .identities
            .insert(name.to_owned(), service_identity(name));
        match self.services.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = Some(running),
            None => self.services.push((name.to_owned(), Some(running))),
        }
    }

    /// The dev directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/pki`.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// Where each service listens.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// A storage node's redb file (to scan it, or to tamper with it).
    pub fn storage_db(&self, name: &str) -> Option<PathBuf> {
        self.storage_configs.get(name).map(|c| c.db_path())
    }

    /// Stops one service (e.g. a storage node, to see the gateway fail
    /// cleanly).
    pub async fn stop(&mut self, name: &str) -> bool {
        let Some(slot) = self.services.iter_mut().find(|(n, _)| n == name) else {
            return false;
        };
        match slot.1.take() {
            Some(r) => {
                r.shutdown(Duration::from_secs(5)).await;
                true
            }
            None => false,
        }
    }

    /// Starts a stopped storage node again on its old address.
    pub async fn restart_storage(&mut self, name: &str) -> Result<(), DevError> {
        self.in_process_only(name)?;
        let cfg = self
            .storage_configs
            .get(name)
            .cloned()
            .ok_or_else(|| svc(name)("no such storage node".into()))?;
        // The port was just released; retry briefly if the OS holds it.
        let mut last = None;
        for _ in 0..50 {
            match self.spawn_storage(name, cfg.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| svc(name)("cannot restart".into())))
    }

    /// Stops everything, gateway first.
    pub async fn shutdown(&mut self) {
        while let Some((_, r)) = self.services.pop() {
            if let Some(r) = r {
                r.shutdown(Duration::from_secs(5)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Endpoints::default();
        e.endpoints
            .insert("gateway".into(), "localhost:7703".into());
        e.identities
            .insert("gateway".into(), service_identity("gateway"));
        e.save(dir.path()).unwrap();
        let back = Endpoints::load(dir.path()).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.get("gateway").unwrap(), "localhost:7703");
        assert_eq!(
            back.identity("gateway"),
            Some("spiffe://tessera.local/service/gateway")
        );
        assert!(back.get("keyserver").is_err());
        assert_eq!(back.identity("keyserver"), None);
        // A file from before identities were written still loads.
        std::fs::write(
            dir.path().join(ENDPOINTS_FILE),
            "[endpoints]\ngateway = \"localhost:1\"\n",
        )
        .unwrap();
        assert_eq!(
            Endpoints::load(dir.path()).unwrap().identity("gateway"),
            None
        );
    }
}
