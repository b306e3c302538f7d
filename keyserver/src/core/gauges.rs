//! What the keyserver's `/metrics` gauges read at scrape time, from one
//! read transaction: pending key requests, the audit chain's length and
//! how long ago its last signed checkpoint was.

use redb::{ReadableDatabase, ReadableTable};

use super::Core;
use super::audit::decode;
use super::store::{AUDIT, CHECKPOINTS, GrantState, REQUESTS, RequestRecord};
use crate::error::Result;

/// The gauges' values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Key requests waiting for the owner's decision.
    pub pending_requests: u64,
    /// Entries in the audit chain (the seq of its last entry).
    pub audit_chain_length: u64,
    /// Seconds since the last signed checkpoint (since the first entry
    /// while there is none yet); `None` while the log is empty.
    pub checkpoint_age_secs: Option<u64>,
}

impl Core {
    /// Reads the gauges (a scan of the requests table: scrape-time cost
    /// grows with the number of requests, not with traffic).
    pub fn gauges(&self) -> Result<Gauges> {
        let txn = self.inner.db.begin_read()?;
        let requests = txn.open_table(REQUESTS)?;
        let mut pending_requests = 0;
        for row in requests.iter()? {
            let (_, v) = row?;
            // A record that does not parse is not pending (VerifyAudit and
            // the RPCs report it).
            if serde_json::from_slice::<RequestRecord>(v.value())
                .is_ok_and(|r| r.state == GrantState::Pending)
            {
                pending_requests += 1;
            }
        }
        let audit = txn.open_table(AUDIT)?;
        let audit_chain_length = audit.last()?.map_or(0, |(k, _)| k.value());
        let checkpoints = txn.open_table(CHECKPOINTS)?;
        let since_seq = match checkpoints.last()? {
            Some((k, _)) => Some(k.value()),
            None => audit.first()?.map(|(k, _)| k.value()),
        };
        let checkpoint_age_secs = match since_seq {
            None => None,
            Some(seq) => audit
                .get(seq)?
                .and_then(|raw| decode(raw.value()))
                .map(|e| self.inner.clock.now_ms().saturating_sub(e.timestamp_ms) / 1000),
        };
        Ok(Gauges {
            pending_requests,
            audit_chain_length,
            checkpoint_age_secs,
        })
    }
}
