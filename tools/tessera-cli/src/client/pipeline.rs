//! Many files, N in flight: `store-dicom` and `store` send up to `--jobs`
//! files at once over one connection, show one progress bar, and list the
//! failures at the end.

use std::future::Future;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;

/// Files in flight when `--jobs` is not given: two per core of this
/// machine (each waits on the gateway most of its time), 2..=16.
pub fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).clamp(2, 16)
}

/// Codes after which the next file would fail the same way: start no
/// more files.
pub fn fatal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// One bar for `total` files on stderr (drawn only on a terminal).
pub fn files_bar(total: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>10} {{bar:40}} {{pos}}/{{len}} files {{per_sec}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb
}

/// Prints `line` without tearing the bar: to stderr under --json (stdout
/// stays JSON), else to stdout.
pub fn print_above(bar: &ProgressBar, json: bool, line: &str) {
    bar.suspend(|| {
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    });
}

/// Runs `work(index, item)` for every item, at most `jobs` at once, and
/// hands each result to `done(index, result)` as it completes. Once `done`
/// answers false no new item starts (those in flight finish); returns how
/// many items were never started.
pub async fn in_flight<T, R, Fut>(
    items: Vec<T>,
    jobs: usize,
    work: impl Fn(usize, T) -> Fut,
    mut done: impl FnMut(usize, R) -> bool,
) -> usize
where
    Fut: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    let jobs = jobs.max(1);
    let mut pending = items.into_iter().enumerate();
    let mut running = JoinSet::new();
    let mut go_on = true;
    let mut not_started = 0;
    loop {
        while go_on && running.len() < jobs {
            let Some((i, item)) = pending.next() else {
                break;
            };
            let fut = work(i, item);
            running.spawn(async move { (i, fut.await) });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        match joined {
            Ok((i, r)) => {
                if !done(i, r) && go_on {
                    go_on = false;
                }
            }
            // A task only panics on a bug; say so instead of losing a file.
            Err(e) => {
                tracing::error!(error = %e, "a file's task failed");
                go_on = false;
            }
        }
        if !go_on {
            not_started += pending.by_ref().count();
        }
    }
    not_started
}

/// The closing error of a run with refused files: each file with its
/// reason, in the order given, and the files never sent.
pub fn refused_error(total: usize, refused: &[(PathBuf, String)], not_sent: usize) -> String {
    let mut text = format!("{} of {total} file(s) refused:", refused.len());
    for (f, why) in refused {
        text.push_str(&format!("\n  {}: {why}", f.display()));
    }
    if not_sent > 0 {
        text.push_str(&format!(
            "\nstopped: {not_sent} more file(s) not sent (they would fail alike)"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "current_thread")]
    async fn at_most_jobs_at_once_and_every_item_once() {
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut seen = Vec::new();
        let left = in_flight(
            (0..20u32).collect(),
            3,
            |i, item| {
                let (now, peak) = (now.clone(), peak.clone());
                async move {
                    let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(n, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    (i, item * 2)
                }
            },
            |i, (j, v)| {
                assert_eq!(i, j);
                seen.push((i, v));
                true
            },
        )
        .await;
        assert_eq!(left, 0);
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        seen.sort_unstable();
        let want: Vec<(usize, u32)> = (0..20).map(|i| (i as usize, 2 * i)).collect();
        assert_eq!(seen, want);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stop_starts_nothing_more() {
        let mut done = 0;
        let left = in_flight(
            (0..10u32).collect(),
            2,
            |_, item| async move {
                // Item 0 answers first, while item 1 is still in flight.
                if item != 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                item
            },
            |_, item| {
                done += 1;
                item != 0
            },
        )
        .await;
        // Items 0 and 1 were in flight when 0 said stop: 8 never started.
        assert_eq!(done, 2);
        assert_eq!(left, 8);
    }

    #[test]
    fn the_refusal_names_every_file_and_its_reason() {
        let r = vec![
            (PathBuf::from("a/bad.dcm"), "invalid: not DICOM".to_owned()),
            (PathBuf::from("a/worse.dcm"), "too large".to_owned()),
        ];
        let text = refused_error(5, &r, 2);
        assert_eq!(
            text,
            "2 of 5 file(s) refused:\n  a/bad.dcm: invalid: not DICOM\n  a/worse.dcm: too large\nstopped: 2 more file(s) not sent (they would fail alike)"
        );
    }
}
