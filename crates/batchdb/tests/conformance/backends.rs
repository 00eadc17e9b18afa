//! The backends the conformance suite runs against.

use std::sync::Arc;

use batchdb::BatchDb;
use batchdb::blob::{BlobStore, DirStore};
use batchdb::queue::{Queue, SqliteQueue};

/// A fresh, empty pair of backends.
pub struct Backend {
    /// The queue.
    pub queue: Arc<dyn Queue>,
    /// The blob store.
    pub blobs: Arc<dyn BlobStore>,
    /// Opens another handle on the same queue (as another process would).
    pub reopen: Reopen,
    _dir: tempfile::TempDir,
}

/// Opens another handle on a queue.
pub type Reopen =
    Box<dyn Fn() -> futures_util::future::BoxFuture<'static, Arc<dyn Queue>> + Send + Sync>;

impl Backend {
    /// Puts a backend together; `dir` is a temporary directory it owns.
    fn new(
        (queue, reopen): (Arc<dyn Queue>, Reopen),
        blobs: Arc<dyn BlobStore>,
        dir: tempfile::TempDir,
    ) -> Backend {
        Backend {
            queue,
            blobs,
            reopen,
            _dir: dir,
        }
    }
}

/// A SQLite queue in `dir`, and a handle that reopens it.
async fn sqlite_queue(dir: &tempfile::TempDir) -> (Arc<dyn Queue>, Reopen) {
    let path = dir.path().join("q.sqlite");
    let queue = Arc::new(SqliteQueue::open(&path).await.expect("open sqlite"));
    let reopen: Reopen = Box::new(move || {
        let path = path.clone();
        Box::pin(async move {
            Arc::new(SqliteQueue::open(&path).await.expect("reopen sqlite")) as Arc<dyn Queue>
        })
    });
    (queue, reopen)
}

/// A directory blob store in `dir`.
async fn dir_store(dir: &tempfile::TempDir) -> Arc<dyn BlobStore> {
    Arc::new(
        DirStore::open(dir.path().join("blobs"))
            .await
            .expect("open dir"),
    )
}

impl Backend {
    /// The facade over this backend.
    pub fn db(&self) -> BatchDb {
        BatchDb::new(self.queue.clone(), self.blobs.clone())
    }
}

/// SQLite queue + directory blob store in a temporary directory.
pub async fn sqlite_dir() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    Backend::new(sqlite_queue(&dir).await, dir_store(&dir).await, dir)
}

/// Settings that reach Garage server `g` with its key, retrying for `retry_for`.
#[cfg(feature = "s3")]
pub fn s3_options(
    g: &batchdb_testkit::garage::Garage,
    retry_for: std::time::Duration,
) -> batchdb::blob::S3Options {
    batchdb::blob::S3Options {
        endpoint: Some(g.endpoint.clone()),
        region: g.region.clone(),
        access_key_id: g.access_key_id.clone(),
        secret_access_key: g.secret_access_key.clone(),
        allow_http: true,
        virtual_hosted_style: false,
        retry_for,
    }
}

/// An S3 store on the shared Garage bucket under a fresh random prefix (the server is
/// started on first use).
#[cfg(feature = "s3")]
pub async fn s3_store() -> batchdb::blob::S3Store {
    let g = tokio::task::spawn_blocking(batchdb_testkit::garage::garage)
        .await
        .expect("start garage");
    let prefix = batchdb_testkit::garage::Garage::fresh_prefix();
    batchdb::blob::S3Store::with_options(
        &g.bucket,
        &prefix,
        &s3_options(g, batchdb::blob::DEFAULT_RETRY_FOR),
    )
    .expect("open s3 store")
}

/// SQLite queue in a temporary directory + S3 blob store on the shared Garage bucket,
/// under a fresh prefix.
#[cfg(feature = "s3")]
pub async fn sqlite_s3() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    Backend::new(sqlite_queue(&dir).await, Arc::new(s3_store().await), dir)
}

/// A PostgreSQL queue on a fresh database of the shared throwaway cluster (started on
/// first use), and a handle that reopens it.
#[cfg(feature = "postgres")]
pub async fn postgres_queue() -> (Arc<dyn Queue>, Reopen) {
    let url = tokio::task::spawn_blocking(|| batchdb_testkit::postgres::shared().create_database())
        .await
        .expect("start postgres");
    let queue = Arc::new(
        batchdb::queue::PgQueue::open(&url)
            .await
            .expect("open postgres"),
    );
    let reopen: Reopen = Box::new(move || {
        let url = url.clone();
        Box::pin(async move {
            Arc::new(
                batchdb::queue::PgQueue::open(&url)
                    .await
                    .expect("reopen postgres"),
            ) as Arc<dyn Queue>
        })
    });
    (queue, reopen)
}

/// PostgreSQL queue + directory blob store.
#[cfg(feature = "postgres")]
pub async fn postgres_dir() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    Backend::new(postgres_queue().await, dir_store(&dir).await, dir)
}

/// The distributed pair: PostgreSQL queue + S3 blob store.
#[cfg(all(feature = "postgres", feature = "s3"))]
pub async fn postgres_s3() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    Backend::new(postgres_queue().await, Arc::new(s3_store().await), dir)
}
