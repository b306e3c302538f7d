//! The `tessera` binary on real files: protect, restore, verify (with a
//! tamper map), metrics, and clear errors on bad input.

use std::path::Path;
use std::process::{Command, Output};

use tessera_image::phantom::head_phantom;
use tessera_image::{PixelFormat, codec};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera")
}

fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tessera failed: {}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[test]
fn protect_restore_verify_round_trip_on_png_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = head_phantom(200, 150, 1, PixelFormat::GRAY16, 3).unwrap();
    std::fs::write(d.join("slice.png"), codec::encode_png(&image, 0).unwrap()).unwrap();
    let key = d.join("study.key");
    ok(&tessera(&["image", "keygen", "--out", p(&key)]));
    // Refuses to overwrite a key.
    assert!(
        !tessera(&["image", "keygen", "--out", p(&key)])
            .status
            .success()
    );

    let shares = d.join("shares");
    let out = ok(&tessera(&[
        "image",
        "protect",
        "-i",
        p(&d.join("slice.png")),
        "--roi",
        "20,10,150,120",
        "--key-file",
        p(&key),
        "-o",
        p(&shares),
    ]));
    assert!(out.contains("share1"), "{out}");
    let restored = d.join("restored.png");
    let out = ok(&tessera(&[
        "image",
        "restore",
        "-d",
        p(&shares),
        "--key-file",
        p(&key),
        "-o",
        p(&restored),
    ]));
    assert!(out.contains("integrity: intact"), "{out}");
    let back = codec::decode(&std::fs::read(&restored).unwrap()).unwrap();
    assert_eq!(back, image, "restored PNG is bit-identical");

    // Tamper one byte of share 2: verify fails, names the block, writes a map.
    let s2 = shares.join("share2.bin");
    let mut bytes = std::fs::read(&s2).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&s2, &bytes).unwrap();
    let map = d.join("map.png");
    let out = tessera(&[
        "image",
        "verify",
        "-d",
        p(&shares),
        "--key-file",
        p(&key),
        "--map",
        p(&map),
    ]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TAMPERED") && text.contains("tile"), "{text}");
    let map_img = codec::decode(&std::fs::read(&map).unwrap()).unwrap();
    assert_eq!((map_img.width(), map_img.height()), (200, 150));
    // Restore refuses to write a tampered image by default.
    let out = tessera(&[
        "image",
        "restore",
        "-d",
        p(&shares),
        "--key-file",
        p(&key),
        "-o",
        p(&d.join("t.png")),
    ]);
    assert!(!out.status.success());
    assert!(!d.join("t.png").exists());
}

#[test]
fn paper_profile_and_raw_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = head_phantom(64, 40, 2, PixelFormat::gray16(12, true), 9).unwrap();
    std::fs::write(d.join("ct.raw"), image.to_le_bytes()).unwrap();
    let shares = d.join("paper");
    ok(&tessera(&[
        "image",
        "protect",
        "-i",
        p(&d.join("ct.raw")),
        "--raw",
        "64x40",
        "--bits",
        "16",
        "--stored",
        "12",
        "--signed",
        "--frames",
        "2",
        "--profile",
        "paper",
        "-o",
        p(&shares),
    ]));
    assert!(shares.join("paper.key").exists());
    let out_raw = d.join("back.raw");
    ok(&tessera(&[
        "image",
        "restore",
        "-d",
        p(&shares),
        "-o",
        p(&out_raw),
    ]));
    assert_eq!(std::fs::read(&out_raw).unwrap(), image.to_le_bytes());
    let out = ok(&tessera(&[
        "image",
        "metrics",
        "--share",
        p(&shares.join("share1.bin")),
        "--header",
        p(&shares.join("header.json")),
        "--against",
        p(&shares.join("share1.bin")),
    ]));
    assert!(out.contains("NPCR 0.0000"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("junk.png"), b"definitely not a png").unwrap();
    let key = d.join("k");
    ok(&tessera(&["image", "keygen", "--out", p(&key)]));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "image".into(),
                "protect".into(),
                "-i".into(),
                p(&d.join("junk.png")).into(),
                "--key-file".into(),
                p(&key).into(),
                "-o".into(),
                p(&d.join("o")).into(),
            ],
            "decoding",
        ),
        (
            vec![
                "image".into(),
                "protect".into(),
                "-i".into(),
                p(&d.join("junk.png")).into(),
                "--raw".into(),
                "4x4".into(),
                "--key-file".into(),
                p(&key).into(),
                "-o".into(),
                p(&d.join("o")).into(),
            ],
            "raw file",
        ),
        (
            vec![
                "image".into(),
                "restore".into(),
                "-d".into(),
                p(&d.join("missing")).into(),
                "--key-file".into(),
                p(&key).into(),
                "-o".into(),
                p(&d.join("x.png")).into(),
            ],
            "header.json",
        ),
    ];
    for (args, expect) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = tessera(&args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // ROI outside the image, and a world-readable key file.
    let image = head_phantom(32, 32, 1, PixelFormat::GRAY8, 1).unwrap();
    std::fs::write(d.join("s.png"), codec::encode_png(&image, 0).unwrap()).unwrap();
    let out = tessera(&[
        "image",
        "protect",
        "-i",
        p(&d.join("s.png")),
        "--roi",
        "30,30,8,8",
        "--key-file",
        p(&key),
        "-o",
        p(&d.join("o")),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("outside"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let open_key = d.join("open.key");
        std::fs::write(&open_key, "ab".repeat(32)).unwrap();
        std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = tessera(&[
            "image",
            "protect",
            "-i",
            p(&d.join("s.png")),
            "--key-file",
            p(&open_key),
            "-o",
            p(&d.join("o")),
        ]);
        assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    }
}

/// `tessera ... | head` with the reader gone before tessera writes: no
/// panic, no backtrace, the SIGPIPE-style status 141 (the work itself was
/// done: the key file is written).
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_exits_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.key");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["image", "keygen", "--out", p(&key)])
        .env("RUST_BACKTRACE", "1")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run tessera");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert_eq!(out.status.code(), Some(141), "{stderr}");
    assert!(key.is_file());
}

/// Issue 16: the paper profile takes explicit share keys (`--paper-key`),
/// refuses a study key instead of ignoring it, and `metrics
/// --key-sensitivity` measures one-bit key changes.
#[test]
fn paper_profile_explicit_keys_refusal_and_key_sensitivity() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = head_phantom(256, 256, 1, PixelFormat::GRAY8, 4).unwrap();
    let png = d.join("head.png");
    std::fs::write(&png, codec::encode_png(&image, 0).unwrap()).unwrap();
    let study = d.join("study.key");
    ok(&tessera(&["image", "keygen", "--out", p(&study)]));
    let refused = tessera(&[
        "image",
        "protect",
        "-i",
        p(&png),
        "--profile",
        "paper",
        "--key-file",
        p(&study),
        "-o",
        p(&d.join("x")),
    ]);
    assert!(
        !refused.status.success(),
        "a study key with --profile paper must be refused"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--paper-key"), "{err}");
    assert!(!d.join("x").join("header.json").exists());

    let keys = [
        "000102030405060708090a0b0c0d0e0f:f0e0d0c0b0a090807060504030201000",
        "000102030405060708090a0b0c0d0e0f:f0e0d0c0b0a090807060504030201001",
    ];
    let mut shares = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        let kf = d.join(format!("paper{i}.key"));
        std::fs::write(&kf, format!("{k}\n")).unwrap();
        let out = d.join(format!("p{i}"));
        ok(&tessera(&[
            "image",
            "protect",
            "-i",
            p(&png),
            "--profile",
            "paper",
            "--paper-key",
            p(&kf),
            "-o",
            p(&out),
        ]));
        assert_eq!(
            std::fs::read_to_string(out.join("paper.key"))
                .unwrap()
                .trim(),
            *k
        );
        let back = d.join(format!("back{i}.png"));
        ok(&tessera(&[
            "image",
            "restore",
            "-d",
            p(&out),
            "-o",
            p(&back),
        ]));
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&png).unwrap());
        shares.push(std::fs::read(out.join("share2.bin")).unwrap());
    }
    let same = shares[0]
        .iter()
        .zip(&shares[1])
        .skip(56)
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same * 100 < shares[0].len(),
        "{same} share bytes unchanged by the last key bit"
    );

    let out = ok(&tessera(&[
        "image",
        "metrics",
        "--key-sensitivity",
        "3",
        "--image",
        p(&png),
        "--seed",
        "7",
    ]));
    assert!(out.contains("3 random keys (--seed 7)"), "{out}");
    assert!(out.contains("worst key for share 2"), "{out}");
    assert!(!out.contains("BELOW"), "{out}");
}
