//! One test body, two backends: the vault's behaviour on the redb file and
//! on a real PostgreSQL server (tessera-testkit starts one per test on a
//! private socket and data folder; a missing PostgreSQL fails the test).

use gateway_service::GatewayError;
use gateway_service::vault::{
    InstanceRecord, SpecRecord, StudyRecord, StudyState, Vault, VaultCounts,
};
use tessera_testkit::postgres::Postgres;

const KEY: [u8; 32] = [7u8; 32];
const NAME: &str = "Doe^Jane";
const PID: &str = "PID-70431";

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

fn study(id: &str, state: StudyState) -> StudyRecord {
    StudyRecord {
        study_id: id.into(),
        state,
        owner: "spiffe://tessera.local/user/owner".into(),
        stored_by: "spiffe://tessera.local/user/clinician".into(),
        attributes: vec![
            ("patient_name".into(), NAME.into()),
            ("patient_id".into(), PID.into()),
        ],
        original_format: 1,
        spec: spec(),
        header_json: "{}".into(),
        placements: vec![],
        created_unix: 1,
        dicom_study_uid: String::new(),
        replica: String::new(),
    }
}

fn instance(study_id: &str, id: &str, sop: &str, state: StudyState, seq: u128) -> InstanceRecord {
    InstanceRecord {
        study_id: study_id.into(),
        instance_id: id.into(),
        state,
        seq,
        sop_instance_uid: sop.into(),
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
        indexed: vec![((0x0010, 0x0010), NAME.into())],
        replica: String::new(),
    }
}

fn already_exists<T: std::fmt::Debug>(r: Result<T, GatewayError>) -> bool {
    matches!(r, Err(GatewayError::AlreadyExists(_)))
}

/// What a backend holds, raw (the redb file; a `pg_dump` of the database).
type Raw<'a> = &'a dyn Fn() -> Vec<u8>;

/// The body both backends run.
fn exercise(v: &Vault, raw: Raw<'_>, dir: &std::path::Path) {
    // Insert, conflict, put, get, remove.
    let mut a = study("st-1", StudyState::Pending);
    v.insert_new(&a).unwrap();
    assert!(already_exists(v.insert_new(&a)), "ids are unique");
    assert!(matches!(
        v.committed("st-1"),
        Err(GatewayError::NotFound(_))
    ));
    a.state = StudyState::Committed;
    v.put(&a).unwrap();
    assert_eq!(v.committed("st-1").unwrap(), a);
    assert!(v.get("st-nothing").unwrap().is_none());
    // Concurrent writers, each answered.
    std::thread::scope(|sc| {
        for i in 0..16u32 {
            sc.spawn(move || {
                v.insert_new(&study(&format!("st-c{i:02}"), StudyState::Committed))
                    .unwrap()
            });
        }
    });
    assert_eq!(v.count_committed().unwrap(), 17);
    assert_eq!(v.count_studies().unwrap(), 17);
    for i in 0..16u32 {
        v.remove(&format!("st-c{i:02}")).unwrap();
    }
    assert_eq!(v.committed_ids().unwrap(), vec!["st-1".to_string()]);

    // A store of this replica commits by compare-and-set: over its own
    // pending intent (and updates of its own committed record), never
    // over a record that is gone (rolled back by another replica).
    let mut own = study("st-own", StudyState::Pending);
    own.replica = v.replica().to_owned();
    v.insert_new(&own).unwrap();
    own.state = StudyState::Committed;
    v.put(&own).unwrap();
    own.placements = vec![];
    v.put(&own).unwrap();
    assert!(v.claim(&own).unwrap(), "its own record is its own to undo");
    v.remove("st-own").unwrap();
    assert!(matches!(v.put(&own), Err(GatewayError::Unavailable(_))));
    assert!(v.get("st-own").unwrap().is_none(), "nothing resurrected");
    assert!(!v.claim(&own).unwrap(), "gone: nothing to roll back");

    // DICOM studies: the HMAC index finds them; removal drops the entry.
    let mut d = study("st-10", StudyState::Committed);
    d.original_format = 4;
    d.dicom_study_uid = "1.2.3".into();
    v.put_dicom_study(&d, PID).unwrap();
    let owner = d.owner.clone();
    assert_eq!(
        v.find_dicom_study(&owner, PID, "1.2.3").unwrap(),
        Some(d.clone())
    );
    assert!(
        v.find_dicom_study(&owner, "other", "1.2.3")
            .unwrap()
            .is_none()
    );

    // Instances: prefix scans keep "st-1/" apart from "st-10/".
    let i1 = instance("st-1", "in-b", "1.2.3.4", StudyState::Committed, 2);
    let i2 = instance("st-1", "in-a", "1.2.3.5", StudyState::Pending, 1);
    let i3 = instance("st-10", "in-c", "1.2.3.4", StudyState::Committed, 1);
    for i in [&i1, &i2, &i3] {
        v.insert_instance(i).unwrap();
    }
    // The same SOP Instance UID again: refused whole (no instance row).
    let dup = instance("st-1", "in-z", "1.2.3.4", StudyState::Pending, 3);
    assert!(already_exists(v.insert_instance(&dup)));
    let ids = |s: &str| -> Vec<String> {
        v.instances(s)
            .unwrap()
            .into_iter()
            .map(|i| i.instance_id)
            .collect()
    };
    assert_eq!(ids("st-1"), ["in-a", "in-b"], "store order, no st-10 rows");
    assert_eq!(ids("st-10"), ["in-c"]);
    assert_eq!(
        v.instance_by_sop("st-1", "1.2.3.4").unwrap(),
        Some(i1.clone())
    );
    assert!(v.instance_by_sop("st-1", "9.9").unwrap().is_none());
    let unfinished: Vec<_> = v.unfinished_instances().unwrap();
    assert_eq!(unfinished, vec![i2.clone()]);
    let mut i2c = i2.clone();
    i2c.state = StudyState::Committed;
    v.put_instance(&i2c).unwrap();
    assert!(v.unfinished_instances().unwrap().is_empty());

    // RemoveIndexIf: a release naming another instance leaves the entry.
    v.release_sop(&dup).unwrap();
    assert_eq!(
        v.instance_by_sop("st-1", "1.2.3.4").unwrap(),
        Some(i1.clone())
    );
    v.release_sop(&i1).unwrap();
    assert!(v.instance_by_sop("st-1", "1.2.3.4").unwrap().is_none());
    // The UID is free again: another instance id may take it.
    v.insert_instance(&dup).unwrap();
    v.remove_instance(&dup).unwrap();
    v.remove_instance(&i1).unwrap();
    assert_eq!(ids("st-1"), ["in-a"]);

    // Unfinished studies, and which of them recovery may finish.
    let mut mine = study("st-2", StudyState::Pending);
    mine.replica = v.replica().to_owned();
    let legacy = study("st-3", StudyState::Deleting);
    let mut lapsed = study("st-4", StudyState::Pending);
    lapsed.replica = "r-crashed-long-ago".into();
    for r in [&mine, &legacy, &lapsed] {
        v.insert_new(r).unwrap();
    }
    let mut unfinished: Vec<_> = v
        .unfinished()
        .unwrap()
        .into_iter()
        .map(|r| r.study_id)
        .collect();
    unfinished.sort();
    assert_eq!(unfinished, ["st-2", "st-3", "st-4"]);
    let recoverable: Vec<_> = v
        .recoverable_studies()
        .unwrap()
        .into_iter()
        .map(|r| r.study_id)
        .collect();
    assert_eq!(recoverable, ["st-3", "st-4"], "never this replica's own");

    // The backup copy: every row, sealed as stored, opens under the key.
    let out = dir.join("export.redb");
    let counts = v.export_redb(&out).unwrap();
    assert_eq!(
        counts,
        VaultCounts {
            studies: 5,
            instances: 2,
            index: 3
        }
    );
    assert!(v.export_redb(&out).is_err(), "never overwrites");
    let copy = Vault::open(&out, &KEY).unwrap();
    assert_eq!(copy.committed("st-1").unwrap(), a);
    assert_eq!(
        copy.instances("st-1").unwrap(),
        v.instances("st-1").unwrap()
    );
    drop(copy);
    let copy_raw = std::fs::read(&out).unwrap();

    // No identity bytes at rest, plain or hex-encoded.
    for bytes in [raw(), copy_raw] {
        for needle in [NAME, PID] {
            let hexed = hex(needle.as_bytes());
            assert!(
                !contains(&bytes, needle.as_bytes()) && !contains(&bytes, hexed.as_bytes()),
                "{needle} found at rest"
            );
        }
    }

    v.remove_dicom_study(&d).unwrap();
    assert!(v.find_dicom_study(&owner, PID, "1.2.3").unwrap().is_none());
    assert!(v.get("st-10").unwrap().is_none());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn vault_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vault.redb");
    let v = Vault::open(&path, &KEY).unwrap();
    assert!(!v.shared());
    exercise(&v, &|| std::fs::read(&path).unwrap(), dir.path());
}

#[test]
fn vault_on_postgres() {
    let pg = Postgres::start();
    let url = pg.create_db("vault");
    let dir = tempfile::tempdir().unwrap();
    let v = Vault::open_postgres(&url, &KEY, 30).unwrap();
    assert!(v.shared());
    exercise(&v, &|| pg.dump("vault"), dir.path());
    // Reopening finds the schema and the rows.
    drop(v);
    let v = Vault::open_postgres(&url, &KEY, 30).unwrap();
    assert!(v.committed("st-1").is_ok());
    assert_eq!(
        pg.psql(
            "vault",
            "SELECT value FROM vault_meta WHERE name = 'schema_version'"
        )
        .trim(),
        "1"
    );
    // /metrics' study count: reused until this process writes, or the TTL
    // passes (another replica's store shows then).
    let b = Vault::open_postgres(&url, &KEY, 30).unwrap();
    let ttl = std::time::Duration::from_secs(3600);
    let n = v.count_studies_cached(ttl).unwrap();
    b.insert_new(&study("st-other", StudyState::Committed))
        .unwrap();
    assert_eq!(v.count_studies_cached(ttl), Some(n), "cached");
    assert_eq!(
        v.count_studies_cached(std::time::Duration::ZERO),
        Some(n + 1)
    );
    v.insert_new(&study("st-own", StudyState::Committed))
        .unwrap();
    assert_eq!(v.count_studies_cached(ttl), Some(n + 2), "own write seen");
}

/// Two replicas on one database: neither recovers the other's unfinished
/// stores while its lease is live; a replica that stops beating (crashed)
/// has its records recovered once the lease lapses.
#[test]
fn replicas_respect_each_others_leases() {
    let pg = Postgres::start();
    let url = pg.create_db("vault");
    let a = Vault::open_postgres(&url, &KEY, 3).unwrap();
    let b = Vault::open_postgres(&url, &KEY, 3).unwrap();
    assert_ne!(a.replica(), b.replica());
    let mut rec = study("st-a", StudyState::Pending);
    rec.replica = a.replica().to_owned();
    a.insert_new(&rec).unwrap();
    let mut inst = instance("st-a", "in-1", "1.2", StudyState::Pending, 1);
    inst.replica = a.replica().to_owned();
    a.insert_instance(&inst).unwrap();
    // A beats: B leaves A's records alone, and A never recovers its own.
    for _ in 0..4 {
        a.heartbeat().unwrap();
        assert!(b.recoverable_studies().unwrap().is_empty());
        assert!(b.recoverable_instances().unwrap().is_empty());
        assert!(a.recoverable_studies().unwrap().is_empty());
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    // A stops beating (as a crashed process would): after the lease, B
    // may finish A's store.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    assert_eq!(b.recoverable_studies().unwrap(), vec![rec.clone()]);
    assert_eq!(b.recoverable_instances().unwrap(), vec![inst]);
    // A beats again: its records are protected again.
    a.heartbeat().unwrap();
    assert!(b.recoverable_studies().unwrap().is_empty());
}

/// Decision 22's two gaps. A replica stalled past its lease (not dead)
/// cannot commit a store another replica's recovery took over: the
/// recovering replica claims the record first (compare-and-set), and the
/// commit is a compare-and-set on this replica's own record. And a record
/// held by a live replica when the sweep ran (an earlier run of the same
/// gateway restarted within its lease) is found again once the lease
/// lapses.
#[test]
fn a_stalled_replica_cannot_commit_what_another_recovered() {
    let pg = Postgres::start();
    let url = pg.create_db("vault");
    let a = Vault::open_postgres(&url, &KEY, 3).unwrap();
    let b = Vault::open_postgres(&url, &KEY, 3).unwrap();
    let mut rec = study("st-stall", StudyState::Pending);
    rec.replica = a.replica().to_owned();
    a.insert_new(&rec).unwrap();
    let mut inst = instance("st-stall", "in-1", "1.9", StudyState::Pending, 1);
    inst.replica = a.replica().to_owned();
    a.insert_instance(&inst).unwrap();
    let mut del = study("st-del", StudyState::Deleting);
    del.replica = a.replica().to_owned();
    a.put(&del).unwrap();
    // While A's lease is live, B only sees A's records as held.
    a.heartbeat().unwrap();
    assert!(b.recoverable_studies().unwrap().is_empty());
    let (held_s, held_i) = b.held().unwrap();
    assert_eq!(held_s.len(), 2);
    assert_eq!(held_i, vec![inst.clone()]);
    let ((ready_s, ready_i), (still_s, _)) = b.recheck(&held_s, &held_i).unwrap();
    assert!(ready_s.is_empty() && ready_i.is_empty() && still_s.len() == 2);
    // A stalls past its lease: B's second look finds them recoverable.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let ((ready_s, ready_i), (still_s, still_i)) = b.recheck(&held_s, &held_i).unwrap();
    assert_eq!(ready_s.len(), 2, "the interrupted store and delete");
    assert_eq!(ready_i, vec![inst.clone()]);
    assert!(still_s.is_empty() && still_i.is_empty());
    // B claims the store (and the instance) before rolling back ...
    assert!(b.claim(&rec).unwrap());
    assert!(b.claim_instance(&inst).unwrap());
    assert_eq!(b.get("st-stall").unwrap().unwrap().replica, b.replica());
    // ... so A, waking up, can neither commit nor claim them.
    let mut late = rec.clone();
    late.state = StudyState::Committed;
    assert!(matches!(a.put(&late), Err(GatewayError::Unavailable(_))));
    let mut late_i = inst.clone();
    late_i.state = StudyState::Committed;
    assert!(matches!(
        a.put_instance(&late_i),
        Err(GatewayError::Unavailable(_))
    ));
    assert!(!a.claim(&rec).unwrap(), "taken over: not A's to undo");
    assert!(!a.claim_instance(&inst).unwrap());
    assert!(a.committed("st-stall").is_err(), "never committed");
    // A claim races with the commit it guards against: only one wins.
    let mut race = study("st-race", StudyState::Pending);
    race.replica = a.replica().to_owned();
    a.insert_new(&race).unwrap();
    let mut done = race.clone();
    done.state = StudyState::Committed;
    a.put(&done).unwrap();
    assert!(!b.claim(&race).unwrap(), "committed first: B leaves it");
    assert_eq!(a.committed("st-race").unwrap().state, StudyState::Committed);
    // Once B removed what it rolled back, A's late commit still fails.
    b.remove("st-stall").unwrap();
    assert!(matches!(a.put(&late), Err(GatewayError::Unavailable(_))));
    assert!(b.get("st-stall").unwrap().is_none());
}

/// The database goes away: calls fail UNAVAILABLE (nothing acknowledged,
/// no other store); it comes back: the pool reconnects.
#[test]
fn an_unreachable_database_fails_closed() {
    let pg = Postgres::start();
    let url = pg.create_db("vault");
    let v = Vault::open_postgres(&url, &KEY, 30).unwrap();
    v.insert_new(&study("st-1", StudyState::Committed)).unwrap();
    pg.stop();
    let t = std::time::Instant::now();
    let r = v.insert_new(&study("st-2", StudyState::Committed));
    assert!(matches!(r, Err(GatewayError::Unavailable(_))), "{r:?}");
    assert!(matches!(v.get("st-1"), Err(GatewayError::Unavailable(_))));
    assert!(t.elapsed() < std::time::Duration::from_secs(25));
    let status: tonic::Status = v.get("st-1").unwrap_err().into();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(v.count_studies_cached(std::time::Duration::ZERO), None);
    // Opening against a stopped database fails too (no fallback).
    assert!(matches!(
        Vault::open_postgres(&url, &KEY, 30),
        Err(GatewayError::Unavailable(_))
    ));
    pg.restart();
    assert!(v.committed("st-1").is_ok());
    assert!(
        v.get("st-2").unwrap().is_none(),
        "the refused insert left nothing"
    );
    v.insert_new(&study("st-2", StudyState::Committed)).unwrap();
}
