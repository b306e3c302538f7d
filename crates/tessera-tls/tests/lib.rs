//! Integration tests: a real tonic server on 127.0.0.1:0 behind
//! `tessera_tls::incoming` and `AuthzLayer`, real certificates from rcgen.

use std::path::Path;

mod balance;
mod reload;

use tessera_pki::Ca;
use tessera_tls::{
    AccessConfig, Authz, AuthzLayer, ChannelTimeouts, ClientTls, DEFAULT_TRUST_DOMAIN, Identity,
    IdentityError, Policy, Role, ServerTls, TlsFiles,
};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn der_of(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn identity_from_certificates() {
    let ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    let owner = ca.issue_user("owner").unwrap();
    let id = Identity::from_cert_der(&der_of(&owner.cert_pem), DEFAULT_TRUST_DOMAIN).unwrap();
    assert_eq!((id.kind(), id.name()), ("user", "owner"));

    let svc = ca.issue_service("storage-2").unwrap();
    let id = Identity::from_cert_der(&der_of(&svc.cert_pem), DEFAULT_TRUST_DOMAIN).unwrap();
    assert_eq!(id.uri(), "spiffe://tessera.local/service/storage-2");

    let none = ca.issue_custom("no-uri", &[], true).unwrap();
    assert_eq!(
        Identity::from_cert_der(&der_of(&none.cert_pem), DEFAULT_TRUST_DOMAIN),
        Err(IdentityError::NoUriSan)
    );
    let two = ca
        .issue_custom(
            "two",
            &[
                "spiffe://tessera.local/user/a".into(),
                "spiffe://tessera.local/user/b".into(),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        Identity::from_cert_der(&der_of(&two.cert_pem), DEFAULT_TRUST_DOMAIN),
        Err(IdentityError::SeveralUriSans(2))
    );
    let other_td = Ca::new("evil.example")
        .unwrap()
        .issue_user("owner")
        .unwrap();
    assert!(matches!(
        Identity::from_cert_der(&der_of(&other_td.cert_pem), DEFAULT_TRUST_DOMAIN),
        Err(IdentityError::WrongTrustDomain { .. })
    ));
    let not_spiffe = ca
        .issue_custom("web", &["https://tessera.local/user/owner".into()], false)
        .unwrap();
    assert!(matches!(
        Identity::from_cert_der(&der_of(&not_spiffe.cert_pem), DEFAULT_TRUST_DOMAIN),
        Err(IdentityError::Malformed(_))
    ));
}

fn write_pair(
    dir: &Path,
    name: &str,
    cert: &str,
    key: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// A health server behind mTLS + authz, with a policy that allows nothing
/// but health (which needs no role) and reflection for admins.
async fn serve(files: &TlsFiles) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let tls = ServerTls::from_files(files, DEFAULT_TRUST_DOMAIN).unwrap();
    assert_eq!(
        tls.identity().uri(),
        "spiffe://tessera.local/service/storage-1"
    );
    serve_status(files, tonic_health::ServingStatus::Serving).await
}

/// [`serve`] under any identity, its "probe" service in `status` (tells
/// servers apart by their answers).
async fn serve_status(
    files: &TlsFiles,
    status: tonic_health::ServingStatus,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let tls = ServerTls::from_files(files, DEFAULT_TRUST_DOMAIN).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_service_status("probe", status).await;
    // Keep the reporter alive with the server.
    std::mem::forget(reporter);
    let mut access = AccessConfig::default();
    access.roles.insert(
        "spiffe://tessera.local/user/outsider".into(),
        vec![Role::Admin],
    );
    let authz = Authz::new(
        Policy::new().allow("/grpc.health.v1.Health/*", [Role::Owner]),
        access.role_map(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = tessera_tls::incoming(listener, &tls);
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(AuthzLayer::new(authz))
            .add_service(health)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop)
}

async fn check(ch: tessera_tls::Channel) -> Result<(), tonic::Status> {
    HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: "probe".into(),
        })
        .await
        .map(|_| ())
}

#[tokio::test]
async fn mtls_refuses_what_it_must() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tessera_pki::generate(&tmp.path().join("pki")).unwrap();
    let (addr, _stop) = serve(&TlsFiles::from_pki_dir(&pki.dir, "storage-1")).await;
    let addr = addr.to_string();

    // Every identity of our CA may check health, even one without roles.
    for who in ["gateway", "owner", "outsider", "researcher"] {
        let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, who)).unwrap();
        check(tls.connect(&addr).await.unwrap()).await.unwrap();
    }
    // By name too: service certificates carry DNS localhost.
    let port = addr.rsplit(':').next().unwrap();
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway")).unwrap();
    check(tls.connect(&format!("localhost:{port}")).await.unwrap())
        .await
        .unwrap();
    // A name the certificate does not carry is refused by the client.
    assert!(
        tls.connect(&format!("https://127.0.0.2:{port}"))
            .await
            .is_err()
    );
    // Malformed endpoints are errors, not panics.
    for bad in ["", "nohost", "127.0.0.1", "http://[::1", "a b:1"] {
        assert!(tls.connect(bad).await.is_err(), "{bad:?}");
    }

    // Certificates from another CA, or without a usable URI SAN, never get
    // an answer (the connection is dropped during or right after TLS).
    let foreign_ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    let foreign = foreign_ca.issue_service("gateway").unwrap();
    let (fc, fk) = write_pair(tmp.path(), "foreign", &foreign.cert_pem, &foreign.key_pem);
    let impostor = ClientTls::from_files(&TlsFiles {
        ca: pki.ca_path(),
        cert: fc,
        key: fk,
    })
    .unwrap();
    match impostor.connect(&addr).await {
        Err(_) => {}
        Ok(ch) => assert!(check(ch).await.is_err(), "foreign CA must be refused"),
    }

    // Same CA as the server, but no URI SAN / two URI SANs: refused too.
    // (Issued by a CA we load as the server's: rebuild a PKI whose CA we hold.)
    let tmp2 = tempfile::tempdir().unwrap();
    let ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    std::fs::write(tmp2.path().join("ca.crt"), ca.cert_pem()).unwrap();
    let server = ca.issue_service("storage-1").unwrap();
    let (sc, sk) = write_pair(tmp2.path(), "storage-1", &server.cert_pem, &server.key_pem);
    let (addr2, _stop2) = serve(&TlsFiles {
        ca: tmp2.path().join("ca.crt"),
        cert: sc,
        key: sk,
    })
    .await;
    for (name, uris) in [
        ("no-uri", vec![]),
        (
            "two-uris",
            vec![
                "spiffe://tessera.local/user/a".to_owned(),
                "spiffe://tessera.local/user/b".to_owned(),
            ],
        ),
        (
            "other-domain",
            vec!["spiffe://evil.example/user/owner".to_owned()],
        ),
    ] {
        let leaf = ca.issue_custom(name, &uris, false).unwrap();
        let (c, k) = write_pair(tmp2.path(), name, &leaf.cert_pem, &leaf.key_pem);
        let client = ClientTls::from_files(&TlsFiles {
            ca: tmp2.path().join("ca.crt"),
            cert: c,
            key: k,
        })
        .unwrap();
        match client.connect(&addr2.to_string()).await {
            Err(_) => {}
            Ok(ch) => assert!(check(ch).await.is_err(), "{name} must be refused"),
        }
    }

    // Plaintext HTTP/2.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    match plain.connect().await {
        Err(_) => {}
        Ok(ch) => assert!(
            check(tessera_tls::Channel::new(ch)).await.is_err(),
            "plaintext must be refused"
        ),
    }
}

#[tokio::test]
async fn authz_layer_fails_closed_over_the_wire() {
    use tonic_health::pb::health_client::HealthClient;
    let tmp = tempfile::tempdir().unwrap();
    let pki = tessera_pki::generate(tmp.path()).unwrap();
    let (addr, _stop) = serve(&TlsFiles::from_pki_dir(&pki.dir, "storage-1")).await;
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway")).unwrap();
    let ch = tls.connect(&addr.to_string()).await.unwrap();
    // A method the policy does not name (reflection is not registered
    // here, and the table has no rule for it): PERMISSION_DENIED before
    // routing, not UNIMPLEMENTED.
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/tessera.storage.v1.StorageNode/Put");
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let e = grpc
        .unary(tonic::Request::new(()), path, codec)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("spiffe://tessera.local/service/gateway")
    );
    // Health still answers.
    HealthClient::new(tls.connect(&addr.to_string()).await.unwrap())
        .check(HealthCheckRequest {
            service: "probe".into(),
        })
        .await
        .unwrap();
}

/// A health server holding `cert_name`'s certificate of the PKI in `dir`,
/// its `check` answering (or, with `hang`, never answering).
async fn serve_as(
    dir: &Path,
    cert_name: &str,
    hang: bool,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
    use tonic_health::pb::health_server::{Health, HealthServer};

    struct Hang;
    #[tonic::async_trait]
    impl Health for Hang {
        async fn check(
            &self,
            _: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<tonic_health::pb::HealthCheckResponse>, tonic::Status> {
            // Accepts the connection and the call, then never answers.
            std::future::pending().await
        }
        type WatchStream =
            tokio_stream::Pending<Result<tonic_health::pb::HealthCheckResponse, tonic::Status>>;
        async fn watch(
            &self,
            _: tonic::Request<HealthCheckRequest>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            std::future::pending().await
        }
    }

    let tls = ServerTls::from_files(
        &TlsFiles::from_pki_dir(dir, cert_name),
        DEFAULT_TRUST_DOMAIN,
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("probe", tonic_health::ServingStatus::Serving)
        .await;
    std::mem::forget(reporter);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let incoming = tessera_tls::incoming(listener, &tls);
    let mut router = tonic::transport::Server::builder();
    let router = if hang {
        router.add_service(HealthServer::new(Hang))
    } else {
        router.add_service(health)
    };
    tokio::spawn(async move {
        router
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            })
            .await
    });
    (addr, stop)
}

fn service_id(name: &str) -> Identity {
    Identity::new(DEFAULT_TRUST_DOMAIN, "service", name).unwrap()
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tessera_pki::generate(tmp.path()).unwrap();
    let (storage, _s1) = serve_as(&pki.dir, "storage-2", false).await;
    let (keyserver, _s2) = serve_as(&pki.dir, "keyserver", false).await;
    let gateway = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway")).unwrap();
    let to_keyserver = gateway.expecting(&service_id("keyserver"));

    // A storage node's certificate is valid for localhost and 127.0.0.1 and
    // chains to our CA: only the identity check tells it from the keyserver.
    for addr in [storage.to_string(), format!("localhost:{}", storage.port())] {
        let e = to_keyserver.connect(&addr).await.unwrap_err();
        let chain = error_chain(&e);
        assert!(
            chain.contains(
                "expected spiffe://tessera.local/service/keyserver, \
                 the server presented spiffe://tessera.local/service/storage-2"
            ),
            "{chain}"
        );
    }
    // A lazy channel fails its calls with the same words.
    let lazy = to_keyserver.connect_lazy(&storage.to_string()).unwrap();
    let s = check(lazy).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    assert!(
        s.message()
            .contains("the server presented spiffe://tessera.local/service/storage-2"),
        "{s:?}"
    );

    // The right server still works, eagerly and lazily; and the storage
    // node answers a client that expects it.
    check(to_keyserver.connect(&keyserver.to_string()).await.unwrap())
        .await
        .unwrap();
    check(to_keyserver.connect_lazy(&keyserver.to_string()).unwrap())
        .await
        .unwrap();
    let to_storage = gateway.expecting(&service_id("storage-2"));
    check(to_storage.connect(&storage.to_string()).await.unwrap())
        .await
        .unwrap();
    assert!(to_storage.connect(&keyserver.to_string()).await.is_err());

    // Without an expected identity a server must still present a service
    // identity: a user certificate (no serverAuth, no localhost) or a
    // service certificate without a URI SAN is refused.
    let ca = Ca::new(DEFAULT_TRUST_DOMAIN).unwrap();
    let d2 = tmp.path().join("nouri");
    std::fs::create_dir_all(&d2).unwrap();
    std::fs::write(d2.join("ca.crt"), ca.cert_pem()).unwrap();
    let gw = ca.issue_service("gateway").unwrap();
    write_pair(&d2, "gateway", &gw.cert_pem, &gw.key_pem);
    let bare = ca.issue_custom("bare", &[], true).unwrap();
    write_pair(&d2, "bare", &bare.cert_pem, &bare.key_pem);
    let client = ClientTls::from_files(&TlsFiles::from_pki_dir(&d2, "gateway")).unwrap();
    let no_uri_server = {
        // ServerTls refuses a certificate without identity at start, so
        // serve the bare certificate with rustls directly.
        let files = TlsFiles::from_pki_dir(&d2, "bare");
        let certs = vec![rustls::pki_types::CertificateDer::from(der_of(
            &bare.cert_pem,
        ))];
        let key = {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap()
        };
        let mut cfg = rustls::ServerConfig::builder_with_provider(tessera_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        addr
    };
    let e = client
        .connect(&no_uri_server.to_string())
        .await
        .unwrap_err();
    assert!(
        error_chain(&e).contains("no subjectAltName URI"),
        "{}",
        error_chain(&e)
    );
    let e = client
        .expecting(&service_id("keyserver"))
        .connect(&no_uri_server.to_string())
        .await
        .unwrap_err();
    assert!(
        error_chain(&e).contains("expected spiffe://tessera.local/service/keyserver"),
        "{}",
        error_chain(&e)
    );
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(" / ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_call_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tessera_pki::generate(tmp.path()).unwrap();
    let (hung, _stop) = serve_as(&pki.dir, "keyserver", true).await;
    let tls = ClientTls::from_files(&TlsFiles::from_pki_dir(&pki.dir, "gateway"))
        .unwrap()
        .expecting(&service_id("keyserver"))
        .with_timeouts(ChannelTimeouts {
            connect: std::time::Duration::from_secs(5),
            call: Some(std::time::Duration::from_millis(300)),
        });
    // The TLS handshake and the call are accepted; the answer never comes.
    for ch in [
        tls.connect(&hung.to_string()).await.unwrap(),
        tls.connect_lazy(&hung.to_string()).unwrap(),
    ] {
        // The outer bound only turns a hang (the bug) into a failure.
        let s = tokio::time::timeout(std::time::Duration::from_secs(60), check(ch))
            .await
            .expect("the call waited without a deadline")
            .unwrap_err();
        assert!(tessera_tls::timed_out(&s), "{s:?}");
        let s = tessera_tls::deadline_status(s);
        assert_eq!(s.code(), Code::DeadlineExceeded);
        assert!(s.message().contains("timeout"), "{}", s.message());
    }
    // Other failures are passed on unchanged.
    let s = tessera_tls::deadline_status(tonic::Status::not_found("x"));
    assert_eq!(s.code(), Code::NotFound);
}
