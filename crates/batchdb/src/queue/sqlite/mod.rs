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
use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};

use super::Queue;
use super::list::*;
use super::types::*;
use crate::error::{Error, Result};
use crate::hash::Hash;

use super::changes::Changes;
use super::migrations::{self, SCHEMA_VERSION};

mod exec;
mod files;
mod group_commit;
mod watch;

use super::batch::{BatchCounts, DependencyResult, Selected};
use super::context::Resources;
use super::prune::{PruneCounts, PruneRequest, PruneStep};
use super::sql::{DbError, claim, deps, prune, read, recent, retry, workers, write};
use group_commit::*;

/// How often other processes' commits are looked for while someone waits, where the
/// kernel cannot tell us (no inotify).
pub const POLL: Duration = Duration::from_millis(20);

/// How often they are looked for anyway, as a backstop, when inotify works.
pub const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a statement waiting for another process's lock looks again.
const BUSY_POLL: Duration = Duration::from_millis(1);

/// The busy handler: look again every [`BUSY_POLL`] for up to [`BUSY_TIMEOUT`].
/// SQLite's own (`busy_timeout`) backs off to 100 ms sleeps, so a process that takes
/// the lock again and again for short transactions (a `prune`, a busy worker) could
/// keep a waiting claim asleep for 100 ms at a time though the lock was free for
/// most of it.
fn busy(retries: i32) -> bool {
    let limit = BUSY_TIMEOUT.as_millis() / BUSY_POLL.as_millis().max(1);
    if u128::try_from(retries).unwrap_or(0) >= limit {
        return false;
    }
    std::thread::sleep(BUSY_POLL);
    true
}

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
    changes: Changes,
    poller: AtomicBool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Errors inside a transaction: SQLite's own, a domain error, or a corrupt value.
pub(crate) type TxError = DbError<rusqlite::Error>;

impl From<rusqlite::Error> for TxError {
    fn from(e: rusqlite::Error) -> Self {
        TxError::Db(e)
    }
}

pub(crate) type TxResult<T> = std::result::Result<T, TxError>;

/// The library error for failure `e` on database `path`: a value SQLite could not turn
/// into what batchdb wrote is [`Error::Corrupt`], like on every backend.
fn on(e: TxError, path: &Path) -> Error {
    use rusqlite::Error as E;
    let location = || path.display().to_string();
    e.into_error(location, |e| match e {
        e @ (E::FromSqlConversionFailure(..)
        | E::InvalidColumnType(..)
        | E::IntegralValueOutOfRange(..)) => Error::Corrupt {
            location: location(),
            what: e.to_string(),
        },
        source => {
            let io = matches!(
                source.sqlite_error_code(),
                Some(
                    rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::SystemIoFailure
                        | rusqlite::ErrorCode::CannotOpen
                )
            );
            Error::Sqlite {
                path: path.to_path_buf(),
                hint: if io {
                    files::disk_full_hint(path)
                } else {
                    None
                },
                source,
            }
        }
    })
}

/// Whether `e` is SQLite's "database is busy/locked".
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

fn open_conn(path: &Path) -> rusqlite::Result<Connection> {
    files::repair_side_files(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_handler(Some(busy))?;
    // journal_mode needs a lock the first time; the busy handler covers it.
    conn.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))?;
    // A 16 MiB page cache (SQLite's default is 2 MiB): a bulk add of 10,000 jobs
    // otherwise spills pages to the WAL mid-transaction and reads them back.
    conn.execute_batch(
        "PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA cache_size=-16384;",
    )?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, location: &str) -> TxResult<()> {
    // The common case, read without the write lock: the schema is this build's.
    // (Every one-shot command opens the database; none of them need take the lock
    // for this.) A file at another version is checked again under the lock.
    let seen: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if seen == SCHEMA_VERSION {
        return Ok(());
    }
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
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io("create database directory", parent, e))?;
        }
        let p = path.clone();
        let conn = crate::io::blocking(move || -> Result<Connection> {
            // Openers racing on a new file: setting up WAL can answer SQLITE_BUSY at
            // once, without the busy handler (seen with 8 at once); open again.
            let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
            loop {
                let opened = open_conn(&p).map_err(TxError::Db).and_then(|mut conn| {
                    migrate(&mut conn, &p.display().to_string())?;
                    Ok(conn)
                });
                match opened {
                    Err(TxError::Db(e)) if is_busy(&e) && std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    other => return other.map_err(|e| on(e, &p)),
                }
            }
        })
        .await??;
        Ok(SqliteQueue {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(conn),
                queued: Mutex::new(Vec::new()),
                changes: Changes::new(),
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
        crate::io::blocking(move || {
            let mut conn = inner
                .conn
                .lock()
                .map_err(|_| Error::Task("sqlite connection lock poisoned".into()))?;
            f(&mut conn).map_err(|e| on(e, &inner.path))
        })
        .await?
    }
}

#[async_trait]
impl Queue for SqliteQueue {
    async fn push(&self, job: &Hash, opts: &PushOptions) -> Result<Instance> {
        let (job, opts) = (*job, opts.clone());
        self.write(move |tx| {
            exec::run(
                tx,
                |mut l| async move { write::push(&mut l, &job, &opts).await },
            )
        })
        .await
    }

    async fn create_many(&self, jobs: &[NewJob]) -> Result<Vec<bool>> {
        let jobs = jobs.to_vec();
        self.write(move |tx| {
            exec::run(tx, |mut l| async move {
                write::create_many(&mut l, &jobs).await
            })
        })
        .await
    }

    async fn add_many(&self, jobs: &[NewJob], opts: &PushOptions) -> Result<Vec<Instance>> {
        let (jobs, opts) = (jobs.to_vec(), opts.clone());
        self.write(move |tx| {
            exec::run(tx, |mut l| async move {
                write::add_many(&mut l, &jobs, &opts).await
            })
        })
        .await
    }

    async fn inline_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        let hash = *hash;
        self.with_conn(move |c| {
            exec::run(
                c,
                |mut l| async move { read::inline_blob(&mut l, &hash).await },
            )
        })
        .await
    }

    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>> {
        if req.limit == 0 {
            return Ok(Vec::new());
        }
        let req = req.clone();
        // Lazy unless the claim ended an instance or served one from the cache.
        self.write_with(Sync::Lazy, move |tx| {
            exec::run(tx, |mut l| async move { claim::claim(&mut l, &req).await })
        })
        .await
    }

    async fn heartbeat(&self, claim: &ClaimToken, lease: Duration) -> Result<Heartbeat> {
        let t = *claim;
        // Lazy: a renewal lost to a power failure only shortens the lease.
        self.write_with(Sync::Lazy, move |tx| {
            exec::run(tx, |mut l| async move {
                Ok((write::heartbeat(&mut l, &t, lease).await?, false))
            })
        })
        .await
    }

    async fn status(&self, claim: &ClaimToken) -> Result<Heartbeat> {
        let t = *claim;
        self.with_conn(move |c| exec::run(c, |mut l| async move { read::status(&mut l, &t).await }))
            .await
    }

    async fn finish(&self, claim: &ClaimToken, outcome: &Outcome) -> Result<Finished> {
        let (t, outcome) = (*claim, outcome.clone());
        self.write(move |tx| {
            exec::run(tx, |mut l| async move {
                write::finish(&mut l, &t, &outcome).await
            })
        })
        .await
    }

    async fn finish_and_claim(
        &self,
        claim: &ClaimToken,
        outcome: &Outcome,
        next: &ClaimRequest,
    ) -> Result<(Finished, Vec<Claim>)> {
        let (t, outcome, next) = (*claim, outcome.clone(), next.clone());
        self.write(move |tx| {
            exec::run(tx, |mut l| async move {
                claim::finish_and_claim(&mut l, &t, &outcome, &next).await
            })
        })
        .await
    }

    async fn cancel(&self, sel: &Selector) -> Result<Vec<Instance>> {
        let sel = sel.clone();
        self.write(move |tx| {
            exec::run(tx, |mut l| async move { write::cancel(&mut l, &sel).await })
        })
        .await
    }

    async fn retry(&self, sel: &Selector, with_dependents: bool) -> Result<Vec<Instance>> {
        let sel = sel.clone();
        self.write(move |tx| {
            exec::run(tx, |mut l| async move {
                retry::retry(&mut l, &sel, with_dependents).await
            })
        })
        .await
    }

    async fn list_page(
        &self,
        kind: ListKind,
        (after, limit): (i64, usize),
        batch: Option<&str>,
    ) -> Result<Vec<ListRow>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let batch = batch.map(String::from);
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                read::list_page(&mut l, kind, (after, limit), batch.as_deref()).await
            })
        })
        .await
    }

    async fn recent_page(&self, q: &RecentQuery) -> Result<Vec<InstanceSummary>> {
        let q = q.clone();
        self.with_conn(move |c| {
            exec::run(
                c,
                |mut l| async move { recent::recent_page(&mut l, &q).await },
            )
        })
        .await
    }

    async fn batches_page(
        &self,
        after: i64,
        limit: usize,
        name: Option<&str>,
    ) -> Result<Vec<BatchCounts>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let name = name.map(String::from);
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                read::batches_page(&mut l, (after, limit), name.as_deref()).await
            })
        })
        .await
    }

    async fn dependency_results(
        &self,
        id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DependencyResult>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                deps::results(&mut l, id, after, limit).await
            })
        })
        .await
    }

    async fn instance(&self, id: i64) -> Result<InstanceDetail> {
        self.with_conn(move |c| {
            exec::run(
                c,
                |mut l| async move { read::instance_detail(&mut l, id).await },
            )?
            .ok_or_else(|| Error::InstanceNotFound(format!("id:{id}")).into())
        })
        .await
    }

    async fn select_states(&self, sel: &Selector) -> Result<Vec<Selected>> {
        let sel = sel.clone();
        self.with_conn(move |c| {
            exec::run(
                c,
                |mut l| async move { read::select_states(&mut l, &sel).await },
            )
        })
        .await
    }

    async fn counts(&self) -> Result<Counts> {
        self.with_conn(|c| exec::run(c, |mut l| async move { read::counts(&mut l).await }))
            .await
    }

    async fn worker_seen(&self, name: &str, resources: &Resources, ttl: Duration) -> Result<()> {
        let (name, resources) = (name.to_string(), resources.clone());
        self.write(move |tx| {
            exec::run(tx, |mut l| async move {
                workers::seen(&mut l, &name, &resources, ttl).await
            })
        })
        .await
    }

    async fn worker_gone(&self, name: &str) -> Result<()> {
        let name = name.to_string();
        self.write(move |tx| {
            exec::run(
                tx,
                |mut l| async move { workers::gone(&mut l, &name).await },
            )
        })
        .await
    }

    async fn unrunnable(&self, worker: Option<&Resources>) -> Result<u64> {
        let (now, worker) = (now_ms(), worker.cloned());
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                workers::unrunnable(&mut l, now, worker.as_ref()).await
            })
        })
        .await
    }

    async fn prune_step(
        &self,
        req: &PruneRequest,
        step: PruneStep,
    ) -> Result<(PruneCounts, Option<PruneStep>)> {
        let req = *req;
        self.write(move |tx| {
            exec::run(
                tx,
                |mut l| async move { prune::step(&mut l, &req, step).await },
            )
        })
        .await
    }

    async fn prune_count(&self, req: &PruneRequest) -> Result<u64> {
        let req = *req;
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move { prune::count(&mut l, &req).await })
        })
        .await
    }

    async fn events(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                read::events(&mut l, after, limit).await
            })
        })
        .await
    }

    async fn last_event_id(&self) -> Result<i64> {
        self.with_conn(|c| exec::run(c, |mut l| async move { read::last_event_id(&mut l).await }))
            .await
    }

    async fn check(&self) -> Result<Check> {
        self.with_conn(|conn| {
            let mut stmt = conn.prepare("PRAGMA integrity_check")?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
            let out: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
            let problems: Vec<String> = out.into_iter().filter(|l| l != "ok").collect();
            let check = exec::run(conn, |mut l| async move {
                let mut check = Check {
                    problems,
                    ..Check::default()
                };
                read::check_inline(&mut l, &mut check).await?;
                Ok(check)
            })?;
            Ok(check)
        })
        .await
    }

    async fn is_referenced(&self, hash: &Hash) -> Result<bool> {
        let hash = *hash;
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                read::is_referenced(&mut l, &hash).await
            })
        })
        .await
    }

    async fn references_page(
        &self,
        after: i64,
        span: i64,
    ) -> Result<(Vec<BlobReference>, Option<i64>)> {
        self.with_conn(move |c| {
            exec::run(c, |mut l| async move {
                read::references_page(&mut l, after, span).await
            })
        })
        .await
    }

    fn change_seq(&self) -> u64 {
        self.inner.changes.seq()
    }

    async fn wait_change(&self, seen: u64, timeout: Duration) {
        self.start_poller();
        self.inner.changes.wait(seen, timeout).await;
    }

    fn location(&self) -> String {
        self.inner.path.display().to_string()
    }
}
