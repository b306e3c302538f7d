//! The owners' webhooks as the core sees them: set, show and clear an
//! owner's URL (each change audited), queue a delivery after a commit, and
//! audit each delivery's outcome. The queue and its worker are in
//! [`webhook`](super::webhook), which knows nothing of the core.

use std::sync::Arc;

use tessera_tls::https::HttpsUrl;

use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::store::{OWNER_SETTINGS, OwnerSettings, RequestRecord, get_json, to_json};
use crate::core::webhook::{AuditFn, Delivery, Outbox, payload, shown};
use crate::core::{Core, SELF_ACTOR};
use crate::error::{KeyServerError, Result};

impl Core {
    fn outbox(&self) -> Result<&Arc<Outbox>> {
        self.inner.webhook.as_ref().ok_or_else(|| {
            KeyServerError::FailedPrecondition(
                "this keyserver sends no webhooks ([keyserver.webhook] is not configured)".into(),
            )
        })
    }

    /// The owner `actor` sets its webhook URL (`https://` only).
    pub async fn set_webhook(&self, actor: &str, url: &str) -> Result<String> {
        self.ensure_chain_intact()?;
        self.outbox()?;
        let parsed = HttpsUrl::parse(url)
            .map_err(|e| KeyServerError::InvalidArgument(format!("url: {e}")))?;
        let (owner, url) = (actor.to_owned(), url.to_owned());
        self.inner
            .writer
            .submit(move |ctx| {
                let t = ctx.txn;
                let mut s: OwnerSettings = get_json(t, OWNER_SETTINGS, &owner)?.unwrap_or_default();
                s.webhook_url = Some(url.clone());
                t.put_str(OWNER_SETTINGS, &owner, to_json(&s)?.as_slice())?;
                ctx.append(NewEntry {
                    actor: owner,
                    event: AuditEvent::WebhookSet,
                    study: String::new(),
                    detail: format!("host={}", shown(&parsed)),
                })?;
                Ok(Ok(url))
            })
            .await
    }

    /// The owner `actor` removes its webhook; true when one was set.
    pub async fn clear_webhook(&self, actor: &str) -> Result<bool> {
        self.ensure_chain_intact()?;
        let owner = actor.to_owned();
        self.inner
            .writer
            .submit(move |ctx| {
                let t = ctx.txn;
                let mut s: OwnerSettings = get_json(t, OWNER_SETTINGS, &owner)?.unwrap_or_default();
                let had = s.webhook_url.take().is_some();
                t.put_str(OWNER_SETTINGS, &owner, to_json(&s)?.as_slice())?;
                ctx.append(NewEntry {
                    actor: owner,
                    event: AuditEvent::WebhookCleared,
                    study: String::new(),
                    detail: format!("was_set={had}"),
                })?;
                Ok(Ok(had))
            })
            .await
    }

    /// The owner's webhook URL, if set.
    pub fn webhook(&self, actor: &str) -> Result<Option<String>> {
        let r = self.inner.store.read()?;
        let s: Option<OwnerSettings> = get_json(r.as_ref(), OWNER_SETTINGS, actor)?;
        Ok(s.and_then(|s| s.webhook_url))
    }

    /// After a commit: queues the owner's webhook for a new request or a
    /// break-glass use. Never fails the caller (errors are logged).
    pub(crate) fn queue_webhook(&self, kind: &str, owner: &str, rec: &RequestRecord) {
        let Some(outbox) = self.inner.webhook.as_ref() else {
            return;
        };
        let url = match self.webhook(owner) {
            Ok(Some(url)) => url,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, request = %rec.id, "webhook URL not read; not sent");
                return;
            }
        };
        let d = Delivery {
            url,
            study: rec.study_id.clone(),
            request_id: rec.id.clone(),
            owner: owner.to_owned(),
            body: payload(kind, rec),
        };
        let dropped = outbox.enqueue(d);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!("webhook queued outside a runtime: not sent");
            return;
        };
        if let Some(old) = dropped {
            let core = self.clone();
            let max = outbox.cfg.queue_max;
            rt.spawn(async move {
                core.audit_webhook(
                    AuditEvent::WebhookDropped,
                    &old,
                    format!("reason=queue full ({max} waiting)"),
                )
                .await;
            });
        }
        outbox.wake(&rt, || self.audit_fn());
    }

    /// The worker's way to audit: holds the core weakly, so a worker left
    /// running never keeps a closed core open.
    fn audit_fn(&self) -> AuditFn {
        let core = Arc::downgrade(&self.inner);
        Arc::new(move |event, d, outcome| {
            let core = core.clone();
            Box::pin(async move {
                if let Some(inner) = core.upgrade() {
                    Core { inner }.audit_webhook(event, &d, outcome).await;
                }
            })
        })
    }

    async fn audit_webhook(&self, event: AuditEvent, d: &Delivery, outcome: String) {
        let host = HttpsUrl::parse(&d.url).map_or_else(|_| "?".to_owned(), |u| shown(&u));
        let entry = NewEntry {
            actor: SELF_ACTOR.to_owned(),
            event,
            study: d.study.clone(),
            detail: format!(
                "request={} owner={} host={host} {outcome}",
                d.request_id, d.owner
            ),
        };
        if let Err(e) = self.audit_only(entry).await {
            tracing::error!(error = %e, request = %d.request_id, event = event.as_str(), "webhook outcome not audited");
        }
    }
}
