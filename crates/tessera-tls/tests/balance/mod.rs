//! A balanced channel ([`ClientTls::connect_balanced_with`]) over real
//! mTLS health servers: every resolved address gets calls, a re-resolution
//! adds and drops members, and each member's connection checks the
//! expected identity on its own.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_tls::{ClientTls, Identity, Resolver, TlsFiles};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::serve_status;

/// A resolver answering what the test last put in `addrs`, counting
/// its lookups.
fn fixed(addrs: Arc<Mutex<Vec<SocketAddr>>>, lookups: Arc<Mutex<Vec<String>>>) -> Resolver {
    Arc::new(move |host, _port| {
        lookups.lock().unwrap().push(host);
        let now = addrs.lock().unwrap().clone();
        Box::pin(async move { Ok(now) })
    })
}

/// `n` calls; how many each server's status answered, and the errors.
async fn tally(ch: &tessera_tls::Channel, n: usize) -> (usize, usize, usize, usize) {
    let (mut serving, mut not_serving, mut unknown, mut failed) = (0, 0, 0, 0);
    for _ in 0..n {
        let r = HealthClient::new(ch.clone())
            .check(HealthCheckRequest {
                service: "probe".into(),
            })
            .await;
        match r.map(|r| r.into_inner().status()) {
            Ok(tonic_health::pb::health_check_response::ServingStatus::Serving) => serving += 1,
            Ok(tonic_health::pb::health_check_response::ServingStatus::NotServing) => {
                not_serving += 1
            }
            Ok(
                tonic_health::pb::health_check_response::ServingStatus::Unknown
                | tonic_health::pb::health_check_response::ServingStatus::ServiceUnknown,
            ) => unknown += 1,
            Err(_) => failed += 1,
        }
    }
    (serving, not_serving, unknown, failed)
}

#[tokio::test]
async fn balanced_channel_spreads_over_every_address() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap();
    // Two replicas of one service (same identity), told apart by status.
    let files = TlsFiles::from_pki_dir(&pki.dir, "storage-1");
    let (a, _stop_a) = serve_status(&files, ServingStatus::Serving).await;
    let (b, _stop_b) = serve_status(&files, ServingStatus::NotServing).await;
    // A third address behind the same name serving another identity.
    let other = TlsFiles::from_pki_dir(&pki.dir, "storage-2");
    let (c, _stop_c) = serve_status(&other, ServingStatus::Unknown).await;

    let addrs = Arc::new(Mutex::new(vec![a, b]));
    let lookups = Arc::new(Mutex::new(Vec::new()));
    let every = Duration::from_millis(200);
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway"))
        .unwrap()
        .expecting(&Identity::parse_uri("spiffe://tessera.local/service/storage-1").unwrap());
    let ch = tls
        .connect_balanced_with("localhost:1", every, fixed(addrs.clone(), lookups.clone()))
        .unwrap();

    // Both replicas answer (the port in the name is not dialled: the
    // resolver's addresses are).
    let (serving, not_serving, unknown, failed) = tally(&ch, 60).await;
    assert_eq!((unknown, failed), (0, 0));
    assert!(
        serving >= 10 && not_serving >= 10,
        "{serving} / {not_serving}"
    );
    assert_eq!(lookups.lock().unwrap()[0], "localhost");

    // Concurrent calls spread too.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let ch = ch.clone();
        tasks.push(tokio::spawn(async move { tally(&ch, 20).await }));
    }
    let (mut s, mut ns) = (0, 0);
    for t in tasks {
        let (a, b, u, f) = t.await.unwrap();
        assert_eq!((u, f), (0, 0));
        s += a;
        ns += b;
    }
    assert!(s >= 10 && ns >= 10, "concurrent: {s} / {ns}");

    // The name now resolves to one replica: after a re-resolution every
    // call goes there.
    *addrs.lock().unwrap() = vec![b];
    tokio::time::sleep(every * 3).await;
    assert_eq!(tally(&ch, 20).await, (0, 20, 0, 0));

    // A resolution that fails or finds nothing keeps the known members.
    *addrs.lock().unwrap() = vec![];
    tokio::time::sleep(every * 3).await;
    assert_eq!(tally(&ch, 10).await, (0, 10, 0, 0));

    // An address serving another identity is refused on its own
    // connection; the right replica keeps answering.
    *addrs.lock().unwrap() = vec![a, c];
    tokio::time::sleep(every * 3).await;
    let (serving, not_serving, unknown, failed) = tally(&ch, 40).await;
    assert_eq!(
        (not_serving, unknown),
        (0, 0),
        "the impostor never answered"
    );
    assert!(
        serving >= 1 && failed >= 1,
        "{serving} ok, {failed} refused"
    );
}

#[tokio::test]
async fn balanced_channel_with_nothing_resolved_dials_the_name() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap();
    let files = TlsFiles::from_pki_dir(&pki.dir, "storage-1");
    let (a, _stop) = serve_status(&files, ServingStatus::Serving).await;
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway")).unwrap();
    // Nothing resolved: the name itself is dialled, as a lazy channel does.
    let resolver: Resolver =
        Arc::new(|_, _| Box::pin(async { Err(std::io::Error::other("no DNS in this test")) }));
    let ch = tls
        .connect_balanced_with(
            &format!("localhost:{}", a.port()),
            Duration::from_millis(100),
            resolver,
        )
        .unwrap();
    assert_eq!(tally(&ch, 5).await, (5, 0, 0, 0));
    // The system resolver (an address literal resolves to itself).
    let ch = tls
        .connect_balanced(&a.to_string(), Duration::from_secs(10))
        .unwrap();
    assert_eq!(tally(&ch, 5).await, (5, 0, 0, 0));
}
