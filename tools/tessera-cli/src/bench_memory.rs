//! The memory one large job takes (issue 20).
//!
//! `tessera bench e2e --large-mib N`: the whole suite runs in this process,
//! so the process's resident set is the gateway's, the watermark service's
//! and the storage nodes' together (plus this client's request messages):
//! its high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`)
//! while one image of N MiB is stored, less the resident set before, is
//! printed beside the image size as a ratio; then what stays resident once
//! the job is over.
//!
//! `tessera bench memory --large-mib N`: every service runs as its own
//! process from its binary (memory budgets are per pod), and the same
//! figures are printed per service, for one store and one retrieve of the
//! image, with the resident set `--settle-secs` after each job.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use gateway_service::client as gw;
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::PixelFormat;
use tessera_image::phantom::head_phantom;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::gateway::v1::gateway_client::GatewayClient;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::Channel;

/// One large store's memory figures (bytes).
pub(crate) struct MemoryFigure {
    pub image: u64,
    pub before: u64,
    pub peak: u64,
    pub after: u64,
}

impl MemoryFigure {
    pub(crate) fn print(&self) {
        let mb = |b: u64| b as f64 / 1e6;
        let job = self.peak.saturating_sub(self.before);
        println!(
            "peak memory of one store: {:.1} MB over the {:.1} MB resident before, for a {:.1} MB image: {:.2}x the image (gateway + watermark + storage nodes + this client's messages, one process)",
            mb(job),
            mb(self.before),
            mb(self.image),
            job as f64 / self.image.max(1) as f64
        );
        println!(
            "after the job: {:.1} MB resident, {:.1} MB above before ({:.2}x the image kept)",
            mb(self.after),
            mb(self.after.saturating_sub(self.before)),
            self.after.saturating_sub(self.before) as f64 / self.image.max(1) as f64
        );
    }
}

/// A `/proc/<proc>/status` field in bytes (`VmRSS`, `VmHWM`); `proc` is
/// `self` or a process id.
pub(crate) fn status_bytes(proc: &str, field: &str) -> Result<u64> {
    let path = format!("/proc/{proc}/status");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("{path}: {e} (peak memory is measured on Linux only)"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("{path} has no {field}"))
}

/// Resets a process's peak resident set (`VmHWM`) to its current one.
pub(crate) fn reset_peak(proc: &str) -> Result<()> {
    let path = format!("/proc/{proc}/clear_refs");
    // Writing 5 resets the peak resident set to the current one.
    std::fs::write(&path, "5").map_err(|e| anyhow!("{path}: {e}"))
}

/// One 512 x 512 x frames 16-bit image of about `mib` MiB (little-endian
/// words) and the owner's store header for it.
fn large_image(mib: u64, seed: u64) -> Result<(Vec<u8>, pb::StoreHeader)> {
    // 512 x 512 16-bit words: 512 KiB a frame.
    let frames = u32::try_from(mib * 2).map_err(|_| anyhow!("--large-mib {mib}: too large"))?;
    let img = head_phantom(512, 512, frames, PixelFormat::gray16(12, false), seed)?;
    let bytes = img.to_le_bytes();
    let header = pb::StoreHeader {
        owner: "spiffe://tessera.local/user/owner".into(),
        patient_attributes: vec![ks::Attribute {
            name: "patient_id".into(),
            value: "BENCH-LARGE".into(),
        }],
        format: pb::ImageFormat::Raw.into(),
        size: 0,
        raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
        roi: Some(wpb::Rect {
            x: 64,
            y: 48,
            width: 384,
            height: 416,
        }),
    };
    Ok((bytes, header))
}

/// Stores one 512 x 512 x frames 16-bit image of about `mib` MiB through the
/// running suite and measures the process's memory around it.
pub(crate) async fn peak_per_job(stack: &DevStack, mib: u64) -> Result<MemoryFigure> {
    let (bytes, header) = large_image(mib, 77)?;
    let mut client = crate::demo_kit::gateway(stack, "owner").await?;
    let before = status_bytes("self", "VmRSS")?;
    reset_peak("self")?;
    gw::store(&mut client, header, &bytes)
        .await
        .map_err(|s| anyhow!("storing the {mib} MiB image: {s}"))?;
    let peak = status_bytes("self", "VmHWM")?;
    let image = bytes.len() as u64;
    drop(bytes);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_bytes("self", "VmRSS")?;
    Ok(MemoryFigure {
        image,
        before,
        peak,
        after,
    })
}

#[derive(Args, Debug)]
pub struct MemoryBenchArgs {
    /// The image stored and retrieved: 512 x 512 x 2N 16-bit frames, N MiB.
    #[arg(long, value_name = "N", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub large_mib: u64,
    /// Where the service binaries are (default: $TESSERA_BIN_DIR, else the
    /// directory of this `tessera`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Seconds to wait after each job before reading what stays resident
    /// (jemalloc returns freed pages after its 10 s decay).
    #[arg(long, default_value_t = 15)]
    pub settle_secs: u64,
    /// Erasure-code every object as K+M over K+M storage nodes (default:
    /// whole objects on 3 nodes), e.g. `--erasure 3+2`.
    #[arg(long, value_name = "K+M", value_parser = crate::dev_cmd::parse_erasure)]
    pub erasure: Option<(usize, usize)>,
}

/// One service's figures around one job (bytes).
struct ServiceFigure {
    name: String,
    /// Resident after the warm-up, before the first large job: what the
    /// ratios are measured from (a job that follows another starts from
    /// whatever the first left resident).
    idle: u64,
    before: u64,
    peak: u64,
    after: u64,
}

/// Each measured service's resident set, then its peak reset.
fn snapshot_before(pids: &[(String, String)]) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(pids.len());
    for (_, pid) in pids {
        out.push(status_bytes(pid, "VmRSS")?);
        reset_peak(pid)?;
    }
    Ok(out)
}

/// Each service's peak since [`snapshot_before`], then (after `settle`) its
/// resident set.
async fn snapshot_after(
    pids: &[(String, String)],
    idle: &[u64],
    before: Vec<u64>,
    settle: Duration,
) -> Result<Vec<ServiceFigure>> {
    let mut peaks = Vec::with_capacity(pids.len());
    for (_, pid) in pids {
        peaks.push(status_bytes(pid, "VmHWM")?);
    }
    tokio::time::sleep(settle).await;
    let mut out = Vec::with_capacity(pids.len());
    for ((((name, pid), before), peak), idle) in pids.iter().zip(before).zip(peaks).zip(idle) {
        out.push(ServiceFigure {
            name: name.clone(),
            idle: *idle,
            before,
            peak,
            after: status_bytes(pid, "VmRSS")?,
        });
    }
    Ok(out)
}

fn print_table(job: &str, image: u64, settle: u64, rows: &[ServiceFigure]) {
    let mb = |b: u64| b as f64 / 1e6;
    let x = |b: u64| b as f64 / image.max(1) as f64;
    println!(
        "| {job} | service | RSS idle (MB) | RSS before (MB) | peak (MB) | peak - idle (MB) | x image | RSS {settle} s after (MB) | after - idle (MB) | x image |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let job_peak = r.peak.saturating_sub(r.idle);
        let kept = r.after.saturating_sub(r.idle);
        println!(
            "| {job} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} |",
            r.name,
            mb(r.idle),
            mb(r.before),
            mb(r.peak),
            mb(job_peak),
            x(job_peak),
            mb(r.after),
            mb(kept),
            x(kept)
        );
    }
}

/// `tessera bench memory`.
pub fn memory(args: MemoryBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: MemoryBenchArgs) -> Result<()> {
    let bin_dir = match args.bin_dir {
        Some(d) => d,
        None => tessera_devstack::default_bin_dir().map_err(|e| anyhow!("{e}"))?,
    };
    let tmp = crate::timing::tempfile_dir()?;
    let nodes = args.erasure.map_or(3, |(k, m)| k + m);
    let opts = DevOptions {
        bin_dir: Some(bin_dir.clone()),
        storage_nodes: nodes,
        erasure: args.erasure,
        ..DevOptions::default()
    };
    let mut stack = match DevStack::start(&tmp, &opts).await {
        Ok(s) => s,
        Err(e) => {
            // What started was stopped by start itself.
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(anyhow!(
                "starting the suite from {}: {e}",
                bin_dir.display()
            ));
        }
    };
    let r = measure(
        &stack,
        nodes,
        args.large_mib,
        Duration::from_secs(args.settle_secs),
    )
    .await;
    // The services are killed here whatever happened (and on drop).
    stack.shutdown().await;
    drop(stack);
    let _ = std::fs::remove_dir_all(&tmp);
    let (image, store, retrieve) = r?;
    let placement = match args.erasure {
        Some((k, m)) => format!("every object erasure-coded {k}+{m} on {nodes} storage nodes"),
        None => format!("whole objects on {nodes} storage nodes"),
    };
    println!(
        "== tessera bench memory: one {:.1} MB image (512x512x{} 12-bit-in-16), every service its own process from {}, {placement} ==",
        image as f64 / 1e6,
        args.large_mib * 2,
        bin_dir.display()
    );
    print_table("store", image, args.settle_secs, &store);
    println!();
    print_table("retrieve", image, args.settle_secs, &retrieve);
    println!(
        "target: peak - idle at most 4x the image per service; RSS after back near idle (a storage node's redb page cache keeps what it stored)"
    );
    Ok(())
}

async fn measure(
    stack: &DevStack,
    nodes: usize,
    mib: u64,
    settle: Duration,
) -> Result<(u64, Vec<ServiceFigure>, Vec<ServiceFigure>)> {
    // The services on the store and retrieve path, in the order printed.
    let names = ["gateway".to_owned(), "watermark".to_owned()]
        .into_iter()
        .chain((1..=nodes).map(|i| format!("storage-{i}")));
    let mut pids = Vec::new();
    for name in names {
        let pid = stack
            .pid(&name)
            .ok_or_else(|| anyhow!("{name} is not running as a process"))?;
        pids.push((name, pid.to_string()));
    }
    let mut owner = crate::demo_kit::gateway(stack, "owner").await?;
    let mut clinician = crate::demo_kit::gateway(stack, "clinician").await?;
    // Warm-up (not measured): one small image through every step, so
    // connections, pools and lazily built state exist before the figures.
    let (small, header) = large_image(1, 78)?;
    let handle = gw::store(&mut owner, header, &small)
        .await
        .map_err(|s| anyhow!("warm-up store: {s}"))?
        .study_handle;
    let rid = grant(stack, &mut clinician, &handle).await?;
    gw::retrieve(&mut clinician, &handle, &rid)
        .await
        .map_err(|s| anyhow!("warm-up retrieve: {s}"))?;
    drop(small);
    tokio::time::sleep(settle).await;

    let (bytes, header) = large_image(mib, 77)?;
    let image = bytes.len() as u64;
    let idle = snapshot_before(&pids)?;
    let before = idle.clone();
    let handle = gw::store(&mut owner, header, &bytes)
        .await
        .map_err(|s| anyhow!("storing the {mib} MiB image: {s}"))?
        .study_handle;
    let store = snapshot_after(&pids, &idle, before, settle).await?;

    let rid = grant(stack, &mut clinician, &handle).await?;
    let before = snapshot_before(&pids)?;
    let (_, px) = gw::retrieve(&mut clinician, &handle, &rid)
        .await
        .map_err(|s| anyhow!("retrieving the {mib} MiB image: {s}"))?;
    let retrieve = snapshot_after(&pids, &idle, before, settle).await?;
    if px != bytes {
        return Err(anyhow!("the retrieved image differs from the stored one"));
    }
    Ok((image, store, retrieve))
}

/// The clinician's access request for `handle`, approved once by the owner.
async fn grant(
    stack: &DevStack,
    clinician: &mut GatewayClient<Channel>,
    handle: &str,
) -> Result<String> {
    let req = clinician
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.to_owned(),
            justification: "bench memory".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request"))?;
    crate::demo_kit::approve(stack, &req.request_id, 1).await?;
    Ok(req.request_id)
}
