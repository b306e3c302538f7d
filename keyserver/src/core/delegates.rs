//! Delegates: identities an owner lets store studies on its behalf (the
//! gateway asks before it stores). Table `delegates`, key `owner|delegate`.

use crate::core::Core;
use crate::core::audit::{AuditEvent, NewEntry};
use crate::core::policy::Rpc;
use crate::core::store::{DELEGATES, index_key, index_scan};
use crate::error::{KeyServerError, Result};

impl Core {
    /// The owner `actor` lets `delegate` store studies on its behalf (the
    /// gateway asks [`Core::check_delegate`]). Audited as `delegate.added`.
    pub async fn add_delegate(&self, actor: &str, delegate: &str) -> Result<()> {
        self.change_delegate(actor, delegate, true).await
    }

    /// The owner `actor` withdraws `delegate`. Audited as `delegate.removed`.
    pub async fn remove_delegate(&self, actor: &str, delegate: &str) -> Result<()> {
        self.change_delegate(actor, delegate, false).await
    }

    async fn change_delegate(&self, actor: &str, delegate: &str, add: bool) -> Result<()> {
        self.ensure_chain_intact()?;
        self.identity("delegate", delegate)?;
        if delegate == actor {
            return Err(KeyServerError::InvalidArgument(
                "delegate: an owner is not its own delegate".into(),
            ));
        }
        let owner = actor.to_owned();
        let delegate = delegate.to_owned();
        self.inner
            .writer
            .submit(move |ctx| {
                let key = index_key(&owner, &delegate);
                let t = ctx.txn;
                let present = t.get_str(DELEGATES, &key)?.is_some();
                let event = match (add, present) {
                    (true, true) => {
                        return Ok(Err(KeyServerError::AlreadyExists(format!(
                            "{delegate} is already a delegate"
                        ))));
                    }
                    (false, false) => {
                        return Ok(Err(KeyServerError::NotFound(format!(
                            "{delegate} is not a delegate"
                        ))));
                    }
                    (true, false) => {
                        t.put_str(DELEGATES, &key, &[])?;
                        AuditEvent::DelegateAdded
                    }
                    (false, true) => {
                        t.remove_str(DELEGATES, &key)?;
                        AuditEvent::DelegateRemoved
                    }
                };
                ctx.append(NewEntry {
                    actor: owner,
                    event,
                    study: String::new(),
                    detail: format!("delegate={delegate}"),
                })?;
                Ok(Ok(()))
            })
            .await
    }

    /// The delegates of the owner `actor`, sorted.
    pub fn list_delegates(&self, actor: &str) -> Result<Vec<String>> {
        index_scan(self.inner.store.read()?.as_ref(), DELEGATES, actor)
    }

    /// Gateway only: may `delegate` store studies on `owner`'s behalf? A
    /// read (not audited unless the caller is not the gateway).
    pub async fn check_delegate(&self, actor: &str, owner: &str, delegate: &str) -> Result<bool> {
        self.gateway_only(actor, Rpc::CheckDelegate, "", None)
            .await?;
        self.identity("owner", owner)?;
        self.identity("delegate", delegate)?;
        let r = self.inner.store.read()?;
        Ok(r.get_str(DELEGATES, &index_key(owner, delegate))?.is_some())
    }
}
