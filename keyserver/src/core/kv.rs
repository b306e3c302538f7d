//! The table store under the core: named tables of byte values keyed by
//! text or by number, read and written in transactions, on one of two
//! backends chosen in config (`[keyserver.store]`):
//!
//! * redb, the default: one file, the tables of `store.rs` exactly as they
//!   always were (existing files open unchanged);
//! * PostgreSQL (`kv_pg.rs`): one table per named table, several keyserver
//!   replicas on one database.
//!
//! Everything in the core reaches its state through [`KvRead`] (snapshots
//! and write transactions alike) and [`KvWrite`] (the writer's transaction);
//! nothing outside this file and `kv_pg.rs` names a backend type, except the
//! redb-file tools (`backup.rs`, offline `verify`/`audit-recover` on a file).

use std::ops::Bound;

use redb::{
    ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, TableError, WriteTransaction,
};

use crate::error::{KeyServerError, Result};

/// The key and value types of a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text keys, byte values.
    Named,
    /// Text keys `a|b`, no value (an index).
    Index,
    /// Numeric keys (u64 in redb), byte values.
    Seq,
    /// Numeric keys stored as u32 in redb (master versions), byte values.
    Seq32,
}

/// Every table the keyserver keeps (see the layout in `store.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tbl {
    /// Small named values.
    Meta,
    /// Master secrets by version.
    Masters,
    /// Studies by id.
    Studies,
    /// Key requests by id.
    Requests,
    /// Index: requests of a study.
    StudyRequests,
    /// Index: studies of an owner.
    OwnerStudies,
    /// The hash-chained audit log.
    Audit,
    /// Signed audit checkpoints.
    Checkpoints,
    /// Signed recovery entries.
    AuditRecoveries,
    /// Index: delegates of an owner.
    Delegates,
    /// Standing approvals by id.
    Standing,
    /// Index: standing approvals of an owner.
    OwnerStanding,
    /// Per-owner access settings.
    OwnerSettings,
    /// Index: requests of a requester.
    RequesterRequests,
}

impl Tbl {
    /// Every table, in backup order.
    pub const ALL: [Tbl; 14] = [
        Tbl::Meta,
        Tbl::Masters,
        Tbl::Studies,
        Tbl::Requests,
        Tbl::StudyRequests,
        Tbl::OwnerStudies,
        Tbl::Audit,
        Tbl::Checkpoints,
        Tbl::AuditRecoveries,
        Tbl::Delegates,
        Tbl::Standing,
        Tbl::OwnerStanding,
        Tbl::OwnerSettings,
        Tbl::RequesterRequests,
    ];

    /// The redb table name (and the PostgreSQL one, prefixed `ks_`).
    pub fn name(self) -> &'static str {
        match self {
            Tbl::Meta => "meta",
            Tbl::Masters => "masters",
            Tbl::Studies => "studies",
            Tbl::Requests => "requests",
            Tbl::StudyRequests => "study_requests",
            Tbl::OwnerStudies => "owner_studies",
            Tbl::Audit => "audit",
            Tbl::Checkpoints => "audit_checkpoints",
            Tbl::AuditRecoveries => "audit_recoveries",
            Tbl::Delegates => "delegates",
            Tbl::Standing => "standing",
            Tbl::OwnerStanding => "owner_standing",
            Tbl::OwnerSettings => "owner_settings",
            Tbl::RequesterRequests => "requester_requests",
        }
    }

    /// Its key and value types.
    pub fn kind(self) -> Kind {
        match self {
            Tbl::Meta | Tbl::Studies | Tbl::Requests | Tbl::Standing | Tbl::OwnerSettings => {
                Kind::Named
            }
            Tbl::StudyRequests
            | Tbl::OwnerStudies
            | Tbl::Delegates
            | Tbl::OwnerStanding
            | Tbl::RequesterRequests => Kind::Index,
            Tbl::Audit | Tbl::Checkpoints | Tbl::AuditRecoveries => Kind::Seq,
            Tbl::Masters => Kind::Seq32,
        }
    }
}

/// A key as passed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'a> {
    /// Of a `Named` or `Index` table.
    Str(&'a str),
    /// Of a `Seq` or `Seq32` table.
    Num(u64),
}

/// A key as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBuf {
    /// Of a `Named` or `Index` table.
    Str(String),
    /// Of a `Seq` or `Seq32` table.
    Num(u64),
}

impl KeyBuf {
    /// The numeric key (0 for a text one, which a numeric table never holds).
    pub fn num(&self) -> u64 {
        match self {
            KeyBuf::Num(n) => *n,
            KeyBuf::Str(_) => 0,
        }
    }
    /// The text key (empty for a numeric one).
    pub fn text(&self) -> &str {
        match self {
            KeyBuf::Str(s) => s,
            KeyBuf::Num(_) => "",
        }
    }
}

/// A visitor of a scan: return `Ok(false)` to stop.
pub type Visit<'f> = &'f mut dyn FnMut(KeyBuf, &[u8]) -> Result<bool>;

/// Reading: a consistent snapshot, or the writer's transaction.
pub trait KvRead {
    /// The value under `key`.
    fn get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>>;
    /// Visits the rows with `lo <= key < hi` in key order.
    fn scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()>;
    /// The row with the greatest key.
    fn last(&self, t: Tbl) -> Result<Option<(KeyBuf, Vec<u8>)>>;
    /// How many rows.
    fn len(&self, t: Tbl) -> Result<u64>;
}

/// Writing, inside the one write transaction of a batch.
pub trait KvWrite: KvRead {
    /// Inserts or replaces.
    fn insert(&self, t: Tbl, key: Key<'_>, value: &[u8]) -> Result<()>;
    /// Removes (nothing if absent).
    fn remove(&self, t: Tbl, key: Key<'_>) -> Result<()>;
}

/// A write transaction that is committed or dropped (aborted).
pub trait KvTxn: KvWrite {
    /// Makes every write durable at once.
    fn commit(self: Box<Self>) -> Result<()>;
    /// The transaction as a writer.
    fn as_write(&self) -> &dyn KvWrite;
}

/// Typed short-hands over any reader.
impl dyn KvRead + '_ {
    /// Text-keyed value.
    pub fn get_str(&self, t: Tbl, key: &str) -> Result<Option<Vec<u8>>> {
        self.get(t, Key::Str(key))
    }
    /// Number-keyed value.
    pub fn get_num(&self, t: Tbl, key: u64) -> Result<Option<Vec<u8>>> {
        self.get(t, Key::Num(key))
    }
    /// Every row, in key order.
    pub fn scan_all(&self, t: Tbl, f: Visit<'_>) -> Result<()> {
        self.scan(t, Bound::Unbounded, Bound::Unbounded, f)
    }
    /// Rows with numeric keys from `from` on.
    pub fn scan_from(&self, t: Tbl, from: u64, f: Visit<'_>) -> Result<()> {
        self.scan(t, Bound::Included(Key::Num(from)), Bound::Unbounded, f)
    }
    /// Rows with text keys in `lo..hi`.
    pub fn scan_text(&self, t: Tbl, lo: &str, hi: &str, f: Visit<'_>) -> Result<()> {
        self.scan(
            t,
            Bound::Included(Key::Str(lo)),
            Bound::Excluded(Key::Str(hi)),
            f,
        )
    }
    /// The greatest numeric key (0 if empty).
    pub fn last_num(&self, t: Tbl) -> Result<u64> {
        Ok(self.last(t)?.map_or(0, |(k, _)| k.num()))
    }
}

/// Typed short-hands over the writer's transaction.
impl dyn KvWrite + '_ {
    /// As a reader.
    pub fn read(&self) -> &dyn KvRead {
        upcast(self)
    }
    /// Text-keyed value.
    pub fn get_str(&self, t: Tbl, key: &str) -> Result<Option<Vec<u8>>> {
        self.get(t, Key::Str(key))
    }
    /// Inserts under a text key.
    pub fn put_str(&self, t: Tbl, key: &str, value: &[u8]) -> Result<()> {
        self.insert(t, Key::Str(key), value)
    }
    /// Inserts under a numeric key.
    pub fn put_num(&self, t: Tbl, key: u64, value: &[u8]) -> Result<()> {
        self.insert(t, Key::Num(key), value)
    }
    /// Removes a text key.
    pub fn remove_str(&self, t: Tbl, key: &str) -> Result<()> {
        self.remove(t, Key::Str(key))
    }
}

fn upcast<'a>(w: &'a (dyn KvWrite + 'a)) -> &'a (dyn KvRead + 'a) {
    w
}

const fn named(name: &str) -> TableDefinition<'_, &'static str, &'static [u8]> {
    TableDefinition::new(name)
}
const fn index(name: &str) -> TableDefinition<'_, &'static str, ()> {
    TableDefinition::new(name)
}
const fn seq(name: &str) -> TableDefinition<'_, u64, &'static [u8]> {
    TableDefinition::new(name)
}
const fn seq32(name: &str) -> TableDefinition<'_, u32, &'static [u8]> {
    TableDefinition::new(name)
}

fn text_key<'a>(t: Tbl, k: Key<'a>) -> Result<&'a str> {
    match k {
        Key::Str(s) => Ok(s),
        Key::Num(_) => Err(KeyServerError::Storage(format!(
            "numeric key for table {}",
            t.name()
        ))),
    }
}

fn num_key(t: Tbl, k: Key<'_>) -> Result<u64> {
    match k {
        Key::Num(n) => Ok(n),
        Key::Str(_) => Err(KeyServerError::Storage(format!(
            "text key for table {}",
            t.name()
        ))),
    }
}

fn num32_key(t: Tbl, k: Key<'_>) -> Result<u32> {
    u32::try_from(num_key(t, k)?)
        .map_err(|_| KeyServerError::InvalidArgument(format!("key out of range for {}", t.name())))
}

fn bound_map<'k, T>(b: Bound<Key<'k>>, f: impl Fn(Key<'k>) -> Result<T>) -> Result<Bound<T>> {
    Ok(match b {
        Bound::Included(k) => Bound::Included(f(k)?),
        Bound::Excluded(k) => Bound::Excluded(f(k)?),
        Bound::Unbounded => Bound::Unbounded,
    })
}

/// Reads through any redb table of one kind.
trait RedbTable {
    fn r_get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>>;
    fn r_scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()>;
    fn r_last(&self) -> Result<Option<(KeyBuf, Vec<u8>)>>;
    fn r_len(&self) -> Result<u64>;
}

impl<T: ReadableTable<&'static str, &'static [u8]>> RedbTable for Named<T> {
    fn r_get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(text_key(t, key)?)?.map(|g| g.value().to_vec()))
    }
    fn r_scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        let lo = bound_map(lo, |k| text_key(t, k))?;
        let hi = bound_map(hi, |k| text_key(t, k))?;
        for item in self.0.range::<&str>((lo, hi))? {
            let (k, v) = item?;
            if !f(KeyBuf::Str(k.value().to_owned()), v.value())? {
                break;
            }
        }
        Ok(())
    }
    fn r_last(&self) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        Ok(self
            .0
            .last()?
            .map(|(k, v)| (KeyBuf::Str(k.value().to_owned()), v.value().to_vec())))
    }
    fn r_len(&self) -> Result<u64> {
        Ok(self.0.len()?)
    }
}

impl<T: ReadableTable<&'static str, ()>> RedbTable for Index<T> {
    fn r_get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(text_key(t, key)?)?.map(|_| Vec::new()))
    }
    fn r_scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        let lo = bound_map(lo, |k| text_key(t, k))?;
        let hi = bound_map(hi, |k| text_key(t, k))?;
        for item in self.0.range::<&str>((lo, hi))? {
            let (k, _) = item?;
            if !f(KeyBuf::Str(k.value().to_owned()), &[])? {
                break;
            }
        }
        Ok(())
    }
    fn r_last(&self) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        Ok(self
            .0
            .last()?
            .map(|(k, _)| (KeyBuf::Str(k.value().to_owned()), Vec::new())))
    }
    fn r_len(&self) -> Result<u64> {
        Ok(self.0.len()?)
    }
}

impl<T: ReadableTable<u64, &'static [u8]>> RedbTable for Seq<T> {
    fn r_get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(num_key(t, key)?)?.map(|g| g.value().to_vec()))
    }
    fn r_scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        let lo = bound_map(lo, |k| num_key(t, k))?;
        let hi = bound_map(hi, |k| num_key(t, k))?;
        for item in self.0.range::<u64>((lo, hi))? {
            let (k, v) = item?;
            if !f(KeyBuf::Num(k.value()), v.value())? {
                break;
            }
        }
        Ok(())
    }
    fn r_last(&self) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        Ok(self
            .0
            .last()?
            .map(|(k, v)| (KeyBuf::Num(k.value()), v.value().to_vec())))
    }
    fn r_len(&self) -> Result<u64> {
        Ok(self.0.len()?)
    }
}

impl<T: ReadableTable<u32, &'static [u8]>> RedbTable for Seq32<T> {
    fn r_get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(num32_key(t, key)?)?.map(|g| g.value().to_vec()))
    }
    fn r_scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        let lo = bound_map(lo, |k| num32_key(t, k))?;
        let hi = bound_map(hi, |k| num32_key(t, k))?;
        for item in self.0.range::<u32>((lo, hi))? {
            let (k, v) = item?;
            if !f(KeyBuf::Num(u64::from(k.value())), v.value())? {
                break;
            }
        }
        Ok(())
    }
    fn r_last(&self) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        Ok(self
            .0
            .last()?
            .map(|(k, v)| (KeyBuf::Num(u64::from(k.value())), v.value().to_vec())))
    }
    fn r_len(&self) -> Result<u64> {
        Ok(self.0.len()?)
    }
}

struct Named<T>(T);
struct Index<T>(T);
struct Seq<T>(T);
struct Seq32<T>(T);

/// An empty table (absent from an older file).
struct Absent;

impl RedbTable for Absent {
    fn r_get(&self, _: Tbl, _: Key<'_>) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    fn r_scan(&self, _: Tbl, _: Bound<Key<'_>>, _: Bound<Key<'_>>, _: Visit<'_>) -> Result<()> {
        Ok(())
    }
    fn r_last(&self) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        Ok(None)
    }
    fn r_len(&self) -> Result<u64> {
        Ok(0)
    }
}

fn or_absent<T: RedbTable + 'static>(
    r: std::result::Result<T, TableError>,
) -> Result<Box<dyn RedbTable>> {
    match r {
        Ok(t) => Ok(Box::new(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(Box::new(Absent)),
        Err(e) => Err(e.into()),
    }
}

/// A redb read snapshot.
pub struct RedbRead(pub ReadTransaction);

impl RedbRead {
    fn table(&self, t: Tbl) -> Result<Box<dyn RedbTable>> {
        let r = &self.0;
        let n = t.name();
        match t.kind() {
            Kind::Named => or_absent(r.open_table(named(n)).map(Named)),
            Kind::Index => or_absent(r.open_table(index(n)).map(Index)),
            Kind::Seq => or_absent(r.open_table(seq(n)).map(Seq)),
            Kind::Seq32 => or_absent(r.open_table(seq32(n)).map(Seq32)),
        }
    }
}

impl KvRead for RedbRead {
    fn get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        self.table(t)?.r_get(t, key)
    }
    fn scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        self.table(t)?.r_scan(t, lo, hi, f)
    }
    fn last(&self, t: Tbl) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        self.table(t)?.r_last()
    }
    fn len(&self, t: Tbl) -> Result<u64> {
        self.table(t)?.r_len()
    }
}

/// A redb write transaction. Tables are opened per call (redb refuses a
/// table opened twice at once in one transaction; this never holds one).
pub struct RedbWrite(pub WriteTransaction);

macro_rules! with_write_table {
    ($w:expr, $t:expr, |$tab:ident| $body:expr) => {{
        let w: &WriteTransaction = $w;
        let t: Tbl = $t;
        let n = t.name();
        match t.kind() {
            Kind::Named => {
                let $tab = Named(w.open_table(named(n))?);
                $body
            }
            Kind::Index => {
                let $tab = Index(w.open_table(index(n))?);
                $body
            }
            Kind::Seq => {
                let $tab = Seq(w.open_table(seq(n))?);
                $body
            }
            Kind::Seq32 => {
                let $tab = Seq32(w.open_table(seq32(n))?);
                $body
            }
        }
    }};
}

impl KvRead for RedbWrite {
    fn get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        with_write_table!(&self.0, t, |tab| tab.r_get(t, key))
    }
    fn scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        with_write_table!(&self.0, t, |tab| tab.r_scan(t, lo, hi, f))
    }
    fn last(&self, t: Tbl) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        with_write_table!(&self.0, t, |tab| tab.r_last())
    }
    fn len(&self, t: Tbl) -> Result<u64> {
        with_write_table!(&self.0, t, |tab| tab.r_len())
    }
}

impl KvWrite for RedbWrite {
    fn insert(&self, t: Tbl, key: Key<'_>, value: &[u8]) -> Result<()> {
        let w = &self.0;
        let n = t.name();
        match t.kind() {
            Kind::Named => drop(w.open_table(named(n))?.insert(text_key(t, key)?, value)?),
            Kind::Index => drop(w.open_table(index(n))?.insert(text_key(t, key)?, ())?),
            Kind::Seq => drop(w.open_table(seq(n))?.insert(num_key(t, key)?, value)?),
            Kind::Seq32 => drop(w.open_table(seq32(n))?.insert(num32_key(t, key)?, value)?),
        }
        Ok(())
    }
    fn remove(&self, t: Tbl, key: Key<'_>) -> Result<()> {
        let w = &self.0;
        let n = t.name();
        match t.kind() {
            Kind::Named => drop(w.open_table(named(n))?.remove(text_key(t, key)?)?),
            Kind::Index => drop(w.open_table(index(n))?.remove(text_key(t, key)?)?),
            Kind::Seq => drop(w.open_table(seq(n))?.remove(num_key(t, key)?)?),
            Kind::Seq32 => drop(w.open_table(seq32(n))?.remove(num32_key(t, key)?)?),
        }
        Ok(())
    }
}

impl KvTxn for RedbWrite {
    fn commit(self: Box<Self>) -> Result<()> {
        Ok(self.0.commit()?)
    }
    fn as_write(&self) -> &dyn KvWrite {
        self
    }
}

/// Creates every table of a redb file (so later read snapshots never meet
/// a missing one).
pub fn create_redb_tables(w: &WriteTransaction) -> Result<()> {
    for t in Tbl::ALL {
        let n = t.name();
        match t.kind() {
            Kind::Named => drop(w.open_table(named(n))?),
            Kind::Index => drop(w.open_table(index(n))?),
            Kind::Seq => drop(w.open_table(seq(n))?),
            Kind::Seq32 => drop(w.open_table(seq32(n))?),
        }
    }
    Ok(())
}

/// Read snapshot of a redb database (any handle kind: the live one, a
/// read-only file, a backup copy).
pub fn redb_read(db: &impl ReadableDatabase) -> Result<RedbRead> {
    Ok(RedbRead(db.begin_read()?))
}

/// Copies one table between redb transactions (`keyserver backup`);
/// `None` when the source has no such table.
pub fn copy_redb_table(
    r: &ReadTransaction,
    w: &WriteTransaction,
    t: Tbl,
) -> std::result::Result<Option<u64>, redb::Error> {
    use tessera_runtime::snapshot::copy_table;
    let n = t.name();
    match t.kind() {
        Kind::Named => copy_table(r, w, named(n)),
        Kind::Index => copy_table(r, w, index(n)),
        Kind::Seq => copy_table(r, w, seq(n)),
        Kind::Seq32 => copy_table(r, w, seq32(n)),
    }
}
