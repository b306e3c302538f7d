//! Wall-time estimates for the benches (a leaf module: `bench`,
//! `bench_erasure` and `segment_cmd` all use it).

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
