//! `tessera bench dicom`: a 512x512 16-bit (12 stored) CT series built from
//! a real slice, ingested through the gateway over gRPC StoreDicom with the
//! whole suite in this process, then retrieved once; beside parsing and
//! writing back the same files with dicom-object in the same run. The
//! query/retrieve rows (C-STORE, C-GET, WADO-RS of a small CT series) are
//! in `bench_dicom_qr.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use gateway_service::client as gw;
use sha2::{Digest, Sha256};
use tessera_devstack::DevStack;
use tessera_dicom::Pixels;
use tessera_dicom::synth::{StudyInfo, ct_slice, resample_to_12bit};
use tessera_image::phantom::head_phantom;
use tessera_image::{Image, ImageSpec, PixelFormat};
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::keyserver::v1::key_server_client::KeyServerClient;
use tessera_tls::{ClientTls, TlsFiles};
use tokio::sync::Semaphore;

use crate::bench_cpu::{CpuMeter, CpuPhase, bench_options};
use crate::bench_dicom_kit::{Row, cstore_ingest, parse_and_write};
use crate::bench_e2e::{bar, par_map};
use crate::timing::tempfile_dir;

#[derive(Args, Debug)]
pub struct DicomBenchArgs {
    /// Instances in the series.
    #[arg(long, default_value_t = 300)]
    pub slices: usize,
    /// StoreDicom calls in flight at once.
    #[arg(long, default_value_t = 16)]
    pub inflight: usize,
    /// C-STORE runs: the number of associations of each (comma-separated),
    /// the series split over them, each sending one C-STORE after the other.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub associations: Vec<usize>,
    /// A DICOM file whose (native) pixels every slice is made from; default:
    /// the first native 16-bit grayscale file in $TESSERA_DICOM_DATA (a CT
    /// if there is one), else the built-in head phantom.
    #[arg(long, value_name = "FILE")]
    pub template: Option<PathBuf>,
    /// The file copied (new UIDs per copy) into the `--slices` instances of
    /// the query/retrieve rows (C-STORE, C-GET, WADO-RS); default:
    /// pydicom's CT_small.dcm beside $TESSERA_DICOM_DATA, else the smallest
    /// native CT there, else synthetic 64x64 slices.
    #[arg(long, value_name = "FILE")]
    pub qr_file: Option<PathBuf>,
    /// Run every service as its own process from its binary (in DIR, or
    /// $TESSERA_BIN_DIR, else beside this `tessera`) instead of in this
    /// process, and print the gateway's own peak memory while it ingests
    /// the series.
    #[arg(long, value_name = "DIR", num_args = 0..=1, default_missing_value = "")]
    pub processes: Option<PathBuf>,
}

const OWNER: &str = "spiffe://tessera.local/user/owner";
const SIZE: u16 = 512;
/// The ingest target.
const TARGET_PER_SEC: f64 = 250.0;
/// The C-STORE targets: over one association, over four or more.
const CSTORE_ONE_TARGET: f64 = 100.0;
const CSTORE_MANY_TARGET: f64 = 300.0;

/// Where the slices' pixels come from.
struct Template {
    /// What to print.
    source: String,
    /// One image per source frame, each one frame.
    frames: Vec<Image>,
}

/// The frames of a native image, each as its own one-frame image.
fn split_frames(img: &Image) -> Result<Vec<Image>> {
    let spec = img.spec();
    (0..spec.frames)
        .map(|f| {
            let one = ImageSpec { frames: 1, ..*spec };
            Ok(Image::new(one, img.frame(f).to_vec())?)
        })
        .collect()
}

/// Native pixels of a DICOM file, or why not.
fn native_pixels(path: &Path) -> Result<(Image, String)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let split = tessera_dicom::split_for_store(&bytes, &Default::default())
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    match split.pixels {
        Pixels::Native(img) => Ok((img, split.subject.modality)),
        Pixels::Encapsulated(_) => bail!("{}: compressed pixels", path.display()),
        Pixels::Opaque { reason, .. } => bail!("{}: {reason}", path.display()),
    }
}

fn is_gray16(img: &Image) -> bool {
    img.format().bits_allocated == 16 && img.channels() == 1
}

fn describe(path: &Path, img: &Image, modality: &str) -> String {
    format!(
        "{} ({modality} {}x{}, {} frame(s), {} bits stored)",
        path.display(),
        img.width(),
        img.height(),
        img.frames(),
        img.format().bits_stored
    )
}

impl Template {
    fn find(explicit: Option<&Path>) -> Result<Template> {
        if let Some(path) = explicit {
            let (img, modality) = native_pixels(path)
                .with_context(|| "--template needs a DICOM file with native pixels")?;
            return Ok(Template {
                source: format!("--template {}", describe(path, &img, &modality)),
                frames: split_frames(&img)?,
            });
        }
        if let Some(dir) = std::env::var_os("TESSERA_DICOM_DATA").map(PathBuf::from)
            && let Some(t) = Self::from_data_dir(&dir)?
        {
            return Ok(t);
        }
        let img = head_phantom(
            SIZE.into(),
            SIZE.into(),
            1,
            PixelFormat::gray16(12, false),
            7,
        )?;
        Ok(Template {
            source: "the built-in head phantom (no template given, TESSERA_DICOM_DATA unset or without a native 16-bit grayscale file)".into(),
            frames: vec![img],
        })
    }

    /// The first native 16-bit grayscale file of `dir` by name, a CT first.
    fn from_data_dir(dir: &Path) -> Result<Option<Template>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("reading TESSERA_DICOM_DATA={}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("dcm")))
            .collect();
        paths.sort();
        let mut first: Option<(PathBuf, Image, String)> = None;
        for p in paths {
            let Ok((img, modality)) = native_pixels(&p) else {
                continue;
            };
            if !is_gray16(&img) {
                continue;
            }
            if modality == "CT" {
                first = Some((p, img, modality));
                break;
            }
            if first.is_none() {
                first = Some((p, img, modality));
            }
        }
        match first {
            Some((p, img, modality)) => Ok(Some(Template {
                source: format!("$TESSERA_DICOM_DATA: {}", describe(&p, &img, &modality)),
                frames: split_frames(&img)?,
            })),
            None => Ok(None),
        }
    }

    /// The series: slice `i` is frame `i mod frames`, resampled to 512x512
    /// 12-bit, with a little deterministic noise so no two slices are alike.
    fn series(&self, n: usize, uid_root: &str) -> Result<Vec<Vec<u8>>> {
        let bases: Vec<Vec<u16>> = self
            .frames
            .iter()
            .map(|f| resample_to_12bit(f, SIZE, SIZE))
            .collect();
        let info = StudyInfo {
            patient_name: "Bench^Series^Ct".into(),
            patient_id: "BENCH-0300".into(),
            patient_birth_date: "19600101".into(),
            study_date: "20260401".into(),
            institution: "Tessera Bench Hospital".into(),
            uid_root: uid_root.into(),
        };
        let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
        let idx: Vec<usize> = (0..n).collect();
        par_map(&idx, threads, |&i| {
            let base = &bases[i % bases.len()];
            let mut state =
                0x9e37_79b9_7f4a_7c15u64 ^ (i as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let px: Vec<u16> = base
                .iter()
                .map(|&v| {
                    // xorshift64: noise in -2..=2.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let d = (state % 5) as i32 - 2;
                    (i32::from(v) + d).clamp(0, 4095) as u16
                })
                .collect();
            Ok(ct_slice(&info, i as u32, SIZE, SIZE, &px)?)
        })
    }
}

pub fn dicom(args: DicomBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(args))
}

async fn run(args: DicomBenchArgs) -> Result<()> {
    let n = args.slices.max(1);
    let c = args.inflight.max(1);
    println!(
        "== tessera bench dicom: {n} CT instances 512x512 16-bit (12 stored), {c} StoreDicom in flight, whole suite {} over mTLS ==",
        if args.processes.is_some() {
            "one process per service"
        } else {
            "in-process"
        }
    );
    let template = Template::find(args.template.as_deref())?;
    println!("slices made from {}", template.source);
    let series: Vec<Arc<Vec<u8>>> = template
        .series(n, "1.2.826.0.1.3680043.10.1137.300")?
        .into_iter()
        .map(Arc::new)
        .collect();
    // The same slices as other studies (other UIDs), one per C-STORE run:
    // sent into the first study they would be acknowledged duplicates.
    let mut associations = args.associations.clone();
    associations.retain(|&k| k > 0);
    associations.dedup();
    let cstore_series = associations
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let root = format!("1.2.826.0.1.3680043.10.1137.{}", 301 + i);
            Ok((k, template.series(n, &root)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let total_bytes: u64 = series.iter().map(|f| f.len() as u64).sum();
    println!(
        "series: {n} files, {:.1} MB ({} bytes each)",
        total_bytes as f64 / 1e6,
        series[0].len()
    );

    // Baseline: every file parsed with dicom-object and written back to
    // memory, one thread per core, in this run.
    let threads = std::thread::available_parallelism().map_or(2, |p| p.get());
    let t = Instant::now();
    let sizes = par_map(&series, threads, |f| parse_and_write(f))?;
    let local = Row {
        name: format!("dicom-object parse + write, {threads} threads (baseline)"),
        n,
        bytes: total_bytes,
        wall: t.elapsed(),
        lat: Vec::new(),
    };
    if sizes.iter().zip(&series).any(|(&s, f)| s != f.len()) {
        bail!("dicom-object wrote a file of another size than it read");
    }

    let qr = crate::bench_dicom_qr::QrSeries::make(n, args.qr_file.as_deref())?;
    println!("query/retrieve series: {n} copies of {}", qr.source);

    let opts = bench_options(args.processes)?;
    let tmp = tempfile_dir()?;
    let mut stack = DevStack::start(&tmp, &opts).await.map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        anyhow!("starting the suite: {e}")
    })?;
    let gateway = match opts.bin_dir {
        Some(_) => Some(
            stack
                .pid("gateway")
                .ok_or_else(|| anyhow!("the gateway runs without a process id"))?
                .to_string(),
        ),
        None => None,
    };
    let budget_mib = stack.gateway_config().map(|g| g.gateway.max_inflight_mib);
    let meter = CpuMeter::for_stack(&stack, &opts);
    let r = match &meter {
        Ok(meter) => {
            measure(
                &stack,
                &series,
                &cstore_series,
                c,
                total_bytes,
                gateway.as_deref(),
                meter,
            )
            .await
        }
        Err(e) => Err(anyhow!("measuring CPU time: {e:#}")),
    };
    let qr_rows = match r {
        Ok(_) => crate::bench_dicom_qr::rows(&stack, &qr).await.map(Some),
        Err(_) => Ok(None),
    };
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&tmp);
    let (store, cstores, retrieve, gateway_memory, cpu) = r?;
    let qr_rows = qr_rows?;
    let meter = meter?;

    println!(
        "| operation | instances | instances/s | MB/s | p50 ms | p95 ms | ratio to local parse+write | ratio to StoreDicom |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let (base, via_store) = (local.rate(), store.rate());
    local.print(base, via_store);
    store.print(base, via_store);
    for (_, cstore) in &cstores {
        cstore.print(base, via_store);
    }
    retrieve.print(base, via_store);
    if let Some(rows) = &qr_rows {
        println!();
        crate::bench_dicom_qr::print(rows);
    }
    println!();
    meter.print(&cpu);
    println!();
    if let Some((before, peak)) = gateway_memory {
        let mb = |b: u64| b as f64 / 1e6;
        let budget = budget_mib.map_or("its memory budget".to_owned(), |m| {
            format!("its memory budget (gateway.max_inflight_mib) of {m} MiB")
        });
        println!(
            "gateway memory while ingesting the {n} instances over StoreDicom ({c} in flight) and C-STORE (its own process): peak {:.1} MB resident, {:.1} MB above the {:.1} MB before = {:.1}x one instance, {:.1}x the {c} in flight; jobs in flight are bounded by {budget}",
            mb(peak),
            mb(peak.saturating_sub(before)),
            mb(before),
            peak.saturating_sub(before) as f64 / series[0].len() as f64,
            peak.saturating_sub(before) as f64 / (series[0].len() * c) as f64,
        );
    }
    println!("target: >= 250 instances/s of 512x512 16-bit CT");
    println!(
        "C-STORE targets: >= {CSTORE_ONE_TARGET} instances/s over one association, >= {CSTORE_MANY_TARGET} over 4"
    );
    let verdict = |rate: f64, target: f64| {
        if rate >= target {
            "met".to_owned()
        } else {
            format!("NOT met ({:.0} % of it)", 100.0 * rate / target)
        }
    };
    let rate = store.rate();
    println!(
        "StoreDicom ingest: {rate:.1} instances/s: target {}",
        verdict(rate, TARGET_PER_SEC)
    );
    for (k, cstore) in &cstores {
        let rate = cstore.rate();
        let target = if *k >= 4 {
            CSTORE_MANY_TARGET
        } else {
            CSTORE_ONE_TARGET
        };
        println!(
            "C-STORE ingest, {k} association(s): {rate:.1} instances/s: target {}",
            verdict(rate, target)
        );
    }
    Ok(())
}

async fn measure(
    stack: &DevStack,
    series: &[Arc<Vec<u8>>],
    cstore_series: &[(usize, Vec<Vec<u8>>)],
    c: usize,
    total_bytes: u64,
    gateway: Option<&str>,
    meter: &CpuMeter,
) -> Result<(
    Row,
    Vec<(usize, Row)>,
    Row,
    Option<(u64, u64)>,
    Vec<CpuPhase>,
)> {
    let pki = stack.pki_dir();
    let connect = |who: &str, service: &str| {
        let files = TlsFiles::from_pki_dir(&pki, who);
        let addr = stack.endpoints().get(service).map(str::to_owned);
        let expected =
            tessera_tls::Identity::parse_uri(&tessera_devstack::service_identity(service));
        async move {
            let tls = ClientTls::from_files(&files)?.expecting(&expected?);
            anyhow::Ok(tls.connect(&addr?).await?)
        }
    };
    // A few connections shared by the in-flight calls (HTTP/2 multiplexes).
    let owner_ch = connect("owner", "gateway").await?;
    let clin_ch = connect("clinician", "gateway").await?;
    let sem = Arc::new(Semaphore::new(c));

    // The gateway's resident set before the ingest, its peak reset.
    let before = match gateway {
        Some(pid) => {
            let rss = crate::bench_memory::status_bytes(pid, "VmRSS")?;
            crate::bench_memory::reset_peak(pid)?;
            Some(rss)
        }
        None => None,
    };

    // Ingest over StoreDicom.
    let pbar = bar(series.len(), "store");
    let mut cpu = Vec::new();
    let cpu_before = meter.sample()?;
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(series.len());
    for file in series {
        let permit = sem.clone().acquire_owned().await?;
        let mut client = gw::client(owner_ch.clone());
        let file = file.clone();
        let pbar = pbar.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = gw::store_dicom(&mut client, OWNER, &file).await;
            let d = t.elapsed();
            drop(permit);
            pbar.inc(1);
            r.map(|s| (s, d))
        }));
    }
    let mut handles = std::collections::BTreeSet::new();
    let mut lat = Vec::with_capacity(series.len());
    for (i, t) in tasks.into_iter().enumerate() {
        let (r, d) = t
            .await?
            .map_err(|s| anyhow!("StoreDicom of slice {i}: {:?}: {}", s.code(), s.message()))?;
        if r.duplicate || r.pixels != pb::PixelHandling::Watermarked as i32 {
            bail!(
                "slice {i}: stored as duplicate={} pixels={}",
                r.duplicate,
                r.pixels
            );
        }
        handles.insert(r.study_handle);
        lat.push(d);
    }
    pbar.finish_and_clear();
    let store = Row {
        name: format!("StoreDicom via gateway, {c} in flight"),
        n: series.len(),
        bytes: total_bytes,
        wall: t.elapsed(),
        lat,
    };
    cpu.push(meter.phase(&store.name, store.n, store.rate(), &cpu_before)?);
    let handle = match handles.into_iter().collect::<Vec<_>>().as_slice() {
        [h] => h.clone(),
        other => bail!("the series went into {} studies, not one", other.len()),
    };

    let mut cstores = Vec::with_capacity(cstore_series.len());
    for (k, files) in cstore_series {
        let before = meter.sample()?;
        let row = cstore_ingest(stack, files, *k).await?;
        cpu.push(meter.phase(&row.name, row.n, row.rate(), &before)?);
        cstores.push((*k, row));
    }
    let gateway_memory = match (gateway, before) {
        (Some(pid), Some(before)) => {
            Some((before, crate::bench_memory::status_bytes(pid, "VmHWM")?))
        }
        (Some(_), None) | (None, Some(_)) | (None, None) => None,
    };

    // One grant (not timed), then one RetrieveDicom of the whole study.
    let mut clin = gw::client(clin_ch);
    let req = clin
        .request_access(pb::RequestAccessRequest {
            study_handle: handle.clone(),
            justification: "bench".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .request
        .ok_or_else(|| anyhow!("no request"))?;
    KeyServerClient::new(connect("owner", "keyserver").await?)
        .approve_request(ks::ApproveRequestRequest {
            request_id: req.request_id.clone(),
            ttl_seconds: 3600,
            uses: 1,
        })
        .await?;
    // The stores ran concurrently, so the study's order is arrival order:
    // each instance is matched to its file by SHA-256 (which the client
    // checked against the bytes), each file exactly once.
    let mut expected: std::collections::HashMap<Vec<u8>, usize> = series
        .iter()
        .enumerate()
        .map(|(i, f)| (Sha256::digest(&f[..]).to_vec(), i))
        .collect();
    let pbar = bar(series.len(), "retrieve");
    let mut mismatched = Vec::new();
    let mut got = 0usize;
    let cpu_before = meter.sample()?;
    let t = Instant::now();
    gw::retrieve_dicom(&mut clin, &handle, &req.request_id, |h, bytes| {
        match expected.remove(&h.sha256) {
            Some(i) if series[i][..] == bytes[..] => {}
            Some(_) | None => mismatched.push(h.index),
        }
        got += 1;
        pbar.inc(1);
        Ok(())
    })
    .await
    .map_err(|s| anyhow!("RetrieveDicom: {:?}: {}", s.code(), s.message()))?;
    let wall = t.elapsed();
    pbar.finish_and_clear();
    if got != series.len() || !mismatched.is_empty() {
        bail!(
            "RetrieveDicom gave {got} of {} instances, {} not byte-identical",
            series.len(),
            mismatched.len()
        );
    }
    let retrieve = Row {
        name: "RetrieveDicom, whole study, one call (byte-identical checked)".into(),
        n: got,
        bytes: total_bytes,
        wall,
        lat: Vec::new(),
    };
    cpu.push(meter.phase(&retrieve.name, retrieve.n, retrieve.rate(), &cpu_before)?);
    Ok((store, cstores, retrieve, gateway_memory, cpu))
}
