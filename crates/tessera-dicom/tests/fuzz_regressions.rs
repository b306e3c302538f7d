//! Replays the cargo-fuzz seed corpus (`fuzz/corpus/<target>/`) and every
//! kept crash input (`fuzz/regressions/<target>/`) through the checks of the
//! fuzz targets, on stable and without cargo-fuzz, so CI keeps them. The
//! checks are the fuzz crate's own code (`fuzz/src/lib.rs`, included below),
//! and every file goes through all of them, whichever target found it.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../fuzz/src/lib.rs"]
mod checks;

use checks::{
    ContainerOutcome, DeidOutcome, LIMITS, check_container, check_deidentify, check_split,
    frame_parts,
};
use tessera_dicom::{Profile, Temporal, UidMap, split};

const FUZZ_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz");

/// The targets, each with the number of committed seeds it has at least.
const TARGETS: [(&str, usize); 3] = [("split", 6), ("container", 3), ("deidentify", 3)];

/// Every file under `dir`, recursively, sorted; none if `dir` is absent.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

struct Replay {
    split: bool,
    container: ContainerOutcome,
    deid: DeidOutcome,
}

/// All three checks on one input; the panic message if one fails.
fn replay(bytes: &[u8]) -> Result<Replay, String> {
    catch_unwind(AssertUnwindSafe(|| Replay {
        split: check_split(bytes),
        container: check_container(bytes),
        deid: check_deidentify(bytes),
    }))
    .map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    })
}

fn is_seed(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
}

#[test]
fn corpus_and_regressions_replay_through_every_check() {
    let fuzz = Path::new(FUZZ_DIR);
    let mut failures = Vec::new();
    let mut per_dir: BTreeMap<String, usize> = BTreeMap::new();
    for top in ["corpus", "regressions"] {
        for path in files_under(&fuzz.join(top)) {
            let rel = path.strip_prefix(fuzz).expect("under fuzz/");
            let target = rel
                .components()
                .nth(1)
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::read(&path).expect("read a corpus file");
            let replayed = match replay(&bytes) {
                Ok(r) => r,
                Err(message) => {
                    failures.push(format!("{}: {message}", rel.display()));
                    continue;
                }
            };
            *per_dir.entry(format!("{top}/{target}")).or_default() += 1;
            // The committed seeds are real files (or their framed parts):
            // each must get through the whole of its target's path, or the
            // fuzzer would start from inputs rejected up front.
            if top == "corpus" && is_seed(&path) {
                let name = rel.display();
                match target.as_str() {
                    "split" => assert!(replayed.split, "{name}: the seed does not split"),
                    "container" => assert_eq!(
                        replayed.container,
                        ContainerOutcome {
                            container: true,
                            joined: true
                        },
                        "{name}: the seed does not join"
                    ),
                    "deidentify" => assert_eq!(
                        replayed.deid,
                        DeidOutcome {
                            split: 3,
                            written: 3,
                            resplit: 3
                        },
                        "{name}: the seed's de-identified files do not split again"
                    ),
                    other => panic!("{name}: corpus of unknown target {other:?}"),
                }
            }
        }
    }
    println!("replayed: {per_dir:?}");
    assert!(failures.is_empty(), "fuzz inputs fail: {failures:#?}");
    for (target, seeds) in TARGETS {
        let seeds_present = files_under(&fuzz.join("corpus").join(target))
            .iter()
            .filter(|p| is_seed(p))
            .count();
        assert!(
            seeds_present >= seeds,
            "fuzz/corpus/{target}: {seeds_present} seeds, expected at least {seeds}"
        );
    }
}

/// The `container` seeds are the framed parts of `split` seeds of the same
/// name; rebuilding them catches a part format that changed under them.
#[test]
fn container_seeds_are_the_parts_of_split_seeds() {
    let corpus = Path::new(FUZZ_DIR).join("corpus");
    let profile = Profile {
        temporal: Temporal::Remove,
        uids: UidMap::new(b"seed"),
    };
    let seeds: Vec<PathBuf> = files_under(&corpus.join("container"))
        .into_iter()
        .filter(|p| is_seed(p))
        .collect();
    assert!(seeds.len() >= 3, "container seeds: {seeds:?}");
    for seed in seeds {
        let stem = seed.file_stem().expect("a file name").to_string_lossy();
        let source = corpus.join("split").join(format!("{stem}.dcm"));
        let bytes = std::fs::read(&source)
            .unwrap_or_else(|e| panic!("{}: {e} (its split seed)", source.display()));
        let parts = split(&bytes, &LIMITS, &profile).expect("the split seed splits");
        let framed = frame_parts(
            &parts.container.to_bytes(),
            &parts.identifying,
            &parts.pixels,
        );
        assert!(
            framed == std::fs::read(&seed).expect("read the seed"),
            "{}: stale; regenerate with `cargo run --example container_seeds` in fuzz/",
            seed.display()
        );
    }
}

/// The fuzzing find: a fixed-width binary VR whose length is not a multiple
/// of its width (here FD, 54 bytes) is refused as malformed before
/// dicom-object reads it (it used to desynchronize and allocate 1.2 GB).
#[test]
fn misaligned_binary_value_is_refused_as_malformed() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fuzz/regressions/split/oom-fd-vr-desync.dcm"
    );
    let bytes = std::fs::read(path).unwrap();
    let e = tessera_dicom::split_for_store(&bytes, &tessera_dicom::Limits::default()).unwrap_err();
    let tessera_dicom::DicomError::Malformed(m) = &e else {
        panic!("expected Malformed, got {e:?}");
    };
    assert!(m.contains("not a multiple of 8"), "{m}");
}
