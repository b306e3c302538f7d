//! Unit tests of [`super`] (store.rs).

use super::*;

const LIMITS: Limits = Limits {
    capacity_bytes: 8 * 1024 * 1024,
    max_object_bytes: 3 * 1024 * 1024,
};

fn open(dir: &Path) -> Store {
    Store::open(&dir.join("objects.redb"), LIMITS).unwrap()
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn ids() {
    for ok in ["a", "A-b_c.d", "0", &"x".repeat(128)] {
        validate_id(ok).unwrap();
    }
    for bad in ["", ".hidden", "a/b", "a b", "é", &"x".repeat(129), "a\0b"] {
        assert!(
            matches!(validate_id(bad), Err(Error::InvalidId(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn put_get_stat_delete_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    // Multi-chunk, exact-chunk and empty objects.
    for (id, data) in [
        ("big", bytes(STORE_CHUNK * 2 + 17, 1)),
        ("exact", bytes(STORE_CHUNK, 2)),
        ("empty", Vec::new()),
    ] {
        let (meta, created) = s.put(id, &data).unwrap();
        assert!(created);
        assert_eq!(meta.size, data.len() as u64);
        let (got_meta, pieces) = s.get(id).unwrap();
        assert_eq!(got_meta, meta);
        assert_eq!(pieces.concat(), data);
        assert_eq!(s.stat(id).unwrap(), meta);
    }
    let usage = s.usage().unwrap();
    assert_eq!(usage.object_count, 3);
    assert_eq!(usage.used_bytes, (STORE_CHUNK * 3 + 17) as u64);
    assert_eq!(s.delete("big").unwrap(), (STORE_CHUNK * 2 + 17) as u64);
    assert!(matches!(s.get("big"), Err(Error::NotFound(_))));
    assert!(matches!(s.delete("big"), Err(Error::NotFound(_))));
    assert_eq!(s.usage().unwrap().object_count, 2);
}

#[test]
fn concurrent_puts_share_commits_and_keep_their_own_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.put("taken", &bytes(100, 1)).unwrap();
    std::thread::scope(|sc| {
        for i in 0..24u8 {
            let s = &s;
            sc.spawn(move || {
                let id = format!("c{i}");
                let (meta, created) = s.put(&id, &bytes(70_000 + usize::from(i), i)).unwrap();
                assert!(created);
                assert_eq!(meta.size, 70_000 + u64::from(i));
                // A conflicting put in the same window fails alone.
                assert!(matches!(
                    s.put("taken", &bytes(100, 2)),
                    Err(Error::Conflict(_))
                ));
            });
        }
    });
    let u = s.usage().unwrap();
    assert_eq!(u.object_count, 25);
    for i in 0..24u8 {
        let (_, data) = s.get(&format!("c{i}")).unwrap();
        assert_eq!(data.concat(), bytes(70_000 + usize::from(i), i));
    }
}

#[test]
fn put_is_idempotent_and_refuses_conflicts() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    let data = bytes(1000, 3);
    assert!(s.put("x", &data).unwrap().1);
    let (meta, created) = s.put("x", &data).unwrap();
    assert!(!created);
    assert_eq!(meta.size, 1000);
    assert_eq!(s.usage().unwrap().used_bytes, 1000, "no double counting");
    assert!(matches!(
        s.put("x", &bytes(1000, 4)),
        Err(Error::Conflict(_))
    ));
}

#[test]
fn capacity_and_size_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    assert!(matches!(
        s.put("huge", &bytes(3 * 1024 * 1024 + 1, 0)),
        Err(Error::TooLarge { .. })
    ));
    assert!(matches!(
        s.admit("huge", 4 * 1024 * 1024),
        Err(Error::TooLarge { .. })
    ));
    for i in 0..2 {
        s.put(&format!("o{i}"), &bytes(3 * 1024 * 1024, i)).unwrap();
    }
    // 6 MiB used of 8: a 3 MiB object no longer fits.
    assert!(matches!(
        s.put("o2", &bytes(3 * 1024 * 1024, 2)),
        Err(Error::CapacityExceeded { .. })
    ));
    assert!(matches!(
        s.admit("o2", 3 * 1024 * 1024),
        Err(Error::CapacityExceeded { .. })
    ));
    s.delete("o0").unwrap();
    s.put("o2", &bytes(3 * 1024 * 1024, 2)).unwrap();
}

#[test]
fn list_pages_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let s = open(tmp.path());
    for id in ["b-2", "a-1", "b-1", "b-3", "c"] {
        s.put(id, id.as_bytes()).unwrap();
    }
    let ids = |v: Vec<ObjectMeta>| v.into_iter().map(|m| m.id).collect::<Vec<_>>();
    let (page, next) = s.list("b-", "", 2).unwrap();
    assert_eq!(ids(page), ["b-1", "b-2"]);
    assert_eq!(next.as_deref(), Some("b-2"));
    let (page, next) = s.list("b-", "b-2", 2).unwrap();
    assert_eq!(ids(page), ["b-3"]);
    assert_eq!(next, None);
    let (page, _) = s.list("", "", 100).unwrap();
    assert_eq!(ids(page), ["a-1", "b-1", "b-2", "b-3", "c"]);
    let (page, _) = s.list("", "b-3", 100).unwrap();
    assert_eq!(ids(page), ["c"]);
    let (page, _) = s.list("zzz", "", 100).unwrap();
    assert!(page.is_empty());
}

#[test]
fn bit_rot_is_data_loss_naming_the_object() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("objects.redb");
    {
        let s = Store::open(&path, LIMITS).unwrap();
        s.put("victim", &bytes(5000, 9)).unwrap();
        s.put("bystander", &bytes(5000, 8)).unwrap();
    }
    {
        // Flip one bit of the stored bytes behind the store's back.
        let db = Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            let mut data = chunks.get(("victim", 0)).unwrap().unwrap().value().to_vec();
            data[1234] ^= 0x04;
            chunks.insert(("victim", 0), &data[..]).unwrap();
        }
        txn.commit().unwrap();
    }
    let s = Store::open(&path, LIMITS).unwrap();
    match s.get("victim") {
        Err(e @ Error::Corrupt { .. }) => assert!(e.to_string().contains("victim")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(s.get("bystander").unwrap().1.concat(), bytes(5000, 8));
}

#[test]
fn instance_id_survives_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let first = open(tmp.path()).instance_id().to_owned();
    assert_eq!(first.len(), 32);
    assert_eq!(open(tmp.path()).instance_id(), first);
    let other = tempfile::tempdir().unwrap();
    assert_ne!(open(other.path()).instance_id(), first);
}
