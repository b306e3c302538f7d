//! Integration tests of the gateway binary's own commands (the gRPC service
//! is covered end to end by tools/tessera-devstack/tests). The crate's one
//! integration-test binary: handler-level tests and the vault on both
//! backends are its modules.

mod dicom_tls_log;
mod handlers;
mod vault_backends;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use gateway_service::vault::{InstanceRecord, SpecRecord, StudyRecord, StudyState, Vault};

fn spec() -> SpecRecord {
    SpecRecord {
        width: 4,
        height: 4,
        frames: 1,
        bits_allocated: 8,
        bits_stored: 8,
        signed: false,
        channels: 1,
    }
}

fn study(n: u32, patient: &str) -> StudyRecord {
    StudyRecord {
        study_id: format!("st-{n:032x}"),
        state: StudyState::Committed,
        owner: "spiffe://tessera.local/user/owner".into(),
        stored_by: "spiffe://tessera.local/user/clinician".into(),
        attributes: vec![("patient_name".into(), patient.into())],
        original_format: 1,
        spec: spec(),
        header_json: "{}".into(),
        placements: vec![],
        created_unix: 1,
        dicom_study_uid: String::new(),
        replica: String::new(),
    }
}

fn private(path: &Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A gateway config whose vault is `dir/vault.redb` under `key_file`.
fn config(dir: &Path, key_file: &Path) -> PathBuf {
    for f in ["ca.crt", "gw.crt", "gw.key"] {
        private(&dir.join(f), b"x");
    }
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\n\
         [client_tls]\nca = \"{d}/ca.crt\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\n\
         [keyserver]\naddress = \"localhost:1\"\n[watermark]\naddress = \"localhost:2\"\n[segmentation]\naddress = \"localhost:3\"\n\
         [[storage_nodes]]\nname = \"storage-1\"\naddress = \"localhost:4\"\n\
         [[storage_nodes]]\nname = \"storage-2\"\naddress = \"localhost:5\"\n\
         [vault]\npath = \"{d}/vault.redb\"\nkey_file = \"{k}\"\n",
        d = dir.display(),
        k = key_file.display()
    );
    let name = format!(
        "gateway-{}.toml",
        key_file.file_name().unwrap().to_string_lossy()
    );
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the real `gateway` binary; (exit code, stdout, stderr).
fn gateway(args: &[&OsStr]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .env_remove("TESSERA_GATEWAY__VAULT__PATH")
        .env_remove("TESSERA_GATEWAY__VAULT__KEY_FILE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn field(line: &str, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    v[name].as_u64().unwrap()
}

#[test]
fn online_vault_backup_restores_the_older_records_and_only_those() {
    let dir = tempfile::tempdir().unwrap();
    let key = [9u8; 32];
    let key_file = dir.path().join("vault.key");
    private(&key_file, &key);
    let cfg = config(dir.path(), &key_file);
    let path = dir.path().join("vault.redb");

    // The vault open as in a serving gateway.
    let vault = Vault::open(&path, &key).unwrap();
    let older: Vec<StudyRecord> = (1..=3).map(|i| study(i, &format!("OLD^{i}"))).collect();
    for r in &older {
        vault.insert_new(r).unwrap();
    }
    let mut dicom = study(4, "DICOM^OLD");
    dicom.original_format = 4;
    dicom.dicom_study_uid = "1.2.3".into();
    vault.put_dicom_study(&dicom, "PID-4").unwrap();
    let instance = InstanceRecord {
        study_id: dicom.study_id.clone(),
        instance_id: "in-1".into(),
        state: StudyState::Committed,
        seq: 1,
        sop_instance_uid: "1.2.3.4".into(),
        size: 10,
        sha256: "00".into(),
        transfer_syntax: "1.2.840.10008.1.2.1".into(),
        watermarked: false,
        spec: spec(),
        header_json: "{}".into(),
        placements: vec![],
        stored_by: "spiffe://tessera.local/user/clinician".into(),
        created_unix: 1,
        burned_in_annotation: false,
        indexed: vec![],
        replica: String::new(),
    };
    vault.insert_instance(&instance).unwrap();

    let backup = dir.path().join("vault-backup.redb");
    let c = cfg.as_os_str();
    let started = std::time::Instant::now();
    let (code, out, err) = gateway(&[
        OsStr::new("--config"),
        c,
        OsStr::new("vault-backup"),
        OsStr::new("--out"),
        backup.as_os_str(),
    ]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert_eq!(field(&out, "studies"), 4, "{out}");
    assert_eq!(field(&out, "instances"), 1, "{out}");
    assert_eq!(field(&out, "indexEntries"), 2, "{out}");
    let raw = std::fs::read(&backup).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        eprintln!("vault backup: {} bytes in {took:?}", raw.len());
    }
    // Sealed: no patient name in the clear.
    assert!(!raw.windows(5).any(|w| w == b"OLD^1"));
    let (code, _, err) = gateway(&[
        OsStr::new("--config"),
        c,
        OsStr::new("vault-backup"),
        OsStr::new("--out"),
        backup.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    let newer: Vec<StudyRecord> = (10..12).map(|i| study(i, &format!("NEW^{i}"))).collect();
    for r in &newer {
        vault.insert_new(r).unwrap();
    }

    let restore = |cfg: &Path, backup: &Path, force: bool| {
        let mut args = vec![
            OsStr::new("--config"),
            cfg.as_os_str(),
            OsStr::new("vault-restore"),
            OsStr::new("--backup"),
            backup.as_os_str(),
        ];
        if force {
            args.push(OsStr::new("--force"));
        }
        gateway(&args)
    };
    let (code, _, err) = restore(&cfg, &backup, true);
    assert_eq!(code, 1);
    assert!(err.contains("open in another process"), "{err}");
    drop(vault);
    let (code, _, err) = restore(&cfg, &backup, false);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    // Tampered (one byte of a record's key) and truncated: refused, the
    // vault untouched.
    let before = std::fs::read(&path).unwrap();
    let mut tampered = raw.clone();
    let id = older[1].study_id.as_bytes();
    let at = tampered.windows(id.len()).position(|w| w == id).unwrap();
    tampered[at + id.len() - 1] ^= 1;
    let bad = dir.path().join("tampered.redb");
    std::fs::write(&bad, &tampered).unwrap();
    let (code, _, err) = restore(&cfg, &bad, true);
    assert_eq!(code, 1);
    assert!(err.contains("not a sound database"), "{err}");
    let cut = dir.path().join("cut.redb");
    std::fs::write(&cut, &raw[..raw.len() / 2]).unwrap();
    let (code, _, err) = restore(&cfg, &cut, true);
    assert_eq!(code, 1);
    assert!(err.contains("not a sound database"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // Another vault key opens none of the records: refused.
    let other_key = dir.path().join("other.key");
    private(&other_key, &[8u8; 32]);
    let other_cfg = config(dir.path(), &other_key);
    let (code, _, err) = restore(&other_cfg, &backup, true);
    assert_eq!(code, 1);
    assert!(err.contains("does not open under the vault key"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // The vault is lost; the backup takes its place.
    std::fs::remove_file(&path).unwrap();
    let (code, out, err) = restore(&cfg, &backup, false);
    assert_eq!(code, 0, "{err}");
    assert_eq!(field(&out, "studies"), 4, "{out}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let vault = Vault::open(&path, &key).unwrap();
    for r in &older {
        assert_eq!(vault.committed(&r.study_id).unwrap(), *r);
    }
    assert_eq!(
        vault
            .find_dicom_study(&dicom.owner, "PID-4", "1.2.3")
            .unwrap(),
        Some(dicom.clone())
    );
    assert_eq!(vault.instances(&dicom.study_id).unwrap(), vec![instance]);
    for r in &newer {
        assert_eq!(vault.get(&r.study_id).unwrap(), None);
    }
}
