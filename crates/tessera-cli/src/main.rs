//! `tessera`: offline image tools, benchmarks, the demo and the suite's client.
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod image_cmd;
mod keys;
mod pki_cmd;
mod segment_cmd;

use clap::{Parser, Subcommand};

/// Counts heap use so `tessera bench` can report peak memory per operation.
#[global_allocator]
static PEAK: peak_alloc::PeakAlloc = peak_alloc::PeakAlloc;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "Tessera: medical images on untrusted clouds"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline image tools (crypto-watermarking, metrics, segmentation).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Benchmarks that print ratios against baselines measured in the same run.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// The all-in-one demonstration.
    Demo(demo::DemoArgs),
    /// Development PKI (`pki init --dir DIR`).
    Pki(pki_cmd::PkiArgs),
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Protect an image into two shares and a public header.
    Protect(image_cmd::ProtectArgs),
    /// Restore an image from its two shares, bit for bit, and verify it.
    Restore(image_cmd::RestoreArgs),
    /// Verify two shares without writing the image; writes a tamper map PNG.
    Verify(image_cmd::VerifyArgs),
    /// NPCR/UACI, adjacent-pixel correlation and entropy of images or shares.
    Metrics(image_cmd::MetricsArgs),
    /// Write a new random 256-bit key file for offline use.
    Keygen(image_cmd::KeygenArgs),
    /// GA-ES: entropy block segmentation into regions; writes the region map PNG.
    Segment(segment_cmd::SegmentArgs),
    /// Region-wise processing (one fragment per region), merged; writes the result.
    Process(segment_cmd::ProcessArgs),
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Protect/restore of a 512x512 16-bit slice vs one SHA-256 pass.
    Image(bench::ImageBenchArgs),
    /// GA-ES of a 512x512 image and region-wise vs whole-image processing.
    Segment(segment_cmd::BenchArgs),
    /// Storage node put/get of 512 KiB objects over mTLS vs redb directly.
    Storage(bench::StorageBenchArgs),
    /// Audited key derivations per second over mTLS at 64 clients vs in process.
    Keyserver(bench::KeyserverBenchArgs),
    /// Every benchmark.
    All,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(cmd) => match cmd {
            ImageCmd::Protect(a) => image_cmd::protect_cmd(a),
            ImageCmd::Restore(a) => image_cmd::restore_cmd(a),
            ImageCmd::Verify(a) => image_cmd::verify_cmd(a),
            ImageCmd::Metrics(a) => image_cmd::metrics_cmd(a),
            ImageCmd::Keygen(a) => image_cmd::keygen(a),
            ImageCmd::Segment(a) => segment_cmd::segment(a),
            ImageCmd::Process(a) => segment_cmd::process(a),
        },
        Command::Bench(cmd) => match cmd {
            BenchCmd::Image(a) => bench::image(a),
            BenchCmd::Segment(a) => segment_cmd::bench(a),
            BenchCmd::Storage(a) => bench::storage(a),
            BenchCmd::Keyserver(a) => bench::keyserver(a),
            BenchCmd::All => bench::all(),
        },
        Command::Demo(a) => demo::run(a),
        Command::Pki(a) => pki_cmd::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
