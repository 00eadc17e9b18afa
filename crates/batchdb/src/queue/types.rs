//! The rows, requests and outcomes the [`Queue`](super::Queue) trait speaks in.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::blob::BlobInfo;
use crate::error::Error;
use crate::hash::Hash;

/// Milliseconds since the Unix epoch, the time unit of every row.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, millis)
}

/// A duration in whole milliseconds, the time unit of every row (saturating).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Options of one push.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PushOptions {
    /// Higher runs first; default 0.
    pub priority: i64,
    /// Not before this time (epoch ms); `None` means now.
    pub run_at: Option<i64>,
    /// Kill the attempt after this long; `None` leaves it to the worker's default.
    pub timeout: Option<Duration>,
    /// Automatic retries after a failed attempt; `None` leaves it to the worker's default.
    pub retries: Option<u32>,
    /// Serve the result from the result cache when possible.
    pub cached: bool,
    /// The batch the instance joins (created on first use); see
    /// [`check_batch_name`](super::check_batch_name).
    pub batch: Option<String>,
    /// What the instance waits for before it can run: it stays `waiting` (never
    /// claimed) until each dependency is met.
    pub after: Vec<super::Dependency>,
    /// Where and with what it runs: working directory, environment, limits.
    pub context: super::ExecContext,
    /// What it needs from the worker that runs it (`gpu=2`, `mem=8G`).
    pub needs: super::Needs,
    /// Its concurrency key: at most that many instances carrying it run at once.
    pub concurrency: Option<super::Concurrency>,
}

/// A job to record: its payload's hash and size and, for a small payload kept in the
/// queue itself rather than in the blob store, the payload's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// The payload's hash (the job key) and size.
    pub info: BlobInfo,
    /// The payload itself when it lives inline in the queue (`None`: it is in the blob
    /// store, durable before the job's row commits). Must hash to `info.hash`.
    pub inline: Option<Vec<u8>>,
}

impl NewJob {
    /// A job whose payload is already durable in the blob store.
    pub fn stored(info: BlobInfo) -> NewJob {
        NewJob { info, inline: None }
    }

    /// A job whose (small) payload lives inline in the queue.
    pub fn inline(data: Vec<u8>) -> NewJob {
        NewJob {
            info: BlobInfo {
                hash: Hash::of(&data),
                size: data.len() as u64,
            },
            inline: Some(data),
        }
    }
}

/// One instance of a job on the queue, identified by `id` and by `(job, created)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Instance {
    /// Unique integer id, increasing in push order.
    pub id: i64,
    /// The job's key.
    pub job: Hash,
    /// Push time in epoch ms, unique among all instances (a push landing in a
    /// millisecond already taken gets the next free one).
    pub created: i64,
}

/// Which end of the pending queue a worker takes first (within one priority).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// Most recently pushed first, as the seed documents.
    #[default]
    Newest,
    /// First pushed first.
    Oldest,
}

impl FromStr for Order {
    type Err = Error;
    fn from_str(s: &str) -> Result<Order, Error> {
        match s {
            "newest" => Ok(Order::Newest),
            "oldest" => Ok(Order::Oldest),
            _ => Err(Error::Config {
                what: "order",
                value: s.into(),
                why: "expected newest or oldest".into(),
            }),
        }
    }
}

/// A worker's request for work.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ClaimRequest {
    /// Who claims (shown in attempts; any unique string).
    pub worker: String,
    /// At most this many instances.
    pub limit: usize,
    /// Lease length of each claim.
    pub lease: Duration,
    /// Order within a priority.
    pub order: Order,
    /// The runner spec and timeout that make up the cache key of cached instances
    /// (see [`cache_key`]); `None` disables the cache for this claim.
    pub cache: Option<CacheSpec>,
    /// Treat every instance as `cached`, not only those pushed with `cached`.
    pub cache_all: bool,
    /// What the worker has in all (`run --resource`): an instance whose needs could
    /// never fit here is skipped, and one that could may reserve what it needs once
    /// it has waited [`reserve_after`](Self::reserve_after).
    pub resources: super::Resources,
    /// What the worker has free now: an instance is claimed only if its needs fit,
    /// and the claim gives it units out of this.
    pub free: super::Resources,
    /// How long an instance whose needs do not fit may wait before smaller ones stop
    /// being claimed around it (they may not take what it needs).
    pub reserve_after: Duration,
}

impl ClaimRequest {
    /// A request by `worker` for up to `limit` instances, each leased for `lease`:
    /// newest first within a priority, without the result cache.
    pub fn new(worker: impl Into<String>, limit: usize, lease: Duration) -> Self {
        ClaimRequest {
            worker: worker.into(),
            limit,
            lease,
            order: Order::Newest,
            cache: None,
            cache_all: false,
            resources: super::Resources::default(),
            free: super::Resources::default(),
            reserve_after: RESERVE_AFTER,
        }
    }
}

/// How long, by default, an instance whose needs do not fit may wait before it
/// reserves what it needs (see [`ClaimRequest::reserve_after`]).
pub const RESERVE_AFTER: Duration = Duration::from_secs(60);

/// What, besides the payload, decides a job's outcome for the result cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CacheSpec {
    /// The runner's command line (or a library runner's name).
    pub runner: String,
    /// The worker's default timeout, used when the instance has none.
    pub default_timeout: Option<Duration>,
}

impl CacheSpec {
    /// The cache spec of `runner` with the worker's `default_timeout`.
    pub fn new(runner: impl Into<String>, default_timeout: Option<Duration>) -> Self {
        CacheSpec {
            runner: runner.into(),
            default_timeout,
        }
    }
}

/// The cache key of a job run by a runner with a timeout:
/// sha256 of `"batchdb-cache-v1\0" job-hex "\0" runner "\0" timeout-ms-or-"none"`,
/// followed by `"\0" inputs-hex` for an instance with dependencies (`inputs`: the
/// sha256 of its `BATCHDB_DEPS` file, its dependencies' results in order), so a
/// cached result is reused only when every input is byte-identical; and by
/// `"\0context\0" json` for an instance with a working directory or environment of its
/// own (`{"cwd":...,"env":{...}}`, keys sorted; limits are not part of it).
pub fn cache_key(
    job: &Hash,
    runner: &str,
    timeout: Option<Duration>,
    inputs: Option<&Hash>,
    context: &super::ExecContext,
) -> Hash {
    let t = timeout.map_or_else(|| "none".to_string(), |d| d.as_millis().to_string());
    let mut key = format!("batchdb-cache-v1\0{job}\0{runner}\0{t}");
    if let Some(i) = inputs {
        key = format!("{key}\0{i}");
    }
    if let Some(c) = context.cache_text() {
        key = format!("{key}\0context\0{c}");
    }
    Hash::of(key.as_bytes())
}

/// Names one attempt: the instance id and its fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimToken {
    /// The instance id.
    pub id: i64,
    /// The attempt number, which is the fencing token: it grows with every claim of
    /// the instance, so a stale worker's token never matches again.
    pub token: i64,
}

/// An instance handed to a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Claim {
    /// The attempt's id and fencing token.
    pub token: ClaimToken,
    /// The job to run.
    pub job: Hash,
    /// The instance's push time.
    pub created: i64,
    /// When this attempt started (epoch ms).
    pub start: i64,
    /// Failed attempts so far.
    pub failures: u32,
    /// The instance's own timeout, if it has one.
    pub timeout: Option<Duration>,
    /// The instance's own retry budget, if it has one.
    pub retries: Option<u32>,
    /// How many instances it depended on (their results are listed by
    /// [`Queue::dependency_results`](super::Queue::dependency_results)).
    pub deps: u64,
    /// This attempt's random id (128 bits, hex), kept in its row: unique to this
    /// attempt of this job, whatever the worker's name or the database, so what a
    /// worker does to stop the attempt's processes is aimed by it.
    pub attempt_id: String,
    /// Whether an earlier attempt's lease expired (its worker died) and this claim
    /// took the instance over.
    pub takeover: bool,
    /// For a takeover: the attempt that was lost.
    pub lost: Option<LostAttempt>,
    /// If the result cache already held a result, the instance was finished from it
    /// inside the claim and nothing must run: this is that result.
    pub cache_hit: Option<AttemptReport>,
    /// Where and with what it runs.
    pub context: super::ExecContext,
    /// What it needs from the worker.
    pub needs: super::Needs,
    /// What the claim gave it out of [`ClaimRequest::free`] (give it back when the
    /// attempt ends).
    pub assigned: super::Resources,
    /// The job's payload as the queue keeps it inline (up to [`crate::INLINE_MAX`]
    /// bytes), read with the claim so that it costs no read of its own; not yet
    /// checked against [`Claim::job`]. `None`: the payload is in the blob store (and
    /// a claim sent over HTTP never carries it).
    #[serde(skip)]
    pub payload: Option<Vec<u8>>,
}

/// An attempt whose worker stopped renewing its lease, as the claim that took its
/// instance over found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LostAttempt {
    /// The instance id.
    pub instance: i64,
    /// The lost attempt's number.
    pub attempt: i64,
    /// The worker that ran it.
    pub worker: String,
    /// Its random id; `None` for an attempt recorded by a release without them.
    pub attempt_id: Option<String>,
}

impl LostAttempt {
    /// The lost attempt `attempt` of `instance`, run by `worker`.
    pub fn new(instance: i64, attempt: i64, worker: String, attempt_id: Option<String>) -> Self {
        LostAttempt {
            instance,
            attempt,
            worker,
            attempt_id,
        }
    }
}

/// What a heartbeat learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Heartbeat {
    /// Someone asked to cancel this instance: kill it and finish it as cancelled.
    pub cancel_requested: bool,
}

/// What one attempt produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AttemptReport {
    /// Start time (epoch ms).
    pub start: i64,
    /// End time (epoch ms).
    pub end: i64,
    /// The runner's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the runner, if one did.
    pub signal: Option<i32>,
    /// The stdout blob, if any output was stored.
    pub stdout: Option<BlobInfo>,
    /// The stderr blob, if any was stored.
    pub stderr: Option<BlobInfo>,
    /// Why it failed (or how it ended), for humans.
    pub message: Option<String>,
    /// Whether this result was served from the result cache.
    pub cached: bool,
    /// What the attempt used (peak memory, CPU), where the runner measured it;
    /// serialized as its fields (`max_rss`, `cpu_ms`, `user_ms`, `sys_ms`) beside
    /// the others.
    #[serde(flatten)]
    pub usage: Option<super::Usage>,
    /// The cache key this attempt fills on success.
    pub cache_key: Option<Hash>,
    /// Outputs small enough to keep in the queue (at most [`crate::INLINE_MAX`] bytes
    /// each) instead of the blob store: recorded, keyed by their hash, in the same
    /// transaction as the attempt row that names them (no blob file, no fsync of
    /// their own).
    #[serde(skip)]
    pub(crate) inline: Vec<Vec<u8>>,
}

impl AttemptReport {
    /// Keeps output `data` (at most [`crate::INLINE_MAX`] bytes) in the queue, keyed
    /// by its hash, recorded with the attempt by [`Queue::finish`](super::Queue::finish).
    /// The same bytes kept twice (a stdout and a stderr both empty, say) are recorded
    /// once.
    pub fn keep_inline(&mut self, data: Vec<u8>) {
        if !self.inline.contains(&data) {
            self.inline.push(data);
        }
    }

    /// The outputs to keep in the queue (see [`keep_inline`](Self::keep_inline)): a
    /// backend's `finish` records each under its hash.
    pub fn inline_outputs(&self) -> &[Vec<u8>] {
        &self.inline
    }
}

/// How an attempt ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The run succeeded: the instance becomes a result.
    Success(AttemptReport),
    /// The run failed: retried at `retry_at` (epoch ms) if given, else a fail row.
    Failure {
        /// What the attempt produced.
        report: AttemptReport,
        /// When to try again, if retries are left.
        retry_at: Option<i64>,
    },
    /// The run was cancelled on request.
    Cancelled(AttemptReport),
    /// The worker gave the instance back unfinished (forced shutdown): it is pending
    /// again at once and the attempt does not count as a failure.
    Released(AttemptReport),
}

/// What [`Queue::finish`](super::Queue::finish) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finished {
    /// A result row now exists.
    Result,
    /// A fail row now exists.
    Fail,
    /// The instance is pending again, due at this time (epoch ms).
    Retry(i64),
    /// The instance ended as cancelled.
    Cancelled,
    /// The instance is pending again.
    Released,
}

/// The state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Waiting for its dependencies; never claimed until they are met.
    Waiting,
    /// Waiting to be claimed.
    Pending,
    /// Claimed by a worker holding a lease.
    Running,
    /// Ended well.
    Result,
    /// Ended badly, retries exhausted.
    Fail,
    /// Cancelled on request.
    Cancelled,
}

impl State {
    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Pending => "pending",
            State::Running => "running",
            State::Result => "result",
            State::Fail => "fail",
            State::Cancelled => "cancelled",
        }
    }
}

impl FromStr for State {
    type Err = Error;
    fn from_str(s: &str) -> Result<State, Error> {
        Ok(match s {
            "waiting" => State::Waiting,
            "pending" => State::Pending,
            "running" => State::Running,
            "result" => State::Result,
            "fail" => State::Fail,
            "cancelled" => State::Cancelled,
            _ => {
                return Err(Error::Config {
                    what: "state",
                    value: s.into(),
                    why: "unknown instance state".into(),
                });
            }
        })
    }
}

/// Names a set of instances, as the CLI's `<created|jobkey|resultid>` arguments do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The instance with this id.
    Id(i64),
    /// The instance pushed at this `created` time.
    Created(i64),
    /// The instances of this job, or the instances whose result has this id.
    Hash(Hash),
    /// Every failed instance.
    AllFailed,
    /// Every instance of the batch with this name.
    Batch(String),
}

impl FromStr for Selector {
    type Err = Error;
    /// `id:N` is an instance id, `batch:NAME` a batch, digits are a `created` time,
    /// 64 hex is a job key or result id.
    fn from_str(s: &str) -> Result<Selector, Error> {
        if let Some(name) = s.strip_prefix("batch:") {
            super::check_batch_name(name)?;
            return Ok(Selector::Batch(name.into()));
        }
        if let Some(id) = s.strip_prefix("id:") {
            return id.parse().map(Selector::Id).map_err(|_| Error::Config {
                what: "instance id",
                value: s.into(),
                why: "expected id:<integer>".into(),
            });
        }
        if !s.is_empty() && s.len() < 20 && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse().map(Selector::Created).map_err(|_| Error::Config {
                what: "created time",
                value: s.into(),
                why: "out of range".into(),
            });
        }
        s.parse().map(Selector::Hash)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Id(id) => write!(f, "id:{id}"),
            Selector::Created(c) => write!(f, "created {c}"),
            Selector::Hash(h) => write!(f, "{h}"),
            Selector::AllFailed => f.write_str("all failed instances"),
            Selector::Batch(name) => write!(f, "batch:{name}"),
        }
    }
}

/// How many instances are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Counts {
    /// Pending (including delayed and retry-waiting).
    pub pending: u64,
    /// Waiting for dependencies.
    pub waiting: u64,
    /// Running.
    pub running: u64,
    /// Results.
    pub result: u64,
    /// Failures.
    pub fail: u64,
    /// Cancelled.
    pub cancelled: u64,
    /// Of the pending, how many need more than any live worker has in all (they
    /// wait for a worker that has it); filled by [`crate::BatchDb::counts`], shown
    /// only when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unrunnable: u64,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's signature
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Counts {
    /// The count of instances in `state`, to set from a database's tally.
    pub(crate) fn slot(&mut self, state: State) -> &mut u64 {
        match state {
            State::Waiting => &mut self.waiting,
            State::Pending => &mut self.pending,
            State::Running => &mut self.running,
            State::Result => &mut self.result,
            State::Fail => &mut self.fail,
            State::Cancelled => &mut self.cancelled,
        }
    }
}

/// The kinds of events in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A new job was stored.
    Create,
    /// An instance was pushed.
    Push,
    /// An attempt started.
    Start,
    /// An instance ended with a result.
    Result,
    /// An instance ended as a failure.
    Fail,
    /// An instance was cancelled.
    Cancel,
    /// A failed attempt was sent back to pending, or a failed instance pushed again.
    Retry,
}

impl EventKind {
    /// The name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Push => "push",
            EventKind::Start => "start",
            EventKind::Result => "result",
            EventKind::Fail => "fail",
            EventKind::Cancel => "cancel",
            EventKind::Retry => "retry",
        }
    }
}

impl FromStr for EventKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<EventKind, Error> {
        Ok(match s {
            "create" => EventKind::Create,
            "push" => EventKind::Push,
            "start" => EventKind::Start,
            "result" => EventKind::Result,
            "fail" => EventKind::Fail,
            "cancel" => EventKind::Cancel,
            "retry" => EventKind::Retry,
            _ => {
                return Err(Error::Config {
                    what: "event kind",
                    value: s.into(),
                    why: "unknown event kind".into(),
                });
            }
        })
    }
}

/// One entry of the persisted event log.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Event {
    /// Log position; grows in commit order.
    pub id: i64,
    /// When it happened (epoch ms).
    pub time: i64,
    /// What happened.
    pub event: EventKind,
    /// The job it concerns.
    pub job: Hash,
    /// The instance's push time, for instance events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<i64>,
    /// The instance id, for instance events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<i64>,
    /// Details: the result id, a failure message, an attempt number...
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

/// A row's reference to a blob, as [`Queue::references_page`](super::Queue::references_page)
/// lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BlobReference {
    /// The blob named.
    pub hash: Hash,
    /// Who names it: `job <key>`, or `instance <id> attempt <n> stdout|stderr`.
    pub owner: String,
}

/// What [`Queue::check`](super::Queue::check) found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Check {
    /// Each problem, in words; empty when the database is sound.
    pub problems: Vec<String>,
    /// Payloads and outputs kept inline that were re-hashed.
    pub inline: u64,
    /// Their bytes.
    pub inline_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::AttemptReport;

    #[test]
    fn the_same_output_kept_twice_is_recorded_once() {
        let mut r = AttemptReport::default();
        r.keep_inline(Vec::new());
        r.keep_inline(b"out\n".to_vec());
        r.keep_inline(Vec::new());
        assert_eq!(r.inline_outputs(), [Vec::new(), b"out\n".to_vec()]);
    }
}
