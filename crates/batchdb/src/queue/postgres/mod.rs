//! The distributed queue: one PostgreSQL database shared by any number of workers on
//! any number of machines.
//!
//! - Tables live in their own PostgreSQL schema (`batchdb`), created and migrated on
//!   open under an advisory lock, so several processes may open a fresh database at
//!   once. A database migrated by a newer batchdb is refused.
//! - Every state change is one transaction with its events. Claims take rows with
//!   `FOR UPDATE SKIP LOCKED`, so workers never wait on each other's claims.
//! - Event ids come from a counter row locked at the very end of the transaction, so
//!   they increase in commit order (a reader that saw event `n` never finds a new event
//!   below `n` later). `created` times come from another counter row, so they are
//!   unique across all instances.
//! - Time (leases, `run_at`, `created`) is the database server's clock, so clock skew
//!   between worker machines cannot expire a live lease.
//! - Every transaction that changed something sends `NOTIFY batchdb_changes` before it
//!   commits (PostgreSQL delivers it at commit). Each process keeps one `LISTEN`
//!   connection, reconnecting with backoff when it is lost, and wakes its waiters on
//!   every notification (and after every reconnect, in case it missed some).
//! - A transaction that fails with a serialization failure or a deadlock is retried;
//!   a lost connection surfaces as [`Error::Postgres`], which the worker retries with
//!   backoff (a finish whose commit succeeded but whose reply was lost is recognised
//!   by the worker when its retry is fenced: see `Worker`).

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::Queue;
use super::migrations;
use super::policy::{self, AttemptEnd, Transition};
use super::types::*;

#[macro_use]
mod tx;
mod listen;
mod read;
mod rows;
mod url;

use crate::blob::BlobInfo;
use crate::error::{Error, Result};
use crate::hash::Hash;
use read::*;
use rows::*;
use tx::*;
use url::*;

/// The schema version this build writes and understands (the same on every backend).
pub const PG_SCHEMA_VERSION: i64 = migrations::SCHEMA_VERSION;

/// The PostgreSQL schema (namespace) batchdb's tables live in.
const NAMESPACE: &str = "batchdb";

/// The notification channel every change is announced on.
const CHANNEL: &str = "batchdb_changes";

/// Connections per process (claims, heartbeats and finishes of one worker run at once).
const POOL_SIZE: usize = 16;

/// The PostgreSQL queue backend. Cheap to clone; clones share one connection pool and
/// one listener.
#[derive(Debug, Clone)]
pub struct PgQueue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The URL with its password masked, for messages.
    location: String,
    config: tokio_postgres::Config,
    pool: Pool,
    changes: watch::Sender<u64>,
    listening: AtomicBool,
}

/// Errors inside a transaction: the database's own, or a domain error to pass through.
pub(crate) enum TxError {
    Pg(tokio_postgres::Error),
    Domain(Error),
    /// A value read back that batchdb never writes (see [`Error::Corrupt`]).
    Corrupt(String),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Domain(e)
    }
}

pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

impl PgQueue {
    /// Connects to the database at `url` (`postgres://user:pass@host:port/db`; TLS is
    /// not supported by this build: use `sslmode=disable` or a local TLS proxy), and
    /// creates or migrates batchdb's schema. Several processes may open a fresh database
    /// at once. A database whose schema is newer than this build is refused with
    /// [`Error::SchemaTooNew`].
    pub async fn open(url: &str) -> Result<PgQueue> {
        let location = mask_password(url);
        let mut config = tokio_postgres::Config::from_str(url).map_err(|e| Error::Config {
            what: "postgres URL",
            value: location.clone(),
            why: e.to_string(),
        })?;
        let options = match config.get_options() {
            Some(o) => format!("{o} -c search_path={NAMESPACE}"),
            None => format!("-c search_path={NAMESPACE}"),
        };
        config.options(&options);
        if config.get_application_name().is_none() {
            config.application_name("batchdb");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // A dead server or a half-open connection must surface as an error within
        // seconds, not after the kernel's default 15 minutes of retransmissions.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(10));
        config.keepalives_interval(Duration::from_secs(5));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(30));
        let mgr = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(60)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| Error::Config {
                what: "postgres pool",
                value: location.clone(),
                why: e.to_string(),
            })?;
        let (changes, _) = watch::channel(0);
        let q = PgQueue {
            inner: Arc::new(Inner {
                location,
                config,
                pool,
                changes,
                listening: AtomicBool::new(false),
            }),
        };
        q.migrate().await?;
        Ok(q)
    }

    fn err(&self, e: TxError) -> Error {
        match e {
            TxError::Pg(source) => Error::Postgres {
                location: self.inner.location.clone(),
                source,
            },
            TxError::Domain(e) => e,
            TxError::Corrupt(what) => Error::Corrupt {
                location: self.inner.location.clone(),
                what,
            },
        }
    }

    /// A pooled connection whose `search_path` is batchdb's schema.
    async fn client(&self) -> TxResult<deadpool_postgres::Object> {
        let client = self.inner.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => TxError::Pg(e),
            other => TxError::Domain(Error::PostgresPool {
                location: self.inner.location.clone(),
                message: other.to_string(),
            }),
        })?;
        Ok(client)
    }

    async fn migrate(&self) -> Result<()> {
        let r: TxResult<()> = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // One migrator at a time, database-wide; released at commit.
            tx.batch_execute(&format!(
                "SELECT pg_advisory_xact_lock(hashtext('batchdb schema migration'));
                 CREATE SCHEMA IF NOT EXISTS {NAMESPACE};
                 CREATE TABLE IF NOT EXISTS {NAMESPACE}.schema_migrations(
                   version BIGINT PRIMARY KEY,
                   applied_at TIMESTAMPTZ NOT NULL DEFAULT now());"
            ))
            .await?;
            let version: i64 = tx
                .query_one(
                    &format!("SELECT COALESCE(MAX(version), 0) FROM {NAMESPACE}.schema_migrations"),
                    &[],
                )
                .await?
                .try_get(0)?;
            if version > PG_SCHEMA_VERSION {
                return Err(Error::SchemaTooNew {
                    location: self.inner.location.clone(),
                    found: version,
                    supported: PG_SCHEMA_VERSION,
                }
                .into());
            }
            for (v, step) in migrations::pending(version) {
                tx.batch_execute(&format!(
                    "SET LOCAL search_path = {NAMESPACE}; {}",
                    step.postgres
                ))
                .await?;
                tx.execute(
                    &format!("INSERT INTO {NAMESPACE}.schema_migrations(version) VALUES ($1)"),
                    &[&v],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(())
        }
        .await;
        r.map_err(|e| self.err(e))
    }

    /// Runs read-only statements on a pooled connection.
    async fn read<T>(
        &self,
        f: impl AsyncFnOnce(&deadpool_postgres::Object) -> TxResult<T>,
    ) -> Result<T> {
        let r: TxResult<T> = async {
            let client = self.client().await?;
            f(&client).await
        }
        .await;
        r.map_err(|e| self.err(e))
    }
}

#[async_trait]
impl Queue for PgQueue {
    async fn create(&self, job: &BlobInfo) -> Result<bool> {
        let job = &NewJob::stored(*job);
        in_tx!(self, |tx| { insert_job(tx, job).await })
    }

    async fn push(&self, job: &Hash, opts: &PushOptions) -> Result<Instance> {
        in_tx!(self, |tx| {
            let exists = tx
                .query_opt("SELECT 1 FROM jobs WHERE key = $1", &[&job.to_hex()])
                .await?
                .is_some();
            if !exists {
                return Err(Error::JobNotFound(*job).into());
            }
            insert_instance(tx, job, opts).await
        })
    }

    async fn add(&self, job: &BlobInfo, opts: &PushOptions) -> Result<Instance> {
        let job = &NewJob::stored(*job);
        in_tx!(self, |tx| {
            insert_job(tx, job).await?;
            insert_instance(tx, &job.info.hash, opts).await
        })
    }

    async fn create_many(&self, jobs: &[NewJob]) -> Result<Vec<bool>> {
        in_tx!(self, |tx| {
            let mut out = Vec::with_capacity(jobs.len());
            for j in jobs {
                out.push(insert_job(tx, j).await?);
            }
            Ok(out)
        })
    }

    async fn add_many(&self, jobs: &[NewJob], opts: &PushOptions) -> Result<Vec<Instance>> {
        in_tx!(self, |tx| {
            let mut out = Vec::with_capacity(jobs.len());
            for j in jobs {
                insert_job(tx, j).await?;
                out.push(insert_instance(tx, &j.info.hash, opts).await?);
            }
            Ok(out)
        })
    }

    async fn inline_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        self.read(async |c| {
            Ok(c.query_opt(
                "SELECT payload FROM jobs WHERE key = $1 AND payload IS NOT NULL
                     UNION ALL SELECT data FROM inline_blobs WHERE key = $1 LIMIT 1",
                &[&hash.to_hex()],
            )
            .await?
            .map(|r| r.try_get::<_, Vec<u8>>(0))
            .transpose()?)
        })
        .await
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        in_tx!(self, |tx| { claim_tx(tx, req).await })
    }

    async fn heartbeat(&self, claim: &ClaimToken, lease: Duration) -> Result<Heartbeat> {
        let t = *claim;
        in_tx!(self, lazy = true, |tx| {
            let until = tx.now + lease.as_millis() as i64;
            let row = tx
                .query_opt(
                    "UPDATE instances SET lease_until = $3
                     WHERE id = $1 AND state = 'running' AND attempts = $2
                     RETURNING cancel_requested",
                    &[&t.id, &t.token, &until],
                )
                .await?;
            match row {
                Some(r) => Ok(Heartbeat {
                    cancel_requested: r.try_get(0)?,
                }),
                None => Err(fenced(&t)),
            }
        })
    }

    async fn status(&self, claim: &ClaimToken) -> Result<Heartbeat> {
        let t = *claim;
        self.read(async |c| {
            let row = c
                .query_opt(
                    "SELECT cancel_requested FROM instances
                     WHERE id = $1 AND state = 'running' AND attempts = $2",
                    &[&t.id, &t.token],
                )
                .await?;
            match row {
                Some(r) => Ok(Heartbeat {
                    cancel_requested: r.try_get(0)?,
                }),
                None => Err(fenced(&t)),
            }
        })
        .await
    }

    async fn finish(&self, claim: &ClaimToken, outcome: &Outcome) -> Result<Finished> {
        let t = *claim;
        in_tx!(self, |tx| {
            let row = lock_inst(tx, t.id).await?;
            let Some(row) = row.filter(|r| r.state == State::Running && r.attempts == t.token)
            else {
                return Err(fenced(&t));
            };
            let tr = policy::finish(&t, outcome, row.cancel_requested);
            finish_tx(tx, &t, (&row.job, row.created), &tr).await
        })
    }

    async fn cancel(&self, sel: &Selector) -> Result<Vec<Instance>> {
        in_tx!(self, |tx| {
            let mut out = Vec::new();
            let (sql, p) = select_query(sel);
            for id in ids(&tx.query(sql, &params(&p)).await?)? {
                let Some(row) = lock_inst(tx, id).await? else {
                    continue;
                };
                let inst = Instance {
                    id,
                    job: row.job,
                    created: row.created,
                };
                match row.state {
                    State::Pending => {
                        let now = tx.now;
                        tx.execute(
                            "UPDATE instances SET state = 'cancelled', ended = $2 WHERE id = $1",
                            &[&id, &now],
                        )
                        .await?;
                        tx.event(
                            EventKind::Cancel,
                            &row.job,
                            Some((id, row.created)),
                            serde_json::Value::Null,
                        );
                        out.push(inst);
                    }
                    State::Running => {
                        tx.execute(
                            "UPDATE instances SET cancel_requested = TRUE WHERE id = $1",
                            &[&id],
                        )
                        .await?;
                        out.push(inst);
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
    }

    async fn retry(&self, sel: &Selector) -> Result<Vec<Instance>> {
        in_tx!(self, |tx| {
            let mut out = Vec::new();
            let (sql, p) = select_query(sel);
            for id in ids(&tx.query(sql, &params(&p)).await?)? {
                let row = tx
                    .query_opt(
                        "SELECT job, priority, timeout_ms, retries, cached FROM instances
                         WHERE id = $1 AND state IN ('fail', 'cancelled') AND retried_by IS NULL
                         FOR UPDATE",
                        &[&id],
                    )
                    .await?;
                let Some(r) = row else { continue };
                let job = parse_hash(r.try_get(0)?)?;
                let opts = PushOptions {
                    priority: r.try_get(1)?,
                    run_at: None,
                    timeout: r
                        .try_get::<_, Option<i64>>(2)?
                        .map(|t| Duration::from_millis(t as u64)),
                    retries: r.try_get::<_, Option<i64>>(3)?.map(|n| n as u32),
                    cached: r.try_get(4)?,
                };
                let inst = insert_instance(tx, &job, &opts).await?;
                tx.execute(
                    "UPDATE instances SET retried_by = $2 WHERE id = $1",
                    &[&id, &inst.id],
                )
                .await?;
                tx.event(
                    EventKind::Retry,
                    &job,
                    Some((inst.id, inst.created)),
                    serde_json::json!({"from": id}),
                );
                out.push(inst);
            }
            Ok(out)
        })
    }

    async fn list_page(&self, kind: ListKind, after: i64, limit: usize) -> Result<Vec<ListRow>> {
        self.read(async |c| list_page(c, kind, after, limit as i64).await)
            .await
    }

    async fn instance(&self, id: i64) -> Result<InstanceDetail> {
        self.read(async |c| {
            instance_detail(c, id)
                .await?
                .ok_or_else(|| Error::InstanceNotFound(format!("id:{id}")).into())
        })
        .await
    }

    async fn select(&self, sel: &Selector) -> Result<Vec<i64>> {
        self.read(async |c| {
            let (sql, p) = select_query(sel);
            ids(&c.query(sql, &params(&p)).await?)
        })
        .await
    }

    async fn job_exists(&self, job: &Hash) -> Result<bool> {
        self.read(async |c| {
            Ok(
                c.query_opt("SELECT 1 FROM jobs WHERE key = $1", &[&job.to_hex()])
                    .await?
                    .is_some(),
            )
        })
        .await
    }

    async fn counts(&self) -> Result<Counts> {
        self.read(async |c| {
            let mut counts = Counts::default();
            for r in c
                .query("SELECT state, COUNT(*) FROM instances GROUP BY state", &[])
                .await?
            {
                let state: State = r.try_get::<_, &str>(0)?.parse().map_err(corrupt)?;
                let n = r.try_get::<_, i64>(1)?;
                *counts.slot(state) = n.try_into().unwrap_or_default();
            }
            Ok(counts)
        })
        .await
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        self.read(async |c| {
            let rows = c
                .query(
                    "SELECT id, time, kind, job, created, instance, data FROM events
                     WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &(limit as i64)],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let kind: String = r.try_get(2)?;
                    let data: Option<String> = r.try_get(6)?;
                    Ok(Event {
                        id: r.try_get(0)?,
                        time: r.try_get(1)?,
                        event: kind.parse().map_err(corrupt)?,
                        job: parse_hash(r.try_get(3)?)?,
                        created: r.try_get(4)?,
                        instance: r.try_get(5)?,
                        data: data
                            .and_then(|d| serde_json::from_str(&d).ok())
                            .unwrap_or(serde_json::Value::Null),
                    })
                })
                .collect()
        })
        .await
    }

    async fn last_event_id(&self) -> Result<i64> {
        self.read(async |c| {
            Ok(
                c.query_one("SELECT COALESCE(MAX(id), 0)::BIGINT FROM events", &[])
                    .await?
                    .try_get(0)?,
            )
        })
        .await
    }

    async fn check(&self) -> Result<Vec<String>> {
        self.read(async |c| {
            let mut problems = Vec::new();
            let checks = [
                (
                    "SELECT COUNT(*) FROM instances i WHERE NOT EXISTS
                       (SELECT 1 FROM jobs j WHERE j.key = i.job)",
                    "instances name a job that does not exist",
                ),
                (
                    "SELECT COUNT(*) FROM instances i WHERE i.attempts > 0 AND NOT EXISTS
                       (SELECT 1 FROM attempts a WHERE a.instance = i.id AND a.attempt = i.attempts)",
                    "instances lack the row of their current attempt",
                ),
                (
                    "SELECT COUNT(*) FROM instances WHERE state = 'running' AND lease_until IS NULL",
                    "running instances have no lease",
                ),
                (
                    "SELECT COUNT(*) FROM events WHERE id > (SELECT value FROM counters WHERE name = 'event')",
                    "events lie beyond the event counter",
                ),
            ];
            for (sql, what) in checks {
                let n: i64 = c.query_one(sql, &[]).await?.try_get(0)?;
                if n > 0 {
                    problems.push(format!("{n} {what}"));
                }
            }
            // Streamed row by row (not `query`, which collects every row first): every
            // inline payload and output is read, and there may be millions.
            for (sql, what) in [
                (
                    "SELECT key, payload FROM jobs WHERE payload IS NOT NULL",
                    "job {key}: its inline payload",
                ),
                ("SELECT key, data FROM inline_blobs", "inline blob {key}"),
            ] {
                let rows = c.query_raw(sql, std::iter::empty::<i32>()).await?;
                futures_util::pin_mut!(rows);
                while let Some(r) = rows.next().await {
                    let r = r?;
                    let key: &str = r.try_get(0)?;
                    let actual = Hash::of(r.try_get::<_, &[u8]>(1)?);
                    if actual.to_hex() != key {
                        let owner = what.replace("{key}", key);
                        problems.push(format!("{owner} hashes to {actual}"));
                    }
                }
            }
            Ok(problems)
        })
        .await
    }

    async fn is_referenced(&self, hash: &Hash) -> Result<bool> {
        self.read(async |c| {
            Ok(c.query_one(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE key = $1 AND payload IS NULL)
                    OR (NOT EXISTS(SELECT 1 FROM inline_blobs WHERE key = $1)
                        AND (EXISTS(SELECT 1 FROM attempts WHERE stdout = $1)
                             OR EXISTS(SELECT 1 FROM attempts WHERE stderr = $1)))",
                &[&hash.to_hex()],
            )
            .await?
            .try_get(0)?)
        })
        .await
    }

    async fn references_page(
        &self,
        after: i64,
        span: i64,
    ) -> Result<(Vec<BlobReference>, Option<i64>)> {
        self.read(async |c| {
            let end = after.saturating_add(span.max(1));
            let mut out = Vec::new();
            for r in c
                .query(
                    "SELECT key FROM jobs WHERE id > $1 AND id <= $2 AND payload IS NULL ORDER BY id",
                    &[&after, &end],
                )
                .await?
            {
                let key: String = r.try_get(0)?;
                out.push(BlobReference {
                    hash: parse_hash(&key)?,
                    owner: format!("job {key}"),
                });
            }
            for r in c
                .query(
                    // Outputs kept inline name no blob in the store.
                    "SELECT instance, attempt,
                       CASE WHEN EXISTS(SELECT 1 FROM inline_blobs b WHERE b.key = a.stdout) THEN NULL ELSE a.stdout END,
                       CASE WHEN EXISTS(SELECT 1 FROM inline_blobs b WHERE b.key = a.stderr) THEN NULL ELSE a.stderr END
                     FROM attempts a
                     WHERE instance > $1 AND instance <= $2 ORDER BY instance, attempt",
                    &[&after, &end],
                )
                .await?
            {
                let id: i64 = r.try_get(0)?;
                let n: i64 = r.try_get(1)?;
                for (i, which) in [(2, "stdout"), (3, "stderr")] {
                    if let Some(h) = r.try_get::<_, Option<String>>(i)? {
                        out.push(BlobReference {
                            hash: parse_hash(&h)?,
                            owner: format!("instance {id} attempt {n} {which}"),
                        });
                    }
                }
            }
            let more: bool = c
                .query_one(
                    "SELECT EXISTS(SELECT 1 FROM jobs WHERE id > $1)
                       OR EXISTS(SELECT 1 FROM instances WHERE id > $1)",
                    &[&end],
                )
                .await?
                .try_get(0)?;
            Ok((out, more.then_some(end)))
        })
        .await
    }

    fn change_seq(&self) -> u64 {
        *self.inner.changes.borrow()
    }

    async fn wait_change(&self, seen: u64, timeout: Duration) {
        self.start_listener();
        let mut rx = self.inner.changes.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != seen)).await;
    }

    fn location(&self) -> String {
        self.inner.location.clone()
    }
}
