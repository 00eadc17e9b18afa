//! The queue: job metadata, instance state, leases, fencing and the event log.
//!
//! Backends implement [`Queue`]; the SQLite backend ([`SqliteQueue`]) is the embedded
//! default. Every state transition is one transaction together with its event-log row,
//! so a crash never leaves a transition half done or an event missing.
//!
//! An instance moves `pending → running → result | fail | cancelled`. A failed
//! attempt with retries left goes back to `pending` with a later `run_at`. A running
//! instance whose lease expired (its worker died) is claimed again by any worker; the
//! new attempt gets a new fencing token and the old worker can no longer record
//! anything for it.

mod attempt_id;
mod batch;
mod changes;
mod context;
mod list;
mod migrations;
mod options;
pub(crate) mod policy;
#[cfg(feature = "postgres")]
mod postgres;
mod prune;
mod row;
mod sql;
mod sqlite;
mod types;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

pub use batch::*;
pub use context::*;
pub use list::*;
pub use migrations::SCHEMA_VERSION;
pub use options::{MAX_SECS, PushRequest, secs};
pub use policy::{AttemptEnd, MAX_LOST};
#[cfg(feature = "postgres")]
pub use postgres::{PG_SCHEMA_VERSION, PgQueue};
pub use prune::{PruneCounts, PruneRequest, PruneStep};
pub use sqlite::SqliteQueue;
pub use types::*;

use crate::blob::BlobInfo;
use crate::error::Result;
use crate::hash::Hash;

/// Metadata and queue state for batchdb, shared by any number of processes.
///
/// Guarantees every backend must give (held by the conformance suite):
/// - `create`, `push` and `add` are atomic; `add` writes both rows or neither.
/// - Instances are unique by `id` and by `created` (push time in epoch ms, moved to
///   the next free millisecond when taken), even when pushes land in the same
///   millisecond or come from several processes.
/// - [`claim`](Queue::claim) hands an instance to one worker at a time: an instance is
///   claimed again only once the lease of its current attempt has expired.
/// - [`heartbeat`](Queue::heartbeat) and [`finish`](Queue::finish) succeed only for
///   the current attempt (fencing token); a stale token gets [`crate::Error::Fenced`].
/// - Every transition appends its event to the log in the same transaction; event ids
///   increase in commit order.
#[async_trait]
pub trait Queue: Send + Sync + fmt::Debug {
    /// Records a job whose payload blob is already durable. Idempotent: returns
    /// whether the job was new. ([`create_many`](Queue::create_many) of one job.)
    async fn create(&self, job: &BlobInfo) -> Result<bool> {
        let new = self.create_many(&[NewJob::stored(*job)]).await?;
        Ok(new.first().copied().unwrap_or(false))
    }

    /// Puts an instance of an existing job on the pending queue;
    /// [`crate::Error::JobNotFound`] if the job was never created.
    async fn push(&self, job: &Hash, opts: &PushOptions) -> Result<Instance>;

    /// Creates the job (if new) and pushes an instance of it, in one transaction.
    /// ([`add_many`](Queue::add_many) of one job.)
    async fn add(&self, job: &BlobInfo, opts: &PushOptions) -> Result<Instance> {
        let mut added = self.add_many(&[NewJob::stored(*job)], opts).await?;
        added
            .pop()
            .ok_or_else(|| crate::Error::Task("add_many of one job added none".into()))
    }

    /// Records each job (if new; a payload given inline is kept in the queue) and
    /// returns, for each, whether it was new; all in one transaction.
    async fn create_many(&self, jobs: &[NewJob]) -> Result<Vec<bool>>;

    /// Records each job (if new) and pushes one instance of each, in order, all in one
    /// transaction: all are queued or none is.
    async fn add_many(&self, jobs: &[NewJob], opts: &PushOptions) -> Result<Vec<Instance>>;

    /// The bytes of blob `hash` if the queue keeps them inline: a small job payload or
    /// a small output recorded by [`Queue::finish`] (`None` if neither, e.g. the blob
    /// is in the blob store). Unverified: callers check them against the hash.
    async fn inline_blob(&self, hash: &Hash) -> Result<Option<Vec<u8>>>;

    /// Claims up to `req.limit` instances for `req.worker`: first running instances
    /// whose lease expired (their worker died), then due pending instances, highest
    /// priority first, then in `req.order`. Each claim starts a new attempt with its
    /// own fencing token and a lease of `req.lease`. Instances served from the result
    /// cache are finished inside the claim and returned too (with `cache_hit`), beyond
    /// `req.limit`. A taken-over instance whose worker was lost [`MAX_LOST`] times
    /// fails instead.
    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>>;

    /// Extends the lease of a running attempt by `lease` from now. Fails with
    /// [`crate::Error::Fenced`] if the attempt is no longer current. Reports whether
    /// cancellation of the instance was requested.
    async fn heartbeat(&self, claim: &ClaimToken, lease: Duration) -> Result<Heartbeat>;

    /// Reads, without writing, whether a running attempt is still current and whether
    /// its cancellation was requested; [`crate::Error::Fenced`] if it is not current.
    async fn status(&self, claim: &ClaimToken) -> Result<Heartbeat>;

    /// Ends the current attempt with `outcome`: a result, a failure (retried later if
    /// retries are left), a cancellation, or a release back to pending. If the
    /// instance's cancellation was requested, a retry or a release ends it as
    /// cancelled instead. Fails with [`crate::Error::Fenced`] if the attempt is no
    /// longer current.
    async fn finish(&self, claim: &ClaimToken, outcome: &Outcome) -> Result<Finished>;

    /// Ends the current attempt as [`finish`](Self::finish) does and then, in the same
    /// transaction (one commit, as durable as the finish), claims as
    /// [`claim`](Self::claim) does with `next`: a worker whose slot just freed takes
    /// its next instance without a transaction of its own. The claim sees the outcome
    /// (an instance it released from waiting may be among those claimed). Fails as
    /// `finish` fails, and then claims nothing.
    async fn finish_and_claim(
        &self,
        claim: &ClaimToken,
        outcome: &Outcome,
        next: &ClaimRequest,
    ) -> Result<(Finished, Vec<Claim>)>;

    /// Cancels the instances `sel` names: pending ones end as `cancelled` at once,
    /// running ones are flagged so their worker kills them at its next heartbeat.
    async fn cancel(&self, sel: &Selector) -> Result<Vec<Instance>>;

    /// Pushes a new instance for each failed or cancelled instance `sel` names that
    /// was not retried before (so retrying twice queues nothing twice), in its batch
    /// and with its dependencies. With `with_dependents`, also every instance that was
    /// cancelled because one of those failed (down the whole graph), waiting for the
    /// new instances instead of the old.
    async fn retry(&self, sel: &Selector, with_dependents: bool) -> Result<Vec<Instance>>;

    /// Up to `limit` rows of `kind` with a cursor greater than `after`, in cursor order;
    /// only the instances of batch `batch` (jobs with one in it), if given.
    async fn list_page(
        &self,
        kind: ListKind,
        (after, limit): (i64, usize),
        batch: Option<&str>,
    ) -> Result<Vec<ListRow>>;

    /// Up to `q.limit` instances that match `q`, newest (highest id) first, each with
    /// its last attempt's timing and exit; the last row's id is the next page's
    /// `before`.
    async fn recent_page(&self, q: &RecentQuery) -> Result<Vec<InstanceSummary>>;

    /// Up to `limit` batches with ids above `after` (only the one called `name`, if
    /// given), in id order, with their counts by state.
    async fn batches_page(
        &self,
        after: i64,
        limit: usize,
        name: Option<&str>,
    ) -> Result<Vec<BatchCounts>>;

    /// Up to `limit` results of instance `id`'s dependencies with instance ids above
    /// `after`, in id order (dependencies that did not end with a result are left out).
    async fn dependency_results(
        &self,
        id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DependencyResult>>;

    /// Everything known about one instance, its attempts included.
    async fn instance(&self, id: i64) -> Result<InstanceDetail>;

    /// The instances a selector names (ids, in push order).
    async fn select(&self, sel: &Selector) -> Result<Vec<i64>> {
        Ok(self
            .select_states(sel)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect())
    }

    /// The instances a selector names, in push order, with their states.
    async fn select_states(&self, sel: &Selector) -> Result<Vec<Selected>>;

    /// How many instances are in each state.
    async fn counts(&self) -> Result<Counts>;

    /// Records that worker `name` is alive and has `resources` in all, for `ttl`
    /// from now (a worker renews it while it runs).
    async fn worker_seen(&self, name: &str, resources: &Resources, ttl: Duration) -> Result<()>;

    /// Removes worker `name`'s entry (it stopped), and every entry that lapsed.
    async fn worker_gone(&self, name: &str) -> Result<()>;

    /// How many pending instances need more than any live worker has in all (they
    /// wait until a worker that has it starts); given `worker`, more than that worker
    /// has in all.
    async fn unrunnable(&self, worker: Option<&Resources>) -> Result<u64>;

    /// Runs one bounded step of a prune (one short write transaction; see
    /// [`PruneStep`]) and returns what it removed and the step after it (`None`: the
    /// prune is done). Start at [`PruneStep::START`].
    async fn prune_step(
        &self,
        req: &PruneRequest,
        step: PruneStep,
    ) -> Result<(PruneCounts, Option<PruneStep>)>;

    /// How many instances the first pass of `req` would remove (a dry run).
    async fn prune_count(&self, req: &PruneRequest) -> Result<u64>;

    /// Up to `limit` events with an id greater than `after`, in id order.
    async fn events(&self, after: i64, limit: usize) -> Result<Vec<Event>>;

    /// The id of the newest event in the log (0 if empty).
    async fn last_event_id(&self) -> Result<i64>;

    /// Checks the database's own consistency (SQLite: `PRAGMA integrity_check`) and
    /// that every payload and output kept inline hashes to its key; returns the
    /// problems found (none if it is sound) and how much inline data it re-hashed.
    async fn check(&self) -> Result<Check>;

    /// Whether any row names blob `hash` of the blob store (as a job's payload kept in
    /// the store, or an attempt's output).
    async fn is_referenced(&self, hash: &Hash) -> Result<bool>;

    /// The blob-store references (inline payloads are not) of the jobs and instances
    /// whose ids are in
    /// `(after, after + span]`, and the next `after` to ask for (`None` when no job or
    /// instance has a greater id).
    async fn references_page(
        &self,
        after: i64,
        span: i64,
    ) -> Result<(Vec<BlobReference>, Option<i64>)>;

    /// A counter that grows whenever the queue may have changed, in this process or in
    /// any other. Read it before a query, then pass it to
    /// [`wait_change`](Queue::wait_change) to sleep until something new happens.
    fn change_seq(&self) -> u64;

    /// Waits until [`change_seq`](Queue::change_seq) moves past `seen` or `timeout`
    /// passes, whichever is first, without busy-waiting.
    async fn wait_change(&self, seen: u64, timeout: Duration);

    /// Where the queue lives (a path or URL), for messages.
    fn location(&self) -> String;
}
