//! The supervising loop of one running attempt: the lease renewed, cancel requests
//! noticed between heartbeats, and the stops (timeout, cancel, lost lease, shutdown)
//! carried out — SIGTERM, SIGKILL after the grace, the output cut after another.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Worker;
use super::classify::Stopped;
use crate::error::Error;
use crate::io::Cut;
use crate::queue::{Claim, millis, now_ms};
use crate::runner::{Killer, Stop};

/// The least time between two looks for a cancel request of one running job.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The clocks of one supervised attempt.
struct Clocks {
    /// Why it was stopped, once it was.
    stopped: Option<Stopped>,
    /// When its timeout runs out.
    deadline: Option<Instant>,
    /// When a stopped job gets SIGKILL.
    force_at: Option<Instant>,
    /// When a killed job's output is cut.
    cut_at: Option<Instant>,
    /// The lease as this worker knows it: if renewals keep failing until it runs out,
    /// the job is stopped here before another worker may take it over.
    lease_end: Instant,
    hb_every: Duration,
    next_hb: Instant,
    last_check: Instant,
}

/// An instant far enough away to stand for "never".
fn far() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

impl Worker {
    /// Drives `work` (the attempt's feeding, output storing and waiting) to its end
    /// while supervising it; returns its output and why it was stopped, if it was.
    pub(super) async fn supervise<T>(
        &self,
        claim: &Claim,
        killer: &Arc<dyn Killer>,
        cut: &Cut,
        timeout: Option<Duration>,
        work: impl Future<Output = T>,
    ) -> (T, Option<Stopped>) {
        tokio::pin!(work);
        let now = Instant::now();
        let left = claim.start.saturating_add(millis(self.opts.lease)) - now_ms();
        let hb_every = (self.opts.lease / 3).max(Duration::from_millis(50));
        let mut c = Clocks {
            stopped: None,
            deadline: timeout.map(|t| now + t),
            force_at: None,
            cut_at: None,
            lease_end: now + Duration::from_millis(left.max(0).unsigned_abs()),
            hb_every,
            next_hb: now + hb_every,
            last_check: now,
        };
        let running = |c: &Clocks| c.stopped.is_none();
        loop {
            let seen = self.port.change_seq();
            let check_at = c.last_check + CHECK_EVERY;
            let stop_now = tokio::select! {
                res = &mut work => return (res, c.stopped),
                () = tokio::time::sleep_until(c.deadline.unwrap_or_else(far)), if c.deadline.is_some() && running(&c) => {
                    Some(Stopped::Timeout)
                }
                () = tokio::time::sleep_until(c.force_at.unwrap_or_else(far)), if c.force_at.is_some() => {
                    // Aimed: a killer signals only its own execution, and nothing
                    // once released (Killer's contract).
                    killer.stop(Stop::Kill);
                    c.force_at = None;
                    c.cut_at = Some(Instant::now() + self.opts.kill_grace);
                    None
                }
                () = tokio::time::sleep_until(c.cut_at.unwrap_or_else(far)), if c.cut_at.is_some() => {
                    // Killed, yet something still holds the output open.
                    c.cut_at = None;
                    let k = killer.clone();
                    let _ = tokio::task::spawn_blocking(move || k.stop_all()).await;
                    cut.cut();
                    None
                }
                () = tokio::time::sleep_until(c.lease_end), if running(&c) => {
                    tracing::warn!("instance {}: lease ran out without renewal; stopping it", claim.token.id);
                    Some(Stopped::Lost)
                }
                () = tokio::time::sleep_until(c.next_hb) => self.renew(claim, &mut c).await,
                () = async {
                    // At most one look every CHECK_EVERY, however busy the queue is.
                    tokio::time::sleep_until(check_at).await;
                    self.port.wait_change(seen, hb_every).await;
                }, if running(&c) => self.look(claim, &mut c).await,
                () = self.shutdown.wait_level(2), if running(&c) => Some(Stopped::Shutdown),
            };
            if let Some(s) = stop_now.filter(|_| running(&c)) {
                if s == Stopped::Lost {
                    // Another worker may own the instance now: stop at once.
                    killer.stop(Stop::Kill);
                    c.force_at = Some(Instant::now());
                } else {
                    killer.stop(Stop::Terminate);
                    c.force_at = Some(Instant::now() + self.opts.kill_grace);
                }
                c.stopped = Some(s);
            }
        }
    }

    /// Renews the lease (a heartbeat); says whether the job must stop.
    async fn renew(&self, claim: &Claim, c: &mut Clocks) -> Option<Stopped> {
        c.next_hb = Instant::now() + c.hb_every;
        let before = Instant::now();
        // Bounded: a call hanging on a dead connection must not keep the loop from
        // seeing the lease run out (and fencing itself).
        let left = c
            .lease_end
            .saturating_duration_since(before)
            .max(Duration::from_millis(1));
        let id = claim.token.id;
        let beat = self.port.heartbeat(&claim.token, self.opts.lease);
        match tokio::time::timeout(left, beat).await {
            Ok(Ok(hb)) => {
                c.lease_end = before + self.opts.lease;
                hb.cancel_requested.then_some(Stopped::Cancel)
            }
            Ok(Err(Error::Fenced { .. })) => Some(Stopped::Lost),
            Ok(Err(e)) => {
                tracing::warn!("heartbeat for instance {id} failed: {e}");
                None
            }
            Err(_) => {
                tracing::warn!("heartbeat for instance {id} timed out");
                None
            }
        }
    }

    /// Something changed in the queue: looks for a cancel request (or a lost lease)
    /// without waiting for the next heartbeat.
    async fn look(&self, claim: &Claim, c: &mut Clocks) -> Option<Stopped> {
        c.last_check = Instant::now();
        let left = c
            .lease_end
            .saturating_duration_since(c.last_check)
            .max(Duration::from_millis(1));
        match tokio::time::timeout(left, self.port.status(&claim.token)).await {
            Ok(Ok(hb)) if hb.cancel_requested => Some(Stopped::Cancel),
            Ok(Err(Error::Fenced { .. })) => Some(Stopped::Lost),
            // Still ours; or the look failed or timed out: the next one tells.
            _ => None,
        }
    }
}
