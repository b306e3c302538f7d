//! What the keyserver's `/metrics` gauges read at scrape time, from one
//! read transaction: pending key requests, the audit chain's length and
//! how long ago its last signed checkpoint was.

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
        let txn = self.inner.store.read()?;
        let txn = txn.as_ref();
        let mut pending_requests = 0;
        txn.scan_all(REQUESTS, &mut |_, v| {
            // A record that does not parse is not pending (VerifyAudit and
            // the RPCs report it).
            if serde_json::from_slice::<RequestRecord>(v)
                .is_ok_and(|r| r.state == GrantState::Pending)
            {
                pending_requests += 1;
            }
            Ok(true)
        })?;
        let audit_chain_length = txn.last_num(AUDIT)?;
        let since_seq = match txn.last(CHECKPOINTS)? {
            Some((k, _)) => Some(k.num()),
            None => {
                let mut first = None;
                txn.scan_all(AUDIT, &mut |k, _| {
                    first = Some(k.num());
                    Ok(false)
                })?;
                first
            }
        };
        let checkpoint_age_secs = match since_seq {
            None => None,
            Some(seq) => txn
                .get_num(AUDIT, seq)?
                .and_then(|raw| decode(raw.as_slice()))
                .map(|e| self.inner.clock.now_ms().saturating_sub(e.timestamp_ms) / 1000),
        };
        Ok(Gauges {
            pending_requests,
            audit_chain_length,
            checkpoint_age_secs,
        })
    }
}
