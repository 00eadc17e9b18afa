//! Bulk adds (`add_many`, `add --lines`, `map`): payloads staged one at a time and
//! committed in chunks of at most [`BULK_CHUNK`] jobs or [`CHUNK_BYTES`] of inline
//! payloads, whichever comes first. While one chunk commits, the next is staged
//! (hashed, and streamed into the blob store when large): the two overlap, and at most
//! one commit is in flight, so chunks commit in order and memory stays bounded by two
//! chunks.
//!
//! A chunk is one transaction. Bigger chunks are cheaper per job — a job's key is a
//! hash, so its index entries land on random pages, and every commit writes each page
//! it touched once (10,000 jobs per transaction cost SQLite about twice the time per
//! job of 50,000) — but hold the database's write lock longer (about half a second for
//! [`BULK_CHUNK`] jobs on SQLite here).

use std::sync::Arc;

use tokio::io::AsyncRead;
use tokio::task::JoinHandle;

use crate::BatchDb;
use crate::error::{Error, Result};
use crate::queue::{Instance, NewJob, PushOptions};

/// Jobs per transaction of a bulk add, at most.
pub const BULK_CHUNK: usize = 50_000;

/// Inline payload bytes per transaction of a bulk add, at most.
pub const CHUNK_BYTES: usize = 16 << 20;

/// A bulk add in progress (see [`BatchDb::bulk`]): push payloads, then
/// [`finish`](Self::finish). Every instance is reported exactly once, in push order,
/// by the call during which its chunk's commit was found done. A failed commit is
/// reported by the next call that fills a chunk, or by `finish`, and then nothing
/// pushed after its chunk has committed (drop the `Bulk` after an error). Dropping a
/// `Bulk` lets a commit already in flight complete; the staged chunk is not added.
pub struct Bulk {
    db: BatchDb,
    opts: Arc<PushOptions>,
    chunk: Vec<NewJob>,
    bytes: usize,
    commit: Option<JoinHandle<Result<Vec<Instance>>>>,
}

impl BatchDb {
    /// Starts a bulk add: every instance it pushes gets `opts`.
    pub fn bulk(&self, opts: &PushOptions) -> Bulk {
        Bulk {
            db: self.clone(),
            opts: Arc::new(opts.clone()),
            chunk: Vec::new(),
            bytes: 0,
            commit: None,
        }
    }
}

impl Bulk {
    /// Stages one payload (kept inline up to [`crate::INLINE_MAX`] bytes, else
    /// streamed into the blob store and durable on return). Returns the instances of
    /// an earlier chunk whose commit has completed, if one has (often none).
    pub async fn push(&mut self, payload: impl AsyncRead + Send + Unpin) -> Result<Vec<Instance>> {
        let job = self.db.stage(payload).await?;
        self.push_staged(job).await
    }

    /// Adds a staged job to the chunk; a full chunk starts committing once the one
    /// before it has (whose instances are returned).
    pub(crate) async fn push_staged(&mut self, job: NewJob) -> Result<Vec<Instance>> {
        self.bytes += job.inline.as_ref().map_or(0, Vec::len);
        self.chunk.push(job);
        if self.chunk.len() < BULK_CHUNK && self.bytes < CHUNK_BYTES {
            return Ok(Vec::new());
        }
        let done = self.settle().await?;
        self.start_commit();
        // Let the commit task start its transaction now, even on a current-thread
        // runtime, where it would otherwise wait for this task to block.
        tokio::task::yield_now().await;
        Ok(done)
    }

    /// Commits what is staged and waits for every commit; returns the instances not
    /// reported yet.
    pub async fn finish(mut self) -> Result<Vec<Instance>> {
        let mut done = self.settle().await?;
        if !self.chunk.is_empty() {
            self.start_commit();
            done.extend(self.settle().await?);
        }
        Ok(done)
    }

    /// Commits the staged chunk in the background.
    fn start_commit(&mut self) {
        let chunk = std::mem::take(&mut self.chunk);
        self.bytes = 0;
        let (queue, opts) = (self.db.queue.clone(), self.opts.clone());
        self.commit = Some(tokio::spawn(
            async move { queue.add_many(&chunk, &opts).await },
        ));
    }

    /// Waits for the commit in flight, if any; its instances.
    async fn settle(&mut self) -> Result<Vec<Instance>> {
        match self.commit.take() {
            None => Ok(Vec::new()),
            Some(h) => h
                .await
                .map_err(|e| Error::Task(format!("bulk add commit: {e}")))?,
        }
    }
}
