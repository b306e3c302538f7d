//! The keyserver's tables on PostgreSQL (`[keyserver.store] backend =
//! "postgres"`): one table `ks_<name>` per table of `store.rs`, text keys
//! `text COLLATE "C"` (byte order, as redb), numeric keys `bigint`, values
//! `bytea` (exactly the bytes the redb file holds).
//!
//! Several keyserver replicas share the database. Every write transaction
//! (the writer's batches, the bootstrap, `audit-recover`) first takes one
//! transaction-scoped advisory lock ([`CHAIN_LOCK`]), so write transactions
//! run one at a time across all replicas, and, in READ COMMITTED, each one
//! then reads every earlier commit: the writer re-reads the chain head and
//! the next seq after taking it, so two entries never share a predecessor.
//! Reads run in REPEATABLE READ READ ONLY transactions (one snapshot).
//!
//! The driver is `tokio-postgres` on a small runtime of the store's own
//! (the gateway vault's pattern): callers (the writer thread, request
//! handlers) wait on a channel and never enter the app's runtime. A
//! database that cannot be reached fails the call with UNAVAILABLE within
//! [`CALL_TIMEOUT`]; a write batch that fails is rolled back and every
//! waiter gets the error: nothing is released or spent without a commit.

use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use super::kv::{Key, KeyBuf, Kind, KvRead, KvTxn, KvWrite, Tbl, Visit};
use crate::error::{KeyServerError, Result};

/// The schema this keyserver writes; a database holding another refuses.
pub const SCHEMA_VERSION: &str = "1";
/// The advisory lock every write transaction takes first.
pub const CHAIN_LOCK: i64 = 0x007e_55e4_a00a_0d17;
/// Connections at once.
const POOL: usize = 16;
/// One call's limit (a connection, a statement).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// A session idle this long inside a transaction is ended by the database.
const IDLE_IN_TXN: Duration = Duration::from_secs(60);
/// Rows fetched per round trip of a scan.
const PAGE: i64 = 1000;

fn table(t: Tbl) -> String {
    format!("ks_{}", t.name())
}

fn schema() -> String {
    let mut s = String::from(
        "CREATE TABLE IF NOT EXISTS ks_schema (name text COLLATE \"C\" PRIMARY KEY, value text NOT NULL);\n",
    );
    for t in Tbl::ALL {
        let key = match t.kind() {
            Kind::Named | Kind::Index => "text COLLATE \"C\"",
            Kind::Seq | Kind::Seq32 => "bigint",
        };
        s.push_str(&format!(
            "CREATE TABLE IF NOT EXISTS {} (key {key} PRIMARY KEY, value bytea NOT NULL);\n",
            table(t)
        ));
    }
    s
}

/// A failure talking to the database: UNAVAILABLE when the connection is
/// the cause (the database is away), a storage error otherwise.
fn pg_err(e: tokio_postgres::Error) -> KeyServerError {
    match e.as_db_error() {
        Some(db) => KeyServerError::Storage(format!("keyserver database: {}", db.message())),
        None => KeyServerError::StoreUnavailable(format!("keyserver database: {e}")),
    }
}

/// A key as a query parameter.
enum PgKey {
    Text(String),
    Int(i64),
}

impl PgKey {
    fn of(t: Tbl, k: Key<'_>) -> Result<Self> {
        match (t.kind(), k) {
            (Kind::Named | Kind::Index, Key::Str(s)) => Ok(PgKey::Text(s.to_owned())),
            (Kind::Seq | Kind::Seq32, Key::Num(n)) => i64::try_from(n)
                .map(PgKey::Int)
                .map_err(|_| KeyServerError::InvalidArgument(format!("key {n} out of range"))),
            (Kind::Named | Kind::Index, Key::Num(_)) | (Kind::Seq | Kind::Seq32, Key::Str(_)) => {
                Err(KeyServerError::Storage(format!(
                    "wrong key type for table {}",
                    t.name()
                )))
            }
        }
    }
    fn param(&self) -> &(dyn ToSql + Sync) {
        match self {
            PgKey::Text(s) => s,
            PgKey::Int(i) => i,
        }
    }
}

fn key_of(t: Tbl, row: &tokio_postgres::Row) -> KeyBuf {
    match t.kind() {
        Kind::Named | Kind::Index => KeyBuf::Str(row.get::<_, String>(0)),
        Kind::Seq | Kind::Seq32 => KeyBuf::Num(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)),
    }
}

struct Shared {
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    config: tokio_postgres::Config,
    idle: Mutex<Vec<Arc<Client>>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Never blocks (a runtime dropped on an async thread would panic).
        if let Some(rt) = self.rt.lock().ok().and_then(|mut r| r.take()) {
            rt.shutdown_background();
        }
    }
}

impl Shared {
    /// Runs `fut` on the store's runtime and waits for it (at most
    /// [`CALL_TIMEOUT`]).
    fn call<T, Fut>(&self, fut: Fut) -> Result<T>
    where
        T: Send + 'static,
        Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                Ok(r) => r,
                Err(_) => Err(KeyServerError::StoreUnavailable(format!(
                    "keyserver database: no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv().map_err(|_| {
            KeyServerError::StoreUnavailable("keyserver database: the call was dropped".into())
        })?
    }

    /// Keeps a connection no transaction holds for the next caller.
    fn give_back(&self, c: Arc<Client>) {
        if !c.is_closed()
            && let Ok(mut v) = self.idle.lock()
            && v.len() < POOL
        {
            v.push(c);
        }
    }

    async fn connect(config: tokio_postgres::Config) -> Result<Client> {
        let (client, conn) = config.connect(NoTls).await.map_err(pg_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "keyserver database connection ended");
            }
        });
        // A replica stalled inside a transaction (frozen, not dead) would
        // hold the chain lock for ever: the database ends its session, and
        // with it the transaction and the lock, after this long idle.
        client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = {}",
                IDLE_IN_TXN.as_millis()
            ))
            .await
            .map_err(pg_err)?;
        Ok(client)
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgStore")
    }
}

impl PgStore {
    /// Connects to `url` (a libpq connection string or `postgresql://`
    /// URL), creates the tables if absent and checks the schema version.
    pub fn open(url: &str) -> Result<Self> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| KeyServerError::InvalidArgument(format!("keyserver database url: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("keyserver-pg")
            .enable_all()
            .build()
            .map_err(|e| KeyServerError::Storage(format!("cannot start the store runtime: {e}")))?;
        let handle = rt.handle().clone();
        let this = Self {
            shared: Arc::new(Shared {
                rt: Mutex::new(Some(rt)),
                handle,
                config,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(tokio::sync::Semaphore::new(POOL)),
            }),
        };
        let txn = this.begin(true)?;
        let version = {
            let c = txn.client()?;
            let sql = schema();
            txn.shared.call(async move {
                c.batch_execute(&sql).await.map_err(pg_err)?;
                c.execute(
                    "INSERT INTO ks_schema (name, value) VALUES ('schema_version', $1) \
                     ON CONFLICT (name) DO NOTHING",
                    &[&SCHEMA_VERSION],
                )
                .await
                .map_err(pg_err)?;
                let v: String = c
                    .query_one(
                        "SELECT value FROM ks_schema WHERE name = 'schema_version'",
                        &[],
                    )
                    .await
                    .map_err(pg_err)?
                    .get(0);
                Ok(v)
            })?
        };
        Box::new(txn).commit()?;
        if version != SCHEMA_VERSION {
            return Err(KeyServerError::Corrupt(format!(
                "keyserver database schema {version}: this keyserver knows {SCHEMA_VERSION}"
            )));
        }
        Ok(this)
    }

    /// A transaction: a write one takes [`CHAIN_LOCK`] first; a read one
    /// is a REPEATABLE READ READ ONLY snapshot.
    pub fn begin(&self, write: bool) -> Result<PgTxn> {
        let shared = self.shared.clone();
        let idle = shared.idle.lock().ok().and_then(|mut v| v.pop());
        let permits = shared.permits.clone();
        let config = shared.config.clone();
        let (client, permit) = shared.call(async move {
            let permit = permits
                .acquire_owned()
                .await
                .map_err(|_| KeyServerError::Unavailable)?;
            // A pooled connection may have died since (the database was
            // restarted): one retry on a fresh one.
            let c = match idle.filter(|c| !c.is_closed()) {
                Some(c) if start(&c, write).await.is_ok() => c,
                Some(_) | None => {
                    let c = Arc::new(Shared::connect(config).await?);
                    start(&c, write).await?;
                    c
                }
            };
            Ok((c, permit))
        })?;
        Ok(PgTxn {
            shared,
            client: Some(client),
            _permit: Some(permit),
        })
    }
}

/// The channel on which replicas tell each other of access events (the
/// `WatchRequests` feed, see `core::replica_feed`).
pub const ACCESS_CHANNEL: &str = "tessera_ks_access";

/// Pause before the listener connects again after losing its connection.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

impl PgStore {
    /// Tells every replica listening on [`ACCESS_CHANNEL`] (this one too)
    /// `payload`, after the commit it follows: sent in the background on a
    /// pooled connection outside any transaction; a failure is logged (a
    /// watcher on another replica then misses one event, as after a lag).
    pub fn notify(&self, payload: String) {
        let shared = self.shared.clone();
        self.shared.handle.spawn(async move {
            let idle = shared.idle.lock().ok().and_then(|mut v| v.pop());
            let sent = async {
                let _permit = shared
                    .permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| KeyServerError::Unavailable)?;
                let c = match idle.filter(|c| !c.is_closed()) {
                    Some(c) => c,
                    None => Arc::new(Shared::connect(shared.config.clone()).await?),
                };
                c.execute("SELECT pg_notify($1, $2)", &[&ACCESS_CHANNEL, &payload])
                    .await
                    .map_err(pg_err)?;
                shared.give_back(c);
                Ok::<_, KeyServerError>(())
            };
            match tokio::time::timeout(CALL_TIMEOUT, sent).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot tell the other keyserver replicas of an access event"),
                Err(_) => tracing::warn!("telling the other keyserver replicas of an access event timed out"),
            }
        });
    }

    /// Calls `on` with every payload sent on [`ACCESS_CHANNEL`] (by any
    /// replica, this one included), on a connection of its own that is
    /// opened again whenever it is lost, until the store is dropped. `on`
    /// runs on the store's runtime: it must not block.
    pub fn listen(&self, on: impl Fn(String) + Send + Sync + 'static) {
        let config = self.shared.config.clone();
        self.shared.handle.spawn(async move {
            loop {
                match listen_once(&config, &on).await {
                    Ok(()) => tracing::warn!("keyserver database: the access-event listener's connection ended; connecting again"),
                    Err(e) => tracing::warn!(error = %e, "keyserver database: the access-event listener failed; connecting again"),
                }
                tokio::time::sleep(LISTEN_RETRY).await;
            }
        });
    }
}

/// One listening connection, until it ends.
async fn listen_once(config: &tokio_postgres::Config, on: &(impl Fn(String) + Sync)) -> Result<()> {
    let (client, mut conn) = config.connect(NoTls).await.map_err(pg_err)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // The connection delivers notifications only while it is polled.
    let driver = tokio::spawn(async move {
        while let Some(msg) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
            match msg {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_owned()).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "keyserver database: listener connection");
                    return;
                }
            }
        }
    });
    let listening = client
        .batch_execute(&format!("LISTEN {ACCESS_CHANNEL}"))
        .await
        .map_err(pg_err);
    if let Err(e) = listening {
        driver.abort();
        return Err(e);
    }
    while let Some(payload) = rx.recv().await {
        on(payload);
    }
    drop(client);
    Ok(())
}

/// Opens the transaction on `c`.
async fn start(c: &Client, write: bool) -> Result<()> {
    if write {
        c.batch_execute("BEGIN").await.map_err(pg_err)?;
        c.execute("SELECT pg_advisory_xact_lock($1)", &[&CHAIN_LOCK])
            .await
            .map_err(pg_err)?;
    } else {
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(pg_err)?;
    }
    Ok(())
}

/// One PostgreSQL transaction on a pooled connection. Dropped without
/// [`KvTxn::commit`], it rolls back.
pub struct PgTxn {
    shared: Arc<Shared>,
    client: Option<Arc<Client>>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for PgTxn {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let back = c.clone();
            let ok = self
                .shared
                .call(async move { c.batch_execute("ROLLBACK").await.map_err(pg_err) })
                .is_ok();
            if ok {
                self.give_back(back);
            }
        }
    }
}

impl PgTxn {
    fn client(&self) -> Result<Arc<Client>> {
        self.client
            .clone()
            .ok_or_else(|| KeyServerError::StoreUnavailable("transaction ended".into()))
    }

    fn give_back(&self, c: Arc<Client>) {
        self.shared.give_back(c);
    }

    fn rows(&self, sql: String, params: Vec<PgKey>) -> Result<Vec<tokio_postgres::Row>> {
        let c = self.client()?;
        self.shared.call(async move {
            let p: Vec<&(dyn ToSql + Sync)> = params.iter().map(PgKey::param).collect();
            c.query(&sql, &p).await.map_err(pg_err)
        })
    }
}

impl KvRead for PgTxn {
    fn get(&self, t: Tbl, key: Key<'_>) -> Result<Option<Vec<u8>>> {
        let k = PgKey::of(t, key)?;
        let rows = self.rows(
            format!("SELECT value FROM {} WHERE key = $1", table(t)),
            vec![k],
        )?;
        Ok(rows.first().map(|r| r.get::<_, Vec<u8>>(0)))
    }

    fn scan(&self, t: Tbl, lo: Bound<Key<'_>>, hi: Bound<Key<'_>>, f: Visit<'_>) -> Result<()> {
        // Paged: a long audit log is never held in memory at once.
        let mut lo = match lo {
            Bound::Included(k) => Bound::Included(PgKey::of(t, k)?),
            Bound::Excluded(k) => Bound::Excluded(PgKey::of(t, k)?),
            Bound::Unbounded => Bound::Unbounded,
        };
        let hi = match hi {
            Bound::Included(k) => Bound::Included(PgKey::of(t, k)?),
            Bound::Excluded(k) => Bound::Excluded(PgKey::of(t, k)?),
            Bound::Unbounded => Bound::Unbounded,
        };
        loop {
            let mut cond = Vec::new();
            let mut params = Vec::new();
            for (b, inc, exc) in [(&lo, ">=", ">"), (&hi, "<=", "<")] {
                match b {
                    Bound::Included(k) => {
                        params.push(clone_key(k));
                        cond.push(format!("key {inc} ${}", params.len()));
                    }
                    Bound::Excluded(k) => {
                        params.push(clone_key(k));
                        cond.push(format!("key {exc} ${}", params.len()));
                    }
                    Bound::Unbounded => {}
                }
            }
            let filter = if cond.is_empty() {
                String::new()
            } else {
                format!("WHERE {}", cond.join(" AND "))
            };
            let rows = self.rows(
                format!(
                    "SELECT key, value FROM {} {filter} ORDER BY key LIMIT {PAGE}",
                    table(t)
                ),
                params,
            )?;
            let full = rows.len() as i64 == PAGE;
            let mut last = None;
            for r in &rows {
                let k = key_of(t, r);
                last = Some(k.clone());
                if !f(k, &r.get::<_, Vec<u8>>(1))? {
                    return Ok(());
                }
            }
            match (full, last) {
                (true, Some(KeyBuf::Str(s))) => lo = Bound::Excluded(PgKey::Text(s)),
                (true, Some(KeyBuf::Num(n))) => {
                    lo = Bound::Excluded(PgKey::of(t, Key::Num(n))?);
                }
                (true, None) | (false, _) => return Ok(()),
            }
        }
    }

    fn last(&self, t: Tbl) -> Result<Option<(KeyBuf, Vec<u8>)>> {
        let rows = self.rows(
            format!(
                "SELECT key, value FROM {} ORDER BY key DESC LIMIT 1",
                table(t)
            ),
            Vec::new(),
        )?;
        Ok(rows.first().map(|r| (key_of(t, r), r.get::<_, Vec<u8>>(1))))
    }

    fn len(&self, t: Tbl) -> Result<u64> {
        let rows = self.rows(format!("SELECT count(*) FROM {}", table(t)), Vec::new())?;
        Ok(rows
            .first()
            .map_or(0, |r| u64::try_from(r.get::<_, i64>(0)).unwrap_or(0)))
    }
}

fn clone_key(k: &PgKey) -> PgKey {
    match k {
        PgKey::Text(s) => PgKey::Text(s.clone()),
        PgKey::Int(i) => PgKey::Int(*i),
    }
}

impl KvWrite for PgTxn {
    fn insert(&self, t: Tbl, key: Key<'_>, value: &[u8]) -> Result<()> {
        let k = PgKey::of(t, key)?;
        let c = self.client()?;
        let sql = format!(
            "INSERT INTO {} (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            table(t)
        );
        let v = value.to_vec();
        self.shared.call(async move {
            c.execute(&sql, &[k.param(), &v]).await.map_err(pg_err)?;
            Ok(())
        })
    }

    fn remove(&self, t: Tbl, key: Key<'_>) -> Result<()> {
        let k = PgKey::of(t, key)?;
        let c = self.client()?;
        let sql = format!("DELETE FROM {} WHERE key = $1", table(t));
        self.shared.call(async move {
            c.execute(&sql, &[k.param()]).await.map_err(pg_err)?;
            Ok(())
        })
    }
}

impl KvTxn for PgTxn {
    fn commit(mut self: Box<Self>) -> Result<()> {
        let c = self
            .client
            .take()
            .ok_or_else(|| KeyServerError::StoreUnavailable("transaction ended".into()))?;
        let back = c.clone();
        self.shared
            .call(async move { c.batch_execute("COMMIT").await.map_err(pg_err) })?;
        self.give_back(back);
        Ok(())
    }
    fn as_write(&self) -> &dyn KvWrite {
        self
    }
}
