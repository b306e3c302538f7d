//! What `tessera bench dicom`'s two tables share (a leaf module: the
//! ingest table in `bench_dicom`, the query/retrieve rows in
//! `bench_dicom_qr`): a measured row, the dicom-object baseline and C-STORE
//! ingest into the gateway's SCP.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use tessera_devstack::DevStack;

use crate::bench_e2e::{bar, percentile};

/// One measured line of the table.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) n: usize,
    pub(crate) bytes: u64,
    pub(crate) wall: Duration,
    pub(crate) lat: Vec<Duration>,
}

impl Row {
    pub(crate) fn rate(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    pub(crate) fn print(&self, baseline: f64, store: f64) {
        let mut lat = self.lat.clone();
        lat.sort();
        let (p50, p95) = if lat.is_empty() {
            (String::new(), String::new())
        } else {
            (
                format!("{:.1}", percentile(&lat, 0.5)),
                format!("{:.1}", percentile(&lat, 0.95)),
            )
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {p50} | {p95} | {:.3} | {:.3} |",
            self.name,
            self.n,
            self.rate(),
            self.bytes as f64 / self.wall.as_secs_f64().max(1e-9) / 1e6,
            self.rate() / baseline,
            self.rate() / store
        );
    }
}

/// Parses `file` with dicom-object and writes it back to memory; returns
/// the written size.
pub(crate) fn parse_and_write(file: &[u8]) -> Result<usize> {
    let obj = dicom_object::OpenFileOptions::new()
        .from_reader(
            file.get(128..)
                .ok_or_else(|| anyhow!("shorter than the preamble"))?,
        )
        .map_err(|e| anyhow!("dicom-object parse: {e}"))?;
    let mut out = Vec::with_capacity(file.len());
    obj.write_all(&mut out)
        .map_err(|e| anyhow!("dicom-object write: {e}"))?;
    Ok(out.len())
}

/// C-STORE ingest into the gateway's DICOM SCP (the DICOM network path a
/// modality or PACS uses): the series split over `associations` associations,
/// each sending its files one C-STORE after the other (`tessera_scp::scu`).
/// Latency per instance: the time between consecutive responses on its
/// association.
pub(crate) async fn cstore_ingest(
    stack: &DevStack,
    series: &[Vec<u8>],
    associations: usize,
) -> Result<Row> {
    use tessera_scp::scu::{ScuOptions, send_files};
    let addr = stack
        .endpoints()
        .get("dicom")
        .map_err(|e| anyhow!("the suite runs no C-STORE SCP: {e}"))?
        .to_owned();
    let opts = ScuOptions {
        calling_ae: "TESSERA-BENCH".into(),
        called_ae: tessera_devstack::DICOM_AE_TITLE.into(),
        max_pdu_length: 1 << 20,
        ..ScuOptions::default()
    };
    let k = associations.clamp(1, series.len().max(1));
    let mut groups: Vec<Vec<Vec<u8>>> = vec![Vec::new(); k];
    for (i, f) in series.iter().enumerate() {
        groups[i % k].push(f.clone());
    }
    let bytes: u64 = series.iter().map(|f| f.len() as u64).sum();
    let pbar = bar(series.len(), "c-store");
    let t = Instant::now();
    let mut tasks = Vec::with_capacity(k);
    for files in groups {
        let (addr, opts, pbar) = (addr.clone(), opts.clone(), pbar.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(files.len());
            let mut last = Instant::now();
            let sent = send_files(&addr, &opts, &files, |_, _| {
                lat.push(last.elapsed());
                last = Instant::now();
                pbar.inc(1);
            })
            .await;
            sent.map(|s| (s, lat))
        }));
    }
    let mut lat = Vec::with_capacity(series.len());
    let mut n = 0;
    for t in tasks {
        let (sent, l) = t.await?.map_err(|e| anyhow!("C-STORE: {e}"))?;
        if let Some(bad) = sent.iter().find(|s| s.status != 0) {
            bail!(
                "C-STORE status {:#06x}: {}",
                bad.status,
                bad.error_comment.as_deref().unwrap_or("")
            );
        }
        n += sent.len();
        lat.extend(l);
    }
    let wall = t.elapsed();
    pbar.finish_and_clear();
    Ok(Row {
        name: format!("C-STORE to the gateway's SCP, {k} association(s)"),
        n,
        bytes,
        wall,
        lat,
    })
}
