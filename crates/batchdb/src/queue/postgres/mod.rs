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
use super::policy::{self, AttemptEnd, Transition};
use super::types::*;
use crate::blob::BlobInfo;
use crate::error::{Error, Result};
use crate::hash::Hash;

/// The schema version this build writes and understands.
pub const PG_SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The PostgreSQL schema (namespace) batchdb's tables live in.
const NAMESPACE: &str = "batchdb";

/// The migrations, in order: migration `i` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("schema_v1.sql"),
    // Version 2: small payloads kept inline in the job row.
    "ALTER TABLE jobs ADD COLUMN payload BYTEA;",
    // Version 3: small outputs kept inline, by hash.
    "CREATE TABLE inline_blobs(key TEXT PRIMARY KEY, data BYTEA NOT NULL);",
    // Version 4: each attempt's random id, which its processes carry.
    "ALTER TABLE attempts ADD COLUMN attempt_id TEXT;",
];

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
enum TxError {
    Pg(tokio_postgres::Error),
    Domain(Error),
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

type TxResult<T> = std::result::Result<T, TxError>;

/// An event to append when the transaction commits.
struct NewEvent {
    time: i64,
    kind: EventKind,
    job: Hash,
    inst: Option<(i64, i64)>,
    data: serde_json::Value,
}

/// A write transaction: statements are prepared once per connection and cached;
/// events are buffered and numbered at commit.
struct Tx<'a> {
    tx: deadpool_postgres::Transaction<'a>,
    events: Vec<NewEvent>,
    changed: bool,
    /// The database server's clock at the start of the transaction (epoch ms).
    now: i64,
}

impl Tx<'_> {
    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> TxResult<Vec<Row>> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query(&stmt, params).await?)
    }

    async fn query_opt(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> TxResult<Option<Row>> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query_opt(&stmt, params).await?)
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> TxResult<Row> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query_one(&stmt, params).await?)
    }

    /// Runs a statement; a statement that touched rows marks the transaction as a change.
    async fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> TxResult<u64> {
        let stmt = self.tx.prepare_cached(sql).await?;
        let n = self.tx.execute(&stmt, params).await?;
        if n > 0 {
            self.changed = true;
        }
        Ok(n)
    }

    fn event(
        &mut self,
        kind: EventKind,
        job: &Hash,
        inst: Option<(i64, i64)>,
        data: serde_json::Value,
    ) {
        self.events.push(NewEvent {
            time: self.now,
            kind,
            job: *job,
            inst,
            data,
        });
        self.changed = true;
    }

    /// Numbers and appends the buffered events, announces the change, and commits.
    /// Returns whether anything changed.
    async fn commit(self) -> TxResult<bool> {
        let Tx {
            tx,
            events,
            changed,
            ..
        } = self;
        if !events.is_empty() {
            // Taken last, held until commit: ids are handed out in commit order.
            let stmt = tx
                .prepare_cached(
                    "UPDATE counters SET value = value + $1 WHERE name = 'event' RETURNING value",
                )
                .await?;
            let last: i64 = tx
                .query_one(&stmt, &[&(events.len() as i64)])
                .await?
                .try_get(0)?;
            let first = last - events.len() as i64 + 1;
            let ids: Vec<i64> = (first..=last).collect();
            let times: Vec<i64> = events.iter().map(|e| e.time).collect();
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            let jobs: Vec<String> = events.iter().map(|e| e.job.to_hex()).collect();
            let created: Vec<Option<i64>> = events.iter().map(|e| e.inst.map(|i| i.1)).collect();
            let inst: Vec<Option<i64>> = events.iter().map(|e| e.inst.map(|i| i.0)).collect();
            let data: Vec<Option<String>> = events
                .iter()
                .map(|e| (!e.data.is_null()).then(|| e.data.to_string()))
                .collect();
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO events(id, time, kind, job, created, instance, data)
                     SELECT * FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[],
                                          $5::BIGINT[], $6::BIGINT[], $7::TEXT[])",
                )
                .await?;
            tx.execute(
                &stmt,
                &[&ids, &times, &kinds, &jobs, &created, &inst, &data],
            )
            .await?;
        }
        if changed {
            let stmt = tx.prepare_cached("SELECT pg_notify($1, '')").await?;
            tx.execute(&stmt, &[&CHANNEL]).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }
}

/// Runs `$body` (a block evaluating to `TxResult<T>`, in which `$tx: &mut Tx` is in
/// scope and `return` leaves the block) in a transaction and commits it; retries the
/// whole transaction on a serialization failure or a deadlock. With `lazy`, the
/// commit does not wait for the WAL flush (a crash of the database server may undo
/// it; used for heartbeats, whose loss only shortens a lease).
macro_rules! in_tx {
    ($self:expr, lazy = $lazy:expr, |$tx:ident| $body:block) => {{
        let this = $self;
        let mut tries = 0u32;
        loop {
            let r: TxResult<_> = async {
                let mut client = this.client().await?;
                let raw = client.transaction().await?;
                if $lazy {
                    raw.batch_execute("SET LOCAL synchronous_commit = off")
                        .await?;
                }
                let now: i64 = raw
                    .query_one(
                        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
                        &[],
                    )
                    .await?
                    .try_get(0)?;
                let mut tx_ = Tx {
                    tx: raw,
                    events: Vec::new(),
                    changed: false,
                    now,
                };
                let out = {
                    let $tx = &mut tx_;
                    typed(async move { $body }).await
                }?;
                let changed = tx_.commit().await?;
                Ok((out, changed))
            }
            .await;
            match r {
                Ok((out, changed)) => {
                    if changed {
                        this.inner.changes.send_modify(|v| *v += 1);
                    }
                    break Ok(out);
                }
                Err(TxError::Pg(e)) if tries < 8 && retryable(&e) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=20) * tries as u64))
                        .await;
                }
                Err(e) => break Err(this.err(e)),
            }
        }
    }};
    ($self:expr, |$tx:ident| $body:block) => {
        in_tx!($self, lazy = false, |$tx| $body)
    };
}

/// Gives a transaction body's async block its output type (so `?` inside it knows
/// what to convert into).
fn typed<T>(
    f: impl std::future::Future<Output = TxResult<T>>,
) -> impl std::future::Future<Output = TxResult<T>> {
    f
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// `url` with any password (in the user info or a `password=` parameter) replaced by
/// `***`.
fn mask_password(url: &str) -> String {
    let masked = mask_userinfo(url);
    match masked.split_once('?') {
        Some((base, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
        None => masked,
    }
}

fn mask_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

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
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                tx.batch_execute(&format!("SET LOCAL search_path = {NAMESPACE}; {sql}"))
                    .await?;
                tx.execute(
                    &format!("INSERT INTO {NAMESPACE}.schema_migrations(version) VALUES ($1)"),
                    &[&(i as i64 + 1)],
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

    /// Starts (once) the task that keeps a `LISTEN` connection open and wakes waiters.
    fn start_listener(&self) {
        if self.inner.listening.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let config = self.inner.config.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let location = match weak.upgrade() {
                    Some(inner) => inner.location.clone(),
                    None => return,
                };
                let began = std::time::Instant::now();
                let r = listen_once(&config, &weak).await;
                if began.elapsed() > Duration::from_secs(30) {
                    // A session that lasted is a fresh start for the backoff.
                    failures = 0;
                }
                match r {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_millis(100)
                            .saturating_mul(1 << failures.min(7))
                            .min(Duration::from_secs(10));
                        tracing::warn!(
                            "postgres {location}: change listener lost ({e}); reconnecting in {wait:?}"
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
                // Whatever happened while not listening: make waiters look again.
                match weak.upgrade() {
                    Some(inner) => inner.changes.send_modify(|v| *v += 1),
                    None => return,
                }
            }
        });
    }
}

/// One `LISTEN` session: connects, listens, wakes waiters on each notification, and
/// returns when the connection ends (an error) or the queue is dropped (`Ok`).
async fn listen_once(
    config: &tokio_postgres::Config,
    weak: &Weak<Inner>,
) -> std::result::Result<(), tokio_postgres::Error> {
    let (client, mut conn) = config.connect(NoTls).await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let (ended_tx, mut ended_rx) = tokio::sync::oneshot::channel();
    let w = weak.clone();
    let driver = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => match w.upgrade() {
                    Some(inner) => inner.changes.send_modify(|v| *v += 1),
                    None => return Ok(()),
                },
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let _ = ended_tx.send(());
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    if let Some(inner) = weak.upgrade() {
        inner.changes.send_modify(|v| *v += 1);
    }
    // Keep the client alive while the connection lives and the queue exists.
    loop {
        tokio::select! {
            _ = &mut ended_rx => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                if weak.strong_count() == 0 {
                    driver.abort();
                    return Ok(());
                }
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

fn parse_hash(s: &str) -> TxResult<Hash> {
    s.parse().map_err(TxError::Domain)
}

fn opt_hash(s: Option<String>) -> TxResult<Option<Hash>> {
    s.as_deref().map(parse_hash).transpose()
}

fn blob(hash: Option<String>, size: Option<i64>) -> TxResult<Option<BlobInfo>> {
    Ok(opt_hash(hash)?.map(|hash| BlobInfo {
        hash,
        size: size.unwrap_or(0) as u64,
    }))
}

/// The columns of `instances` a claim needs, in this order.
const CLAIM_COLS: &str = "id, job, created, failures, timeout_ms, retries, cached, attempts";

struct Candidate {
    id: i64,
    job: Hash,
    created: i64,
    failures: u32,
    timeout: Option<Duration>,
    retries: Option<u32>,
    cached: bool,
    attempts: i64,
}

fn candidate(r: &Row) -> TxResult<Candidate> {
    Ok(Candidate {
        id: r.try_get(0)?,
        job: parse_hash(r.try_get(1)?)?,
        created: r.try_get(2)?,
        failures: r.try_get::<_, i64>(3)? as u32,
        timeout: r
            .try_get::<_, Option<i64>>(4)?
            .map(|t| Duration::from_millis(t as u64)),
        retries: r.try_get::<_, Option<i64>>(5)?.map(|n| n as u32),
        cached: r.try_get(6)?,
        attempts: r.try_get(7)?,
    })
}

impl Candidate {
    fn claim(
        &self,
        (token, attempt_id): (ClaimToken, String),
        start: i64,
        takeover: bool,
        cache_hit: Option<AttemptReport>,
    ) -> Claim {
        Claim {
            token,
            job: self.job,
            created: self.created,
            start,
            failures: self.failures,
            timeout: self.timeout,
            retries: self.retries,
            attempt_id,
            takeover,
            lost: None,
            cache_hit,
        }
    }
}

async fn insert_job(tx: &mut Tx<'_>, job: &NewJob) -> TxResult<bool> {
    let now = tx.now;
    // A job whose payload was in the store gets it inline when added again with one
    // (so a lost blob is repaired, as re-adding it to the store would).
    let row = tx
        .query_opt(
            "INSERT INTO jobs(key, size, created, payload) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key) DO UPDATE SET payload = EXCLUDED.payload
               WHERE jobs.payload IS NULL AND EXCLUDED.payload IS NOT NULL
             RETURNING (xmax = 0)",
            &[
                &job.info.hash.to_hex(),
                &(job.info.size as i64),
                &now,
                &job.inline,
            ],
        )
        .await?;
    let Some(row) = row else { return Ok(false) };
    tx.changed = true;
    let inserted: bool = row.try_get(0)?;
    if inserted {
        tx.event(
            EventKind::Create,
            &job.info.hash,
            None,
            serde_json::json!({"size": job.info.size}),
        );
    }
    Ok(inserted)
}

async fn insert_instance(tx: &mut Tx<'_>, job: &Hash, opts: &PushOptions) -> TxResult<Instance> {
    let now = tx.now;
    // `created` is unique across all instances: a push landing in a millisecond
    // already taken gets the next free one (the counter row's lock serializes pushes).
    let created: i64 = tx
        .query_one(
            "UPDATE counters SET value = GREATEST(value + 1, $1) WHERE name = 'created' RETURNING value",
            &[&now],
        )
        .await?
        .try_get(0)?;
    let timeout = opts.timeout.map(|t| t.as_millis() as i64);
    let retries = opts.retries.map(i64::from);
    let run_at = opts.run_at.unwrap_or(now);
    let id: i64 = tx
        .query_one(
            "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached)
             VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7) RETURNING id",
            &[
                &job.to_hex(),
                &created,
                &opts.priority,
                &run_at,
                &timeout,
                &retries,
                &opts.cached,
            ],
        )
        .await?
        .try_get(0)?;
    let data = match opts.run_at {
        Some(t) if t > now => serde_json::json!({"run_at": t}),
        _ => serde_json::Value::Null,
    };
    tx.event(EventKind::Push, job, Some((id, created)), data);
    Ok(Instance {
        id,
        job: *job,
        created,
    })
}

async fn start_attempt(
    tx: &mut Tx<'_>,
    c: &Candidate,
    req: &ClaimRequest,
    cache_key: Option<Hash>,
) -> TxResult<(ClaimToken, String)> {
    let now = tx.now;
    let token = c.attempts + 1;
    let attempt_id = super::types::new_attempt_id();
    let until = now + req.lease.as_millis() as i64;
    tx.execute(
        "UPDATE instances SET state = 'running', attempts = $2, lease_until = $3, cache_key = $4
         WHERE id = $1",
        &[&c.id, &token, &until, &cache_key.map(|k| k.to_hex())],
    )
    .await?;
    tx.execute(
        "INSERT INTO attempts(instance, attempt, worker, start, attempt_id)
         VALUES ($1, $2, $3, $4, $5)",
        &[&c.id, &token, &req.worker, &now, &attempt_id],
    )
    .await?;
    tx.event(
        EventKind::Start,
        &c.job,
        Some((c.id, c.created)),
        serde_json::json!({"attempt": token, "worker": req.worker}),
    );
    Ok((ClaimToken { id: c.id, token }, attempt_id))
}

async fn cache_lookup(tx: &Tx<'_>, key: &Hash) -> TxResult<Option<AttemptReport>> {
    let row = tx
        .query_opt(
            "SELECT a.exit_code, a.stdout, a.stdout_size, a.stderr, a.stderr_size
             FROM cache c JOIN attempts a ON a.instance = c.instance AND a.attempt = c.attempt
             WHERE c.key = $1 AND a.outcome = 'result'",
            &[&key.to_hex()],
        )
        .await?;
    row.map(|r| {
        Ok(AttemptReport {
            exit_code: r.try_get(0)?,
            stdout: blob(r.try_get(1)?, r.try_get(2)?)?,
            stderr: blob(r.try_get(3)?, r.try_get(4)?)?,
            cached: true,
            ..AttemptReport::default()
        })
    })
    .transpose()
}

async fn record_attempt(
    tx: &mut Tx<'_>,
    t: &ClaimToken,
    outcome: &str,
    r: &AttemptReport,
) -> TxResult<()> {
    tx.execute(
        "UPDATE attempts SET \"end\" = $3, outcome = $4, exit_code = $5, signal = $6, stdout = $7,
           stdout_size = $8, stderr = $9, stderr_size = $10, message = $11, cached = $12
         WHERE instance = $1 AND attempt = $2",
        &[
            &t.id,
            &t.token,
            &r.end,
            &outcome,
            &r.exit_code,
            &r.signal,
            &r.stdout.map(|b| b.hash.to_hex()),
            &r.stdout.map(|b| b.size as i64),
            &r.stderr.map(|b| b.hash.to_hex()),
            &r.stderr.map(|b| b.size as i64),
            &r.message,
            &r.cached,
        ],
    )
    .await?;
    for data in &r.inline {
        tx.execute(
            "INSERT INTO inline_blobs(key, data) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&Hash::of(data).to_hex(), data],
        )
        .await?;
    }
    Ok(())
}

/// Carries out transition `tr` of attempt `t` (see [`policy::finish`]); the caller
/// has checked the fencing token.
async fn finish_tx(
    tx: &mut Tx<'_>,
    t: &ClaimToken,
    (job, created): (&Hash, i64),
    tr: &Transition<'_>,
) -> TxResult<Finished> {
    let now = tx.now;
    record_attempt(tx, t, tr.attempt.as_str(), tr.report).await?;
    tx.execute(
        "UPDATE instances SET state = $2, ended = COALESCE($3, ended),
           run_at = COALESCE($4, run_at), failures = failures + $5, lease_until = NULL,
           cache_key = CASE WHEN $6 THEN NULL ELSE cache_key END
         WHERE id = $1",
        &[
            &t.id,
            &tr.state.as_str(),
            &tr.ends.then_some(now),
            &tr.run_at,
            &i64::from(tr.counts_failure),
            &tr.clears_cache_key,
        ],
    )
    .await?;
    if let Some(k) = tr.fills_cache {
        tx.execute(
            "INSERT INTO cache(key, instance, attempt) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET instance = EXCLUDED.instance,
               attempt = EXCLUDED.attempt",
            &[&k.to_hex(), &t.id, &t.token],
        )
        .await?;
    }
    tx.event(tr.event, job, Some((t.id, created)), tr.data.clone());
    Ok(tr.finished)
}

/// The query naming the instances a selector selects, and its parameters.
fn select_query(sel: &Selector) -> (&'static str, Vec<Box<dyn ToSql + Sync + Send>>) {
    match sel {
        Selector::Id(id) => (
            "SELECT id FROM instances WHERE id = $1",
            vec![Box::new(*id)],
        ),
        Selector::Created(c) => (
            "SELECT id FROM instances WHERE created = $1 ORDER BY id",
            vec![Box::new(*c)],
        ),
        Selector::Hash(h) => (
            "SELECT id FROM instances WHERE job = $1
             UNION SELECT instance FROM attempts WHERE stdout = $1 AND outcome = 'result'
             ORDER BY 1",
            vec![Box::new(h.to_hex())],
        ),
        Selector::AllFailed => (
            "SELECT id FROM instances WHERE state = 'fail' AND retried_by IS NULL ORDER BY id",
            vec![],
        ),
    }
}

fn params(p: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

fn ids(rows: &[Row]) -> TxResult<Vec<i64>> {
    rows.iter()
        .map(|r| r.try_get(0).map_err(TxError::Pg))
        .collect()
}

struct InstRow {
    job: Hash,
    created: i64,
    state: String,
    attempts: i64,
    cancel_requested: bool,
}

/// Reads and locks one instance row.
async fn lock_inst(tx: &Tx<'_>, id: i64) -> TxResult<Option<InstRow>> {
    let row = tx
        .query_opt(
            "SELECT job, created, state, attempts, cancel_requested FROM instances
             WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    row.map(|r| {
        Ok(InstRow {
            job: parse_hash(r.try_get(0)?)?,
            created: r.try_get(1)?,
            state: r.try_get(2)?,
            attempts: r.try_get(3)?,
            cancel_requested: r.try_get(4)?,
        })
    })
    .transpose()
}

fn fenced(t: &ClaimToken) -> TxError {
    TxError::Domain(Error::Fenced {
        instance: t.id,
        token: t.token,
    })
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
        in_tx!(self, |tx| {
            let now = tx.now;
            let mut out = Vec::new();
            // 1. Take over attempts whose worker stopped renewing its lease.
            let rows = tx
                .query(
                    &format!(
                        "SELECT {CLAIM_COLS}, cancel_requested FROM instances
                         WHERE state = 'running' AND lease_until < $1
                         ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&now, &(req.limit as i64)],
                )
                .await?;
            for r in rows {
                let c = candidate(&r)?;
                let cancel: bool = r.try_get(8)?;
                let old = ClaimToken {
                    id: c.id,
                    token: c.attempts,
                };
                let lost_before: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM attempts WHERE instance = $1 AND outcome = 'lost'",
                        &[&c.id],
                    )
                    .await?
                    .try_get(0)?;
                let lost = match policy::expired(now, cancel, lost_before) {
                    policy::Expired::TakeOver(lost) => lost,
                    policy::Expired::Cancel(end) | policy::Expired::GiveUp(end) => {
                        let tr = policy::finish(&old, &end, cancel);
                        finish_tx(tx, &old, (&c.job, c.created), &tr).await?;
                        continue;
                    }
                };
                let row = tx
                    .query_one(
                        "SELECT worker, attempt_id FROM attempts WHERE instance = $1 AND attempt = $2",
                        &[&old.id, &old.token],
                    )
                    .await?;
                let lost_attempt =
                    LostAttempt::new(old.id, old.token, row.try_get(0)?, row.try_get(1)?);
                record_attempt(tx, &old, AttemptEnd::Lost.as_str(), &lost).await?;
                let token = start_attempt(tx, &c, req, None).await?;
                let mut claim = c.claim(token, now, true, None);
                claim.lost = Some(lost_attempt);
                out.push(claim);
            }
            // 2. Due pending instances, by priority then order, skipping rows another
            //    worker is claiming right now.
            let remaining = req.limit.saturating_sub(out.len());
            let order = match req.order {
                Order::Newest => "priority DESC, created DESC, id DESC",
                Order::Oldest => "priority DESC, created ASC, id ASC",
            };
            let window = remaining * 4 + 16;
            let mut claimed = 0;
            let mut skipped = 0usize;
            let mut in_batch: Vec<Hash> = Vec::new();
            while claimed < remaining {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT {CLAIM_COLS} FROM instances
                             WHERE state = 'pending' AND run_at <= $1
                             ORDER BY {order} LIMIT $2 OFFSET $3 FOR UPDATE SKIP LOCKED"
                        ),
                        &[&now, &(window as i64), &(skipped as i64)],
                    )
                    .await?;
                let last_window = rows.len() < window;
                for r in rows {
                    if claimed == remaining {
                        break;
                    }
                    let c = candidate(&r)?;
                    let key = policy::claim_cache_key(req, &c.job, c.cached, c.timeout);
                    if let Some(k) = key {
                        // One claimer at a time per cache key, so identical runs are
                        // started once even by workers claiming at the same moment. A
                        // key another claimer holds is in flight: skip it (never wait,
                        // so two claimers cannot deadlock on two keys).
                        let mine: bool = tx
                            .query_one(
                                "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                                &[&k.to_hex()],
                            )
                            .await?
                            .try_get(0)?;
                        if !mine {
                            skipped += 1;
                            continue;
                        }
                        if let Some(mut hit) = cache_lookup(tx, &k).await? {
                            let token = start_attempt(tx, &c, req, None).await?;
                            hit.start = now;
                            hit.end = now;
                            let served = Outcome::Success(hit.clone());
                            let tr = policy::finish(&token.0, &served, false);
                            finish_tx(tx, &token.0, (&c.job, c.created), &tr).await?;
                            out.push(c.claim(token, now, false, Some(hit)));
                            continue;
                        }
                        let in_flight = in_batch.contains(&k)
                            || tx
                                .query_opt(
                                    "SELECT 1 FROM instances WHERE state = 'running' AND cache_key = $1",
                                    &[&k.to_hex()],
                                )
                                .await?
                                .is_some();
                        if in_flight {
                            // An identical run is in flight: wait for its result.
                            skipped += 1;
                            continue;
                        }
                        in_batch.push(k);
                    }
                    let token = start_attempt(tx, &c, req, key).await?;
                    claimed += 1;
                    out.push(c.claim(token, now, false, None));
                }
                if last_window {
                    break;
                }
            }
            Ok(out)
        })
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
            let Some(row) = row.filter(|r| r.state == "running" && r.attempts == t.token) else {
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
                match row.state.as_str() {
                    "pending" => {
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
                    "running" => {
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
                let state: String = r.try_get(0)?;
                let n = r.try_get::<_, i64>(1)? as u64;
                match state.as_str() {
                    "pending" => counts.pending = n,
                    "running" => counts.running = n,
                    "result" => counts.result = n,
                    "fail" => counts.fail = n,
                    "cancelled" => counts.cancelled = n,
                    _ => {}
                }
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
                        event: kind.parse().map_err(TxError::Domain)?,
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

async fn list_page(
    c: &deadpool_postgres::Object,
    kind: ListKind,
    after: i64,
    limit: i64,
) -> TxResult<Vec<ListRow>> {
    match kind {
        ListKind::Job => {
            let rows = c
                .query(
                    "SELECT j.id, j.key, j.size, j.created,
                       ARRAY(SELECT i.created FROM instances i
                             WHERE i.job = j.key AND i.state = 'running' ORDER BY i.created)
                     FROM jobs j WHERE j.id > $1 ORDER BY j.id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ListRow::Job(JobRow {
                        cursor: r.try_get(0)?,
                        key: parse_hash(r.try_get(1)?)?,
                        size: r.try_get::<_, i64>(2)? as u64,
                        created: r.try_get(3)?,
                        running: r.try_get(4)?,
                    }))
                })
                .collect()
        }
        ListKind::Pending => {
            let rows = c
                .query(
                    "SELECT id, job, created, state, priority, run_at, attempts FROM instances
                     WHERE id > $1 AND state IN ('pending', 'running') ORDER BY id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ListRow::Pending(PendingRow {
                        id: r.try_get(0)?,
                        job: parse_hash(r.try_get(1)?)?,
                        created: r.try_get(2)?,
                        running: r.try_get::<_, &str>(3)? == "running",
                        priority: r.try_get(4)?,
                        run_at: r.try_get(5)?,
                        attempts: r.try_get(6)?,
                    }))
                })
                .collect()
        }
        ListKind::Result => {
            let rows = c
                .query(
                    "SELECT i.id, i.job, i.created, a.start, a.\"end\", a.stdout, a.stdout_size,
                       a.stderr, a.exit_code, i.attempts, a.cached
                     FROM instances i JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                     WHERE i.state = 'result' AND i.id > $1 ORDER BY i.id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let job = parse_hash(r.try_get(1)?)?;
                    let created = r.try_get(2)?;
                    Ok(ListRow::Result(ResultRow {
                        key: (job, created),
                        value: ResultValue {
                            id: r.try_get(0)?,
                            created,
                            start: r.try_get(3)?,
                            end: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0),
                            hash: parse_hash(r.try_get::<_, Option<&str>>(5)?.unwrap_or_default())?,
                            size: r.try_get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                            stderr: opt_hash(r.try_get(7)?)?,
                            exit_code: r.try_get(8)?,
                            attempts: r.try_get(9)?,
                            cached: r.try_get(10)?,
                        },
                    }))
                })
                .collect()
        }
        ListKind::Fail | ListKind::Cancelled => {
            let state = if kind == ListKind::Fail {
                "fail"
            } else {
                "cancelled"
            };
            let rows = c
                .query(
                    "SELECT i.id, i.job, i.created, a.start, a.\"end\", a.stdout, a.stderr,
                       a.exit_code, a.signal, a.message, i.attempts
                     FROM instances i
                     LEFT JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                     WHERE i.state = $3 AND i.id > $1 ORDER BY i.id LIMIT $2",
                    &[&after, &limit, &state],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let job = parse_hash(r.try_get(1)?)?;
                    let created = r.try_get(2)?;
                    Ok(ListRow::Fail(FailRow {
                        key: (job, created),
                        value: FailValue {
                            id: r.try_get(0)?,
                            created,
                            start: r.try_get(3)?,
                            end: r.try_get(4)?,
                            stdout: opt_hash(r.try_get(5)?)?,
                            stderr: opt_hash(r.try_get(6)?)?,
                            exit_code: r.try_get(7)?,
                            signal: r.try_get(8)?,
                            message: r
                                .try_get::<_, Option<String>>(9)?
                                .unwrap_or_else(|| "cancelled before it ran".into()),
                            attempts: r.try_get(10)?,
                        },
                    }))
                })
                .collect()
        }
    }
}

async fn instance_detail(
    c: &deadpool_postgres::Object,
    id: i64,
) -> TxResult<Option<InstanceDetail>> {
    let head = c
        .query_opt(
            "SELECT job, created, state, priority, run_at, timeout_ms, retries, cached
             FROM instances WHERE id = $1",
            &[&id],
        )
        .await?;
    let Some(r) = head else { return Ok(None) };
    let state: String = r.try_get(2)?;
    let mut detail = InstanceDetail {
        id,
        job: parse_hash(r.try_get(0)?)?,
        created: r.try_get(1)?,
        state: state.parse().map_err(TxError::Domain)?,
        priority: r.try_get(3)?,
        run_at: r.try_get(4)?,
        timeout_ms: r.try_get::<_, Option<i64>>(5)?.map(|t| t as u64),
        retries: r.try_get::<_, Option<i64>>(6)?.map(|n| n as u32),
        cached: r.try_get(7)?,
        attempts: Vec::new(),
    };
    for r in c
        .query(
            "SELECT attempt, worker, outcome, start, \"end\", exit_code, signal, stdout,
               stdout_size, stderr, stderr_size, message, cached
             FROM attempts WHERE instance = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
    {
        detail.attempts.push(AttemptRow {
            attempt: r.try_get(0)?,
            worker: r.try_get(1)?,
            outcome: r.try_get(2)?,
            report: AttemptReport {
                start: r.try_get(3)?,
                end: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0),
                exit_code: r.try_get(5)?,
                signal: r.try_get(6)?,
                stdout: blob(r.try_get(7)?, r.try_get(8)?)?,
                stderr: blob(r.try_get(9)?, r.try_get(10)?)?,
                message: r.try_get(11)?,
                cached: r.try_get(12)?,
                cache_key: None,
                inline: Vec::new(),
            },
        });
    }
    Ok(Some(detail))
}

#[cfg(test)]
mod tests {
    use super::mask_password;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(
            mask_password("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(mask_password("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(mask_password("postgres://h/db"), "postgres://h/db");
        assert_eq!(
            mask_password("postgres://u@h/db?sslmode=disable&password=s3cret"),
            "postgres://u@h/db?sslmode=disable&password=***"
        );
    }
}
