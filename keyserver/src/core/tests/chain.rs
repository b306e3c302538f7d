//! The audit chain at start and on disk; trust domains.

use super::*;

#[tokio::test]
async fn a_stopped_verification_reports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.redb");
    let core = open_with(&path, [2; 32], Arc::new(ManualClock::at_secs(5)), 2).unwrap();
    core.register_study(GW, OWNER, &attrs("A"), None)
        .await
        .unwrap();
    let pk = core.audit_public_key().to_vec();
    drop(core);
    let ro = ReadOnlyDatabase::open(&path).unwrap();
    let stop = AtomicBool::new(true);
    // Stopped before the first entry: not a truncated log, no verdict.
    assert_eq!(
        verify_database_stoppable(&kv::redb_read(&ro).unwrap(), &pk, false, Some(&stop)).unwrap(),
        None
    );
    stop.store(false, Ordering::SeqCst);
    let rep = verify_database_stoppable(&kv::redb_read(&ro).unwrap(), &pk, false, Some(&stop))
        .unwrap()
        .unwrap();
    assert!(rep.ok, "{rep:?}");
}

#[tokio::test]
async fn identities_are_in_the_configured_trust_domain() {
    let dir = tempfile::tempdir().unwrap();
    let gw = "spiffe://hospital.example/service/gateway";
    let owner = "spiffe://hospital.example/user/owner";
    let core = Core::open(
        CoreConfig {
            store: StoreAt::Redb(dir.path().join("ks.redb")),
            kek: Kek::from_bytes(&[3; 32]).unwrap(),
            trust_domain: "hospital.example".into(),
            gateway_identity: gw.into(),
            derivers: vec![(gw.into(), vec!["dicom-*".into()])],
            checkpoint_every: 10,
            max_grant_ttl_secs: 60,
            max_grant_uses: 1,
            access: Default::default(),
        },
        Arc::new(ManualClock::at_secs(1)),
    )
    .unwrap();
    // The built-in tessera.local domain is just another domain here.
    assert!(matches!(
        core.register_study(gw, OWNER, &attrs("A"), None).await,
        Err(KeyServerError::InvalidArgument(m)) if m.contains("hospital.example")
    ));
    let s = core
        .register_study(gw, owner, &attrs("A"), None)
        .await
        .unwrap();
    assert!(matches!(
        core.add_delegate(owner, CLIN).await,
        Err(KeyServerError::InvalidArgument(_))
    ));
    core.add_delegate(owner, "spiffe://hospital.example/user/clinician")
        .await
        .unwrap();
    core.derive_key(gw, &s.id, &attrs("A"), "dicom-pixels", Operation::Protect)
        .await
        .unwrap();
    assert!(matches!(
        core.derive_key(gw, &s.id, &attrs("A"), "pixels", Operation::Protect)
            .await,
        Err(KeyServerError::PermissionDenied(_))
    ));
}

#[tokio::test]
async fn a_flipped_byte_on_disk_names_its_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ks.redb");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_secs(5));
    let core = open_with(&path, [1; 32], clock.clone(), 2).unwrap();
    let s = core
        .register_study(GW, OWNER, &attrs("A"), None)
        .await
        .unwrap();
    let r = core
        .request_key(CLIN, &s.id, &attrs("A"), "pixels", "", "")
        .await
        .unwrap();
    core.approve(OWNER, &r.id, 60, 1).await.unwrap();
    core.fetch_key(CLIN, &r.id).await.unwrap();
    for _ in 0..4 {
        core.derive_key(GW, &s.id, &attrs("A"), "pixels", Operation::Restore)
            .await
            .unwrap();
    }
    let approval_seq = core
        .list_audit(1, 100)
        .unwrap()
        .into_iter()
        .find(|e| e.event == "grant.approved")
        .unwrap()
        .seq;
    assert!(core.verify_audit().unwrap().ok);
    drop(core);

    let mut bytes = std::fs::read(&path).unwrap();
    let marker = b"grant.approved";
    let mut flipped = 0;
    for i in 0..bytes.len().saturating_sub(marker.len()) {
        if &bytes[i..i + marker.len()] == marker {
            bytes[i + marker.len() - 1] ^= 0x20;
            flipped += 1;
        }
    }
    assert!(flipped >= 1);
    std::fs::write(&path, &bytes).unwrap();

    let kek = Kek::from_bytes(&[1; 32]).unwrap();
    let (rep, pk) = verify_audit_file(&path, Some(&kek)).unwrap();
    assert!(!rep.ok);
    assert_eq!(rep.first_broken_seq, Some(approval_seq), "{}", rep.problem);
    {
        // Older than the last checkpoint: the quick check at start passes.
        let ro = ReadOnlyDatabase::open(&path).unwrap();
        assert!(
            verify_database_tail(&kv::redb_read(&ro).unwrap(), &pk)
                .unwrap()
                .ok
        );
    }

    let core = open_with(&path, [1; 32], clock, 2).unwrap();
    // The approval is older than the last checkpoint, so the check at
    // start does not see it; the background full check does, and from
    // then on key operations are refused.
    let mut seen = None;
    for _ in 0..500 {
        seen = core.chain_break();
        if seen.is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(seen.map(|b| b.seq), Some(approval_seq));
    assert!(matches!(
        core.derive_key(GW, &s.id, &attrs("A"), "pixels", Operation::Restore).await,
        Err(KeyServerError::FailedPrecondition(m)) if m.contains(&format!("entry {approval_seq}"))
    ));
    let rep = core.verify_audit().unwrap();
    assert_eq!(rep.first_broken_seq, Some(approval_seq), "{}", rep.problem);
}
