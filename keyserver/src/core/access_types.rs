//! The access part's plain types: its config and the event the live feed
//! carries. A leaf the core's own state holds (the operations on them are
//! in `access.rs`, which re-exports both).

use std::collections::BTreeMap;

use crate::core::policy::access::AccessRules;
use crate::core::store::RequestRecord;

/// The access part of the keyserver config.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Purposes and the `emergency` permission.
    pub rules: AccessRules,
    /// Named groups of identities ("care-team-x"): a standing approval to
    /// the group name approves its members.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Roles by identity (the `[server.access]` map).
    pub roles: tessera_tls::RoleMap,
    /// Lifetime of a break-glass grant, seconds.
    pub break_glass_ttl_secs: u64,
    /// Uses of a break-glass grant.
    pub break_glass_uses: u32,
    /// A valid grant expiring within this many seconds is flagged.
    pub expiring_soon_secs: u64,
    /// Owner webhooks (`[keyserver.webhook]`); none: not sent, and
    /// `SetWebhook` refused.
    pub webhook: Option<crate::core::webhook::WebhookConfig>,
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            rules: AccessRules::default(),
            groups: BTreeMap::new(),
            roles: tessera_tls::RoleMap::dev_default("tessera.local"),
            break_glass_ttl_secs: 15 * 60,
            break_glass_uses: 5,
            expiring_soon_secs: 3600,
            webhook: None,
        }
    }
}

/// What the event feed carries: a request filed or decided.
#[derive(Debug, Clone)]
pub struct AccessEvent {
    /// `requested`, `approved`, `denied`, `revoked`, `break_glass`.
    pub kind: &'static str,
    /// The study's owner.
    pub owner: String,
    /// The request, without its held key.
    pub request: RequestRecord,
}

impl AccessEvent {
    /// True when `caller` should see it: as owner, new requests and
    /// break-glass uses on its studies; as requester, decisions on its own.
    pub fn for_watcher(&self, caller: &str, as_owner: bool) -> bool {
        if as_owner {
            self.owner == caller && matches!(self.kind, "requested" | "break_glass")
        } else {
            self.request.requester == caller && self.kind != "requested"
        }
    }
}
