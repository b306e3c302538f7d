//! `tessera bench e2e --large-mib N` (issue 20): the memory one large job
//! takes. The whole suite runs in this process, so the process's resident
//! set is the gateway's, the watermark service's and the storage nodes'
//! together (plus this client's request messages): its high-water mark
//! (`VmHWM`, reset through `/proc/self/clear_refs`) while one image of N MiB
//! is stored, less the resident set before, is printed beside the image
//! size as a ratio; then what stays resident once the job is over.

use std::time::Duration;

use anyhow::{Result, anyhow};
use gateway_service::client as gw;
use tessera_devstack::DevStack;
use tessera_image::PixelFormat;
use tessera_image::phantom::head_phantom;
use tessera_proto::gateway::v1 as pb;
use tessera_proto::keyserver::v1 as ks;
use tessera_proto::watermark::v1 as wpb;
use tessera_tls::{ClientTls, TlsFiles};

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

/// A `/proc/self/status` field in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> Result<u64> {
    let text = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| anyhow!("/proc/self/status: {e} (peak memory is measured on Linux only)"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| anyhow!("/proc/self/status has no {field}"))
}

/// Stores one 512 x 512 x frames 16-bit image of about `mib` MiB through the
/// running suite and measures the process's memory around it.
pub(crate) async fn peak_per_job(stack: &DevStack, mib: u64) -> Result<MemoryFigure> {
    // 512 x 512 16-bit words: 512 KiB a frame.
    let frames = u32::try_from(mib * 2).map_err(|_| anyhow!("--large-mib {mib}: too large"))?;
    let img = head_phantom(512, 512, frames, PixelFormat::gray16(12, false), 77)?;
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
    drop(img);
    let files = TlsFiles::from_pki_dir(&stack.pki_dir(), "owner");
    let channel = ClientTls::from_files(&files)?
        .connect(stack.endpoints().get("gateway")?)
        .await?;
    let mut client = gw::client(channel);
    let before = status_bytes("VmRSS")?;
    // Writing 5 resets the peak resident set to the current one.
    std::fs::write("/proc/self/clear_refs", "5")
        .map_err(|e| anyhow!("/proc/self/clear_refs: {e}"))?;
    gw::store(&mut client, header, &bytes)
        .await
        .map_err(|s| anyhow!("storing the {mib} MiB image: {s}"))?;
    let peak = status_bytes("VmHWM")?;
    let image = bytes.len() as u64;
    drop(bytes);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_bytes("VmRSS")?;
    Ok(MemoryFigure {
        image,
        before,
        peak,
        after,
    })
}
