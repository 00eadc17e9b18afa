//! Content-addressed blob stores.
//!
//! A [`BlobStore`] keeps byte streams under the sha256 of their content. Backends sit
//! behind this one trait and are exercised by one shared conformance suite
//! (`tests/conformance`). The directory backend ([`DirStore`]) is the embedded default;
//! with the `s3` feature, [`S3Store`] keeps blobs in an S3-compatible bucket.

pub(crate) mod behind;
mod dir;
#[cfg(feature = "s3")]
mod s3;
mod verify;

use std::fmt;
use std::pin::Pin;
use std::time::SystemTime;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use serde::Serialize;
use tokio::io::AsyncRead;

pub use dir::DirStore;
#[cfg(feature = "s3")]
pub use s3::{S3Options, S3Store};
pub(crate) use verify::verifying;

use crate::error::Result;
use crate::hash::Hash;

/// A readable stream of a blob's bytes.
pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// What a completed write stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BlobInfo {
    /// The sha256 of the content, which is also its name.
    pub hash: Hash,
    /// The content's length in bytes.
    pub size: u64,
}

/// A content-addressed store of immutable blobs.
///
/// Guarantees every backend must give (held by the conformance suite):
/// - [`put`](BlobStore::put) streams its input (memory stays bounded whatever the size)
///   and returns only once the blob is durable and readable under its hash; a blob is
///   never visible before it is complete, and a failed or dropped `put` leaves nothing
///   visible.
/// - Identical content is stored once; storing it again is cheap and harmless.
/// - [`get`](BlobStore::get) streams the bytes and checks them against the hash as they
///   pass: a corrupt blob ends in an error naming the hash, never in a clean end of
///   stream.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// Streams `reader` to the end into the store and returns the blob's hash and size
    /// once it is durable.
    async fn put(&self, reader: &mut (dyn AsyncRead + Send + Unpin)) -> Result<BlobInfo>;

    /// Opens the blob named `hash` for streaming; [`crate::Error::BlobNotFound`] if it is
    /// absent.
    async fn get(&self, hash: &Hash) -> Result<BlobReader>;

    /// Opens bytes `range` of the blob named `hash` (clamped to its size) for streaming,
    /// for HTTP `Range` requests. A part of a blob cannot be checked against its hash,
    /// so these bytes are not verified; [`crate::Error::BlobNotFound`] if it is absent.
    async fn get_range(&self, hash: &Hash, range: std::ops::Range<u64>) -> Result<BlobReader>;

    /// The size in bytes of the blob named `hash`; [`crate::Error::BlobNotFound`] if it
    /// is absent.
    async fn size(&self, hash: &Hash) -> Result<u64>;

    /// Whether a complete blob named `hash` is stored.
    async fn contains(&self, hash: &Hash) -> Result<bool>;

    /// Removes the blob named `hash`; returns whether it existed.
    async fn delete(&self, hash: &Hash) -> Result<bool>;

    /// Streams every complete blob in the store, in no particular order (blobs being
    /// written are not listed).
    fn list(&self) -> BoxStream<'static, Result<BlobEntry>>;

    /// Marks an existing blob as just stored again, so that a garbage collector that
    /// honours a grace period leaves it alone while the row that names it commits.
    async fn touch(&self, hash: &Hash) -> Result<()>;

    /// Removes what interrupted writes left behind — temporary files older than
    /// `older_than` — or, with `dry_run`, only reports them. A store whose writes leave
    /// nothing behind keeps this default (nothing).
    async fn sweep_leftovers(
        &self,
        older_than: std::time::Duration,
        dry_run: bool,
    ) -> Result<Vec<Leftover>> {
        let _ = (older_than, dry_run);
        Ok(Vec::new())
    }

    /// Whether [`adopt`](BlobStore::adopt) can keep a local file as a blob without
    /// copying its bytes (a store in a local directory can; a remote one cannot).
    fn adopts_files(&self) -> bool {
        false
    }

    /// Keeps the local `file`, whose content its caller hashed as `info` and writes no
    /// more, as blob `info.hash` without copying its bytes, if this store can. `Ok(true)`:
    /// the blob is durable and readable under its hash, as after a
    /// [`put`](BlobStore::put) (the file's bytes are in it, so writing the file later
    /// corrupts the blob: reads would then fail its check). `Ok(false)`: this store
    /// cannot keep this file (another file system, or it keeps no local files); it
    /// stored nothing, and the caller puts the bytes instead. A file whose length is
    /// not `info.size` is refused with an error.
    async fn adopt(&self, file: &std::fs::File, info: BlobInfo) -> Result<bool> {
        let _ = (file, info);
        Ok(false)
    }

    /// Where the store lives (a path or URL), for messages.
    fn location(&self) -> String;
}

/// A file an interrupted write or a killed worker left behind, as `gc` removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Leftover {
    /// Where it is.
    pub path: std::path::PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

impl Leftover {
    /// The leftover at `path`, of `size` bytes.
    pub fn new(path: std::path::PathBuf, size: u64) -> Leftover {
        Leftover { path, size }
    }
}

/// The files directly in `dir` modified more than `older_than` ago that `keep` does
/// not keep, removed unless `dry_run` (a directory that does not exist holds none).
pub(crate) async fn sweep_dir(
    dir: &std::path::Path,
    older_than: std::time::Duration,
    dry_run: bool,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<Leftover>> {
    let io = |op, e| crate::error::Error::io(op, dir, e);
    let mut out = Vec::new();
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io("read directory", e)),
    };
    let now = SystemTime::now();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| io("read directory", e))?
    {
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        let old = meta
            .modified()
            .is_ok_and(|m| now.duration_since(m).unwrap_or_default() >= older_than);
        let name = entry.file_name().to_string_lossy().into_owned();
        if !meta.is_file() || !old || keep(&name) {
            continue;
        }
        let path = entry.path();
        if !dry_run {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::error::Error::io("remove", &path, e)),
            }
        }
        out.push(Leftover::new(path, meta.len()));
    }
    Ok(out)
}

/// One stored blob, as [`BlobStore::list`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BlobEntry {
    /// Its name.
    pub hash: Hash,
    /// Its length in bytes.
    pub size: u64,
    /// When it was last stored (or touched), if the store knows.
    pub modified: Option<SystemTime>,
}
