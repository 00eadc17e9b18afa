//! Retention on the facade: `prune`, one bounded transaction at a time, by hand or
//! on a timer.

use std::time::Duration;

use crate::BatchDb;
use crate::error::Result;
use crate::queue::{PruneCounts, PruneRequest, PruneStep};

impl BatchDb {
    /// Removes the ended instances `req` names and what goes with them (see
    /// [`PruneRequest`] and [`crate::queue::PruneStep`]): one short write transaction
    /// per step, so workers wait at most one step for the database. Blobs the removed
    /// rows named are left for [`BatchDb::gc`]. Between steps it pauses
    /// [`PRUNE_PAUSE`], so that other processes waiting for the write lock get it.
    /// Returns what was removed.
    pub async fn prune(&self, req: &PruneRequest) -> Result<PruneCounts> {
        let mut total = PruneCounts::default();
        let mut step = Some(PruneStep::START);
        while let Some(s) = step {
            let (counts, next) = self.queue.prune_step(req, s).await?;
            total.add(&counts);
            step = next;
            if step.is_some() {
                tokio::time::sleep(PRUNE_PAUSE).await;
            }
        }
        Ok(total)
    }

    /// How many instances [`prune`](Self::prune) would remove in its first pass
    /// (instances kept only because something still depends on them are not
    /// counted); removes nothing.
    pub async fn prune_count(&self, req: &PruneRequest) -> Result<u64> {
        self.queue.prune_count(req).await
    }

    /// Prunes every instance that ended more than `age` ago, now and then every
    /// [`prune_interval`]`(age)`, until the returned future is dropped; each run's
    /// counts (or error, which does not stop the timer) go to `report`.
    pub async fn prune_periodically(
        &self,
        age: Duration,
        mut report: impl FnMut(Result<PruneCounts>),
    ) {
        let every = prune_interval(age);
        loop {
            report(self.prune(&PruneRequest::older_than(age)).await);
            tokio::time::sleep(every).await;
        }
    }
}

/// The pause between two steps of a prune.
pub const PRUNE_PAUSE: Duration = Duration::from_millis(2);

/// How often [`BatchDb::prune_periodically`] runs for instances older than `age`: a
/// tenth of it, between one second and ten minutes.
#[must_use]
pub fn prune_interval(age: Duration) -> Duration {
    (age / 10).clamp(Duration::from_secs(1), Duration::from_secs(600))
}
