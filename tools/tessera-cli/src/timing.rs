//! Wall-time estimates and the scratch directory of the benches (a leaf
//! module: `bench`, `bench_erasure`, `segment_cmd` and the suite benches
//! all use it).

use std::time::{Duration, Instant};

/// Fastest wall time of `iterations` runs of `f` (after one warm-up run).
/// On a shared, noisy machine interference only ever adds time, so the
/// minimum is the most repeatable estimate; every figure in a table is
/// measured the same way in the same run.
pub fn fastest<T>(iterations: usize, mut f: impl FnMut() -> T) -> Duration {
    std::hint::black_box(f());
    (0..iterations.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

/// Median wall time of `iterations` runs of `f` (after one warm-up run).
pub fn median<T>(iterations: usize, mut f: impl FnMut() -> T) -> Duration {
    std::hint::black_box(f());
    let mut times: Vec<Duration> = (0..iterations.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}

/// A fresh scratch directory for one bench run (emptied if a run of this
/// process left one).
pub(crate) fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let base = std::env::temp_dir().join(format!("tessera-bench-e2e-{}", std::process::id()));
    if base.exists() {
        std::fs::remove_dir_all(&base)?;
    }
    std::fs::create_dir_all(&base)?;
    Ok(base)
}
