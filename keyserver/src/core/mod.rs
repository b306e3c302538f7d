//! The keyserver core: master secrets, studies, derivation, key requests
//! and grants, and the audit log. No gRPC here; the service module converts
//! at the edge. Async only because callers wait for the group commit.

pub mod attrs;
pub mod audit;
pub mod backup;
pub mod chain;
pub mod clock;
pub mod crypto;
pub mod ids;
pub mod policy;
pub mod store;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction};
use ring::rand::SystemRandom;

use crate::error::{KeyServerError, Result};
use attrs::CanonicalAttributes;
use audit::{AuditEntry, AuditEvent, NewEntry, VerifyReport};
use clock::Clock;
use crypto::{
    AuditSigner, Kek, Master, SIGNING_KEY_AAD, SecretKey, grant_aad, master_aad, random_secret,
};
use ids::{RequestId, StudyId, parse_identity, parse_user_identity, validate_label, validate_text};
use policy::{Action, Refused, Rpc, Rules};
use store::{
    AUDIT, AUDIT_RECOVERIES, CHECKPOINTS, DELEGATES, Forgotten, GrantState, MASTERS, META,
    META_MASTER_CURRENT, META_PUBLIC_KEY, META_SIGNING_KEY, OWNER_STUDIES, REQUESTS, RequestRecord,
    STUDIES, STUDY_REQUESTS, StudyRecord, get_bytes, get_json, index_key, index_scan, to_json,
};
use writer::{ChainState, Writer, apply_in_txn};

pub use chain::{
    ChainBreak, RECOVERY_ACTOR, Recovery, recover_audit, verify_audit_file, verify_database,
    verify_database_tail,
};
use chain::{load_signer, mark_broken, verify_database_stoppable};

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
}

/// Why a trusted service derives a key (audit only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Not said.
    Unspecified,
    /// Protecting (encrypting) a study.
    Protect,
    /// Restoring (decrypting) a study.
    Restore,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Protect => "protect",
            Self::Restore => "restore",
        }
    }
}

/// A derived key (wiped from memory when dropped).
#[derive(Clone, PartialEq, Eq)]
pub struct Derived {
    /// 32 bytes.
    pub key: SecretKey,
    /// Master version it came from.
    pub master_version: u32,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Derived(v{}, <redacted>)", self.master_version)
    }
}

/// A key released to its requester (wiped from memory when dropped).
#[derive(Clone, PartialEq, Eq)]
pub struct Released {
    /// 32 bytes.
    pub key: SecretKey,
    /// Study.
    pub study_id: String,
    /// Purpose label.
    pub purpose: String,
    /// Master version.
    pub master_version: u32,
    /// Grant expiry, Unix seconds.
    pub expires_at: u64,
    /// Uses left after this one.
    pub uses_left: u32,
}

impl std::fmt::Debug for Released {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Released({}, uses_left={}, <redacted>)",
            self.study_id, self.uses_left
        )
    }
}

/// A grant the gateway redeemed (one use spent) or checked (nothing spent).
/// No key: the gateway serves the user itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    /// Study.
    pub study_id: String,
    /// Purpose label of the grant.
    pub purpose: String,
    /// Grant expiry, Unix seconds.
    pub expires_at: u64,
    /// Uses left (after this one, for a redemption).
    pub uses_left: u32,
}

/// What [`Core::forget_study`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForgetReport {
    /// Approved grants (valid, expired or used up) now revoked.
    pub grants_revoked: u32,
    /// Pending requests now denied.
    pub requests_denied: u32,
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

/// The audit entry of a refusal: caller, RPC, context and reason.
fn refusal_entry(actor: &str, rpc: Rpc, study: &str, detail: &str, reason: &str) -> NewEntry {
    let sep = if detail.is_empty() { "" } else { " " };
    NewEntry {
        actor: actor.to_owned(),
        event: rpc.refused_event(),
        study: study.to_owned(),
        detail: format!("rpc={}{sep}{detail} reason={reason}", rpc.name()),
    }
}

/// `study` if it is a well-formed study id, else empty (only parsed ids
/// reach the audit log).
fn audit_study(study_id: &str) -> String {
    StudyId::parse(study_id)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default()
}

fn denied(msg: &str) -> KeyServerError {
    KeyServerError::PermissionDenied(msg.to_owned())
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

/// Why `user` may not use the grant `rec` (for `study`, if said) at `now`:
/// [`policy::decide`] with [`Action::UseGrant`]; `None` when it may.
fn grant_refusal(
    rules: &Rules,
    caller: &str,
    rpc: Rpc,
    rec: &RequestRecord,
    user: &str,
    study: Option<&str>,
    now: u64,
) -> Option<String> {
    policy::decide(
        rules,
        caller,
        &Action::UseGrant {
            rpc,
            user,
            study,
            requester: &rec.requester,
            grant_study: &rec.study_id,
            state: &rec.state,
            now,
        },
    )
    .err()
    .map(|r| r.reason)
}

/// Drops the held key of a grant seen expired; true when `rec` changed and
/// must be written back.
fn drop_expired_key(rec: &mut RequestRecord, now: u64) -> bool {
    matches!(rec.state, GrantState::Approved { expires_at, .. } if now >= expires_at)
        && rec.wrapped_key.take().is_some()
}

/// Spends one use of a grant the policy accepted; returns
/// `(expires_at, uses_left)`. The held key goes with the last use.
fn take_use(rec: &mut RequestRecord) -> Result<(u64, u32)> {
    let GrantState::Approved {
        expires_at,
        uses_left,
        ..
    } = &mut rec.state
    else {
        return Err(KeyServerError::Corrupt(format!(
            "request {} is not approved",
            rec.id
        )));
    };
    *uses_left = uses_left
        .checked_sub(1)
        .ok_or_else(|| KeyServerError::Corrupt(format!("request {} has no use left", rec.id)))?;
    let out = (*expires_at, *uses_left);
    if out.1 == 0 {
        rec.wrapped_key = None;
    }
    Ok(out)
}

/// Most audit entries one [`Core::list_audit_page`] examines (an owner's
/// page skips the entries it may not see).
pub const AUDIT_SCAN_MAX: usize = 20_000;

/// Whose view of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditScope {
    /// An administrator: every entry.
    All,
    /// An owner: entries about its studies (and their requests) and the
    /// entries it made itself.
    Owner(String),
}

/// A page of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The entries.
    pub entries: Vec<AuditEntry>,
    /// First seq of the next page, 0 when the log ends here.
    pub next_from_seq: u64,
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
                },
                max_ttl: cfg.max_grant_ttl_secs,
                max_uses: cfg.max_grant_uses,
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

    async fn audit_only(&self, e: NewEntry) -> Result<()> {
        self.inner
            .writer
            .submit(move |ctx| {
                ctx.append(e)?;
                Ok(Ok(()))
            })
            .await
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

    /// Appends a refusal (caller, RPC, reason) to the audit chain, then
    /// returns its error. If the audit write fails the caller is refused all
    /// the same (and the failure logged).
    async fn refuse(
        &self,
        actor: &str,
        rpc: Rpc,
        study: &str,
        detail: &str,
        refused: Refused,
    ) -> KeyServerError {
        let entry = refusal_entry(actor, rpc, study, detail, &refused.reason);
        if let Err(e) = self.audit_only(entry).await {
            tracing::error!(error = %e, rpc = rpc.name(), caller = actor, "refusal not audited; refused anyway");
        }
        refused.into_error()
    }

    /// Appends a refusal of the authorization layer (caller, RPC, reason)
    /// to the chain; a failed write is logged (the call is refused anyway).
    pub async fn audit_access_refusal(&self, caller: &str, rpc: &str, reason: &str) {
        let entry = NewEntry {
            actor: caller.chars().take(256).collect(),
            event: AuditEvent::AccessRefused,
            study: String::new(),
            detail: format!(
                "rpc={} layer=authz reason={reason}",
                rpc.rsplit('/')
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(128)
                    .collect::<String>()
            ),
        };
        if let Err(e) = self.audit_only(entry).await {
            tracing::error!(error = %e, rpc, caller, "layer refusal not audited; refused anyway");
        }
    }

    /// The gate of every key operation: the chain must verify, then
    /// [`policy::decide`]; a refusal is audited before it is returned.
    async fn authorize(
        &self,
        actor: &str,
        action: Action<'_>,
        study: &str,
        detail: &str,
    ) -> Result<()> {
        self.ensure_chain_intact()?;
        match policy::decide(&self.inner.rules, actor, &action) {
            Ok(()) => Ok(()),
            Err(r) => Err(self.refuse(actor, action.rpc(), study, detail, r).await),
        }
    }

    /// Registers a study (gateway only). Returns the stored record.
    pub async fn register_study(
        &self,
        actor: &str,
        owner: &str,
        attributes: &[(String, String)],
        study_id: Option<&str>,
    ) -> Result<StudyRecord> {
        self.authorize(
            actor,
            Action::RegisterStudy,
            &audit_study(study_id.unwrap_or_default()),
            "",
        )
        .await?;
        self.user_identity("owner", owner)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let id = match study_id {
            Some(s) if !s.is_empty() => StudyId::parse(s)?,
            _ => StudyId::random(&self.inner.rng)?,
        };
        let master = self.master(self.current_master_version())?;
        // The salt is stored in clear beside the study; no need to wipe it.
        let salt = *random_secret(&self.inner.rng)?;
        let rec = StudyRecord {
            id: id.as_str().to_owned(),
            owner: owner.to_owned(),
            salt,
            commitment: master.commitment(id.as_str(), &salt, &attrs),
            master_version: master.version,
            created_at: 0,
            registered_by: actor.to_owned(),
            forgotten: None,
        };
        let actor = actor.to_owned();
        let stored = self
            .inner
            .writer
            .submit(move |ctx| {
                let mut rec = rec;
                rec.created_at = ctx.now_secs();
                let txn = ctx.txn;
                let mut studies = txn.open_table(STUDIES)?;
                if let Some(old) = get_json::<StudyRecord, _>(&studies, &rec.id)? {
                    let why = if old.is_forgotten() {
                        format!("study {} was deleted; its id cannot be reused", rec.id)
                    } else {
                        format!("study {}", rec.id)
                    };
                    return Ok(Err(KeyServerError::AlreadyExists(why)));
                }
                studies.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                let mut ix = txn.open_table(OWNER_STUDIES)?;
                ix.insert(index_key(&rec.owner, &rec.id).as_str(), ())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::StudyRegistered,
                    study: rec.id.clone(),
                    detail: format!("owner={} master_version={}", rec.owner, rec.master_version),
                })?;
                Ok(Ok(rec))
            })
            .await?;
        self.cache_study(Arc::new(stored.clone()));
        Ok(stored)
    }

    /// Checks attributes against the study; on mismatch audits `refused` and
    /// fails with [`KeyServerError::AttributeMismatch`].
    async fn check_attributes(
        &self,
        actor: &str,
        study: &StudyRecord,
        attrs: &CanonicalAttributes,
        refused: AuditEvent,
        detail: String,
    ) -> Result<Arc<Master>> {
        let master = self.master(study.master_version)?;
        if master.verify_commitment(&study.id, &study.salt, attrs, &study.commitment) {
            return Ok(master);
        }
        self.audit_only(NewEntry {
            actor: actor.to_owned(),
            event: refused,
            study: study.id.clone(),
            detail,
        })
        .await?;
        Err(KeyServerError::AttributeMismatch)
    }

    /// Derives a study key for a trusted service.
    pub async fn derive_key(
        &self,
        actor: &str,
        study_id: &str,
        attributes: &[(String, String)],
        purpose: &str,
        operation: Operation,
    ) -> Result<Derived> {
        let label = validate_label("purpose", purpose);
        let deriver = self.inner.rules.derivers.iter().any(|(d, _)| d == actor);
        // A malformed purpose from a deriver is bad input; from anyone else
        // the call is refused (and audited) before its input is looked at.
        if label.is_ok() || !deriver {
            let detail = if label.is_ok() {
                format!("purpose={purpose} operation={}", operation.as_str())
            } else {
                format!("operation={}", operation.as_str())
            };
            self.authorize(
                actor,
                Action::DeriveKey { purpose },
                &audit_study(study_id),
                &detail,
            )
            .await?;
        }
        label?;
        let id = StudyId::parse(study_id)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let study = self.study(&id)?;
        let detail = format!("purpose={purpose} operation={}", operation.as_str());
        let master = self
            .check_attributes(
                actor,
                &study,
                &attrs,
                AuditEvent::DeriveRefused,
                detail.clone(),
            )
            .await?;
        let key = master.derive_study_key(&study.salt, &study.id, &attrs, purpose)?;
        let entry = NewEntry {
            actor: actor.to_owned(),
            event: AuditEvent::KeyDerived,
            study: study.id.clone(),
            detail: format!("{detail} master_version={}", master.version),
        };
        let r = self
            .inner
            .writer
            .submit(move |ctx| {
                if forgotten_in_txn(ctx.txn, &entry.study)? {
                    return Ok(Err(deleted(&entry.study)));
                }
                ctx.append(entry)?;
                Ok(Ok(()))
            })
            .await;
        if let Err(e) = r {
            if matches!(e, KeyServerError::NotFound(_)) {
                self.uncache_study(id.as_str());
            }
            return Err(e);
        }
        Ok(Derived {
            key,
            master_version: master.version,
        })
    }

    /// A user (or the gateway on a user's behalf) requests a study key.
    pub async fn request_key(
        &self,
        actor: &str,
        study_id: &str,
        attributes: &[(String, String)],
        purpose: &str,
        justification: &str,
        on_behalf_of: &str,
    ) -> Result<RequestRecord> {
        let for_user = if self.user_identity("on_behalf_of", on_behalf_of).is_ok() {
            format!("on_behalf_of={on_behalf_of}")
        } else {
            String::new()
        };
        self.authorize(
            actor,
            Action::RequestKey { on_behalf_of },
            &audit_study(study_id),
            &for_user,
        )
        .await?;
        let id = StudyId::parse(study_id)?;
        validate_label("purpose", purpose)?;
        validate_text("justification", justification)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let requester = if on_behalf_of.is_empty() {
            actor.to_owned()
        } else {
            self.user_identity("on_behalf_of", on_behalf_of)?;
            on_behalf_of.to_owned()
        };
        let study = self.study(&id)?;
        let master = self
            .check_attributes(
                actor,
                &study,
                &attrs,
                AuditEvent::RequestRefused,
                format!("requester={requester} purpose={purpose}"),
            )
            .await?;
        let key = master.derive_study_key(&study.salt, &study.id, &attrs, purpose)?;
        let rid = RequestId::random(&self.inner.rng)?;
        let wrapped = self
            .inner
            .kek
            .wrap(&self.inner.rng, &grant_aad(rid.as_str()), &key[..])?;
        let rec = RequestRecord {
            id: rid.as_str().to_owned(),
            study_id: study.id.clone(),
            requester,
            presented_by: actor.to_owned(),
            purpose: purpose.to_owned(),
            justification: justification.to_owned(),
            created_at: 0,
            master_version: master.version,
            state: GrantState::Pending,
            wrapped_key: Some(wrapped),
        };
        let r = self
            .inner
            .writer
            .submit(move |ctx| {
                let mut rec = rec;
                rec.created_at = ctx.now_secs();
                let txn = ctx.txn;
                if forgotten_in_txn(txn, &rec.study_id)? {
                    return Ok(Err(deleted(&rec.study_id)));
                }
                let mut reqs = txn.open_table(REQUESTS)?;
                reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                let mut ix = txn.open_table(STUDY_REQUESTS)?;
                ix.insert(index_key(&rec.study_id, &rec.id).as_str(), ())?;
                ctx.append(NewEntry {
                    actor: rec.presented_by.clone(),
                    event: AuditEvent::KeyRequested,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={} purpose={}",
                        rec.id, rec.requester, rec.purpose
                    ),
                })?;
                rec.wrapped_key = None;
                Ok(Ok(rec))
            })
            .await;
        if matches!(r, Err(KeyServerError::NotFound(_))) {
            self.uncache_study(id.as_str());
        }
        r
    }

    /// The owner lists requests on its studies (one study if `study_id` is
    /// not empty). Pending only unless `include_decided`.
    pub fn list_requests(
        &self,
        actor: &str,
        study_id: &str,
        include_decided: bool,
    ) -> Result<Vec<RequestRecord>> {
        let studies = if study_id.is_empty() {
            let r = self.inner.db.begin_read()?;
            index_scan(&r.open_table(OWNER_STUDIES)?, actor)?
        } else {
            let id = StudyId::parse(study_id)?;
            if self.study_any(&id)?.owner != actor {
                return Err(denied("only the study owner lists its requests"));
            }
            vec![id.as_str().to_owned()]
        };
        let r = self.inner.db.begin_read()?;
        let ix = r.open_table(STUDY_REQUESTS)?;
        let reqs = r.open_table(REQUESTS)?;
        let mut out = Vec::new();
        for s in studies {
            for rid in index_scan(&ix, &s)? {
                if let Some(mut rec) = get_json::<RequestRecord, _>(&reqs, &rid)?
                    && (include_decided || rec.state == GrantState::Pending)
                {
                    rec.wrapped_key = None;
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        out.truncate(LIST_MAX);
        Ok(out)
    }

    /// Shared frame of approve / deny / revoke: loads the request and its
    /// study inside the write transaction and asks [`policy::decide`] (owner
    /// only, never one's own request, decided once); a refusal is appended
    /// to the audit chain in that transaction, before the reply.
    async fn decide<F>(
        &self,
        rpc: Rpc,
        actor: &str,
        request_id: &str,
        f: F,
    ) -> Result<RequestRecord>
    where
        F: FnOnce(&mut writer::TxnCtx<'_>, &mut RequestRecord, &str) -> Result<Result<NewEntry>>
            + Send
            + 'static,
    {
        self.ensure_chain_intact()?;
        let rid = RequestId::parse(request_id)?;
        let actor = actor.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut reqs = txn.open_table(REQUESTS)?;
                let Some(mut rec) = get_json::<RequestRecord, _>(&reqs, rid.as_str())? else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "request {}",
                        rid.as_str()
                    ))));
                };
                let owner = {
                    let studies = txn.open_table(STUDIES)?;
                    get_json::<StudyRecord, _>(&studies, &rec.study_id)?
                        .ok_or_else(|| KeyServerError::Corrupt(format!("study {}", rec.study_id)))?
                        .owner
                };
                let action = Action::Decide {
                    rpc,
                    owner: &owner,
                    requester: &rec.requester,
                    state: &rec.state,
                };
                if let Err(r) = policy::decide(&rules, &actor, &action) {
                    ctx.append(refusal_entry(
                        &actor,
                        rpc,
                        &rec.study_id,
                        &format!("request={}", rec.id),
                        &r.reason,
                    ))?;
                    return Ok(Err(r.into_error()));
                }
                let entry = match f(ctx, &mut rec, &actor)? {
                    Ok(e) => e,
                    Err(e) => return Ok(Err(e)),
                };
                reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                ctx.append(entry)?;
                rec.wrapped_key = None;
                Ok(Ok(rec))
            })
            .await
    }

    /// The owner approves a pending request (never its own).
    pub async fn approve(
        &self,
        actor: &str,
        request_id: &str,
        ttl_secs: u64,
        uses: u32,
    ) -> Result<RequestRecord> {
        if ttl_secs == 0 || ttl_secs > self.inner.max_ttl {
            return Err(KeyServerError::InvalidArgument(format!(
                "ttl_seconds must be 1..={}",
                self.inner.max_ttl
            )));
        }
        if uses == 0 || uses > self.inner.max_uses {
            return Err(KeyServerError::InvalidArgument(format!(
                "uses must be 1..={}",
                self.inner.max_uses
            )));
        }
        self.decide(
            Rpc::ApproveRequest,
            actor,
            request_id,
            move |ctx, rec, actor| {
                let now = ctx.now_secs();
                let expires_at = now.saturating_add(ttl_secs);
                rec.state = GrantState::Approved {
                    by: actor.to_owned(),
                    at: now,
                    expires_at,
                    uses_granted: uses,
                    uses_left: uses,
                };
                Ok(Ok(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::GrantApproved,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={} expires_at={expires_at} uses={uses}",
                        rec.id, rec.requester
                    ),
                }))
            },
        )
        .await
    }

    /// The owner denies a pending request.
    pub async fn deny(&self, actor: &str, request_id: &str, reason: &str) -> Result<RequestRecord> {
        validate_text("reason", reason)?;
        let reason = reason.to_owned();
        self.decide(
            Rpc::DenyRequest,
            actor,
            request_id,
            move |ctx, rec, actor| {
                rec.state = GrantState::Denied {
                    by: actor.to_owned(),
                    at: ctx.now_secs(),
                    reason,
                };
                rec.wrapped_key = None;
                Ok(Ok(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::RequestDenied,
                    study: rec.study_id.clone(),
                    detail: format!("request={} requester={}", rec.id, rec.requester),
                }))
            },
        )
        .await
    }

    /// The owner revokes an approved grant.
    pub async fn revoke(
        &self,
        actor: &str,
        request_id: &str,
        reason: &str,
    ) -> Result<RequestRecord> {
        validate_text("reason", reason)?;
        let reason = reason.to_owned();
        self.decide(
            Rpc::RevokeGrant,
            actor,
            request_id,
            move |ctx, rec, actor| {
                // `policy::decide` admitted only an approved grant.
                let GrantState::Approved {
                    expires_at,
                    uses_granted,
                    uses_left,
                    ..
                } = rec.state
                else {
                    return Err(KeyServerError::Corrupt(format!(
                        "request {} is not approved",
                        rec.id
                    )));
                };
                rec.state = GrantState::Revoked {
                    by: actor.to_owned(),
                    at: ctx.now_secs(),
                    reason,
                    expires_at,
                    uses_granted,
                    uses_left,
                };
                rec.wrapped_key = None;
                Ok(Ok(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::GrantRevoked,
                    study: rec.study_id.clone(),
                    detail: format!("request={} requester={}", rec.id, rec.requester),
                }))
            },
        )
        .await
    }

    /// The requester fetches its key while the grant is valid; uses one use.
    pub async fn fetch_key(&self, actor: &str, request_id: &str) -> Result<Released> {
        self.ensure_chain_intact()?;
        let rid = RequestId::parse(request_id)?;
        let actor = actor.to_owned();
        let kek = self.inner.kek.clone();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut reqs = txn.open_table(REQUESTS)?;
                let Some(mut rec) = get_json::<RequestRecord, _>(&reqs, rid.as_str())? else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "request {}",
                        rid.as_str()
                    ))));
                };
                let now = ctx.now_secs();
                let refusal = grant_refusal(&rules, &actor, Rpc::FetchKey, &rec, &actor, None, now);
                if let Some(why) = refusal {
                    if drop_expired_key(&mut rec, now) {
                        reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                    }
                    ctx.append(NewEntry {
                        actor,
                        event: AuditEvent::FetchRefused,
                        study: rec.study_id.clone(),
                        detail: format!("request={} reason={why}", rec.id),
                    })?;
                    return Ok(Err(denied(&why)));
                }
                let wrapped = rec.wrapped_key.clone().ok_or_else(|| {
                    KeyServerError::Corrupt(format!("request {} holds no key", rec.id))
                })?;
                let key = kek.unwrap_secret(&grant_aad(&rec.id), &wrapped)?;
                let (expires_at, uses_left) = take_use(&mut rec)?;
                reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::KeyReleased,
                    study: rec.study_id.clone(),
                    detail: format!("request={} uses_left={uses_left}", rec.id),
                })?;
                Ok(Ok(Released {
                    key,
                    study_id: rec.study_id,
                    purpose: rec.purpose,
                    master_version: rec.master_version,
                    expires_at,
                    uses_left,
                }))
            })
            .await
    }

    /// Refuses (and audits) any caller but the gateway. Only ids that parse
    /// reach the audit record.
    async fn gateway_only(
        &self,
        actor: &str,
        rpc: Rpc,
        op: &str,
        study_id: &str,
        request_id: Option<&str>,
    ) -> Result<()> {
        let request = request_id
            .and_then(|r| RequestId::parse(r).ok())
            .map(|r| format!(" request={}", r.as_str()))
            .unwrap_or_default();
        self.authorize(
            actor,
            Action::GatewayOnly(rpc),
            &audit_study(study_id),
            &format!("op={op}{request}"),
        )
        .await
    }

    /// Gateway only: spends one use of `on_behalf_of`'s grant on `study_id`
    /// (same checks as [`Core::fetch_key`] with `on_behalf_of` as the
    /// requester, plus the study must match). No key leaves the keyserver.
    /// Audited as `grant.redeemed`; refusals as `redeem.refused`.
    pub async fn redeem_grant(
        &self,
        actor: &str,
        request_id: &str,
        on_behalf_of: &str,
        study_id: &str,
    ) -> Result<Redeemed> {
        self.gateway_only(
            actor,
            Rpc::RedeemGrant,
            "redeem grants",
            study_id,
            Some(request_id),
        )
        .await?;
        let rid = RequestId::parse(request_id)?;
        let sid = StudyId::parse(study_id)?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let actor = actor.to_owned();
        let requester = on_behalf_of.to_owned();
        let rules = self.inner.rules.clone();
        self.inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut reqs = txn.open_table(REQUESTS)?;
                let Some(mut rec) = get_json::<RequestRecord, _>(&reqs, rid.as_str())? else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "request {}",
                        rid.as_str()
                    ))));
                };
                let now = ctx.now_secs();
                if let Some(why) = grant_refusal(
                    &rules,
                    &actor,
                    Rpc::RedeemGrant,
                    &rec,
                    &requester,
                    Some(sid.as_str()),
                    now,
                ) {
                    if drop_expired_key(&mut rec, now) {
                        reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                    }
                    let other = if rec.study_id == sid.as_str() {
                        String::new()
                    } else {
                        format!(" asked_study={}", sid.as_str())
                    };
                    ctx.append(NewEntry {
                        actor,
                        event: AuditEvent::RedeemRefused,
                        study: rec.study_id.clone(),
                        detail: format!(
                            "op=redeem request={} requester={requester}{other} reason={why}",
                            rec.id
                        ),
                    })?;
                    return Ok(Err(denied(&why)));
                }
                let (expires_at, uses_left) = take_use(&mut rec)?;
                reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::GrantRedeemed,
                    study: rec.study_id.clone(),
                    detail: format!(
                        "request={} requester={requester} purpose={} uses_left={uses_left}",
                        rec.id, rec.purpose
                    ),
                })?;
                Ok(Ok(Redeemed {
                    study_id: rec.study_id,
                    purpose: rec.purpose,
                    expires_at,
                    uses_left,
                }))
            })
            .await
    }

    /// Gateway only: would [`Core::redeem_grant`] succeed now? Spends
    /// nothing and, being a read, writes no audit record, neither on success
    /// nor when the grant is not usable (the gateway must still redeem, which
    /// is audited, before serving anyone). A caller other than the gateway is
    /// refused and that refusal is audited (`redeem.refused`, `op=check`).
    pub async fn check_grant(
        &self,
        actor: &str,
        request_id: &str,
        on_behalf_of: &str,
        study_id: &str,
    ) -> Result<Redeemed> {
        self.gateway_only(
            actor,
            Rpc::CheckGrant,
            "check grants",
            study_id,
            Some(request_id),
        )
        .await?;
        let rid = RequestId::parse(request_id)?;
        let sid = StudyId::parse(study_id)?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let rec = {
            let r = self.inner.db.begin_read()?;
            get_json::<RequestRecord, _>(&r.open_table(REQUESTS)?, rid.as_str())?
                .ok_or_else(|| KeyServerError::NotFound(format!("request {}", rid.as_str())))?
        };
        let now = self.inner.clock.now_ms() / 1000;
        if let Some(why) = grant_refusal(
            &self.inner.rules,
            actor,
            Rpc::CheckGrant,
            &rec,
            on_behalf_of,
            Some(sid.as_str()),
            now,
        ) {
            return Err(denied(&why));
        }
        let GrantState::Approved {
            expires_at,
            uses_left,
            ..
        } = rec.state
        else {
            return Err(KeyServerError::Corrupt(format!(
                "request {} is not approved",
                rec.id
            )));
        };
        Ok(Redeemed {
            study_id: rec.study_id,
            purpose: rec.purpose,
            expires_at,
            uses_left,
        })
    }

    /// Gateway only, for the study's owner `on_behalf_of`: crypto-shredding.
    /// The study's salt and attribute commitment are overwritten (without
    /// them no key of the study can be derived again, even with the master
    /// secret and the attributes), a tombstone keeps the id so it is never
    /// registered again and lookups say "study was deleted", every approved
    /// grant is revoked and every pending request denied, and every held
    /// wrapped key is dropped; one `study.forgotten` audit record, in the
    /// same transaction. A second call answers `NotFound`.
    pub async fn forget_study(
        &self,
        actor: &str,
        study_id: &str,
        on_behalf_of: &str,
    ) -> Result<ForgetReport> {
        self.gateway_only(actor, Rpc::ForgetStudy, "forget studies", study_id, None)
            .await?;
        let sid = StudyId::parse(study_id)?;
        self.user_identity("on_behalf_of", on_behalf_of)?;
        let actor = actor.to_owned();
        let asker = on_behalf_of.to_owned();
        let rules = self.inner.rules.clone();
        let (report, tombstone) = self
            .inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let now = ctx.now_secs();
                let mut studies = txn.open_table(STUDIES)?;
                let Some(mut study) = get_json::<StudyRecord, _>(&studies, sid.as_str())? else {
                    return Ok(Err(KeyServerError::NotFound(format!(
                        "study {}",
                        sid.as_str()
                    ))));
                };
                if study.is_forgotten() {
                    return Ok(Err(deleted(&study.id)));
                }
                let action = Action::Forget {
                    owner: &study.owner,
                    on_behalf_of: &asker,
                };
                if let Err(r) = policy::decide(&rules, &actor, &action) {
                    ctx.append(refusal_entry(
                        &actor,
                        Rpc::ForgetStudy,
                        &study.id,
                        &format!("on_behalf_of={asker}"),
                        &r.reason,
                    ))?;
                    return Ok(Err(r.into_error()));
                }
                study.salt = [0u8; 32];
                study.commitment = [0u8; 32];
                study.forgotten = Some(Forgotten {
                    at: now,
                    by: actor.clone(),
                    on_behalf_of: asker.clone(),
                });
                studies.insert(study.id.as_str(), to_json(&study)?.as_slice())?;
                let rids = index_scan(&txn.open_table(STUDY_REQUESTS)?, &study.id)?;
                let mut reqs = txn.open_table(REQUESTS)?;
                let mut report = ForgetReport {
                    grants_revoked: 0,
                    requests_denied: 0,
                };
                let reason = "study forgotten".to_owned();
                for rid in rids {
                    let mut rec = get_json::<RequestRecord, _>(&reqs, &rid)?.ok_or_else(|| {
                        KeyServerError::Corrupt(format!("indexed request {rid} is missing"))
                    })?;
                    let mut changed = rec.wrapped_key.take().is_some();
                    match rec.state {
                        GrantState::Pending => {
                            rec.state = GrantState::Denied {
                                by: actor.clone(),
                                at: now,
                                reason: reason.clone(),
                            };
                            report.requests_denied = report.requests_denied.saturating_add(1);
                            changed = true;
                        }
                        GrantState::Approved {
                            expires_at,
                            uses_granted,
                            uses_left,
                            ..
                        } => {
                            rec.state = GrantState::Revoked {
                                by: actor.clone(),
                                at: now,
                                reason: reason.clone(),
                                expires_at,
                                uses_granted,
                                uses_left,
                            };
                            report.grants_revoked = report.grants_revoked.saturating_add(1);
                            changed = true;
                        }
                        GrantState::Denied { .. } | GrantState::Revoked { .. } => {}
                    }
                    if changed {
                        reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                    }
                }
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::StudyForgotten,
                    study: study.id.clone(),
                    detail: format!(
                        "on_behalf_of={asker} grants_revoked={} requests_denied={}",
                        report.grants_revoked, report.requests_denied
                    ),
                })?;
                Ok(Ok((report, study)))
            })
            .await?;
        self.cache_study(Arc::new(tombstone));
        Ok(report)
    }

    /// Adds a master secret version; new studies use it, old ones keep theirs.
    pub async fn rotate_master(&self, actor: &str) -> Result<u32> {
        self.ensure_chain_intact()?;
        let secret = random_secret(&self.inner.rng)?;
        let to_wrap = secret.clone();
        let kek = self.inner.kek.clone();
        let actor = actor.to_owned();
        let version = self
            .inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut masters = txn.open_table(MASTERS)?;
                let next = masters.last()?.map_or(1, |(k, _)| k.value() + 1);
                let wrapped = kek.wrap(&SystemRandom::new(), &master_aad(next), &to_wrap[..])?;
                masters.insert(next, wrapped.as_slice())?;
                let mut meta = txn.open_table(META)?;
                meta.insert(META_MASTER_CURRENT, next.to_be_bytes().as_slice())?;
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::MasterRotated,
                    study: String::new(),
                    detail: format!("master_version={next}"),
                })?;
                Ok(Ok(next))
            })
            .await?;
        self.inner
            .masters
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(version, Arc::new(Master::new(version, secret)?));
        self.inner.current.store(version, Ordering::SeqCst);
        Ok(version)
    }

    /// The owner `actor` lets `delegate` store studies on its behalf (the
    /// gateway asks [`Core::check_delegate`]). Audited as `delegate.added`.
    pub async fn add_delegate(&self, actor: &str, delegate: &str) -> Result<()> {
        self.change_delegate(actor, delegate, true).await
    }

    /// The owner `actor` withdraws `delegate`. Audited as `delegate.removed`.
    pub async fn remove_delegate(&self, actor: &str, delegate: &str) -> Result<()> {
        self.change_delegate(actor, delegate, false).await
    }

    async fn change_delegate(&self, actor: &str, delegate: &str, add: bool) -> Result<()> {
        self.ensure_chain_intact()?;
        self.identity("delegate", delegate)?;
        if delegate == actor {
            return Err(KeyServerError::InvalidArgument(
                "delegate: an owner is not its own delegate".into(),
            ));
        }
        let owner = actor.to_owned();
        let delegate = delegate.to_owned();
        self.inner
            .writer
            .submit(move |ctx| {
                let key = index_key(&owner, &delegate);
                let mut t = ctx.txn.open_table(DELEGATES)?;
                let present = t.get(key.as_str())?.is_some();
                let event = match (add, present) {
                    (true, true) => {
                        return Ok(Err(KeyServerError::AlreadyExists(format!(
                            "{delegate} is already a delegate"
                        ))));
                    }
                    (false, false) => {
                        return Ok(Err(KeyServerError::NotFound(format!(
                            "{delegate} is not a delegate"
                        ))));
                    }
                    (true, false) => {
                        t.insert(key.as_str(), ())?;
                        AuditEvent::DelegateAdded
                    }
                    (false, true) => {
                        t.remove(key.as_str())?;
                        AuditEvent::DelegateRemoved
                    }
                };
                drop(t);
                ctx.append(NewEntry {
                    actor: owner,
                    event,
                    study: String::new(),
                    detail: format!("delegate={delegate}"),
                })?;
                Ok(Ok(()))
            })
            .await
    }

    /// The delegates of the owner `actor`, sorted.
    pub fn list_delegates(&self, actor: &str) -> Result<Vec<String>> {
        let r = self.inner.db.begin_read()?;
        index_scan(&r.open_table(DELEGATES)?, actor)
    }

    /// Gateway only: may `delegate` store studies on `owner`'s behalf? A
    /// read (not audited unless the caller is not the gateway).
    pub async fn check_delegate(&self, actor: &str, owner: &str, delegate: &str) -> Result<bool> {
        self.gateway_only(actor, Rpc::CheckDelegate, "check delegates", "", None)
            .await?;
        self.identity("owner", owner)?;
        self.identity("delegate", delegate)?;
        let r = self.inner.db.begin_read()?;
        let t = r.open_table(DELEGATES)?;
        Ok(t.get(index_key(owner, delegate).as_str())?.is_some())
    }

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
        let owned: Option<std::collections::HashSet<String>> = match scope {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::ManualClock;
    use redb::ReadOnlyDatabase;
    use std::path::Path;

    const GW: &str = "spiffe://tessera.local/service/gateway";
    const WM: &str = "spiffe://tessera.local/service/watermark";
    const STORAGE: &str = "spiffe://tessera.local/service/storage-1";
    const OWNER: &str = "spiffe://tessera.local/user/owner";
    const CLIN: &str = "spiffe://tessera.local/user/clinician";
    const CLIN2: &str = "spiffe://tessera.local/user/clinician2";

    fn attrs(id: &str) -> Vec<(String, String)> {
        vec![
            ("patient_id".into(), id.into()),
            ("birth_date".into(), "19700101".into()),
        ]
    }

    fn open_with(path: &Path, kek: [u8; 32], clock: Arc<dyn Clock>, every: u64) -> Result<Core> {
        Core::open(
            CoreConfig {
                db_path: path.to_owned(),
                kek: Kek::from_bytes(&kek)?,
                trust_domain: "tessera.local".into(),
                gateway_identity: GW.into(),
                derivers: vec![(GW.into(), vec!["*".into()]), (WM.into(), vec!["*".into()])],
                checkpoint_every: every,
                max_grant_ttl_secs: 3600,
                max_grant_uses: 10,
            },
            clock,
        )
    }

    fn setup() -> (tempfile::TempDir, Arc<ManualClock>, Core) {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::at_secs(1_000_000));
        let core = open_with(&dir.path().join("ks.redb"), [7; 32], clock.clone(), 3).unwrap();
        (dir, clock, core)
    }

    fn events(core: &Core) -> Vec<String> {
        core.list_audit(1, 10_000)
            .unwrap()
            .into_iter()
            .map(|e| e.event)
            .collect()
    }

    #[tokio::test]
    async fn full_key_flow() {
        let (_dir, _clock, core) = setup();
        assert!(matches!(
            core.register_study(CLIN, OWNER, &attrs("P1"), None).await,
            Err(KeyServerError::PermissionDenied(_))
        ));
        let study = core
            .register_study(GW, OWNER, &attrs("P1"), None)
            .await
            .unwrap();
        assert_eq!(study.master_version, 1);
        let derived = core
            .derive_key(GW, &study.id, &attrs("P1"), "pixels", Operation::Protect)
            .await
            .unwrap();
        let again = core
            .derive_key(WM, &study.id, &attrs("P1"), "pixels", Operation::Restore)
            .await
            .unwrap();
        assert_eq!(derived, again);
        assert!(matches!(
            core.derive_key(GW, &study.id, &attrs("P2"), "pixels", Operation::Protect)
                .await,
            Err(KeyServerError::AttributeMismatch)
        ));
        assert!(matches!(
            core.derive_key(
                STORAGE,
                &study.id,
                &attrs("P1"),
                "pixels",
                Operation::Protect
            )
            .await,
            Err(KeyServerError::PermissionDenied(_))
        ));

        assert!(matches!(
            core.request_key(CLIN, &study.id, &attrs("P9"), "pixels", "", "")
                .await,
            Err(KeyServerError::AttributeMismatch)
        ));
        let req = core
            .request_key(
                CLIN,
                &study.id,
                &attrs("P1"),
                "pixels",
                "second opinion",
                "",
            )
            .await
            .unwrap();
        assert_eq!(req.state, GrantState::Pending);
        assert!(req.wrapped_key.is_none(), "never hand out the wrapped key");
        assert!(matches!(
            core.fetch_key(CLIN, &req.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("pending")
        ));

        let listed = core.list_requests(OWNER, "", false).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, req.id);
        assert!(core.list_requests(CLIN, "", false).unwrap().is_empty());
        assert!(matches!(
            core.list_requests(CLIN, &study.id, false),
            Err(KeyServerError::PermissionDenied(_))
        ));

        assert!(matches!(
            core.approve(CLIN, &req.id, 60, 1).await,
            Err(KeyServerError::PermissionDenied(_))
        ));
        assert!(matches!(
            core.approve(OWNER, &req.id, 0, 1).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.approve(OWNER, &req.id, 60, 11).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        let approved = core.approve(OWNER, &req.id, 60, 1).await.unwrap();
        assert!(matches!(
            approved.state,
            GrantState::Approved { uses_left: 1, .. }
        ));
        assert!(matches!(
            core.approve(OWNER, &req.id, 60, 1).await,
            Err(KeyServerError::FailedPrecondition(_))
        ));

        assert!(matches!(
            core.fetch_key(CLIN2, &req.id).await,
            Err(KeyServerError::PermissionDenied(_))
        ));
        let released = core.fetch_key(CLIN, &req.id).await.unwrap();
        assert_eq!(released.key, derived.key);
        assert_eq!(released.uses_left, 0);
        assert!(matches!(
            core.fetch_key(CLIN, &req.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("used up")
        ));
        assert!(core.list_requests(OWNER, "", false).unwrap().is_empty());
        assert_eq!(core.list_requests(OWNER, &study.id, true).unwrap().len(), 1);

        let ev = events(&core);
        for want in [
            "master.created",
            "study.registered",
            "key.derived",
            "derive.refused",
            "request.refused",
            "key.requested",
            "fetch.refused",
            "grant.approved",
            "key.released",
        ] {
            assert!(ev.iter().any(|e| e == want), "{want} missing from {ev:?}");
        }
        let rep = core.verify_audit().unwrap();
        assert!(rep.ok, "{rep:?}");
        assert_eq!(rep.entries, ev.len() as u64);
        assert!(rep.checkpoints_verified >= 3);
    }

    #[tokio::test]
    async fn expiry_uses_the_injected_clock() {
        let (_dir, clock, core) = setup();
        let study = core
            .register_study(GW, OWNER, &attrs("P1"), None)
            .await
            .unwrap();
        let req = core
            .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &req.id, 10, 5).await.unwrap();
        assert_eq!(core.fetch_key(CLIN, &req.id).await.unwrap().uses_left, 4);
        clock.advance_secs(10);
        assert!(matches!(
            core.fetch_key(CLIN, &req.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("expired")
        ));
    }

    #[tokio::test]
    async fn self_approval_deny_and_revoke() {
        let (_dir, _clock, core) = setup();
        let study = core
            .register_study(GW, OWNER, &attrs("P1"), None)
            .await
            .unwrap();
        let own = core
            .request_key(OWNER, &study.id, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        assert!(matches!(
            core.approve(OWNER, &own.id, 60, 1).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("own request")
        ));
        assert!(events(&core).iter().any(|e| e == "approval.refused"));

        let r1 = core
            .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        assert!(matches!(
            core.revoke(OWNER, &r1.id, "").await,
            Err(KeyServerError::FailedPrecondition(_))
        ));
        let denied_rec = core.deny(OWNER, &r1.id, "not needed").await.unwrap();
        assert!(matches!(denied_rec.state, GrantState::Denied { .. }));
        assert!(matches!(
            core.fetch_key(CLIN, &r1.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("denied")
        ));

        let r2 = core
            .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &r2.id, 60, 3).await.unwrap();
        core.fetch_key(CLIN, &r2.id).await.unwrap();
        assert!(matches!(
            core.revoke(CLIN, &r2.id, "").await,
            Err(KeyServerError::PermissionDenied(_))
        ));
        core.revoke(OWNER, &r2.id, "left the team").await.unwrap();
        assert!(matches!(
            core.fetch_key(CLIN, &r2.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("revoked")
        ));
        let ev = events(&core);
        assert!(ev.iter().any(|e| e == "request.denied"));
        assert!(ev.iter().any(|e| e == "grant.revoked"));
        assert!(core.verify_audit().unwrap().ok);
    }

    #[tokio::test]
    async fn gateway_presents_attributes_for_a_user() {
        let (_dir, _clock, core) = setup();
        let study = core
            .register_study(GW, OWNER, &attrs("P1"), None)
            .await
            .unwrap();
        assert!(matches!(
            core.request_key(CLIN2, &study.id, &attrs("P1"), "pixels", "", CLIN)
                .await,
            Err(KeyServerError::PermissionDenied(_))
        ));
        assert!(matches!(
            core.request_key(GW, &study.id, &attrs("P1"), "pixels", "", "not-an-identity")
                .await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        let req = core
            .request_key(GW, &study.id, &attrs("P1"), "pixels", "restore", CLIN)
            .await
            .unwrap();
        assert_eq!(req.requester, CLIN);
        assert_eq!(req.presented_by, GW);
        core.approve(OWNER, &req.id, 60, 1).await.unwrap();
        assert!(
            core.fetch_key(GW, &req.id).await.is_err(),
            "only the requester fetches"
        );
        core.fetch_key(CLIN, &req.id).await.unwrap();
    }

    #[tokio::test]
    async fn bad_ids_and_unknown_objects() {
        let (_dir, _clock, core) = setup();
        assert!(matches!(
            core.derive_key(GW, "nope", &attrs("P1"), "pixels", Operation::Protect)
                .await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        let unknown = "st-00000000000000000000000000000000";
        assert!(matches!(
            core.derive_key(GW, unknown, &attrs("P1"), "pixels", Operation::Protect)
                .await,
            Err(KeyServerError::NotFound(_))
        ));
        assert!(matches!(
            core.fetch_key(CLIN, "rq-00000000000000000000000000000000")
                .await,
            Err(KeyServerError::NotFound(_))
        ));
        assert!(matches!(
            core.approve(OWNER, "rq-0", 1, 1).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        let s = core
            .register_study(GW, OWNER, &attrs("P1"), Some(unknown))
            .await
            .unwrap();
        assert_eq!(s.id, unknown);
        assert!(matches!(
            core.register_study(GW, OWNER, &attrs("P1"), Some(unknown))
                .await,
            Err(KeyServerError::AlreadyExists(_))
        ));
        assert!(matches!(
            core.register_study(GW, "owner", &attrs("P1"), None).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
    }

    #[tokio::test]
    async fn one_use_is_released_once_under_concurrency() {
        let (_dir, _clock, core) = setup();
        let study = core
            .register_study(GW, OWNER, &attrs("P1"), None)
            .await
            .unwrap();
        let req = core
            .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &req.id, 60, 1).await.unwrap();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let core = core.clone();
                let id = req.id.clone();
                tokio::spawn(async move { core.fetch_key(CLIN, &id).await.is_ok() })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        assert_eq!(ok, 1);
    }

    #[tokio::test]
    async fn rotation_keeps_old_studies_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.redb");
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_secs(5));
        let core = open_with(&path, [1; 32], clock.clone(), 0).unwrap();
        let a = core
            .register_study(GW, OWNER, &attrs("A"), None)
            .await
            .unwrap();
        let ka = core
            .derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Protect)
            .await
            .unwrap();
        assert_eq!(
            core.rotate_master("spiffe://tessera.local/user/admin")
                .await
                .unwrap(),
            2
        );
        let b = core
            .register_study(GW, OWNER, &attrs("B"), None)
            .await
            .unwrap();
        assert_eq!(b.master_version, 2);
        let kb = core
            .derive_key(GW, &b.id, &attrs("B"), "pixels", Operation::Protect)
            .await
            .unwrap();
        assert_eq!(
            core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
                .await
                .unwrap(),
            ka
        );
        drop(core);

        assert!(matches!(
            open_with(&path, [2; 32], clock.clone(), 0),
            Err(KeyServerError::Kek(_))
        ));
        let core = open_with(&path, [1; 32], clock, 0).unwrap();
        assert_eq!(core.current_master_version(), 2);
        for (s, id, k) in [(&a, "A", &ka), (&b, "B", &kb)] {
            let again = core
                .derive_key(GW, &s.id, &attrs(id), "pixels", Operation::Restore)
                .await
                .unwrap();
            assert_eq!(&again, k);
        }
        let rep = core.verify_audit().unwrap();
        assert!(rep.ok, "{rep:?}");
    }

    fn audit_len(core: &Core) -> usize {
        core.list_audit(1, 10_000).unwrap().len()
    }

    #[tokio::test]
    async fn gateway_redeems_and_checks_grants() {
        let (_dir, clock, core) = setup();
        let study = core
            .register_study(GW, OWNER, &attrs("P1"), None)
            .await
            .unwrap();
        let other = core
            .register_study(GW, OWNER, &attrs("P2"), None)
            .await
            .unwrap();
        let req = core
            .request_key(CLIN, &study.id, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        let (rid, sid) = (req.id.as_str(), study.id.as_str());

        // Pending: neither check nor redeem.
        assert!(matches!(
            core.check_grant(GW, rid, CLIN, sid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("pending")
        ));
        assert!(matches!(
            core.redeem_grant(GW, rid, CLIN, sid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("pending")
        ));
        core.approve(OWNER, rid, 60, 3).await.unwrap();

        // Only the gateway; the refusal is audited with the parsed ids only.
        for who in [WM, CLIN, OWNER] {
            assert!(matches!(
                core.redeem_grant(who, rid, CLIN, sid).await,
                Err(KeyServerError::PermissionDenied(m)) if m.contains("only the gateway")
            ));
            assert!(matches!(
                core.check_grant(who, rid, CLIN, sid).await,
                Err(KeyServerError::PermissionDenied(_))
            ));
        }
        let refused = core
            .list_audit(1, 10_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.event == "redeem.refused")
            .collect::<Vec<_>>();
        assert_eq!(refused.len(), 7, "3 redeem + 3 check + 1 pending redeem");
        assert!(
            refused.iter().any(|e| e.actor == WM
                && e.study == study.id
                && e.detail.contains("op=check grants"))
        );

        // Checking spends nothing and writes nothing.
        let before = audit_len(&core);
        let c = core.check_grant(GW, rid, CLIN, sid).await.unwrap();
        assert_eq!(
            c,
            Redeemed {
                study_id: study.id.clone(),
                purpose: "pixels".into(),
                expires_at: 1_000_060,
                uses_left: 3,
            }
        );
        assert_eq!(audit_len(&core), before);

        let r = core.redeem_grant(GW, rid, CLIN, sid).await.unwrap();
        assert_eq!(r.uses_left, 2);
        assert_eq!(
            core.check_grant(GW, rid, CLIN, sid)
                .await
                .unwrap()
                .uses_left,
            2
        );

        // Wrong user, wrong study, malformed input, unknown request.
        assert!(matches!(
            core.redeem_grant(GW, rid, CLIN2, sid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("another user")
        ));
        assert!(matches!(
            core.redeem_grant(GW, rid, CLIN, &other.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("another study")
        ));
        assert!(matches!(
            core.check_grant(GW, rid, CLIN, &other.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("another study")
        ));
        assert!(matches!(
            core.redeem_grant(GW, rid, CLIN, "st-x").await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.redeem_grant(GW, "rq-1", CLIN, sid).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.redeem_grant(GW, rid, "clinician", sid).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.redeem_grant(GW, rid, GW, sid).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.redeem_grant(GW, "rq-00000000000000000000000000000000", CLIN, sid)
                .await,
            Err(KeyServerError::NotFound(_))
        ));
        assert!(matches!(
            core.check_grant(GW, "rq-00000000000000000000000000000000", CLIN, sid)
                .await,
            Err(KeyServerError::NotFound(_))
        ));

        // Redemptions and fetches share the uses.
        assert_eq!(core.fetch_key(CLIN, rid).await.unwrap().uses_left, 1);
        assert_eq!(
            core.redeem_grant(GW, rid, CLIN, sid)
                .await
                .unwrap()
                .uses_left,
            0
        );
        for r in [
            core.redeem_grant(GW, rid, CLIN, sid).await,
            core.check_grant(GW, rid, CLIN, sid).await,
        ] {
            assert!(matches!(r, Err(KeyServerError::PermissionDenied(m)) if m.contains("used up")));
        }
        assert!(matches!(
            core.fetch_key(CLIN, rid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("used up")
        ));

        // Expiry on the injected clock, for check and redeem alike.
        let r2 = core
            .request_key(CLIN, sid, &attrs("P1"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &r2.id, 10, 5).await.unwrap();
        core.check_grant(GW, &r2.id, CLIN, sid).await.unwrap();
        clock.advance_secs(10);
        assert!(matches!(
            core.check_grant(GW, &r2.id, CLIN, sid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("expired")
        ));
        assert!(matches!(
            core.redeem_grant(GW, &r2.id, CLIN, sid).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("expired")
        ));

        let log = core.list_audit(1, 10_000).unwrap();
        let redeemed: Vec<_> = log.iter().filter(|e| e.event == "grant.redeemed").collect();
        assert_eq!(redeemed.len(), 2);
        assert!(redeemed.iter().all(|e| e.actor == GW
            && e.detail.contains(&format!("request={rid}"))
            && e.detail.contains(&format!("requester={CLIN}"))));
        assert!(log.iter().any(|e| e.event == "redeem.refused"
            && e.detail.contains("asked_study=")
            && e.detail.contains("another study")));
        let rep = core.verify_audit().unwrap();
        assert!(rep.ok, "{rep:?}");
    }

    fn stored_study(core: &Core, id: &str) -> StudyRecord {
        let r = core.inner.db.begin_read().unwrap();
        get_json(&r.open_table(STUDIES).unwrap(), id)
            .unwrap()
            .unwrap()
    }

    fn stored_request(core: &Core, id: &str) -> RequestRecord {
        let r = core.inner.db.begin_read().unwrap();
        get_json(&r.open_table(REQUESTS).unwrap(), id)
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn forget_study_shreds_key_material_and_leaves_a_tombstone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.redb");
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_secs(1_000_000));
        let core = open_with(&path, [3; 32], clock.clone(), 3).unwrap();
        let a = core
            .register_study(GW, OWNER, &attrs("A"), None)
            .await
            .unwrap();
        let b = core
            .register_study(GW, OWNER, &attrs("B"), None)
            .await
            .unwrap();
        let kb = core
            .derive_key(GW, &b.id, &attrs("B"), "pixels", Operation::Protect)
            .await
            .unwrap();
        let pending = core
            .request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "")
            .await
            .unwrap();
        let approved = core
            .request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &approved.id, 60, 5).await.unwrap();
        let denied_req = core
            .request_key(CLIN2, &a.id, &attrs("A"), "pixels", "", "")
            .await
            .unwrap();
        core.deny(OWNER, &denied_req.id, "no").await.unwrap();
        let on_b = core
            .request_key(CLIN, &b.id, &attrs("B"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &on_b.id, 60, 5).await.unwrap();
        assert!(stored_request(&core, &approved.id).wrapped_key.is_some());

        // Only the gateway, and only for the owner; both refusals audited.
        assert!(matches!(
            core.forget_study(WM, &a.id, OWNER).await,
            Err(KeyServerError::PermissionDenied(_))
        ));
        assert!(matches!(
            core.forget_study(GW, &a.id, CLIN).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("owner")
        ));
        assert_eq!(
            events(&core)
                .iter()
                .filter(|e| *e == "forget.refused")
                .count(),
            2
        );
        assert!(matches!(
            core.forget_study(GW, "st-nope", OWNER).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.forget_study(GW, &a.id, "").await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        assert!(matches!(
            core.forget_study(GW, "st-00000000000000000000000000000000", OWNER)
                .await,
            Err(KeyServerError::NotFound(_))
        ));
        // Nothing changed so far.
        core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
            .await
            .unwrap();

        let rep = core.forget_study(GW, &a.id, OWNER).await.unwrap();
        assert_eq!(
            rep,
            ForgetReport {
                grants_revoked: 1,
                requests_denied: 1,
            }
        );

        let tomb = stored_study(&core, &a.id);
        assert_eq!(tomb.salt, [0u8; 32]);
        assert_eq!(tomb.commitment, [0u8; 32]);
        assert_eq!(
            tomb.forgotten,
            Some(Forgotten {
                at: 1_000_000,
                by: GW.into(),
                on_behalf_of: OWNER.into(),
            })
        );
        for id in [&pending.id, &approved.id, &denied_req.id] {
            assert!(stored_request(&core, id).wrapped_key.is_none(), "{id}");
        }
        assert!(matches!(
            stored_request(&core, &pending.id).state,
            GrantState::Denied { ref reason, .. } if reason == "study forgotten"
        ));
        assert!(matches!(
            stored_request(&core, &approved.id).state,
            GrantState::Revoked { uses_left: 5, ref by, .. } if by == GW
        ));
        // The other study is untouched.
        assert!(stored_request(&core, &on_b.id).wrapped_key.is_some());

        let gone = |r: Result<Derived>| matches!(r, Err(KeyServerError::NotFound(m)) if m.contains("was deleted"));
        assert!(gone(
            core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
                .await
        ));
        assert!(matches!(
            core.request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "").await,
            Err(KeyServerError::NotFound(m)) if m.contains("was deleted")
        ));
        assert!(matches!(
            core.register_study(GW, OWNER, &attrs("A"), Some(&a.id)).await,
            Err(KeyServerError::AlreadyExists(m)) if m.contains("deleted")
        ));
        assert!(matches!(
            core.fetch_key(CLIN, &approved.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("revoked")
        ));
        assert!(matches!(
            core.redeem_grant(GW, &approved.id, CLIN, &a.id).await,
            Err(KeyServerError::PermissionDenied(m)) if m.contains("revoked")
        ));
        assert!(matches!(
            core.forget_study(GW, &a.id, OWNER).await,
            Err(KeyServerError::NotFound(m)) if m.contains("was deleted")
        ));
        // The owner still sees the history of its requests.
        assert_eq!(core.list_requests(OWNER, &a.id, true).unwrap().len(), 3);
        assert!(core.list_requests(OWNER, &a.id, false).unwrap().is_empty());

        // A copy cached before the forget committed cannot be used: the
        // write job re-checks and the stale copy is evicted.
        let mut stale = stored_study(&core, &b.id);
        stale.id = a.id.clone();
        // Make the stale copy pass the attribute check so the request reaches
        // the write job.
        let m = core.master(stale.master_version).unwrap();
        stale.commitment = m.commitment(
            &a.id,
            &stale.salt,
            &CanonicalAttributes::new(&attrs("A")).unwrap(),
        );
        core.cache_study(Arc::new(stale.clone()));
        assert!(gone(
            core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
                .await
        ));
        core.cache_study(Arc::new(stale));
        assert!(matches!(
            core.request_key(CLIN, &a.id, &attrs("A"), "pixels", "", "").await,
            Err(KeyServerError::NotFound(m)) if m.contains("was deleted")
        ));
        assert!(
            core.study_any(&StudyId::parse(&a.id).unwrap())
                .unwrap()
                .is_forgotten(),
            "the stale copy was evicted"
        );

        let log = core.list_audit(1, 10_000).unwrap();
        let f: Vec<_> = log
            .iter()
            .filter(|e| e.event == "study.forgotten")
            .collect();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].actor, GW);
        assert_eq!(f[0].study, a.id);
        assert!(f[0].detail.contains(&format!("on_behalf_of={OWNER}")));
        assert!(f[0].detail.contains("grants_revoked=1"));
        assert!(
            !log.iter()
                .any(|e| e.event == "key.derived" && e.study == a.id && e.seq > f[0].seq)
        );
        assert!(core.verify_audit().unwrap().ok);
        drop(core);

        // The tombstone survives a restart (empty cache).
        let core = open_with(&path, [3; 32], clock, 3).unwrap();
        assert!(gone(
            core.derive_key(GW, &a.id, &attrs("A"), "pixels", Operation::Restore)
                .await
        ));
        assert_eq!(
            core.derive_key(GW, &b.id, &attrs("B"), "pixels", Operation::Restore)
                .await
                .unwrap(),
            kb
        );
        assert!(core.verify_audit().unwrap().ok);
    }

    #[tokio::test]
    async fn a_stopped_verification_reports_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.redb");
        let core = open_with(&path, [2; 32], Arc::new(ManualClock::at_secs(5)), 2).unwrap();
        core.register_study(GW, OWNER, &attrs("A"), None)
            .await
            .unwrap();
        let pk = core.audit_public_key().to_vec();
        drop(core);
        let ro = ReadOnlyDatabase::open(&path).unwrap();
        let stop = AtomicBool::new(true);
        // Stopped before the first entry: not a truncated log, no verdict.
        assert_eq!(
            verify_database_stoppable(&ro, &pk, false, Some(&stop)).unwrap(),
            None
        );
        stop.store(false, Ordering::SeqCst);
        let rep = verify_database_stoppable(&ro, &pk, false, Some(&stop))
            .unwrap()
            .unwrap();
        assert!(rep.ok, "{rep:?}");
    }

    #[tokio::test]
    async fn identities_are_in_the_configured_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let gw = "spiffe://hospital.example/service/gateway";
        let owner = "spiffe://hospital.example/user/owner";
        let core = Core::open(
            CoreConfig {
                db_path: dir.path().join("ks.redb"),
                kek: Kek::from_bytes(&[3; 32]).unwrap(),
                trust_domain: "hospital.example".into(),
                gateway_identity: gw.into(),
                derivers: vec![(gw.into(), vec!["dicom-*".into()])],
                checkpoint_every: 10,
                max_grant_ttl_secs: 60,
                max_grant_uses: 1,
            },
            Arc::new(ManualClock::at_secs(1)),
        )
        .unwrap();
        // The built-in tessera.local domain is just another domain here.
        assert!(matches!(
            core.register_study(gw, OWNER, &attrs("A"), None).await,
            Err(KeyServerError::InvalidArgument(m)) if m.contains("hospital.example")
        ));
        let s = core
            .register_study(gw, owner, &attrs("A"), None)
            .await
            .unwrap();
        assert!(matches!(
            core.add_delegate(owner, CLIN).await,
            Err(KeyServerError::InvalidArgument(_))
        ));
        core.add_delegate(owner, "spiffe://hospital.example/user/clinician")
            .await
            .unwrap();
        core.derive_key(gw, &s.id, &attrs("A"), "dicom-pixels", Operation::Protect)
            .await
            .unwrap();
        assert!(matches!(
            core.derive_key(gw, &s.id, &attrs("A"), "pixels", Operation::Protect)
                .await,
            Err(KeyServerError::PermissionDenied(_))
        ));
    }

    #[tokio::test]
    async fn a_flipped_byte_on_disk_names_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ks.redb");
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at_secs(5));
        let core = open_with(&path, [1; 32], clock.clone(), 2).unwrap();
        let s = core
            .register_study(GW, OWNER, &attrs("A"), None)
            .await
            .unwrap();
        let r = core
            .request_key(CLIN, &s.id, &attrs("A"), "pixels", "", "")
            .await
            .unwrap();
        core.approve(OWNER, &r.id, 60, 1).await.unwrap();
        core.fetch_key(CLIN, &r.id).await.unwrap();
        for _ in 0..4 {
            core.derive_key(GW, &s.id, &attrs("A"), "pixels", Operation::Restore)
                .await
                .unwrap();
        }
        let approval_seq = core
            .list_audit(1, 100)
            .unwrap()
            .into_iter()
            .find(|e| e.event == "grant.approved")
            .unwrap()
            .seq;
        assert!(core.verify_audit().unwrap().ok);
        drop(core);

        let mut bytes = std::fs::read(&path).unwrap();
        let marker = b"grant.approved";
        let mut flipped = 0;
        for i in 0..bytes.len().saturating_sub(marker.len()) {
            if &bytes[i..i + marker.len()] == marker {
                bytes[i + marker.len() - 1] ^= 0x20;
                flipped += 1;
            }
        }
        assert!(flipped >= 1);
        std::fs::write(&path, &bytes).unwrap();

        let kek = Kek::from_bytes(&[1; 32]).unwrap();
        let (rep, pk) = verify_audit_file(&path, Some(&kek)).unwrap();
        assert!(!rep.ok);
        assert_eq!(rep.first_broken_seq, Some(approval_seq), "{}", rep.problem);
        {
            // Older than the last checkpoint: the quick check at start passes.
            let ro = ReadOnlyDatabase::open(&path).unwrap();
            assert!(verify_database_tail(&ro, &pk).unwrap().ok);
        }

        let core = open_with(&path, [1; 32], clock, 2).unwrap();
        // The approval is older than the last checkpoint, so the check at
        // start does not see it; the background full check does, and from
        // then on key operations are refused.
        let mut seen = None;
        for _ in 0..500 {
            seen = core.chain_break();
            if seen.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(seen.map(|b| b.seq), Some(approval_seq));
        assert!(matches!(
            core.derive_key(GW, &s.id, &attrs("A"), "pixels", Operation::Restore).await,
            Err(KeyServerError::FailedPrecondition(m)) if m.contains(&format!("entry {approval_seq}"))
        ));
        let rep = core.verify_audit().unwrap();
        assert_eq!(rep.first_broken_seq, Some(approval_seq), "{}", rep.problem);
    }
}
