//! Group commit: one writer thread owns every write transaction of the
//! store ([`kv`](crate::core::kv): a redb file, or PostgreSQL shared with
//! other replicas).
//!
//! Callers submit jobs (closures run inside the shared write transaction,
//! which both change state and append audit records). The writer takes the
//! first job, drains whatever else is queued (up to [`MAX_BATCH`]), runs
//! them all in one transaction, re-signs the chain head, commits once
//! (fsync), and only then answers each waiter. The chain head and next seq
//! are read from the transaction at the start of every batch (on
//! PostgreSQL another replica may have appended since: the transaction
//! holds the chain lock by then, see `kv_pg.rs`). If anything fails, the whole
//! transaction is aborted and every waiter gets an error: no reply ever goes
//! out for an operation whose audit record is not durable.
//!
//! A job returns `Err` only for fatal (storage) failures, which abort the
//! batch; domain refusals are the inner `Result` handed to the waiter, and
//! by convention a job checks everything before it writes, or writes only
//! an audit record of the refusal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use crate::core::audit::{
    AuditEntry, Hash, NewEntry, SignedHead, checkpoint_message, decode, seal,
};
use crate::core::backend::Store;
use crate::core::clock::Clock;
use crate::core::crypto::AuditSigner;
use crate::core::kv::{KvRead, KvWrite, Tbl};
use crate::core::store::META_AUDIT_HEAD;
use crate::error::{KeyServerError, Result};

/// Most jobs in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Where the chain stands after the last commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainState {
    /// Seq of the next entry.
    pub next_seq: u64,
    /// Hash of the last entry (zeros if none).
    pub head: Hash,
}

impl ChainState {
    /// Reads the chain state from the last stored audit record.
    pub fn load(r: &dyn KvRead) -> Result<Self> {
        match r.last(Tbl::Audit)? {
            None => Ok(Self {
                next_seq: 1,
                head: [0u8; 32],
            }),
            Some((k, raw)) => {
                let seq = k.num();
                // Trust the stored hash here; VerifyAudit checks it.
                let head = raw
                    .len()
                    .checked_sub(32)
                    .and_then(|i| raw[i..].try_into().ok())
                    .ok_or_else(|| KeyServerError::Corrupt(format!("audit entry {seq}")))?;
                Ok(Self {
                    next_seq: seq + 1,
                    head,
                })
            }
        }
    }
}

/// What a job sees: the transaction and the audit appender.
pub struct TxnCtx<'t> {
    /// The shared write transaction (jobs write `audit` and
    /// `audit_checkpoints` only through [`TxnCtx::append`]).
    pub txn: &'t dyn KvWrite,
    chain: &'t mut ChainState,
    signer: &'t AuditSigner,
    checkpoint_every: u64,
    now_ms: u64,
}

impl TxnCtx<'_> {
    /// Milliseconds since the epoch, fixed for the batch.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }
    /// Seconds since the epoch, fixed for the batch.
    pub fn now_secs(&self) -> u64 {
        self.now_ms / 1000
    }
    /// Appends one audit entry to the chain; returns its seq.
    pub fn append(&mut self, e: NewEntry) -> Result<u64> {
        let seq = self.chain.next_seq;
        let (rec, hash) = seal(seq, &self.chain.head, self.now_ms, &e);
        self.txn.put_num(Tbl::Audit, seq, rec.as_slice())?;
        if self.checkpoint_every > 0 && seq.is_multiple_of(self.checkpoint_every) {
            let cp = SignedHead {
                seq,
                hash,
                signature: self.signer.sign(&checkpoint_message(seq, &hash)),
            };
            self.txn
                .put_num(Tbl::Checkpoints, seq, cp.encode().as_slice())?;
        }
        self.chain.next_seq = seq + 1;
        self.chain.head = hash;
        Ok(seq)
    }
}

type Completion = Box<dyn FnOnce(Result<()>) + Send>;
type Job = Box<dyn for<'t> FnOnce(&mut TxnCtx<'t>) -> Result<Completion> + Send>;

/// Handle to the writer thread.
pub struct Writer {
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
}

/// Counters of committed batches and jobs.
#[derive(Debug, Default)]
pub struct Stats {
    batches: AtomicU64,
    jobs: AtomicU64,
}

impl Writer {
    /// Starts the writer thread.
    pub fn start(
        store: Store,
        signer: AuditSigner,
        clock: Arc<dyn Clock>,
        checkpoint_every: u64,
    ) -> Result<Self> {
        let (tx, rx) = channel::<Job>();
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("keyserver-audit-writer".into())
            .spawn(move || run(&store, &rx, &signer, clock.as_ref(), checkpoint_every, &st))
            .map_err(|e| KeyServerError::Storage(format!("cannot start writer: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// (committed batches, committed jobs) so far.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.stats.batches.load(Ordering::Relaxed),
            self.stats.jobs.load(Ordering::Relaxed),
        )
    }

    /// Runs `f` inside the next group-committed write transaction and
    /// returns its inner result once the transaction is durable.
    pub async fn submit<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(&mut TxnCtx<'t>) -> Result<Result<T>> + Send + 'static,
    {
        let (reply_tx, reply_rx) = oneshot::channel::<Result<T>>();
        let job: Job = Box::new(move |ctx: &mut TxnCtx<'_>| {
            let reply = f(ctx)?;
            Ok(Box::new(move |committed: Result<()>| {
                let _ = reply_tx.send(committed.and(reply));
            }) as Completion)
        });
        self.tx
            .as_ref()
            .ok_or(KeyServerError::Unavailable)?
            .send(job)
            .map_err(|_| KeyServerError::Unavailable)?;
        reply_rx.await.map_err(|_| {
            KeyServerError::Audit("the transaction was aborted; nothing was done".into())
        })?
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the queued jobs.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    store: &Store,
    rx: &Receiver<Job>,
    signer: &AuditSigner,
    clock: &dyn Clock,
    checkpoint_every: u64,
    stats: &Stats,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        match run_batch(store, jobs, signer, clock.now_ms(), checkpoint_every) {
            Ok(done) => {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.jobs.fetch_add(done.len() as u64, Ordering::Relaxed);
                done.into_iter().for_each(|c| c(Ok(())));
            }
            Err((e, done)) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "audit batch aborted");
                done.into_iter()
                    .for_each(|c| c(Err(KeyServerError::Audit(msg.clone()))));
            }
        }
    }
}

type BatchError = (KeyServerError, Vec<Completion>);

/// Runs `f` with an audit context over `txn`, then re-signs the chain head
/// if `f` appended anything. Used by the writer and by the bootstrap.
pub fn apply_in_txn<F>(
    txn: &dyn KvWrite,
    chain: &mut ChainState,
    signer: &AuditSigner,
    now_ms: u64,
    checkpoint_every: u64,
    f: F,
) -> Result<()>
where
    F: FnOnce(&mut TxnCtx<'_>) -> Result<()>,
{
    let start_seq = chain.next_seq;
    {
        let mut ctx = TxnCtx {
            txn,
            chain: &mut *chain,
            signer,
            checkpoint_every,
            now_ms,
        };
        f(&mut ctx)?;
    }
    if chain.next_seq != start_seq {
        let last = chain.next_seq - 1;
        let head = SignedHead {
            seq: last,
            hash: chain.head,
            signature: signer.sign(&checkpoint_message(last, &chain.head)),
        };
        txn.put_str(Tbl::Meta, META_AUDIT_HEAD, head.encode().as_slice())?;
    }
    Ok(())
}

fn run_batch(
    store: &Store,
    jobs: Vec<Job>,
    signer: &AuditSigner,
    now_ms: u64,
    checkpoint_every: u64,
) -> std::result::Result<Vec<Completion>, BatchError> {
    let mut done: Vec<Completion> = Vec::with_capacity(jobs.len());
    let txn = match store.write() {
        Ok(t) => t,
        Err(e) => return Err((e, done)),
    };
    // Where the chain stands now, in this transaction (another replica may
    // have appended since this one's last batch).
    let mut chain = match ChainState::load(txn.as_write().read()) {
        Ok(c) => c,
        Err(e) => return Err((e, done)),
    };
    let outcome = apply_in_txn(
        txn.as_write(),
        &mut chain,
        signer,
        now_ms,
        checkpoint_every,
        |ctx| {
            for job in jobs {
                // A panicking job must not kill the writer (and with it every
                // later request): it aborts this batch like a storage error.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(ctx)))
                    .map_err(|_| KeyServerError::Storage("job panicked".into()))?;
                done.push(r?);
            }
            Ok(())
        },
    );
    if let Err(e) = outcome {
        // Dropping the transaction aborts it.
        drop(txn);
        return Err((e, done));
    }
    match txn.commit() {
        Ok(()) => Ok(done),
        Err(e) => Err((e, done)),
    }
}

/// Reads audit entries `from..from+limit` (decoded; undecodable ones skipped
/// with a placeholder event).
pub fn read_entries(r: &dyn KvRead, from: u64, limit: usize) -> Result<Vec<AuditEntry>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    r.scan_from(Tbl::Audit, from, &mut |k, v| {
        out.push(decode_or_placeholder(k.num(), v));
        Ok(out.len() < limit)
    })?;
    Ok(out)
}

/// The decoded entry, or a placeholder for an undecodable one.
pub fn decode_or_placeholder(seq: u64, raw: &[u8]) -> AuditEntry {
    decode(raw).unwrap_or_else(|| AuditEntry {
        seq,
        prev_hash: [0u8; 32],
        timestamp_ms: 0,
        actor: String::new(),
        event: "<undecodable>".into(),
        study: String::new(),
        detail: String::new(),
        hash: [0u8; 32],
    })
}
