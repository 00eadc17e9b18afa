//! Where a database lives.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Where the queue lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbLocation {
    /// A SQLite file (created on first use).
    Sqlite(PathBuf),
}

/// Where the blobs live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLocation {
    /// A content-addressed directory (created on first use).
    Dir(PathBuf),
}

impl DbLocation {
    /// Parses `--db`: a file path (optionally `sqlite:PATH`). URLs of engines this build
    /// does not support are refused with a clear error.
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
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::Config {
                what: "database",
                value: s.into(),
                why: format!(
                    "the {scheme}:// backend is not available in this build (only SQLite files)"
                ),
            });
        }
        Ok(DbLocation::Sqlite(PathBuf::from(s)))
    }
}

impl BlobLocation {
    /// Parses `--blobs`: a directory path. URLs of stores this build does not support
    /// are refused with a clear error.
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
        if let Some((scheme, _)) = s.split_once("://") {
            return Err(Error::Config {
                what: "blob store",
                value: s.into(),
                why: format!(
                    "the {scheme}:// backend is not available in this build (only directories)"
                ),
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
}

impl Config {
    /// The embedded default layout inside `dir`: `batchdb.sqlite`, `blobs/` and `live/`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Config {
        let dir = dir.as_ref();
        Config {
            db: DbLocation::Sqlite(dir.join("batchdb.sqlite")),
            blobs: BlobLocation::Dir(dir.join("blobs")),
            live_dir: Some(dir.join("live")),
        }
    }
}
