//! The change counter every backend keeps: bumped on each commit this process makes
//! or learns of from another process; waiters wait for it to move.

use std::time::Duration;

use tokio::sync::watch;

/// A counter of changes to the queue (see [`Queue::change_seq`](super::Queue::change_seq)).
#[derive(Debug)]
pub(crate) struct Changes(watch::Sender<u64>);

impl Changes {
    /// A counter at 0.
    pub(crate) fn new() -> Changes {
        Changes(watch::channel(0).0)
    }

    /// Counts one change and wakes every waiter.
    pub(crate) fn bump(&self) {
        self.0.send_modify(|v| *v += 1);
    }

    /// The count so far.
    pub(crate) fn seq(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until the count differs from `seen`, or `timeout` passed.
    pub(crate) async fn wait(&self, seen: u64, timeout: Duration) {
        let mut rx = self.0.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v != seen)).await;
    }
}
