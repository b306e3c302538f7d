//! The security log: every refusal, at every layer, as one structured event
//! on its own tracing target (`tessera::security`; JSON lines when the
//! service logs JSON) and a counter per layer and reason. The keyserver
//! also writes its key-related refusals into its hash-chained audit log;
//! this log is where the other services' refusals go.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// The tracing target of refusals.
pub const TARGET: &str = "tessera::security";

/// Response metadata key the authorization layer sets on its refusals, so a
/// client (and the matrix test) can tell a layer refusal from a handler's.
pub const REFUSED_BY_HEADER: &str = "tessera-refused-by";

static COUNTS: Mutex<BTreeMap<(String, String), u64>> = Mutex::new(BTreeMap::new());

/// Records one refusal: `layer` (e.g. `authz`, `gateway`), the caller's
/// identity URI (or `<none>`), the RPC path and a short reason.
pub fn refused(layer: &str, caller: &str, rpc: &str, reason: &str) {
    tracing::warn!(
        target: TARGET,
        event = "refused",
        layer,
        caller,
        rpc,
        reason,
        "refused {rpc} for {caller}: {reason}"
    );
    if let Ok(mut counts) = COUNTS.lock() {
        *counts
            .entry((layer.to_owned(), reason.to_owned()))
            .or_default() += 1;
    }
}

/// Refusals so far in this process, by (layer, reason).
pub fn refusal_counts() -> BTreeMap<(String, String), u64> {
    COUNTS.lock().map(|c| c.clone()).unwrap_or_default()
}
