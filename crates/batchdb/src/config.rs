//! Where a database lives.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the queue lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// A SQLite file (created on first use).
    Sqlite(PathBuf),
    /// A PostgreSQL database, by its connection URL (`postgres://user:pass@host/db`).
    /// Needs the `postgres` feature.
    Postgres(String),
}

/// Where the blobs live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    /// A content-addressed directory (created on first use).
    Dir(PathBuf),
    /// An S3-compatible bucket, optionally under a key prefix (`s3://bucket/prefix`).
    /// Credentials, region and endpoint come from the standard `AWS_*` environment
    /// variables. Needs the `s3` feature.
    S3 {
        /// The bucket's name.
        bucket: String,
        /// The key prefix blobs live under (no leading or trailing `/`; may be empty).
        prefix: String,
    },
}

impl DbLocation {
    /// Parses `--db`: a file path (optionally `sqlite:PATH`) or a `postgres://` (or
    /// `postgresql://`) URL. Other URL schemes are refused with a clear error.
    pub fn parse(s: &str) -> Result<DbLocation> {
        if s.is_empty() {
            return Err(Error::Config {
                what: "database",
                value: s.into(),
                why: "empty path".into(),
            });
        }
        if let Some(p) = s
            .strip_prefix("sqlite://")
            .or_else(|| s.strip_prefix("sqlite:"))
        {
            return Ok(DbLocation::Sqlite(PathBuf::from(p)));
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return Ok(DbLocation::Postgres(s.to_string()));
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::Config {
                what: "database",
                value: s.into(),
                why: format!(
                    "unknown scheme {scheme}:// (use a SQLite file path or a postgres:// URL)"
                ),
            });
        }
        Ok(DbLocation::Sqlite(PathBuf::from(s)))
    }
}

impl BlobLocation {
    /// Parses `--blobs`: a directory path (optionally `file://PATH`) or an
    /// `s3://bucket/prefix` URL. Other URL schemes are refused with a clear error.
    pub fn parse(s: &str) -> Result<BlobLocation> {
        if s.is_empty() {
            return Err(Error::Config {
                what: "blob store",
                value: s.into(),
                why: "empty path".into(),
            });
        }
        if let Some(p) = s.strip_prefix("file://") {
            return Ok(BlobLocation::Dir(PathBuf::from(p)));
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bad = |why: &str| Error::Config {
                what: "blob store",
                value: s.into(),
                why: why.into(),
            };
            let bucket_ok = (3..=63).contains(&bucket.len())
                && bucket
                    .bytes()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.'));
            if !bucket_ok {
                return Err(bad(
                    "the bucket name must be 3-63 characters of a-z, 0-9, '-' and '.'",
                ));
            }
            let prefix = prefix.trim_matches('/');
            let prefix_ok = prefix.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            });
            if !prefix.is_empty() && !prefix_ok {
                return Err(bad(
                    "the key prefix must be '/'-separated parts of A-Z, a-z, 0-9, '-', '_' and '.'",
                ));
            }
            return Ok(BlobLocation::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::Config {
                what: "blob store",
                value: s.into(),
                why: format!("unknown scheme {scheme}:// (use a directory or an s3:// URL)"),
            });
        }
        Ok(BlobLocation::Dir(PathBuf::from(s)))
    }
}

/// Everything [`crate::BatchDb::open`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The queue.
    pub db: DbLocation,
    /// The blob store.
    pub blobs: BlobLocation,
    /// Where running jobs mirror their output for `logs -f` (local to the machine).
    pub live_dir: Option<PathBuf>,
    /// At most how many connections to a PostgreSQL queue this process holds at once
    /// for its statements, besides the one that listens for changes (at least 1; SQLite
    /// ignores it). `None`: [`DEFAULT_DB_CONNECTIONS`].
    pub db_connections: Option<usize>,
}

/// The connections a PostgreSQL queue holds at most unless [`Config::db_connections`]
/// says otherwise: enough for a server answering many requests at once.
pub const DEFAULT_DB_CONNECTIONS: usize = 16;

impl Config {
    /// The embedded default layout inside `dir`: `batchdb.sqlite`, `blobs/` and `live/`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Config {
        let dir = dir.as_ref();
        Config {
            db: DbLocation::Sqlite(dir.join("batchdb.sqlite")),
            blobs: BlobLocation::Dir(dir.join("blobs")),
            live_dir: Some(dir.join("live")),
            db_connections: None,
        }
    }
}
