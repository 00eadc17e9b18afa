//! The embedded default queue: one SQLite file in WAL mode, shared by any number of
//! processes on the machine.
//!
//! Every write is a `BEGIN IMMEDIATE` transaction committed with `synchronous=FULL`,
//! so what a call reported as done survives a crash. Writes of one process that arrive
//! while another commits share the next commit (group commit: one fsync for all, each
//! write in a savepoint of its own). Other processes' commits are
//! noticed through inotify on the database's directory (every commit writes the WAL
//! file), backed by a `PRAGMA data_version` check every [`FALLBACK_POLL`] (every
//! [`POLL`] where inotify is unavailable); this process's own commits wake its
//! waiters at once.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use super::Queue;
use super::policy::{self, AttemptEnd, Transition};
use super::types::*;
use crate::blob::BlobInfo;
use crate::error::{Error, Result};
use crate::hash::Hash;

use super::migrations::{self, SCHEMA_VERSION};

mod group_commit;
mod read;
mod tx;
mod watch;

use group_commit::*;
use read::*;
use tx::*;

/// How often other processes' commits are looked for while someone waits, where the
/// kernel cannot tell us (no inotify).
pub const POLL: Duration = Duration::from_millis(20);

/// How often they are looked for anyway, as a backstop, when inotify works.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The SQLite queue backend. Cheap to clone; clones share one connection.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Writes waiting for the next group commit.
    queued: Mutex<Vec<Queued>>,
    changes: watch::Sender<u64>,
    poller: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Errors inside a transaction: SQLite's own, or a domain error to pass through.
enum TxError {
    Sql(rusqlite::Error),
    Domain(Error),
}

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Sql(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Domain(e)
    }
}

type TxResult<T> = std::result::Result<T, TxError>;

impl TxError {
    /// The library error for this failure on database `path`: a value SQLite could
    /// not turn into what batchdb wrote is [`Error::Corrupt`], like on every backend.
    fn on(self, path: &Path) -> Error {
        use rusqlite::Error as E;
        match self {
            TxError::Sql(
                e @ (E::FromSqlConversionFailure(..)
                | E::InvalidColumnType(..)
                | E::IntegralValueOutOfRange(..)),
            ) => Error::Corrupt {
                location: path.display().to_string(),
                what: e.to_string(),
            },
            TxError::Sql(source) => Error::Sqlite {
                path: path.to_path_buf(),
                source,
            },
            TxError::Domain(e) => e,
        }
    }
}

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // journal_mode needs a lock the first time; busy_timeout covers it.
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    // A 16 MiB page cache (SQLite's default is 2 MiB): a bulk add of 10,000 jobs
    // otherwise spills pages to the WAL mid-transaction and reads them back.
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA cache_size=-16384;",
    )?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, location: &str) -> TxResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew {
            location: location.to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        }
        .into());
    }
    for (_, step) in migrations::pending(version) {
        tx.execute_batch(step.sqlite)?;
    }
    if version < SCHEMA_VERSION {
        tx.execute_batch(&format!("PRAGMA user_version={SCHEMA_VERSION}"))?;
    }
    tx.commit()?;
    Ok(())
}

impl SqliteQueue {
    /// Opens (creating and migrating if needed) the database at `path`. Several
    /// processes may open and migrate the same file at once. A file whose schema is
    /// newer than this build is refused with [`Error::SchemaTooNew`].
    pub async fn open(path: impl Into<PathBuf>) -> Result<SqliteQueue> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| Error::io("create database directory", parent, e))?;
        }
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let mut conn = open_conn(&p).map_err(|e| TxError::Sql(e).on(&p))?;
            migrate(&mut conn, &p.display().to_string()).map_err(|e| e.on(&p))?;
            Ok(conn)
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))??;
        let (changes, _) = watch::channel(0);
        Ok(SqliteQueue {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(conn),
                queued: Mutex::new(Vec::new()),
                changes,
                poller: AtomicBool::new(false),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the connection on a blocking thread.
    async fn with_conn<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> TxResult<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner
                .conn
                .lock()
                .map_err(|_| Error::Task("sqlite connection lock poisoned".into()))?;
            f(&mut conn).map_err(|e| e.on(&inner.path))
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn create(&self, job: &BlobInfo) -> Result<bool> {
        let job = *job;
        self.write(move |tx| Ok(insert_job(tx, &NewJob::stored(job), now_ms())?))
            .await
    }

    async fn push(&self, job: &Hash, opts: &PushOptions) -> Result<Instance> {
        let (job, opts) = (*job, opts.clone());
        self.write(move |tx| {
            if !job_exists(tx, &job)? {
                return Err(Error::JobNotFound(job).into());
            }
            Ok(insert_instance(
                tx,
                &job,
                &opts,
                now_ms(),
                &mut LastCreated::default(),
            )?)
        })
        .await
    }

    async fn add(&self, job: &BlobInfo, opts: &PushOptions) -> Result<Instance> {
        let (job, opts) = (*job, opts.clone());
        self.write(move |tx| {
            let now = now_ms();
            insert_job(tx, &NewJob::stored(job), now)?;
            Ok(insert_instance(
                tx,
                &job.hash,
                &opts,
                now,
                &mut LastCreated::default(),
            )?)
        })
        .await
    }

    async fn create_many(&self, jobs: &[NewJob]) -> Result<Vec<bool>> {
        let jobs = jobs.to_vec();
        self.write(move |tx| {
            let now = now_ms();
            Ok(jobs
                .iter()
                .map(|j| insert_job(tx, j, now))
                .collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn add_many(&self, jobs: &[NewJob], opts: &PushOptions) -> Result<Vec<Instance>> {
        let (jobs, opts) = (jobs.to_vec(), opts.clone());
        self.write(move |tx| {
            let now = now_ms();
            let mut out = Vec::with_capacity(jobs.len());
            let mut last = LastCreated::default();
            for j in &jobs {
                insert_job(tx, j, now)?;
                out.push(insert_instance(tx, &j.info.hash, &opts, now, &mut last)?);
            }
            Ok(out)
        })
        .await
    }

    async fn inline_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let key = hash.to_hex();
        self.with_conn(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT payload FROM jobs WHERE key = ?1 AND payload IS NOT NULL
                     UNION ALL SELECT data FROM inline_blobs WHERE key = ?1 LIMIT 1",
                )?
                .query_row([key], |r| r.get::<_, Vec<u8>>(0))
                .optional()?)
        })
        .await
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>> {
        let req = req.clone();
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        self.write_with(Sync::Lazy, move |tx| claim_tx(tx, &req))
            .await
    }

    async fn heartbeat(&self, claim: &ClaimToken, lease: Duration) -> Result<Heartbeat> {
        let t = *claim;
        // Lazy: a renewal lost to a power failure only shortens the lease.
        self.write_with(Sync::Lazy, move |tx| {
            let until = now_ms() + lease.as_millis() as i64;
            let row: Option<bool> = tx
                .prepare_cached(
                    "UPDATE instances SET lease_until = ?3
                     WHERE id = ?1 AND state = 'running' AND attempts = ?2
                     RETURNING cancel_requested",
                )?
                .query_row(params![t.id, t.token, until], |r| r.get(0))
                .optional()?;
            match row {
                Some(cancel_requested) => Ok((Heartbeat { cancel_requested }, false)),
                None => Err(Error::Fenced {
                    instance: t.id,
                    token: t.token,
                }
                .into()),
            }
        })
        .await
    }

    async fn status(&self, claim: &ClaimToken) -> Result<Heartbeat> {
        let t = *claim;
        self.with_conn(move |conn| {
            let row: Option<bool> = conn
                .prepare_cached(
                    "SELECT cancel_requested FROM instances
                     WHERE id = ?1 AND state = 'running' AND attempts = ?2",
                )?
                .query_row(params![t.id, t.token], |r| r.get(0))
                .optional()?;
            row.map(|cancel_requested| Heartbeat { cancel_requested })
                .ok_or_else(|| {
                    Error::Fenced {
                        instance: t.id,
                        token: t.token,
                    }
                    .into()
                })
        })
        .await
    }

    async fn finish(&self, claim: &ClaimToken, outcome: &Outcome) -> Result<Finished> {
        let (t, outcome) = (*claim, outcome.clone());
        self.write(move |tx| {
            let row = inst_row(tx, t.id)?;
            let Some(row) = row.filter(|r| r.state == State::Running && r.attempts == t.token)
            else {
                return Err(Error::Fenced {
                    instance: t.id,
                    token: t.token,
                }
                .into());
            };
            let tr = policy::finish(&t, &outcome, row.cancel_requested);
            Ok(finish_tx(tx, &t, (&row.job, row.created), &tr, now_ms())?)
        })
        .await
    }

    async fn cancel(&self, sel: &Selector) -> Result<Vec<Instance>> {
        let sel = sel.clone();
        self.write(move |tx| {
            let now = now_ms();
            let mut out = Vec::new();
            for id in select_ids(tx, &sel)? {
                let Some(row) = inst_row(tx, id)? else {
                    continue;
                };
                let inst = Instance {
                    id,
                    job: row.job,
                    created: row.created,
                };
                match row.state {
                    State::Pending => {
                        tx.prepare_cached(
                            "UPDATE instances SET state = 'cancelled', ended = ?2 WHERE id = ?1",
                        )?
                        .execute(params![id, now])?;
                        event(
                            tx,
                            now,
                            EventKind::Cancel,
                            &row.job,
                            Some((id, row.created)),
                            serde_json::Value::Null,
                        )?;
                        out.push(inst);
                    }
                    State::Running => {
                        tx.prepare_cached(
                            "UPDATE instances SET cancel_requested = 1 WHERE id = ?1",
                        )?
                        .execute([id])?;
                        out.push(inst);
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
        .await
    }

    async fn retry(&self, sel: &Selector) -> Result<Vec<Instance>> {
        let sel = sel.clone();
        self.write(move |tx| {
            let now = now_ms();
            let mut out = Vec::new();
            let mut last = LastCreated::default();
            for id in select_ids(tx, &sel)? {
                let opts: Option<(String, PushOptions)> = tx
                    .prepare_cached(
                        "SELECT job, priority, timeout_ms, retries, cached FROM instances
                         WHERE id = ?1 AND state IN ('fail', 'cancelled') AND retried_by IS NULL",
                    )?
                    .query_row([id], |r| {
                        Ok((
                            r.get(0)?,
                            PushOptions {
                                priority: r.get(1)?,
                                run_at: None,
                                timeout: r
                                    .get::<_, Option<i64>>(2)?
                                    .map(|t| Duration::from_millis(t as u64)),
                                retries: r.get(3)?,
                                cached: r.get(4)?,
                            },
                        ))
                    })
                    .optional()?;
                let Some((job, opts)) = opts else { continue };
                let job = parse_hash(job)?;
                let inst = insert_instance(tx, &job, &opts, now, &mut last)?;
                tx.prepare_cached("UPDATE instances SET retried_by = ?2 WHERE id = ?1")?
                    .execute(params![id, inst.id])?;
                event(
                    tx,
                    now,
                    EventKind::Retry,
                    &job,
                    Some((inst.id, inst.created)),
                    serde_json::json!({"from": id}),
                )?;
                out.push(inst);
            }
            Ok(out)
        })
        .await
    }

    async fn list_page(&self, kind: ListKind, after: i64, limit: usize) -> Result<Vec<ListRow>> {
        self.with_conn(move |conn| Ok(list_page(conn, kind, after, limit as i64)?))
            .await
    }

    async fn instance(&self, id: i64) -> Result<InstanceDetail> {
        self.with_conn(move |conn| {
            instance_detail(conn, id)?
                .ok_or_else(|| Error::InstanceNotFound(format!("id:{id}")).into())
        })
        .await
    }

    async fn select(&self, sel: &Selector) -> Result<Vec<i64>> {
        let sel = sel.clone();
        self.with_conn(move |conn| Ok(select_ids(conn, &sel)?))
            .await
    }

    async fn job_exists(&self, job: &Hash) -> Result<bool> {
        let job = *job;
        self.with_conn(move |conn| Ok(job_exists(conn, &job)?))
            .await
    }

    async fn counts(&self) -> Result<Counts> {
        self.with_conn(|conn| {
            let mut c = Counts::default();
            let mut stmt =
                conn.prepare_cached("SELECT state, COUNT(*) FROM instances GROUP BY state")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, State>(0)?, r.get::<_, u64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                *c.slot(state) = n;
            }
            Ok(c)
        })
        .await
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        self.with_conn(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, time, kind, job, created, instance, data FROM events
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![after, limit as i64], |r| {
                let kind: String = r.get(2)?;
                let data: Option<String> = r.get(6)?;
                Ok(Event {
                    id: r.get(0)?,
                    time: r.get(1)?,
                    event: kind.parse().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            2,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                    job: r.get(3)?,
                    created: r.get(4)?,
                    instance: r.get(5)?,
                    data: data
                        .and_then(|d| serde_json::from_str(&d).ok())
                        .unwrap_or(serde_json::Value::Null),
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    async fn last_event_id(&self) -> Result<i64> {
        self.with_conn(|conn| {
            Ok(conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?)
        })
        .await
    }

    async fn check(&self) -> Result<Vec<String>> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let out: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
            let mut problems: Vec<String> = out.into_iter().filter(|l| l != "ok").collect();
            let mut stmt =
                conn.prepare("SELECT key, payload FROM jobs WHERE payload IS NOT NULL")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            for row in rows {
                let (key, payload) = row?;
                let actual = Hash::of(&payload);
                if actual.to_hex() != key {
                    problems.push(format!("job {key}: its inline payload hashes to {actual}"));
                }
            }
            let mut stmt = conn.prepare("SELECT key, data FROM inline_blobs")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let key: String = r.get(0)?;
                let actual = Hash::of(&r.get::<_, Vec<u8>>(1)?);
                if actual.to_hex() != key {
                    problems.push(format!("inline blob {key} hashes to {actual}"));
                }
            }
            Ok(problems)
        })
        .await
    }

    async fn is_referenced(&self, hash: &Hash) -> Result<bool> {
        let h = hash.to_hex();
        self.with_conn(move |conn| {
            Ok(conn
                .prepare_cached(
                    "SELECT EXISTS(SELECT 1 FROM jobs WHERE key = ?1 AND payload IS NULL)
                        OR (NOT EXISTS(SELECT 1 FROM inline_blobs WHERE key = ?1)
                            AND (EXISTS(SELECT 1 FROM attempts WHERE stdout = ?1)
                                 OR EXISTS(SELECT 1 FROM attempts WHERE stderr = ?1)))",
                )?
                .query_row([h], |r| r.get(0))?)
        })
        .await
    }

    async fn references_page(
        &self,
        after: i64,
        span: i64,
    ) -> Result<(Vec<BlobReference>, Option<i64>)> {
        self.with_conn(move |conn| {
            let end = after.saturating_add(span.max(1));
            let mut out = Vec::new();
            let mut stmt = conn.prepare_cached("SELECT key FROM jobs WHERE id > ?1 AND id <= ?2 AND payload IS NULL ORDER BY id")?;
            for key in stmt.query_map(params![after, end], |r| r.get::<_, String>(0))? {
                let key = key?;
                out.push(BlobReference {
                    hash: parse_hash(key.clone())?,
                    owner: format!("job {key}"),
                });
            }
            let mut stmt = conn.prepare_cached(
                // Outputs kept inline name no blob in the store.
                "SELECT instance, attempt,
                   CASE WHEN EXISTS(SELECT 1 FROM inline_blobs b WHERE b.key = a.stdout) THEN NULL ELSE a.stdout END,
                   CASE WHEN EXISTS(SELECT 1 FROM inline_blobs b WHERE b.key = a.stderr) THEN NULL ELSE a.stderr END
                 FROM attempts a
                 WHERE instance > ?1 AND instance <= ?2 ORDER BY instance, attempt",
            )?;
            let rows = stmt.query_map(params![after, end], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, Option<String>>(2)?, r.get::<_, Option<String>>(3)?))
            })?;
            for row in rows {
                let (id, n, stdout, stderr) = row?;
                for (h, which) in [(stdout, "stdout"), (stderr, "stderr")] {
                    if let Some(h) = h {
                        out.push(BlobReference {
                            hash: parse_hash(h)?,
                            owner: format!("instance {id} attempt {n} {which}"),
                        });
                    }
                }
            }
            let more: bool = conn.query_row(
                "SELECT EXISTS(SELECT 1 FROM jobs WHERE id > ?1) OR EXISTS(SELECT 1 FROM instances WHERE id > ?1)",
                [end],
                |r| r.get(0),
            )?;
            Ok((out, more.then_some(end)))
        })
        .await
    }

    fn change_seq(&self) -> u64 {
        *self.inner.changes.borrow()
    }

    async fn wait_change(&self, seen: u64, timeout: Duration) {
        self.start_poller();
        let mut rx = self.inner.changes.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != seen)).await;
    }

    fn location(&self) -> String {
        self.inner.path.display().to_string()
    }
}
