//! Owner webhooks (issue 19): an owner registers an `https://` URL; when a
//! request is filed on its studies (or the glass is broken on one), the
//! keyserver POSTs a small identity-free JSON to it:
//!
//! ```json
//! {"event":"requested","request_id":"rq-…","requester":"spiffe://…","purpose":"treatment","time":1700000000}
//! ```
//!
//! Never a patient attribute, the study's attributes, the justification or
//! the break-glass reason (free text that may name a patient).
//!
//! Filing never waits: the request is committed first, then its delivery is
//! put on a bounded queue ([`WebhookConfig::queue_max`]; when full the
//! oldest waiting delivery is dropped and `webhook.dropped` audited). A
//! background task (started with the first delivery) sends at most
//! [`WebhookConfig::in_flight_max`] at once, each tried
//! [`WebhookConfig::attempts`] times with doubling waits; the outcome is
//! audited: `webhook.delivered` (tries, status) or `webhook.failed` (tries,
//! last error). The URL itself is never written to the audit chain (it may
//! carry a token): its host and port are.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tessera_tls::https::{HttpsClient, HttpsUrl};
use tokio::sync::{Notify, Semaphore};

use crate::core::audit::AuditEvent;
use crate::core::store::RequestRecord;

/// Longest wait between two tries.
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How webhooks are sent (`[keyserver.webhook]`).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Verifies receivers against the configured CA bundle.
    pub client: HttpsClient,
    /// Tries per delivery (at least 1).
    pub attempts: u32,
    /// Wait before the second try; doubled after each failure (at most 60 s).
    pub backoff: Duration,
    /// Limit on one try (connect, TLS, request, status line).
    pub timeout: Duration,
    /// Most deliveries waiting to be sent.
    pub queue_max: usize,
    /// Most deliveries being sent at once.
    pub in_flight_max: usize,
}

impl WebhookConfig {
    /// Defaults around a CA bundle: 5 tries from 1 s, 10 s per try, 1000
    /// waiting, 8 at once.
    pub fn new(ca_file: &Path) -> std::result::Result<Self, tessera_tls::TlsError> {
        Ok(Self {
            client: HttpsClient::from_ca_file(ca_file)?,
            attempts: 5,
            backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
            queue_max: 1000,
            in_flight_max: 8,
        })
    }
}

/// One POST to make.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) url: String,
    pub(crate) study: String,
    pub(crate) request_id: String,
    pub(crate) owner: String,
    pub(crate) body: Vec<u8>,
}

/// Writes a delivery's outcome to the audit chain (the core gives it; the
/// worker holds no core, so it never keeps one open).
pub(crate) type AuditFn = Arc<
    dyn Fn(AuditEvent, Delivery, String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

/// The queue and its worker.
pub(crate) struct Outbox {
    pub(crate) cfg: WebhookConfig,
    queue: Mutex<VecDeque<Delivery>>,
    wake: Notify,
    started: AtomicBool,
    closed: AtomicBool,
}

impl Outbox {
    pub(crate) fn new(cfg: WebhookConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            started: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    /// The core is closing: the worker stops (deliveries still waiting are
    /// not sent and cannot be audited any more).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Queues `d`; when the queue is full, the oldest waiting delivery is
    /// dropped and returned (to be audited).
    pub(crate) fn enqueue(&self, d: Delivery) -> Option<Delivery> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let dropped = (q.len() >= self.cfg.queue_max.max(1))
            .then(|| q.pop_front())
            .flatten();
        q.push_back(d);
        dropped
    }

    /// Starts the worker on `rt` the first time, then wakes it.
    pub(crate) fn wake(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        audit: impl FnOnce() -> AuditFn,
    ) {
        if !self.started.swap(true, Ordering::SeqCst) {
            rt.spawn(run(self.clone(), audit()));
        }
        self.wake.notify_one();
    }
}

/// The JSON an owner's receiver gets: no patient data, no free text.
pub fn payload(kind: &str, rec: &RequestRecord) -> Vec<u8> {
    serde_json::json!({
        "event": kind,
        "request_id": rec.id,
        "requester": rec.requester,
        "purpose": rec.access_purpose,
        "time": rec.created_at,
    })
    .to_string()
    .into_bytes()
}

/// `host:port` of a stored URL, for audit details.
pub(crate) fn shown(url: &HttpsUrl) -> String {
    if url.host().contains(':') {
        format!("[{}]:{}", url.host(), url.port())
    } else {
        format!("{}:{}", url.host(), url.port())
    }
}

/// The worker: takes deliveries off the queue, at most `in_flight_max`
/// at once. Holds the core weakly so that it never keeps it open.
async fn run(outbox: Arc<Outbox>, audit: AuditFn) {
    let slots = Arc::new(Semaphore::new(outbox.cfg.in_flight_max.max(1)));
    loop {
        if outbox.is_closed() {
            return;
        }
        let next = outbox
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front();
        let Some(d) = next else {
            outbox.wake.notified().await;
            continue;
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (outbox, audit) = (outbox.clone(), audit.clone());
        tokio::spawn(async move {
            deliver(&outbox, &audit, d).await;
            drop(slot);
        });
    }
}

/// Tries one delivery, then audits its outcome.
async fn deliver(outbox: &Outbox, audit: &AuditFn, d: Delivery) {
    let cfg = &outbox.cfg;
    let attempts = cfg.attempts.max(1);
    let mut wait = cfg.backoff;
    let mut last = String::new();
    let mut outcome = None;
    match HttpsUrl::parse(&d.url) {
        Err(e) => last = format!("bad url: {e}"),
        Ok(url) => {
            for attempt in 1..=attempts {
                match cfg.client.post_json(&url, &d.body, cfg.timeout).await {
                    Ok(status) if (200..300).contains(&status) => {
                        outcome = Some(format!("tries={attempt} status={status}"));
                        break;
                    }
                    Ok(status) => last = format!("status {status}"),
                    Err(e) => last = e.to_string(),
                }
                if attempt < attempts {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(BACKOFF_MAX);
                }
                if outbox.is_closed() {
                    return;
                }
            }
        }
    }
    match outcome {
        Some(o) => audit(AuditEvent::WebhookDelivered, d, o).await,
        None => {
            tracing::warn!(request = %d.request_id, error = %last, "webhook not delivered");
            let last: String = last.chars().take(200).collect();
            audit(
                AuditEvent::WebhookFailed,
                d,
                format!("tries={attempts} last_error={last}"),
            )
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::GrantState;

    #[test]
    fn payload_names_no_patient_and_no_free_text() {
        let rec = RequestRecord {
            id: "rq-1".into(),
            study_id: "st-1".into(),
            requester: "spiffe://tessera.local/user/clinician".into(),
            presented_by: "spiffe://tessera.local/user/clinician".into(),
            purpose: "pixels".into(),
            justification: "Jane Doe P-1234".into(),
            created_at: 7,
            master_version: 1,
            state: GrantState::Pending,
            wrapped_key: Some(vec![1, 2, 3]),
            access_purpose: "treatment".into(),
            standing: None,
            break_glass: Some(crate::core::store::BreakGlass {
                reason: "Jane Doe arrest".into(),
                reviewed: None,
            }),
        };
        let body = String::from_utf8(payload("break_glass", &rec)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event":"break_glass","request_id":"rq-1",
                "requester":"spiffe://tessera.local/user/clinician","purpose":"treatment","time":7})
        );
        assert!(!body.contains("Jane") && !body.contains("P-1234") && !body.contains("st-1"));
    }
}
