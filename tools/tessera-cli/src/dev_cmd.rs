//! `tessera dev up --dir DIR`: the whole suite on loopback until Ctrl-C.
//! Makes the development PKI and secrets on first use, keeps data in redb
//! files under DIR, writes `DIR/endpoints.toml` for clients.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::{Args, Subcommand};
use tessera_devstack::{DevOptions, DevStack};

#[derive(Subcommand, Debug)]
pub enum DevCmd {
    /// Start every service (keyserver, storage nodes, watermark,
    /// segmentation, gateway, the gateway's DICOM C-STORE SCP, AE title
    /// TESSERA on P+4, and its DICOMweb on P+5) in this process until Ctrl-C.
    Up(UpArgs),
    /// Play a dishonest cloud in a dev suite: change one byte of a stored
    /// object on a storage node (connecting as DIR/pki/gateway, the only
    /// identity a node lets write), so `verify` and `retrieve` show what
    /// Tessera does about it. Development PKI only.
    Tamper(TamperArgs),
}

#[derive(Args, Debug)]
pub struct TamperArgs {
    /// The storage node (storage-1, ...), as `store` names it.
    #[arg(long)]
    pub node: String,
    /// The object id on that node, as `store` prints it.
    #[arg(long)]
    pub object: String,
    /// Dev directory made by `tessera dev up` (endpoints.toml and pki/).
    #[arg(
        long,
        value_name = "DIR",
        env = "TESSERA_DIR",
        default_value = ".tessera"
    )]
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for the PKI, secrets, redb files and endpoints.toml.
    #[arg(long, default_value = ".tessera")]
    pub dir: PathBuf,
    /// First port: keyserver = P, watermark = P+1, segmentation = P+2,
    /// gateway = P+3, DICOM C-STORE SCP = P+4, DICOMweb = P+5,
    /// storage-N = P+10+N. 0 lets the OS choose free ports.
    #[arg(long, default_value_t = 7400)]
    pub base_port: u16,
    /// Number of storage nodes, each its own zone (zone-a, zone-b, ...;
    /// the development PKI has certificates for storage-1..5).
    #[arg(long = "nodes", visible_alias = "storage-nodes", default_value_t = 5)]
    pub storage_nodes: usize,
    /// Erasure-code every stored object as K data + M parity fragments on
    /// K+M distinct nodes, or `none` (each object whole on one node).
    /// Default: 3+2 on 5 nodes (any 2 nodes may be lost), 2+2 on 4, 2+1 on
    /// 3, none on 2. K >= 2.
    #[arg(long, value_name = "K+M|none", value_parser = parse_erasure_opt)]
    pub erasure: Option<Option<(usize, usize)>>,
    /// Export every service's spans over OTLP/gRPC to this collector
    /// (`http://127.0.0.1:4317`); warnings and errors are logged to stderr.
    #[arg(long, value_name = "URL")]
    pub otlp: Option<String>,
}

fn parse_erasure_opt(s: &str) -> Result<Option<(usize, usize)>, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    parse_erasure(s).map(Some)
}

pub(crate) fn parse_erasure(s: &str) -> Result<(usize, usize), String> {
    let (k, m) = s
        .split_once('+')
        .ok_or_else(|| format!("{s:?}: expected K+M, e.g. 3+2"))?;
    let k: usize = k
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: K is not a number"))?;
    let m: usize = m
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: M is not a number"))?;
    Ok((k, m))
}

pub fn run(cmd: DevCmd) -> Result<()> {
    match cmd {
        DevCmd::Up(a) => up(a),
        DevCmd::Tamper(a) => tamper(a),
    }
}

/// `tessera dev tamper`: XOR 0x10 into the middle byte of the object.
fn tamper(a: TamperArgs) -> Result<()> {
    let endpoints = tessera_devstack::Endpoints::load(&a.dir).map_err(|e| {
        anyhow!(
            "{e} (is `tessera dev up --dir {}` running?)",
            a.dir.display()
        )
    })?;
    let addr = endpoints
        .get(&a.node)
        .map_err(|e| anyhow!("--node {}: {e}", a.node))?
        .to_owned();
    let expected = endpoints
        .identity(&a.node)
        .map(str::to_owned)
        .unwrap_or_else(|| tessera_devstack::service_identity(&a.node));
    let files = tessera_tls::TlsFiles::from_pki_dir(&a.dir.join(crate::client::PKI_DIR), "gateway");
    crate::client::block_on(async move {
        let tls = tessera_tls::ClientTls::from_files(&files)
            .context("loading the gateway's dev certificate")?;
        let expected = tessera_tls::Identity::parse_uri(&expected)?;
        let channel = tls
            .expecting(&expected)
            .connect(&addr)
            .await
            .map_err(|e| anyhow!("{}", crate::client::error_chain(&e)))
            .with_context(|| format!("cannot reach {} at {addr}", a.node))?;
        let mut node = tessera_storage_client::client(channel);
        let (_, mut bytes) = tessera_storage_client::get_object(&mut node, &a.object)
            .await
            .map_err(|s| crate::client::status_error(&format!("get {}", a.object), &s))?;
        if bytes.is_empty() {
            anyhow::bail!("{} on {} is empty: nothing to change", a.object, a.node);
        }
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        tessera_storage_client::replace_object(&mut node, &a.object, &bytes)
            .await
            .map_err(|s| crate::client::status_error(&format!("replace {}", a.object), &s))?;
        println!(
            "{}: changed byte {at} of {} ({} bytes), as a dishonest cloud would",
            a.node,
            a.object,
            bytes.len()
        );
        Ok(())
    })
}

fn up(args: UpArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        // One process, one tracer: the spans of every service go to the
        // collector (`rpc.service` tells them apart).
        let _telemetry = match &args.otlp {
            None => None,
            Some(endpoint) => {
                let cfg = tessera_runtime::TelemetryConfig {
                    log: "warn".to_owned(),
                    otlp_endpoint: Some(endpoint.clone()),
                    ..tessera_runtime::TelemetryConfig::default()
                };
                cfg.validate().map_err(|e| anyhow!("--otlp: {e}"))?;
                let guard = tessera_runtime::telemetry::init("tessera-dev", &cfg)
                    .map_err(|e| anyhow!("--otlp: {e}"))?;
                println!("Traces: exported over OTLP/gRPC to {endpoint}");
                Some(guard)
            }
        };
        let opts = DevOptions {
            storage_nodes: args.storage_nodes,
            base_port: (args.base_port != 0).then_some(args.base_port),
            erasure: args
                .erasure
                .unwrap_or_else(|| tessera_devstack::auto_erasure(args.storage_nodes)),
            ..DevOptions::default()
        };
        let mut stack = DevStack::start(&args.dir, &opts)
            .await
            .map_err(|e| anyhow!("dev up: {e}"))?;
        println!("Tessera is up (mutual TLS on every port). Data in {}", stack.dir().display());
        for (name, addr) in &stack.endpoints().endpoints {
            match stack.endpoints().admin.get(name) {
                Some(admin) => println!("  {name:<13} {addr:<16} admin (metrics, ready) http://{admin}"),
                None => println!("  {name:<13} {addr}"),
            }
        }
        match opts.erasure {
            Some((k, m)) => println!(
                "Storage: {} nodes, each its own zone; every object erasure-coded {k}+{m} (any {m} node(s) may be lost; {k} clouds must collude to rebuild a share)",
                opts.storage_nodes
            ),
            None => println!(
                "Storage: {} nodes; every object stored whole on one node (no erasure coding)",
                opts.storage_nodes
            ),
        }
        println!(
            "Endpoints: {}\nPKI: {} (identities: owner, clinician (a delegate of owner), clinician2, researcher, admin, outsider)",
            stack.dir().join(tessera_devstack::ENDPOINTS_FILE).display(),
            stack.pki_dir().display()
        );
        if let Ok(dicom) = stack.endpoints().get("dicom") {
            println!(
                "DICOM: C-STORE SCP at {dicom}, AE title {}, calling AE titles {} (studies stored for user/owner)",
                tessera_devstack::DICOM_AE_TITLE,
                tessera_devstack::DICOM_CALLING_AES.join(", ")
            );
        }
        if let Ok(tls) = stack.endpoints().get("dicom-tls") {
            println!(
                "DICOM TLS: {tls}, AE title {}, any calling AE title, the peer is its client certificate's identity (PKI above)",
                tessera_devstack::DICOM_AE_TITLE
            );
        }
        println!(
            "Try: tessera store --dir {d} --as owner --owner owner --attr patient_id=P1 IMAGE.png\nCheck: tessera doctor --dir {d}\nCtrl-C stops every service.",
            d = args.dir.display()
        );
        let _ = std::io::Write::flush(&mut std::io::stdout());
        tessera_runtime::shutdown_signal().await;
        println!("stopping...");
        stack.shutdown().await;
        println!("stopped cleanly");
        Ok(())
    })
}
