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
    /// segmentation, gateway) in this process until Ctrl-C.
    Up(UpArgs),
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Directory for the PKI, secrets, redb files and endpoints.toml.
    #[arg(long, default_value = ".tessera")]
    pub dir: PathBuf,
    /// First port: keyserver = P, watermark = P+1, segmentation = P+2,
    /// gateway = P+3, storage-N = P+10+N. 0 lets the OS choose free ports.
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
    }
}

fn up(args: UpArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
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
        println!(
            "Try: tessera store --dir {d} --as owner --owner owner --attr patient_id=P1 IMAGE.png\nCtrl-C stops every service.",
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
