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
    /// How another process opens this pair: what `--db`, `--blobs` and the
    /// environment would say.
    pub spec: Spec,
    /// Runs SQL on the queue's database directly (to corrupt it, say), with
    /// batchdb's tables in the search path.
    pub raw_sql: RawSql,
    _dir: tempfile::TempDir,
}

/// Where a backend pair lives, for a child process to open it.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The queue: a SQLite file's path or a `postgres://` URL.
    pub db: String,
    /// The blob store: a directory or an `s3://bucket/prefix` URL.
    pub blobs: String,
    /// Environment a child needs (S3 credentials and endpoint).
    pub env: Vec<(&'static str, String)>,
}

/// Runs SQL on a queue's database behind its back.
pub type RawSql = Box<dyn Fn(String) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

/// [`RawSql`] for the database at `db` (a SQLite path or a PostgreSQL URL).
fn raw_sql(db: &str) -> RawSql {
    let db = db.to_string();
    Box::new(move |sql: String| {
        let db = db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                if db.starts_with("postgres") {
                    #[cfg(feature = "postgres")]
                    {
                        let name = db.rsplit('/').next().expect("database name");
                        batchdb_testkit::postgres::shared()
                            .sql(name, &format!("SET search_path TO batchdb; {sql}"));
                    }
                } else {
                    rusqlite::Connection::open(&db)
                        .expect("open sqlite")
                        .execute_batch(&sql)
                        .expect("raw sql");
                }
            })
            .await
            .expect("raw sql task");
        })
    })
}

/// Opens another handle on a queue.
pub type Reopen =
    Box<dyn Fn() -> futures_util::future::BoxFuture<'static, Arc<dyn Queue>> + Send + Sync>;

impl Backend {
    /// Puts a backend together; `dir` is a temporary directory it owns.
    fn new(
        (queue, reopen, db): (Arc<dyn Queue>, Reopen, String),
        (blobs, blobs_at, env): (Arc<dyn BlobStore>, String, Vec<(&'static str, String)>),
        dir: tempfile::TempDir,
    ) -> Backend {
        Backend {
            queue,
            blobs,
            reopen,
            raw_sql: raw_sql(&db),
            spec: Spec {
                db,
                blobs: blobs_at,
                env,
            },
            _dir: dir,
        }
    }
}

/// A SQLite queue in `dir`, and a handle that reopens it.
async fn sqlite_queue(dir: &tempfile::TempDir) -> (Arc<dyn Queue>, Reopen, String) {
    let path = dir.path().join("q.sqlite");
    let at = path.display().to_string();
    let queue = Arc::new(SqliteQueue::open(&path).await.expect("open sqlite"));
    let reopen: Reopen = Box::new(move || {
        let path = path.clone();
        Box::pin(async move {
            Arc::new(SqliteQueue::open(&path).await.expect("reopen sqlite")) as Arc<dyn Queue>
        })
    });
    (queue, reopen, at)
}

/// A directory blob store in `dir`.
async fn dir_store(
    dir: &tempfile::TempDir,
) -> (Arc<dyn BlobStore>, String, Vec<(&'static str, String)>) {
    let path = dir.path().join("blobs");
    let store = Arc::new(DirStore::open(&path).await.expect("open dir"));
    (store, path.display().to_string(), Vec::new())
}

impl Backend {
    /// The facade over this backend.
    pub fn db(&self) -> BatchDb {
        BatchDb::new(self.queue.clone(), self.blobs.clone())
    }

    /// The one integer `sql` selects (a `count(*)`), read from the queue's database
    /// behind its back, with batchdb's tables in the search path.
    pub async fn raw_count(&self, sql: &str) -> i64 {
        let (db, sql) = (self.spec.db.clone(), sql.to_string());
        tokio::task::spawn_blocking(move || {
            if db.starts_with("postgres") {
                #[cfg(feature = "postgres")]
                {
                    let name = db.rsplit('/').next().expect("database name");
                    return batchdb_testkit::postgres::shared()
                        .count(name, &format!("SET search_path TO batchdb; {sql}"));
                }
            }
            rusqlite::Connection::open(&db)
                .expect("open sqlite")
                .query_row(&sql, [], |r| r.get(0))
                .expect("raw count")
        })
        .await
        .expect("raw count task")
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
    {
        let mut o = batchdb::blob::S3Options::default();
        o.endpoint = Some(g.endpoint.clone());
        o.region = g.region.clone();
        o.access_key_id = g.access_key_id.clone();
        o.secret_access_key = g.secret_access_key.clone();
        o.allow_http = true;
        o.virtual_hosted_style = false;
        o.retry_for = retry_for;
        o
    }
}

/// An S3 store on the shared Garage bucket under a fresh random prefix (the server is
/// started on first use).
#[cfg(feature = "s3")]
pub async fn s3_store() -> batchdb::blob::S3Store {
    s3_pair().await.0
}

/// [`s3_store`] with its URL and the environment that reaches it.
#[cfg(feature = "s3")]
async fn s3_pair() -> (batchdb::blob::S3Store, String, Vec<(&'static str, String)>) {
    let g = tokio::task::spawn_blocking(batchdb_testkit::garage::garage)
        .await
        .expect("start garage");
    let prefix = batchdb_testkit::garage::Garage::fresh_prefix();
    let store = batchdb::blob::S3Store::with_options(
        &g.bucket,
        &prefix,
        &s3_options(g, batchdb::blob::S3Options::default().retry_for),
    )
    .expect("open s3 store");
    (store, g.url(&prefix), g.env())
}

/// [`s3_pair`] as a blob store.
#[cfg(feature = "s3")]
async fn s3_blobs() -> (Arc<dyn BlobStore>, String, Vec<(&'static str, String)>) {
    let (store, url, env) = s3_pair().await;
    (Arc::new(store), url, env)
}

/// SQLite queue in a temporary directory + S3 blob store on the shared Garage bucket,
/// under a fresh prefix.
#[cfg(feature = "s3")]
pub async fn sqlite_s3() -> Backend {
    let dir = tempfile::tempdir().expect("tempdir");
    Backend::new(sqlite_queue(&dir).await, s3_blobs().await, dir)
}

/// A PostgreSQL queue on a fresh database of the shared throwaway cluster (started on
/// first use), and a handle that reopens it.
#[cfg(feature = "postgres")]
pub async fn postgres_queue() -> (Arc<dyn Queue>, Reopen, String) {
    let url = tokio::task::spawn_blocking(|| batchdb_testkit::postgres::shared().create_database())
        .await
        .expect("start postgres");
    let queue = Arc::new(
        batchdb::queue::PgQueue::open(&url)
            .await
            .expect("open postgres"),
    );
    let at = url.clone();
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
    (queue, reopen, at)
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
    Backend::new(postgres_queue().await, s3_blobs().await, dir)
}
