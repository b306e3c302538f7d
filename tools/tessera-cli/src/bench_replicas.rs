//! `tessera bench replicas`: store rates through the gateway with its
//! identity vault on the local redb file (the baseline, measured in the
//! same run), then on a real PostgreSQL server with one and with several
//! gateway replicas sharing the database (issue 20). The whole suite runs
//! in this process over mutual TLS; the PostgreSQL server is Debian's
//! (`./x` installs it), started on a private socket folder and removed at
//! the end.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::Image;
use tessera_testkit::postgres::Postgres;
use tessera_tls::{ClientTls, TlsFiles};

use crate::bench_e2e::{percentile, phantom_slices, store_all};
use crate::timing::tempfile_dir;

#[derive(Args, Debug)]
pub struct ReplicasBenchArgs {
    /// Slices stored in each configuration.
    #[arg(long, default_value_t = 120)]
    pub slices: usize,
    /// Stores in flight at once (spread round-robin over the replicas).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Gateway replicas in the last configuration (2..=8).
    #[arg(long, default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(2..=8))]
    pub gateways: u64,
}

/// One configuration's figures.
struct Run {
    name: String,
    rate: f64,
    p50: f64,
    p99: f64,
}

pub fn replicas(args: ReplicasBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: ReplicasBenchArgs) -> Result<()> {
    let n = args.slices.max(1);
    let c = args.concurrency.max(1);
    let replicas = args.gateways as usize;
    println!(
        "== tessera bench replicas: {n} slices 512x512 12-bit-in-16 stored per configuration, {c} in flight, whole suite in-process over mTLS =="
    );
    let slices = phantom_slices(n)?;
    println!("  starting PostgreSQL (a private server on a unix socket)");
    let pg = Postgres::try_start().map_err(|e| anyhow!("PostgreSQL: {e}"))?;

    let mut runs = Vec::new();
    runs.push(
        one(
            "vault on redb, 1 gateway (baseline)",
            DevOptions::default(),
            &slices,
            c,
        )
        .await?,
    );
    for (i, gateways) in [1, replicas].into_iter().enumerate() {
        let url = pg
            .try_create_db(&format!("bench_vault_{i}"))
            .map_err(|e| anyhow!("PostgreSQL: {e}"))?;
        let opts = DevOptions {
            vault_postgres_url: Some(url),
            gateway_replicas: gateways,
            ..DevOptions::default()
        };
        let name = format!(
            "vault on PostgreSQL, {gateways} gateway{}",
            if gateways == 1 { "" } else { "s" }
        );
        runs.push(one(&name, opts, &slices, c).await?);
    }

    let base = runs[0].rate;
    println!("| configuration | slices | stores/s | p50 ms | p99 ms | ratio to redb, 1 gateway |");
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {n} | {:.1} | {:.1} | {:.1} | {:.3} |",
            r.name,
            r.rate,
            r.p50,
            r.p99,
            r.rate / base
        );
    }
    println!(
        "every configuration shares this machine's {} cores: replicas here measure the shared database's cost, not added capacity",
        std::thread::available_parallelism().map_or(2, |p| p.get())
    );
    Ok(())
}

/// Starts the suite with `opts`, stores every slice spread over its
/// gateways, and stops it.
async fn one(name: &str, opts: DevOptions, slices: &[Arc<Image>], c: usize) -> Result<Run> {
    println!("  {name}");
    let tmp = tempfile_dir()?;
    let mut stack = DevStack::start(&tmp, &opts)
        .await
        .map_err(|e| anyhow!("starting the suite ({name}): {e}"))?;
    // A few untimed stores first: connections, caches and the database warm up.
    let warm = &slices[..slices.len().min(8)];
    let r = match store_through_every_gateway(&stack, opts.gateway_replicas, warm, c).await {
        Ok(_) => store_through_every_gateway(&stack, opts.gateway_replicas, slices, c).await,
        Err(e) => Err(e),
    };
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&tmp);
    let (mut lat, wall) = r.with_context(|| name.to_owned())?;
    lat.sort();
    Ok(Run {
        name: name.to_owned(),
        rate: slices.len() as f64 / wall.as_secs_f64(),
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
    })
}

async fn store_through_every_gateway(
    stack: &DevStack,
    replicas: usize,
    slices: &[Arc<Image>],
    c: usize,
) -> Result<(Vec<Duration>, Duration)> {
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&stack.pki_dir(), "owner"))?;
    let mut channels = Vec::with_capacity(replicas);
    for i in 1..=replicas {
        let name = if i == 1 {
            "gateway".to_owned()
        } else {
            format!("gateway-{i}")
        };
        channels.push(tls.connect(stack.endpoints().get(&name)?).await?);
    }
    let (handles, lat, wall) = store_all(&channels, slices, c).await?;
    if handles.len() != slices.len() {
        return Err(anyhow!(
            "{} of {} stores answered",
            handles.len(),
            slices.len()
        ));
    }
    Ok((lat, wall))
}
