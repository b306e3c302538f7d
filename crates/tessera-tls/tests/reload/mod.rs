//! Certificate renewal without a restart: a real server and client over
//! 127.0.0.1, the files rewritten under them, `TlsSource::reload` (and its
//! timer) putting the new material in use for new connections while open
//! connections carry on.

use std::path::Path;
use std::time::Duration;

use tessera_pki::{Ca, Issued};
use tessera_tls::{ClientTls, DEFAULT_TRUST_DOMAIN, ServerTls, TlsError, TlsFiles};
use tokio::net::{TcpListener, TcpStream};

use super::check;

/// Writes the way an operator's tooling should (and Kubernetes does): a
/// temporary file renamed over the old one.
fn put(path: &Path, pem: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn put_leaf(dir: &Path, name: &str, issued: &Issued) {
    put(&dir.join(format!("{name}.crt")), &issued.cert_pem);
    put(&dir.join(format!("{name}.key")), &issued.key_pem);
}

/// A health server on `tls` (the `probe` service answers SERVING).
async fn health_on(tls: &ServerTls) -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("probe", tonic_health::ServingStatus::Serving)
        .await;
    std::mem::forget(reporter);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = tessera_tls::incoming(listener, tls);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop)
}

/// The end-entity certificate a new handshake from `client` is shown, or
/// the handshake's error.
async fn presented(client: &ClientTls, addr: &str) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.config())
        .connect(name, tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    Ok(conn.peer_certificates().unwrap()[0].to_vec())
}

fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// `dir` holds ca.crt from `ca` and a storage-1 and a gateway leaf.
fn pki_in(dir: &Path, ca: &Ca) -> (Issued, Issued) {
    put(&dir.join("ca.crt"), &ca.cert_pem());
    let server = ca.issue_service("storage-1").unwrap();
    let client = ca.issue_service("gateway").unwrap();
    put_leaf(dir, "storage-1", &server);
    put_leaf(dir, "gateway", &client);
    (server, client)
}

/// The storage-1 identity of `dir` serving health.
async fn storage1_on(dir: &Path) -> (ServerTls, String, tokio::sync::oneshot::Sender<()>) {
    let server = ServerTls::from_files(
        &TlsFiles::from_pki_dir(dir, "storage-1"),
        DEFAULT_TRUST_DOMAIN,
    )
    .unwrap();
    let (addr, stop) = health_on(&server).await;
    (server, addr, stop)
}

fn gateway_of(dir: &Path) -> ClientTls {
    ClientTls::from_files(&TlsFiles::from_pki_dir(dir, "gateway")).unwrap()
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_connections_and_open_ones_finish() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    let (first, _) = pki_in(dir, &ca);
    let (server, addr, _stop) = storage1_on(dir).await;
    let client = gateway_of(dir);
    let open = client.connect(&addr).await.unwrap();
    check(open.clone()).await.unwrap();
    assert_eq!(
        presented(&client, &addr).await.unwrap(),
        der(&first.cert_pem)
    );

    let expires = server
        .source()
        .not_after()
        .expect("the certificate's notAfter");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(expires > now, "{expires} <= {now}");
    // Unchanged files: nothing to do.
    assert!(!server.source().reload().unwrap());
    assert_eq!(server.source().generation(), 1);

    let renewed = ca.issue_service("storage-1").unwrap();
    put_leaf(dir, "storage-1", &renewed);
    assert!(server.source().reload().unwrap());
    assert_eq!(server.source().generation(), 2);
    assert_eq!(
        presented(&client, &addr).await.unwrap(),
        der(&renewed.cert_pem),
        "a new connection is shown the renewed certificate"
    );
    check(open)
        .await
        .expect("the connection opened before still works");
    check(client.connect(&addr).await.unwrap()).await.unwrap();
}

#[tokio::test]
async fn a_ca_rotation_through_a_bundle_never_breaks_a_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let old_ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    let (_, old_client) = pki_in(dir, &old_ca);
    let (server, addr, _stop) = storage1_on(dir).await;
    let client = gateway_of(dir);
    let new_ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    // A client that trusts both CAs but still presents the old CA's
    // certificate (it missed the rotation).
    let stale_dir = tmp.path().join("stale");
    std::fs::create_dir(&stale_dir).unwrap();
    put(
        &stale_dir.join("ca.crt"),
        &format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem()),
    );
    put_leaf(&stale_dir, "gateway", &old_client);
    let stale = ClientTls::from_files(&TlsFiles::from_pki_dir(&stale_dir, "gateway")).unwrap();
    let reload_both = || {
        assert!(server.source().reload().unwrap());
        assert!(client.source().reload().unwrap());
    };

    // 1. Both CAs trusted.
    put(
        &dir.join("ca.crt"),
        &format!("{}{}", old_ca.cert_pem(), new_ca.cert_pem()),
    );
    reload_both();
    check(client.connect(&addr).await.unwrap()).await.unwrap();
    check(stale.connect(&addr).await.unwrap()).await.unwrap();
    // 2. New leaves from the new CA; the old CA's still accepted.
    let new_server = new_ca.issue_service("storage-1").unwrap();
    put_leaf(dir, "storage-1", &new_server);
    put_leaf(dir, "gateway", &new_ca.issue_service("gateway").unwrap());
    reload_both();
    check(client.connect(&addr).await.unwrap()).await.unwrap();
    check(stale.connect(&addr).await.unwrap()).await.unwrap();
    assert_eq!(
        presented(&client, &addr).await.unwrap(),
        der(&new_server.cert_pem)
    );
    // 3. The old CA dropped: its certificates are refused from now on.
    put(&dir.join("ca.crt"), &new_ca.cert_pem());
    reload_both();
    check(client.connect(&addr).await.unwrap()).await.unwrap();
    let refused = match stale.connect(&addr).await {
        Err(_) => true,
        Ok(ch) => check(ch).await.is_err(),
    };
    assert!(refused, "the server refuses the old CA's certificate");
}

#[tokio::test]
async fn bad_or_foreign_material_is_refused_and_the_current_one_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    let (first, _) = pki_in(dir, &ca);
    let (server, addr, _stop) = storage1_on(dir).await;
    let client = gateway_of(dir);
    let cert = dir.join("storage-1.crt");
    let key = dir.join("storage-1.key");

    // Half-written or garbage certificate.
    put(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n");
    assert!(server.source().reload().is_err());
    // A certificate whose key is not the one in the key file.
    let other = ca.issue_service("storage-1").unwrap();
    put(&cert, &other.cert_pem);
    put(&key, &first.key_pem);
    assert!(matches!(server.source().reload(), Err(TlsError::Rustls(_))));
    // Another identity: a process never changes who it is by a file change.
    put_leaf(dir, "storage-1", &ca.issue_service("storage-2").unwrap());
    let e = server.source().reload().unwrap_err();
    assert!(matches!(e, TlsError::IdentityChanged { .. }), "{e}");
    assert!(e.to_string().contains("service/storage-2"), "{e}");
    // A missing file.
    std::fs::remove_file(&key).unwrap();
    assert!(matches!(
        server.source().reload(),
        Err(TlsError::Read { .. })
    ));

    assert_eq!(server.source().generation(), 1);
    assert_eq!(
        presented(&client, &addr).await.unwrap(),
        der(&first.cert_pem),
        "the first certificate still serves"
    );
    assert_eq!(
        server.identity().uri(),
        "spiffe://tessera.local/service/storage-1"
    );
}

#[tokio::test]
async fn the_watch_task_picks_up_a_change_and_ends_with_its_source() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    pki_in(dir, &ca);
    let client = ClientTls::from_files(&TlsFiles::from_pki_dir(dir, "gateway")).unwrap();
    let watching = client.watch(Duration::from_millis(20));
    put_leaf(dir, "gateway", &ca.issue_service("gateway").unwrap());
    let mut waited = Duration::ZERO;
    while client.source().generation() == 1 {
        assert!(
            waited < Duration::from_secs(10),
            "the change was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    assert_eq!(client.source().generation(), 2);
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), watching)
        .await
        .expect("the task ends once the source is dropped")
        .unwrap();
}
