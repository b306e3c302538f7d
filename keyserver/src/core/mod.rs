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
//!   `grants.rs` (request, approve, deny, revoke), `grant_use.rs` (fetch,
//!   redeem, check),
//!   `delegates.rs`;
//! * the audit log: [`audit`] (entry format, hashing), [`writer`]
//!   (appending, checkpoints), [`chain`] (verification, recovery),
//!   `audit_view.rs` (reading it back);
//! * storage: [`kv`] (the table-store interface; redb here, PostgreSQL in
//!   `kv_pg.rs`), layout and records in [`store`]; identifiers: [`ids`];
//!   secrets: [`crypto`].
//!
//! This file holds the [`Core`] handle itself: opening the database, the
//! master secrets and the study cache.

pub mod access;
mod access_types;
pub mod attrs;
pub mod audit;
mod audit_view;
pub mod backend;
pub mod backup;
pub mod chain;
pub mod clock;
pub mod crypto;
mod delegates;
pub(crate) mod gate;
pub mod gauges;
pub mod grant_find;
mod grant_use;
mod grants;
pub mod ids;
pub mod kv;
mod kv_pg;
pub mod policy;
mod replica_feed;
pub mod store;
mod studies;
mod types;
pub mod webhook;
mod webhook_owner;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use ring::rand::SystemRandom;

use crate::error::{KeyServerError, Result};
use audit::{AuditEvent, NewEntry};
use backend::Store;
pub use backend::StoreAt;
use clock::Clock;
use crypto::{AuditSigner, Kek, Master, SIGNING_KEY_AAD, master_aad, random_secret};
use ids::{StudyId, parse_identity, parse_user_identity};
use kv::{KvRead, KvWrite};
use policy::Rules;
use store::{
    MASTERS, META, META_MASTER_CURRENT, META_PUBLIC_KEY, META_SIGNING_KEY, STUDIES, StudyRecord,
    get_bytes, get_json,
};
use writer::{ChainState, Writer, apply_in_txn};

pub use chain::{
    ChainBreak, RECOVERY_ACTOR, Recovery, recover_audit, recover_audit_in, verify_audit_file,
    verify_audit_in, verify_database, verify_database_tail,
};
use chain::{load_signer, mark_broken, verify_database_stoppable};
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
    /// Where the state lives.
    pub store: StoreAt,
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
    pub access: access_types::AccessConfig,
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
    store: Store,
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
    access: access_types::AccessConfig,
    /// The live feed of requests filed and decided (`WatchRequests`).
    events: tokio::sync::broadcast::Sender<access_types::AccessEvent>,
    /// This process among the replicas on a shared store (the feed's
    /// origin, so a replica does not hear its own events back).
    origin: String,
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
fn forgotten_in_txn(txn: &dyn KvWrite, study_id: &str) -> Result<bool> {
    Ok(get_json::<StudyRecord, _>(txn, STUDIES, study_id)?.is_some_and(|s| s.is_forgotten()))
}

/// The master secrets (unwrapped) and the current version, as stored.
fn load_masters(r: &dyn KvRead, kek: &Kek) -> Result<(BTreeMap<u32, Arc<Master>>, u32)> {
    let mut map = BTreeMap::new();
    r.scan_all(MASTERS, &mut |k, v| {
        let version = u32::try_from(k.num())
            .map_err(|_| KeyServerError::Corrupt(format!("master version {}", k.num())))?;
        let secret = kek.unwrap_secret(&master_aad(version), v)?;
        map.insert(version, Arc::new(Master::new(version, secret)?));
        Ok(true)
    })?;
    let current = get_bytes(r, META, META_MASTER_CURRENT)?
        .and_then(|b| b.as_slice().try_into().ok())
        .map(u32::from_be_bytes)
        .filter(|v| map.contains_key(v))
        .ok_or_else(|| KeyServerError::Corrupt("current master version".into()))?;
    Ok((map, current))
}

impl Core {
    /// Opens (or creates) the database: on first start generates master
    /// secret v1 and the audit signing key, both wrapped under the KEK.
    pub fn open(cfg: CoreConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let store = cfg.store.open()?;
        let rng = SystemRandom::new();
        let kek = Arc::new(cfg.kek);
        // One write transaction: on PostgreSQL it holds the chain lock, so
        // of replicas starting at once the first creates the signing key
        // and master v1 and the others load the same.
        let txn = store.write()?;
        let w = txn.as_write();
        let signer = match load_signer(w, &kek)? {
            Some(s) => s,
            None => {
                let (s, pkcs8) = AuditSigner::generate(&rng)?;
                let wrapped = kek.wrap(&rng, SIGNING_KEY_AAD, &pkcs8[..])?;
                w.put_str(META, META_SIGNING_KEY, wrapped.as_slice())?;
                w.put_str(META, META_PUBLIC_KEY, s.public_key().as_slice())?;
                s
            }
        };
        let mut chain = ChainState::load(w.read())?;
        let created = if w.len(MASTERS)? == 0 {
            let secret = random_secret(&rng)?;
            let wrapped = kek.wrap(&rng, &master_aad(1), &secret[..])?;
            w.put_num(MASTERS, 1, wrapped.as_slice())?;
            w.put_str(META, META_MASTER_CURRENT, 1u32.to_be_bytes().as_slice())?;
            true
        } else {
            false
        };
        if created {
            apply_in_txn(
                w,
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
        txn.commit()?;

        let (masters, current) = load_masters(store.read()?.as_ref(), &kek)?;
        let public_key = signer.public_key();
        // Fail closed: a chain that does not verify from its last signed
        // checkpoint on blocks every key operation from the first request.
        let tail = verify_database_tail(store.read()?.as_ref(), &public_key)?;
        let broken = Arc::new(RwLock::new(ChainBreak::from_report(&tail)));
        if let Some(b) = ChainBreak::from_report(&tail) {
            tracing::error!(seq = b.seq, problem = %b.problem, "audit chain broken at start: key operations refused");
        }
        let stop_verifier = Arc::new(AtomicBool::new(false));
        let verifier = {
            // The rest of the chain is checked in the background.
            let store = store.clone();
            let pk = public_key.clone();
            let broken = broken.clone();
            let stop = stop_verifier.clone();
            std::thread::Builder::new()
                .name("keyserver-audit-verify".into())
                .spawn(move || match store.read().and_then(|r| verify_database_stoppable(r.as_ref(), &pk, false, Some(&stop))) {
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
        let writer = Writer::start(store.clone(), signer, clock.clone(), cfg.checkpoint_every)?;
        let events = tokio::sync::broadcast::channel(1024).0;
        let origin = ids::random_hex(&rng)?;
        let feed = events.clone();
        replica_feed::listen(&store, origin.clone(), move |kind, owner, request| {
            // No watcher is not an error.
            let _ = feed.send(access_types::AccessEvent {
                kind,
                owner,
                request,
            });
        });
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                store,
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
                events,
                origin,
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

    /// Master version new studies get (as this process last saw it; see
    /// [`Core::current_master`]).
    pub fn current_master_version(&self) -> u32 {
        self.inner.current.load(Ordering::SeqCst)
    }

    /// The master new studies get. On a shared store another replica may
    /// have rotated: the versions are re-read first.
    fn current_master(&self) -> Result<Arc<Master>> {
        if self.inner.store.shared() {
            self.refresh_masters()?;
        }
        self.master(self.current_master_version())
    }

    /// Re-reads the master versions and the current one from the store.
    fn refresh_masters(&self) -> Result<()> {
        let (map, current) = load_masters(self.inner.store.read()?.as_ref(), &self.inner.kek)?;
        *self
            .inner
            .masters
            .write()
            .unwrap_or_else(PoisonError::into_inner) = map;
        self.inner.current.store(current, Ordering::SeqCst);
        Ok(())
    }

    fn master(&self, version: u32) -> Result<Arc<Master>> {
        let cached = || {
            self.inner
                .masters
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&version)
                .cloned()
        };
        if let Some(m) = cached() {
            return Ok(m);
        }
        // A version rotated in by another replica.
        if self.inner.store.shared() {
            self.refresh_masters()?;
        }
        cached().ok_or_else(|| KeyServerError::Corrupt(format!("unknown master version {version}")))
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
        let r = self.inner.store.read()?;
        let rec: StudyRecord = get_json(r.as_ref(), STUDIES, id.as_str())?
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
