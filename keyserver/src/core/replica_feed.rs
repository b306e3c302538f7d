//! The `WatchRequests` feed across keyserver replicas on PostgreSQL: each
//! replica publishes an access event (a request filed or decided) to its
//! own watchers and, after the commit, tells the others on the database's
//! `LISTEN`/`NOTIFY` channel (`kv_pg::ACCESS_CHANNEL`): the event's kind, owner
//! and request id, never the request's contents. A replica that hears of
//! another's event reads the committed request from the database and hands
//! it to its own watchers, so an owner watching on any replica sees every
//! request on its studies. Webhooks stay with the replica that handled the
//! event (one delivery). On redb there is one process and nothing to tell.
//!
//! A notification lost (the database unreachable right after the commit, a
//! listener reconnecting) costs a watcher that one event, as a lagging
//! watcher does: `tessera requests` lists what the feed missed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backend::{PgStore, Store};
use super::store::{REQUESTS, RequestRecord, get_json};

/// The kinds an event may have (the feed's `&'static str`s).
const KINDS: [&str; 5] = ["requested", "approved", "denied", "revoked", "break_glass"];

/// What travels on the channel (JSON, well under PostgreSQL's 8000-byte
/// payload limit: ids and an identity).
#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Told {
    /// The replica that published it (it does not hear itself).
    origin: String,
    kind: String,
    owner: String,
    request: String,
}

/// Tells the other replicas of an event published here (PostgreSQL
/// only): its kind, the study's owner and the request id.
pub(super) fn tell(store: &Store, origin: &str, kind: &str, owner: &str, request: &str) {
    let Store::Pg(pg) = store else {
        return;
    };
    let told = Told {
        origin: origin.to_owned(),
        kind: kind.to_owned(),
        owner: owner.to_owned(),
        request: request.to_owned(),
    };
    match serde_json::to_string(&told) {
        Ok(payload) => pg.notify(payload),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode an access event for the other replicas")
        }
    }
}

/// Hands the other replicas' events (kind, owner, the committed request
/// without its held key) to `deliver`, this replica's watchers
/// (PostgreSQL only).
pub(super) fn listen(
    store: &Store,
    origin: String,
    deliver: impl Fn(&'static str, String, RequestRecord) + Clone + Send + Sync + 'static,
) {
    let Store::Pg(pg) = store else {
        return;
    };
    // Weak: the listener runs on the store's own runtime, which the store
    // shuts down when it is dropped.
    let reader = Arc::downgrade(pg);
    pg.listen(move |payload| {
        let Some((kind, told)) = parse(&payload, &origin) else {
            return;
        };
        let (reader, deliver) = (reader.clone(), deliver.clone());
        // Reading waits on the store's runtime: not on its async threads.
        tokio::task::spawn_blocking(move || {
            let Some(pg) = reader.upgrade() else {
                return;
            };
            match committed_request(&pg, &told.request) {
                Ok(Some(mut request)) => {
                    request.wrapped_key = None;
                    deliver(kind, told.owner, request);
                }
                Ok(None) => tracing::warn!(request = %told.request, "another replica told of a request this database does not hold"),
                Err(e) => tracing::warn!(error = %e, request = %told.request, "cannot read a request another replica told of"),
            }
        });
    });
}

/// A payload from another replica, with its kind as the feed spells it.
fn parse(payload: &str, origin: &str) -> Option<(&'static str, Told)> {
    let told: Told = match serde_json::from_str(payload) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "an access event on the database channel that is not one");
            return None;
        }
    };
    if told.origin == origin {
        return None;
    }
    let kind = KINDS.into_iter().find(|k| *k == told.kind)?;
    Some((kind, told))
}

fn committed_request(pg: &PgStore, id: &str) -> crate::error::Result<Option<RequestRecord>> {
    let r = pg.begin(false)?;
    get_json::<RequestRecord, _>(&r, REQUESTS, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_ignores_its_own_events_and_unknown_kinds() {
        let told = |origin: &str, kind: &str| {
            serde_json::to_string(&Told {
                origin: origin.into(),
                kind: kind.into(),
                owner: "spiffe://t/user/owner".into(),
                request: "req-1".into(),
            })
            .unwrap()
        };
        let (kind, t) = parse(&told("b", "requested"), "a").expect("another replica's event");
        assert_eq!((kind, t.request.as_str()), ("requested", "req-1"));
        assert!(parse(&told("a", "requested"), "a").is_none(), "its own");
        assert!(parse(&told("b", "exploded"), "a").is_none(), "unknown kind");
        assert!(parse("not json", "a").is_none());
    }
}
