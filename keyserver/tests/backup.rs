//! `keyserver backup` and `restore` while serving.

use tessera_proto::keyserver::v1 as pb;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn online_backup_restores_the_older_studies_and_only_those() {
    use std::ffi::OsStr;
    let mut env = Env::start().await;
    let older: Vec<(String, String)> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let p = format!("OLD-{i}");
            v.push((register(&env, &p).await, p));
        }
        v
    };
    let mut keys = Vec::new();
    for (study, patient) in &older {
        keys.push(derive(&env, study, patient).await.unwrap());
    }

    // Backup by a second process while the keyserver serves.
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("ks-backup.redb");
    let config_file = env.config_file.clone();
    let cfg = config_file.as_os_str();
    let started = std::time::Instant::now();
    let (code, out, err) = keyserver_cli(&[
        OsStr::new("--config"),
        cfg,
        OsStr::new("backup"),
        OsStr::new("--out"),
        backup.as_os_str(),
    ]);
    let took = started.elapsed();
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_field(&out, "studies"), 3, "{out}");
    assert_eq!(json_field(&out, "masters"), 1, "{out}");
    let snapshot_entries = json_field(&out, "auditEntries");
    let at_backup = all_audit(&env).await;
    assert_eq!(at_backup.len() as u64, snapshot_entries);
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(&backup).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        eprintln!(
            "backup of {} audit entries: {} bytes in {took:?}",
            snapshot_entries,
            meta.len()
        );
    }
    // The master secret is copied wrapped: its clear bytes are nowhere.
    let raw = std::fs::read(&backup).unwrap();
    assert!(!raw.windows(32).any(|w| keys.iter().any(|k| k == w)));
    // Never over an existing file.
    let (code, _, err) = keyserver_cli(&[
        OsStr::new("--config"),
        cfg,
        OsStr::new("backup"),
        OsStr::new("--out"),
        backup.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&backup).unwrap(), raw);

    // N newer studies after the snapshot.
    let mut newer = Vec::new();
    for i in 0..2 {
        let p = format!("NEW-{i}");
        let s = register(&env, &p).await;
        derive(&env, &s, &p).await.unwrap();
        newer.push((s, p));
    }

    // Not into the database of a running keyserver, even with --force.
    let db = env.cfg.keyserver.db_path.clone();
    let restore = |extra: &[&OsStr], backup: &std::path::Path| {
        let mut args = vec![
            OsStr::new("--config"),
            cfg,
            OsStr::new("restore"),
            OsStr::new("--backup"),
            backup.as_os_str(),
        ];
        args.extend_from_slice(extra);
        keyserver_cli(&args)
    };
    let (code, _, err) = restore(&[OsStr::new("--force")], &backup);
    assert_eq!(code, 1);
    assert!(err.contains("open in another process"), "{err}");
    env.halt().await;
    let (code, _, err) = restore(&[], &backup);
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    // A tampered backup (one audit byte) and a truncated one are refused,
    // the database left as it was.
    let before = std::fs::read(&db).unwrap();
    let mut tampered = raw.clone();
    let marker = b"master_version=1";
    let at = tampered
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap();
    tampered[at + marker.len() - 1] = b'2';
    let bad = dir.path().join("tampered.redb");
    std::fs::write(&bad, &tampered).unwrap();
    let (code, _, err) = restore(&[OsStr::new("--force")], &bad);
    assert_eq!(code, 1);
    assert!(err.contains("not a sound database"), "{err}");
    let cut = dir.path().join("cut.redb");
    std::fs::write(&cut, &raw[..raw.len() / 2]).unwrap();
    let (code, _, err) = restore(&[OsStr::new("--force")], &cut);
    assert_eq!(code, 1);
    assert!(err.contains("not a sound database"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // Rewritten through redb (valid page checksums) but not by the
    // keyserver: the audit chain names the entry.
    let forged = dir.path().join("forged.redb");
    std::fs::write(&forged, &raw).unwrap();
    {
        use keyserver::core::kv::{Key, KvRead, KvTxn, KvWrite, RedbWrite};
        use keyserver::core::store::AUDIT;
        let db = redb::Database::open(&forged).unwrap();
        let w = Box::new(RedbWrite(db.begin_write().unwrap()));
        let mut v = w.get(AUDIT, Key::Num(2)).unwrap().unwrap();
        let last = v.len() - 1;
        v[last] ^= 1;
        w.insert(AUDIT, Key::Num(2), v.as_slice()).unwrap();
        w.commit().unwrap();
    }
    let (code, _, err) = restore(&[OsStr::new("--force")], &forged);
    assert_eq!(code, 1);
    assert!(err.contains("audit chain broken at entry 2"), "{err}");
    assert_eq!(std::fs::read(&db).unwrap(), before);

    // Another KEK cannot unwrap the backup's secrets: refused.
    let other_kek = dir.path().join("other.kek");
    std::fs::write(&other_kek, [7u8; 32]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&other_kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let other_cfg = dir.path().join("other.toml");
    std::fs::write(
        &other_cfg,
        std::fs::read_to_string(&env.config_file).unwrap().replace(
            &env.cfg.keyserver.kek_file.display().to_string(),
            &other_kek.display().to_string(),
        ),
    )
    .unwrap();
    let fresh = dir.path().join("fresh.redb");
    let (code, _, err) = keyserver_cli(&[
        OsStr::new("--config"),
        other_cfg.as_os_str(),
        OsStr::new("restore"),
        OsStr::new("--backup"),
        backup.as_os_str(),
        OsStr::new("--db"),
        fresh.as_os_str(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("key-encryption key"), "{err}");
    assert!(!fresh.exists());

    // The database is lost; the backup is installed in its place.
    std::fs::remove_file(&db).unwrap();
    let (code, out, err) = restore(&[], &backup);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_field(&out, "auditEntries"), snapshot_entries);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&db).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    env.resume().await;
    for ((study, patient), key) in older.iter().zip(&keys) {
        assert_eq!(&derive(&env, study, patient).await.unwrap(), key);
    }
    for (study, patient) in &newer {
        let e = derive(&env, study, patient).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
    }
    let v = env
        .client("owner")
        .await
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{}", v.problem);
    let log = all_audit(&env).await;
    assert_eq!(&log[..at_backup.len()], &at_backup[..]);
    assert!(log.len() > at_backup.len());
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_during_registrations_is_one_consistent_commit() {
    use std::ffi::OsStr;
    let env = Env::start().await;
    let gw = env.client("gateway").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let mut gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..250 {
                gw.register_study(pb::RegisterStudyRequest {
                    owner: OWNER.into(),
                    attributes: attrs(&format!("P-{t}-{i}")),
                    study_id: String::new(),
                })
                .await
                .unwrap();
            }
        }));
    }
    // Wait until writes are under way, then back up beside them.
    while all_audit(&env).await.len() < 50 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("b.redb");
    let cfg = env.config_file.clone();
    let out2 = out.clone();
    let started = std::time::Instant::now();
    let (code, o, e) = tokio::task::spawn_blocking(move || {
        keyserver_cli(&[
            OsStr::new("--config"),
            cfg.as_os_str(),
            OsStr::new("backup"),
            OsStr::new("--out"),
            out2.as_os_str(),
        ])
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(code, 0, "{e}");
    for t in tasks {
        t.await.unwrap();
    }
    // A snapshot of one commit (whenever it fell among the registrations):
    // its chain verified (backup checks it) and it holds as many studies as
    // its audit entries say (one `master.created`, then one
    // `study.registered` each).
    let studies = json_field(&o, "studies");
    let entries = json_field(&o, "auditEntries");
    assert_eq!(entries, studies + 1, "{o}");
    eprintln!(
        "backup during writes: {studies} studies, {} bytes in {took:?}",
        std::fs::metadata(&out).unwrap().len()
    );
    let fresh = dir.path().join("fresh.redb");
    let (code, r, e) = keyserver_cli(&[
        OsStr::new("--config"),
        env.config_file.as_os_str(),
        OsStr::new("restore"),
        OsStr::new("--backup"),
        out.as_os_str(),
        OsStr::new("--db"),
        fresh.as_os_str(),
    ]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(json_field(&r, "studies"), studies);
    env.stop().await;
}
