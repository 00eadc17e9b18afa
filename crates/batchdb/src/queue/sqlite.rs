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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
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

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: i64 = 4;
const SCHEMA: &str = include_str!("schema.sql");

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

/// Hands a write's result to its caller once the commit's outcome is known.
type Deliver = Box<dyn FnOnce(std::result::Result<(), &rusqlite::Error>) + Send>;

/// One write waiting for a group commit: run inside the shared transaction, it says
/// whether it needs an fsync and how to deliver its result.
struct Queued {
    sync: Sync,
    /// Runs the write in the shared transaction (`None`: there is none, the batch
    /// failed to begin; the write only gets ready to report that).
    /// With `alone`, it is the batch's only write and runs without a savepoint.
    run: RunWrite,
}

/// See [`Queued::run`].
type RunWrite = Box<dyn FnOnce(Option<&Transaction<'_>>, bool) -> Ran + Send>;

/// What running a queued write left to do.
struct Ran {
    /// It succeeded (a failed write alone in its batch rolls the batch back).
    ok: bool,
    /// A savepoint statement around it failed: the batch cannot commit.
    broken: bool,
    /// It needs an fsync at commit even if lazy.
    must_sync: bool,
    deliver: Deliver,
}

/// At most this many writes share one commit (bounds the others' wait).
const GROUP_MAX: usize = 64;

/// The same SQLite error again (one failed commit fails every write it held).
fn copy_sql_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

impl Inner {
    /// Commits whatever writes are queued (none if another thread already did) in one
    /// transaction and delivers their results (before the connection is released, so
    /// a caller that gets the connection next finds its write answered).
    fn commit_queued(&self) -> Result<()> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| Error::Task("sqlite connection lock poisoned".into()))?;
        let batch: Vec<Queued> = {
            let mut q = self
                .queued
                .lock()
                .map_err(|_| Error::Task("sqlite write queue lock poisoned".into()))?;
            let n = q.len().min(GROUP_MAX);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let lazy = batch.iter().all(|w| w.sync == Sync::Lazy);
        let before = conn.total_changes();
        let mut delivers = Vec::with_capacity(batch.len());
        let mut must_sync = false;
        let mut unrun = Some(batch);
        let committed = (|| -> rusqlite::Result<()> {
            // Set for every batch (a cached statement: no parse), so a failed reset
            // after a lazy batch can never leave a durable one at NORMAL.
            conn.prepare_cached(if lazy {
                "PRAGMA synchronous=NORMAL"
            } else {
                "PRAGMA synchronous=FULL"
            })?
            .execute([])?;
            let result = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut writes = unrun.take().unwrap_or_default().into_iter();
                let alone = writes.len() == 1;
                let mut all_ok = true;
                while let Some(w) = writes.next() {
                    let ran = (w.run)(Some(&tx), alone);
                    must_sync |= ran.must_sync;
                    all_ok &= ran.ok;
                    delivers.push(ran.deliver);
                    if ran.broken || tx.is_autocommit() {
                        // A savepoint statement failed, or SQLite rolled the whole
                        // transaction back itself (I/O error, full disk): nothing of
                        // this batch may commit; the writes not yet run fail unrun.
                        unrun = Some(writes.collect());
                        return Err(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                            Some("a write of this group commit failed mid-transaction; all rolled back".into()),
                        ));
                    }
                }
                if alone && !all_ok {
                    // Dropping the transaction rolls it back.
                    return Ok(());
                }
                tx.commit()
            })();
            if lazy {
                conn.prepare_cached("PRAGMA synchronous=FULL")?
                    .execute([])?;
            }
            result
        })();
        let outcome = match committed {
            Ok(()) if lazy && must_sync => {
                // What FULL would have done at commit: fsync the WAL.
                let wal = wal_path(&self.path);
                std::fs::File::open(&wal)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| {
                        rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                            Some(format!("fsync {}: {e}", wal.display())),
                        )
                    })
            }
            other => other,
        };
        // Writes that never ran (the batch could not begin, or broke): each reports
        // the error.
        for w in unrun.into_iter().flatten() {
            delivers.push((w.run)(None, true).deliver);
        }
        // Only a commit that wrote something is news (an empty claim is not).
        if outcome.is_ok() && conn.total_changes() != before {
            self.changes.send_modify(|v| *v += 1);
        }
        match &outcome {
            Ok(()) => delivers.into_iter().for_each(|d| d(Ok(()))),
            Err(e) => delivers.into_iter().for_each(|d| d(Err(e))),
        }
        drop(conn);
        Ok(())
    }
}

/// How a write transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sync {
    /// Fsynced before the call returns.
    Full,
    /// Safe against a process crash, not against a power failure (unless the
    /// transaction asks for it).
    Lazy,
}

/// The WAL file of a database file.
fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
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
    if version < 1 {
        tx.execute_batch(SCHEMA)?;
    }
    if version < 2 {
        // Version 2: small payloads kept inline in the job row.
        tx.execute_batch("ALTER TABLE jobs ADD COLUMN payload BLOB")?;
    }
    if version < 3 {
        // Version 3: small outputs kept inline, by hash.
        tx.execute_batch(
            "CREATE TABLE inline_blobs(key TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID",
        )?;
    }
    if version < 4 {
        // Version 4: each attempt's random id, which its processes carry.
        tx.execute_batch("ALTER TABLE attempts ADD COLUMN attempt_id TEXT")?;
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
            let sql = |e| Error::Sqlite {
                path: p.clone(),
                source: e,
            };
            let mut conn = open_conn(&p).map_err(sql)?;
            migrate(&mut conn, &p.display().to_string()).map_err(|e| match e {
                TxError::Sql(e) => sql(e),
                TxError::Domain(e) => e,
            })?;
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
            f(&mut conn).map_err(|e| match e {
                TxError::Sql(source) => Error::Sqlite {
                    path: inner.path.clone(),
                    source,
                },
                TxError::Domain(e) => e,
            })
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }

    /// Runs `f` in an immediate (write) transaction, commits durably
    /// (`synchronous=FULL`: the WAL is fsynced), and wakes local waiters.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> TxResult<T> + Send + 'static,
    ) -> Result<T> {
        self.write_with(Sync::Full, move |tx| Ok((f(tx)?, false)))
            .await
    }

    /// Like [`write`](Self::write), but with `Sync::Lazy` the commit is not fsynced
    /// unless `f` says so: a process crash still loses nothing (the WAL is in the page
    /// cache), but a power failure may roll the transaction back. Claims and
    /// heartbeats use it: losing one only means the instance runs again.
    ///
    /// Group commit: writes that arrive while another is committing wait, then commit
    /// together in one transaction (each in a savepoint of its own, so one that fails
    /// undoes only itself) with one fsync. No call returns before the commit that
    /// holds its write, with its durability, is done.
    async fn write_with<T: Send + 'static>(
        &self,
        sync: Sync,
        f: impl FnOnce(&Transaction<'_>) -> TxResult<(T, bool)> + Send + 'static,
    ) -> Result<T> {
        let (send, recv) = tokio::sync::oneshot::channel::<TxResult<T>>();
        let run = Box::new(move |tx: Option<&Transaction<'_>>, alone: bool| {
            let ran = tx.map(|tx| {
                (|| -> rusqlite::Result<TxResult<(T, bool)>> {
                    if alone {
                        // The batch's only write: a failure rolls the whole
                        // transaction back, no savepoint needed.
                        return Ok(f(tx));
                    }
                    tx.prepare_cached("SAVEPOINT batchdb_write")?.execute([])?;
                    let r = f(tx);
                    if r.is_err() {
                        tx.prepare_cached("ROLLBACK TO batchdb_write")?
                            .execute([])?;
                    }
                    tx.prepare_cached("RELEASE batchdb_write")?.execute([])?;
                    Ok(r)
                })()
            });
            let ok = matches!(ran, Some(Ok(Ok(_))));
            let broken = matches!(ran, Some(Err(_)));
            let must_sync = matches!(ran, Some(Ok(Ok((_, true)))));
            let deliver: Deliver = Box::new(move |commit| {
                let out = match (ran, commit) {
                    (Some(Ok(Err(e))), _) => Err(e),
                    (Some(Err(e)), _) => Err(TxError::Sql(e)),
                    (_, Err(e)) => Err(TxError::Sql(copy_sql_error(e))),
                    (Some(Ok(Ok((t, _)))), Ok(())) => Ok(t),
                    (None, Ok(())) => Err(TxError::Domain(Error::Task(
                        "sqlite write skipped by its group commit".into(),
                    ))),
                };
                let _ = send.send(out);
            });
            Ran {
                ok,
                broken,
                must_sync,
                deliver,
            }
        });
        self.inner
            .queued
            .lock()
            .map_err(|_| Error::Task("sqlite write queue lock poisoned".into()))?
            .push(Queued { sync, run });
        // Commit what is queued until this write is answered: usually the first round
        // (this write, alone or with others), or another thread's batch took it.
        let mut recv = recv;
        let out = loop {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || inner.commit_queued())
                .await
                .map_err(|e| Error::Task(e.to_string()))??;
            match recv.try_recv() {
                Ok(out) => break out,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => continue,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Err(Error::Task("sqlite write dropped before its commit".into()));
                }
            }
        };
        out.map_err(|e| match e {
            TxError::Sql(source) => Error::Sqlite {
                path: self.inner.path.clone(),
                source,
            },
            TxError::Domain(e) => e,
        })
    }

    fn start_poller(&self) {
        if self.inner.poller.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let path = self.inner.path.clone();
        tokio::spawn(async move {
            let conn = match open_conn(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("change watcher for {}: {e}", path.display());
                    return;
                }
            };
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let notify = match watch::DirWatch::new(dir) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::info!(
                        "no inotify on {} ({e}); polling every {POLL:?}",
                        dir.display()
                    );
                    None
                }
            };
            let every = if notify.is_some() {
                FALLBACK_POLL
            } else {
                POLL
            };
            let mut last: Option<i64> = None;
            loop {
                let woke = match &notify {
                    Some(w) => {
                        tokio::select! {
                            r = w.wait() => r.is_ok(),
                            _ = tokio::time::sleep(every) => false,
                        }
                    }
                    None => {
                        tokio::time::sleep(every).await;
                        false
                    }
                };
                let Some(inner) = weak.upgrade() else { return };
                if woke {
                    // A write to the WAL file is seen before the writer publishes the
                    // commit in shared memory: wake waiters now, and once more shortly
                    // after, so that a reader that looked too early looks again.
                    inner.changes.send_modify(|c| *c += 1);
                    drop(inner);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.changes.send_modify(|c| *c += 1);
                    continue;
                }
                match conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) {
                    Ok(v) => {
                        if last.is_some_and(|l| l != v) {
                            inner.changes.send_modify(|c| *c += 1);
                        }
                        last = Some(v);
                    }
                    Err(e) => tracing::warn!("change watcher for {}: {e}", path.display()),
                }
            }
        });
    }
}

/// Wake-ups from the kernel when any file in the database's directory is written
/// (the WAL file is, on every commit by any process), so that an idle waiter costs
/// no CPU and learns of a commit at once.
mod watch {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use tokio::io::unix::AsyncFd;

    pub use tokio::sync::watch::*;

    /// An inotify watch on one directory.
    pub struct DirWatch(AsyncFd<OwnedFd>);

    impl DirWatch {
        /// Watches `dir` for files being modified, created or renamed into it.
        pub fn new(dir: &Path) -> io::Result<DirWatch> {
            // SAFETY: plain syscalls; the returned descriptor is owned right away.
            let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
            let mask = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO;
            // SAFETY: `c` is a valid NUL-terminated path; `fd` is an inotify descriptor.
            if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is an open descriptor owned by the OwnedFd, which the AsyncFd
            // keeps (and never changes) for its whole life.
            let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
            Ok(DirWatch(afd))
        }

        /// Waits for at least one event, then drains all pending ones.
        pub async fn wait(&self) -> io::Result<()> {
            let mut buf = [0u8; 4096];
            loop {
                let mut guard = self.0.readable().await?;
                let mut got = false;
                loop {
                    // SAFETY: reading into a local buffer of the given length.
                    let n = unsafe {
                        libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    if n > 0 {
                        got = true;
                        continue;
                    }
                    let err = io::Error::last_os_error();
                    if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                        guard.clear_ready();
                        break;
                    }
                    if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err);
                }
                if got {
                    return Ok(());
                }
            }
        }
    }
}

fn event(
    tx: &Transaction<'_>,
    now: i64,
    kind: EventKind,
    job: &Hash,
    inst: Option<(i64, i64)>,
    data: serde_json::Value,
) -> rusqlite::Result<()> {
    let data = if data.is_null() {
        None
    } else {
        Some(data.to_string())
    };
    tx.prepare_cached(
        "INSERT INTO events(time, kind, job, created, instance, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now,
        kind.as_str(),
        job.to_hex(),
        inst.map(|i| i.1),
        inst.map(|i| i.0),
        data
    ])?;
    Ok(())
}

fn insert_job(tx: &Transaction<'_>, job: &NewJob, now: i64) -> rusqlite::Result<bool> {
    let n = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO jobs(key, size, created, payload) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            job.info.hash.to_hex(),
            job.info.size as i64,
            now,
            job.inline
        ])?;
    if n == 0 && job.inline.is_some() {
        // A job whose payload was in the store gets it inline when added again with
        // one (so a lost blob is repaired, as re-adding it to the store would).
        tx.prepare_cached("UPDATE jobs SET payload = ?2 WHERE key = ?1 AND payload IS NULL")?
            .execute(params![job.info.hash.to_hex(), job.inline])?;
    }
    if n == 1 {
        event(
            tx,
            now,
            EventKind::Create,
            &job.info.hash,
            None,
            serde_json::json!({"size": job.info.size}),
        )?;
    }
    Ok(n == 1)
}

/// The newest `created` in the transaction: read once, then kept by the pushes of the
/// same transaction (a bulk add does not look it up again for every row).
#[derive(Default)]
struct LastCreated(Option<Option<i64>>);

fn insert_instance(
    tx: &Transaction<'_>,
    job: &Hash,
    opts: &PushOptions,
    now: i64,
    last: &mut LastCreated,
) -> rusqlite::Result<Instance> {
    let key = job.to_hex();
    // `created` is unique across all instances: a push landing in a millisecond
    // already taken gets the next free one (the write lock makes this race-free
    // across processes).
    let newest = match last.0 {
        Some(v) => v,
        None => tx
            .prepare_cached("SELECT MAX(created) FROM instances")?
            .query_row([], |r| r.get(0))?,
    };
    let created = newest.map_or(now, |l| now.max(l + 1));
    last.0 = Some(Some(created));
    tx.prepare_cached(
        "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached)
         VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        key,
        created,
        opts.priority,
        opts.run_at.unwrap_or(now),
        opts.timeout.map(|t| t.as_millis() as i64),
        opts.retries,
        opts.cached
    ])?;
    let id = tx.last_insert_rowid();
    let data = match opts.run_at {
        Some(t) if t > now => serde_json::json!({"run_at": t}),
        _ => serde_json::Value::Null,
    };
    event(tx, now, EventKind::Push, job, Some((id, created)), data)?;
    Ok(Instance {
        id,
        job: *job,
        created,
    })
}

fn job_exists(tx: &Connection, job: &Hash) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM jobs WHERE key = ?1")?
        .query_row([job.to_hex()], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
}

/// Reads a hash column without allocating (and validates it, as every parse does).
impl rusqlite::types::FromSql for Hash {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        v.as_str()?
            .parse()
            .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
}

fn parse_hash(s: String) -> rusqlite::Result<Hash> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn opt_hash(s: Option<String>) -> rusqlite::Result<Option<Hash>> {
    s.map(parse_hash).transpose()
}

fn blob(hash: Option<String>, size: Option<i64>) -> rusqlite::Result<Option<BlobInfo>> {
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

fn candidate(r: &rusqlite::Row<'_>) -> rusqlite::Result<Candidate> {
    Ok(Candidate {
        id: r.get(0)?,
        job: r.get(1)?,
        created: r.get(2)?,
        failures: r.get(3)?,
        timeout: r
            .get::<_, Option<i64>>(4)?
            .map(|t| Duration::from_millis(t as u64)),
        retries: r.get(5)?,
        cached: r.get(6)?,
        attempts: r.get(7)?,
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

fn start_attempt(
    tx: &Transaction<'_>,
    c: &Candidate,
    req: &ClaimRequest,
    now: i64,
    cache_key: Option<Hash>,
) -> rusqlite::Result<(ClaimToken, String)> {
    let token = c.attempts + 1;
    let attempt_id = super::types::new_attempt_id();
    tx.prepare_cached(
        "UPDATE instances SET state = 'running', attempts = ?2, lease_until = ?3, cache_key = ?4
         WHERE id = ?1",
    )?
    .execute(params![
        c.id,
        token,
        now + req.lease.as_millis() as i64,
        cache_key.map(|k| k.to_hex())
    ])?;
    tx.prepare_cached(
        "INSERT INTO attempts(instance, attempt, worker, start, attempt_id)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![c.id, token, req.worker, now, attempt_id])?;
    event(
        tx,
        now,
        EventKind::Start,
        &c.job,
        Some((c.id, c.created)),
        serde_json::json!({"attempt": token, "worker": req.worker}),
    )?;
    Ok((ClaimToken { id: c.id, token }, attempt_id))
}

fn cache_lookup(tx: &Transaction<'_>, key: &Hash) -> rusqlite::Result<Option<AttemptReport>> {
    tx.prepare_cached(
        "SELECT a.exit_code, a.stdout, a.stdout_size, a.stderr, a.stderr_size
         FROM cache c JOIN attempts a ON a.instance = c.instance AND a.attempt = c.attempt
         WHERE c.key = ?1 AND a.outcome = 'result'",
    )?
    .query_row([key.to_hex()], |r| {
        Ok(AttemptReport {
            exit_code: r.get(0)?,
            stdout: blob(r.get(1)?, r.get(2)?)?,
            stderr: blob(r.get(3)?, r.get(4)?)?,
            cached: true,
            ..AttemptReport::default()
        })
    })
    .optional()
}

fn record_attempt(
    tx: &Transaction<'_>,
    t: &ClaimToken,
    outcome: &str,
    r: &AttemptReport,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE attempts SET end = ?3, outcome = ?4, exit_code = ?5, signal = ?6, stdout = ?7,
           stdout_size = ?8, stderr = ?9, stderr_size = ?10, message = ?11, cached = ?12
         WHERE instance = ?1 AND attempt = ?2",
    )?
    .execute(params![
        t.id,
        t.token,
        r.end,
        outcome,
        r.exit_code,
        r.signal,
        r.stdout.map(|b| b.hash.to_hex()),
        r.stdout.map(|b| b.size as i64),
        r.stderr.map(|b| b.hash.to_hex()),
        r.stderr.map(|b| b.size as i64),
        r.message,
        r.cached
    ])?;
    for data in &r.inline {
        tx.prepare_cached("INSERT OR IGNORE INTO inline_blobs(key, data) VALUES (?1, ?2)")?
            .execute(params![Hash::of(data).to_hex(), data])?;
    }
    Ok(())
}

/// Carries out transition `tr` of attempt `t` (see [`policy::finish`]); the caller
/// has checked the fencing token.
fn finish_tx(
    tx: &Transaction<'_>,
    t: &ClaimToken,
    (job, created): (&Hash, i64),
    tr: &Transition<'_>,
    now: i64,
) -> rusqlite::Result<Finished> {
    record_attempt(tx, t, tr.attempt.as_str(), tr.report)?;
    tx.prepare_cached(
        "UPDATE instances SET state = ?2, ended = COALESCE(?3, ended),
           run_at = COALESCE(?4, run_at), failures = failures + ?5, lease_until = NULL,
           cache_key = CASE WHEN ?6 THEN NULL ELSE cache_key END
         WHERE id = ?1",
    )?
    .execute(params![
        t.id,
        tr.state.as_str(),
        tr.ends.then_some(now),
        tr.run_at,
        i64::from(tr.counts_failure),
        tr.clears_cache_key,
    ])?;
    if let Some(k) = tr.fills_cache {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO cache(key, instance, attempt) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![k.to_hex(), t.id, t.token])?;
    }
    event(
        tx,
        now,
        tr.event,
        job,
        Some((t.id, created)),
        tr.data.clone(),
    )?;
    Ok(tr.finished)
}

fn select_ids(conn: &Connection, sel: &Selector) -> rusqlite::Result<Vec<i64>> {
    let (sql, arg): (&str, rusqlite::types::Value) = match sel {
        Selector::Id(id) => ("SELECT id FROM instances WHERE id = ?1", (*id).into()),
        Selector::Created(c) => (
            "SELECT id FROM instances WHERE created = ?1 ORDER BY id",
            (*c).into(),
        ),
        Selector::Hash(h) => (
            "SELECT id FROM instances WHERE job = ?1
             UNION SELECT instance FROM attempts WHERE stdout = ?1 AND outcome = 'result'
             ORDER BY 1",
            h.to_hex().into(),
        ),
        Selector::AllFailed => (
            "SELECT id FROM instances WHERE state = 'fail' AND retried_by IS NULL AND ?1 ORDER BY id",
            1i64.into(),
        ),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([arg], |r| r.get(0))?;
    rows.collect()
}

struct InstRow {
    job: Hash,
    created: i64,
    state: String,
    attempts: i64,
    cancel_requested: bool,
}

fn inst_row(conn: &Connection, id: i64) -> rusqlite::Result<Option<InstRow>> {
    conn.prepare_cached(
        "SELECT job, created, state, attempts, cancel_requested FROM instances WHERE id = ?1",
    )?
    .query_row([id], |r| {
        Ok(InstRow {
            job: r.get(0)?,
            created: r.get(1)?,
            state: r.get(2)?,
            attempts: r.get(3)?,
            cancel_requested: r.get(4)?,
        })
    })
    .optional()
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
        self.write_with(Sync::Lazy, move |tx| {
            let now = now_ms();
            let mut out = Vec::new();
            // Whether this claim ended an instance (which must be durable).
            let mut terminal = false;
            // 1. Take over attempts whose worker stopped renewing its lease.
            let expired: Vec<(Candidate, bool)> = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {CLAIM_COLS}, cancel_requested FROM instances
                     WHERE state = 'running' AND lease_until < ?1 ORDER BY lease_until LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![now, req.limit as i64], |r| {
                    Ok((candidate(r)?, r.get::<_, bool>(8)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for (c, cancel) in expired {
                let old = ClaimToken {
                    id: c.id,
                    token: c.attempts,
                };
                let lost_before: i64 = tx
                    .prepare_cached("SELECT COUNT(*) FROM attempts WHERE instance = ?1 AND outcome = 'lost'")?
                    .query_row([c.id], |r| r.get(0))?;
                let lost = match policy::expired(now, cancel, lost_before) {
                    policy::Expired::TakeOver(lost) => lost,
                    policy::Expired::Cancel(end) | policy::Expired::GiveUp(end) => {
                        let tr = policy::finish(&old, &end, cancel);
                        finish_tx(tx, &old, (&c.job, c.created), &tr, now)?;
                        terminal = true;
                        continue;
                    }
                };
                let lost_attempt = tx
                    .prepare_cached("SELECT worker, attempt_id FROM attempts WHERE instance = ?1 AND attempt = ?2")?
                    .query_row(params![old.id, old.token], |r| {
                        Ok(LostAttempt::new(old.id, old.token, r.get(0)?, r.get(1)?))
                    })?;
                record_attempt(tx, &old, AttemptEnd::Lost.as_str(), &lost)?;
                let token = start_attempt(tx, &c, &req, now, None)?;
                let mut claim = c.claim(token, now, true, None);
                claim.lost = Some(lost_attempt);
                out.push(claim);
            }
            // 2. Due pending instances, by priority then order.
            let remaining = req.limit.saturating_sub(out.len());
            if remaining == 0 {
                return Ok((out, terminal));
            }
            // INDEXED BY: without statistics SQLite would rather filter on the state
            // index and sort every pending row; the partial index reads only the
            // first rows in order, whatever the queue's length.
            let (index, order) = match req.order {
                Order::Newest => ("instances_pending_newest", "priority DESC, created DESC, id DESC"),
                Order::Oldest => ("instances_pending_oldest", "priority DESC, created ASC, id ASC"),
            };
            // Candidates come a window at a time; identical cached runs in flight are
            // skipped (they stay pending, so the next window starts past them).
            let window = remaining * 4 + 16;
            let mut claimed = 0;
            let mut skipped = 0usize;
            let mut in_batch: Vec<Hash> = Vec::new();
            loop {
                let candidates: Vec<Candidate> = {
                    let mut stmt = tx.prepare_cached(&format!(
                        "SELECT {CLAIM_COLS} FROM instances INDEXED BY {index}
                         WHERE state = 'pending' AND run_at <= ?1 ORDER BY {order} LIMIT ?2 OFFSET ?3"
                    ))?;
                    let rows = stmt.query_map(params![now, window as i64, skipped as i64], candidate)?;
                    rows.collect::<rusqlite::Result<_>>()?
                };
                let last_window = candidates.len() < window;
                for c in candidates {
                    if claimed == remaining {
                        break;
                    }
                    let key = policy::claim_cache_key(&req, &c.job, c.cached, c.timeout);
                    if let Some(k) = key {
                        if let Some(mut hit) = cache_lookup(tx, &k)? {
                            let token = start_attempt(tx, &c, &req, now, None)?;
                            hit.start = now;
                            hit.end = now;
                            let served = Outcome::Success(hit.clone());
                            let tr = policy::finish(&token.0, &served, false);
                            finish_tx(tx, &token.0, (&c.job, c.created), &tr, now)?;
                            out.push(c.claim(token, now, false, Some(hit)));
                            continue;
                        }
                        let in_flight = in_batch.contains(&k)
                            || tx
                                .prepare_cached(
                                    "SELECT 1 FROM instances WHERE state = 'running' AND cache_key = ?1",
                                )?
                                .query_row([k.to_hex()], |_| Ok(()))
                                .optional()?
                                .is_some();
                        if in_flight {
                            // An identical run is in flight: wait for its result.
                            skipped += 1;
                            continue;
                        }
                        in_batch.push(k);
                    }
                    let token = start_attempt(tx, &c, &req, now, key)?;
                    claimed += 1;
                    out.push(c.claim(token, now, false, None));
                }
                if claimed == remaining || last_window {
                    break;
                }
            }
            // A result served from the cache must be as durable as any other.
            let served = out.iter().any(|c| c.cache_hit.is_some());
            Ok((out, served || terminal))
        })
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
            let Some(row) = row.filter(|r| r.state == "running" && r.attempts == t.token) else {
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
                match row.state.as_str() {
                    "pending" => {
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
                    "running" => {
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
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (state, n) = row?;
                let n = n as u64;
                match state.as_str() {
                    "pending" => c.pending = n,
                    "running" => c.running = n,
                    "result" => c.result = n,
                    "fail" => c.fail = n,
                    "cancelled" => c.cancelled = n,
                    _ => {}
                }
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

/// Runs `stmt` and maps every row into a presized Vec with a plain loop (a million rows
/// are a million moves of the large [`ListRow`] fewer than through `query_map`'s adapters).
fn rows_into<T>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    limit: i64,
    mut f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut out = Vec::with_capacity(limit.clamp(0, 1 << 16) as usize);
    let mut rows = stmt.query(params)?;
    while let Some(r) = rows.next()? {
        out.push(f(r)?);
    }
    Ok(out)
}

fn list_page(
    conn: &Connection,
    kind: ListKind,
    after: i64,
    limit: i64,
) -> rusqlite::Result<Vec<ListRow>> {
    match kind {
        ListKind::Job => {
            let mut stmt = conn.prepare_cached(
                "SELECT j.id, j.key, j.size, j.created,
                   (SELECT group_concat(i.created) FROM instances i
                    WHERE i.job = j.key AND i.state = 'running')
                 FROM jobs j WHERE j.id > ?1 ORDER BY j.id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit], limit, |r| {
                let running: Option<String> = r.get(4)?;
                let mut running: Vec<i64> = running
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.parse().ok())
                    .collect();
                running.sort_unstable();
                Ok(ListRow::Job(JobRow {
                    cursor: r.get(0)?,
                    key: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    created: r.get(3)?,
                    running,
                }))
            })
        }
        ListKind::Pending => {
            let mut stmt = conn.prepare_cached(
                // NOT INDEXED: walk the rowid from the cursor (one pass over the table in
                // all), instead of gathering and sorting both states' rows per page.
                "SELECT id, job, created, state, priority, run_at, attempts FROM instances NOT INDEXED
                 WHERE id > ?1 AND state IN ('pending', 'running') ORDER BY id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit], limit, |r| {
                Ok(ListRow::Pending(PendingRow {
                    id: r.get(0)?,
                    job: r.get(1)?,
                    created: r.get(2)?,
                    running: r.get_ref(3)?.as_str()? == "running",
                    priority: r.get(4)?,
                    run_at: r.get(5)?,
                    attempts: r.get(6)?,
                }))
            })
        }
        ListKind::Result => {
            let mut stmt = conn.prepare_cached(
                "SELECT i.id, i.job, i.created, a.start, a.end, a.stdout, a.stdout_size, a.stderr,
                   a.exit_code, i.attempts, a.cached
                 FROM instances i JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                 WHERE i.state = 'result' AND i.id > ?1 ORDER BY i.id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit], limit, |r| {
                let job = r.get(1)?;
                let created = r.get(2)?;
                Ok(ListRow::Result(ResultRow {
                    key: (job, created),
                    value: ResultValue {
                        id: r.get(0)?,
                        created,
                        start: r.get(3)?,
                        end: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        hash: parse_hash(r.get::<_, Option<String>>(5)?.unwrap_or_default())?,
                        size: r.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                        stderr: r.get(7)?,
                        exit_code: r.get(8)?,
                        attempts: r.get(9)?,
                        cached: r.get(10)?,
                    },
                }))
            })
        }
        ListKind::Fail | ListKind::Cancelled => {
            let state = if kind == ListKind::Fail {
                "fail"
            } else {
                "cancelled"
            };
            let mut stmt = conn.prepare_cached(
                "SELECT i.id, i.job, i.created, a.start, a.end, a.stdout, a.stderr, a.exit_code,
                   a.signal, a.message, i.attempts
                 FROM instances i LEFT JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                 WHERE i.state = ?3 AND i.id > ?1 ORDER BY i.id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit, state], limit, |r| {
                let job = r.get(1)?;
                let created = r.get(2)?;
                Ok(ListRow::Fail(FailRow {
                    key: (job, created),
                    value: FailValue {
                        id: r.get(0)?,
                        created,
                        start: r.get(3)?,
                        end: r.get(4)?,
                        stdout: r.get(5)?,
                        stderr: r.get(6)?,
                        exit_code: r.get(7)?,
                        signal: r.get(8)?,
                        message: r
                            .get::<_, Option<String>>(9)?
                            .unwrap_or_else(|| "cancelled before it ran".into()),
                        attempts: r.get(10)?,
                    },
                }))
            })
        }
    }
}

fn instance_detail(conn: &Connection, id: i64) -> rusqlite::Result<Option<InstanceDetail>> {
    let head = conn
        .prepare_cached(
            "SELECT job, created, state, priority, run_at, timeout_ms, retries, cached
             FROM instances WHERE id = ?1",
        )?
        .query_row([id], |r| {
            let state: String = r.get(2)?;
            Ok(InstanceDetail {
                id,
                job: r.get(0)?,
                created: r.get(1)?,
                state: state.parse().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
                priority: r.get(3)?,
                run_at: r.get(4)?,
                timeout_ms: r.get::<_, Option<i64>>(5)?.map(|t| t as u64),
                retries: r.get(6)?,
                cached: r.get(7)?,
                attempts: Vec::new(),
            })
        })
        .optional()?;
    let Some(mut detail) = head else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT attempt, worker, outcome, start, end, exit_code, signal, stdout, stdout_size,
           stderr, stderr_size, message, cached
         FROM attempts WHERE instance = ?1 ORDER BY attempt",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok(AttemptRow {
            attempt: r.get(0)?,
            worker: r.get(1)?,
            outcome: r.get(2)?,
            report: AttemptReport {
                start: r.get(3)?,
                end: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                exit_code: r.get(5)?,
                signal: r.get(6)?,
                stdout: blob(r.get(7)?, r.get(8)?)?,
                stderr: blob(r.get(9)?, r.get(10)?)?,
                message: r.get(11)?,
                cached: r.get(12)?,
                cache_key: None,
                inline: Vec::new(),
            },
        })
    })?;
    detail.attempts = rows.collect::<rusqlite::Result<_>>()?;
    Ok(Some(detail))
}
