//! The identity vault: the only place where a study handle meets the
//! patient's identity. One redb file, or PostgreSQL shared by gateway
//! replicas (`backend.rs`, `pg.rs`); every record is sealed under the vault
//! key in the one envelope format of `tessera-envelope` (AES-256-GCM, random
//! nonce per write, purpose `VaultStudy`/`VaultInstance`, the record's id
//! as context, so a record copied under another id does not open): see
//! `seal.rs`.
//!
//! A study goes through `Pending` (its shares are being placed: the intent
//! record lets a restarted gateway remove what a crash left behind) to
//! `Committed` (visible) and `Deleting` (shares and keys being destroyed).
//! Only `Committed` studies are ever served. Pending and deleting records
//! carry the replica that wrote them; recovery finishes only those of
//! replicas whose lease lapsed ([`Vault::recoverable`]).

mod backend;
mod keyfile;
mod pg;
mod records;
mod seal;
mod store;

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;

use crate::error::GatewayError;
use backend::{Backend, RedbBackend};
pub use keyfile::{create_key_file, load_key_file};
pub use records::{
    ErasureRecord, FragmentPlacement, InstanceRecord, SharePlacement, SpecRecord, StudyRecord,
    StudyState,
};
use seal::{Binding, VaultKey, instance_aad, open_sealed, seal_record, study_aad};
use store::{INDEX, INSTANCES, Op, STUDIES, Tbl, Write, changed_meanwhile, is_changed_meanwhile};

type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// Seconds a replica's heartbeat holds its unfinished records against
/// another replica's recovery (`[vault] lease_secs`).
pub const DEFAULT_LEASE_SECS: u64 = 30;

/// The identity vault. Reads run on the caller's thread; writes go to the
/// backend, which answers each caller only after the commit (redb: one
/// writer thread folding every change waiting into one transaction, group
/// commit; PostgreSQL: one transaction per change over a pool).
pub struct Vault {
    backend: Box<dyn Backend>,
    key: VaultKey,
    index_key: ring::hmac::Key,
    rng: SystemRandom,
    /// This process's replica id (random per start): stamped on the
    /// unfinished records it writes, beaten in the replicas table.
    replica: String,
    lease_secs: u64,
    /// Changes submitted by this process (any table): the study count
    /// cache below is stale once it moved.
    writes: std::sync::atomic::AtomicU64,
    /// The last [`Self::count_studies`] for `/metrics`: (writes then, when,
    /// the count or None when the vault could not be read).
    count_cache: std::sync::Mutex<Option<(u64, std::time::Instant, Option<u64>)>>,
}

/// How long `/metrics` reuses the vault's study count when this process
/// wrote nothing since (other replicas' stores show within it).
pub const STUDY_COUNT_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl Vault {
    /// Opens (or creates) the vault file.
    pub fn open(path: &Path, key: &[u8; 32]) -> Result<Self> {
        Self::with_backend(Box::new(RedbBackend::open(path)?), key, DEFAULT_LEASE_SECS)
    }

    /// Opens the vault on PostgreSQL at `url` (tables created if absent);
    /// fails (UNAVAILABLE) when the database cannot be reached.
    pub fn open_postgres(url: &str, key: &[u8; 32], lease_secs: u64) -> Result<Self> {
        Self::with_backend(Box::new(pg::PgBackend::open(url)?), key, lease_secs)
    }

    fn with_backend(backend: Box<dyn Backend>, key: &[u8; 32], lease_secs: u64) -> Result<Self> {
        let index_key = {
            let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
            let derived = ring::hmac::sign(&k, b"tessera/gateway/vault/v1/dicom-index");
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derived.as_ref())
        };
        let rng = SystemRandom::new();
        let mut id = [0u8; 8];
        rng.fill(&mut id)
            .map_err(|_| GatewayError::Internal("no randomness".into()))?;
        let v = Self {
            backend,
            index_key,
            key: VaultKey::new(key)?,
            rng,
            replica: format!("r-{}", hex::encode(id)),
            lease_secs,
            writes: std::sync::atomic::AtomicU64::new(0),
            count_cache: std::sync::Mutex::new(None),
        };
        v.heartbeat()?;
        Ok(v)
    }

    /// This process's replica id.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The lease of a replica's heartbeat, seconds.
    pub fn lease_secs(&self) -> u64 {
        self.lease_secs
    }

    /// Whether several gateway processes share this vault (PostgreSQL).
    pub fn shared(&self) -> bool {
        self.backend.shared()
    }

    /// Renews this replica's lease (the gateway beats every third of it).
    pub fn heartbeat(&self) -> Result<()> {
        self.backend.beat(&self.replica)
    }

    /// Whether recovery may act on an unfinished record stamped `replica`:
    /// never on this process's own (in flight here), nor on another live
    /// replica's; a replica whose lease lapsed (it crashed) or a record
    /// from before replica stamps (one gateway then) may be finished.
    pub fn recoverable(&self, replica: &str) -> Result<bool> {
        if replica == self.replica {
            return Ok(false);
        }
        if replica.is_empty() {
            return Ok(true);
        }
        Ok(!self.backend.alive(replica, self.lease_secs)?)
    }

    /// Hands a change to the backend and waits for its commit.
    fn submit(&self, op: Op) -> Result<()> {
        // Counted before and after: a count read while the op commits is
        // not reused once it has.
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = self.backend.submit(op);
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        r
    }

    fn aad(study_id: &str) -> Binding {
        study_aad(study_id)
    }

    fn seal(&self, rec: &StudyRecord) -> Result<Vec<u8>> {
        self.seal_with(rec, Self::aad(&rec.study_id))
    }

    fn seal_with<T: Serialize>(&self, rec: &T, binding: Binding) -> Result<Vec<u8>> {
        seal_record(&self.key, &self.rng, rec, binding)
    }

    fn open_with<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
        binding: Binding,
        sealed: &[u8],
    ) -> Result<T> {
        open_sealed(&self.key, key, binding, sealed)
    }

    fn open_record(&self, study_id: &str, sealed: &[u8]) -> Result<StudyRecord> {
        let rec: StudyRecord = self.open_with(study_id, Self::aad(study_id), sealed)?;
        if rec.study_id != study_id {
            return Err(GatewayError::Vault(format!(
                "record {study_id} names another study"
            )));
        }
        Ok(rec)
    }

    /// Writes (inserts or replaces) a record durably. A committed record
    /// stamped with this replica (the commit of a store this process began,
    /// or a later update of it) is a compare-and-set: it replaces only this
    /// replica's own pending or committed record, so a store another
    /// replica's recovery took over or rolled back (this process stalled
    /// past its lease) is never committed: UNAVAILABLE, nothing written.
    pub fn put(&self, rec: &StudyRecord) -> Result<()> {
        let sealed = self.seal(rec)?;
        let w = self.guarded(
            Tbl::Studies,
            rec.study_id.clone(),
            sealed,
            rec.state,
            &rec.replica,
            |b| {
                let r = self.open_record(&rec.study_id, b)?;
                Ok((r.state, r.replica))
            },
        )?;
        self.submit(Op(vec![w]))
    }

    /// The write of `value` at `key`: a [`Write::PutIf`] against the
    /// stored bytes when the record is committed and stamped with this
    /// replica (see [`Self::put`]), a plain put otherwise. `stamp_of`
    /// reads the stored record's state and replica.
    fn guarded(
        &self,
        tbl: Tbl,
        key: String,
        value: Vec<u8>,
        state: StudyState,
        stamp: &str,
        stamp_of: impl Fn(&[u8]) -> Result<(StudyState, String)>,
    ) -> Result<Write> {
        if state != StudyState::Committed || stamp.is_empty() || stamp != self.replica {
            return Ok(Write::Put(tbl, key, value));
        }
        let Some(expected) = self.backend.get(tbl, &key)? else {
            return Err(changed_meanwhile(&key));
        };
        match stamp_of(&expected)? {
            (StudyState::Pending | StudyState::Committed, r) if r == self.replica => {
                Ok(Write::PutIf {
                    tbl,
                    key,
                    value,
                    expected,
                })
            }
            (StudyState::Pending | StudyState::Committed | StudyState::Deleting, _) => {
                Err(changed_meanwhile(&key))
            }
        }
    }

    /// Takes an unfinished record over before rolling it back: restamps
    /// the stored record with this replica (compare-and-set on the bytes
    /// read), so its writer, if only stalled past its lease, can no longer
    /// commit it. True: roll back (also for this replica's own record).
    /// False: the record is gone, or is no longer the one `rec` shows
    /// (committed, or taken over by another replica): not ours to undo.
    pub fn claim(&self, rec: &StudyRecord) -> Result<bool> {
        let Some(bytes) = self.backend.get(Tbl::Studies, &rec.study_id)? else {
            return Ok(false);
        };
        let mut cur = self.open_record(&rec.study_id, &bytes)?;
        if cur.replica == self.replica {
            return Ok(true);
        }
        if cur.state == StudyState::Committed || cur.replica != rec.replica {
            return Ok(false);
        }
        cur.replica = self.replica.clone();
        let sealed = self.seal(&cur)?;
        self.claim_write(Tbl::Studies, rec.study_id.clone(), sealed, bytes)
    }

    /// [`Self::claim`] for a DICOM instance record.
    pub fn claim_instance(&self, rec: &InstanceRecord) -> Result<bool> {
        let key = rec.key();
        let Some(bytes) = self.backend.get(Tbl::Instances, &key)? else {
            return Ok(false);
        };
        let mut cur: InstanceRecord = self.open_with(&key, Self::instance_aad(&key), &bytes)?;
        if cur.replica == self.replica {
            return Ok(true);
        }
        if cur.state == StudyState::Committed || cur.replica != rec.replica {
            return Ok(false);
        }
        cur.replica = self.replica.clone();
        let sealed = self.seal_with(&cur, Self::instance_aad(&key))?;
        self.claim_write(Tbl::Instances, key, sealed, bytes)
    }

    fn claim_write(
        &self,
        tbl: Tbl,
        key: String,
        value: Vec<u8>,
        expected: Vec<u8>,
    ) -> Result<bool> {
        match self.submit(Op(vec![Write::PutIf {
            tbl,
            key,
            value,
            expected,
        }])) {
            Ok(()) => Ok(true),
            Err(e) if is_changed_meanwhile(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Inserts a new record durably; fails if the id is taken.
    pub fn insert_new(&self, rec: &StudyRecord) -> Result<()> {
        let sealed = self.seal(rec)?;
        self.submit(Op(vec![Write::Insert(
            Tbl::Studies,
            rec.study_id.clone(),
            sealed,
        )]))
    }

    /// Any record, whatever its state.
    pub fn get(&self, study_id: &str) -> Result<Option<StudyRecord>> {
        match self.backend.get(Tbl::Studies, study_id)? {
            Some(v) => Ok(Some(self.open_record(study_id, &v)?)),
            None => Ok(None),
        }
    }

    /// A committed study, or NotFound (pending and deleting studies are not
    /// visible).
    pub fn committed(&self, study_id: &str) -> Result<StudyRecord> {
        match self.get(study_id)? {
            Some(r) if r.state == StudyState::Committed => Ok(r),
            Some(_) | None => Err(GatewayError::NotFound(format!("study {study_id}"))),
        }
    }

    /// Removes a record (the last step of delete and of a rolled-back store).
    pub fn remove(&self, study_id: &str) -> Result<()> {
        self.submit(Op(vec![Write::Remove(Tbl::Studies, study_id.to_owned())]))
    }

    /// Records left pending or deleting (by a crash), for the start-up sweep.
    pub fn unfinished(&self) -> Result<Vec<StudyRecord>> {
        let mut out = Vec::new();
        for (k, v) in self.backend.range(Tbl::Studies, "", None)? {
            let rec = self.open_record(&k, &v)?;
            if rec.state != StudyState::Committed {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Unfinished records recovery may finish (see [`Self::recoverable`]).
    pub fn recoverable_studies(&self) -> Result<Vec<StudyRecord>> {
        let mut live = std::collections::HashMap::new();
        let mut out = Vec::new();
        for r in self.unfinished()? {
            if self.recoverable_cached(&r.replica, &mut live)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Unfinished instances recovery may finish.
    pub fn recoverable_instances(&self) -> Result<Vec<InstanceRecord>> {
        let mut live = std::collections::HashMap::new();
        let mut out = Vec::new();
        for r in self.unfinished_instances()? {
            if self.recoverable_cached(&r.replica, &mut live)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Unfinished records recovery must leave to their writers for now:
    /// another replica whose lease is live (possibly an earlier run of
    /// this very gateway, restarted within its lease under a new id).
    pub fn held(&self) -> Result<(Vec<StudyRecord>, Vec<InstanceRecord>)> {
        let mut live = std::collections::HashMap::new();
        let mut studies = Vec::new();
        for r in self.unfinished()? {
            if r.replica != self.replica && !self.recoverable_cached(&r.replica, &mut live)? {
                studies.push(r);
            }
        }
        let mut instances = Vec::new();
        for r in self.unfinished_instances()? {
            if r.replica != self.replica && !self.recoverable_cached(&r.replica, &mut live)? {
                instances.push(r);
            }
        }
        Ok((studies, instances))
    }

    /// Looks again at records [`Self::held`] returned: those still
    /// unfinished are returned as they are now, split into (recoverable
    /// now, still held); committed or removed ones are dropped.
    #[allow(clippy::type_complexity)]
    pub fn recheck(
        &self,
        studies: &[StudyRecord],
        instances: &[InstanceRecord],
    ) -> Result<(
        (Vec<StudyRecord>, Vec<InstanceRecord>),
        (Vec<StudyRecord>, Vec<InstanceRecord>),
    )> {
        let mut live = std::collections::HashMap::new();
        let (mut ready, mut held) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
        for s in studies {
            let Some(cur) = self.get(&s.study_id)? else {
                continue;
            };
            if cur.state == StudyState::Committed || cur.replica == self.replica {
                continue;
            }
            if self.recoverable_cached(&cur.replica, &mut live)? {
                ready.0.push(cur);
            } else {
                held.0.push(cur);
            }
        }
        for i in instances {
            let key = i.key();
            let Some(b) = self.backend.get(Tbl::Instances, &key)? else {
                continue;
            };
            let cur: InstanceRecord = self.open_with(&key, Self::instance_aad(&key), &b)?;
            if cur.state == StudyState::Committed || cur.replica == self.replica {
                continue;
            }
            if self.recoverable_cached(&cur.replica, &mut live)? {
                ready.1.push(cur);
            } else {
                held.1.push(cur);
            }
        }
        Ok((ready, held))
    }

    fn recoverable_cached(
        &self,
        replica: &str,
        seen: &mut std::collections::HashMap<String, bool>,
    ) -> Result<bool> {
        if let Some(&r) = seen.get(replica) {
            return Ok(r);
        }
        let r = self.recoverable(replica)?;
        seen.insert(replica.to_owned(), r);
        Ok(r)
    }

    // ---- DICOM studies and instances ----------------------------------------

    fn index_key(&self, kind: &str, parts: &[&str]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.index_key);
        ctx.update(kind.as_bytes());
        for p in parts {
            ctx.update(&(p.len() as u64).to_le_bytes());
            ctx.update(p.as_bytes());
        }
        format!("{kind}:{}", hex::encode(ctx.sign().as_ref()))
    }

    /// The id an index entry names.
    fn index_value(&self, k: &str) -> Result<Option<String>> {
        self.backend
            .get(Tbl::Index, k)?
            .map(|v| {
                String::from_utf8(v)
                    .map_err(|_| GatewayError::Vault(format!("index entry {k} is not text")))
            })
            .transpose()
    }

    fn study_index(&self, owner: &str, patient_id: &str, study_uid: &str) -> String {
        self.index_key("s", &[owner, patient_id, study_uid])
    }

    fn sop_index(&self, study_id: &str, sop_uid: &str) -> String {
        self.index_key("i", &[study_id, sop_uid])
    }

    fn instance_aad(key: &str) -> Binding {
        instance_aad(key)
    }

    /// The committed DICOM study of (owner, Patient ID, Study Instance UID).
    pub fn find_dicom_study(
        &self,
        owner: &str,
        patient_id: &str,
        study_uid: &str,
    ) -> Result<Option<StudyRecord>> {
        let k = self.study_index(owner, patient_id, study_uid);
        let id = self.index_value(&k)?;
        match id {
            Some(id) => Ok(self
                .get(&id)?
                .filter(|r| r.state == StudyState::Committed && r.is_dicom())),
            None => Ok(None),
        }
    }

    /// Writes a DICOM study record and its index entry together (the
    /// record as [`Self::put`] does: a commit of this replica's store is a
    /// compare-and-set).
    pub fn put_dicom_study(&self, rec: &StudyRecord, patient_id: &str) -> Result<()> {
        let k = self.study_index(&rec.owner, patient_id, &rec.dicom_study_uid);
        let sealed = self.seal(rec)?;
        let w = self.guarded(
            Tbl::Studies,
            rec.study_id.clone(),
            sealed,
            rec.state,
            &rec.replica,
            |b| {
                let r = self.open_record(&rec.study_id, b)?;
                Ok((r.state, r.replica))
            },
        )?;
        self.submit(Op(vec![
            w,
            Write::Put(Tbl::Index, k, rec.study_id.clone().into_bytes()),
        ]))
    }

    /// Removes a DICOM study record and its index entry.
    pub fn remove_dicom_study(&self, rec: &StudyRecord) -> Result<()> {
        let patient_id = rec
            .attributes
            .iter()
            .find(|(n, _)| n == "patient_id")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        let k = self.study_index(&rec.owner, patient_id, &rec.dicom_study_uid);
        let still_ours = self.index_value(&k)?.is_some_and(|v| v == rec.study_id);
        let mut w = vec![Write::Remove(Tbl::Studies, rec.study_id.clone())];
        if still_ours {
            w.push(Write::Remove(Tbl::Index, k));
        }
        self.submit(Op(w))
    }

    /// Inserts a new instance record; ALREADY_EXISTS when the study holds
    /// this SOP Instance UID already.
    pub fn insert_instance(&self, rec: &InstanceRecord) -> Result<()> {
        let key = rec.key();
        let sealed = self.seal_with(rec, Self::instance_aad(&key))?;
        self.submit(Op(vec![
            Write::Insert(
                Tbl::Index,
                self.sop_index(&rec.study_id, &rec.sop_instance_uid),
                rec.instance_id.clone().into_bytes(),
            ),
            Write::Insert(Tbl::Instances, key, sealed),
        ]))
    }

    /// Replaces an instance record (a commit of this replica's store is a
    /// compare-and-set, as in [`Self::put`]).
    pub fn put_instance(&self, rec: &InstanceRecord) -> Result<()> {
        let key = rec.key();
        let sealed = self.seal_with(rec, Self::instance_aad(&key))?;
        let w = self.guarded(
            Tbl::Instances,
            key.clone(),
            sealed,
            rec.state,
            &rec.replica,
            |b| {
                let r: InstanceRecord = self.open_with(&key, Self::instance_aad(&key), b)?;
                Ok((r.state, r.replica))
            },
        )?;
        self.submit(Op(vec![w]))
    }

    /// Removes an instance record and its SOP index entry (unless the
    /// entry names another instance by now: see [`Self::release_sop`]).
    pub fn remove_instance(&self, rec: &InstanceRecord) -> Result<()> {
        self.submit(Op(vec![
            Write::Remove(Tbl::Instances, rec.key()),
            Write::RemoveIndexIf(
                self.sop_index(&rec.study_id, &rec.sop_instance_uid),
                rec.instance_id.clone(),
            ),
        ]))
    }

    /// Frees the SOP Instance UID of a pending instance whose objects
    /// could not all be removed (its record stays for the sweep), so the
    /// instance can be stored again under another instance id.
    pub fn release_sop(&self, rec: &InstanceRecord) -> Result<()> {
        self.submit(Op(vec![Write::RemoveIndexIf(
            self.sop_index(&rec.study_id, &rec.sop_instance_uid),
            rec.instance_id.clone(),
        )]))
    }

    /// The instance of a study holding this SOP Instance UID, any state.
    pub fn instance_by_sop(&self, study_id: &str, sop_uid: &str) -> Result<Option<InstanceRecord>> {
        let Some(id) = self.index_value(&self.sop_index(study_id, sop_uid))? else {
            return Ok(None);
        };
        let key = format!("{study_id}/{id}");
        match self.backend.get(Tbl::Instances, &key)? {
            Some(v) => Ok(Some(self.open_with(&key, Self::instance_aad(&key), &v)?)),
            None => Ok(None),
        }
    }

    /// Every instance record of a study (any state), in store order.
    pub fn instances(&self, study_id: &str) -> Result<Vec<InstanceRecord>> {
        // '0' is the character after '/'.
        let (from, to) = (format!("{study_id}/"), format!("{study_id}0"));
        let mut out = Vec::new();
        for (k, v) in self.backend.range(Tbl::Instances, &from, Some(&to))? {
            let rec: InstanceRecord = self.open_with(&k, Self::instance_aad(&k), &v)?;
            if rec.key() != k {
                return Err(GatewayError::Vault(format!(
                    "record {k} names another instance"
                )));
            }
            out.push(rec);
        }
        out.sort_by(|a, b| (a.seq, &a.instance_id).cmp(&(b.seq, &b.instance_id)));
        Ok(out)
    }

    /// Instances left pending (by a crash), for the start-up sweep.
    pub fn unfinished_instances(&self) -> Result<Vec<InstanceRecord>> {
        let mut out = Vec::new();
        for (k, v) in self.backend.range(Tbl::Instances, "", None)? {
            let rec: InstanceRecord = self.open_with(&k, Self::instance_aad(&k), &v)?;
            if rec.state != StudyState::Committed {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// The ids of every committed study, in key order (for scrub and repair).
    pub fn committed_ids(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (k, v) in self.backend.range(Tbl::Studies, "", None)? {
            let rec = self.open_record(&k, &v)?;
            if rec.state == StudyState::Committed {
                out.push(rec.study_id);
            }
        }
        Ok(out)
    }

    /// Number of study records (committed, and any being stored or
    /// deleted right now): one table length, cheap enough for `/metrics`.
    pub fn count_studies(&self) -> Result<u64> {
        self.backend.len(Tbl::Studies)
    }

    /// [`Self::count_studies`] for `/metrics`: read again only when this
    /// process changed the vault since, or after `ttl`, so scrapes do not
    /// each reach the database (a failed read is reused too: a database
    /// that is down is not asked at every scrape). None: could not read.
    pub fn count_studies_cached(&self, ttl: std::time::Duration) -> Option<u64> {
        let mut cache = self
            .count_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let writes = self.writes.load(std::sync::atomic::Ordering::SeqCst);
        if let Some((w, at, n)) = *cache
            && w == writes
            && at.elapsed() < ttl
        {
            return n;
        }
        let n = self.count_studies().ok();
        *cache = Some((writes, std::time::Instant::now(), n));
        n
    }

    /// Number of committed studies.
    pub fn count_committed(&self) -> Result<usize> {
        let mut n = 0;
        for (k, v) in self.backend.range(Tbl::Studies, "", None)? {
            if self.open_record(&k, &v)?.state == StudyState::Committed {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Vault {
    /// Copies every row, sealed as stored, into the new owner-only redb
    /// file `out` (the backup of a PostgreSQL vault, restorable with
    /// `gateway vault-restore` into a redb vault), then opens every record
    /// of the copy under the vault key. Never overwrites `out`.
    pub fn export_redb(&self, out: &Path) -> Result<VaultCounts> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(out)
            .map_err(|e| GatewayError::Vault(format!("{}: {e}", out.display())))?;
        let db = redb::Database::create(out)?;
        let w = db.begin_write()?;
        {
            let mut studies = w.open_table(STUDIES)?;
            for (k, v) in self.backend.range(Tbl::Studies, "", None)? {
                studies.insert(k.as_str(), v.as_slice())?;
            }
            let mut instances = w.open_table(INSTANCES)?;
            for (k, v) in self.backend.range(Tbl::Instances, "", None)? {
                instances.insert(k.as_str(), v.as_slice())?;
            }
            let mut index = w.open_table(INDEX)?;
            for (k, v) in self.backend.range(Tbl::Index, "", None)? {
                let v = String::from_utf8(v)
                    .map_err(|_| GatewayError::Vault(format!("index entry {k} is not text")))?;
                index.insert(k.as_str(), v.as_str())?;
            }
        }
        w.commit()?;
        check_sealed_with(&db, &self.key)
    }
}

/// The vault's tables, sorted by name: a backup refuses any other.
pub(crate) const TABLE_NAMES: [&str; 3] = ["dicom_index", "instances", "studies"];

/// Copies every table of the vault byte for byte (records stay sealed);
/// returns the rows copied.
pub(crate) fn copy_tables(
    r: &redb::ReadTransaction,
    w: &redb::WriteTransaction,
) -> Result<u64, redb::Error> {
    use tessera_runtime::snapshot::copy_table;
    Ok([
        copy_table(r, w, STUDIES)?,
        copy_table(r, w, INSTANCES)?,
        copy_table(r, w, INDEX)?,
    ]
    .into_iter()
    .map(|n| n.unwrap_or(0))
    .sum())
}

/// What [`check_sealed`] opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaultCounts {
    /// Study records.
    pub studies: u64,
    /// DICOM instance records.
    pub instances: u64,
    /// Index entries.
    pub index: u64,
}

/// Opens every record of a vault database under `key` (the AEAD tag, the
/// id it is bound to, the id it names): what a restore accepts.
pub(crate) fn check_sealed(db: &impl ReadableDatabase, key: &[u8; 32]) -> Result<VaultCounts> {
    check_sealed_with(db, &VaultKey::new(key)?)
}

fn check_sealed_with(db: &impl ReadableDatabase, vk: &VaultKey) -> Result<VaultCounts> {
    let r = db.begin_read()?;
    let studies = r.open_table(STUDIES)?;
    let instances = r.open_table(INSTANCES)?;
    let mut counts = VaultCounts {
        studies: 0,
        instances: 0,
        index: 0,
    };
    for item in studies.iter()? {
        let (k, v) = item?;
        let rec: StudyRecord = open_sealed(vk, k.value(), study_aad(k.value()), v.value())?;
        if rec.study_id != k.value() {
            return Err(GatewayError::Vault(format!(
                "record {} names another study",
                k.value()
            )));
        }
        counts.studies += 1;
    }
    for item in instances.iter()? {
        let (k, v) = item?;
        let rec: InstanceRecord = open_sealed(vk, k.value(), instance_aad(k.value()), v.value())?;
        if rec.key() != k.value() {
            return Err(GatewayError::Vault(format!(
                "record {} names another instance",
                k.value()
            )));
        }
        counts.instances += 1;
    }
    // Index entries are HMACs naming ids, not sealed: counted, not opened.
    counts.index = r.open_table(INDEX)?.len()?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> StudyRecord {
        StudyRecord {
            study_id: id.into(),
            state: StudyState::Pending,
            owner: "spiffe://tessera.local/user/owner".into(),
            stored_by: "spiffe://tessera.local/user/clinician".into(),
            attributes: vec![("patient_name".into(), "Doe^Jane".into())],
            original_format: 1,
            spec: SpecRecord {
                width: 4,
                height: 4,
                frames: 1,
                bits_allocated: 8,
                bits_stored: 8,
                signed: false,
                channels: 1,
            },
            header_json: "{}".into(),
            placements: vec![],
            created_unix: 1,
            dicom_study_uid: String::new(),
            replica: String::new(),
        }
    }

    #[test]
    fn records_are_sealed_at_rest_and_bound_to_their_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault.redb");
        let key = [7u8; 32];
        let v = Vault::open(&path, &key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "the vault file is owner-only");
        }
        let mut r = record("st-00000000000000000000000000000001");
        v.insert_new(&r).unwrap();
        assert!(v.insert_new(&r).is_err(), "ids are unique");
        // Concurrent writers are folded into shared commits; each answered.
        std::thread::scope(|sc| {
            for i in 0..32u32 {
                let v = &v;
                sc.spawn(move || {
                    let mut x = record(&format!("st-{:032x}", i + 1000));
                    x.state = StudyState::Committed;
                    v.insert_new(&x).unwrap();
                });
            }
        });
        assert_eq!(v.count_committed().unwrap(), 32);
        for i in 0..32u32 {
            v.remove(&format!("st-{:032x}", i + 1000)).unwrap();
        }
        assert!(matches!(
            v.committed(&r.study_id),
            Err(GatewayError::NotFound(_))
        ));
        assert_eq!(v.unfinished().unwrap().len(), 1);
        r.state = StudyState::Committed;
        v.put(&r).unwrap();
        assert_eq!(v.committed(&r.study_id).unwrap(), r);
        assert_eq!(v.count_committed().unwrap(), 1);
        drop(v);
        // No attribute value anywhere in the file.
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(8).any(|w| w == b"Doe^Jane"));
        // Wrong key: the record does not open.
        let v = Vault::open(&path, &[8u8; 32]).unwrap();
        assert!(matches!(v.get(&r.study_id), Err(GatewayError::Vault(_))));
        drop(v);
        let v = Vault::open(&path, &key).unwrap();
        v.remove(&r.study_id).unwrap();
        assert!(v.get(&r.study_id).unwrap().is_none());
    }

    #[test]
    fn key_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        create_key_file(&p).unwrap();
        let k = load_key_file(&p).unwrap();
        create_key_file(&p).unwrap();
        assert_eq!(load_key_file(&p).unwrap(), k, "an existing key is kept");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_key_file(&p).unwrap_err().contains("too open"));
        let q = dir.path().join("short");
        std::fs::write(&q, b"abc").unwrap();
        std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load_key_file(&q).is_err());
    }
}
