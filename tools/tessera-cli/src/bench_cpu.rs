//! CPU time per process around a bench phase, from `/proc/<pid>/stat`
//! (user + system time of every thread), printed per instance and per
//! service, with the rate the machine's cores could reach at that cost.
//!
//! A throughput figure alone cannot say whether a phase waited (a stall, a
//! sequential commit) or ran out of cores; the CPU each process spent per
//! instance can. When the client and every service share this machine,
//! `cores x 1000 / (CPU ms per instance)` is the ceiling of the phase: a
//! rate near it is CPU-bound, a rate far below it waits.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use tessera_devstack::{DevOptions, DevStack};

/// The dev-stack options of a suite bench's `--processes [DIR]`: absent,
/// the whole suite in this process; given, every service its own process
/// from its binary in DIR (empty: `$TESSERA_BIN_DIR`, else beside this
/// `tessera`).
pub(crate) fn bench_options(processes: Option<PathBuf>) -> Result<DevOptions> {
    let bin_dir = match processes {
        None => None,
        Some(d) if d.as_os_str().is_empty() => {
            Some(tessera_devstack::default_bin_dir().map_err(|e| anyhow!("{e}"))?)
        }
        Some(d) => Some(d),
    };
    Ok(DevOptions {
        bin_dir,
        ..DevOptions::default()
    })
}

/// The processes measured, in columns: a name to print and the `/proc`
/// entries summed under it (process ids, or `self` for this process: the
/// bench's client).
pub(crate) struct CpuMeter {
    procs: Vec<(String, Vec<String>)>,
    /// Clock ticks per second of `/proc/<pid>/stat` times.
    hz: u64,
    cores: usize,
}

/// Clock ticks used so far, one per column.
#[derive(Clone)]
pub(crate) struct CpuSample(Vec<u64>);

/// One phase's CPU: its name, the instances it handled, its rate, and the
/// ticks each process spent in it.
pub(crate) struct CpuPhase {
    pub name: String,
    pub n: usize,
    pub rate: f64,
    ticks: Vec<u64>,
}

impl CpuMeter {
    /// `named`: (column, process ids) of the services run as processes;
    /// empty when the whole suite runs in this process. This process (the
    /// client, or client and suite) is always measured, last.
    pub(crate) fn new(named: Vec<(String, Vec<u32>)>) -> Result<Self> {
        let client = if named.is_empty() {
            "suite + client (this process)"
        } else {
            "client (this process)"
        };
        let procs = named
            .into_iter()
            .map(|(n, p)| (n, p.iter().map(u32::to_string).collect()))
            .chain(std::iter::once((
                client.to_owned(),
                vec!["self".to_owned()],
            )))
            .collect();
        let cores = std::thread::available_parallelism().map_or(1, |p| p.get());
        Ok(Self {
            procs,
            hz: clock_ticks_per_sec()?,
            cores,
        })
    }

    /// Columns for a dev stack: each service run as a process (the storage
    /// nodes summed), or none when the suite runs in this process.
    pub(crate) fn for_stack(stack: &DevStack, opts: &DevOptions) -> Result<Self> {
        let Some(_) = opts.bin_dir else {
            return Self::new(Vec::new());
        };
        let pid = |name: &str| {
            stack
                .pid(name)
                .ok_or_else(|| anyhow!("{name} is not running as a process"))
        };
        let nodes = (1..=opts.storage_nodes)
            .map(|i| pid(&format!("storage-{i}")))
            .collect::<Result<Vec<_>>>()?;
        Self::new(vec![
            ("gateway".into(), vec![pid("gateway")?]),
            ("watermark".into(), vec![pid("watermark")?]),
            (format!("{} storage nodes", nodes.len()), nodes),
            ("keyserver".into(), vec![pid("keyserver")?]),
            ("segmentation".into(), vec![pid("segmentation")?]),
        ])
    }

    pub(crate) fn sample(&self) -> Result<CpuSample> {
        self.procs
            .iter()
            .map(|(_, ps)| ps.iter().map(|p| process_ticks(p)).sum::<Result<u64>>())
            .collect::<Result<Vec<_>>>()
            .map(CpuSample)
    }

    /// The CPU spent since `before` by each process, for `n` instances
    /// handled at `rate` per second.
    pub(crate) fn phase(
        &self,
        name: impl Into<String>,
        n: usize,
        rate: f64,
        before: &CpuSample,
    ) -> Result<CpuPhase> {
        let after = self.sample()?;
        Ok(CpuPhase {
            name: name.into(),
            n,
            rate,
            ticks: after
                .0
                .iter()
                .zip(&before.0)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        })
    }

    /// A table: CPU ms per instance of each process, their sum, and the
    /// rate the machine's cores allow at that sum beside the measured one.
    pub(crate) fn print(&self, phases: &[CpuPhase]) {
        let cores = self.cores;
        let names: Vec<&str> = self.procs.iter().map(|(n, _)| n.as_str()).collect();
        println!(
            "| CPU ms per instance | {} | total | ceiling on {cores} core(s), instances/s | measured, share of ceiling |",
            names.join(" | ")
        );
        println!("|---|{}---|---|---|", "---|".repeat(names.len()));
        for ph in phases {
            let per = |t: u64| t as f64 * 1000.0 / self.hz as f64 / ph.n.max(1) as f64;
            let cells: Vec<String> = ph.ticks.iter().map(|&t| format!("{:.2}", per(t))).collect();
            let total = per(ph.ticks.iter().sum());
            let ceiling = if total > 0.0 {
                cores as f64 * 1000.0 / total
            } else {
                f64::INFINITY
            };
            println!(
                "| {} | {} | {total:.2} | {ceiling:.0} | {:.1} ({:.0} %) |",
                ph.name,
                cells.join(" | "),
                ph.rate,
                100.0 * ph.rate / ceiling
            );
        }
        println!(
            "(user + system CPU of each process over the phase, from /proc/<pid>/stat, {} ticks/s; a rate near its ceiling is CPU-bound on this machine, one far below it waits)",
            self.hz
        );
    }
}

/// User + system clock ticks of a process (all its threads).
fn process_ticks(proc: &str) -> Result<u64> {
    let path = format!("/proc/{proc}/stat");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow!("{path}: {e} (CPU time is measured on Linux only)"))?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // the fields after its closing one start at field 3 (state), so utime
    // (field 14) and stime (field 15) are the 12th and 13th after it.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("{path}: no command name"))?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut next = |what: &str| -> Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| anyhow!("{path}: no {what}"))
    };
    Ok(next("utime")? + next("stime")?)
}

/// `sysconf(_SC_CLK_TCK)` without libc: the kernel tells every process in
/// its auxiliary vector (`AT_CLKTCK`, type 17), pairs of native words.
fn clock_ticks_per_sec() -> Result<u64> {
    const AT_CLKTCK: u64 = 17;
    let auxv = std::fs::read("/proc/self/auxv")
        .map_err(|e| anyhow!("/proc/self/auxv: {e} (CPU time is measured on Linux only)"))?;
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> u64 {
        let mut a = [0u8; 8];
        a[..W].copy_from_slice(b);
        u64::from_ne_bytes(a)
    };
    auxv.chunks_exact(2 * W)
        .map(|p| (word(&p[..W]), word(&p[W..])))
        .take_while(|&(k, _)| k != 0)
        .find(|&(k, v)| k == AT_CLKTCK && v > 0)
        .map(|(_, v)| v)
        .ok_or_else(|| anyhow!("/proc/self/auxv has no AT_CLKTCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_spends_cpu_in_ticks_the_kernel_names() {
        let hz = clock_ticks_per_sec().expect("AT_CLKTCK");
        assert!((1..=10_000).contains(&hz), "{hz} ticks/s");
        let meter = CpuMeter::new(Vec::new()).expect("meter");
        let before = meter.sample().expect("sample");
        // Spin until the kernel has charged at least two ticks.
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while process_ticks("self").expect("ticks") < before.0[0] + 2 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            assert!(t.elapsed().as_secs() < 20, "no CPU charged in 20 s");
        }
        std::hint::black_box(x);
        let ph = meter.phase("spin", 1, 1.0, &before).expect("phase");
        assert!(ph.ticks[0] >= 2, "{:?}", ph.ticks);
    }

    #[test]
    fn a_missing_process_is_an_error() {
        assert!(process_ticks("999999999").is_err());
    }
}
