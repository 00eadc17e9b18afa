//! One slot of a worker: it runs one job at a time, and claims its next one with the
//! outcome of the last ([`WorkerPort::finish_and_claim`]).
//!
//! A slot whose job ran less than [`WorkerOptions::ahead`](super::WorkerOptions::ahead)
//! ([`AHEAD`] by default) claims one instance more than it starts,
//! and holds it: when the running job ends, the held claim starts at once, and the
//! ended job's outcome commits (claiming the next one to hold) while it runs. So the
//! time an outcome takes to commit — an fsync, or round trips to a server — is not
//! spent between two short jobs. A held claim is given back (pending again at once,
//! its attempt recorded as released without having run) once the job before it has
//! run [`HOLD`]: a long job never keeps another waiting behind it long. (A job that
//! is short only most of the time, slowed by a busy machine, does not make its held
//! claim go back: that would record a released attempt for nothing.)

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::attempt::Attempted;
use super::{Report, Worker, backoff, send};
use crate::error::Error;
use crate::queue::{AttemptReport, Claim, ClaimRequest, ClaimToken, Finished, Outcome, now_ms};

/// The default of [`WorkerOptions::ahead`](super::WorkerOptions::ahead): a job that
/// ran less than this makes its slot claim the next one ahead.
pub const AHEAD: Duration = Duration::from_millis(50);

/// A claim held ahead is given back once the job running before it has run this long
/// (or [`WorkerOptions::ahead`](super::WorkerOptions::ahead), if longer; or a quarter
/// of the lease, if shorter).
pub const HOLD: Duration = Duration::from_secs(1);

/// A future borrowing the worker.
type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Claims a slot holds while its job runs, and the queue's change count right after
/// they were claimed (a change since may be a cancel of one of them).
#[derive(Default)]
struct Held {
    claims: VecDeque<Claim>,
    seen: u64,
}

impl Held {
    /// Adds the claims of `newer`; a change since the oldest claim still counts.
    fn merge(&mut self, newer: Held) {
        if self.claims.is_empty() {
            *self = newer;
        } else {
            self.claims.extend(newer.claims);
        }
    }
}

impl Worker {
    /// Runs one slot: `claim`, then what each outcome's commit claimed for the slot,
    /// until the slot has nothing left to run.
    pub(super) async fn run_slot(
        &self,
        claim: Claim,
        req: &ClaimRequest,
        reports: Option<&mpsc::UnboundedSender<Report>>,
    ) {
        let mut next = Some((claim, None));
        let mut held = Held::default();
        // The last outcome's commit, while the next job runs: it brings the claims
        // to hold.
        let mut behind: Option<Boxed<'_, Held>> = None;
        while let Some((cur, seen)) = next.take() {
            let started = Instant::now();
            let run: Boxed<'_, Attempted> = match self.before_start(&cur, seen).await {
                Some(done) => Box::pin(async move { done }),
                None => Box::pin(self.execute(&cur)),
            };
            let give_up = started + HOLD.max(self.opts.ahead).min(self.opts.lease / 4);
            let (report, outcome) = self.beside(run, behind.take(), give_up, &mut held).await;
            let short = started.elapsed() < self.opts.ahead;
            if self.shutdown.level() >= 1 {
                self.give_back(&mut held).await;
            }
            if let Some(h) = held.claims.pop_front() {
                // Run the held claim now; commit this outcome while it runs.
                next = Some((h, Some(held.seen)));
                let ask = self.next_request(req, usize::from(short));
                behind = Some(Box::pin(self.record(cur, report, outcome, ask, reports)));
                continue;
            }
            // Nothing held: commit this outcome, claiming the next job (and, after a
            // short one, one to hold ahead).
            let ask = self.next_request(req, if short { 2 } else { 1 });
            let mut got = self.record(cur, report, outcome, ask, reports).await;
            next = got.claims.pop_front().map(|c| (c, None));
            held = got;
        }
        if let Some(b) = behind.take() {
            held.merge(b.await);
        }
        self.give_back(&mut held).await;
    }

    /// Drives `run` (a job) to its end; meanwhile `behind` (the last outcome's
    /// commit) ends and its claims are held in `held`, and given back if `run` is
    /// still going at `give_up`.
    async fn beside(
        &self,
        mut run: Boxed<'_, Attempted>,
        mut behind: Option<Boxed<'_, Held>>,
        give_up: Instant,
        held: &mut Held,
    ) -> Attempted {
        let mut giving: Option<Boxed<'_, Held>> = None;
        loop {
            tokio::select! {
                done = &mut run => {
                    if let Some(b) = behind.take() {
                        held.merge(b.await);
                    }
                    if let Some(g) = giving.take() {
                        g.await;
                    }
                    return done;
                }
                got = or_pending(behind.as_mut()), if behind.is_some() => {
                    behind = None;
                    held.merge(got);
                }
                () = tokio::time::sleep_until(give_up), if !held.claims.is_empty() && giving.is_none() => {
                    let mut h = std::mem::take(held);
                    giving = Some(Box::pin(async move {
                        self.give_back(&mut h).await;
                        h
                    }));
                }
                _ = or_pending(giving.as_mut()), if giving.is_some() => {
                    giving = None;
                }
            }
        }
    }

    /// Commits the outcome of `claim`'s attempt (with `ask`, claiming for the slot in
    /// the same transaction), reports it, and returns the claims, admitted.
    async fn record(
        &self,
        claim: Claim,
        report: AttemptReport,
        outcome: Option<Outcome>,
        ask: Option<ClaimRequest>,
        reports: Option<&mpsc::UnboundedSender<Report>>,
    ) -> Held {
        let (finished, claimed) = match outcome {
            None => (None, Vec::new()),
            Some(outcome) => {
                self.finish_with_retry(&claim.token, &outcome, ask.as_ref())
                    .await
            }
        };
        let seen = self.port.change_seq();
        self.hold(&claim.assigned, false);
        send(reports, &claim, report, finished);
        let mut claims = VecDeque::new();
        for c in claimed {
            if let Some(c) = self.admit(c, reports).await {
                claims.push_back(c);
            }
        }
        Held { claims, seen }
    }

    /// Gives back every claim in `held` unstarted: each is pending again at once, its
    /// attempt recorded as released (not a failure). Not reported: nothing ran.
    async fn give_back(&self, held: &mut Held) {
        for c in held.claims.drain(..) {
            let report = AttemptReport {
                start: c.start,
                end: now_ms(),
                message: Some("given back before it started".into()),
                ..AttemptReport::default()
            };
            let outcome = Outcome::Released(report);
            if let Err(e) = self.port.finish(&c.token, &outcome).await {
                tracing::warn!(
                    "giving back instance {} failed ({e}); its lease will expire",
                    c.token.id
                );
            }
            self.hold(&c.assigned, false);
        }
    }

    /// Before a claim held since change count `seen` starts: if the queue changed
    /// since, looks whether a cancel came for it (it ends cancelled without running)
    /// or another worker took it over (nothing to record).
    async fn before_start(&self, claim: &Claim, seen: Option<u64>) -> Option<Attempted> {
        if seen.is_none_or(|s| s == self.port.change_seq()) {
            return None;
        }
        let mut report = AttemptReport {
            start: claim.start,
            ..AttemptReport::default()
        };
        match self.port.status(&claim.token).await {
            Ok(hb) if hb.cancel_requested => {
                report.end = now_ms();
                report.message = Some("cancelled before it started".into());
                Some((report.clone(), Some(Outcome::Cancelled(report))))
            }
            Err(e @ Error::Fenced { .. }) => {
                report.end = now_ms();
                report.message = Some(format!("{e} before it started"));
                Some((report, None))
            }
            // Still ours; or the look failed: the job's own looks tell.
            _ => None,
        }
    }

    /// What an outcome's commit claims for its slot: `n` instances (none if `n` is
    /// 0, the worker is stopping, or it has resources to share out: the loop claims
    /// for those, so that two claims never count on the same free units).
    fn next_request(&self, req: &ClaimRequest, n: usize) -> Option<ClaimRequest> {
        if n == 0 || self.shutdown.level() >= 1 || !self.opts.resources.is_empty() {
            return None;
        }
        Some(ClaimRequest {
            limit: n,
            ..req.clone()
        })
    }

    /// Records the outcome, retrying while the queue is unreachable. Gives up when
    /// fenced (another worker owns the instance now) or when the lease has surely
    /// expired (the instance will be taken over and run again).
    /// With `next`, the first try also claims for the slot
    /// ([`WorkerPort::finish_and_claim`]); a retry only finishes.
    async fn finish_with_retry(
        &self,
        t: &ClaimToken,
        outcome: &Outcome,
        mut next: Option<&ClaimRequest>,
    ) -> (Option<Finished>, Vec<Claim>) {
        let give_up = Instant::now() + self.opts.lease;
        let mut n = 0;
        loop {
            let tried = match next.take() {
                Some(req) => self.port.finish_and_claim(t, outcome, req).await,
                None => self.port.finish(t, outcome).await.map(|f| (f, Vec::new())),
            };
            match tried {
                Ok((f, claims)) => return (Some(f), claims),
                Err(e @ Error::Fenced { .. }) => {
                    if n > 0 {
                        // An earlier try may have committed with its reply lost (the
                        // connection dropped): then the outcome is already recorded.
                        if let Some(done) = self.recorded(t).await {
                            return (Some(done), Vec::new());
                        }
                    }
                    tracing::warn!("{e}: result discarded");
                    return (None, Vec::new());
                }
                Err(e) if Instant::now() < give_up => {
                    n += 1;
                    let wait = backoff(Duration::from_millis(100), Duration::from_secs(5), n);
                    tracing::warn!(
                        "recording instance {} failed ({e}); retrying in {wait:?}",
                        t.id
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::error!(
                        "recording instance {} failed ({e}); giving up, its lease will expire",
                        t.id
                    );
                    return (None, Vec::new());
                }
            }
        }
    }

    /// What attempt `t` recorded, if it has ended (for a finish whose reply was lost).
    async fn recorded(&self, t: &ClaimToken) -> Option<Finished> {
        self.port.recorded(t).await.ok().flatten()
    }
}

/// Awaits `f`, or never ends if there is none.
async fn or_pending<T>(f: Option<&mut Boxed<'_, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
