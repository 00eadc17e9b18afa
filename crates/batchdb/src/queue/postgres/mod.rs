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

use super::changes::Changes;
use crate::config::DEFAULT_DB_CONNECTIONS;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::Queue;
use super::list::*;
use super::migrations;
use super::types::*;

#[macro_use]
mod tx;
mod exec;
mod listen;
mod url;

use super::batch::{BatchCounts, DependencyResult, Selected};
use super::context::Resources;
use super::prune::{PruneCounts, PruneRequest, PruneStep};
use super::sql::{DbError, claim, deps, prune, read, recent, retry, workers, write};
use crate::error::{Error, Result};
use crate::hash::Hash;
use exec::Pg;
use tx::*;
use url::*;

/// The schema version this build writes and understands (the same on every backend).
pub const PG_SCHEMA_VERSION: i64 = migrations::SCHEMA_VERSION;

/// The PostgreSQL schema (namespace) batchdb's tables live in.
const NAMESPACE: &str = "batchdb";

/// The notification channel every change is announced on.
const CHANNEL: &str = "batchdb_changes";

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
    changes: Changes,
    listening: AtomicBool,
}

/// Errors inside a transaction: the database's own, a domain error, or a corrupt value.
pub(crate) type TxError = DbError<tokio_postgres::Error>;

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Db(e)
    }
}

pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

impl PgQueue {
    /// Connects to the database at `url` (`postgres://user:pass@host:port/db`; TLS is
    /// not supported by this build: use `sslmode=disable` or a local TLS proxy), and
    /// creates or migrates batchdb's schema. Several processes may open a fresh database
    /// at once. A database whose schema is newer than this build is refused with
    /// [`Error::SchemaTooNew`]. Holds up to [`DEFAULT_DB_CONNECTIONS`] connections at
    /// once, besides the one that listens for changes.
    pub async fn open(url: &str) -> Result<PgQueue> {
        PgQueue::open_with(url, DEFAULT_DB_CONNECTIONS).await
    }

    /// [`open`](Self::open), holding at most `connections` connections at once for
    /// its statements (at least 1), besides the one that listens for changes. Every
    /// connection a process opens is a server process that learns the schema and plans
    /// each statement anew, so a worker that needs few should hold few.
    pub async fn open_with(url: &str, connections: usize) -> Result<PgQueue> {
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
            .max_size(connections.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(60)))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| Error::Config {
                what: "postgres pool",
                value: location.clone(),
                why: e.to_string(),
            })?;
        let q = PgQueue {
            inner: Arc::new(Inner {
                location,
                config,
                pool,
                changes: Changes::new(),
                listening: AtomicBool::new(false),
            }),
        };
        q.migrate().await?;
        Ok(q)
    }

    fn err(&self, e: TxError) -> Error {
        let location = || self.inner.location.clone();
        e.into_error(location, |source| Error::Postgres {
            location: location(),
            source,
        })
    }

    /// A pooled connection whose `search_path` is batchdb's schema.
    async fn client(&self) -> TxResult<deadpool_postgres::Object> {
        let client = self.inner.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => TxError::Db(e),
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
    async fn push(&self, job: &Hash, opts: &PushOptions) -> Result<Instance> {
        in_tx!(self, |tx| { write::push(tx, job, opts).await })
    }

    async fn create_many(&self, jobs: &[NewJob]) -> Result<Vec<bool>> {
        in_tx!(self, |tx| { write::create_many(tx, jobs).await })
    }

    async fn add_many(&self, jobs: &[NewJob], opts: &PushOptions) -> Result<Vec<Instance>> {
        in_tx!(self, |tx| { write::add_many(tx, jobs, opts).await })
    }

    async fn inline_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        self.read(async |c| read::inline_blob(&mut Pg(c), hash).await)
            .await
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        // Lazy unless the claim ended an instance or served one from the cache, as on
        // SQLite: a claim lost to a crash of the server only means the instance runs
        // again (its worker is fenced), and the next durable commit flushes it anyway.
        in_tx!(self, |tx| {
            let (claims, durable) = claim::claim(tx, req).await?;
            if !durable {
                tx.lazy();
            }
            Ok(claims)
        })
    }

    async fn heartbeat(&self, claim: &ClaimToken, lease: Duration) -> Result<Heartbeat> {
        in_tx!(self, lazy = true, |tx| {
            write::heartbeat(tx, claim, lease).await
        })
    }

    async fn status(&self, claim: &ClaimToken) -> Result<Heartbeat> {
        self.read(async |c| read::status(&mut Pg(c), claim).await)
            .await
    }

    async fn finish(&self, claim: &ClaimToken, outcome: &Outcome) -> Result<Finished> {
        // Deferred: its first statement (the locked row) carries the BEGIN.
        in_tx!(self, deferred, |tx| {
            write::finish(tx, claim, outcome).await
        })
    }

    async fn finish_and_claim(
        &self,
        claim: &ClaimToken,
        outcome: &Outcome,
        next: &ClaimRequest,
    ) -> Result<(Finished, Vec<Claim>)> {
        in_tx!(self, deferred, |tx| {
            claim::finish_and_claim(tx, claim, outcome, next).await
        })
    }

    async fn cancel(&self, sel: &Selector) -> Result<Vec<Instance>> {
        in_tx!(self, |tx| { write::cancel(tx, sel).await })
    }

    async fn retry(&self, sel: &Selector, with_dependents: bool) -> Result<Vec<Instance>> {
        in_tx!(self, |tx| { retry::retry(tx, sel, with_dependents).await })
    }

    async fn list_page(
        &self,
        kind: ListKind,
        (after, limit): (i64, usize),
        batch: Option<&str>,
    ) -> Result<Vec<ListRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(async |c| read::list_page(&mut Pg(c), kind, (after, limit), batch).await)
            .await
    }

    async fn recent_page(&self, q: &RecentQuery) -> Result<Vec<InstanceSummary>> {
        self.read(async |c| recent::recent_page(&mut Pg(c), q).await)
            .await
    }

    async fn batches_page(
        &self,
        after: i64,
        limit: usize,
        name: Option<&str>,
    ) -> Result<Vec<BatchCounts>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(async |c| read::batches_page(&mut Pg(c), (after, limit), name).await)
            .await
    }

    async fn dependency_results(
        &self,
        id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DependencyResult>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(async |c| deps::results(&mut Pg(c), id, after, limit).await)
            .await
    }

    async fn instance(&self, id: i64) -> Result<InstanceDetail> {
        self.read(async |c| {
            read::instance_detail(&mut Pg(c), id)
                .await?
                .ok_or_else(|| Error::InstanceNotFound(format!("id:{id}")).into())
        })
        .await
    }

    async fn select_states(&self, sel: &Selector) -> Result<Vec<Selected>> {
        self.read(async |c| read::select_states(&mut Pg(c), sel).await)
            .await
    }

    async fn counts(&self) -> Result<Counts> {
        self.read(async |c| read::counts(&mut Pg(c)).await).await
    }

    async fn worker_seen(&self, name: &str, resources: &Resources, ttl: Duration) -> Result<()> {
        in_tx!(self, |tx| { workers::seen(tx, name, resources, ttl).await })
    }

    async fn worker_gone(&self, name: &str) -> Result<()> {
        in_tx!(self, |tx| { workers::gone(tx, name).await })
    }

    async fn unrunnable(&self, worker: Option<&Resources>) -> Result<u64> {
        let now = now_ms();
        self.read(async |c| workers::unrunnable(&mut Pg(c), now, worker).await)
            .await
    }

    async fn prune_step(
        &self,
        req: &PruneRequest,
        step: PruneStep,
    ) -> Result<(PruneCounts, Option<PruneStep>)> {
        in_tx!(self, |tx| { prune::step(tx, req, step).await })
    }

    async fn prune_count(&self, req: &PruneRequest) -> Result<u64> {
        self.read(async |c| prune::count(&mut Pg(c), req).await)
            .await
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(async |c| read::events(&mut Pg(c), after, limit).await)
            .await
    }

    async fn last_event_id(&self) -> Result<i64> {
        self.read(async |c| read::last_event_id(&mut Pg(c)).await)
            .await
    }

    async fn check(&self) -> Result<Check> {
        self.read(async |c| {
            let mut check = Check::default();
            for (sql, what) in CHECKS {
                let n: i64 = c.query_one(sql, &[]).await?.try_get(0)?;
                if n > 0 {
                    check.problems.push(format!("{n} {what}"));
                }
            }
            read::check_inline(&mut Pg(c), &mut check).await?;
            Ok(check)
        })
        .await
    }

    async fn is_referenced(&self, hash: &Hash) -> Result<bool> {
        self.read(async |c| read::is_referenced(&mut Pg(c), hash).await)
            .await
    }

    async fn references_page(
        &self,
        after: i64,
        span: i64,
    ) -> Result<(Vec<BlobReference>, Option<i64>)> {
        self.read(async |c| read::references_page(&mut Pg(c), after, span).await)
            .await
    }

    fn change_seq(&self) -> u64 {
        self.inner.changes.seq()
    }

    async fn wait_change(&self, seen: u64, timeout: Duration) {
        self.start_listener();
        self.inner.changes.wait(seen, timeout).await;
    }

    fn location(&self) -> String {
        self.inner.location.clone()
    }
}

/// The consistency checks PostgreSQL has no `integrity_check` for: each query counts
/// rows that break a rule.
const CHECKS: [(&str, &str); 4] = [
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
