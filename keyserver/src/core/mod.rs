//! The keyserver core: master secrets, studies, derivation, key requests
//! and grants, and the audit log. No gRPC here; the service module converts
//! at the edge. Async only because callers wait for the group commit.
//!
//! Read it by concern:
//! * who may do what: [`policy`] (pure rules over the records, no I/O) and
//!   [`gate`] (the one place a decision is taken and its refusal written
//!   to the audit chain);
//! * state transitions, each a write job of the group commit
//!   ([`writer`]) that changes records and appends their audit entry in one
//!   transaction: `studies.rs` (register, derive, forget, rotate),
//!   `grants.rs` (request, approve, deny, revoke, fetch, redeem, check),
//!   `delegates.rs`;
//! * the audit log: [`audit`] (entry format, hashing), [`writer`]
//!   (appending, checkpoints), [`chain`] (verification, recovery),
//!   `audit_view.rs` (reading it back);
//! * storage layout: [`store`]; identifiers: [`ids`]; secrets: [`crypto`].
//!
//! This file holds the [`Core`] handle itself: opening the database, the
//! master secrets and the study cache.

pub mod access;
pub mod attrs;
pub mod audit;
mod audit_view;
pub mod backup;
pub mod chain;
pub mod clock;
pub mod crypto;
mod delegates;
pub(crate) mod gate;
mod gauges;
pub mod grant_find;
mod grants;
pub mod ids;
pub mod policy;
pub mod store;
mod studies;
mod types;
pub mod webhook;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use ring::rand::SystemRandom;

use crate::error::{KeyServerError, Result};
use audit::{AuditEvent, NewEntry};
use clock::Clock;
use crypto::{AuditSigner, Kek, Master, SIGNING_KEY_AAD, master_aad, random_secret};
use ids::{StudyId, parse_identity, parse_user_identity};
use policy::Rules;
use store::{
    AUDIT, AUDIT_RECOVERIES, CHECKPOINTS, DELEGATES, MASTERS, META, META_MASTER_CURRENT,
    META_PUBLIC_KEY, META_SIGNING_KEY, OWNER_STUDIES, REQUESTS, STUDIES, STUDY_REQUESTS,
    StudyRecord, get_bytes, get_json,
};
use writer::{ChainState, Writer, apply_in_txn};

pub use chain::{
    ChainBreak, RECOVERY_ACTOR, Recovery, recover_audit, verify_audit_file, verify_database,
    verify_database_tail,
};
use chain::{load_signer, mark_broken, verify_database_stoppable};
pub use gauges::Gauges;
pub use types::{
    AUDIT_SCAN_MAX, Ask, AuditPage, AuditScope, Derived, ForgetReport, Operation, Redeemed,
    Released,
};

/// Identity recorded as the actor of the keyserver's own events.
pub const SELF_ACTOR: &str = "keyserver";
/// Most studies kept in the in-memory study cache.
const STUDY_CACHE_MAX: usize = 100_000;
/// Most requests one `list_requests` returns.
pub const LIST_MAX: usize = 1000;

/// Everything the core needs to start.
#[derive(Debug)]
pub struct CoreConfig {
    /// redb file.
    pub db_path: PathBuf,
    /// Key-encryption key.
    pub kek: Kek,
    /// The trust domain of every identity (`[server.access] trust_domain`).
    pub trust_domain: String,
    /// The gateway's identity: the only one that registers studies or
    /// presents attributes on a user's behalf.
    pub gateway_identity: String,
    /// Trusted services allowed to derive keys (the gateway, watermark),
    /// each with the purposes it may derive (`prefix*` patterns). Storage
    /// nodes hold the `service` role too but are untrusted, so the role
    /// alone is not enough.
    pub derivers: Vec<(String, Vec<String>)>,
    /// Signed checkpoint every this many audit entries (0 = only the head).
    pub checkpoint_every: u64,
    /// Longest grant an owner may approve, seconds.
    pub max_grant_ttl_secs: u64,
    /// Most uses an owner may approve.
    pub max_grant_uses: u32,
    /// Purposes, standing approvals, break-glass ([`access`]).
    pub access: access::AccessConfig,
}

/// The keyserver core. Cheap to clone.
#[derive(Clone)]
pub struct Core {
    inner: Arc<Inner>,
}

struct Inner {
    // The writer is declared first so that it is dropped (and its thread
    // joined) before the database handle below.
    writer: Writer,
    db: Arc<Database>,
    kek: Arc<Kek>,
    rng: SystemRandom,
    clock: Arc<dyn Clock>,
    masters: RwLock<BTreeMap<u32, Arc<Master>>>,
    current: AtomicU32,
    studies: RwLock<HashMap<String, Arc<StudyRecord>>>,
    public_key: Vec<u8>,
    trust_domain: String,
    rules: Rules,
    max_ttl: u64,
    max_uses: u32,
    access: access::AccessConfig,
    /// The live feed of requests filed and decided (`WatchRequests`).
    events: tokio::sync::broadcast::Sender<access::AccessEvent>,
    /// Owner webhooks, when `[keyserver.webhook]` is configured.
    webhook: Option<Arc<webhook::Outbox>>,
    /// Set while the audit chain does not verify: every key operation is
    /// refused until an administrator runs `keyserver audit-recover`.
    broken: Arc<RwLock<Option<ChainBreak>>>,
    /// The full verification started at open (joined before the database
    /// closes).
    verifier: Mutex<Option<JoinHandle<()>>>,
    /// Tells that verification to stop early (shutdown).
    stop_verifier: Arc<AtomicBool>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A long log must not hold up shutdown: the background check stops
        // at the next entry and its (partial) result is discarded.
        self.stop_verifier.store(true, Ordering::SeqCst);
        if let Some(w) = &self.webhook {
            w.close();
        }
        let t = self
            .verifier
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

fn deleted(study_id: &str) -> KeyServerError {
    KeyServerError::NotFound(format!("study {study_id} was deleted"))
}

/// Inside a write transaction: true when the study is a tombstone. Jobs that
/// act on a study looked up before the transaction (possibly from the cache)
/// call this so nothing is derived or requested after `ForgetStudy` commits.
fn forgotten_in_txn(txn: &WriteTransaction, study_id: &str) -> Result<bool> {
    let studies = txn.open_table(STUDIES)?;
    Ok(get_json::<StudyRecord, _>(&studies, study_id)?.is_some_and(|s| s.is_forgotten()))
}

impl Core {
    /// Opens (or creates) the database: on first start generates master
    /// secret v1 and the audit signing key, both wrapped under the KEK.
    pub fn open(cfg: CoreConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        // 0600, and shared read-only with `keyserver backup` while serving.
        let db = Arc::new(tessera_runtime::snapshot::open_shared_writer(&cfg.db_path)?);
        let rng = SystemRandom::new();
        let kek = Arc::new(cfg.kek);
        let w = db.begin_write()?;
        let signer = {
            // Create every table so later reads never meet a missing one.
            drop(w.open_table(STUDIES)?);
            drop(w.open_table(REQUESTS)?);
            drop(w.open_table(STUDY_REQUESTS)?);
            drop(w.open_table(OWNER_STUDIES)?);
            drop(w.open_table(AUDIT)?);
            drop(w.open_table(CHECKPOINTS)?);
            drop(w.open_table(AUDIT_RECOVERIES)?);
            drop(w.open_table(DELEGATES)?);
            drop(w.open_table(store::STANDING)?);
            drop(w.open_table(store::OWNER_STANDING)?);
            drop(w.open_table(store::OWNER_SETTINGS)?);
            drop(w.open_table(store::REQUESTER_REQUESTS)?);
            let mut meta = w.open_table(META)?;
            match load_signer(&meta, &kek)? {
                Some(s) => s,
                None => {
                    let (s, pkcs8) = AuditSigner::generate(&rng)?;
                    let wrapped = kek.wrap(&rng, SIGNING_KEY_AAD, &pkcs8[..])?;
                    meta.insert(META_SIGNING_KEY, wrapped.as_slice())?;
                    meta.insert(META_PUBLIC_KEY, s.public_key().as_slice())?;
                    s
                }
            }
        };
        let mut chain = ChainState::load(&w.open_table(AUDIT)?)?;
        let created = {
            let mut masters = w.open_table(MASTERS)?;
            if masters.is_empty()? {
                let secret = random_secret(&rng)?;
                let wrapped = kek.wrap(&rng, &master_aad(1), &secret[..])?;
                masters.insert(1, wrapped.as_slice())?;
                let mut meta = w.open_table(META)?;
                meta.insert(META_MASTER_CURRENT, 1u32.to_be_bytes().as_slice())?;
                true
            } else {
                false
            }
        };
        if created {
            apply_in_txn(
                &w,
                &mut chain,
                &signer,
                clock.now_ms(),
                cfg.checkpoint_every,
                |ctx| {
                    ctx.append(NewEntry {
                        actor: SELF_ACTOR.into(),
                        event: AuditEvent::MasterCreated,
                        study: String::new(),
                        detail: "master_version=1".into(),
                    })
                    .map(drop)
                },
            )?;
        }
        w.commit()?;

        let (masters, current) = {
            let r = db.begin_read()?;
            let t = r.open_table(MASTERS)?;
            let mut map = BTreeMap::new();
            for item in t.iter()? {
                let (k, v) = item?;
                let version = k.value();
                let secret = kek.unwrap_secret(&master_aad(version), v.value())?;
                map.insert(version, Arc::new(Master::new(version, secret)?));
            }
            let meta = r.open_table(META)?;
            let current = get_bytes(&meta, META_MASTER_CURRENT)?
                .and_then(|b| b.as_slice().try_into().ok())
                .map(u32::from_be_bytes)
                .filter(|v| map.contains_key(v))
                .ok_or_else(|| KeyServerError::Corrupt("current master version".into()))?;
            (map, current)
        };
        let public_key = signer.public_key();
        // Fail closed: a chain that does not verify from its last signed
        // checkpoint on blocks every key operation from the first request.
        let tail = verify_database_tail(db.as_ref(), &public_key)?;
        let broken = Arc::new(RwLock::new(ChainBreak::from_report(&tail)));
        if let Some(b) = ChainBreak::from_report(&tail) {
            tracing::error!(seq = b.seq, problem = %b.problem, "audit chain broken at start: key operations refused");
        }
        let stop_verifier = Arc::new(AtomicBool::new(false));
        let verifier = {
            // The rest of the chain is checked in the background.
            let db = db.clone();
            let pk = public_key.clone();
            let broken = broken.clone();
            let stop = stop_verifier.clone();
            std::thread::Builder::new()
                .name("keyserver-audit-verify".into())
                .spawn(move || match verify_database_stoppable(db.as_ref(), &pk, false, Some(&stop)) {
                    Ok(None) => tracing::info!("background audit verification stopped (shutdown)"),
                    Ok(Some(rep)) => {
                        if let Some(b) = ChainBreak::from_report(&rep) {
                            tracing::error!(seq = b.seq, problem = %b.problem, "audit chain broken: key operations refused");
                            mark_broken(&broken, b);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "audit chain could not be verified"),
                })
                .map_err(|e| KeyServerError::Storage(format!("cannot start verifier: {e}")))?
        };
        let writer = Writer::start(
            db.clone(),
            signer,
            chain,
            clock.clone(),
            cfg.checkpoint_every,
        )?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                db,
                kek,
                rng,
                clock,
                masters: RwLock::new(masters),
                current: AtomicU32::new(current),
                studies: RwLock::new(HashMap::new()),
                public_key,
                trust_domain: cfg.trust_domain,
                rules: Rules {
                    gateway: cfg.gateway_identity,
                    derivers: cfg.derivers,
                    access: cfg.access.rules.clone(),
                },
                max_ttl: cfg.max_grant_ttl_secs,
                max_uses: cfg.max_grant_uses,
                webhook: cfg.access.webhook.clone().map(webhook::Outbox::new),
                access: cfg.access,
                events: tokio::sync::broadcast::channel(1024).0,
                broken,
                verifier: Mutex::new(Some(verifier)),
                stop_verifier,
            }),
        })
    }

    /// Ed25519 public key of the audit signer.
    pub fn audit_public_key(&self) -> &[u8] {
        &self.inner.public_key
    }

    /// (committed batches, committed jobs) of the group-commit writer.
    pub fn writer_stats(&self) -> (u64, u64) {
        self.inner.writer.stats()
    }

    /// Master version new studies get.
    pub fn current_master_version(&self) -> u32 {
        self.inner.current.load(Ordering::SeqCst)
    }

    fn master(&self, version: u32) -> Result<Arc<Master>> {
        self.inner
            .masters
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&version)
            .cloned()
            .ok_or_else(|| KeyServerError::Corrupt(format!("unknown master version {version}")))
    }

    /// A live study: `NotFound` for unknown ids and for tombstones.
    fn study(&self, id: &StudyId) -> Result<Arc<StudyRecord>> {
        let s = self.study_any(id)?;
        if s.is_forgotten() {
            return Err(deleted(id.as_str()));
        }
        Ok(s)
    }

    /// A study or its tombstone.
    fn study_any(&self, id: &StudyId) -> Result<Arc<StudyRecord>> {
        if let Some(s) = self
            .inner
            .studies
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id.as_str())
        {
            return Ok(s.clone());
        }
        let r = self.inner.db.begin_read()?;
        let t = r.open_table(STUDIES)?;
        let rec: StudyRecord = get_json(&t, id.as_str())?
            .ok_or_else(|| KeyServerError::NotFound(format!("study {}", id.as_str())))?;
        let rec = Arc::new(rec);
        self.cache_study(rec.clone());
        Ok(rec)
    }

    fn uncache_study(&self, id: &str) {
        self.inner
            .studies
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    fn cache_study(&self, rec: Arc<StudyRecord>) {
        // A study changes once at most, when it is forgotten: `forget_study`
        // then caches the tombstone, and every job that acts on a study
        // re-checks inside its write transaction (`forgotten_in_txn`), so a
        // stale cached copy can never lead to a derivation or a request.
        let mut c = self
            .inner
            .studies
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if c.len() >= STUDY_CACHE_MAX {
            c.clear();
        }
        c.insert(rec.id.clone(), rec);
    }

    /// An identity from a message, in the configured trust domain.
    fn identity(&self, field: &str, s: &str) -> Result<tessera_tls::Identity> {
        parse_identity(field, s, &self.inner.trust_domain)
    }

    /// A user identity from a message, in the configured trust domain.
    fn user_identity(&self, field: &str, s: &str) -> Result<tessera_tls::Identity> {
        parse_user_identity(field, s, &self.inner.trust_domain)
    }

    /// The break that blocks key operations, if the chain is broken.
    pub fn chain_break(&self) -> Option<ChainBreak> {
        self.inner
            .broken
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Fail closed: `FailedPrecondition` naming the first broken audit entry
    /// while the chain does not verify (see `keyserver audit-recover`).
    fn ensure_chain_intact(&self) -> Result<()> {
        match self.chain_break() {
            None => Ok(()),
            Some(b) => Err(KeyServerError::FailedPrecondition(format!(
                "audit chain broken at entry {} ({}); key operations are refused until an \
                 administrator runs `keyserver audit-recover --acknowledge-broken-at {}`",
                b.seq, b.problem, b.seq
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
