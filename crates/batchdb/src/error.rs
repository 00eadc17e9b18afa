//! Typed errors of the batchdb library.
//!
//! Every variant names what failed and on what (a path, a hash, a URL), so that the
//! CLI can report any error on one line.

use std::path::PathBuf;

use crate::hash::Hash;

/// Every error the batchdb library returns. New variants may be added: match with a
/// wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A string that should be a hash is not 64 lowercase hex characters.
    #[error("invalid hash {input:?}: expected 64 lowercase hex characters")]
    InvalidHash {
        /// The rejected input (truncated to 100 characters).
        input: String,
    },
    /// No blob is stored under this hash.
    #[error("blob {0} not found")]
    BlobNotFound(Hash),
    /// A stored blob's bytes do not hash to its name: the store is corrupt.
    #[error("blob {hash} is corrupt: its content hashes to {actual}")]
    BlobCorrupt {
        /// The name the blob is stored under.
        hash: Hash,
        /// What its bytes actually hash to.
        actual: Hash,
    },
    /// No job is stored under this key.
    #[error("job {0} not found")]
    JobNotFound(Hash),
    /// No instance matches a selector.
    #[error("no instance matches {0}")]
    InstanceNotFound(String),
    /// No batch has this name.
    #[error("batch {0} not found")]
    BatchNotFound(String),
    /// An I/O operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("create", "read", "rename", ...).
        op: &'static str,
        /// The path it was done on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading an input stream (a payload, a runner's output) failed.
    #[error("{what}: {source}")]
    Stream {
        /// Which stream failed.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The SQLite database failed.
    #[error("sqlite database {path}: {source}{}", hint.as_deref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
        /// What the operating system says about the failure, when it explains it
        /// (a full disk behind an I/O error).
        hint: Option<String>,
    },
    /// A PostgreSQL statement or connection failed.
    #[cfg(feature = "postgres")]
    #[error("postgres database {location}: {source}")]
    Postgres {
        /// The database URL (password masked).
        location: String,
        /// The underlying error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No PostgreSQL connection could be had from the pool in time.
    #[cfg(feature = "postgres")]
    #[error("postgres database {location}: {message}")]
    PostgresPool {
        /// The database URL (password masked).
        location: String,
        /// What went wrong.
        message: String,
    },
    /// A value read from the queue's database is not one batchdb writes (a bad hash, an
    /// unknown state or event kind, a wrong type): the database is corrupt or was
    /// changed by hand. The same variant on every backend; the request was fine.
    #[error("database {location} is corrupt: {what}")]
    Corrupt {
        /// The database location (file path or URL, password masked).
        location: String,
        /// What was read, and where.
        what: String,
    },
    /// The database was written by a newer batchdb whose schema this build does not know.
    #[error(
        "database {location} has schema version {found}, newer than this batchdb supports ({supported}); upgrade batchdb"
    )]
    SchemaTooNew {
        /// The database location.
        location: String,
        /// The schema version found in the database.
        found: i64,
        /// The newest schema version this build knows.
        supported: i64,
    },
    /// An attempt's lease was taken over by another worker (or the instance was ended),
    /// so this worker may no longer record anything for it.
    #[error("instance {instance} attempt {token}: lease lost (fenced off)")]
    Fenced {
        /// The instance id.
        instance: i64,
        /// The stale fencing token.
        token: i64,
    },
    /// The runner could not be started.
    #[error("runner {command:?}: {source}")]
    Spawn {
        /// The runner's command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The job's process could not be set up as its instance asks: its working
    /// directory cannot be entered, a limit cannot be enforced by this worker, or the
    /// attempt's cgroup cannot be made or joined. The attempt's failure (recorded
    /// with this message), not the worker's.
    #[error("{0}")]
    AttemptSetup(String),
    /// A configuration value is not usable.
    #[error("invalid {what} {value:?}: {why}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// The rejected value.
        value: String,
        /// Why it was rejected.
        why: String,
    },
    /// A request to an S3-compatible object store failed (after the retries the store's
    /// client makes for transient failures).
    #[cfg(feature = "s3")]
    #[error("{op} {location}: {source}")]
    ObjectStore {
        /// What was being done ("put", "get", "copy", "list", ...).
        op: &'static str,
        /// The object it was done on, as an `s3://bucket/key` URL.
        location: String,
        /// The underlying error (it names the endpoint and the HTTP status, if any).
        #[source]
        source: object_store::Error,
    },
    /// A call to a batchdb server (a remote worker's `--server`) failed: it could not
    /// be reached, or it answered with an error.
    #[error("server {url}: {message}")]
    Server {
        /// The server's URL.
        url: String,
        /// The HTTP status, if it answered.
        status: Option<u16>,
        /// What failed, with the server's own message if it gave one.
        message: String,
    },
    /// The server speaks another worker protocol than this build: run the same
    /// batchdb version on both (retrying cannot help).
    #[error(
        "server {url} speaks worker protocol {theirs} (batchdb {version}), this worker {ours}: run the same batchdb version on both"
    )]
    Protocol {
        /// The server's URL.
        url: String,
        /// The server's protocol.
        theirs: String,
        /// The server's batchdb version, if it said.
        version: String,
        /// This build's protocol.
        ours: u32,
    },
    /// A background task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// The result type of the batchdb library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the operation and path it happened on.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
