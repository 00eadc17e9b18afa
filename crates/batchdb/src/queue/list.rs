//! The rows of lists and of one instance's detail, as the [`Queue`](super::Queue)
//! returns them and `list`/`show` print them.

use std::str::FromStr;

use serde::Serialize;

use super::types::{AttemptReport, State};
use crate::error::Error;
use crate::hash::Hash;

/// The kinds of rows `list` streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// Jobs: `{"key","running":[created...]}`.
    Job,
    /// Pending and running instances: `{"job","created","running"}`.
    Pending,
    /// Results: `{"key":[job,created],"value":{"hash","start","end","created",...}}`.
    Result,
    /// Failures: `{"key":[job,created],"value":{"message",...}}`.
    Fail,
    /// Cancelled instances, shaped like failures.
    Cancelled,
}

impl FromStr for ListKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<ListKind, Error> {
        Ok(match s {
            "job" => ListKind::Job,
            "pending" => ListKind::Pending,
            "result" => ListKind::Result,
            "fail" => ListKind::Fail,
            "cancelled" => ListKind::Cancelled,
            _ => {
                return Err(Error::Config {
                    what: "list type",
                    value: s.into(),
                    why: "expected job, pending, result, fail or cancelled".into(),
                });
            }
        })
    }
}

/// A `job` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct JobRow {
    /// The job key.
    pub key: Hash,
    /// `created` of each running instance.
    pub running: Vec<i64>,
    /// When the job was first created (epoch ms).
    pub created: i64,
    /// Payload size in bytes.
    pub size: u64,
    /// Paging cursor.
    #[serde(skip)]
    pub cursor: i64,
}

/// A `pending` row (pending or running instance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingRow {
    /// The job key.
    pub job: Hash,
    /// Push time.
    pub created: i64,
    /// Whether a worker is running it now.
    pub running: bool,
    /// Whether it waits for dependencies (shown only when it does).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waiting: bool,
    /// Instance id.
    pub id: i64,
    /// Priority.
    pub priority: i64,
    /// Not before (epoch ms).
    pub run_at: i64,
    /// Attempts started so far.
    pub attempts: i64,
}

/// The value of a `result` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ResultValue {
    /// The result id: sha256 of stdout.
    pub hash: Hash,
    /// Run start (epoch ms).
    pub start: i64,
    /// Run end (epoch ms).
    pub end: i64,
    /// The instance's push time.
    pub created: i64,
    /// Instance id.
    pub id: i64,
    /// Stdout size in bytes.
    pub size: u64,
    /// The stderr blob.
    pub stderr: Option<Hash>,
    /// The runner's exit code.
    pub exit_code: Option<i32>,
    /// Attempts it took.
    pub attempts: i64,
    /// Served from the result cache.
    pub cached: bool,
    /// Peak memory of the attempt in bytes, where it was measured (see
    /// [`Usage`](super::Usage)); `null` for a result served from the cache.
    pub max_rss: Option<u64>,
    /// User plus system CPU time of the attempt in ms, where it was measured.
    pub cpu_ms: Option<u64>,
}

/// A `result` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ResultRow {
    /// `[job, created]`.
    pub key: (Hash, i64),
    /// The result.
    pub value: ResultValue,
}

/// The value of a `fail` (or `cancelled`) row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FailValue {
    /// What went wrong.
    pub message: String,
    /// Last attempt start (epoch ms).
    pub start: Option<i64>,
    /// Last attempt end (epoch ms).
    pub end: Option<i64>,
    /// The instance's push time.
    pub created: i64,
    /// Instance id.
    pub id: i64,
    /// The output produced before it failed.
    pub stdout: Option<Hash>,
    /// The error output.
    pub stderr: Option<Hash>,
    /// The runner's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if any.
    pub signal: Option<i32>,
    /// Attempts made.
    pub attempts: i64,
    /// Peak memory of the last attempt in bytes, where it was measured (`null` if
    /// none ran, or it could not start).
    pub max_rss: Option<u64>,
    /// User plus system CPU time of the last attempt in ms, where it was measured.
    pub cpu_ms: Option<u64>,
}

/// A `fail` or `cancelled` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FailRow {
    /// `[job, created]`.
    pub key: (Hash, i64),
    /// The failure.
    pub value: FailValue,
}

/// One row of any list kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ListRow {
    /// A job.
    Job(JobRow),
    /// A pending or running instance.
    Pending(PendingRow),
    /// A result.
    Result(ResultRow),
    /// A failure or cancellation.
    Fail(FailRow),
}

impl ListRow {
    /// The paging cursor: pass the last row's to the next
    /// [`list_page`](super::Queue::list_page) call.
    pub fn cursor(&self) -> i64 {
        match self {
            ListRow::Job(r) => r.cursor,
            ListRow::Pending(r) => r.id,
            ListRow::Result(r) => r.value.id,
            ListRow::Fail(r) => r.value.id,
        }
    }
}

/// One attempt of an instance, as `show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct AttemptRow {
    /// Attempt number (= fencing token).
    pub attempt: i64,
    /// The worker that ran it.
    pub worker: String,
    /// How it ended: `result`, `fail`, `retry`, `cancelled`, `released`, `lost`, or
    /// `None` while it runs.
    pub outcome: Option<String>,
    /// What it produced.
    #[serde(flatten)]
    pub report: AttemptReport,
}

/// Everything about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstanceDetail {
    /// Instance id.
    pub id: i64,
    /// The job key.
    pub job: Hash,
    /// Push time.
    pub created: i64,
    /// Current state.
    pub state: State,
    /// Priority.
    pub priority: i64,
    /// Not before (epoch ms).
    pub run_at: i64,
    /// Its own timeout in ms, if any.
    pub timeout_ms: Option<u64>,
    /// Its own retry budget, if any.
    pub retries: Option<u32>,
    /// Whether it may be served from the result cache.
    pub cached: bool,
    /// The batch it belongs to, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// How many instances it depends on.
    pub deps: u64,
    /// How many of those it still waits for.
    pub waiting_on: u64,
    /// Why it ended without an attempt saying so (a dependency failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Where and with what it runs (`cwd`, `env`, `limits`, each shown when set).
    #[serde(flatten)]
    pub context: super::ExecContext,
    /// What it needs from a worker.
    #[serde(skip_serializing_if = "super::Needs::is_empty")]
    pub needs: super::Needs,
    /// Its concurrency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<super::Concurrency>,
    /// Every attempt, oldest first.
    pub attempts: Vec<AttemptRow>,
}

impl InstanceDetail {
    /// The newest attempt, if any ran.
    pub fn last_attempt(&self) -> Option<&AttemptRow> {
        self.attempts.last()
    }

    /// Why it ended as it did, for humans: its note, else its newest attempt's
    /// message, else its state.
    pub fn message(&self) -> String {
        let attempt = self.last_attempt().and_then(|a| a.report.message.clone());
        self.note
            .clone()
            .or(attempt)
            .unwrap_or_else(|| self.state.as_str().to_string())
    }
}

/// One instance as a person looks at it (`ps`, the dashboard): what it is, where it
/// stands, and its last attempt's timing and exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct InstanceSummary {
    /// Instance id.
    pub id: i64,
    /// The job key.
    pub job: Hash,
    /// Push time (epoch ms).
    pub created: i64,
    /// Where it stands.
    pub state: State,
    /// Attempts started so far.
    pub attempts: i64,
    /// The batch it belongs to, if any.
    pub batch: Option<String>,
    /// When its last attempt started (epoch ms).
    pub start: Option<i64>,
    /// When its last attempt ended (epoch ms); `None` while it runs.
    pub end: Option<i64>,
    /// The last attempt's exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that ended the last attempt, if any.
    pub signal: Option<i32>,
}

/// Which instances a newest-first page ([`Queue::recent_page`](super::Queue::recent_page))
/// holds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecentQuery {
    /// Only instances in these states (all, when empty).
    pub states: Vec<State>,
    /// Only the instances of this batch.
    pub batch: Option<String>,
    /// Only instances with ids below this (the previous page's last id), for paging.
    pub before: Option<i64>,
    /// At most this many rows.
    pub limit: usize,
}

impl RecentQuery {
    /// The newest `limit` instances, in any state and batch.
    pub fn newest(limit: usize) -> RecentQuery {
        RecentQuery {
            states: Vec::new(),
            batch: None,
            before: None,
            limit,
        }
    }
}
