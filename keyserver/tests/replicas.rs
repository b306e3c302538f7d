//! Two keyserver replicas on one PostgreSQL database (decision 23): writes
//! from both interleave on one audit chain that verifies, seqs stay unique,
//! a single-use grant fetched from both at once is released exactly once,
//! a database that goes away fails closed (UNAVAILABLE, nothing spent),
//! and a watcher on one replica sees the requests the other handles.

use std::collections::BTreeSet;
use std::sync::Arc;

use tessera_proto::keyserver::v1 as pb;
use tessera_testkit::postgres::Postgres;
use tonic::Code;

use crate::common::*;

async fn two_replicas() -> (Arc<Postgres>, Env, Env) {
    let pg = Arc::new(Postgres::start());
    // Started one after the other: the second loads the first's master
    // secret and signing key (both unwrap under the same KEK).
    let a = Env::start_on_store(Some(pg.clone()), "ks", "").await;
    let b = Env::start_on_store(Some(pg.clone()), "ks", "").await;
    (pg, a, b)
}

async fn approved_single_use(on: &Env, patient: &str) -> String {
    let study = register(on, patient).await;
    let req = file_request(on, "clinician", &study, patient).await;
    approve_once(on, &req.request_id).await;
    req.request_id
}

/// The owner approves `request_id` on `on`: one use, 10 minutes.
async fn approve_once(on: &Env, request_id: &str) {
    on.client("owner")
        .await
        .approve_request(pb::ApproveRequestRequest {
            request_id: request_id.to_owned(),
            ttl_seconds: 600,
            uses: 1,
        })
        .await
        .unwrap();
}

fn check_chain(log: &[pb::AuditEntry]) {
    let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
    let expected: Vec<u64> = (1..=log.len() as u64).collect();
    assert_eq!(seqs, expected, "seqs unique and contiguous");
    for w in log.windows(2) {
        assert_eq!(
            w[1].prev_hash, w[0].hash,
            "entry {} links to {}",
            w[1].seq, w[0].seq
        );
    }
    let preds: BTreeSet<&[u8]> = log.iter().map(|e| e.prev_hash.as_slice()).collect();
    assert_eq!(preds.len(), log.len(), "no two entries share a predecessor");
}

async fn verified(env: &Env) {
    let v = env
        .client("researcher")
        .await
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(v.ok, "{}", v.problem);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_chain_and_spend_a_grant_once() {
    let (_pg, a, b) = two_replicas().await;
    // The same audit signing key on both.
    let log_a = all_audit(&a).await;
    assert_eq!(log_a.len(), 1, "one master.created, by the first replica");

    // Concurrent writes from both replicas.
    let mut tasks = Vec::new();
    for (i, env) in [&a, &b].into_iter().enumerate() {
        for j in 0..12 {
            let gw = env.client("gateway").await;
            tasks.push(tokio::spawn(async move {
                let mut gw = gw;
                gw.register_study(pb::RegisterStudyRequest {
                    owner: OWNER.into(),
                    attributes: attrs(&format!("P-{i}-{j}")),
                    study_id: String::new(),
                })
                .await
                .map(|r| r.into_inner().study_id)
            }));
        }
    }
    let mut studies = BTreeSet::new();
    for t in tasks {
        studies.insert(t.await.unwrap().unwrap());
    }
    assert_eq!(studies.len(), 24);

    // A study registered on one replica derives on the other.
    let s = studies.iter().next().unwrap().clone();
    let on_a = a
        .client("owner")
        .await
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(on_a.requests.is_empty());

    // One single-use grant, fetched from both replicas at once, a few
    // times over: exactly one release each time.
    for round in 0..5 {
        let rid = approved_single_use(&a, &format!("G-{round}")).await;
        let (mut ca, mut cb) = (a.client("clinician").await, b.client("clinician").await);
        let fa = pb::FetchKeyRequest {
            request_id: rid.clone(),
        };
        let fb = fa.clone();
        let (ra, rb) = tokio::join!(
            tokio::spawn(async move { ca.fetch_key(fa).await }),
            tokio::spawn(async move { cb.fetch_key(fb).await })
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            usize::from(ra.is_ok()) + usize::from(rb.is_ok()),
            1,
            "round {round}: {ra:?} / {rb:?}"
        );
        let refused = ra.err().or(rb.err()).unwrap();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    }

    // Both replicas read the same chain, and it verifies.
    let log_a = all_audit(&a).await;
    let log_b = all_audit(&b).await;
    assert_eq!(log_a, log_b);
    check_chain(&log_a);
    let released = log_a.iter().filter(|e| e.event == "key.released").count();
    assert_eq!(released, 5);
    verified(&a).await;
    verified(&b).await;
    assert!(!s.is_empty());
    a.stop().await;
    b.stop().await;
}

/// The next event on `feed` within 10 s: (kind, request id).
async fn next_event(feed: &mut tonic::Streaming<pb::RequestEvent>) -> (String, String) {
    let ev = tokio::time::timeout(std::time::Duration::from_secs(10), feed.message())
        .await
        .expect("an event within 10 s")
        .unwrap()
        .expect("the feed is open");
    (ev.kind, ev.request.unwrap().request_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_on_one_replica_sees_requests_handled_by_the_other() {
    let (_pg, a, b) = two_replicas().await;
    let study = register(&a, "P-W").await;
    // The owner and the requester both watch on b.
    let mut owner_feed = watch(&b, "owner", true).await;
    let mut mine = watch(&b, "clinician", false).await;
    // Filed and approved on a.
    let req = file_request(&a, "clinician", &study, "P-W").await;
    assert_eq!(
        next_event(&mut owner_feed).await,
        ("requested".to_owned(), req.request_id.clone())
    );
    approve_once(&a, &req.request_id).await;
    // The requester hears the decision, not its own filing.
    assert_eq!(
        next_event(&mut mine).await,
        ("approved".to_owned(), req.request_id.clone())
    );
    // Filed on b itself: heard once (b does not hear its own event back
    // through the database).
    let again = file_request(&b, "clinician", &study, "P-W").await;
    assert_eq!(
        next_event(&mut owner_feed).await,
        ("requested".to_owned(), again.request_id.clone())
    );
    let extra = tokio::time::timeout(std::time::Duration::from_secs(2), owner_feed.message()).await;
    assert!(extra.is_err(), "no second copy of b's own event: {extra:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotation_on_one_replica_is_used_by_the_other() {
    let (_pg, a, b) = two_replicas().await;
    let v = a
        .client("researcher")
        .await
        .rotate_master(pb::RotateMasterRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.master_version, 2);
    // Registered on b: the new version, and it derives on a.
    let s = register(&b, "P-R").await;
    let key_b = derive(&b, &s, "P-R").await.unwrap();
    let key_a = derive(&a, &s, "P-R").await.unwrap();
    assert_eq!(key_a, key_b);
    let log = all_audit(&a).await;
    let reg = log.iter().find(|e| e.event == "study.registered").unwrap();
    assert!(reg.detail.contains("master_version=2"), "{}", reg.detail);
    check_chain(&log);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_that_goes_away_fails_closed() {
    let (pg, a, b) = two_replicas().await;
    let rid = approved_single_use(&a, "P-D").await;
    let before = all_audit(&a).await.len();
    pg.stop();
    let e = a
        .client("clinician")
        .await
        .fetch_key(pb::FetchKeyRequest {
            request_id: rid.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let e = b
        .client("researcher")
        .await
        .list_audit(pb::ListAuditRequest {
            from_seq: 1,
            limit: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    pg.restart();
    // Nothing was spent or recorded while it was away: the grant is
    // released now, once.
    assert_eq!(all_audit(&b).await.len(), before);
    let got = b
        .client("clinician")
        .await
        .fetch_key(pb::FetchKeyRequest {
            request_id: rid.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.uses_left, 0);
    let log = all_audit(&a).await;
    check_chain(&log);
    verified(&a).await;
    a.stop().await;
    b.stop().await;
}
