//! Content-addressed blob stores.
//!
//! A [`BlobStore`] keeps byte streams under the sha256 of their content. Backends sit
//! behind this one trait and are exercised by one shared conformance suite
//! (`tests/conformance`). The directory backend ([`DirStore`]) is the embedded default;
//! with the `s3` feature, [`S3Store`] keeps blobs in an S3-compatible bucket.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

    /// Where the store lives (a path or URL), for messages.
    fn location(&self) -> String;
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
