//! The object store: redb tables behind a small API, every object checked
//! by SHA-256 on every read.
//!
//! Layout (format 1):
//! * `objects`: id -> meta record (version, size, sha256, created, chunk count)
//! * `chunks`: (id, index) -> at most [`STORE_CHUNK`] bytes
//! * `node`: "instance_id", "used_bytes", "object_count"
//!
//! An object's meta, chunks and the usage counters change in one write
//! transaction, committed with `Durability::Immediate` and two-phase commit,
//! so after a crash an object is either wholly there or absent.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

use crate::Error;

/// Object metadata, keyed by id.
pub const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
/// Object bytes, keyed by (id, chunk index).
pub const CHUNKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("chunks");
/// Node-wide values.
pub const NODE: TableDefinition<&str, &[u8]> = TableDefinition::new("node");

/// Size of the pieces an object is stored in.
pub const STORE_CHUNK: usize = 1024 * 1024;
/// Longest object id.
pub const MAX_ID_LEN: usize = 128;

const META_VERSION: u8 = 1;
const META_LEN: usize = 1 + 8 + 32 + 8 + 4;

/// Checks an object id: 1-128 of `[A-Za-z0-9._-]`, not starting with '.'.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.chars().take(MAX_ID_LEN + 8).collect()))
    }
}

/// Capacity limits of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sum of all object sizes.
    pub capacity_bytes: u64,
    /// Largest single object.
    pub max_object_bytes: u64,
}

/// What the node knows about an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub id: String,
    pub size: u64,
    pub sha256: [u8; 32],
    pub created_unix: u64,
    chunks: u32,
}

impl ObjectMeta {
    fn encode(&self) -> [u8; META_LEN] {
        let mut out = [0u8; META_LEN];
        out[0] = META_VERSION;
        out[1..9].copy_from_slice(&self.size.to_le_bytes());
        out[9..41].copy_from_slice(&self.sha256);
        out[41..49].copy_from_slice(&self.created_unix.to_le_bytes());
        out[49..53].copy_from_slice(&self.chunks.to_le_bytes());
        out
    }

    fn decode(id: &str, raw: &[u8]) -> Result<Self, Error> {
        let corrupt = |detail: &str| Error::Corrupt {
            id: id.to_owned(),
            detail: detail.to_owned(),
        };
        if raw.len() != META_LEN || raw[0] != META_VERSION {
            return Err(corrupt("metadata record is damaged"));
        }
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&raw[9..41]);
        let mut chunks = [0u8; 4];
        chunks.copy_from_slice(&raw[49..53]);
        Ok(Self {
            id: id.to_owned(),
            size: u64_at(1),
            sha256,
            created_unix: u64_at(41),
            chunks: u32::from_le_bytes(chunks),
        })
    }
}

/// Node-wide usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub used_bytes: u64,
    pub object_count: u64,
}

/// A verified object being streamed out (see [`Store::open_object`]).
pub struct ObjectReader {
    meta: ObjectMeta,
    chunks: redb::ReadOnlyTable<(&'static str, u32), &'static [u8]>,
    next: u32,
}

impl std::fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectReader")
            .field("meta", &self.meta)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl ObjectReader {
    pub fn meta(&self) -> &ObjectMeta {
        &self.meta
    }

    /// The next chunk (at most [`STORE_CHUNK`] bytes), or `None` after the
    /// last one.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        if self.next >= self.meta.chunks {
            return Ok(None);
        }
        let id = self.meta.id.as_str();
        let piece = self
            .chunks
            .get((id, self.next))
            .map_err(Error::db)?
            .ok_or_else(|| Error::Corrupt {
                id: id.to_owned(),
                detail: format!("chunk {} vanished from the read snapshot", self.next),
            })?
            .value()
            .to_vec();
        self.next += 1;
        Ok(Some(piece))
    }
}

/// A put waiting for the next group commit.
#[derive(Debug)]
struct PendingPut {
    ticket: u64,
    id: String,
    data: Vec<u8>,
    sha256: [u8; 32],
}

type PutOutcome = Result<(ObjectMeta, bool), Error>;

/// Group commit of puts: callers queue their object; whoever finds no
/// commit running becomes the leader, writes every queued object in one
/// durable transaction and hands each caller its own outcome. Concurrent
/// puts share one two-phase commit (two fsyncs) instead of paying for one
/// each; every caller still returns only after its object is durable.
#[derive(Debug, Default)]
struct Batcher {
    state: std::sync::Mutex<BatchState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct BatchState {
    next_ticket: u64,
    committing: bool,
    queue: Vec<PendingPut>,
    results: std::collections::HashMap<u64, PutOutcome>,
}

/// Most bytes written by one group commit (a batch stops growing there).
const MAX_BATCH_BYTES: usize = 64 * 1024 * 1024;

/// The redb-backed object store of one node.
#[derive(Debug)]
pub struct Store {
    db: Database,
    limits: Limits,
    instance_id: String,
    path: PathBuf,
    batcher: Batcher,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn read_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, Error> {
    match table.get(key).map_err(Error::db)? {
        None => Ok(0),
        Some(v) => {
            let raw = v.value();
            let arr: [u8; 8] = raw.try_into().map_err(|_| Error::Corrupt {
                id: format!("<node {key}>"),
                detail: "counter record is damaged".into(),
            })?;
            Ok(u64::from_le_bytes(arr))
        }
    }
}

fn begin_durable(db: &Database) -> Result<redb::WriteTransaction, Error> {
    let mut txn = db.begin_write().map_err(Error::db)?;
    // Immediate durability is redb's default; two-phase commit guards the
    // commit against a torn or misdirected write of the new root.
    txn.set_two_phase_commit(true);
    Ok(txn)
}

impl Store {
    /// Opens (or creates) the database at `path`; repairs after a crash.
    pub fn open(path: &Path, limits: Limits) -> Result<Self, Error> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| Error::Io {
                path: parent.to_owned(),
                source,
            })?;
        }
        // Owner-only: object ids and sizes are nobody else's business.
        tessera_runtime::private_db_file(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        let db = Database::create(path).map_err(Error::db)?;
        let txn = begin_durable(&db)?;
        let instance_id = {
            txn.open_table(OBJECTS).map_err(Error::db)?;
            txn.open_table(CHUNKS).map_err(Error::db)?;
            let mut node = txn.open_table(NODE).map_err(Error::db)?;
            let existing = node
                .get("instance_id")
                .map_err(Error::db)?
                .map(|v| String::from_utf8_lossy(v.value()).into_owned());
            match existing {
                Some(id) => id,
                None => {
                    let mut raw = [0u8; 16];
                    rand::rng().fill_bytes(&mut raw);
                    let id = hex::encode(raw);
                    node.insert("instance_id", id.as_bytes())
                        .map_err(Error::db)?;
                    id
                }
            }
        };
        txn.commit().map_err(Error::db)?;
        Ok(Self {
            db,
            limits,
            instance_id,
            path: path.to_owned(),
            batcher: Batcher::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks a declared size against the limits before any byte arrives.
    pub fn admit(&self, id: &str, size: u64) -> Result<(), Error> {
        validate_id(id)?;
        if size > self.limits.max_object_bytes {
            return Err(Error::TooLarge {
                id: id.to_owned(),
                size,
                max: self.limits.max_object_bytes,
            });
        }
        let usage = self.usage()?;
        let available = self.limits.capacity_bytes.saturating_sub(usage.used_bytes);
        if size > available {
            return Err(Error::CapacityExceeded {
                id: id.to_owned(),
                needed: size,
                available,
            });
        }
        Ok(())
    }

    /// Stores `data` under `id`, hashing it here.
    pub fn put(&self, id: &str, data: &[u8]) -> Result<(ObjectMeta, bool), Error> {
        let digest: [u8; 32] = Sha256::digest(data).into();
        self.put_hashed(id, data, digest)
    }

    /// Stores `data` whose SHA-256 the caller already computed over exactly
    /// these bytes. Returns the meta and whether it was newly created;
    /// identical content under the same id is a no-op (idempotent). Returns
    /// only once the object is durable (group-committed with concurrent puts).
    pub fn put_hashed(
        &self,
        id: &str,
        data: &[u8],
        sha256: [u8; 32],
    ) -> Result<(ObjectMeta, bool), Error> {
        validate_id(id)?;
        let size = data.len() as u64;
        if size > self.limits.max_object_bytes {
            return Err(Error::TooLarge {
                id: id.to_owned(),
                size,
                max: self.limits.max_object_bytes,
            });
        }
        let poisoned = || Error::Task("the put queue lock is poisoned".into());
        let mut st = self.batcher.state.lock().map_err(|_| poisoned())?;
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push(PendingPut {
            ticket,
            id: id.to_owned(),
            data: data.to_vec(),
            sha256,
        });
        loop {
            if let Some(r) = st.results.remove(&ticket) {
                return r;
            }
            if st.committing {
                st = self.batcher.done.wait(st).map_err(|_| poisoned())?;
                continue;
            }
            // Lead: take what is queued (bounded by bytes), commit it.
            st.committing = true;
            let mut batch = Vec::new();
            let mut bytes = 0usize;
            while !st.queue.is_empty() && (batch.is_empty() || bytes < MAX_BATCH_BYTES) {
                let p = st.queue.remove(0);
                bytes += p.data.len();
                batch.push(p);
            }
            drop(st);
            let outcomes = self.commit_puts(&batch);
            st = self.batcher.state.lock().map_err(|_| poisoned())?;
            st.committing = false;
            for (p, r) in batch.iter().zip(outcomes) {
                st.results.insert(p.ticket, r);
            }
            self.batcher.done.notify_all();
        }
    }

    /// Writes a batch in one durable transaction. A refused object (id taken
    /// by other bytes, no capacity) gets its own error and leaves the others
    /// alone; a storage failure fails every object of the batch.
    fn commit_puts(&self, batch: &[PendingPut]) -> Vec<PutOutcome> {
        match self.try_commit_puts(batch) {
            Ok(v) => v,
            Err(e) => {
                let msg = e.to_string();
                batch
                    .iter()
                    .map(|_| Err(Error::Task(format!("commit failed: {msg}"))))
                    .collect()
            }
        }
    }

    fn try_commit_puts(&self, batch: &[PendingPut]) -> Result<Vec<PutOutcome>, Error> {
        let txn = begin_durable(&self.db)?;
        let mut out = Vec::with_capacity(batch.len());
        let mut created_any = false;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(Error::db)?;
            let mut node = txn.open_table(NODE).map_err(Error::db)?;
            let mut chunks = txn.open_table(CHUNKS).map_err(Error::db)?;
            let mut used = read_u64(&node, "used_bytes")?;
            let mut count = read_u64(&node, "object_count")?;
            for p in batch {
                let id = p.id.as_str();
                let size = p.data.len() as u64;
                let existing = match objects.get(id).map_err(Error::db)? {
                    Some(raw) => Some(ObjectMeta::decode(id, raw.value())?),
                    None => None,
                };
                if let Some(existing) = existing {
                    out.push(if existing.sha256 == p.sha256 && existing.size == size {
                        Ok((existing, false))
                    } else {
                        Err(Error::Conflict(id.to_owned()))
                    });
                    continue;
                }
                let available = self.limits.capacity_bytes.saturating_sub(used);
                if size > available {
                    out.push(Err(Error::CapacityExceeded {
                        id: id.to_owned(),
                        needed: size,
                        available,
                    }));
                    continue;
                }
                let mut n: u32 = 0;
                for piece in p.data.chunks(STORE_CHUNK) {
                    chunks.insert((id, n), piece).map_err(Error::db)?;
                    n += 1;
                }
                let meta = ObjectMeta {
                    id: id.to_owned(),
                    size,
                    sha256: p.sha256,
                    created_unix: now_unix(),
                    chunks: n,
                };
                objects.insert(id, &meta.encode()[..]).map_err(Error::db)?;
                used += size;
                count += 1;
                created_any = true;
                out.push(Ok((meta, true)));
            }
            if created_any {
                node.insert("used_bytes", &used.to_le_bytes()[..])
                    .map_err(Error::db)?;
                node.insert("object_count", &count.to_le_bytes()[..])
                    .map_err(Error::db)?;
            }
        }
        if created_any {
            txn.commit().map_err(Error::db)?;
        } else {
            txn.abort().map_err(Error::db)?;
        }
        Ok(out)
    }

    /// The object's metadata.
    pub fn stat(&self, id: &str) -> Result<ObjectMeta, Error> {
        validate_id(id)?;
        let txn = self.db.begin_read().map_err(Error::db)?;
        let objects = txn.open_table(OBJECTS).map_err(Error::db)?;
        let raw = objects
            .get(id)
            .map_err(Error::db)?
            .ok_or_else(|| Error::NotFound(id.to_owned()))?;
        ObjectMeta::decode(id, raw.value())
    }

    /// Reads the whole object into memory (tests and tools; the service
    /// streams with [`Self::open_object`]). Checked like `open_object`.
    pub fn get(&self, id: &str) -> Result<(ObjectMeta, Vec<Vec<u8>>), Error> {
        let mut reader = self.open_object(id)?;
        let mut pieces = Vec::with_capacity(reader.meta().chunks as usize);
        while let Some(piece) = reader.next_chunk()? {
            pieces.push(piece);
        }
        Ok((reader.meta, pieces))
    }

    /// Opens an object for streaming from one read snapshot. Its size, chunk
    /// count and SHA-256 are checked by a first pass that holds one chunk at
    /// a time, so corrupt data is never served and memory stays at one
    /// [`STORE_CHUNK`] whatever the object's size; the returned reader then
    /// reads the chunks again, one per call, from the same snapshot (a
    /// concurrent delete cannot tear the stream).
    pub fn open_object(&self, id: &str) -> Result<ObjectReader, Error> {
        validate_id(id)?;
        let txn = self.db.begin_read().map_err(Error::db)?;
        let objects = txn.open_table(OBJECTS).map_err(Error::db)?;
        let meta = {
            let raw = objects
                .get(id)
                .map_err(Error::db)?
                .ok_or_else(|| Error::NotFound(id.to_owned()))?;
            ObjectMeta::decode(id, raw.value())?
        };
        let chunks = txn.open_table(CHUNKS).map_err(Error::db)?;
        let mut hasher = Sha256::new();
        let mut count: u64 = 0;
        let mut total: u64 = 0;
        for entry in chunks
            .range((id, 0u32)..=(id, u32::MAX))
            .map_err(Error::db)?
        {
            let (_, v) = entry.map_err(Error::db)?;
            let bytes = v.value();
            hasher.update(bytes);
            total += bytes.len() as u64;
            count += 1;
        }
        let corrupt = |detail: String| Error::Corrupt {
            id: id.to_owned(),
            detail,
        };
        if count != u64::from(meta.chunks) || total != meta.size {
            return Err(corrupt(format!(
                "expected {} bytes in {} chunks, found {total} in {count}",
                meta.size, meta.chunks,
            )));
        }
        let digest: [u8; 32] = hasher.finalize().into();
        if digest != meta.sha256 {
            return Err(corrupt("SHA-256 mismatch (bit rot)".to_owned()));
        }
        Ok(ObjectReader {
            meta,
            chunks,
            next: 0,
        })
    }

    /// Objects in id order: those starting with `prefix`, strictly after
    /// `start_after`, at most `limit`. Returns the page and, when more may
    /// follow, the id to continue after.
    pub fn list(
        &self,
        prefix: &str,
        start_after: &str,
        limit: usize,
    ) -> Result<(Vec<ObjectMeta>, Option<String>), Error> {
        if prefix.len() > MAX_ID_LEN || start_after.len() > MAX_ID_LEN {
            return Err(Error::BadList("prefix/start_after too long".into()));
        }
        let txn = self.db.begin_read().map_err(Error::db)?;
        let objects = txn.open_table(OBJECTS).map_err(Error::db)?;
        let start = if start_after > prefix {
            start_after
        } else {
            prefix
        };
        let mut out = Vec::new();
        let mut more = false;
        for entry in objects.range::<&str>(start..).map_err(Error::db)? {
            let (k, v) = entry.map_err(Error::db)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            if key == start_after {
                continue;
            }
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(ObjectMeta::decode(key, v.value())?);
        }
        let next = if more {
            out.last().map(|m| m.id.clone())
        } else {
            None
        };
        Ok((out, next))
    }

    /// Deletes an object; returns the bytes freed.
    pub fn delete(&self, id: &str) -> Result<u64, Error> {
        validate_id(id)?;
        let txn = begin_durable(&self.db)?;
        let size = {
            let mut objects = txn.open_table(OBJECTS).map_err(Error::db)?;
            let meta = match objects.remove(id).map_err(Error::db)? {
                Some(raw) => ObjectMeta::decode(id, raw.value())?,
                None => return Err(Error::NotFound(id.to_owned())),
            };
            let mut chunks = txn.open_table(CHUNKS).map_err(Error::db)?;
            for n in 0..meta.chunks {
                chunks.remove((id, n)).map_err(Error::db)?;
            }
            let mut node = txn.open_table(NODE).map_err(Error::db)?;
            let used = read_u64(&node, "used_bytes")?;
            let count = read_u64(&node, "object_count")?;
            node.insert(
                "used_bytes",
                &used.saturating_sub(meta.size).to_le_bytes()[..],
            )
            .map_err(Error::db)?;
            node.insert("object_count", &count.saturating_sub(1).to_le_bytes()[..])
                .map_err(Error::db)?;
            meta.size
        };
        txn.commit().map_err(Error::db)?;
        Ok(size)
    }

    pub fn usage(&self) -> Result<Usage, Error> {
        let txn = self.db.begin_read().map_err(Error::db)?;
        let node = txn.open_table(NODE).map_err(Error::db)?;
        Ok(Usage {
            used_bytes: read_u64(&node, "used_bytes")?,
            object_count: read_u64(&node, "object_count")?,
        })
    }
}

#[cfg(test)]
mod tests;
