//! `tessera store-dicom`, `retrieve-dicom`, `demo --input FILE.dcm` and
//! `bench dicom` through the built binary against the whole suite started
//! in-process (a dev directory with endpoints.toml and the development PKI,
//! as `tessera dev up` makes). Files come back byte-identical for the
//! clinician and de-identified for the researcher.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dicom_dictionary_std::tags;
use tessera_devstack::{DevOptions, DevStack};
use tessera_dicom::synth::{StudyInfo, ct_slice};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs `tessera ARGS` with no TESSERA_* variables inherited except the
/// ones in `env`.
async fn run(args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
        for v in [
            "TESSERA_DIR",
            "TESSERA_AS",
            "TESSERA_KEYSERVER",
            "TESSERA_GATEWAY",
            "TESSERA_DICOM_DATA",
        ] {
            c.env_remove(v);
        }
        c.args(&args).envs(env).output().expect("run tessera")
    })
    .await
    .unwrap()
}

/// `tessera ARGS --dir DIR --as WHO`.
async fn as_user(dir: &Path, who: &str, args: &[&str]) -> Output {
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    full.extend(["--dir".into(), p(dir).into(), "--as".into(), who.into()]);
    run(full, Vec::new()).await
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tessera failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The command failed; returns its stderr.
fn failed(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "tessera succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("valid JSON on stdout")
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn study() -> StudyInfo {
    StudyInfo {
        patient_name: "Quixote^Alonso^Q".into(),
        patient_id: "MRN-55102-ZZ".into(),
        patient_birth_date: "19470923".into(),
        study_date: "20260301".into(),
        institution: "Hospital de La Mancha".into(),
        uid_root: "1.2.826.0.1.3680043.10.1137.78".into(),
    }
}

fn slices(info: &StudyInfo, n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let px: Vec<u16> = (0..64 * 48u32)
                .map(|p| ((p * 7 + i * 131) % 4096) as u16)
                .collect();
            ct_slice(info, i, 48, 64, &px).unwrap()
        })
        .collect()
}

/// `request-key` as `who`, approved by the owner for one use; the id.
async fn grant(dir: &Path, who: &str, handle: &str) -> String {
    let r = json(
        &as_user(
            dir,
            who,
            &["request-key", handle, "--why", "board", "--json"],
        )
        .await,
    );
    let rid = r["request_id"].as_str().expect("request id").to_owned();
    ok(&as_user(
        dir,
        "owner",
        &["approve", &rid, "--uses", "1", "--ttl", "10m"],
    )
    .await);
    rid
}

/// The files of `dir`, sorted by name.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_and_retrieve_dicom_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let mut stack = DevStack::start(&dev, &DevOptions::default()).await.unwrap();
    let info = study();
    let files = slices(&info, 3);
    let series = tmp.path().join("series");
    std::fs::create_dir(&series).unwrap();
    for (i, f) in files.iter().enumerate() {
        std::fs::write(series.join(format!("{:02}.dcm", i + 1)), f).unwrap();
    }
    std::fs::write(series.join("notes.txt"), "not a DICOM file").unwrap();

    // A directory: every *.dcm in name order, one study. One at a time:
    // the study keeps its instances in the order they were stored, which
    // the retrieves below check.
    let r = json(
        &as_user(
            &dev,
            "owner",
            &["store-dicom", p(&series), "--jobs", "1", "--json"],
        )
        .await,
    );
    let stored = r["stored"].as_array().unwrap();
    assert_eq!(stored.len(), 3, "{r}");
    assert!(r["refused"].as_array().unwrap().is_empty());
    let studies = r["studies"].as_array().unwrap();
    assert_eq!(studies.len(), 1, "{r}");
    assert_eq!(studies[0]["instances"], 3);
    let handle = studies[0]["study"].as_str().unwrap().to_owned();
    assert!(handle.starts_with("st-"));
    for (i, s) in stored.iter().enumerate() {
        assert!(
            s["file"]
                .as_str()
                .unwrap()
                .ends_with(&format!("{:02}.dcm", i + 1))
        );
        assert_eq!(s["new_study"], i == 0);
        assert_eq!(s["duplicate"], false);
        assert_eq!(s["pixels"], "watermarked");
        assert_eq!(s["study"], handle.as_str());
        assert_eq!(s["placements"].as_array().unwrap().len(), 3);
    }

    // The same file again (clinician, explicit owner URI): a duplicate.
    let out = ok(&as_user(
        &dev,
        "clinician",
        &[
            "store-dicom",
            p(&series.join("02.dcm")),
            "--owner",
            "spiffe://tessera.local/user/owner",
        ],
    )
    .await);
    assert!(out.contains("duplicate of in-"), "{out}");
    assert!(out.contains(&handle), "{out}");

    // A refused file: non-zero exit, the gateway's message naming the file;
    // the good file beside it is still stored.
    let junk = tmp.path().join("junk.dcm");
    std::fs::write(&junk, b"not a dicom file at all, just text".repeat(10)).unwrap();
    let out = as_user(
        &dev,
        "owner",
        &["store-dicom", p(&junk), p(&series.join("01.dcm")), "--json"],
    )
    .await;
    let err = failed(&out);
    assert!(err.contains("junk.dcm") && err.contains("invalid"), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["refused"][0]["file"], p(&junk));
    assert_eq!(r["stored"][0]["duplicate"], true);
    // A researcher may not store; neither may anyone name a missing file.
    let err = failed(&as_user(&dev, "researcher", &["store-dicom", p(&series)]).await);
    assert!(err.contains("refused") && err.contains("01.dcm"), "{err}");
    let err = failed(&as_user(&dev, "owner", &["store-dicom", p(&tmp.path().join("nope"))]).await);
    assert!(err.contains("no such file"), "{err}");

    // Clinician: byte-identical files, NNNN-<instance id>.dcm, in order.
    let rid = grant(&dev, "clinician", &handle).await;
    let out_dir = tmp.path().join("clinician");
    let text = ok(&as_user(
        &dev,
        "clinician",
        &[
            "retrieve-dicom",
            &handle,
            "--request",
            &rid,
            "--out",
            p(&out_dir),
        ],
    )
    .await);
    assert!(text.contains("retrieved 3 instance(s)"), "{text}");
    assert!(text.contains("byte-identical"), "{text}");
    assert!(text.contains("Quixote^Alonso^Q"), "identity shown: {text}");
    let got = listing(&out_dir);
    assert_eq!(got.len(), 3);
    for (i, (path, want)) in got.iter().zip(&files).enumerate() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("{:04}-in-", i + 1)), "{name}");
        assert_eq!(
            &std::fs::read(path).unwrap(),
            want,
            "{name} is byte-identical"
        );
    }
    // The grant had one use; with a new one, the same directory is refused
    // (nothing overwritten).
    let err = failed(
        &as_user(
            &dev,
            "clinician",
            &[
                "retrieve-dicom",
                &handle,
                "--request",
                &rid,
                "--out",
                p(&out_dir),
            ],
        )
        .await,
    );
    assert!(err.contains("refused"), "{err}");
    let rid2 = grant(&dev, "clinician", &handle).await;
    let err = failed(
        &as_user(
            &dev,
            "clinician",
            &[
                "retrieve-dicom",
                &handle,
                "--request",
                &rid2,
                "--out",
                p(&out_dir),
            ],
        )
        .await,
    );
    assert!(err.contains("refusing to overwrite"), "{err}");
    for (path, want) in got.iter().zip(&files) {
        assert_eq!(&std::fs::read(path).unwrap(), want);
    }

    // Researcher: de-identified files, no identity.
    let rrid = grant(&dev, "researcher", &handle).await;
    let rdir = tmp.path().join("researcher");
    let r = json(
        &as_user(
            &dev,
            "researcher",
            &[
                "retrieve-dicom",
                &handle,
                "--request",
                &rrid,
                "--out",
                p(&rdir),
                "--json",
            ],
        )
        .await,
    );
    assert_eq!(r["count"], 3, "{r}");
    assert_eq!(r["deidentified"], true);
    assert!(r["patient"].as_object().unwrap().is_empty());
    let got = listing(&rdir);
    assert_eq!(got.len(), 3);
    for path in &got {
        let bytes = std::fs::read(path).unwrap();
        for secret in [
            info.patient_name.as_str(),
            "Quixote",
            info.patient_id.as_str(),
        ] {
            assert!(
                !contains(&bytes, secret),
                "{secret:?} in {}",
                path.display()
            );
        }
        let obj = dicom_object::OpenFileOptions::new()
            .from_reader(&bytes[128..])
            .unwrap();
        let removed = obj
            .element(tags::PATIENT_IDENTITY_REMOVED)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(['\0', ' '])
            .to_string();
        assert_eq!(removed, "YES");
    }
    stack.shutdown().await;
}

/// `tessera demo --input`: a DICOM file through the suite, every step
/// checked; a non-DICOM file is a clear error before anything starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_walks_a_dicom_file_and_refuses_other_input() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("slice.dcm");
    std::fs::write(&file, &slices(&study(), 1)[0]).unwrap();
    let out_dir = tmp.path().join("demo");
    let text = ok(&run(
        vec![
            "demo".into(),
            "--input".into(),
            p(&file).into(),
            "--out".into(),
            p(&out_dir).into(),
        ],
        Vec::new(),
    )
    .await);
    assert!(text.contains("every step held"), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
    // Issue 17: dates, not Unix times; the absolute folder and its files.
    assert!(
        text.contains("approved: 1 use(s) until 20") && !text.contains("unix"),
        "{text}"
    );
    let abs = std::fs::canonicalize(&out_dir).unwrap();
    assert!(
        text.contains(&format!("Outputs in {}:", abs.display())),
        "{text}"
    );
    for listed in ["  clinician.dcm (", "  researcher.dcm (", "  suite/ ("] {
        assert!(text.contains(listed), "{listed}: {text}");
    }
    assert!(
        text.contains("(0012,0062) Patient Identity Removed = \"YES\""),
        "{text}"
    );
    assert_eq!(
        std::fs::read(out_dir.join("clinician.dcm")).unwrap(),
        std::fs::read(&file).unwrap()
    );
    let deid = std::fs::read(out_dir.join("researcher.dcm")).unwrap();
    assert!(!contains(&deid, "Quixote"));

    let png = tmp.path().join("x.png");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\nnot really a png").unwrap();
    let err = failed(
        &run(
            vec![
                "demo".into(),
                "--input".into(),
                p(&png).into(),
                "--out".into(),
                p(&tmp.path().join("demo2")).into(),
            ],
            Vec::new(),
        )
        .await,
    );
    assert!(err.contains("not a DICOM Part 10 file"), "{err}");
    assert!(!tmp.path().join("demo2").join("suite").exists());
}

/// A real pydicom-data file through the demo (with TESSERA_DICOM_DATA set,
/// as `./x unit` does): one with watermarked native pixels and one with
/// compressed pixels kept sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_on_pydicom_data_files() {
    let data = tessera_dicom::testdata::pydicom_data_dir().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap();
    for name in ["eCT_Supplemental.dcm", "JPEG-LL.dcm"] {
        let text = ok(&run(
            vec![
                "demo".into(),
                "--input".into(),
                p(&data.join(name)).into(),
                "--out".into(),
                p(&tmp.path().join(name)).into(),
            ],
            Vec::new(),
        )
        .await);
        assert!(text.contains("every step held"), "{name}: {text}");
    }
}

/// Real pydicom-data files with one broken file among them, several in
/// flight (`--jobs 2`): every good file is stored (listed in file order),
/// the broken one is listed at the end with its reason, once, and the
/// exit is non-zero; without `--json` each stored file has its line.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_dicom_in_flight_lists_the_bad_file_among_real_ones() {
    let data = tessera_dicom::testdata::pydicom_data_dir().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let mut stack = DevStack::start(&dev, &DevOptions::default()).await.unwrap();
    let dir = tmp.path().join("mixed");
    std::fs::create_dir(&dir).unwrap();
    // Names sort the broken file between the good ones.
    let good = [
        ("a-sc-rgb.dcm", "SC_rgb.dcm"),
        ("b-emri.dcm", "emri_small.dcm"),
        ("d-liver.dcm", "liver.dcm"),
    ];
    for (name, source) in good {
        std::fs::copy(data.join(source), dir.join(name)).unwrap();
    }
    // A real file cut inside its data set: not a whole DICOM file.
    let whole = std::fs::read(data.join("SC_rgb.dcm")).unwrap();
    std::fs::write(dir.join("c-broken.dcm"), &whole[..400]).unwrap();

    let out = as_user(
        &dev,
        "owner",
        &["store-dicom", p(&dir), "--jobs", "2", "--json"],
    )
    .await;
    let err = failed(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let stored = r["stored"].as_array().unwrap();
    assert_eq!(stored.len(), 3, "{r}");
    for (s, (name, _)) in stored.iter().zip(good) {
        assert!(s["file"].as_str().unwrap().ends_with(name), "{r}");
        assert_eq!(s["duplicate"], false, "{r}");
    }
    assert_eq!(r["studies"].as_array().unwrap().len(), 3, "{r}");
    let refused = r["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{r}");
    assert_eq!(refused[0]["file"], p(&dir.join("c-broken.dcm")));
    let why = refused[0]["error"].as_str().unwrap();
    assert!(!why.is_empty());
    // The closing list: the count, the file and its reason, once.
    assert!(err.contains("1 of 4 file(s) refused:"), "{err}");
    assert!(err.contains(&format!("c-broken.dcm: {why}")), "{err}");
    assert_eq!(err.matches(why).count(), 1, "{err}");

    // Again without --json, one at a time: each good file is a duplicate
    // now, with its line on stdout; the broken one only in the list.
    let out = as_user(&dev, "owner", &["store-dicom", p(&dir), "--jobs", "1"]).await;
    let err = failed(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for (name, _) in good {
        assert!(
            text.lines()
                .any(|l| l.contains(name) && l.contains("duplicate of in-")),
            "{text}"
        );
    }
    assert!(!text.contains("c-broken.dcm"), "{text}");
    assert!(text.contains("3 of 4 file(s) accepted"), "{text}");
    assert!(
        err.contains("1 of 4 file(s) refused:") && err.contains("c-broken.dcm: "),
        "{err}"
    );
    stack.shutdown().await;
}

/// `tessera bench dicom` end to end on a short series (figures printed,
/// never asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_dicom_runs_on_a_short_series() {
    let mut env = Vec::new();
    if let Some(d) = std::env::var_os("TESSERA_DICOM_DATA") {
        env.push(("TESSERA_DICOM_DATA", d.to_string_lossy().into_owned()));
    }
    let text = ok(&run(
        ["bench", "dicom", "--slices", "6", "--inflight", "3"]
            .map(String::from)
            .to_vec(),
        env,
    )
    .await);
    assert!(text.contains("slices made from"), "{text}");
    assert!(
        text.contains("| StoreDicom via gateway, 3 in flight | 6 |"),
        "{text}"
    );
    assert!(text.contains("| RetrieveDicom, whole study"), "{text}");
    // C-STORE over one and over four associations (the default), each a
    // row with its ratio to StoreDicom and a verdict line.
    for k in [1, 4] {
        assert!(
            text.contains(&format!(
                "| C-STORE to the gateway's SCP, {k} association(s) | 6 |"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("C-STORE ingest, {k} association(s): ")),
            "{text}"
        );
    }
    assert!(
        text.contains("target: >= 250 instances/s of 512x512 16-bit CT"),
        "{text}"
    );
    // The CPU each phase cost (the whole suite runs in the bench's process
    // here: one column) and the rate the cores would allow at that cost.
    assert!(
        text.contains("| CPU ms per instance | suite + client (this process) | total |"),
        "{text}"
    );
    for phase in [
        "StoreDicom via gateway, 3 in flight",
        "C-STORE to the gateway's SCP, 4 association(s)",
        "RetrieveDicom, whole study, one call (byte-identical checked)",
    ] {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {phase} | ")) && l.matches('|').count() == 6)
            .unwrap_or_else(|| panic!("no CPU row for {phase}: {text}"));
        let ms: f64 = row
            .split('|')
            .nth(2)
            .unwrap_or("")
            .trim()
            .parse()
            .unwrap_or(-1.0);
        assert!(ms > 0.0, "no CPU charged to {phase}: {row}");
    }
}
