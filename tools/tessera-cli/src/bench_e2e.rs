//! `tessera bench e2e`: store and retrieve of 512x512 16-bit slices through
//! the gateway over mutual TLS with the whole suite in this process, beside
//! protecting (and restoring) the same slices in-process in the same run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use clap::Args;
use gateway_service::client as gw;
use indicatif::{ProgressBar, ProgressStyle};
use tessera_cryptomark::{ProtectKey, RestoreKey, StudyKey, protect, random_salt, restore};
use tessera_devstack::{DevOptions, DevStack};
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, PixelFormat, Rect};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::{ClientTls, TlsFiles};
use tokio::sync::Semaphore;

use crate::bench_cpu::{CpuMeter, CpuPhase, bench_options};
use crate::timing::tempfile_dir;

#[derive(Args, Debug)]
pub struct E2eBenchArgs {
    /// Slices stored (and then retrieved).
    #[arg(long, default_value_t = 200)]
    pub slices: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Also run the suite with every object erasure-coded as K+M on
    /// `--erasure-nodes` nodes and print it beside whole-object placement
    /// (same slices, same run), e.g. `--erasure 3+2`.
    #[arg(long, value_name = "K+M", value_parser = crate::dev_cmd::parse_erasure)]
    pub erasure: Option<(usize, usize)>,
    /// Storage nodes for `--erasure` (default K+M).
    #[arg(long)]
    pub erasure_nodes: Option<usize>,
    /// Also store one image of this many MiB (512 x 512 x 2N frames) and
    /// print the suite's peak memory for it as a ratio to the image, and
    /// what stays resident after (0: skip).
    #[arg(long, value_name = "N", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(0..=256))]
    pub large_mib: u64,
    /// Run every service as its own process from its binary (in DIR, or
    /// $TESSERA_BIN_DIR, else beside this `tessera`) instead of in this
    /// process, and print each one's CPU per slice.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    pub processes: Option<PathBuf>,
}

const OWNER: &str = "spiffe://tessera.local/user/owner";
/// The targets for one slice per study, slices per second.
const STORE_TARGET: f64 = 250.0;
const RETRIEVE_TARGET: f64 = 300.0;
const ROI: Rect = Rect::new(64, 48, 384, 416);

/// `n` different 512x512 12-bit-in-16 head phantom slices.
pub(crate) fn phantom_slices(n: usize) -> Result<Vec<Arc<Image>>> {
    Ok((0..n)
        .map(|i| {
            head_phantom(512, 512, 1, PixelFormat::gray16(12, false), 1000 + i as u64).map(Arc::new)
        })
        .collect::<Result<_, _>>()?)
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

pub(crate) fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "  {what:<9} {{bar:40}} {{pos}}/{{len}} {{per_sec}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

struct Row {
    name: &'static str,
    n: usize,
    bytes: u64,
    wall: Duration,
    lat: Vec<Duration>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }
    fn print(&self, baseline: f64) {
        let mut lat = self.lat.clone();
        lat.sort();
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.3} |",
            self.name,
            self.n,
            self.rate(),
            self.bytes as f64 / self.wall.as_secs_f64() / 1e6,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            self.rate() / baseline
        );
    }
}

pub fn e2e(args: E2eBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: E2eBenchArgs) -> Result<()> {
    let n = args.slices.max(1);
    let c = args.concurrency.max(1);
    println!(
        "== tessera bench e2e: {n} slices 512x512 12-bit-in-16, {c} in flight, whole suite {} over mTLS ==",
        if args.processes.is_some() {
            "one process per service"
        } else {
            "in-process"
        }
    );
    let slices = phantom_slices(n)?;
    let slice_bytes = slices[0].spec().byte_len() as u64;

    // Baseline: the same slices protected and restored in-process, one
    // thread per core, in this run.
    let key = StudyKey::from_bytes([5; 32]);
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
    let t = Instant::now();
    let protected = par_map(&slices, threads, |img| {
        Ok(protect(
            img,
            ROI,
            "bench",
            ProtectKey::Secure {
                key: &key,
                salt: random_salt()?,
            },
        )?)
    })?;
    let protect_rate = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    par_map(&protected, threads, |p| {
        Ok(restore(
            &p.header,
            &p.shares[0],
            &p.shares[1],
            RestoreKey::Secure(&key),
        )?)
    })?;
    let restore_rate = n as f64 / t.elapsed().as_secs_f64();
    drop(protected);

    let opts = bench_options(args.processes)?;
    let tmp = tempfile_dir()?;
    let mut stack = DevStack::start(&tmp, &opts)
        .await
        .map_err(|e| anyhow!("starting the suite: {e}"))?;
    let meter = CpuMeter::for_stack(&stack, &opts);
    let r = match &meter {
        Ok(meter) => measure(&stack, &slices, c, slice_bytes, Some(meter)).await,
        Err(e) => Err(anyhow!("measuring CPU time: {e:#}")),
    };
    // The suite's memory for one large image is measured in process.
    let in_process = opts.bin_dir.is_none();
    let memory = match (&r, args.large_mib) {
        (Ok(_), mib @ 1..) if in_process => {
            Some(crate::bench_memory::peak_per_job(&stack, mib).await)
        }
        (Ok(_), _) | (Err(_), _) => None,
    };
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&tmp);
    let (store, retrieve, cpu) = r?;
    let meter = meter?;
    let memory = memory.transpose()?;
    let coded = match args.erasure {
        None => None,
        Some((k, m)) => {
            let nodes = args.erasure_nodes.unwrap_or(k + m);
            let tmp = tempfile_dir()?;
            let opts = DevOptions {
                storage_nodes: nodes,
                erasure: Some((k, m)),
                ..DevOptions::default()
            };
            let mut stack = DevStack::start(&tmp, &opts)
                .await
                .map_err(|e| anyhow!("starting the suite with {k}+{m}: {e}"))?;
            let r = measure(&stack, &slices, c, slice_bytes, None).await;
            let rep = match r {
                Ok(_) => repair_lost_disk(&mut stack).await.map(Some),
                Err(_) => Ok(None),
            };
            stack.shutdown().await;
            let _ = std::fs::remove_dir_all(&tmp);
            let (mut s, mut g, _) = r?;
            let rep = rep?;
            s.name = "store, erasure-coded (ratio: to whole-object store)";
            g.name = "retrieve, erasure-coded (ratio: to whole-object retrieve)";
            Some((k, m, nodes, s, g, rep))
        }
    };

    println!(
        "| operation | slices | slices/s | MB/s | p50 ms | p99 ms | ratio to in-process ({threads} threads) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| in-process protect (baseline) | {n} | {protect_rate:.1} | {:.1} | | | 1.000 |",
        protect_rate * slice_bytes as f64 / 1e6
    );
    store.print(protect_rate);
    println!(
        "| in-process restore (baseline) | {n} | {restore_rate:.1} | {:.1} | | | 1.000 |",
        restore_rate * slice_bytes as f64 / 1e6
    );
    retrieve.print(restore_rate);
    if let Some((k, m, nodes, s, g, _)) = &coded {
        println!("| {k}+{m} fragments on {nodes} nodes | | | | | | |");
        s.print(store.rate());
        g.print(retrieve.rate());
    }
    if let Some((.., Some(rep))) = &coded {
        // Baseline: one SHA-256 pass over as many bytes, in this run.
        let buf = vec![0x5au8; rep.bytes as usize];
        let t = Instant::now();
        let digest = ring::digest::digest(&ring::digest::SHA256, &buf);
        let sha_secs = t.elapsed().as_secs_f64().max(1e-9);
        std::hint::black_box(digest);
        let mbps = rep.bytes as f64 / rep.secs.max(1e-9) / 1e6;
        println!(
            "repair of a lost disk: {} fragments, {:.1} MB rebuilt on storage-1 in {:.2} s: {mbps:.1} MB/s ({:.3}x one SHA-256 pass over the same bytes: {:.0} MB/s)",
            rep.fragments,
            rep.bytes as f64 / 1e6,
            rep.secs,
            mbps / (rep.bytes as f64 / sha_secs / 1e6),
            rep.bytes as f64 / sha_secs / 1e6
        );
    }
    println!();
    meter.print(&cpu);
    if let Some(m) = &memory {
        m.print();
    }
    let verdict = |rate: f64, target: f64| {
        if rate >= target {
            "met".to_owned()
        } else {
            format!("NOT met ({:.0} % of it)", 100.0 * rate / target)
        }
    };
    println!(
        "store: {:.1} slices/s through the gateway: target >= {STORE_TARGET} {}",
        store.rate(),
        verdict(store.rate(), STORE_TARGET)
    );
    println!(
        "retrieve: {:.1} slices/s through the gateway: target >= {RETRIEVE_TARGET} {}",
        retrieve.rate(),
        verdict(retrieve.rate(), RETRIEVE_TARGET)
    );
    Ok(())
}

/// `f` over `items` on `threads` scoped threads, results in order.
pub(crate) fn par_map<T: Sync, U: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<U> + Sync,
) -> Result<Vec<U>> {
    let per = items.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|part| {
                let f = &f;
                s.spawn(move || part.iter().map(f).collect::<Result<Vec<U>>>())
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            out.extend(h.join().map_err(|_| anyhow!("worker thread panicked"))??);
        }
        Ok(out)
    })
}

/// Stores every slice as the owner, `c` in flight, the i-th over
/// `channels[i % len]` (one or several gateway replicas), with a progress
/// bar: the study handles in order, each store's latency and the wall time.
pub(crate) async fn store_all(
    channels: &[tessera_tls::Channel],
    slices: &[Arc<Image>],
    c: usize,
) -> Result<(Vec<String>, Vec<Duration>, Duration)> {
    if channels.is_empty() {
        return Err(anyhow!("no gateway to store through"));
    }
    let sem = Arc::new(Semaphore::new(c.max(1)));
    let pbar = bar(slices.len(), "store");
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(slices.len());
    for (i, img) in slices.iter().enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let mut client = gw::client(channels[i % channels.len()].clone());
        let img = img.clone();
        let pbar = pbar.clone();
        tasks.push(tokio::spawn(async move {
            let header = pb::StoreHeader {
                owner: OWNER.into(),
                patient_attributes: vec![ks::Attribute {
                    name: "patient_id".into(),
                    value: format!("BENCH-{i}"),
                }],
                format: pb::ImageFormat::Raw.into(),
                size: 0,
                raw_spec: Some(tessera_wire::convert::watermark::spec_to_proto(img.spec())),
                roi: Some(wpb::Rect {
                    x: ROI.x,
                    y: ROI.y,
                    width: ROI.width,
                    height: ROI.height,
                }),
            };
            let bytes = img.to_le_bytes();
            let t = Instant::now();
            let r = gw::store(&mut client, header, &bytes).await;
            drop(permit);
            pbar.inc(1);
            r.map(|s| (s.study_handle, t.elapsed()))
        }));
    }
    let mut handles = Vec::with_capacity(slices.len());
    let mut lat = Vec::with_capacity(slices.len());
    for t in tasks {
        let (h, d) = t
            .await?
            .map_err(|s| anyhow!("store: {:?}: {}", s.code(), s.message()))?;
        handles.push(h);
        lat.push(d);
    }
    let wall = t.elapsed();
    pbar.finish_and_clear();
    Ok((handles, lat, wall))
}

async fn measure(
    stack: &DevStack,
    slices: &[Arc<Image>],
    c: usize,
    slice_bytes: u64,
    meter: Option<&CpuMeter>,
) -> Result<(Row, Row, Vec<CpuPhase>)> {
    let pki = stack.pki_dir();
    let gw_addr = stack.endpoints().get("gateway")?.to_owned();
    let ks_addr = stack.endpoints().get("keyserver")?.to_owned();
    let connect = |who: &str, addr: String| {
        let files = TlsFiles::from_pki_dir(&pki, who);
        async move {
            let tls = ClientTls::from_files(&files)?;
            anyhow::Ok(tls.connect(&addr).await?)
        }
    };
    // A few connections shared by the in-flight requests (HTTP/2 multiplexes).
    let owner_ch = connect("owner", gw_addr.clone()).await?;
    let clin_ch = connect("clinician", gw_addr.clone()).await?;
    let ks_owner = KeyServerClient::new(connect("owner", ks_addr).await?);
    let sem = Arc::new(Semaphore::new(c));

    // Store.
    let mut cpu = Vec::new();
    let before = meter.map(CpuMeter::sample).transpose()?;
    let (handles, lat, wall) = store_all(std::slice::from_ref(&owner_ch), slices, c).await?;
    let store = Row {
        name: "store via gateway",
        n: slices.len(),
        bytes: slice_bytes * slices.len() as u64,
        wall,
        lat,
    };
    if let (Some(m), Some(b)) = (meter, &before) {
        cpu.push(m.phase(store.name, store.n, store.rate(), b)?);
    }

    // Grants (not timed): one request per study, approved by the owner.
    let mut rids = Vec::with_capacity(handles.len());
    let mut clin = gw::client(clin_ch.clone());
    for h in &handles {
        let req = clin
            .request_access(pb::RequestAccessRequest {
                study_handle: h.clone(),
                justification: "bench".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .request
            .ok_or_else(|| anyhow!("no request"))?;
        ks_owner
            .clone()
            .approve_request(ks::ApproveRequestRequest {
                request_id: req.request_id.clone(),
                ttl_seconds: 3600,
                uses: 1,
            })
            .await?;
        rids.push(req.request_id);
    }

    // Retrieve.
    let pbar = bar(handles.len(), "retrieve");
    let before = meter.map(CpuMeter::sample).transpose()?;
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(handles.len());
    for (i, (h, rid)) in handles.into_iter().zip(rids).enumerate() {
        let permit = sem.clone().acquire_owned().await?;
        let mut client = gw::client(clin_ch.clone());
        let want = slices[i].clone();
        let pbar = pbar.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = gw::retrieve(&mut client, &h, &rid).await;
            let d = t.elapsed();
            drop(permit);
            pbar.inc(1);
            let (_, px) = r.map_err(|s| anyhow!("retrieve: {:?}: {}", s.code(), s.message()))?;
            if px != want.to_le_bytes() {
                return Err(anyhow!("retrieved slice {i} differs from the stored one"));
            }
            Ok(d)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.push(t.await??);
    }
    let retrieve = Row {
        name: "retrieve via gateway (bit-identical checked)",
        n: lat.len(),
        bytes: slice_bytes * lat.len() as u64,
        wall: t.elapsed(),
        lat,
    };
    pbar.finish_and_clear();
    if let (Some(m), Some(b)) = (meter, &before) {
        cpu.push(m.phase(retrieve.name, retrieve.n, retrieve.rate(), b)?);
    }
    Ok((store, retrieve, cpu))
}

/// What repairing one lost disk took.
struct RepairFigure {
    fragments: u64,
    bytes: u64,
    secs: f64,
}

/// Empties storage-1 (stopped, its redb file deleted, started again) and
/// times the admin's repair pass that rebuilds its fragments; the bytes
/// rebuilt are what the node then holds.
async fn repair_lost_disk(stack: &mut DevStack) -> Result<RepairFigure> {
    let node = "storage-1";
    let db = stack
        .storage_db(node)
        .ok_or_else(|| anyhow!("{node}: no redb file"))?;
    stack.stop(node).await;
    std::fs::remove_file(&db).with_context(|| format!("removing {}", db.display()))?;
    stack
        .restart_storage(node)
        .await
        .map_err(|e| anyhow!("restarting {node}: {e}"))?;
    let pki = stack.pki_dir();
    let tls = |who: &str| ClientTls::from_files(&TlsFiles::from_pki_dir(&pki, who));
    let mut admin = gw::client(
        tls("admin")?
            .connect(stack.endpoints().get("gateway")?)
            .await?,
    );
    let t = Instant::now();
    let r = admin
        .repair(pb::RepairRequest {
            study_handle: String::new(),
            dry_run: false,
            evacuate_node: String::new(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .context("repair")?
        .into_inner();
    let secs = t.elapsed().as_secs_f64();
    if !r.failures.is_empty() {
        return Err(anyhow!("repair left failures: {:?}", r.failures));
    }
    let mut c = tessera_storage_client::client(
        tls("gateway")?
            .connect(stack.endpoints().get(node)?)
            .await?,
    );
    let mut bytes = 0u64;
    let mut start_after = String::new();
    loop {
        let page = c
            .list(tessera_proto::storage::v1::ListRequest {
                prefix: String::new(),
                start_after: start_after.clone(),
                limit: 1000,
            })
            .await
            .context("list")?
            .into_inner();
        bytes += page.objects.iter().map(|o| o.size).sum::<u64>();
        if page.next_start_after.is_empty() || page.objects.is_empty() {
            break;
        }
        start_after = page.next_start_after;
    }
    Ok(RepairFigure {
        fragments: r.fragments_rebuilt,
        bytes,
        secs,
    })
}
