//! DICOM TLS refusals reach the security log: a client without a
//! certificate and one with a certificate of another CA are refused at the
//! handshake on the gateway's `[dicom.scp] tls_listen` (of a suite started
//! in-process), and each refusal is one `tessera::security` event with
//! `rpc = dicom:A-ASSOCIATE` naming the client's address. The events are
//! captured by a tracing layer installed for the whole test binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tessera_devstack::{DevOptions, DevStack};
use tessera_tls::{ClientTls, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};

type Events = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

/// Every security-log event of this process from the first call on.
fn security_events() -> Events {
    static EVENTS: OnceLock<Events> = OnceLock::new();
    EVENTS
        .get_or_init(|| {
            let events = Events::default();
            let layer = Capture(events.clone());
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other global subscriber in this test binary");
            events
        })
        .clone()
}

struct Capture(Events);

struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != tessera_tls::security::TARGET {
            return;
        }
        let mut f = Fields(BTreeMap::new());
        event.record(&mut f);
        if let Ok(mut all) = self.0.lock() {
            all.push(f.0);
        }
    }
}

/// Connects from a fresh local port, runs the TLS handshake with `config`
/// and sends a few bytes (the server decides on the client certificate
/// after the client's side of a TLS 1.3 handshake is done); returns the
/// local address the refusal must name.
async fn try_tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> SocketAddr {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let attempt = async {
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        tls.write_all(&[0x01, 0x00, 0x00, 0x00, 0x00, 0x04, 0, 0, 0, 0])
            .await?;
        let mut buf = [0u8; 64];
        while tls.read(&mut buf).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    // The handshake or the first read fails (or the server closes): what
    // this test asserts is the log entry, below.
    let _ = tokio::time::timeout(Duration::from_secs(10), attempt).await;
    local
}

/// The refusal of `local` in the security log, waited for up to 10 s.
async fn refusal_of(events: &Events, local: SocketAddr) -> BTreeMap<String, String> {
    let suffix = format!("@{local}");
    for _ in 0..100 {
        let found = events
            .lock()
            .unwrap()
            .iter()
            .find(|e| e.get("caller").is_some_and(|c| c.ends_with(&suffix)))
            .cloned();
        if let Some(e) = found {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no security-log entry for {local}: {:?}",
        events.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dicom_tls_refusals_are_in_the_security_log() {
    let events = security_events();
    let tmp = tempfile::tempdir().unwrap();
    let stack = DevStack::start(tmp.path(), &DevOptions::default())
        .await
        .unwrap();
    // `localhost:<port>`; the suite listens on 127.0.0.1.
    let port: u16 = stack.endpoints().endpoints["dicom-tls"]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the suite serves DICOM TLS");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let pki = stack.pki_dir();

    // No client certificate: the dev CA's roots only.
    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(pki.join("ca.crt")).unwrap();
    for c in rustls_pemfile_certs(&ca_pem) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let no_cert = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let local = try_tls(addr, Arc::new(no_cert)).await;
    let e = refusal_of(&events, local).await;
    assert_eq!(e["rpc"], "dicom:A-ASSOCIATE", "{e:?}");
    assert_eq!(e["layer"], "gateway", "{e:?}");
    assert!(e["reason"].starts_with("TLS"), "{e:?}");

    // A clinician certificate of another CA (same trust domain).
    let other = tessera_pki::Ca::new("tessera.local").unwrap();
    let leaf = other.issue_user("clinician").unwrap();
    std::fs::write(tmp.path().join("other.crt"), &leaf.cert_pem).unwrap();
    std::fs::write(tmp.path().join("other.key"), &leaf.key_pem).unwrap();
    let foreign = ClientTls::from_files(&TlsFiles {
        ca: pki.join("ca.crt"),
        cert: tmp.path().join("other.crt"),
        key: tmp.path().join("other.key"),
    })
    .unwrap();
    let local = try_tls(addr, foreign.config()).await;
    let e = refusal_of(&events, local).await;
    assert_eq!(e["rpc"], "dicom:A-ASSOCIATE", "{e:?}");
    assert!(e["reason"].starts_with("TLS"), "{e:?}");
    drop(stack);
}

/// The certificates of a PEM bundle.
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.expect("a PEM certificate"))
        .collect()
}
