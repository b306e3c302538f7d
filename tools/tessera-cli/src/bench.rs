//! `tessera bench`: figures printed as ratios against baselines measured in
//! the same run on the same bytes (never pass/fail timings).

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use sha2::{Digest, Sha256};
use tessera_cryptomark::{
    ProtectKey, RestoreKey, StudyKey, default_threads, protect, protect_with_threads, restore,
    restore_with_threads,
};
use tessera_image::phantom::head_phantom;
use tessera_image::{PixelFormat, Rect};

use crate::PEAK;
use crate::timing::fastest;

#[derive(Args, Debug)]
pub struct ImageBenchArgs {
    /// Timed repetitions per measurement (the fastest is printed).
    #[arg(long, default_value_t = 15)]
    pub iterations: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Peak heap bytes allocated while running `f`, above what was live before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = PEAK.current_usage();
    PEAK.reset_peak_usage();
    let out = f();
    (out, PEAK.peak_usage().saturating_sub(before))
}

pub fn image(args: ImageBenchArgs) -> Result<()> {
    let n = args.iterations;
    let threads = default_threads(512 * 512);
    println!(
        "== tessera bench image: 512x512 slices, fastest of {n} runs; SHA-256 on one thread, \
         protect and restore on one thread and on their default {threads} =="
    );
    println!(
        "(the fair ratio is the one-thread rows': the same single core as the SHA-256 pass; \
         the {threads}-thread rows are wall time with up to {threads} cores)"
    );
    println!(
        "| format | operation | threads | ms | MB/s | ratio to SHA-256 of the same bytes (one thread) | peak extra heap (x image) |"
    );
    println!("|---|---|---|---|---|---|---|");
    let key = StudyKey::from_bytes([7; 32]);
    let salt = [9u8; 32];
    for format in [
        PixelFormat::gray16(12, false),
        PixelFormat::GRAY16,
        PixelFormat::GRAY8,
    ] {
        let image = head_phantom(512, 512, 1, format, 42)?;
        let roi = Rect::new(64, 48, 384, 416);
        let bytes = image.to_le_bytes();
        let mb = bytes.len() as f64 / 1e6;
        let sha = fastest(n, || Sha256::digest(&bytes));
        let row = |op: &str, t: usize, d: Duration, peak: Option<usize>| {
            println!(
                "| {format} | {op} | {t} | {:.3} | {:.0} | {:.2}x | {} |",
                ms(d),
                mb / d.as_secs_f64(),
                d.as_secs_f64() / sha.as_secs_f64(),
                peak.map_or("-".into(), |p| format!(
                    "{:.2}",
                    p as f64 / bytes.len() as f64
                ))
            );
        };
        row("SHA-256 (baseline)", 1, sha, None);
        let sk = ProtectKey::Secure { key: &key, salt };
        let protected = protect(&image, roi, "bench", sk)?;
        let (_, peak_p) = peak_during(|| protect(&image, roi, "bench", sk));
        let s_protect = fastest(n, || protect_with_threads(&image, roi, "bench", sk, 1));
        row("protect, secure", 1, s_protect, Some(peak_p));
        let s_protect_t = fastest(n, || protect(&image, roi, "bench", sk));
        row("protect, secure", threads, s_protect_t, None);
        let rk = RestoreKey::Secure(&key);
        let (h, s1, s2) = (
            &protected.header,
            &protected.shares[0],
            &protected.shares[1],
        );
        let (_, peak_r) = peak_during(|| restore(h, s1, s2, rk));
        let s_restore = fastest(n, || restore_with_threads(h, s1, s2, rk, 1));
        row("restore+verify, secure", 1, s_restore, Some(peak_r));
        let s_restore_t = fastest(n, || restore(h, s1, s2, rk));
        row("restore+verify, secure", threads, s_restore_t, None);
        let paper = protect(&image, roi, "bench", ProtectKey::Paper)?;
        let pk = paper.paper_keys.expect("paper keys");
        let ppk = ProtectKey::PaperWithKeys(&pk);
        let prk = RestoreKey::Paper(&pk);
        let (ph, p1, p2) = (&paper.header, &paper.shares[0], &paper.shares[1]);
        let pn = n.min(5);
        let p_protect = fastest(pn, || protect_with_threads(&image, roi, "bench", ppk, 1));
        row("protect, paper", 1, p_protect, None);
        let p_protect_t = fastest(pn, || protect(&image, roi, "bench", ppk));
        row("protect, paper", threads, p_protect_t, None);
        let p_restore = fastest(pn, || restore_with_threads(ph, p1, p2, prk, 1));
        row("restore+verify, paper", 1, p_restore, None);
        let p_restore_t = fastest(pn, || restore(ph, p1, p2, prk));
        row("restore+verify, paper", threads, p_restore_t, None);
        println!(
            "| {format} | paper / secure time, one thread | | protect {:.1}x, restore {:.1}x | | | |",
            p_protect.as_secs_f64() / s_protect.as_secs_f64(),
            p_restore.as_secs_f64() / s_restore.as_secs_f64()
        );
        let overhead = (s1.len() + s2.len()) as f64 / bytes.len() as f64;
        println!("| {format} | shares / original bytes (secure) | | {overhead:.3}x | | | |");
    }
    println!(
        "target: secure protect and restore of the 16-bit slice at most 3x SHA-256 (the one-thread rows); \
         peak extra heap at most 4 images"
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct StorageBenchArgs {
    /// Objects written and read.
    #[arg(long, default_value_t = 64)]
    pub objects: usize,
    /// Object size in KiB.
    #[arg(long, default_value_t = 512)]
    pub kib: usize,
}

/// Storage node put/get over mTLS vs redb directly on the same bytes.
pub fn storage(args: StorageBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(tessera_devstack::bench_storage(
        tessera_devstack::BenchOptions {
            object_bytes: args.kib * 1024,
            objects: args.objects,
        },
    ))?;
    println!(
        "== tessera bench storage: {} objects of {} KiB ==",
        args.objects, args.kib
    );
    println!("{report}");
    println!("target: put at least 50 % of redb direct (ratio >= 0.50)");
    Ok(())
}

#[derive(Args, Debug)]
pub struct KeyserverBenchArgs {
    /// Concurrent mTLS clients (and in-process tasks).
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Derivations per phase.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
}

/// Durably audited key derivations over mTLS gRPC vs in process.
pub fn keyserver(args: KeyserverBenchArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt
        .block_on(keyserver::bench_derive(keyserver::BenchOptions {
            clients: args.clients,
            requests: args.requests,
        }))
        .map_err(|e| anyhow::anyhow!("keyserver bench: {e}"))?;
    println!("== tessera bench keyserver ==");
    println!("{report}");
    Ok(())
}

pub fn all() -> Result<()> {
    image(ImageBenchArgs { iterations: 15 })?;
    crate::bench_erasure::erasure(crate::bench_erasure::ErasureBenchArgs {
        mib: 8,
        data: 3,
        parity: 2,
        iterations: 9,
    })?;
    crate::segment_cmd::bench(crate::segment_cmd::BenchArgs {
        iterations: 15,
        size: 512,
    })?;
    storage(StorageBenchArgs {
        objects: 64,
        kib: 512,
    })?;
    keyserver(KeyserverBenchArgs {
        clients: 64,
        requests: 20_000,
    })?;
    crate::bench_e2e::e2e(crate::bench_e2e::E2eBenchArgs {
        slices: 200,
        concurrency: 16,
        erasure: Some((3, 2)),
        erasure_nodes: Some(5),
        large_mib: 32,
        processes: None,
    })?;
    crate::bench_dicom::dicom(crate::bench_dicom::DicomBenchArgs {
        slices: 300,
        inflight: 16,
        associations: vec![1, 4],
        template: None,
        qr_file: None,
        processes: None,
    })?;
    crate::bench_replicas::replicas(crate::bench_replicas::ReplicasBenchArgs {
        slices: 120,
        concurrency: 16,
        gateways: 2,
    })?;
    Ok(())
}
