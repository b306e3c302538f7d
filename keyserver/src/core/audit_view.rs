//! Reading the audit log back: verification on demand and the paged,
//! scoped view of `ListAudit` (an owner sees what concerns it).

use std::collections::HashSet;

use crate::core::audit::{AuditEntry, VerifyReport};
use crate::core::chain::{ChainBreak, mark_broken, verify_database};
use crate::core::store::{AUDIT, OWNER_STUDIES, index_scan};
use crate::core::types::{AUDIT_SCAN_MAX, AuditPage, AuditScope};
use crate::core::{Core, writer};
use crate::error::Result;

impl Core {
    /// Recomputes the audit chain and checks signatures. A break found here
    /// blocks key operations like one found at start.
    pub fn verify_audit(&self) -> Result<VerifyReport> {
        let rep = verify_database(self.inner.store.read()?.as_ref(), &self.inner.public_key)?;
        if let Some(b) = ChainBreak::from_report(&rep) {
            mark_broken(&self.inner.broken, b);
        }
        Ok(rep)
    }

    /// Reads up to `limit` audit entries from `from_seq` (everything; for
    /// tests and tools).
    pub fn list_audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        writer::read_entries(self.inner.store.read()?.as_ref(), from_seq.max(1), limit)
    }

    /// One page of the audit log as `scope` may see it: at most `limit`
    /// entries whose `size`s add up to at most `budget` (at least one
    /// entry), examining at most [`AUDIT_SCAN_MAX`] entries. `next_from_seq`
    /// is where the next page starts, 0 at the end of the log.
    pub fn list_audit_page(
        &self,
        from_seq: u64,
        limit: usize,
        scope: &AuditScope,
        budget: usize,
        mut size: impl FnMut(&AuditEntry) -> usize,
    ) -> Result<AuditPage> {
        let r = self.inner.store.read()?;
        let owned: Option<HashSet<String>> = match scope {
            AuditScope::All => None,
            AuditScope::Owner(owner) => Some(
                index_scan(r.as_ref(), OWNER_STUDIES, owner)?
                    .into_iter()
                    .collect(),
            ),
        };
        let mut entries = Vec::new();
        let mut used = 0usize;
        let mut next_from_seq = 0;
        let mut scanned = 0usize;
        r.scan_from(AUDIT, from_seq.max(1), &mut |k, v| {
            let seq = k.num();
            if entries.len() >= limit || scanned >= AUDIT_SCAN_MAX {
                next_from_seq = seq;
                return Ok(false);
            }
            scanned += 1;
            let e = writer::decode_or_placeholder(seq, v);
            let visible = match (scope, &owned) {
                (AuditScope::Owner(owner), Some(studies)) => {
                    e.actor == *owner || (!e.study.is_empty() && studies.contains(&e.study))
                }
                _ => true,
            };
            if !visible {
                return Ok(true);
            }
            let n = size(&e);
            if !entries.is_empty() && used.saturating_add(n) > budget {
                next_from_seq = seq;
                return Ok(false);
            }
            used = used.saturating_add(n);
            entries.push(e);
            Ok(true)
        })?;
        Ok(AuditPage {
            entries,
            next_from_seq,
        })
    }
}
