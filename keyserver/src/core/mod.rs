//! The keyserver core: master secrets, studies, derivation, key requests
//! and grants, and the audit log. No gRPC here; the service module converts
//! at the edge. Async only because callers wait for the group commit.

pub mod attrs;
pub mod audit;
pub mod clock;
pub mod crypto;
pub mod ids;
pub mod store;
pub mod writer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use redb::{Database, ReadOnlyDatabase, ReadableDatabase, ReadableTable, ReadableTableMetadata};
use ring::rand::SystemRandom;

use crate::error::{KeyServerError, Result};
use attrs::CanonicalAttributes;
use audit::{AuditEntry, AuditEvent, NewEntry, VerifyReport, verify_chain};
use clock::Clock;
use crypto::{
    AuditSigner, Kek, Master, SIGNING_KEY_AAD, Secret, grant_aad, master_aad, random_secret,
};
use ids::{RequestId, StudyId, validate_label, validate_text, validate_user_identity};
use store::{
    AUDIT, CHECKPOINTS, GrantState, MASTERS, META, META_AUDIT_HEAD, META_MASTER_CURRENT,
    META_PUBLIC_KEY, META_SIGNING_KEY, OWNER_STUDIES, REQUESTS, RequestRecord, STUDIES,
    STUDY_REQUESTS, StudyRecord, get_bytes, get_json, index_key, index_scan, to_json,
};
use writer::{ChainState, Writer, apply_in_txn};

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
    /// The gateway's identity: the only one that registers studies or
    /// presents attributes on a user's behalf.
    pub gateway_identity: String,
    /// Trusted services allowed to derive keys (the gateway, watermark).
    /// Storage nodes hold the `service` role too but are untrusted, so the
    /// role alone is not enough.
    pub derive_identities: Vec<String>,
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

/// A derived key.
#[derive(Clone, PartialEq, Eq)]
pub struct Derived {
    /// 32 bytes.
    pub key: Secret,
    /// Master version it came from.
    pub master_version: u32,
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Derived(v{}, <redacted>)", self.master_version)
    }
}

/// A key released to its requester.
#[derive(Clone, PartialEq, Eq)]
pub struct Released {
    /// 32 bytes.
    pub key: Secret,
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
    masters: RwLock<BTreeMap<u32, Arc<Master>>>,
    current: AtomicU32,
    studies: RwLock<HashMap<String, Arc<StudyRecord>>>,
    public_key: Vec<u8>,
    gateway: String,
    derivers: Vec<String>,
    max_ttl: u64,
    max_uses: u32,
}

fn denied(msg: &str) -> KeyServerError {
    KeyServerError::PermissionDenied(msg.to_owned())
}

fn state_name(s: &GrantState) -> &'static str {
    match s {
        GrantState::Pending => "pending",
        GrantState::Approved { .. } => "approved",
        GrantState::Denied { .. } => "denied",
        GrantState::Revoked { .. } => "revoked",
    }
}

fn load_signer(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    kek: &Kek,
) -> Result<Option<AuditSigner>> {
    match get_bytes(meta, META_SIGNING_KEY)? {
        None => Ok(None),
        Some(w) => AuditSigner::from_pkcs8(&kek.unwrap(SIGNING_KEY_AAD, &w)?).map(Some),
    }
}

/// Recomputes the audit chain of an open database.
pub fn verify_database(db: &impl ReadableDatabase, public_key: &[u8]) -> Result<VerifyReport> {
    let r = db.begin_read()?;
    let audit = match r.open_table(AUDIT) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return verify_chain::<_, KeyServerError>(Vec::new(), &[], None, public_key);
        }
        Err(e) => return Err(e.into()),
    };
    let cps = r.open_table(CHECKPOINTS)?;
    let mut checkpoints = Vec::new();
    for item in cps.iter()? {
        let (k, v) = item?;
        checkpoints.push((k.value(), v.value().to_vec()));
    }
    let meta = r.open_table(META)?;
    let head = get_bytes(&meta, META_AUDIT_HEAD)?;
    let records = audit.iter()?.map(|item| {
        item.map(|(k, v)| (k.value(), v.value().to_vec()))
            .map_err(KeyServerError::from)
    });
    verify_chain(records, &checkpoints, head.as_deref(), public_key)
}

/// Offline verification of a keyserver database file (the server need not
/// run, e.g. when it refuses to start). With the KEK, the signing key is
/// authenticated; without it, the public key stored beside the log is used
/// and the report is only as trustworthy as the file.
pub fn verify_audit_file(path: &Path, kek: Option<&Kek>) -> Result<(VerifyReport, Vec<u8>)> {
    let db = ReadOnlyDatabase::open(path)?;
    let public_key = {
        let r = db.begin_read()?;
        let meta = r.open_table(META)?;
        match kek {
            Some(k) => load_signer(&meta, k)?
                .ok_or_else(|| KeyServerError::Corrupt("no audit signing key".into()))?
                .public_key(),
            None => get_bytes(&meta, META_PUBLIC_KEY)?
                .ok_or_else(|| KeyServerError::Corrupt("no audit public key".into()))?,
        }
    };
    Ok((verify_database(&db, &public_key)?, public_key))
}

impl Core {
    /// Opens (or creates) the database: on first start generates master
    /// secret v1 and the audit signing key, both wrapped under the KEK.
    pub fn open(cfg: CoreConfig, clock: Arc<dyn Clock>) -> Result<Self> {
        let db = Arc::new(Database::create(&cfg.db_path)?);
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
            let mut meta = w.open_table(META)?;
            match load_signer(&meta, &kek)? {
                Some(s) => s,
                None => {
                    let (s, pkcs8) = AuditSigner::generate(&rng)?;
                    let wrapped = kek.wrap(&rng, SIGNING_KEY_AAD, &pkcs8)?;
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
                let wrapped = kek.wrap(&rng, &master_aad(1), &secret)?;
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
        let writer = Writer::start(db.clone(), signer, chain, clock, cfg.checkpoint_every)?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                db,
                kek,
                rng,
                masters: RwLock::new(masters),
                current: AtomicU32::new(current),
                studies: RwLock::new(HashMap::new()),
                public_key,
                gateway: cfg.gateway_identity,
                derivers: cfg.derive_identities,
                max_ttl: cfg.max_grant_ttl_secs,
                max_uses: cfg.max_grant_uses,
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

    fn study(&self, id: &StudyId) -> Result<Arc<StudyRecord>> {
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

    fn cache_study(&self, rec: Arc<StudyRecord>) {
        // Studies never change after registration, so caching them is safe.
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

    /// Registers a study (gateway only). Returns the stored record.
    pub async fn register_study(
        &self,
        actor: &str,
        owner: &str,
        attributes: &[(String, String)],
        study_id: Option<&str>,
    ) -> Result<StudyRecord> {
        if actor != self.inner.gateway {
            return Err(denied("only the gateway registers studies"));
        }
        validate_user_identity("owner", owner)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let id = match study_id {
            Some(s) if !s.is_empty() => StudyId::parse(s)?,
            _ => StudyId::random(&self.inner.rng)?,
        };
        let master = self.master(self.current_master_version())?;
        let salt = random_secret(&self.inner.rng)?;
        let rec = StudyRecord {
            id: id.as_str().to_owned(),
            owner: owner.to_owned(),
            salt,
            commitment: master.commitment(id.as_str(), &salt, &attrs),
            master_version: master.version,
            created_at: 0,
            registered_by: actor.to_owned(),
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
                if studies.get(rec.id.as_str())?.is_some() {
                    return Ok(Err(KeyServerError::AlreadyExists(format!(
                        "study {}",
                        rec.id
                    ))));
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
        if !self.inner.derivers.iter().any(|d| d == actor) {
            return Err(denied("only trusted services derive study keys"));
        }
        let id = StudyId::parse(study_id)?;
        validate_label("purpose", purpose)?;
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
        self.audit_only(NewEntry {
            actor: actor.to_owned(),
            event: AuditEvent::KeyDerived,
            study: study.id.clone(),
            detail: format!("{detail} master_version={}", master.version),
        })
        .await?;
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
        let id = StudyId::parse(study_id)?;
        validate_label("purpose", purpose)?;
        validate_text("justification", justification)?;
        let attrs = CanonicalAttributes::new(attributes)?;
        let requester = if on_behalf_of.is_empty() {
            actor.to_owned()
        } else {
            if actor != self.inner.gateway {
                return Err(denied("only the gateway may request on behalf of a user"));
            }
            validate_user_identity("on_behalf_of", on_behalf_of)?;
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
            .wrap(&self.inner.rng, &grant_aad(rid.as_str()), &key)?;
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
        self.inner
            .writer
            .submit(move |ctx| {
                let mut rec = rec;
                rec.created_at = ctx.now_secs();
                let txn = ctx.txn;
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
            .await
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
            if self.study(&id)?.owner != actor {
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
    /// study inside the write transaction and checks the caller owns it.
    async fn decide<F>(&self, actor: &str, request_id: &str, f: F) -> Result<RequestRecord>
    where
        F: FnOnce(&mut writer::TxnCtx<'_>, &mut RequestRecord, &str) -> Result<Result<NewEntry>>
            + Send
            + 'static,
    {
        let rid = RequestId::parse(request_id)?;
        let actor = actor.to_owned();
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
                if owner != actor {
                    return Ok(Err(denied("only the study owner decides on its requests")));
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
        self.decide(actor, request_id, move |ctx, rec, actor| {
            if rec.requester == actor {
                ctx.append(NewEntry {
                    actor: actor.to_owned(),
                    event: AuditEvent::ApprovalRefused,
                    study: rec.study_id.clone(),
                    detail: format!("request={} reason=self-approval", rec.id),
                })?;
                return Ok(Err(denied("nobody may approve their own request")));
            }
            if rec.state != GrantState::Pending {
                return Ok(Err(KeyServerError::FailedPrecondition(format!(
                    "request is {}, not pending",
                    state_name(&rec.state)
                ))));
            }
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
        })
        .await
    }

    /// The owner denies a pending request.
    pub async fn deny(&self, actor: &str, request_id: &str, reason: &str) -> Result<RequestRecord> {
        validate_text("reason", reason)?;
        let reason = reason.to_owned();
        self.decide(actor, request_id, move |ctx, rec, actor| {
            if rec.state != GrantState::Pending {
                return Ok(Err(KeyServerError::FailedPrecondition(format!(
                    "request is {}, not pending",
                    state_name(&rec.state)
                ))));
            }
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
        })
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
        self.decide(actor, request_id, move |ctx, rec, actor| {
            let GrantState::Approved {
                expires_at,
                uses_granted,
                uses_left,
                ..
            } = rec.state
            else {
                return Ok(Err(KeyServerError::FailedPrecondition(format!(
                    "request is {}, only approved grants can be revoked",
                    state_name(&rec.state)
                ))));
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
        })
        .await
    }

    /// The requester fetches its key while the grant is valid; uses one use.
    pub async fn fetch_key(&self, actor: &str, request_id: &str) -> Result<Released> {
        let rid = RequestId::parse(request_id)?;
        let actor = actor.to_owned();
        let kek = self.inner.kek.clone();
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
                let refusal = if rec.requester != actor {
                    Some("only the requester may fetch this key")
                } else {
                    match &mut rec.state {
                        GrantState::Pending => Some("the request is pending approval"),
                        GrantState::Denied { .. } => Some("the request was denied"),
                        GrantState::Revoked { .. } => Some("the grant was revoked"),
                        GrantState::Approved { expires_at, .. } if now >= *expires_at => {
                            if rec.wrapped_key.take().is_some() {
                                reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                            }
                            Some("the grant has expired")
                        }
                        GrantState::Approved { uses_left: 0, .. } => Some("the grant is used up"),
                        GrantState::Approved {
                            expires_at,
                            uses_left,
                            ..
                        } => {
                            let wrapped = rec.wrapped_key.clone().ok_or_else(|| {
                                KeyServerError::Corrupt(format!("request {} holds no key", rec.id))
                            })?;
                            let key = kek.unwrap_secret(&grant_aad(&rec.id), &wrapped)?;
                            *uses_left -= 1;
                            let released = Released {
                                key,
                                study_id: rec.study_id.clone(),
                                purpose: rec.purpose.clone(),
                                master_version: rec.master_version,
                                expires_at: *expires_at,
                                uses_left: *uses_left,
                            };
                            if released.uses_left == 0 {
                                rec.wrapped_key = None;
                            }
                            reqs.insert(rec.id.as_str(), to_json(&rec)?.as_slice())?;
                            ctx.append(NewEntry {
                                actor,
                                event: AuditEvent::KeyReleased,
                                study: rec.study_id.clone(),
                                detail: format!(
                                    "request={} uses_left={}",
                                    rec.id, released.uses_left
                                ),
                            })?;
                            return Ok(Ok(released));
                        }
                    }
                };
                let why = refusal.unwrap_or("refused");
                ctx.append(NewEntry {
                    actor,
                    event: AuditEvent::FetchRefused,
                    study: rec.study_id.clone(),
                    detail: format!("request={} reason={why}", rec.id),
                })?;
                Ok(Err(denied(why)))
            })
            .await
    }

    /// Adds a master secret version; new studies use it, old ones keep theirs.
    pub async fn rotate_master(&self, actor: &str) -> Result<u32> {
        let secret = random_secret(&self.inner.rng)?;
        let kek = self.inner.kek.clone();
        let actor = actor.to_owned();
        let version = self
            .inner
            .writer
            .submit(move |ctx| {
                let txn = ctx.txn;
                let mut masters = txn.open_table(MASTERS)?;
                let next = masters.last()?.map_or(1, |(k, _)| k.value() + 1);
                let wrapped = kek.wrap(&SystemRandom::new(), &master_aad(next), &secret)?;
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

    /// Recomputes the audit chain and checks signatures.
    pub fn verify_audit(&self) -> Result<VerifyReport> {
        verify_database(self.inner.db.as_ref(), &self.inner.public_key)
    }

    /// Reads up to `limit` audit entries from `from_seq`.
    pub fn list_audit(&self, from_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        let r = self.inner.db.begin_read()?;
        writer::read_entries(&r.open_table(AUDIT)?, from_seq.max(1), limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::clock::ManualClock;

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
                gateway_identity: GW.into(),
                derive_identities: vec![GW.into(), WM.into()],
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
        let (rep, _) = verify_audit_file(&path, Some(&kek)).unwrap();
        assert!(!rep.ok);
        assert_eq!(rep.first_broken_seq, Some(approval_seq), "{}", rep.problem);

        let core = open_with(&path, [1; 32], clock, 2).unwrap();
        let rep = core.verify_audit().unwrap();
        assert_eq!(rep.first_broken_seq, Some(approval_seq), "{}", rep.problem);
    }
}
