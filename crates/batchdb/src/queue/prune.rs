//! Retention: what `prune` removes, and how its work is cut into bounded steps.
//!
//! An instance is pruned when it has ended (`result`, `fail` or `cancelled`, as
//! asked) before the cutoff and nothing that is kept depends on it. With it go its
//! attempts, its dependency rows, the result-cache entries that point at it, the
//! inline outputs no other attempt names, its job once no instance of that job is
//! left (the payload blob is then unreferenced, for `gc`), its batch once empty, and
//! — in a last pass over the log — the events about instances and jobs that are gone.
//! Each step is one short write transaction over a bounded range of ids, so workers
//! claiming and finishing in between wait at most one step.

use std::time::Duration;

use serde::Serialize;

use super::now_ms;

/// Which ended instances `prune` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PruneRequest {
    /// Instances that ended before this time (epoch milliseconds).
    pub cutoff: i64,
    /// Remove instances that ended with a result.
    pub result: bool,
    /// Remove instances that failed.
    pub fail: bool,
    /// Remove cancelled instances.
    pub cancelled: bool,
    /// Instance ids examined per step (events: four times as many).
    pub chunk: i64,
}

impl PruneRequest {
    /// Every ended state, ended before `cutoff`, in steps of 1,000 instances.
    #[must_use]
    pub fn before(cutoff: i64) -> PruneRequest {
        PruneRequest {
            cutoff,
            result: true,
            fail: true,
            cancelled: true,
            chunk: 1000,
        }
    }

    /// Every ended state, ended more than `age` ago by this machine's clock.
    #[must_use]
    pub fn older_than(age: Duration) -> PruneRequest {
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        PruneRequest::before(now_ms().saturating_sub(age_ms))
    }
}

/// Where a prune is: the next bounded step to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PruneStep {
    /// Instances with ids after `after`, in pass `pass`. A later pass runs when this
    /// one removed something but kept something because a kept instance depended
    /// on it (its dependents may be gone now).
    Instances {
        /// The last id examined.
        after: i64,
        /// The pass, from 0.
        pass: u32,
        /// Whether this pass removed an instance.
        removed: bool,
        /// Whether this pass kept an instance for its dependents.
        kept: bool,
    },
    /// Events with ids after `after` that name an instance or job no longer there.
    Events {
        /// The last event id examined.
        after: i64,
    },
}

impl PruneStep {
    /// The first step.
    pub const START: PruneStep = PruneStep::Instances {
        after: 0,
        pass: 0,
        removed: false,
        kept: false,
    };
}

/// What a prune removed (or, for a dry run, would remove: only `instances`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PruneCounts {
    /// Instances.
    pub instances: u64,
    /// Attempts of those instances.
    pub attempts: u64,
    /// Events about them (and their jobs).
    pub events: u64,
    /// Jobs left without any instance.
    pub jobs: u64,
    /// Batches left empty.
    pub batches: u64,
    /// Outputs kept inline that no attempt names any more.
    pub inline_outputs: u64,
    /// Result-cache entries that pointed at them.
    pub cache_entries: u64,
}

impl PruneCounts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: &PruneCounts) {
        self.instances += other.instances;
        self.attempts += other.attempts;
        self.events += other.events;
        self.jobs += other.jobs;
        self.batches += other.batches;
        self.inline_outputs += other.inline_outputs;
        self.cache_entries += other.cache_entries;
    }
}
