//! What a worker needs of the queue and the blob store, as one trait: [`WorkerPort`].
//!
//! [`LocalPort`] is the queue and blob store themselves (the worker's process opens
//! the database); `remote::RemotePort` (feature `remote`) makes the same calls over
//! HTTP to `batchdb serve`, whose worker endpoints answer each of them with a
//! [`LocalPort`]. The worker's rules (leases, fencing, retries, the cache) are the
//! queue's either way: a port only carries the calls.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncRead;

use super::live::Mirrors;
use crate::blob::{BlobInfo, BlobStore};
use crate::error::Result;
use crate::hash::Hash;
use crate::queue::{
    AttemptEnd, Claim, ClaimRequest, ClaimToken, Counts, DependencyResult, Finished, Heartbeat,
    Outcome, Queue, Resources,
};
use crate::runner::Reader;

/// One of a job's two output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputStream {
    /// Standard output (the result).
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputStream {
    /// `stdout` or `stderr`.
    pub fn name(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    /// The stream called `name` (`stdout` or `stderr`).
    pub fn parse(name: &str) -> Option<OutputStream> {
        match name {
            "stdout" => Some(OutputStream::Stdout),
            "stderr" => Some(OutputStream::Stderr),
            _ => None,
        }
    }
}

/// Where a running attempt's output is mirrored as it is written, for live readers
/// (`logs -f`, the dashboard). A write error drops the mirror, never the job.
pub type LiveSink = Box<dyn std::io::Write + Send>;

/// Every call a [`Worker`](super::Worker) makes to the queue and the blob store.
///
/// Guarantees every port gives (the conformance suite runs the worker over the local
/// port; the remote port's process tests run it over HTTP):
/// - [`claim`](Self::claim), [`heartbeat`](Self::heartbeat), [`status`](Self::status)
///   and [`finish`](Self::finish) mean what the [`Queue`] methods of those names mean:
///   a stale attempt gets [`crate::Error::Fenced`] and records nothing.
/// - [`blob`](Self::blob) streams a payload or an output checked against its hash: a
///   corrupt one ends in an error, never in a clean end of stream.
/// - [`put_output`](Self::put_output) returns only once the output is durable.
#[async_trait]
pub trait WorkerPort: Send + Sync + fmt::Debug {
    /// See [`Queue::claim`].
    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>>;

    /// See [`Queue::heartbeat`].
    async fn heartbeat(&self, t: &ClaimToken, lease: Duration) -> Result<Heartbeat>;

    /// See [`Queue::status`].
    async fn status(&self, t: &ClaimToken) -> Result<Heartbeat>;

    /// See [`Queue::finish`].
    async fn finish(&self, t: &ClaimToken, outcome: &Outcome) -> Result<Finished>;

    /// See [`Queue::finish_and_claim`]. The default finishes, then claims in a call of
    /// its own; a failure of that claim is logged and claims nothing (the worker's
    /// loop claims for the slot instead), so the outcome is never lost to it.
    async fn finish_and_claim(
        &self,
        t: &ClaimToken,
        outcome: &Outcome,
        next: &ClaimRequest,
    ) -> Result<(Finished, Vec<Claim>)> {
        finish_then_claim(self, t, outcome, next).await
    }

    /// What attempt `t` recorded, if it has ended (for a finish whose reply was lost:
    /// its retry is fenced, and this says whether the first try committed).
    async fn recorded(&self, t: &ClaimToken) -> Result<Option<Finished>>;

    /// Blob `hash` (a job's payload, an output), kept inline in the queue or in the
    /// blob store, streamed and checked against its hash.
    async fn blob(&self, hash: &Hash) -> Result<Reader>;

    /// How many instances are in each state (for `run`'s progress line).
    async fn counts(&self) -> Result<Counts>;

    /// See [`Queue::dependency_results`].
    async fn dependency_results(
        &self,
        id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DependencyResult>>;

    /// Stores an output of attempt `t` longer than [`crate::INLINE_MAX`] bytes,
    /// streamed to its end; returns once it is durable. A port may refuse an attempt
    /// that is no longer current ([`crate::Error::Fenced`]; the remote one does).
    async fn put_output(
        &self,
        t: &ClaimToken,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo>;

    /// Stores attempt `t`'s output `stream` (longer than [`crate::INLINE_MAX`] bytes),
    /// read from `reader` to its end, every byte of which has also gone to the sink
    /// [`live`](Self::live) gave for it; returns once it is durable. A port may keep
    /// that sink's file as the blob instead of writing the bytes again ([`LocalPort`]
    /// does when its blob store can keep local files); the default is
    /// [`put_output`](Self::put_output).
    async fn put_mirrored(
        &self,
        t: &ClaimToken,
        stream: OutputStream,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo> {
        let _ = stream;
        self.put_output(t, reader).await
    }

    /// Where attempt `t`'s `stream` is mirrored while it runs, if anywhere. Dropping
    /// the sink ends the mirror (its reader then sees the attempt's recorded output).
    fn live(&self, t: &ClaimToken, stream: OutputStream) -> Option<LiveSink>;

    /// Whether nothing is running and nothing is pending that a worker with
    /// `resources` could ever run (`run --until-empty` stops then).
    async fn idle(&self, resources: &Resources) -> Result<bool>;

    /// See [`Queue::worker_seen`].
    async fn worker_seen(&self, name: &str, resources: &Resources, ttl: Duration) -> Result<()>;

    /// See [`Queue::worker_gone`].
    async fn worker_gone(&self, name: &str) -> Result<()>;

    /// See [`Queue::change_seq`].
    fn change_seq(&self) -> u64;

    /// See [`Queue::wait_change`].
    async fn wait_change(&self, seen: u64, timeout: Duration);

    /// Where the worker's queue is, for messages.
    fn location(&self) -> String;
}

/// [`WorkerPort::finish_and_claim`] as two calls: the finish, then the claim; a
/// failure of the claim is logged and claims nothing.
pub(crate) async fn finish_then_claim<P: WorkerPort + ?Sized>(
    port: &P,
    t: &ClaimToken,
    outcome: &Outcome,
    next: &ClaimRequest,
) -> Result<(Finished, Vec<Claim>)> {
    let finished = port.finish(t, outcome).await?;
    let claims = port.claim(next).await.unwrap_or_else(|e| {
        tracing::debug!("claiming after instance {} failed: {e}", t.id);
        Vec::new()
    });
    Ok((finished, claims))
}

/// The port of a worker that opens the queue and the blob store itself; also what
/// `batchdb serve` answers remote workers' calls with.
#[derive(Debug, Clone)]
pub struct LocalPort {
    queue: Arc<dyn Queue>,
    blobs: Arc<dyn BlobStore>,
    live_dir: Option<PathBuf>,
    mirrors: Mirrors,
}

impl LocalPort {
    /// The port over `queue` and `blobs`, mirroring running jobs' output into files
    /// in `live_dir` (`<instance>.<attempt>.stdout` and `.stderr`), if given. An
    /// output's live file becomes its blob when `blobs` can keep it
    /// ([`BlobStore::adopt`]), so its bytes are written once.
    pub fn new(
        queue: Arc<dyn Queue>,
        blobs: Arc<dyn BlobStore>,
        live_dir: Option<PathBuf>,
    ) -> LocalPort {
        LocalPort {
            queue,
            blobs,
            live_dir,
            mirrors: Mirrors::default(),
        }
    }
}

impl LocalPort {
    /// The payload of `claim` if the queue keeps it inline: the bytes read with the
    /// claim, moved out of it and checked against its job key
    /// ([`crate::Error::BlobCorrupt`] if they differ), with no read of their own;
    /// `None` if it is in the blob store.
    pub fn claim_payload(&self, claim: &mut Claim) -> Result<Option<Vec<u8>>> {
        claim
            .payload
            .take()
            .map(|bytes| crate::checked(&claim.job, bytes))
            .transpose()
    }
}

#[async_trait]
impl WorkerPort for LocalPort {
    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>> {
        self.queue.claim(req).await
    }

    async fn heartbeat(&self, t: &ClaimToken, lease: Duration) -> Result<Heartbeat> {
        self.queue.heartbeat(t, lease).await
    }

    async fn status(&self, t: &ClaimToken) -> Result<Heartbeat> {
        self.queue.status(t).await
    }

    async fn finish(&self, t: &ClaimToken, outcome: &Outcome) -> Result<Finished> {
        self.queue.finish(t, outcome).await
    }

    async fn finish_and_claim(
        &self,
        t: &ClaimToken,
        outcome: &Outcome,
        next: &ClaimRequest,
    ) -> Result<(Finished, Vec<Claim>)> {
        self.queue.finish_and_claim(t, outcome, next).await
    }

    async fn recorded(&self, t: &ClaimToken) -> Result<Option<Finished>> {
        let detail = self.queue.instance(t.id).await?;
        let Some(attempt) = detail.attempts.iter().find(|a| a.attempt == t.token) else {
            return Ok(None);
        };
        let latest = detail.attempts.last().map(|a| a.attempt) == Some(t.token);
        let end = attempt.outcome.as_deref().and_then(AttemptEnd::parse);
        Ok(match end {
            Some(AttemptEnd::Result) => Some(Finished::Result),
            Some(AttemptEnd::Fail) => Some(Finished::Fail),
            Some(AttemptEnd::Cancelled) => Some(Finished::Cancelled),
            Some(AttemptEnd::Retry) if latest => Some(Finished::Retry(detail.run_at)),
            Some(AttemptEnd::Released) if latest => Some(Finished::Released),
            _ => None,
        })
    }

    async fn blob(&self, hash: &Hash) -> Result<Reader> {
        if let Some(bytes) = crate::checked_inline(self.queue.as_ref(), hash).await? {
            return Ok(Box::pin(std::io::Cursor::new(bytes)));
        }
        self.blobs.get(hash).await
    }

    async fn counts(&self) -> Result<Counts> {
        self.queue.counts().await
    }

    async fn dependency_results(
        &self,
        id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DependencyResult>> {
        self.queue.dependency_results(id, after, limit).await
    }

    async fn put_output(
        &self,
        _t: &ClaimToken,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo> {
        self.blobs.put(reader).await
    }

    async fn put_mirrored(
        &self,
        t: &ClaimToken,
        stream: OutputStream,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo> {
        match self
            .mirrors
            .store(self.blobs.as_ref(), t, stream, reader)
            .await
        {
            Some(stored) => stored,
            None => self.blobs.put(reader).await,
        }
    }

    fn live(&self, t: &ClaimToken, stream: OutputStream) -> Option<LiveSink> {
        let dir = self.live_dir.as_ref()?;
        Some(Box::new(self.mirrors.create(dir, t, stream)))
    }

    async fn idle(&self, resources: &Resources) -> Result<bool> {
        let c = self.queue.counts().await?;
        if c.running > 0 || c.pending == 0 {
            return Ok(c.pending == 0 && c.running == 0);
        }
        let unfit = self.queue.unrunnable(Some(resources)).await?;
        Ok(c.pending == unfit)
    }

    async fn worker_seen(&self, name: &str, resources: &Resources, ttl: Duration) -> Result<()> {
        self.queue.worker_seen(name, resources, ttl).await
    }

    async fn worker_gone(&self, name: &str) -> Result<()> {
        self.queue.worker_gone(name).await
    }

    fn change_seq(&self) -> u64 {
        self.queue.change_seq()
    }

    async fn wait_change(&self, seen: u64, timeout: Duration) {
        self.queue.wait_change(seen, timeout).await;
    }

    fn location(&self) -> String {
        self.queue.location()
    }
}
