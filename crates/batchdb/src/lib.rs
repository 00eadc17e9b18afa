//! batchdb queues batch jobs and streams their results into a content-addressed blob
//! store.
//!
//! A **job** is a payload (usually a shell script) keyed by the sha256 of its bytes.
//! **Pushing** a job puts an *instance* of it on the pending queue; a **worker**
//! claims instances, streams each payload into a [`runner`] and streams the runner's
//! stdout (the **result**, named by its sha256) and stderr into the [`blob`] store,
//! recording a result or a failure row in the [`queue`]. Everything is listable and
//! observable as events, from any process.
//!
//! [`BatchDb`] is the facade; [`queue::Queue`] and [`blob::BlobStore`] are the backend
//! traits (SQLite and a directory are the embedded defaults).
//!
//! ```no_run
//! # async fn demo() -> batchdb::Result<()> {
//! use batchdb::{BatchDb, Config};
//! let db = BatchDb::open(&Config::in_dir("/tmp/compute")).await?;
//! let inst = db.add(&b"sleep 1; date"[..], &Default::default()).await?;
//! println!("pushed {} {}", inst.job, inst.created);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![warn(clippy::pedantic)]
// What pedantic asks that this crate does not do, and why:
#![allow(
    // Every fallible call returns the one typed `Error`, whose variants say what failed
    // and on what; an `# Errors` section on each would repeat it.
    clippy::missing_errors_doc,
    // It would sit on every getter and constructor; none of them has a side effect
    // whose result could be dropped by mistake.
    clippy::must_use_candidate,
    // The docs name products and units in prose (SQLite, PostgreSQL, GiB), not code.
    clippy::doc_markdown,
    // A backend's submodules share their parent's imports (`use super::*`) on purpose:
    // they are one module split by concern.
    clippy::wildcard_imports,
    // `tx`/`rx`, `stdout`/`stderr` and their kin side by side are the clearest names.
    clippy::similar_names
)]

mod batches;
pub mod blob;
mod bulk;
mod config;
mod error;
mod hash;
pub mod integrity;
mod io;
mod lines;
pub mod preview;
pub mod queue;
#[cfg(feature = "remote")]
pub mod remote;
mod retention;
pub mod runner;
pub mod template;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::io::AsyncRead;

pub use batches::{WaitFailure, WaitOutcome, WaitProgress};
pub use bulk::{BULK_CHUNK, Bulk, CHUNK_BYTES};
pub use config::{BlobLocation, Config, DEFAULT_DB_CONNECTIONS, DbLocation};
pub use error::{Error, Result};
pub use hash::{Hash, Hasher};
pub use retention::{PRUNE_PAUSE, prune_interval};

use blob::{BlobInfo, BlobReader, BlobStore, DirStore};
use queue::{
    Counts, Event, Instance, InstanceDetail, ListKind, ListRow, NewJob, PushOptions, Queue,
    Selector, SqliteQueue,
};
use runner::Runner;
use worker::{Worker, WorkerOptions};

/// Lets the blocking work of the SQLite queue and of opening a blob directory (each
/// SQLite call, each `mkdir`) run on the calling thread when that thread drives a
/// current-thread tokio runtime, instead of on tokio's blocking pool.
///
/// For a process that does one thing and exits — each one-shot `batchdb` command —
/// this saves starting a blocking thread and two thread hand-offs per call. Any other
/// task on that runtime waits while such work runs (a busy database may make it wait
/// for seconds), so leave it off (the default) where a current-thread runtime has
/// other work to do.
///
/// On a multi-thread runtime this setting does nothing: there such work runs on the
/// calling thread whenever the caller is not one of the runtime's tasks — the thread
/// in `block_on`, such as the body of `#[tokio::main]`, which is none of the
/// runtime's workers — and on the blocking pool from within a task. So a sequence of
/// calls awaited in `main` saves the hand-offs (a durable one-job `add` is about a
/// fifth faster), and while each runs, only the future that `block_on` drives waits:
/// spawn work that must not wait for the database (a timer, a signal handler) as a
/// task of its own, or `select!` it in a task.
pub fn set_inline_blocking(on: bool) {
    io::set_inline_blocking(on);
}

/// Rows fetched per round trip by the streaming listers.
const PAGE: usize = 4096;

/// Payloads up to this size are kept inline in the queue (in the job's row) instead of
/// the blob store: one durable commit instead of a blob file, its fsyncs and a row.
pub const INLINE_MAX: usize = 16 * 1024;

/// A batchdb database: a queue plus a blob store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BatchDb {
    queue: Arc<dyn Queue>,
    blobs: Arc<dyn BlobStore>,
    live_dir: Option<PathBuf>,
}

impl BatchDb {
    /// Opens the queue and blob store `config` names, creating them on first use.
    pub async fn open(config: &Config) -> Result<BatchDb> {
        let queue: Arc<dyn Queue> = match &config.db {
            DbLocation::Sqlite(p) => Arc::new(SqliteQueue::open(p).await?),
            #[cfg(feature = "postgres")]
            DbLocation::Postgres(url) => {
                let n = config.db_connections.unwrap_or(DEFAULT_DB_CONNECTIONS);
                Arc::new(queue::PgQueue::open_with(url, n).await?)
            }
            #[cfg(not(feature = "postgres"))]
            DbLocation::Postgres(url) => return Err(missing_feature("database", url, "postgres")),
        };
        let blobs: Arc<dyn BlobStore> = match &config.blobs {
            BlobLocation::Dir(p) => Arc::new(DirStore::open(p).await?),
            #[cfg(feature = "s3")]
            BlobLocation::S3 { bucket, prefix } => {
                Arc::new(blob::S3Store::open(bucket, prefix).await?)
            }
            #[cfg(not(feature = "s3"))]
            BlobLocation::S3 { bucket, prefix } => {
                return Err(missing_feature(
                    "blob store",
                    &format!("s3://{bucket}/{prefix}"),
                    "s3",
                ));
            }
        };
        if let Some(d) = &config.live_dir {
            let dir = d.clone();
            crate::io::blocking(move || std::fs::create_dir_all(dir))
                .await?
                .map_err(|e| Error::io("create live output directory", d, e))?;
        }
        Ok(BatchDb {
            queue,
            blobs,
            live_dir: config.live_dir.clone(),
        })
    }

    /// A database over any queue and blob store backends.
    pub fn new(queue: Arc<dyn Queue>, blobs: Arc<dyn BlobStore>) -> BatchDb {
        BatchDb {
            queue,
            blobs,
            live_dir: None,
        }
    }

    /// The queue backend.
    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.queue
    }

    /// The blob store backend.
    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    /// Where running jobs mirror their output for live readers, if anywhere.
    pub fn live_dir(&self) -> Option<&PathBuf> {
        self.live_dir.as_ref()
    }

    /// Stores a payload and records the job: a payload of up to [`INLINE_MAX`] bytes is
    /// kept inline in the job's row (one durable commit, no blob file); a larger one
    /// streams into the blob store and is durable before the row commits. Returns the
    /// job key and whether the job was new.
    pub async fn create(&self, payload: impl AsyncRead + Send + Unpin) -> Result<(Hash, bool)> {
        let job = self.stage(payload).await?;
        let new = self.queue.create_many(std::slice::from_ref(&job)).await?;
        Ok((job.info.hash, new.first().copied().unwrap_or(false)))
    }

    /// Pushes an instance of an existing job; [`Error::JobNotFound`] if there is none.
    pub async fn push(&self, job: &Hash, opts: &PushOptions) -> Result<Instance> {
        self.queue.push(job, opts).await
    }

    /// Stores a payload (as [`create`](Self::create) does) and pushes an instance of
    /// it; the job row and the instance row commit together.
    pub async fn add(
        &self,
        payload: impl AsyncRead + Send + Unpin,
        opts: &PushOptions,
    ) -> Result<Instance> {
        let job = self.stage(payload).await?;
        let mut added = self.queue.add_many(&[job], opts).await?;
        added
            .pop()
            .ok_or_else(|| Error::Task("add_many returned nothing".into()))
    }

    /// Adds many small payloads at once (a bulk add, see [`Bulk`]): each is kept
    /// inline or stored as [`create`](Self::create) says, and the rows commit in
    /// chunks of up to [`BULK_CHUNK`] jobs. Returns the instances in order.
    pub async fn add_many(
        &self,
        payloads: Vec<Vec<u8>>,
        opts: &PushOptions,
    ) -> Result<Vec<Instance>> {
        let mut out = Vec::with_capacity(payloads.len());
        let mut bulk = self.bulk(opts);
        for p in payloads {
            out.extend(bulk.push(&p[..]).await?);
        }
        out.extend(bulk.finish().await?);
        Ok(out)
    }

    /// Reads a payload: up to [`INLINE_MAX`] bytes stay in memory to be kept inline;
    /// a larger payload streams into the blob store (durable on return).
    async fn stage(&self, mut payload: impl AsyncRead + Send + Unpin) -> Result<NewJob> {
        use tokio::io::AsyncReadExt;
        let head = io::read_inline_head(&mut payload, "read payload").await?;
        if head.len() <= INLINE_MAX {
            return Ok(NewJob::inline(head));
        }
        let mut all = std::io::Cursor::new(head).chain(payload);
        Ok(NewJob::stored(self.blobs.put(&mut all).await?))
    }

    /// Records the job (if new) and pushes an instance of it, for a payload blob the
    /// caller has already stored durably in this database's blob store (`info` as
    /// [`BlobStore::put`] returned it). Nothing checks that the blob exists.
    pub async fn add_stored(&self, info: &BlobInfo, opts: &PushOptions) -> Result<Instance> {
        self.queue.add(info, opts).await
    }

    /// Streams every row of `kind`, in push order, a page at a time (memory stays flat
    /// however long the queue is); only batch `batch`'s, if given.
    pub fn list(
        &self,
        kind: ListKind,
        batch: Option<String>,
    ) -> impl Stream<Item = Result<ListRow>> + Send + 'static {
        let queue = self.queue.clone();
        paged(move |after| {
            let queue = queue.clone();
            let batch = batch.clone();
            async move {
                let rows = queue
                    .list_page(kind, (after, PAGE), batch.as_deref())
                    .await?;
                let next = rows.last().map(ListRow::cursor);
                Ok((rows, next))
            }
        })
    }

    /// Opens a blob (payload or output, inline in the queue or in the blob store) for
    /// streaming; bytes are checked against the hash as they pass.
    pub async fn get(&self, hash: &Hash) -> Result<BlobReader> {
        match self.inline(hash).await? {
            Some(bytes) => Ok(Box::pin(std::io::Cursor::new(bytes))),
            None => self.blobs.get(hash).await,
        }
    }

    /// Opens bytes `range` of a blob (clamped to its size), unverified (see
    /// [`BlobStore::get_range`]).
    pub async fn get_range(&self, hash: &Hash, range: std::ops::Range<u64>) -> Result<BlobReader> {
        match self.inline(hash).await? {
            Some(bytes) => {
                // An inline blob is at most INLINE_MAX bytes: clamped, both ends fit.
                let at = |n: u64| usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len());
                let (start, end) = (at(range.start), at(range.end));
                let part = bytes[start..end.max(start)].to_vec();
                Ok(Box::pin(std::io::Cursor::new(part)))
            }
            None => self.blobs.get_range(hash, range).await,
        }
    }

    /// The size of a blob (inline in the queue or in the blob store);
    /// [`Error::BlobNotFound`] if there is none.
    pub async fn blob_size(&self, hash: &Hash) -> Result<u64> {
        if let Some(bytes) = self.inline(hash).await? {
            return Ok(bytes.len() as u64);
        }
        self.blobs.size(hash).await
    }

    /// A blob kept inline in the queue, checked against its hash.
    async fn inline(&self, hash: &Hash) -> Result<Option<Vec<u8>>> {
        checked_inline(self.queue.as_ref(), hash).await
    }

    /// Streams the event log after event `after`; with `follow`, keeps waiting for new
    /// events (from any process) instead of ending.
    pub fn events(
        &self,
        after: i64,
        follow: bool,
    ) -> impl Stream<Item = Result<Event>> + Send + 'static {
        let queue = self.queue.clone();
        futures_util::stream::unfold(
            (after, Vec::<Event>::new().into_iter(), false),
            move |(mut after, mut buf, done)| {
                let queue = queue.clone();
                async move {
                    loop {
                        if let Some(ev) = buf.next() {
                            after = ev.id;
                            return Some((Ok(ev), (after, buf, false)));
                        }
                        if done {
                            return None;
                        }
                        let seen = queue.change_seq();
                        match queue.events(after, PAGE).await {
                            Ok(evs) if !evs.is_empty() => buf = evs.into_iter(),
                            Ok(_) if follow => {
                                queue.wait_change(seen, Duration::from_secs(1)).await;
                            }
                            Ok(_) => return None,
                            Err(e) => return Some((Err(e), (after, buf, true))),
                        }
                    }
                }
            },
        )
    }

    /// Follows events from now on, from this process and any other, like the seed's
    /// `compute.on(...)`.
    pub async fn subscribe(&self) -> Result<impl Stream<Item = Result<Event>> + Send + 'static> {
        let last = self.queue.last_event_id().await?;
        Ok(self.events(last, true))
    }

    /// Cancels what `sel` names (pending: at once; running: killed by its worker).
    pub async fn cancel(&self, sel: &Selector) -> Result<Vec<Instance>> {
        self.queue.cancel(sel).await
    }

    /// Pushes failed or cancelled instances again, each in its batch and with its
    /// dependencies; with `with_dependents`, also what their failure cancelled (see
    /// [`Queue::retry`]).
    pub async fn retry(&self, sel: &Selector, with_dependents: bool) -> Result<Vec<Instance>> {
        self.queue.retry(sel, with_dependents).await
    }

    /// Everything about one instance.
    pub async fn instance(&self, id: i64) -> Result<InstanceDetail> {
        self.queue.instance(id).await
    }

    /// The instance ids `sel` names, in push order; [`Error::InstanceNotFound`] if none.
    pub async fn select(&self, sel: &Selector) -> Result<Vec<i64>> {
        let ids = self.queue.select(sel).await?;
        if ids.is_empty() {
            return Err(Error::InstanceNotFound(sel.to_string()));
        }
        Ok(ids)
    }

    /// How many instances are in each state, and how many pending ones need more than
    /// any live worker has.
    pub async fn counts(&self) -> Result<Counts> {
        let mut c = self.queue.counts().await?;
        if c.pending > 0 {
            c.unrunnable = self.queue.unrunnable(None).await?;
        }
        Ok(c)
    }

    /// One page of a list: up to `limit` rows of `kind` after cursor `after` (0 for
    /// the first page), in order; a row's `cursor()` is where the next page starts.
    /// An empty page is the end.
    pub async fn list_page(
        &self,
        kind: ListKind,
        (after, limit): (i64, usize),
        batch: Option<&str>,
    ) -> Result<Vec<ListRow>> {
        self.queue.list_page(kind, (after, limit), batch).await
    }

    /// Up to `q.limit` instances matching `q`, newest first (see
    /// [`Queue::recent_page`]).
    pub async fn recent(&self, q: &queue::RecentQuery) -> Result<Vec<queue::InstanceSummary>> {
        self.queue.recent_page(q).await
    }

    /// Up to `limit` events after event `after`, in order.
    pub async fn event_page(&self, after: i64, limit: usize) -> Result<Vec<Event>> {
        self.queue.events(after, limit).await
    }

    /// The newest event's id (0 when the log is empty).
    pub async fn last_event_id(&self) -> Result<i64> {
        self.queue.last_event_id().await
    }

    /// A number that changes whenever the queue may have changed (in any process);
    /// pass it to [`wait_change`](Self::wait_change).
    pub fn change_seq(&self) -> u64 {
        self.queue.change_seq()
    }

    /// Waits until the queue changed since `seen` (a [`change_seq`](Self::change_seq)),
    /// or `timeout` passed.
    pub async fn wait_change(&self, seen: u64, timeout: Duration) {
        self.queue.wait_change(seen, timeout).await;
    }

    /// A worker over this database; start it with [`Worker::run`].
    pub fn worker(&self, runner: Arc<dyn Runner>, mut opts: WorkerOptions) -> Worker {
        if opts.live_dir.is_none() {
            opts.live_dir.clone_from(&self.live_dir);
        }
        Worker::new(self.queue.clone(), self.blobs.clone(), runner, opts)
    }

    /// What a worker on this database calls (the queue, the blob store, live output
    /// files in [`BatchDb::live_dir`]): `batchdb serve` answers remote workers with it.
    pub fn worker_port(&self) -> worker::LocalPort {
        worker::LocalPort::new(
            self.queue.clone(),
            self.blobs.clone(),
            self.live_dir.clone(),
        )
    }
}

/// Blob `hash` if the queue keeps it inline (a small payload or output), checked
/// against the hash ([`Error::BlobCorrupt`] if it does not match).
pub(crate) async fn checked_inline(queue: &dyn Queue, hash: &Hash) -> Result<Option<Vec<u8>>> {
    queue
        .inline_blob(hash)
        .await?
        .map(|bytes| checked(hash, bytes))
        .transpose()
}

/// `bytes`, the whole of blob `hash`, if they hash to it ([`Error::BlobCorrupt`] if
/// not).
pub(crate) fn checked(hash: &Hash, bytes: Vec<u8>) -> Result<Vec<u8>> {
    let actual = Hash::of(&bytes);
    if actual != *hash {
        return Err(Error::BlobCorrupt {
            hash: *hash,
            actual,
        });
    }
    Ok(bytes)
}

/// The error for a backend this build was compiled without.
#[cfg(any(not(feature = "postgres"), not(feature = "s3")))]
fn missing_feature(what: &'static str, value: &str, feature: &str) -> Error {
    Error::Config {
        what,
        value: value.to_string(),
        why: format!("this batchdb was built without the `{feature}` feature"),
    }
}

/// Turns a page fetcher `(cursor) -> (rows, next cursor)` into a stream of rows. The
/// next page is fetched (on another task) while the caller consumes the current one.
pub(crate) fn paged<T, F, Fut>(fetch: F) -> impl Stream<Item = Result<T>> + Send + 'static
where
    T: Send + 'static,
    F: Fn(i64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<i64>)>> + Send + 'static,
{
    type Page<T> = tokio::task::JoinHandle<Result<(Vec<T>, Option<i64>)>>;
    futures_util::stream::unfold(
        (
            None::<Page<T>>,
            Some(0i64),
            Vec::<T>::new().into_iter(),
            fetch,
        ),
        |(mut next, mut cursor, mut buf, fetch)| async move {
            loop {
                if let Some(row) = buf.next() {
                    return Some((Ok(row), (next, cursor, buf, fetch)));
                }
                let page = match next.take() {
                    Some(page) => page,
                    None => tokio::spawn(fetch(cursor.take()?)),
                };
                let fetched = page
                    .await
                    .unwrap_or_else(|e| Err(Error::Task(e.to_string())));
                match fetched {
                    Ok((rows, after)) => {
                        if rows.is_empty() {
                            return None;
                        }
                        if let Some(after) = after {
                            next = Some(tokio::spawn(fetch(after)));
                        }
                        buf = rows.into_iter();
                    }
                    Err(e) => return Some((Err(e), (None, None, buf, fetch))),
                }
            }
        },
    )
}
