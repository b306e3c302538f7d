//! Owner webhooks (issue 19) against a real HTTPS receiver in this process
//! (a rustls listener with a development-PKI server certificate) that
//! records every POST: delivered, receiver down (the request still filed,
//! the delivery retried then audited as failed), receiver back (delivered
//! after a refused try), break-glass, and no patient data in any payload.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::keyserver::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tonic::Code;

use crate::common::*;

/// Statuses the receiver answers, in turn; the last one repeats. 0: hang
/// (accept, read, never answer).
struct Receiver {
    posts: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

fn listener(addr: SocketAddr) -> tokio::net::TcpListener {
    let s = TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s.listen(16).unwrap()
}

impl Receiver {
    /// Listens on `addr` (port 0: any) with the PKI's `gateway` certificate
    /// (SANs `localhost`, `127.0.0.1`).
    fn start(pki: &Path, addr: SocketAddr, statuses: Vec<u16>) -> (Self, SocketAddr) {
        let acceptor =
            tessera_tls::https::https_acceptor(&pki.join("gateway.crt"), &pki.join("gateway.key"))
                .unwrap();
        let l = listener(addr);
        let bound = l.local_addr().unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let seen = posts.clone();
        let turn = Arc::new(AtomicU16::new(0));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let (acceptor, seen, turn) = (acceptor.clone(), seen.clone(), turn.clone());
                let i = usize::from(turn.fetch_add(1, Ordering::SeqCst));
                let status = statuses[i.min(statuses.len() - 1)];
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    let body = loop {
                        let n = tls.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("Content-Length: "))
                                .unwrap()
                                .parse()
                                .unwrap();
                            if body.len() >= len {
                                assert!(
                                    head.starts_with("POST /hook?tok=s3cr3t HTTP/1.1"),
                                    "{head}"
                                );
                                assert!(head.contains("Content-Type: application/json"));
                                break body.to_owned();
                            }
                        }
                    };
                    seen.lock().unwrap().push(body);
                    if status == 0 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (Self { posts, task }, bound)
    }

    fn posts(&self) -> Vec<String> {
        self.posts.lock().unwrap().clone()
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Waits (at most 20 s) for an audit entry `event` naming `request`.
async fn wait_entry(env: &Env, event: &str, request: &str) -> pb::AuditEntry {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(e) = all_audit(env)
            .await
            .into_iter()
            .find(|e| e.event == event && e.detail.contains(request))
        {
            return e;
        }
        assert!(Instant::now() < until, "no {event} for {request}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn file(env: &Env, study: &str) -> (pb::KeyRequest, Duration) {
    let t = Instant::now();
    let r = env
        .client("clinician")
        .await
        .request_key(request(study, "P-1"))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    (r, t.elapsed())
}

fn no_patient_data(body: &str, study: &str) {
    for secret in [
        "P-1",
        "19700101",
        "tumour board",
        "patient",
        study,
        "cardiac arrest",
    ] {
        assert!(!body.contains(secret), "{secret:?} in {body}");
    }
}

const CONFIG: &str = "[keyserver.webhook]\nca_file = \"{pki}/ca.crt\"\nattempts = 2\nbackoff_ms = 100\ntimeout_secs = 1\n";

#[tokio::test]
async fn webhook_delivered_retried_failed_audited_and_identity_free() {
    let env = Env::start_with(CONFIG).await;
    let study = register(&env, "P-1").await;
    let mut owner = env.client("owner").await;
    // Owner only (the layer), https only, and nothing set yet.
    let e = env
        .client("clinician")
        .await
        .set_webhook(pb::SetWebhookRequest {
            url: "https://127.0.0.1:1/".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    for bad in ["http://127.0.0.1/hook", "https://u:p@127.0.0.1/", "hook"] {
        let e = owner
            .set_webhook(pb::SetWebhookRequest { url: bad.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
    }
    let got = owner.get_webhook(pb::GetWebhookRequest {}).await.unwrap();
    assert_eq!(got.into_inner().url, "");

    // Delivered: one POST, the outcome audited, no patient data anywhere.
    let (rx, addr) = Receiver::start(&env.pki, "127.0.0.1:0".parse().unwrap(), vec![200]);
    let url = format!("https://127.0.0.1:{}/hook?tok=s3cr3t", addr.port());
    owner
        .set_webhook(pb::SetWebhookRequest { url: url.clone() })
        .await
        .unwrap();
    let got = owner.get_webhook(pb::GetWebhookRequest {}).await.unwrap();
    assert_eq!(got.into_inner().url, url);
    let set = all_audit(&env)
        .await
        .into_iter()
        .rfind(|e| e.event == "webhook.set");
    let set = set.unwrap();
    assert!(
        set.detail
            .contains(&format!("host=127.0.0.1:{}", addr.port()))
    );
    assert!(
        !set.detail.contains("s3cr3t"),
        "the URL's query is not audited"
    );
    let (r1, _) = file(&env, &study).await;
    let ok = wait_entry(&env, "webhook.delivered", &r1.request_id).await;
    assert!(ok.detail.contains("tries=1 status=200"), "{}", ok.detail);
    assert_eq!(ok.study_id, study);
    let posts = rx.posts();
    assert_eq!(posts.len(), 1);
    let v: serde_json::Value = serde_json::from_str(&posts[0]).unwrap();
    assert_eq!(v["event"], "requested");
    assert_eq!(v["request_id"], r1.request_id.as_str());
    assert_eq!(v["requester"], CLIN);
    assert_eq!(v["purpose"], "treatment");
    assert!(v["time"].as_u64().unwrap() > 0);
    assert_eq!(v.as_object().unwrap().len(), 5);
    no_patient_data(&posts[0], &study);
    rx.stop().await;

    // Down: the request is filed and listed all the same; the delivery is
    // tried twice, then audited as failed.
    let (r2, _) = file(&env, &study).await;
    let listed = owner
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert!(listed.iter().any(|r| r.request_id == r2.request_id));
    let failed = wait_entry(&env, "webhook.failed", &r2.request_id).await;
    assert!(
        failed.detail.contains("tries=2 last_error=connect"),
        "{}",
        failed.detail
    );

    // A receiver that never answers: filing does not wait for it.
    let (hang, _) = Receiver::start(&env.pki, addr, vec![0]);
    let (r3, took) = file(&env, &study).await;
    assert!(took < Duration::from_millis(900), "filing waited {took:?}");
    let failed = wait_entry(&env, "webhook.failed", &r3.request_id).await;
    assert!(failed.detail.contains("timed out"), "{}", failed.detail);
    hang.stop().await;

    // Back, refusing once: delivered on the second try.
    let (rx, _) = Receiver::start(&env.pki, addr, vec![503, 200]);
    let (r4, _) = file(&env, &study).await;
    let ok = wait_entry(&env, "webhook.delivered", &r4.request_id).await;
    assert!(ok.detail.contains("tries=2 status=200"), "{}", ok.detail);

    // Break-glass: the owner is told, without the reason.
    let bg = env
        .client("clinician")
        .await
        .break_glass(pb::BreakGlassRequest {
            study_id: study.clone(),
            attributes: attrs("P-1"),
            purpose: "pixels".into(),
            reason: "cardiac arrest".into(),
            on_behalf_of: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    wait_entry(&env, "webhook.delivered", &bg.request_id).await;
    let posts = rx.posts();
    let last = posts.last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "break_glass");
    assert_eq!(v["purpose"], "emergency");
    for p in &posts {
        no_patient_data(p, &study);
    }

    // Cleared: audited, and no more deliveries.
    owner
        .clear_webhook(pb::ClearWebhookRequest {})
        .await
        .unwrap();
    let before = posts.len();
    let (r5, _) = file(&env, &study).await;
    let again = owner.get_webhook(pb::GetWebhookRequest {}).await.unwrap();
    assert_eq!(again.into_inner().url, "");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.posts().len(), before);
    let audit = all_audit(&env).await;
    assert!(audit.iter().any(|e| e.event == "webhook.cleared"));
    assert!(
        !audit
            .iter()
            .any(|e| e.event.starts_with("webhook.") && e.detail.contains(&r5.request_id))
    );
    rx.stop().await;
    env.stop().await;
}

#[tokio::test]
async fn webhook_refused_without_config() {
    let env = Env::start().await;
    let e = env
        .client("owner")
        .await
        .set_webhook(pb::SetWebhookRequest {
            url: "https://127.0.0.1:1/hook".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("[keyserver.webhook]"));
    env.stop().await;
}

#[tokio::test]
async fn webhook_queue_bounded_drops_oldest_audited() {
    // 8 deliveries in flight (a receiver that never answers holds them for
    // 2 s), one held by the worker, one waiting: of 14 filed at once, at
    // least 4 are dropped, each audited; every request is still filed.
    let env = Env::start_with(
        "[keyserver.webhook]\nca_file = \"{pki}/ca.crt\"\nattempts = 1\ntimeout_secs = 2\nqueue_max = 1\n",
    )
    .await;
    let study = register(&env, "P-1").await;
    let (hang, addr) = Receiver::start(&env.pki, "127.0.0.1:0".parse().unwrap(), vec![0]);
    env.client("owner")
        .await
        .set_webhook(pb::SetWebhookRequest {
            url: format!("https://127.0.0.1:{}/hook?tok=s3cr3t", addr.port()),
        })
        .await
        .unwrap();
    let t = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..14 {
        ids.push(file(&env, &study).await.0.request_id);
    }
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    let until = Instant::now() + Duration::from_secs(20);
    let dropped = loop {
        let audit = all_audit(&env).await;
        let done = ids
            .iter()
            .filter(|id| {
                audit
                    .iter()
                    .any(|e| e.event.starts_with("webhook.") && e.detail.contains(id.as_str()))
            })
            .count();
        if done == ids.len() {
            break audit
                .iter()
                .filter(|e| e.event == "webhook.dropped")
                .inspect(|e| assert!(e.detail.contains("reason=queue full (1 waiting)")))
                .count();
        }
        assert!(Instant::now() < until, "{done} of {} outcomes", ids.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(dropped >= 4, "{dropped} dropped");
    let listed = env
        .client("owner")
        .await
        .list_requests(pb::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(listed.len(), 14);
    hang.stop().await;
    env.stop().await;
}
