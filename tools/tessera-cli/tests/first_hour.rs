//! Issue 17, what a newcomer trips over in the first hour, through the built
//! `tessera` binary: the demo names its absolute output folder and every
//! file it wrote (offline in its own subfolder) (item 3); `approve` prints
//! dates, not Unix times (4); an instance sent over C-STORE and then with
//! `store-dicom` is a duplicate, a changed one is refused naming the
//! element, and the error is said once (11); each cause of an error once
//! (13); `--json` into a closed pipe exits quietly (16).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use tessera_devstack::{DICOM_AE_TITLE, DICOM_CALLING_AES, DevOptions, DevStack};
use tessera_dicom::synth::{StudyInfo, ct_slice};
use tessera_image::phantom::head_phantom;
use tessera_image::{PixelFormat, codec};

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `tessera ARGS` with no TESSERA_* variables inherited.
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    for v in [
        "TESSERA_DIR",
        "TESSERA_AS",
        "TESSERA_KEYSERVER",
        "TESSERA_GATEWAY",
    ] {
        c.env_remove(v);
    }
    c.args(args);
    c
}

async fn run(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        command(&a).output().expect("run tessera")
    })
    .await
    .unwrap()
}

/// `tessera ARGS --dir DIR --as WHO`.
async fn as_user(dir: &Path, who: &str, args: &[&str]) -> Output {
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    full.extend(["--dir".into(), p(dir).into(), "--as".into(), who.into()]);
    run(full).await
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

/// Failed without a panic; stdout and stderr together.
fn failed(out: &Output) -> String {
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "succeeded unexpectedly: {all}");
    assert!(!all.contains("panicked"), "{all}");
    all
}

fn occurrences(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn item3_the_offline_demo_names_its_own_absolute_folder_and_every_file() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("demo");
    // Left from another run: not listed as written by this one.
    std::fs::create_dir_all(out.join("offline")).unwrap();
    std::fs::write(out.join("offline/old.txt"), b"old").unwrap();
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(out.join("offline/old.txt"))
        .unwrap()
        .set_modified(old)
        .unwrap();
    // A relative --out, run from the temp dir: the message is absolute.
    let o = command(&["demo", "--offline", "--out", "demo"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let text = ok(&o);
    assert!(text.contains("every step held"), "{text}");
    let abs = std::fs::canonicalize(out.join("offline")).unwrap();
    assert!(
        text.contains(&format!("Outputs in {}:", abs.display())),
        "{text}"
    );
    let names = [
        "gaussian-region-wise.png",
        "header.json",
        "original.png",
        "share1.bin",
        "share1.png",
        "share2.bin",
        "share2.png",
        "tamper-map.png",
    ];
    let listed: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("Outputs in "))
        .skip(1)
        .filter_map(|l| l.trim().split(' ').next())
        .collect();
    assert_eq!(listed, names, "{text}");
    for n in names {
        assert!(abs.join(n).is_file(), "{n}");
        // Nothing of the offline run lands in the suite demo's folder.
        assert!(!out.join(n).exists(), "{n} outside offline/");
    }
    assert!(!text.contains("old.txt"), "{text}");
    // Messages name files with their folder, never a bare name.
    assert!(
        text.contains(&format!(
            "{}",
            Path::new("demo/offline/share1.png").display()
        )),
        "{text}"
    );
    // One report format, indented like its neighbours; ROI as --roi takes it.
    assert!(
        text.contains("  integrity: intact (") && text.contains("  integrity: TAMPERED: "),
        "{text}"
    );
    assert!(text.contains("ROI 96,40,320,432 (x,y,w,h)"), "{text}");
}

fn study() -> StudyInfo {
    StudyInfo {
        patient_name: "Newcomer^First^Hour".into(),
        patient_id: "MRN-17-0001".into(),
        patient_birth_date: "19800101".into(),
        study_date: "20261206".into(),
        institution: "Tessera Walkthrough Clinic".into(),
        uid_root: "1.2.826.0.1.3680043.10.1137.17".into(),
    }
}

/// The file re-encoded with `change` applied (same SOP Instance UID).
fn edited(bytes: &[u8], change: impl FnOnce(&mut dicom_object::DefaultDicomObject)) -> Vec<u8> {
    let mut file = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(bytes)
        .unwrap();
    change(&mut file);
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_4_11_13_16_against_a_running_suite() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = tmp.path().join("dev");
    let mut stack = DevStack::start(&dev, &DevOptions::default()).await.unwrap();

    // --- 11: C-STORE first, then store-dicom of the same file ---
    let px: Vec<u16> = (0..64 * 48u32).map(|i| (i * 13 % 4096) as u16).collect();
    let file = ct_slice(&study(), 0, 48, 64, &px).unwrap();
    let dicom = stack.endpoints().get("dicom").unwrap().to_owned();
    let opts = tessera_scp::scu::ScuOptions {
        calling_ae: DICOM_CALLING_AES[0].into(),
        called_ae: DICOM_AE_TITLE.into(),
        ..Default::default()
    };
    let sent = tessera_scp::scu::send_files(&dicom, &opts, std::slice::from_ref(&file), |_, _| {})
        .await
        .unwrap();
    assert_eq!(sent[0].status, 0, "{sent:?}");
    let f = tmp.path().join("slice.dcm");
    std::fs::write(&f, &file).unwrap();
    // The SCP wrote its own file meta group: other bytes, same instance.
    let out = ok(&as_user(&dev, "owner", &["store-dicom", p(&f)]).await);
    assert!(out.contains("duplicate of in-"), "{out}");
    assert!(out.contains("1 duplicate"), "{out}");
    // With trailing padding appended: still the same instance.
    let mut padded = file.clone();
    padded.extend_from_slice(&[
        0xFC, 0xFF, 0xFC, 0xFF, b'O', b'B', 0, 0, 4, 0, 0, 0, 0, 0, 0, 0,
    ]);
    let fp = tmp.path().join("padded.dcm");
    std::fs::write(&fp, &padded).unwrap();
    let out = ok(&as_user(&dev, "owner", &["store-dicom", p(&fp)]).await);
    assert!(out.contains("duplicate of in-"), "{out}");
    // Another data set under the same SOP Instance UID: refused, the
    // element named, the reason said once.
    let changed = edited(&file, |o| {
        o.put(DataElement::new(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            PrimitiveValue::from("not the same study"),
        ));
    });
    let fc = tmp.path().join("changed.dcm");
    std::fs::write(&fc, &changed).unwrap();
    let all = failed(&as_user(&dev, "owner", &["store-dicom", p(&fc)]).await);
    assert!(all.contains("(0008,1030) StudyDescription"), "{all}");
    assert_eq!(occurrences(&all, "another data set"), 1, "{all}");
    assert!(all.contains("1 of 1 file(s) refused"), "{all}");

    // --- 4: approve says until when as a date ---
    let png = tmp.path().join("slice.png");
    let image = head_phantom(64, 48, 1, PixelFormat::GRAY8, 17).unwrap();
    std::fs::write(&png, codec::encode_png(&image, 0).unwrap()).unwrap();
    let stored: serde_json::Value = serde_json::from_str(&ok(&as_user(
        &dev,
        "owner",
        &[
            "store",
            p(&png),
            "--owner",
            "owner",
            "--attr",
            "patient_id=P-17",
            "--json",
        ],
    )
    .await))
    .unwrap();
    let study = stored["study"].as_str().unwrap().to_owned();
    // Several images at once (--jobs 2), a broken one among them: each
    // good one a study of its own, the broken one listed with its reason
    // at the end, a non-zero exit.
    let mut many = Vec::new();
    for seed in 0..3u64 {
        let f = tmp.path().join(format!("many-{seed}.png"));
        let image = head_phantom(64, 48, 1, PixelFormat::GRAY8, 20 + seed).unwrap();
        std::fs::write(&f, codec::encode_png(&image, 0).unwrap()).unwrap();
        many.push(f);
    }
    let broken = tmp.path().join("many-broken.png");
    std::fs::write(&broken, b"\x89PNG but not really").unwrap();
    many.insert(1, broken.clone());
    let mut args = vec!["store"];
    args.extend(many.iter().map(|f| p(f)));
    args.extend([
        "--owner",
        "owner",
        "--attr",
        "patient_id=P-18",
        "--jobs",
        "2",
        "--json",
    ]);
    let out = as_user(&dev, "owner", &args).await;
    let all = failed(&out);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let good: Vec<&str> = r["stored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(s["study"].as_str().unwrap().starts_with("st-"), "{r}");
            s["file"].as_str().unwrap()
        })
        .collect();
    assert_eq!(good, [p(&many[0]), p(&many[2]), p(&many[3])], "{r}");
    assert_eq!(r["refused"][0]["file"], p(&broken), "{r}");
    let why = r["refused"][0]["error"].as_str().unwrap();
    assert!(all.contains("1 of 4 file(s) refused:"), "{all}");
    assert!(all.contains(&format!("many-broken.png: {why}")), "{all}");
    let r: serde_json::Value = serde_json::from_str(&ok(&as_user(
        &dev,
        "clinician",
        &["request-key", &study, "--json"],
    )
    .await))
    .unwrap();
    let rq = r["request_id"].as_str().unwrap().to_owned();
    let out = ok(&as_user(
        &dev,
        "owner",
        &["approve", &rq, "--uses", "3", "--ttl", "1h"],
    )
    .await);
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("approved {rq}: 3 use(s) left until 20")),
        "{out}"
    );
    assert!(first.ends_with('Z') && !out.contains("unix"), "{out}");
    // The demo's words for the same: a date (checked through `demo --input`
    // in dicom_client.rs; here the retrieve's grant line).
    let got = tmp.path().join("got.png");
    let out = ok(&as_user(
        &dev,
        "clinician",
        &["retrieve", &study, "--request", &rq, "-o", p(&got)],
    )
    .await);
    assert!(out.contains(&format!("(one use of {rq} spent)")), "{out}");
    assert!(out.contains("  integrity: intact ("), "{out}");
    assert!(out.contains("  identity: patient_id = P-17"), "{out}");
    // 9: --local says why no identity is shown (not "your role").
    let out = ok(&as_user(
        &dev,
        "clinician",
        &[
            "retrieve",
            &study,
            "--request",
            &rq,
            "--local",
            "-o",
            p(&got),
        ],
    )
    .await);
    assert!(out.contains("identity: not fetched with --local"), "{out}");
    assert!(!out.contains("not shown to your role"), "{out}");

    // --- 16: --json into a closed pipe: exit 141, no panic ---
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let png2 = png.clone();
    let dev2 = dev.clone();
    let o = tokio::task::spawn_blocking(move || {
        command(&[
            "store",
            p(&png2),
            "--owner",
            "owner",
            "--attr",
            "patient_id=P-17b",
            "--json",
            "--dir",
            p(&dev2),
            "--as",
            "owner",
        ])
        .env("RUST_BACKTRACE", "1")
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert_eq!(o.status.code(), Some(141), "{stderr}");

    // --- 13: an unreachable gateway: each cause once ---
    let all = failed(
        &as_user(
            &dev,
            "owner",
            &[
                "verify",
                &study,
                "--gateway",
                "127.0.0.1:1",
                "--connect-timeout",
                "2",
            ],
        )
        .await,
    );
    let line = all
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {all}"));
    assert!(
        line.contains("cannot reach the gateway at 127.0.0.1:1"),
        "{line}"
    );
    let parts: Vec<&str> = line.trim_start_matches("error: ").split(": ").collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(!parts[..i].contains(part), "{part:?} said twice: {line}");
    }
    assert!(
        line.contains("refused") || line.contains("Connection"),
        "{line}"
    );

    // doctor: every endpoint answers with its identity, the SCP C-ECHO.
    let out = ok(&as_user(&dev, "owner", &["doctor"]).await);
    assert!(
        out.contains("spiffe://tessera.local/service/gateway, serves tessera.gateway.v1.Gateway"),
        "{out}"
    );
    assert!(out.contains("C-ECHO STORESCU -> TESSERA: success"), "{out}");
    assert!(out.contains(", 0 failed"), "{out}");

    stack.shutdown().await;
}

#[test]
fn completions_and_doctor_on_a_missing_directory() {
    for shell in ["bash", "zsh", "fish"] {
        let out = ok(&command(&["completions", shell]).output().unwrap());
        assert!(
            out.contains("store-dicom") && out.contains("doctor"),
            "{shell}"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = command(&["doctor", "--dir", p(&tmp.path().join("nowhere"))])
        .output()
        .unwrap();
    let all = failed(&o);
    assert!(
        all.contains("FAIL") && all.contains("tessera dev up"),
        "{all}"
    );
}

/// Items 6 and 7: raw input read in both forms alike; a trailing slash on
/// the output folder is not doubled, and the paper profile says where its
/// key file went.
#[test]
fn raw_forms_and_trailing_slashes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let image = head_phantom(64, 40, 1, PixelFormat::gray16(12, false), 3).unwrap();
    let raw = d.join("ct.raw");
    std::fs::write(&raw, image.to_le_bytes()).unwrap();
    let out_dir = format!("{}/", d.join("paper").display());
    let text = ok(&command(&[
        "image",
        "protect",
        "-i",
        p(&raw),
        "--raw",
        "64,40,16,12",
        "--roi",
        "8,4,32,24",
        "--profile",
        "paper",
        "-o",
        &out_dir,
    ])
    .output()
    .unwrap());
    assert!(!text.contains("//"), "{text}");
    assert!(text.contains("ROI 8,4,32,24 (x,y,w,h)"), "{text}");
    assert!(
        text.contains(&format!("{}", d.join("paper/paper.key").display())),
        "{text}"
    );
    // The documented form gives the same image back.
    let back = d.join("back.raw");
    ok(
        &command(&["image", "restore", "-d", &out_dir, "-o", p(&back)])
            .output()
            .unwrap(),
    );
    assert_eq!(std::fs::read(&back).unwrap(), image.to_le_bytes());
    let text = ok(&command(&[
        "image",
        "protect",
        "-i",
        p(&raw),
        "--raw",
        "64x40",
        "--bits",
        "16",
        "--stored",
        "12",
        "--profile",
        "paper",
        "-o",
        p(&d.join("p2")),
    ])
    .output()
    .unwrap());
    assert!(text.contains("64x40x1"), "{text}");
    // Both forms at once must agree.
    let all = failed(
        &command(&[
            "image",
            "protect",
            "-i",
            p(&raw),
            "--raw",
            "64,40,16,12",
            "--bits",
            "8",
            "-o",
            p(&d.join("p3")),
        ])
        .output()
        .unwrap(),
    );
    assert!(all.contains("--bits says 8"), "{all}");
    // Item 8: `metrics --tables` says which tables it prints.
    let text = ok(&command(&["image", "metrics", "--tables"]).output().unwrap());
    assert!(
        text.starts_with("Tables 3-4 (key sensitivity and share statistics)")
            && text.contains("ROI 83,55,351,431"),
        "{text}"
    );
}
