//! `tessera`: offline image tools, benchmarks, the demo and the suite's client.
#![forbid(unsafe_code)]

mod bench;
mod bench_cpu;
mod bench_dicom;
mod bench_dicom_kit;
mod bench_dicom_qr;
mod bench_e2e;
mod bench_erasure;
mod bench_memory;
mod bench_replicas;
mod client;
mod demo;
mod demo_access;
mod demo_dicom;
mod demo_kit;
mod dev_cmd;
mod doctor;
mod image_cmd;
mod keys;
mod pki_cmd;
mod report;
mod segment_cmd;
mod suite_demo;
mod timing;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// The main job: the whole suite on loopback, every flow checked
    /// (`--offline`: the imaging core alone; `--input FILE.dcm`: a DICOM
    /// file through the suite).
    Demo(demo::DemoArgs),
    /// The whole suite on this machine (`dev up --dir DIR`): the services
    /// over mutual TLS and the gateway's DICOM C-STORE SCP.
    #[command(subcommand)]
    Dev(dev_cmd::DevCmd),
    /// Check a dev directory: the PKI (present, valid for how long), every
    /// endpoint reachable with the identity it must present, versions.
    Doctor(doctor::DoctorArgs),
    /// Print a shell completion script: `tessera completions bash >
    /// ~/.local/share/bash-completion/completions/tessera` (zsh, fish alike).
    Completions(CompletionsArgs),
    /// Store an image through the gateway; prints the study handle.
    Store(client::gateway_cmd::StoreArgs),
    /// Store DICOM files (or directories of *.dcm) through the gateway;
    /// prints each instance and the study handle(s).
    StoreDicom(client::dicom_cmd::StoreDicomArgs),
    /// Retrieve every instance of a DICOM study into a directory with an
    /// approved request (de-identified unless your role may re-identify).
    RetrieveDicom(client::dicom_cmd::RetrieveDicomArgs),
    /// Ask the study's owner for access (the gateway presents the patient
    /// attributes for you); prints the request id.
    RequestKey(client::gateway_cmd::RequestKeyArgs),
    /// Retrieve a study with an approved request: restored, verified,
    /// written as PNG or raw (`--local`: restore on this machine).
    Retrieve(client::gateway_cmd::RetrieveArgs),
    /// The integrity report of a stored study (no pixels).
    Verify(client::gateway_cmd::VerifyArgs),
    /// Region-wise processing across the storage nodes.
    Process(client::gateway_cmd::ProcessArgs),
    /// Delete a study: shares removed, key material destroyed (owner only).
    Delete(client::gateway_cmd::DeleteArgs),
    /// Development PKI (`pki init --dir DIR`).
    Pki(pki_cmd::PkiArgs),
    /// Key requests on your studies (study owner; pending unless --all).
    Requests(client::keyserver_cmd::RequestsArgs),
    /// Approve a key request: the requester may use the key --uses times
    /// within --ttl.
    Approve(client::keyserver_cmd::ApproveArgs),
    /// Deny a pending key request.
    Deny(client::keyserver_cmd::DecideArgs),
    /// Revoke an approved grant.
    Revoke(client::keyserver_cmd::DecideArgs),
    /// Read (--from, --limit) or verify (--verify) the keyserver's audit log.
    Audit(client::keyserver_cmd::AuditArgs),
    /// Who may store studies on your behalf (study owner): `delegate add
    /// clinician`, `delegate list`, `delegate remove clinician`.
    #[command(subcommand)]
    Delegate(client::keyserver_cmd::DelegateCmd),
    /// Approvals granted in advance (study owner): `standing create --to
    /// clinician --purpose treatment --ttl 30d`, `list`, `update`, `revoke`.
    #[command(subcommand)]
    Standing(client::access_cmd::StandingCmd),
    /// Emergency access to one study at once, with a written reason
    /// (identities with the `emergency` permission); reviewed afterwards.
    BreakGlass(client::access_cmd::BreakGlassArgs),
    /// Allow (--enable) or forbid (--disable) break-glass on your studies.
    BreakGlassSetting(client::access_cmd::BreakGlassSettingArgs),
    /// Break-glass uses to review (owner: on your studies; admin: all);
    /// --mark REQUEST marks one reviewed.
    Review(client::access_cmd::ReviewArgs),
    /// Your grants (or, with --owner, grants on your studies): uses left,
    /// expiry, purpose; grants about to expire flagged.
    Grants(client::access_cmd::GrantsArgs),
    /// Your webhook (study owner): `webhook set https://...`, `show`,
    /// `clear`; told of new requests and break-glass uses on your studies.
    #[command(subcommand)]
    Webhook(client::webhook_cmd::WebhookCmd),
    /// Scrub (`repair status`) and repair (`repair run`) of erasure-coded
    /// fragments across the storage nodes (admin).
    #[command(subcommand)]
    Repair(client::repair_cmd::RepairCmd),
    /// `node drain NAME` moves every fragment off a storage node; `node
    /// replace NAME` rebuilds a replaced (empty) node's fragments (admin).
    #[command(subcommand)]
    Node(client::repair_cmd::NodeCmd),
}

#[derive(clap::Args)]
struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: clap_complete::Shell,
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
    /// Write the built-in CT-like head phantom (no patient data) as a
    /// 16-bit PNG: an image to try everything on.
    Phantom(image_cmd::PhantomArgs),
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
    /// Store/retrieve of 512x512 16-bit slices through the gateway vs in-process protect/restore.
    E2e(bench_e2e::E2eBenchArgs),
    /// Each service's own peak and settled memory (its own process, from its
    /// binary) for one store and one retrieve of a large image, as a ratio to
    /// the image.
    Memory(bench_memory::MemoryBenchArgs),
    /// A 512x512 16-bit CT series from a real slice ingested over
    /// StoreDicom and retrieved, and a small CT series over C-STORE, C-GET
    /// and WADO-RS, vs dicom-object parse+write.
    Dicom(bench_dicom::DicomBenchArgs),
    /// Erasure coding (k+m) encode/decode vs memcpy and SHA-256 of the same bytes.
    Erasure(bench_erasure::ErasureBenchArgs),
    /// Store rates with the gateway vault on redb (baseline) and on
    /// PostgreSQL with one and several gateway replicas.
    Replicas(bench_replicas::ReplicasBenchArgs),
    /// Every benchmark.
    All,
}

/// Exit status when stdout is a pipe whose reader has gone (`tessera ... |
/// head`): what a shell reports for a program killed by SIGPIPE.
const EXIT_CLOSED_PIPE: i32 = 141;

/// `println!` panics when stdout is a closed pipe (Rust ignores SIGPIPE, so
/// the write fails with EPIPE). That is not a bug of ours but the reader
/// having read enough: exit quietly with [`EXIT_CLOSED_PIPE`], no panic
/// message, no backtrace. Every other panic is reported as usual.
fn exit_quietly_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(EXIT_CLOSED_PIPE);
        }
        default(info);
    }));
}

fn main() -> std::process::ExitCode {
    exit_quietly_on_closed_stdout();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Image(cmd) => match cmd {
            ImageCmd::Protect(a) => image_cmd::protect_cmd(a),
            ImageCmd::Restore(a) => image_cmd::restore_cmd(a),
            ImageCmd::Verify(a) => image_cmd::verify_cmd(a),
            ImageCmd::Metrics(a) => image_cmd::metrics_cmd(a),
            ImageCmd::Keygen(a) => image_cmd::keygen(a),
            ImageCmd::Phantom(a) => image_cmd::phantom(a),
            ImageCmd::Segment(a) => segment_cmd::segment(a),
            ImageCmd::Process(a) => segment_cmd::process(a),
        },
        Command::Bench(cmd) => match cmd {
            BenchCmd::Image(a) => bench::image(a),
            BenchCmd::Segment(a) => segment_cmd::bench(a),
            BenchCmd::Storage(a) => bench::storage(a),
            BenchCmd::Keyserver(a) => bench::keyserver(a),
            BenchCmd::E2e(a) => bench_e2e::e2e(a),
            BenchCmd::Memory(a) => bench_memory::memory(a),
            BenchCmd::Dicom(a) => bench_dicom::dicom(a),
            BenchCmd::Erasure(a) => bench_erasure::erasure(a),
            BenchCmd::Replicas(a) => bench_replicas::replicas(a),
            BenchCmd::All => bench::all(),
        },
        Command::Demo(a) if a.offline => demo::run(a),
        Command::Demo(a) => suite_demo::run(a),
        Command::Dev(cmd) => dev_cmd::run(cmd),
        Command::Doctor(a) => doctor::doctor(a),
        Command::Completions(a) => {
            let mut script = Vec::new();
            clap_complete::generate(a.shell, &mut Cli::command(), "tessera", &mut script);
            write_stdout(&script)
        }
        Command::Store(a) => client::gateway_cmd::store(a),
        Command::StoreDicom(a) => client::dicom_cmd::store_dicom(a),
        Command::RetrieveDicom(a) => client::dicom_cmd::retrieve_dicom(a),
        Command::RequestKey(a) => client::gateway_cmd::request_key(a),
        Command::Retrieve(a) => client::gateway_cmd::retrieve(a),
        Command::Verify(a) => client::gateway_cmd::verify(a),
        Command::Process(a) => client::gateway_cmd::process(a),
        Command::Delete(a) => client::gateway_cmd::delete(a),
        Command::Pki(a) => pki_cmd::run(a),
        Command::Requests(a) => client::keyserver_cmd::requests(a),
        Command::Approve(a) => client::keyserver_cmd::approve(a),
        Command::Deny(a) => client::keyserver_cmd::deny(a),
        Command::Revoke(a) => client::keyserver_cmd::revoke(a),
        Command::Audit(a) => client::keyserver_cmd::audit(a),
        Command::Delegate(c) => client::keyserver_cmd::delegate(c),
        Command::Standing(c) => client::access_cmd::standing(c),
        Command::BreakGlass(a) => client::access_cmd::break_glass(a),
        Command::BreakGlassSetting(a) => client::access_cmd::break_glass_setting(a),
        Command::Review(a) => client::access_cmd::review(a),
        Command::Webhook(c) => client::webhook_cmd::webhook(c),
        Command::Grants(a) => client::access_cmd::grants(a),
        Command::Repair(c) => client::repair_cmd::repair(c),
        Command::Node(c) => client::repair_cmd::node(c),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes `bytes` to stdout; a closed pipe exits as [`EXIT_CLOSED_PIPE`].
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::exit(EXIT_CLOSED_PIPE)
        }
        Err(e) => Err(anyhow::anyhow!("writing to stdout: {e}")),
    }
}

/// The error and its causes on one line, each said once: a cause's text
/// often repeats its own source's ("connect: transport error" over
/// "transport error"), so every `: `-separated part already said is dropped.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        for part in cause.to_string().split(": ") {
            let part = part.trim();
            if !part.is_empty() && !parts.iter().any(|p| p == part) {
                parts.push(part.to_owned());
            }
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_once() {
        let e = anyhow::anyhow!(
            "connect: transport error: transport error: Connection refused (os error 111): Connection refused (os error 111)"
        )
        .context("cannot reach the gateway at localhost:39699");
        assert_eq!(
            one_line(&e),
            "cannot reach the gateway at localhost:39699: connect: transport error: Connection refused (os error 111)"
        );
        let e = anyhow::anyhow!("not found: study st-1").context("verify");
        assert_eq!(one_line(&e), "verify: not found: study st-1");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
