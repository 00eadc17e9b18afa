//! The distributed blob store: an S3-compatible bucket, through the `object_store` crate.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, HeaderMap, HeaderValue, MultipartUpload,
    ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::task::JoinSet;
use tokio_util::io::StreamReader;

use super::{BlobEntry, BlobInfo, BlobReader, BlobStore, verifying};
use crate::error::{Error, Result};
use crate::hash::{Hash, Hasher};

/// Size of each part of a multipart upload, and the largest blob stored with one `PUT`.
/// S3 wants every part but the last to be at least 5 MiB.
pub(crate) const PART_SIZE: usize = 8 * 1024 * 1024;

/// Parts of one upload in flight at once: with the part being read, a `put` holds at
/// most `(MAX_PARTS_IN_FLIGHT + 1) * PART_SIZE` bytes whatever the blob's size.
const MAX_PARTS_IN_FLIGHT: usize = 2;

/// How long a failing request is retried (with exponential backoff) by default.
const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(30);

const BAD_PREFIX: &str =
    "the key prefix must be '/'-separated parts of A-Z, a-z, 0-9, '-', '_' and '.'";

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Blobs in an S3-compatible bucket (AWS S3, Garage, MinIO, ...), under a key prefix.
///
/// # Layout
/// Blob `h` is the object `<prefix>/h[0..2]/h`; only validated [`Hash`](struct@Hash)es ever form a
/// key. A blob larger than [`PART_SIZE`] is first uploaded (multipart, streamed) to a
/// temporary object `<prefix>/tmp/<unique>`, since its hash is only known at its end,
/// then copied server-side to its key, and the temporary object deleted. [`list`]
/// reports only keys of the blob layout, so temporary objects are never listed.
///
/// # Guarantees
/// - **Streaming, bounded memory.** `put` holds at most three parts (24 MiB) whatever
///   the blob's size; a blob up to [`PART_SIZE`] is one `PUT`.
/// - **Visible only when complete.** A single `PUT`, a multipart completion and a
///   server-side copy are each atomic on S3, so a blob's key names complete content or
///   nothing. A failed `put` aborts its multipart upload and deletes its temporary
///   object; a `put` whose future is dropped does the same from a background task
///   (best effort). A process killed mid-upload leaves at most an unfinished multipart
///   upload or a `tmp/` object, neither ever listed nor read: a bucket lifecycle rule
///   (abort incomplete multipart uploads, expire `<prefix>/tmp/` after a day) reclaims
///   them.
/// - **Stored once.** A blob already present is not uploaded again (small blobs: a
///   `HEAD` before the upload; large ones: no copy into place), only
///   [touched](BlobStore::touch).
/// - **Verified reads.** `get` streams and checks the bytes against the hash as they
///   pass; a corrupt object ends in [`Error::BlobCorrupt`] naming the hash.
/// - **Touch.** [`touch`](BlobStore::touch) copies the object onto itself with
///   `x-amz-metadata-directive: REPLACE` (the copy S3 allows onto the same key), which
///   gives it a new `Last-Modified`, so `gc`'s grace period protects a blob stored again.
/// - **Transient failures are retried.** Every request is retried with exponential
///   backoff (100 ms doubling up to 2 s) for up to [`DEFAULT_RETRY_FOR`] (or
///   [`S3Options::retry_for`]) when the server cannot be reached, answers 5xx / 429, or
///   a read breaks off mid-stream (resumed where it stopped), so a restart of the
///   server for a few seconds is ridden out; retries are logged (`tracing`, info).
///   After that, the error ([`Error::ObjectStore`]) names the operation and the
///   `s3://bucket/key` it failed on.
///
/// Server-side copies use `CopyObject`, which AWS S3 limits to 5 GiB objects: a blob
/// larger than that cannot be stored on AWS itself (Garage and MinIO have no such limit).
///
/// [`list`]: BlobStore::list
pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    /// The same bucket through a client that sends `x-amz-metadata-directive: REPLACE`
    /// (signed), used only for the self-copy of [`BlobStore::touch`].
    toucher: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: Vec<String>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The clients' own Debug output would show the credentials.
        f.debug_struct("S3Store")
            .field("location", &self.location())
            .finish_non_exhaustive()
    }
}

/// Explicit connection settings for [`S3Store::with_options`] (instead of the `AWS_*`
/// environment variables [`S3Store::open`] reads).
#[derive(Clone)]
#[non_exhaustive]
pub struct S3Options {
    /// The endpoint URL of a self-hosted store (`http://127.0.0.1:3900`); `None` for
    /// AWS S3 itself.
    pub endpoint: Option<String>,
    /// The region (Garage's default is `garage`; AWS's `us-east-1`, ...).
    pub region: String,
    /// The access key id.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// Allow a plain `http://` endpoint (for a store on loopback).
    pub allow_http: bool,
    /// Address the bucket as `https://bucket.host/` instead of `https://host/bucket/`
    /// (path style, the default, which self-hosted stores expect).
    pub virtual_hosted_style: bool,
    /// How long a failing request is retried with backoff before it fails.
    pub retry_for: Duration,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("retry_for", &self.retry_for)
            .finish()
    }
}

impl Default for S3Options {
    /// No endpoint (AWS), region `us-east-1`, no credentials, https only, path style,
    /// retries for [`DEFAULT_RETRY_FOR`].
    fn default() -> Self {
        S3Options {
            endpoint: None,
            region: "us-east-1".into(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            allow_http: false,
            virtual_hosted_style: false,
            retry_for: DEFAULT_RETRY_FOR,
        }
    }
}

/// The client settings every S3 store starts from: generous request timeouts (a part
/// is 8 MiB), a short connect timeout so an unreachable server is retried quickly.
fn client_options() -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(120))
}

/// Retry with exponential backoff (100 ms, doubling, at most 2 s apart, so a server
/// that comes back is used again within 2 s) for up to `retry_for`.
fn retry_config(retry_for: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        // The time limit is what bounds the retries; this only caps their number.
        max_retries: 1000,
        retry_timeout: retry_for,
    }
}

impl S3Store {
    /// Opens the store in `bucket` under key `prefix` (may be empty), configured from
    /// the environment like the AWS tools:
    ///
    /// - `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`: credentials
    ///   (without them, the container / instance-metadata / web-identity credentials
    ///   of `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, `AWS_WEB_IDENTITY_TOKEN_FILE` +
    ///   `AWS_ROLE_ARN`, or EC2's metadata service; `~/.aws` files are not read);
    /// - `AWS_REGION` (or `AWS_DEFAULT_REGION`; default `us-east-1`);
    /// - `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`): a self-hosted store's URL;
    /// - `AWS_VIRTUAL_HOSTED_STYLE_REQUEST=true` for `bucket.host` addressing (path
    ///   style `host/bucket` is the default);
    /// - `AWS_ALLOW_HTTP=true` to allow a plain `http://` endpoint (e.g. on loopback);
    /// - and every other `AWS_*` setting the `object_store` crate knows (`AWS_TIMEOUT`,
    ///   `AWS_CONNECT_TIMEOUT`, `AWS_PROXY_URL`, `AWS_SERVER_SIDE_ENCRYPTION`, ...).
    ///
    /// The bucket is not contacted here: a store that is down when a worker starts is
    /// retried when it is first used. Requests are retried for [`DEFAULT_RETRY_FOR`].
    #[allow(clippy::unused_async)] // async like every other backend's `open`
    pub async fn open(bucket: &str, prefix: &str) -> Result<S3Store> {
        let mut builder = AmazonS3Builder::new();
        let mut client = client_options();
        for (key, value) in std::env::vars_os() {
            let (Some(key), Some(value)) = (key.to_str(), value.to_str()) else {
                continue;
            };
            if !key.starts_with("AWS_") {
                continue;
            }
            match key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                Ok(AmazonS3ConfigKey::Client(k)) => client = client.with_config(k, value),
                Ok(AmazonS3ConfigKey::Bucket) | Err(_) => {}
                Ok(k) => builder = builder.with_config(k, value),
            }
        }
        S3Store::build(bucket, prefix, builder, client, DEFAULT_RETRY_FOR)
    }

    /// Opens the store in `bucket` under key `prefix` (may be empty) with explicit
    /// settings; the environment is not read. Does not contact the bucket.
    pub fn with_options(bucket: &str, prefix: &str, options: &S3Options) -> Result<S3Store> {
        let mut builder = AmazonS3Builder::new()
            .with_region(&options.region)
            .with_access_key_id(&options.access_key_id)
            .with_secret_access_key(&options.secret_access_key)
            .with_virtual_hosted_style_request(options.virtual_hosted_style);
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let client = client_options().with_allow_http(options.allow_http);
        S3Store::build(bucket, prefix, builder, client, options.retry_for)
    }

    fn build(
        bucket: &str,
        prefix: &str,
        builder: AmazonS3Builder,
        client: ClientOptions,
        retry_for: Duration,
    ) -> Result<S3Store> {
        let location = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let parts: Vec<String> = prefix
            .split('/')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        let part_ok = |p: &String| {
            p != "."
                && p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if !parts.iter().all(part_ok) {
            return Err(Error::Config {
                what: "blob store",
                value: location,
                why: BAD_PREFIX.into(),
            });
        }
        let builder = builder
            .with_bucket_name(bucket)
            .with_retry(retry_config(retry_for));
        let mut replace = HeaderMap::new();
        replace.insert(
            "x-amz-metadata-directive",
            HeaderValue::from_static("REPLACE"),
        );
        let configure = |e| Error::ObjectStore {
            op: "configure",
            location: location.clone(),
            source: e,
        };
        let toucher = builder
            .clone()
            .with_client_options(client.clone().with_default_headers(replace))
            .build()
            .map_err(configure)?;
        let store = builder
            .with_client_options(client)
            .build()
            .map_err(configure)?;
        Ok(S3Store {
            store: Arc::new(store),
            toucher: Arc::new(toucher),
            bucket: bucket.to_string(),
            prefix: parts,
        })
    }

    /// The object key blob `hash` lives at, `<prefix>/<first 2 hex>/<hex>` (whether or
    /// not it exists).
    pub fn key_of(&self, hash: &Hash) -> String {
        self.path_of(hash).to_string()
    }

    /// The underlying `object_store` client (for tests and tools that need the raw
    /// objects, like [`crate::blob::DirStore::path_of`] for the directory store).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    fn path_of(&self, hash: &Hash) -> Path {
        let hex = hash.to_hex();
        let fan = hex[0..2].to_string();
        self.prefix.iter().cloned().chain([fan, hex]).collect()
    }

    fn temp_path(&self) -> Path {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{:016x}.part",
            std::process::id(),
            n,
            fastrand::u64(..)
        );
        self.prefix
            .iter()
            .cloned()
            .chain(["tmp".into(), name])
            .collect()
    }

    fn url(&self, key: &Path) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    fn err(&self, op: &'static str, key: &Path, source: object_store::Error) -> Error {
        Error::ObjectStore {
            op,
            location: self.url(key),
            source,
        }
    }

    /// Whether an object exists at `key` (a `HEAD`).
    async fn exists(&self, key: &Path) -> Result<Option<u64>> {
        match self.store.head(key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("head", key, e)),
        }
    }

    /// Stores a blob that fits in one part with one `PUT`, straight under its key.
    async fn put_small(&self, data: Vec<u8>) -> Result<BlobInfo> {
        let info = BlobInfo {
            hash: Hash::of(&data),
            size: data.len() as u64,
        };
        let key = self.path_of(&info.hash);
        if self.exists(&key).await?.is_some() && self.touch(&info.hash).await.is_ok() {
            return Ok(info);
        }
        self.store
            .put(&key, PutPayload::from(data))
            .await
            .map_err(|e| self.err("put", &key, e))?;
        Ok(info)
    }

    /// Streams a blob larger than one part to a temporary object, then copies it into
    /// place. `first` is its first (full) part.
    async fn put_large(
        &self,
        first: Vec<u8>,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo> {
        let temp = self.temp_path();
        let upload = self
            .store
            .put_multipart(&temp)
            .await
            .map_err(|e| self.err("start multipart upload", &temp, e))?;
        let mut pending = Pending {
            store: self.store.clone(),
            temp: temp.clone(),
            upload: Some(upload),
            parts: JoinSet::new(),
            temp_exists: false,
        };
        let result = self.upload_and_publish(&mut pending, first, reader).await;
        pending.cleanup().await;
        result
    }

    async fn upload_and_publish(
        &self,
        pending: &mut Pending,
        first: Vec<u8>,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo> {
        let temp = pending.temp.clone();
        let part_err = |e| self.err("upload part of", &temp, e);
        let mut hasher = Hasher::new();
        let mut part = first;
        loop {
            let last = part.len() < PART_SIZE;
            if !part.is_empty() {
                hasher.update(&part);
                while pending.parts.len() >= MAX_PARTS_IN_FLIGHT {
                    pending.join_one().await.map_err(part_err)?;
                }
                let upload = pending.upload()?;
                let fut = upload.put_part(PutPayload::from(part));
                pending.parts.spawn(fut);
            }
            if last {
                break;
            }
            part = read_part(reader, PART_SIZE).await?;
        }
        while !pending.parts.is_empty() {
            pending.join_one().await.map_err(part_err)?;
        }
        pending
            .upload()?
            .complete()
            .await
            .map_err(|e| self.err("complete multipart upload", &temp, e))?;
        pending.upload = None;
        pending.temp_exists = true;

        let info = BlobInfo {
            size: hasher.len(),
            hash: hasher.finish(),
        };
        let key = self.path_of(&info.hash);
        if self.exists(&key).await?.is_some() && self.touch(&info.hash).await.is_ok() {
            return Ok(info);
        }
        self.store
            .copy(&temp, &key)
            .await
            .map_err(|e| self.err("copy into place", &key, e))?;
        Ok(info)
    }

    fn reader(&self, key: &Path, result: object_store::GetResult) -> BlobReader {
        let url = self.url(key);
        let stream = result.into_stream().map_err(move |e| {
            std::io::Error::other(Error::ObjectStore {
                op: "read",
                location: url.clone(),
                source: e,
            })
        });
        Box::pin(StreamReader::new(stream))
    }
}

/// Reads up to `limit` bytes (fewer only at the end of the input).
async fn read_part(reader: &mut (dyn AsyncRead + Send + Unpin), limit: usize) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(limit.min(PART_SIZE));
    (&mut *reader)
        .take(limit as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| Error::Stream {
            what: "read blob input".into(),
            source: e,
        })?;
    Ok(buf)
}

/// What an unfinished large `put` has left on the server: cleaned up by
/// [`Pending::cleanup`], or from a background task if the `put` is dropped.
struct Pending {
    store: Arc<dyn ObjectStore>,
    temp: Path,
    /// The multipart upload, until it completes.
    upload: Option<Box<dyn MultipartUpload>>,
    /// Parts being uploaded (aborted when dropped).
    parts: JoinSet<object_store::Result<()>>,
    /// Whether the completed temporary object exists.
    temp_exists: bool,
}

impl Pending {
    fn upload(&mut self) -> Result<&mut Box<dyn MultipartUpload>> {
        self.upload
            .as_mut()
            .ok_or_else(|| Error::Task("multipart upload already finished".into()))
    }

    /// Waits for one part upload to finish.
    async fn join_one(&mut self) -> Result<(), object_store::Error> {
        match self.parts.join_next().await {
            Some(Ok(r)) => r,
            Some(Err(e)) => Err(object_store::Error::JoinError { source: e }),
            None => Ok(()),
        }
    }

    /// Aborts the upload if it did not complete and deletes the temporary object if it
    /// exists. Failures are logged, not returned: nothing here is ever visible.
    async fn cleanup(&mut self) {
        self.parts.abort_all();
        let (upload, temp_exists) = (self.upload.take(), std::mem::take(&mut self.temp_exists));
        clean(self.store.clone(), self.temp.clone(), upload, temp_exists).await;
    }
}

async fn clean(
    store: Arc<dyn ObjectStore>,
    temp: Path,
    upload: Option<Box<dyn MultipartUpload>>,
    temp_exists: bool,
) {
    if let Some(mut upload) = upload {
        if let Err(e) = upload.abort().await {
            tracing::warn!("abort multipart upload of {temp}: {e}");
        }
    }
    if temp_exists {
        if let Err(e) = store.delete(&temp).await {
            tracing::warn!("delete temporary object {temp}: {e}");
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let upload = self.upload.take();
        let temp_exists = std::mem::take(&mut self.temp_exists);
        if upload.is_none() && !temp_exists {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(clean(
                self.store.clone(),
                self.temp.clone(),
                upload,
                temp_exists,
            ));
        }
    }
}

#[async_trait]
impl BlobStore for S3Store {
    async fn put(&self, reader: &mut (dyn AsyncRead + Send + Unpin)) -> Result<BlobInfo> {
        let first = read_part(reader, PART_SIZE).await?;
        if first.len() < PART_SIZE {
            return self.put_small(first).await;
        }
        self.put_large(first, reader).await
    }

    async fn get(&self, hash: &Hash) -> Result<BlobReader> {
        let key = self.path_of(hash);
        let result = match self.store.get_opts(&key, GetOptions::default()).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::BlobNotFound(*hash)),
            Err(e) => return Err(self.err("get", &key, e)),
        };
        Ok(Box::pin(verifying(self.reader(&key, result), *hash)))
    }

    async fn get_range(&self, hash: &Hash, range: std::ops::Range<u64>) -> Result<BlobReader> {
        let key = self.path_of(hash);
        let Some(size) = self.exists(&key).await? else {
            return Err(Error::BlobNotFound(*hash));
        };
        let end = range.end.min(size);
        let start = range.start.min(end);
        if start == end {
            return Ok(Box::pin(tokio::io::empty()));
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..end)),
            ..GetOptions::default()
        };
        match self.store.get_opts(&key, options).await {
            Ok(r) => Ok(self.reader(&key, r)),
            Err(object_store::Error::NotFound { .. }) => Err(Error::BlobNotFound(*hash)),
            Err(e) => Err(self.err("get range of", &key, e)),
        }
    }

    async fn size(&self, hash: &Hash) -> Result<u64> {
        self.exists(&self.path_of(hash))
            .await?
            .ok_or(Error::BlobNotFound(*hash))
    }

    async fn contains(&self, hash: &Hash) -> Result<bool> {
        Ok(self.exists(&self.path_of(hash)).await?.is_some())
    }

    async fn delete(&self, hash: &Hash) -> Result<bool> {
        let key = self.path_of(hash);
        if self.exists(&key).await?.is_none() {
            return Ok(false);
        }
        match self.store.delete(&key).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("delete", &key, e)),
        }
    }

    fn list(&self) -> BoxStream<'static, Result<BlobEntry>> {
        let depth = self.prefix.len();
        let prefix: Path = self.prefix.iter().cloned().collect();
        let bucket = self.bucket.clone();
        let listing = if depth == 0 {
            self.store.list(None)
        } else {
            self.store.list(Some(&prefix))
        };
        Box::pin(listing.filter_map(move |item| {
            let out = match item {
                Ok(meta) => blob_entry(&meta, depth).map(Ok),
                Err(e) => Some(Err(Error::ObjectStore {
                    op: "list",
                    location: format!("s3://{bucket}/{prefix}"),
                    source: e,
                })),
            };
            std::future::ready(out)
        }))
    }

    async fn touch(&self, hash: &Hash) -> Result<()> {
        let key = self.path_of(hash);
        match self.toucher.copy(&key, &key).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::BlobNotFound(*hash)),
            Err(e) => Err(self.err("touch (copy onto itself)", &key, e)),
        }
    }

    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix.join("/"))
        }
    }
}

/// The blob an object of the listing is, if its key is `<prefix>/<2 hex>/<hash>` with
/// the hash starting with those 2 hex digits (anything else, like `tmp/`, is skipped).
fn blob_entry(meta: &object_store::ObjectMeta, depth: usize) -> Option<BlobEntry> {
    let parts: Vec<_> = meta.location.parts().collect();
    if parts.len() != depth + 2 {
        return None;
    }
    let (fan, name) = (parts[depth].as_ref(), parts[depth + 1].as_ref());
    let hash: Hash = name.parse().ok()?;
    if fan.len() != 2 || !name.starts_with(fan) {
        return None;
    }
    Some(BlobEntry {
        hash,
        size: meta.size,
        modified: Some(std::time::SystemTime::from(meta.last_modified)),
    })
}
