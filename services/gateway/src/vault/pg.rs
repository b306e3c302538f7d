//! The vault on PostgreSQL (`[vault] backend = "postgres"`): the same three
//! tables as the redb file, keys `text COLLATE "C"` (byte order, as redb),
//! values `bytea` (sealed records; index values are ids). Every op is one
//! transaction; an insert whose key exists rolls back just that op.
//!
//! The driver is `tokio-postgres` on a small runtime of the vault's own (two
//! threads), so the synchronous vault calls (made off the async threads, see
//! `shared::with_vault`) wait on a channel and never enter the app's
//! runtime; connections are pooled and reopened after a failure. An
//! unreachable database fails each call with UNAVAILABLE within the
//! timeout: nothing is acknowledged, and there is no fallback.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::backend::{Backend, Rows};
use super::store::{Op, Tbl, Write};
use crate::error::GatewayError;

type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// The schema this gateway writes; a database holding another refuses.
pub(super) const SCHEMA_VERSION: &str = "1";
/// Connections at once.
const POOL: usize = 8;
/// One call's limit (connect, then the statement or transaction).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS vault_meta (name text COLLATE "C" PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS vault_studies (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS vault_instances (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS vault_dicom_index (key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS vault_replicas (replica text COLLATE "C" PRIMARY KEY, beat timestamptz NOT NULL);
"#;

fn table(tbl: Tbl) -> &'static str {
    match tbl {
        Tbl::Studies => "vault_studies",
        Tbl::Instances => "vault_instances",
        Tbl::Index => "vault_dicom_index",
    }
}

/// A failure talking to the database: UNAVAILABLE when the connection is
/// the cause (the database is away: retry later), a vault error otherwise.
fn pg_err(e: tokio_postgres::Error) -> GatewayError {
    match e.as_db_error() {
        Some(db) => GatewayError::Vault(format!("vault database: {}", db.message())),
        None => GatewayError::Unavailable(format!("vault database: {e}")),
    }
}

struct Pool {
    config: tokio_postgres::Config,
    idle: std::sync::Mutex<Vec<Client>>,
    permits: tokio::sync::Semaphore,
}

impl Pool {
    async fn client(&self) -> Result<Client> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        if let Some(c) = idle.filter(|c| !c.is_closed()) {
            return Ok(c);
        }
        let (client, conn) = self.config.connect(NoTls).await.map_err(pg_err)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::warn!(error = %e, "vault database connection ended");
            }
        });
        Ok(client)
    }

    fn give_back(&self, c: Client) {
        if !c.is_closed()
            && let Ok(mut v) = self.idle.lock()
        {
            v.push(c);
        }
    }
}

/// The PostgreSQL backend.
pub(super) struct PgBackend {
    rt: Option<tokio::runtime::Runtime>,
    pool: Arc<Pool>,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        // Never blocks (a runtime dropped on an async thread would panic).
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl PgBackend {
    /// Connects to `url` (a libpq connection string or `postgresql://`
    /// URL), creates the tables if absent and checks the schema version.
    pub(super) fn open(url: &str) -> Result<Self> {
        let config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| GatewayError::Vault(format!("vault database url: {e}")))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vault-pg")
            .enable_all()
            .build()
            .map_err(|e| GatewayError::Vault(format!("cannot start the vault runtime: {e}")))?;
        let this = Self {
            rt: Some(rt),
            pool: Arc::new(Pool {
                config,
                idle: Default::default(),
                permits: tokio::sync::Semaphore::new(POOL),
            }),
        };
        this.call(|c| async move {
            let mut c = c;
            let t = c.transaction().await?;
            // Two replicas starting at once: one creates, the other waits.
            t.execute("SELECT pg_advisory_xact_lock(7320201)", &[])
                .await?;
            t.batch_execute(SCHEMA).await?;
            t.execute(
                "INSERT INTO vault_meta (name, value) VALUES ('schema_version', $1) \
                 ON CONFLICT (name) DO NOTHING",
                &[&SCHEMA_VERSION],
            )
            .await?;
            let v: String = t
                .query_one(
                    "SELECT value FROM vault_meta WHERE name = 'schema_version'",
                    &[],
                )
                .await?
                .get(0);
            t.commit().await?;
            Ok((c, Ok(v)))
        })
        .and_then(|v| {
            if v == SCHEMA_VERSION {
                Ok(())
            } else {
                Err(GatewayError::Vault(format!(
                    "vault database schema {v}: this gateway knows {SCHEMA_VERSION}"
                )))
            }
        })?;
        Ok(this)
    }

    /// Runs `f` with a pooled connection on the vault runtime and waits
    /// for its answer (at most [`CALL_TIMEOUT`]). `f` hands the connection
    /// back with its answer; a driver error drops the connection.
    fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: std::future::Future<
                Output = std::result::Result<(Client, Result<T>), tokio_postgres::Error>,
            > + Send,
    {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| GatewayError::Vault("the vault is closed".into()))?;
        let pool = self.pool.clone();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let run = async {
                let _permit = pool
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| GatewayError::Vault("the vault is closed".into()))?;
                let c = pool.client().await?;
                let (c, r) = f(c).await.map_err(pg_err)?;
                pool.give_back(c);
                r
            };
            let r = match tokio::time::timeout(CALL_TIMEOUT, run).await {
                Ok(r) => r,
                Err(_) => Err(GatewayError::Unavailable(format!(
                    "vault database: no answer within {} s",
                    CALL_TIMEOUT.as_secs()
                ))),
            };
            let _ = tx.send(r);
        });
        rx.recv()
            .map_err(|_| GatewayError::Unavailable("vault database: the call was dropped".into()))?
    }
}

async fn apply(
    mut c: Client,
    op: Op,
) -> std::result::Result<(Client, Result<()>), tokio_postgres::Error> {
    let t = c.transaction().await?;
    for w in &op.0 {
        match w {
            Write::Insert(tbl, key, value) => {
                let n = t
                    .execute(
                        &format!(
                            "INSERT INTO {} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                            table(*tbl)
                        ),
                        &[key, value],
                    )
                    .await?;
                if n == 0 {
                    t.rollback().await?;
                    return Ok((
                        c,
                        Err(GatewayError::AlreadyExists(format!(
                            "{key} is already in the vault"
                        ))),
                    ));
                }
            }
            Write::Put(tbl, key, value) => {
                t.execute(
                    &format!(
                        "INSERT INTO {} (key, value) VALUES ($1, $2) \
                         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                        table(*tbl)
                    ),
                    &[key, value],
                )
                .await?;
            }
            Write::PutIf {
                tbl,
                key,
                value,
                expected,
            } => {
                // The row stays locked to the commit: a concurrent PutIf
                // waits, then reads what this one wrote.
                let n = t
                    .execute(
                        &format!(
                            "UPDATE {} SET value = $2 WHERE key = $1 AND value = $3",
                            table(*tbl)
                        ),
                        &[key, value, expected],
                    )
                    .await?;
                if n == 0 {
                    t.rollback().await?;
                    return Ok((c, Err(super::store::changed_meanwhile(key))));
                }
            }
            Write::Remove(tbl, key) => {
                t.execute(
                    &format!("DELETE FROM {} WHERE key = $1", table(*tbl)),
                    &[key],
                )
                .await?;
            }
            Write::RemoveIndexIf(key, value) => {
                t.execute(
                    "DELETE FROM vault_dicom_index WHERE key = $1 AND value = $2",
                    &[key, &value.as_bytes()],
                )
                .await?;
            }
        }
    }
    t.commit().await?;
    Ok((c, Ok(())))
}

impl Backend for PgBackend {
    fn get(&self, tbl: Tbl, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_owned();
        self.call(move |c| async move {
            let row = c
                .query_opt(
                    &format!("SELECT value FROM {} WHERE key = $1", table(tbl)),
                    &[&key],
                )
                .await?;
            Ok((c, Ok(row.map(|r| r.get::<_, Vec<u8>>(0)))))
        })
    }

    fn range(&self, tbl: Tbl, from: &str, to: Option<&str>) -> Result<Rows> {
        let (from, to) = (from.to_owned(), to.map(str::to_owned));
        self.call(move |c| async move {
            let rows = match &to {
                Some(to) => {
                    c.query(
                        &format!(
                            "SELECT key, value FROM {} WHERE key >= $1 AND key < $2 ORDER BY key",
                            table(tbl)
                        ),
                        &[&from, to],
                    )
                    .await?
                }
                None => {
                    c.query(
                        &format!(
                            "SELECT key, value FROM {} WHERE key >= $1 ORDER BY key",
                            table(tbl)
                        ),
                        &[&from],
                    )
                    .await?
                }
            };
            let out = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                .collect();
            Ok((c, Ok(out)))
        })
    }

    fn len(&self, tbl: Tbl) -> Result<u64> {
        self.call(move |c| async move {
            let n: i64 = c
                .query_one(&format!("SELECT count(*) FROM {}", table(tbl)), &[])
                .await?
                .get(0);
            Ok((c, Ok(u64::try_from(n).unwrap_or(0))))
        })
    }

    fn submit(&self, op: Op) -> Result<()> {
        self.call(move |c| apply(c, op))
    }

    fn beat(&self, replica: &str) -> Result<()> {
        let replica = replica.to_owned();
        self.call(move |c| async move {
            c.execute(
                "INSERT INTO vault_replicas (replica, beat) VALUES ($1, now()) \
                 ON CONFLICT (replica) DO UPDATE SET beat = now()",
                &[&replica],
            )
            .await?;
            Ok((c, Ok(())))
        })
    }

    fn alive(&self, replica: &str, lease_secs: u64) -> Result<bool> {
        let replica = replica.to_owned();
        let lease = lease_secs as f64;
        self.call(move |c| async move {
            // The database's clock on both sides: replicas' clocks may differ.
            let row = c
                .query_opt(
                    "SELECT now() - beat < make_interval(secs => $2) FROM vault_replicas \
                     WHERE replica = $1",
                    &[&replica, &lease],
                )
                .await?;
            Ok((c, Ok(row.is_some_and(|r| r.get::<_, bool>(0)))))
        })
    }

    fn shared(&self) -> bool {
        true
    }
}
