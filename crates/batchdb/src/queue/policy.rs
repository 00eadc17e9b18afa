//! The queue's rules, written once for every backend: what an ended attempt turns its
//! instance into, what an expired lease does, when a claim is served from the result
//! cache, when a failure runs again. Pure: no I/O and no clock (times come in as
//! arguments); each backend carries the decisions out in its own dialect, in one
//! transaction.

use std::time::Duration;

use std::collections::BTreeSet;

use super::context::{ExecContext, Needs, Resources};
use super::types::{
    AttemptReport, ClaimRequest, ClaimToken, EventKind, Finished, Outcome, State, cache_key,
};
use crate::hash::Hash;

/// How many times an instance's worker may be lost (its lease expired) before the
/// instance fails instead of running again: a job that kills or exhausts its worker
/// every time is the likely cause.
pub const MAX_LOST: i64 = 3;

/// How an attempt ended, as its row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// It succeeded: the instance became a result.
    Result,
    /// It failed and the instance went back to pending, to run again.
    Retry,
    /// It failed and the instance failed.
    Fail,
    /// The instance was cancelled.
    Cancelled,
    /// Its worker gave the instance back unfinished.
    Released,
    /// Its worker stopped renewing the lease and another claim took the instance over.
    Lost,
}

impl AttemptEnd {
    /// Every end, in the order above.
    pub const ALL: [AttemptEnd; 6] = [
        AttemptEnd::Result,
        AttemptEnd::Retry,
        AttemptEnd::Fail,
        AttemptEnd::Cancelled,
        AttemptEnd::Released,
        AttemptEnd::Lost,
    ];

    /// The name stored in the attempt row.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Result => "result",
            AttemptEnd::Retry => "retry",
            AttemptEnd::Fail => "fail",
            AttemptEnd::Cancelled => "cancelled",
            AttemptEnd::Released => "released",
            AttemptEnd::Lost => "lost",
        }
    }

    /// The end a stored name stands for, if it is one.
    pub fn parse(s: &str) -> Option<AttemptEnd> {
        AttemptEnd::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// What ending one attempt does to its instance, for a backend to carry out.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition<'a> {
    /// What the attempt produced (recorded in its row).
    pub report: &'a AttemptReport,
    /// The attempt row's outcome.
    pub attempt: AttemptEnd,
    /// The instance's next state.
    pub state: State,
    /// Whether the instance ends now (its `ended` time is set).
    pub ends: bool,
    /// When the instance is due again, if that changes.
    pub run_at: Option<i64>,
    /// Whether the attempt counts as a failure (`failures + 1`).
    pub counts_failure: bool,
    /// Whether the instance forgets its cache key (it will run again).
    pub clears_cache_key: bool,
    /// The result-cache entry this attempt fills.
    pub fills_cache: Option<Hash>,
    /// The event logged.
    pub event: EventKind,
    /// The event's data.
    pub data: serde_json::Value,
    /// What the caller of `finish` is told.
    pub finished: Finished,
}

/// What outcome `outcome` of attempt `t` does, given whether a cancel was requested
/// while it ran. A cancel wins over a retry or a release: the instance must not run
/// again.
pub(crate) fn finish<'a>(
    t: &ClaimToken,
    outcome: &'a Outcome,
    cancel_requested: bool,
) -> Transition<'a> {
    let (report, attempt, retry_at) = match outcome {
        Outcome::Success(r) => (r, AttemptEnd::Result, None),
        Outcome::Failure {
            report,
            retry_at: Some(_),
        }
        | Outcome::Released(report)
            if cancel_requested =>
        {
            (report, AttemptEnd::Cancelled, None)
        }
        Outcome::Failure {
            report,
            retry_at: Some(at),
        } => (report, AttemptEnd::Retry, Some(*at)),
        Outcome::Failure {
            report,
            retry_at: None,
        } => (report, AttemptEnd::Fail, None),
        Outcome::Cancelled(r) => (r, AttemptEnd::Cancelled, None),
        Outcome::Released(r) => (r, AttemptEnd::Released, None),
    };
    let mut data = serde_json::json!({
        "attempt": t.token,
        "stdout": report.stdout.map(|b| b.hash),
        "stderr": report.stderr.map(|b| b.hash),
        "exit_code": report.exit_code,
        "message": report.message,
    });
    if let Some(u) = report.usage {
        data["max_rss"] = serde_json::json!(u.max_rss);
        data["cpu_ms"] = serde_json::json!(u.cpu_ms());
    }
    let (state, event, finished) = match attempt {
        AttemptEnd::Result => {
            data["hash"] = serde_json::json!(report.stdout.map(|b| b.hash));
            data["cached"] = serde_json::json!(report.cached);
            (State::Result, EventKind::Result, Finished::Result)
        }
        AttemptEnd::Retry => {
            let at = retry_at.unwrap_or_default();
            data["run_at"] = serde_json::json!(at);
            (State::Pending, EventKind::Retry, Finished::Retry(at))
        }
        AttemptEnd::Fail => (State::Fail, EventKind::Fail, Finished::Fail),
        AttemptEnd::Cancelled | AttemptEnd::Lost => {
            (State::Cancelled, EventKind::Cancel, Finished::Cancelled)
        }
        AttemptEnd::Released => {
            data["released"] = serde_json::json!(true);
            (State::Pending, EventKind::Retry, Finished::Released)
        }
    };
    let again = state == State::Pending;
    Transition {
        report,
        attempt,
        state,
        ends: !again,
        run_at: retry_at,
        counts_failure: matches!(attempt, AttemptEnd::Retry | AttemptEnd::Fail),
        clears_cache_key: again,
        // A result served from the cache does not fill it again.
        fills_cache: (attempt == AttemptEnd::Result && !report.cached)
            .then_some(report.cache_key)
            .flatten(),
        event,
        data,
        finished,
    }
}

/// What a claim does with an instance whose lease expired (its worker stopped
/// renewing it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expired {
    /// A cancel was requested: the instance ends as cancelled, with this outcome.
    Cancel(Outcome),
    /// Its worker was lost [`MAX_LOST`] times: the instance fails, with this outcome.
    GiveUp(Outcome),
    /// The lost attempt is recorded as [`AttemptEnd::Lost`] with this report, and the
    /// instance runs again at once, under a new attempt.
    TakeOver(AttemptReport),
}

/// What an expired lease turns into at time `now`, given whether a cancel was
/// requested and how many attempts of the instance were lost before this one.
pub(crate) fn expired(now: i64, cancel_requested: bool, lost_before: i64) -> Expired {
    let lost = AttemptReport {
        end: now,
        message: Some("lease expired: worker lost".into()),
        ..AttemptReport::default()
    };
    if cancel_requested {
        return Expired::Cancel(Outcome::Cancelled(lost));
    }
    if lost_before + 1 >= MAX_LOST {
        let report = AttemptReport {
            message: Some(format!(
                "worker lost {MAX_LOST} times while running it; giving up"
            )),
            ..lost
        };
        return Expired::GiveUp(Outcome::Failure {
            report,
            retry_at: None,
        });
    }
    Expired::TakeOver(lost)
}

/// The result-cache key a claim looks up for an instance of `job` (pushed with
/// `cached` and timeout `timeout`), or `None` if the claim does not use the cache: it
/// does when the claimer names its runner and the instance (or the claimer, for all)
/// asks for it ([`wants_cache`]). The key covers the job, the runner, the effective
/// timeout and, for an instance with dependencies, `inputs` (the digest of its
/// dependencies' results, in order).
pub(crate) fn claim_cache_key(
    req: &ClaimRequest,
    job: &Hash,
    (cached, timeout): (bool, Option<Duration>),
    inputs: Option<&Hash>,
    context: &ExecContext,
) -> Option<Hash> {
    let spec = req.cache.as_ref()?;
    let timeout = timeout.or(spec.default_timeout);
    wants_cache(req, cached).then(|| cache_key(job, &spec.runner, timeout, inputs, context))
}

/// What a claim does with a pending instance that needs resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Its needs fit what the worker has free: claim it.
    Run,
    /// Leave it pending: it does not fit now, could never fit this worker, or needs
    /// something reserved for an instance that waited longer.
    Skip,
    /// It does not fit now but could here, and it has waited long enough: the worker
    /// keeps what it needs from smaller instances until it fits.
    Reserve,
}

/// What a claim does with an instance needing `needs` from a worker that has `total`
/// in all and `free` now, when the resources named in `reserved` are kept for an
/// instance that waited longer, and `starving` says whether this one has waited past
/// the claim's `reserve_after`.
///
/// The policy is backfill with one reservation: smaller instances run around a large
/// one while it waits, but once it has waited `reserve_after` the worker gives what
/// it needs to nothing else until enough is free for it, so it cannot starve.
pub(crate) fn fit(
    needs: &Needs,
    (total, free): (&Resources, &Resources),
    reserved: &BTreeSet<String>,
    starving: bool,
) -> Fit {
    if needs.is_empty() {
        return Fit::Run;
    }
    if needs.0.keys().any(|k| reserved.contains(k)) || !total.fits(needs) {
        return Fit::Skip;
    }
    if free.fits(needs) {
        Fit::Run
    } else if starving {
        Fit::Reserve
    } else {
        Fit::Skip
    }
}

/// What a dependency in `state` means for an instance that waits for it (`any`:
/// for its end, whatever the outcome; else for its result).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DepState {
    /// It is met: one less to wait for.
    Met,
    /// It has not ended yet.
    Unmet,
    /// It can never be met (it failed for good or was cancelled): the instance is
    /// cancelled, and so is everything that waits for its result.
    Broken,
}

/// See [`DepState`].
pub(crate) fn dependency(state: State, any: bool) -> DepState {
    match state {
        State::Result => DepState::Met,
        State::Fail | State::Cancelled if any => DepState::Met,
        State::Fail | State::Cancelled => DepState::Broken,
        State::Waiting | State::Pending | State::Running => DepState::Unmet,
    }
}

/// Why an instance was cancelled for its dependency `job`/`created`, which ended in
/// `state`: `dependency <job> <created> failed` (or `cancelled`).
pub(crate) fn broken_message(job: &Hash, created: i64, state: State) -> String {
    let how = if state == State::Fail {
        "failed"
    } else {
        "cancelled"
    };
    format!("dependency {job} {created} {how}")
}

/// The state a new instance starts in: cancelled if a dependency is broken, waiting
/// while any is unmet, else pending.
pub(crate) fn initial_state(broken: bool, unmet: i64) -> State {
    if broken {
        State::Cancelled
    } else if unmet > 0 {
        State::Waiting
    } else {
        State::Pending
    }
}

/// Whether a claim uses the result cache for an instance pushed with `cached`.
pub(crate) fn wants_cache(req: &ClaimRequest, cached: bool) -> bool {
    req.cache.is_some() && (cached || req.cache_all)
}

/// Whether a failed attempt runs again: the number of the failure it would be (1 for
/// the first), or `None` when `failures_before + 1` exceeds the retry `budget`.
pub(crate) fn retry_number(failures_before: u32, budget: u32) -> Option<u32> {
    let n = failures_before + 1;
    (n <= budget).then_some(n)
}

/// `base · 2^(n-1)`, capped at `max`, times `jitter` (the caller draws it from
/// [0.5, 1.5) so that retries of many instances spread out).
pub(crate) fn backoff(base: Duration, max: Duration, n: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << (n.saturating_sub(1)).min(20));
    exp.min(max).mul_f64(jitter)
}

#[cfg(test)]
mod tests;
