//! Reading the audit log back: verification on demand and the paged,
//! scoped view of `ListAudit` (an owner sees what concerns it).

use std::collections::HashSet;

use redb::ReadableDatabase;

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
        let rep = verify_database(self.inner.db.as_ref(), &self.inner.public_key)?;
        if let Some(b) = ChainBreak::from_report(&rep) {
            mark_broken(&self.inner.broken, b);
        }
        Ok(rep)
    }

    /// Reads up to `limit` audit entries from `from_seq` (everything; for
    /// tests and tools).
    pub fn list_audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let r = self.inner.db.begin_read()?;
        writer::read_entries(&r.open_table(AUDIT)?, from_seq.max(1), limit)
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
        let r = self.inner.db.begin_read()?;
        let owned: Option<HashSet<String>> = match scope {
            AuditScope::All => None,
            AuditScope::Owner(owner) => Some(
                index_scan(&r.open_table(OWNER_STUDIES)?, owner)?
                    .into_iter()
                    .collect(),
            ),
        };
        let audit = r.open_table(AUDIT)?;
        let mut entries = Vec::new();
        let mut used = 0usize;
        let mut next_from_seq = 0;
        for (scanned, item) in audit.range(from_seq.max(1)..)?.enumerate() {
            let (k, v) = item?;
            let seq = k.value();
            if entries.len() >= limit || scanned >= AUDIT_SCAN_MAX {
                next_from_seq = seq;
                break;
            }
            let e = writer::decode_or_placeholder(seq, v.value());
            let visible = match (scope, &owned) {
                (AuditScope::Owner(owner), Some(studies)) => {
                    e.actor == *owner || (!e.study.is_empty() && studies.contains(&e.study))
                }
                _ => true,
            };
            if !visible {
                continue;
            }
            let n = size(&e);
            if !entries.is_empty() && used.saturating_add(n) > budget {
                next_from_seq = seq;
                break;
            }
            used = used.saturating_add(n);
            entries.push(e);
        }
        Ok(AuditPage {
            entries,
            next_from_seq,
        })
    }
}
