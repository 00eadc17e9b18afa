//! Batches and dependencies as the [`Queue`](super::Queue) speaks of them: a batch
//! name, a dependency of a push, a batch's counts, a dependency's result.

use serde::{Deserialize, Serialize};

use super::types::{Counts, Selector, State};
use crate::error::{Error, Result};
use crate::hash::Hash;

/// The longest batch name.
pub const MAX_BATCH_NAME: usize = 128;

/// Checks that `name` is a batch name: 1 to [`MAX_BATCH_NAME`] characters from
/// `A-Z a-z 0-9 . _ -`. Anything else is [`Error::Config`] saying so.
pub fn check_batch_name(name: &str) -> Result<()> {
    let ok = (1..=MAX_BATCH_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        return Ok(());
    }
    Err(Error::Config {
        what: "batch name",
        value: name.chars().take(MAX_BATCH_NAME + 8).collect(),
        why: format!("expected 1 to {MAX_BATCH_NAME} characters from A-Z a-z 0-9 . _ -"),
    })
}

/// A fresh batch name for a fan-out given none: `b-` and 16 random hex digits.
pub fn new_batch_name() -> String {
    format!("b-{:016x}", fastrand::u64(..))
}

/// What a new instance waits for: every instance a selector names, resolved when the
/// instance is pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Dependency {
    /// The instances waited for.
    pub selector: Selector,
    /// `false` (`--after`): each must end with a result, and the new instance is
    /// cancelled if one fails for good or is cancelled. `true` (`--after-any`): each
    /// must end, whatever the outcome.
    pub any: bool,
}

impl Dependency {
    /// Wait until every instance `selector` names has a result.
    pub fn on_result(selector: Selector) -> Dependency {
        Dependency {
            selector,
            any: false,
        }
    }

    /// Wait until every instance `selector` names has ended, whatever the outcome.
    pub fn on_end(selector: Selector) -> Dependency {
        Dependency {
            selector,
            any: true,
        }
    }
}

/// One batch and how many of its instances are in each state, as `batchdb batches`
/// prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BatchCounts {
    /// The batch's id (the paging cursor).
    #[serde(skip)]
    pub id: i64,
    /// The batch's name.
    pub batch: String,
    /// When its first instance was pushed (epoch ms).
    pub created: i64,
    /// Instances in the batch.
    pub total: u64,
    /// Counts by state.
    #[serde(flatten)]
    pub counts: Counts,
}

/// An instance a selector names, with its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Selected {
    /// The instance id.
    pub id: i64,
    /// Its job key.
    pub job: Hash,
    /// Its push time.
    pub created: i64,
    /// Its state.
    pub state: State,
    /// The instance `retry` pushed in its place, if it was retried.
    pub retried_by: Option<i64>,
}

/// A dependency of an instance that ended with a result: what a dependent reads
/// (`BATCHDB_DEPS`) and what its result-cache key covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DependencyResult {
    /// The dependency's instance id (the paging cursor; dependencies come in id
    /// order, which is their push order).
    pub instance: i64,
    /// Its job key.
    pub job: Hash,
    /// Its result id (the hash of its stdout).
    pub result: Hash,
}

impl DependencyResult {
    /// The line `BATCHDB_DEPS` holds for it: `JOBKEY RESULTID\n`.
    pub fn line(&self) -> String {
        format!("{} {}\n", self.job, self.result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_names_are_short_and_plain() {
        for ok in [
            "a",
            "run-1.2_x",
            &"x".repeat(MAX_BATCH_NAME),
            &new_batch_name(),
        ] {
            check_batch_name(ok).unwrap();
        }
        for bad in [
            "",
            "a b",
            "a/b",
            "é",
            "a:b",
            &"x".repeat(MAX_BATCH_NAME + 1),
        ] {
            let e = check_batch_name(bad).unwrap_err();
            assert!(e.to_string().contains("batch name"), "{e}");
        }
    }
}
