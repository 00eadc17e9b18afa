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
    pub reopen:
        Box<dyn Fn() -> futures_util::future::BoxFuture<'static, Arc<dyn Queue>> + Send + Sync>,
    _dir: tempfile::TempDir,
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
    let path = dir.path().join("q.sqlite");
    let queue = Arc::new(SqliteQueue::open(&path).await.expect("open sqlite"));
    let blobs = Arc::new(
        DirStore::open(dir.path().join("blobs"))
            .await
            .expect("open dir"),
    );
    Backend {
        queue,
        blobs,
        reopen: Box::new(move || {
            let path = path.clone();
            Box::pin(async move {
                Arc::new(SqliteQueue::open(&path).await.expect("reopen sqlite")) as Arc<dyn Queue>
            })
        }),
        _dir: dir,
    }
}
