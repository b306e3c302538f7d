//! The audit chain as a whole: verifying it (all of it, or from the last
//! signed checkpoint for a fast start, stoppable for the background check),
//! the break that makes the keyserver fail closed, and the offline
//! administrator recovery (`keyserver audit-recover`). Entry encoding and
//! the chain walk itself are in `audit.rs`; appending is the writer's.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock};

use redb::ReadOnlyDatabase;

use crate::core::audit::{
    AuditEvent, NewEntry, SignedHead, VerifyFrom, VerifyReport, checkpoint_message, verify_chain,
};
use crate::core::backend::Store;
use crate::core::crypto::{AuditSigner, Kek, SIGNING_KEY_AAD};
use crate::core::ids::validate_text;
use crate::core::kv::{self, KvRead};
use crate::core::store::{
    AUDIT, AUDIT_RECOVERIES, CHECKPOINTS, META, META_AUDIT_HEAD, META_PUBLIC_KEY, META_SIGNING_KEY,
    get_bytes,
};
use crate::core::writer::{ChainState, apply_in_txn};
use crate::error::{KeyServerError, Result};

/// Actor of an `audit.recovered` entry (a local administrator; the detail
/// names the operator).
pub const RECOVERY_ACTOR: &str = "keyserver audit-recover";

/// Audit entries read per page while verifying.
const VERIFY_PAGE: usize = 4096;

/// The first broken audit entry found (at start, by the background full
/// check, or by `VerifyAudit`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    /// First broken entry.
    pub seq: u64,
    /// What is wrong with it.
    pub problem: String,
}

impl ChainBreak {
    pub(crate) fn from_report(rep: &VerifyReport) -> Option<Self> {
        (!rep.ok).then(|| Self {
            seq: rep.first_broken_seq.unwrap_or(0),
            problem: rep.problem.clone(),
        })
    }
}

pub(crate) fn load_signer<R: KvRead + ?Sized>(r: &R, kek: &Kek) -> Result<Option<AuditSigner>> {
    match get_bytes(r, META, META_SIGNING_KEY)? {
        None => Ok(None),
        Some(w) => AuditSigner::from_pkcs8(&kek.unwrap(SIGNING_KEY_AAD, &w)?).map(Some),
    }
}

/// Recomputes the whole audit chain of an open database. Breaks before the
/// last signed recovery entry (`keyserver audit-recover`) were acknowledged
/// by an administrator and do not make the report fail.
pub fn verify_database(r: &dyn KvRead, public_key: &[u8]) -> Result<VerifyReport> {
    verify_database_with(r, public_key, false)
}

/// Like [`verify_database`], but only from the last signed checkpoint (or
/// recovery entry) on: what the keyserver checks before it serves, so a
/// start stays fast however long the log is. The background check and
/// `VerifyAudit` cover the rest.
pub fn verify_database_tail(r: &dyn KvRead, public_key: &[u8]) -> Result<VerifyReport> {
    verify_database_with(r, public_key, true)
}

/// The highest recovery entry whose signature verifies (0 if none).
fn recovery_horizon(r: &dyn KvRead, public_key: &[u8]) -> Result<u64> {
    let mut horizon = 0;
    r.scan_all(AUDIT_RECOVERIES, &mut |k, v| {
        if let Some(h) = SignedHead::decode(v)
            && h.seq == k.num()
            && h.valid(public_key)
        {
            horizon = horizon.max(h.seq);
        }
        Ok(true)
    })?;
    Ok(horizon)
}

fn verify_database_with(
    db: &dyn KvRead,
    public_key: &[u8],
    tail_only: bool,
) -> Result<VerifyReport> {
    // Without a stop flag the walk always completes.
    verify_database_stoppable(db, public_key, tail_only, None)?.ok_or(KeyServerError::Unavailable)
}

/// `stop`: once set, reading ends early and the result is `Ok(None)`.
pub(crate) fn verify_database_stoppable(
    r: &dyn KvRead,
    public_key: &[u8],
    tail_only: bool,
    stop: Option<&AtomicBool>,
) -> Result<Option<VerifyReport>> {
    // A table absent from an older file reads as empty.
    let horizon = recovery_horizon(r, public_key)?;
    let mut checkpoints = Vec::new();
    r.scan_all(CHECKPOINTS, &mut |k, v| {
        checkpoints.push((k.num(), v.to_vec()));
        Ok(true)
    })?;
    let from = if tail_only {
        // The last checkpoint that names a stored entry; a dangling one
        // (truncated tail) is left to `verify_chain` to report.
        let last = r.last_num(AUDIT)?;
        checkpoints
            .iter()
            .map(|(seq, _)| *seq)
            .filter(|seq| *seq <= last)
            .max()
            .unwrap_or(1)
            .max(horizon)
            .max(1)
    } else {
        1
    };
    let head = get_bytes(r, META, META_AUDIT_HEAD)?;
    let stopped = || stop.is_some_and(|s| s.load(Ordering::Relaxed));
    // The walk pulls entries from the store a page at a time, so a long
    // log is never held in memory at once.
    let mut page: std::collections::VecDeque<(u64, Vec<u8>)> = Default::default();
    let mut next = Some(from);
    let records = std::iter::from_fn(|| {
        if page.is_empty()
            && let Some(start) = next.take()
            && !stopped()
        {
            let read = r.scan_from(AUDIT, start, &mut |k, v| {
                page.push_back((k.num(), v.to_vec()));
                Ok(page.len() < VERIFY_PAGE)
            });
            if let Err(e) = read {
                return Some(Err(e));
            }
            if page.len() == VERIFY_PAGE {
                next = page.back().map(|(seq, _)| seq + 1);
            }
        }
        if stopped() {
            return None;
        }
        page.pop_front().map(Ok)
    });
    let report = verify_chain(
        records,
        &checkpoints,
        head.as_deref(),
        public_key,
        VerifyFrom {
            seq: from,
            acknowledged_before: horizon,
        },
    )?;
    // A stopped walk looks truncated: its report means nothing.
    Ok((!stopped()).then_some(report))
}

/// Offline verification of a keyserver database file (the server need not
/// run, e.g. when it refuses to start). With the KEK, the signing key is
/// authenticated; without it, the public key stored beside the log is used
/// and the report is only as trustworthy as the file.
pub fn verify_audit_file(path: &Path, kek: Option<&Kek>) -> Result<(VerifyReport, Vec<u8>)> {
    let db = ReadOnlyDatabase::open(path)?;
    verify_audit_in(&kv::redb_read(&db)?, kek)
}

/// [`verify_audit_file`] over any store (the offline `verify` on the
/// PostgreSQL backend).
pub fn verify_audit_in(r: &dyn KvRead, kek: Option<&Kek>) -> Result<(VerifyReport, Vec<u8>)> {
    let public_key = match kek {
        Some(k) => load_signer(r, k)?
            .ok_or_else(|| KeyServerError::Corrupt("no audit signing key".into()))?
            .public_key(),
        None => get_bytes(r, META, META_PUBLIC_KEY)?
            .ok_or_else(|| KeyServerError::Corrupt("no audit public key".into()))?,
    };
    Ok((verify_database(r, &public_key)?, public_key))
}

/// Records the first break seen (a later, different one does not replace it).
pub(crate) fn mark_broken(slot: &RwLock<Option<ChainBreak>>, b: ChainBreak) {
    let mut g = slot.write().unwrap_or_else(PoisonError::into_inner);
    if g.as_ref().is_none_or(|old| b.seq < old.seq) {
        *g = Some(b);
    }
}

/// What `keyserver audit-recover` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Seq of the signed `audit.recovered` entry.
    pub seq: u64,
    /// The break that was acknowledged.
    pub acknowledged: ChainBreak,
    /// The chain verified again after the recovery.
    pub report: VerifyReport,
}

/// Offline recovery of a broken audit chain (the keyserver stopped): if the
/// first broken entry is `acknowledge`, appends a signed `audit.recovered`
/// entry (operator, acknowledged entry, problem), a signed checkpoint on it
/// and a signed recovery record; the chain then verifies again from that
/// entry on, and a keyserver started on the file serves key operations
/// again. The broken entries stay in the log (and `VerifyAudit` keeps
/// naming the acknowledged break). Refused when the chain is intact or its
/// first broken entry is another one.
pub fn recover_audit(
    path: &Path,
    kek: &Kek,
    operator: &str,
    acknowledge: u64,
    now_ms: u64,
) -> Result<Recovery> {
    let db = redb::Database::open(path)?;
    recover_audit_in(
        &Store::Redb(std::sync::Arc::new(db)),
        kek,
        operator,
        acknowledge,
        now_ms,
    )
}

/// [`recover_audit`] over any store (on PostgreSQL, with every keyserver
/// replica stopped).
pub fn recover_audit_in(
    store: &Store,
    kek: &Kek,
    operator: &str,
    acknowledge: u64,
    now_ms: u64,
) -> Result<Recovery> {
    validate_text("operator", operator)?;
    let signer = load_signer(store.read()?.as_ref(), kek)?
        .ok_or_else(|| KeyServerError::Corrupt("no audit signing key".into()))?;
    let public_key = signer.public_key();
    let before = verify_database(store.read()?.as_ref(), &public_key)?;
    let Some(b) = ChainBreak::from_report(&before) else {
        return Err(KeyServerError::FailedPrecondition(
            "the audit chain verifies; there is nothing to recover".into(),
        ));
    };
    if b.seq != acknowledge {
        return Err(KeyServerError::InvalidArgument(format!(
            "the first broken entry is {} ({}), not {acknowledge}; acknowledge that entry",
            b.seq, b.problem
        )));
    }
    let txn = store.write()?;
    let w = txn.as_write();
    let mut chain = ChainState::load(w.read())?;
    {
        // Checkpoints past the last stored entry (a cut-off tail) would
        // collide with the entries written from now on.
        let mut stale = Vec::new();
        w.read()
            .scan_from(CHECKPOINTS, chain.next_seq, &mut |k, _| {
                stale.push(k.num());
                Ok(true)
            })?;
        for seq in stale {
            w.remove(CHECKPOINTS, kv::Key::Num(seq))?;
        }
    }
    let entry = NewEntry {
        actor: RECOVERY_ACTOR.into(),
        event: AuditEvent::AuditRecovered,
        study: String::new(),
        detail: format!(
            "acknowledged_broken_at={} operator={operator} problem={}",
            b.seq, b.problem
        ),
    };
    // checkpoint_every = 1: the recovery entry always gets a checkpoint.
    apply_in_txn(w, &mut chain, &signer, now_ms, 1, |ctx| {
        ctx.append(entry).map(drop)
    })?;
    let seq = chain.next_seq - 1;
    let anchor = SignedHead {
        seq,
        hash: chain.head,
        signature: signer.sign(&checkpoint_message(seq, &chain.head)),
    };
    w.put_num(AUDIT_RECOVERIES, seq, anchor.encode().as_slice())?;
    txn.commit()?;
    let report = verify_database(store.read()?.as_ref(), &public_key)?;
    Ok(Recovery {
        seq,
        acknowledged: b,
        report,
    })
}
