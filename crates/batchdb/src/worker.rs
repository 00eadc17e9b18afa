//! The worker loop: claim → run → finish, with leases, timeouts, retries,
//! cancellation, live output and graceful or forced shutdown.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::blob::{BlobInfo, BlobStore};
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::io::{Cut, CutReader, Inspect, Inspector};
use crate::queue::{
    AttemptEnd, AttemptReport, CacheSpec, Claim, ClaimRequest, ClaimToken, Finished, Order,
    Outcome, Queue, cache_key, now_ms, policy,
};
use crate::runner::{ExitStatus, Killer, Reader, RunContext, Runner, Stop};

/// Payloads up to this size are verified before their job starts.
const PREFETCH: u64 = 8 << 20;

/// An output stored by [`store_output`].
struct Stored {
    info: BlobInfo,
    /// The bytes, if they are small enough to be kept in the queue instead.
    inline: Option<Vec<u8>>,
}

/// Stores one output stream: one that ends within [`crate::INLINE_MAX`] bytes is kept
/// in memory, to be recorded in the queue with the attempt (no blob file, no fsyncs);
/// a longer one streams into the blob store. A read error is [`Error::Stream`] (the
/// job's failure); anything else comes from the store.
async fn store_output(
    store: &dyn BlobStore,
    reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
) -> Result<Stored> {
    use tokio::io::AsyncReadExt;
    let head = crate::io::read_inline_head(reader, "read output").await?;
    let n = head.len();
    if n <= crate::INLINE_MAX {
        let info = BlobInfo {
            hash: Hash::of(&head),
            size: n as u64,
        };
        return Ok(Stored {
            info,
            inline: Some(head),
        });
    }
    let mut rest = std::io::Cursor::new(head).chain(reader);
    let info = store.put(&mut rest).await?;
    Ok(Stored { info, inline: None })
}

/// The least time between two looks for a cancel request of one running job.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// How a worker behaves.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs run at once (at least 1).
    pub concurrency: usize,
    /// Order within a priority.
    pub order: Order,
    /// Lease of each claim; renewed every third of it while the job runs. If the
    /// worker dies, another worker takes the instance over once the lease expires.
    pub lease: Duration,
    /// Timeout for instances pushed without one.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when a job is stopped.
    pub kill_grace: Duration,
    /// Retries for instances pushed without a retry budget.
    pub retries: u32,
    /// First retry delay; doubles each failure (capped at [`WorkerOptions::backoff_max`]),
    /// with ±50 % jitter.
    pub backoff: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Serve every instance from the result cache when possible, not only those pushed
    /// with `cached`.
    pub cache_all: bool,
    /// Exit once nothing is pending or running anywhere.
    pub until_empty: bool,
    /// The worker's name in attempts (default `host:pid:random`).
    pub name: String,
    /// Where running jobs' output is mirrored for live readers (`logs -f`).
    pub live_dir: Option<PathBuf>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 1,
            order: Order::Newest,
            lease: Duration::from_secs(30),
            timeout: None,
            kill_grace: Duration::from_secs(5),
            retries: 0,
            backoff: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            cache_all: false,
            until_empty: false,
            name: default_worker_name(),
            live_dir: None,
        }
    }
}

/// `host:pid:random`, unique enough to tell workers apart in attempt rows.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}:{:04x}", std::process::id(), fastrand::u16(..))
}

/// What a worker reports as each attempt ends.
#[derive(Debug, Clone)]
pub struct Report {
    /// The job key.
    pub job: Hash,
    /// The instance id.
    pub instance: i64,
    /// The instance's push time.
    pub created: i64,
    /// The attempt number.
    pub attempt: i64,
    /// What the attempt produced.
    pub report: AttemptReport,
    /// What became of the instance; `None` if this worker lost its lease and recorded
    /// nothing.
    pub finished: Option<Finished>,
}

/// Asks a running worker to stop: [`Shutdown::graceful`] stops claiming and lets
/// running jobs finish; [`Shutdown::force`] also kills them and returns them to
/// pending.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<u8>>);

impl Shutdown {
    /// A new handle (not yet signalled).
    pub fn new() -> Shutdown {
        Shutdown(Arc::new(watch::channel(0).0))
    }
    /// Stop claiming; let running jobs finish.
    pub fn graceful(&self) {
        self.0.send_if_modified(|v| {
            let old = *v;
            *v = (*v).max(1);
            old != *v
        });
    }
    /// Kill running jobs and return them to pending.
    pub fn force(&self) {
        self.0.send_replace(2);
    }
    /// Escalates: the first call is graceful, later calls force.
    pub fn escalate(&self) {
        if *self.0.borrow() == 0 {
            self.graceful()
        } else {
            self.force()
        }
    }
    fn level(&self) -> u8 {
        *self.0.borrow()
    }
    async fn wait_level(&self, level: u8) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v >= level).await;
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

/// A worker over one queue and one blob store.
pub struct Worker {
    queue: Arc<dyn Queue>,
    blobs: Arc<dyn BlobStore>,
    runner: Arc<dyn Runner>,
    opts: WorkerOptions,
    shutdown: Shutdown,
    /// Set when the worker cannot go on (its runner cannot start).
    fatal: std::sync::Mutex<Option<Error>>,
}

impl Worker {
    /// A worker; call [`Worker::run`] to start it.
    pub fn new(
        queue: Arc<dyn Queue>,
        blobs: Arc<dyn BlobStore>,
        runner: Arc<dyn Runner>,
        opts: WorkerOptions,
    ) -> Worker {
        Worker {
            queue,
            blobs,
            runner,
            opts,
            shutdown: Shutdown::new(),
            fatal: std::sync::Mutex::new(None),
        }
    }

    /// The handle that stops this worker.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Runs until shut down (or, with `until_empty`, until nothing is pending or
    /// running). Each ended attempt is sent to `reports` (if given) after its row is
    /// committed. While the queue is unreachable it retries with backoff (logging
    /// each failure), forever. Returns an error if the runner cannot start a job: the
    /// instance is given back to pending and the worker stops.
    pub async fn run(self, reports: Option<mpsc::UnboundedSender<Report>>) -> Result<()> {
        let this = Arc::new(self);
        let slots = this.opts.concurrency.max(1);
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut db_errors = 0u32;
        let req = ClaimRequest {
            worker: this.opts.name.clone(),
            limit: slots,
            lease: this.opts.lease,
            order: this.opts.order,
            cache: Some(CacheSpec {
                runner: this.runner.spec(),
                default_timeout: this.opts.timeout,
            }),
            cache_all: this.opts.cache_all,
        };
        loop {
            while tasks.try_join_next().is_some() {}
            if this.shutdown.level() >= 1 {
                break;
            }
            let seen = this.queue.change_seq();
            let free = slots - tasks.len();
            let mut claimed_any = false;
            if free > 0 {
                let req = ClaimRequest {
                    limit: free,
                    ..req.clone()
                };
                match this.queue.claim(&req).await {
                    Ok(claims) => {
                        db_errors = 0;
                        for claim in claims {
                            claimed_any = true;
                            if let Some(hit) = claim.cache_hit.clone() {
                                send(&reports, &claim, hit, Some(Finished::Result));
                                continue;
                            }
                            if let Some(lost) = claim.lost.clone() {
                                // Whatever the lost attempt left running here must stop
                                // before the instance runs again. Aimed by the lost
                                // attempt's own id (Runner::stop_lost): it never reaches
                                // a live attempt, here or of any other database.
                                let runner = this.runner.clone();
                                let _ = tokio::task::spawn_blocking(move || {
                                    runner.stop_lost(&lost);
                                })
                                .await;
                            }
                            let (w, r) = (this.clone(), reports.clone());
                            tasks.spawn(async move { w.run_one(claim, r).await });
                        }
                    }
                    Err(e) => {
                        db_errors += 1;
                        let wait = backoff(
                            Duration::from_millis(100),
                            Duration::from_secs(10),
                            db_errors,
                        );
                        tracing::warn!("claim failed ({e}); retrying in {wait:?}");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
            }
            if claimed_any && tasks.len() < slots {
                continue;
            }
            if this.opts.until_empty && tasks.is_empty() && !claimed_any {
                match this.queue.counts().await {
                    Ok(c) if c.pending == 0 && c.running == 0 => break,
                    Ok(_) => {}
                    Err(e) => tracing::warn!("counting instances failed: {e}"),
                }
            }
            // Sleep until the queue changes, a slot frees up, or a delayed job may be due.
            tokio::select! {
                _ = this.queue.wait_change(seen, Duration::from_secs(1)) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = this.shutdown.wait_level(1) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
        match this.fatal.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn run_one(
        self: Arc<Self>,
        claim: Claim,
        reports: Option<mpsc::UnboundedSender<Report>>,
    ) {
        let t = claim.token;
        let (report, outcome) = self.execute(&claim).await;
        let finished = match outcome {
            None => None,
            Some(outcome) => self.finish_with_retry(&t, &outcome).await,
        };
        send(&reports, &claim, report, finished);
    }

    /// Records the outcome, retrying while the queue is unreachable. Gives up when
    /// fenced (another worker owns the instance now) or when the lease has surely
    /// expired (the instance will be taken over and run again).
    async fn finish_with_retry(&self, t: &ClaimToken, outcome: &Outcome) -> Option<Finished> {
        let give_up = Instant::now() + self.opts.lease;
        let mut n = 0;
        loop {
            match self.queue.finish(t, outcome).await {
                Ok(f) => return Some(f),
                Err(e @ Error::Fenced { .. }) => {
                    if n > 0 {
                        // An earlier try may have committed with its reply lost (the
                        // connection dropped): then the outcome is already recorded.
                        if let Some(done) = self.recorded(t).await {
                            return Some(done);
                        }
                    }
                    tracing::warn!("{e}: result discarded");
                    return None;
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
                    return None;
                }
            }
        }
    }

    /// The outcome of an attempt that the database or the blob store (not the job)
    /// made fail: it runs again after a backoff, whatever its own retry budget, up to
    /// [`STORE_RETRIES`] times; after that it counts as an ordinary failure.
    fn infra_retry(
        &self,
        claim: &Claim,
        mut report: AttemptReport,
        msg: String,
    ) -> (AttemptReport, Option<Outcome>) {
        report.end = now_ms();
        if claim.failures >= STORE_RETRIES {
            report.message = Some(msg);
            let outcome = self.failure(claim, report.clone());
            return (report, Some(outcome));
        }
        let msg = format!("{msg}; running it again");
        tracing::warn!("instance {}: {msg}", claim.token.id);
        report.message = Some(msg);
        let wait = backoff(
            Duration::from_secs(1),
            Duration::from_secs(60),
            claim.failures + 1,
        );
        let retry_at = Some(now_ms() + wait.as_millis() as i64);
        (report.clone(), Some(Outcome::Failure { report, retry_at }))
    }

    /// What attempt `t` recorded, if it has ended (for a finish whose reply was lost).
    async fn recorded(&self, t: &ClaimToken) -> Option<Finished> {
        let detail = self.queue.instance(t.id).await.ok()?;
        let attempt = detail.attempts.iter().find(|a| a.attempt == t.token)?;
        let latest = detail.attempts.last().map(|a| a.attempt) == Some(t.token);
        match AttemptEnd::parse(attempt.outcome.as_deref()?)? {
            AttemptEnd::Result => Some(Finished::Result),
            AttemptEnd::Fail => Some(Finished::Fail),
            AttemptEnd::Cancelled => Some(Finished::Cancelled),
            AttemptEnd::Retry if latest => Some(Finished::Retry(detail.run_at)),
            AttemptEnd::Released if latest => Some(Finished::Released),
            _ => None,
        }
    }

    /// Runs one attempt and decides its outcome (`None`: lease lost, record nothing).
    async fn execute(&self, claim: &Claim) -> (AttemptReport, Option<Outcome>) {
        let timeout = claim.timeout.or(self.opts.timeout);
        let mut report = AttemptReport {
            start: claim.start,
            ..AttemptReport::default()
        };
        let fail = |mut report: AttemptReport, msg: String, claim: &Claim| {
            report.end = now_ms();
            report.message = Some(msg);
            let outcome = self.failure(claim, report.clone());
            (report, Some(outcome))
        };
        let ctx = RunContext {
            job: claim.job,
            instance: claim.token.id,
            created: claim.created,
            attempt: claim.token.token,
            worker: self.opts.name.clone(),
            attempt_id: claim.attempt_id.clone(),
        };
        // A payload up to PREFETCH bytes is read and verified against its hash before
        // anything runs, so a corrupt payload never reaches the runner; a larger one
        // streams, and a corruption found at its end kills the run.
        let payload: Reader = match self.prefetch(&claim.job).await {
            Ok(p) => p,
            // A missing or corrupt payload is the job's failure...
            Err(e @ (Error::BlobNotFound(_) | Error::BlobCorrupt { .. })) => {
                return fail(report, format!("payload: {e}"), claim);
            }
            // ...an unreachable database or store is not: run it again later.
            Err(e) => return self.infra_retry(claim, report, format!("payload: {e}")),
        };
        let exec = match self.runner.spawn(&ctx) {
            Ok(x) => x,
            Err(e) => {
                // The runner cannot start: the worker's fault, not the job's. Give the
                // instance back and stop this worker.
                report.end = now_ms();
                report.message = Some(e.to_string());
                if let Ok(mut f) = self.fatal.lock() {
                    f.get_or_insert(e);
                }
                self.shutdown.graceful();
                return (report.clone(), Some(Outcome::Released(report)));
            }
        };
        let killer = exec.killer.clone();
        let live = self.opts.live_dir.as_ref().map(|d| {
            let (id, n) = (claim.token.id, claim.token.token);
            (
                d.join(format!("{id}.{n}.stdout")),
                d.join(format!("{id}.{n}.stderr")),
            )
        });
        let (live_out, live_err) = match &live {
            Some((o, e)) => (open_live(o), open_live(e)),
            None => (None, None),
        };
        let blobs = self.blobs.clone();
        // Thrown when the job is over but something still holds its pipes open.
        let cut = Cut::default();
        let mut stdout = CutReader::new(Inspect::new(exec.stdout, Mirror(live_out)), cut.clone());
        let stderr = exec
            .stderr
            .map(|e| CutReader::new(Inspect::new(e, Mirror(live_err)), cut.clone()));
        let (feed_cut, feed_killer) = (cut.clone(), killer.clone());
        let feed = async move {
            let Some(mut stdin) = exec.stdin else {
                return Ok(());
            };
            let mut payload = payload;
            let r = tokio::select! {
                r = tokio::io::copy(&mut payload, &mut stdin) => r,
                _ = feed_cut.wait() => Ok(0),
            };
            match r {
                // The runner may exit without reading all of its input.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
                Err(e) => {
                    // Never let the runner see the end of a payload that failed.
                    feed_killer.stop(Stop::Kill);
                    return Err(e);
                }
            }
            let _ = stdin.shutdown().await;
            Ok(())
        };
        let out_store = blobs.clone();
        let outputs = async move { store_output(out_store.as_ref(), &mut stdout).await };
        let err_store = blobs.clone();
        let errors = async move {
            match stderr {
                Some(mut s) => Some(store_output(err_store.as_ref(), &mut s).await),
                None => None,
            }
        };
        let (group, settle_cut) = (killer.clone(), cut.clone());
        let grace = self.opts.kill_grace;
        let waiting = async move {
            let st = exec.wait.await;
            // The job is its process group: once the leader exits, stragglers (which
            // may still hold its output open) are stopped too; whatever is left after
            // the grace period (even outside the group) is killed and the output cut.
            tokio::spawn(settle(group, grace, settle_cut));
            st
        };
        let work = async { tokio::join!(feed, outputs, errors, waiting) };
        tokio::pin!(work);

        #[derive(PartialEq)]
        enum Stopped {
            Timeout,
            Cancel,
            Lost,
            Shutdown,
        }
        let mut stopped: Option<Stopped> = None;
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut force_at: Option<Instant> = None;
        let mut cut_at: Option<Instant> = None;
        // The lease as this worker knows it: if renewals keep failing until it runs
        // out, the job is stopped here before another worker may take it over.
        let lease_ms = self.opts.lease.as_millis() as i64;
        let mut lease_end = Instant::now()
            + Duration::from_millis((claim.start + lease_ms - now_ms()).max(0) as u64);
        let hb_every = (self.opts.lease / 3).max(Duration::from_millis(50));
        let mut next_hb = Instant::now() + hb_every;
        let mut last_check = Instant::now();
        let far = Instant::now() + Duration::from_secs(86400 * 365);
        let results = loop {
            let seen = self.queue.change_seq();
            let mut stop_now: Option<Stopped> = None;
            tokio::select! {
                res = &mut work => break res,
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && stopped.is_none() => {
                    stop_now = Some(Stopped::Timeout);
                }
                _ = tokio::time::sleep_until(force_at.unwrap_or(far)), if force_at.is_some() => {
                    // Aimed: a killer signals only its own execution, and nothing
                    // once released (Killer's contract).
                    killer.stop(Stop::Kill);
                    force_at = None;
                    cut_at = Some(Instant::now() + self.opts.kill_grace);
                }
                _ = tokio::time::sleep_until(cut_at.unwrap_or(far)), if cut_at.is_some() => {
                    // Killed, yet something still holds the output open.
                    cut_at = None;
                    let k = killer.clone();
                    let _ = tokio::task::spawn_blocking(move || k.stop_all()).await;
                    cut.cut();
                }
                _ = tokio::time::sleep_until(lease_end), if stopped.is_none() => {
                    tracing::warn!("instance {}: lease ran out without renewal; stopping it", claim.token.id);
                    stop_now = Some(Stopped::Lost);
                }
                _ = tokio::time::sleep_until(next_hb) => {
                    next_hb = Instant::now() + hb_every;
                    let before = Instant::now();
                    // Bounded: a call hanging on a dead connection must not keep this
                    // loop from seeing the lease run out (and fencing itself).
                    let left = lease_end.saturating_duration_since(before).max(Duration::from_millis(1));
                    match tokio::time::timeout(left, self.queue.heartbeat(&claim.token, self.opts.lease)).await {
                        Ok(Ok(hb)) if hb.cancel_requested => {
                            lease_end = before + self.opts.lease;
                            stop_now = Some(Stopped::Cancel);
                        }
                        Ok(Ok(_)) => lease_end = before + self.opts.lease,
                        Ok(Err(Error::Fenced { .. })) => stop_now = Some(Stopped::Lost),
                        Ok(Err(e)) => tracing::warn!("heartbeat for instance {} failed: {e}", claim.token.id),
                        Err(_) => tracing::warn!("heartbeat for instance {} timed out", claim.token.id),
                    }
                }
                _ = async {
                    // At most one look every CHECK_EVERY, however busy the queue is.
                    tokio::time::sleep_until(last_check + CHECK_EVERY).await;
                    self.queue.wait_change(seen, hb_every).await
                }, if stopped.is_none() => {
                    // Something changed: look for a cancel request (or a lost lease)
                    // without waiting for the next heartbeat.
                    last_check = Instant::now();
                    let left = lease_end.saturating_duration_since(last_check).max(Duration::from_millis(1));
                    match tokio::time::timeout(left, self.queue.status(&claim.token)).await {
                        Ok(Ok(hb)) if hb.cancel_requested => stop_now = Some(Stopped::Cancel),
                        Ok(Ok(_)) => {}
                        Ok(Err(Error::Fenced { .. })) => stop_now = Some(Stopped::Lost),
                        Ok(Err(_)) | Err(_) => {}
                    }
                }
                _ = self.shutdown.wait_level(2), if stopped.is_none() => {
                    stop_now = Some(Stopped::Shutdown);
                }
            }
            if let Some(s) = stop_now {
                if stopped.is_none() {
                    if s == Stopped::Lost {
                        // Another worker may own the instance now: stop at once.
                        killer.stop(Stop::Kill);
                        force_at = Some(Instant::now());
                    } else {
                        killer.stop(Stop::Terminate);
                        force_at = Some(Instant::now() + self.opts.kill_grace);
                    }
                    stopped = Some(s);
                }
            }
        };
        if let Some((o, e)) = &live {
            let _ = std::fs::remove_file(o);
            let _ = std::fs::remove_file(e);
        }
        let (fed, out, err, status) = results;
        report.end = now_ms();
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                report.message = Some(format!("waiting for runner: {e}"));
                ExitStatus::default()
            }
        };
        report.exit_code = status.code;
        report.signal = status.signal;
        let mut problems: Vec<String> = Vec::new();
        let mut store_failed = false;
        match out {
            Ok(Stored { info, inline }) => {
                report.stdout = Some(info);
                report.inline.extend(inline);
            }
            Err(e) => {
                // A broken output stream is the job's failure; anything else is the store's.
                store_failed |= !matches!(e, Error::Stream { .. });
                problems.push(format!("storing stdout: {e}"));
            }
        }
        match err {
            Some(Ok(Stored { info, inline })) => {
                report.stderr = Some(info);
                report.inline.extend(inline);
            }
            Some(Err(e)) => {
                store_failed |= !matches!(e, Error::Stream { .. });
                problems.push(format!("storing stderr: {e}"));
            }
            None => {}
        }
        if let Err(e) = fed {
            problems.push(format!("feeding payload: {e}"));
        }
        match stopped {
            Some(Stopped::Lost) => {
                report.message = Some("lease lost to another worker; attempt abandoned".into());
                return (report, None);
            }
            Some(Stopped::Shutdown) => {
                report.message = Some("worker shut down; returned to pending".into());
                return (report.clone(), Some(Outcome::Released(report)));
            }
            Some(Stopped::Cancel) => {
                report.message = Some("cancelled".into());
                return (report.clone(), Some(Outcome::Cancelled(report)));
            }
            Some(Stopped::Timeout) => {
                let secs = timeout.map_or(0.0, |t| t.as_secs_f64());
                let msg = format!("timed out after {secs}s ({status})");
                return fail(report, msg, claim);
            }
            None => {}
        }
        if store_failed {
            let msg = format!("{}; output not stored", problems.join("; "));
            return self.infra_retry(claim, report, msg);
        }
        if !status.success() {
            problems.insert(0, status.to_string());
        }
        if let Some(m) = report.message.take() {
            problems.insert(0, m);
        }
        if problems.is_empty() {
            report.cache_key = Some(cache_key(&claim.job, &self.runner.spec(), timeout));
            (report.clone(), Some(Outcome::Success(report)))
        } else {
            fail(report, problems.join("; "), claim)
        }
    }

    /// Opens a job's payload: up to [`PREFETCH`] bytes are read (and so verified)
    /// before this returns; a larger payload streams.
    async fn prefetch(&self, job: &Hash) -> Result<Reader> {
        use tokio::io::AsyncReadExt;
        if let Some(bytes) = crate::checked_inline(self.queue.as_ref(), job).await? {
            return Ok(Box::pin(std::io::Cursor::new(bytes)));
        }
        let r = self.blobs.get(job).await?;
        let mut head = Vec::new();
        let mut limited = r.take(PREFETCH + 1);
        limited
            .read_to_end(&mut head)
            .await
            .map_err(|e| Error::Stream {
                what: format!("payload {job}"),
                source: e,
            })?;
        let rest = limited.into_inner();
        if head.len() as u64 <= PREFETCH {
            return Ok(Box::pin(std::io::Cursor::new(head)));
        }
        Ok(Box::pin(std::io::Cursor::new(head).chain(rest)))
    }

    fn failure(&self, claim: &Claim, report: AttemptReport) -> Outcome {
        let budget = claim.retries.unwrap_or(self.opts.retries);
        let retry_at = policy::retry_number(claim.failures, budget).map(|n| {
            let wait = backoff(self.opts.backoff, self.opts.backoff_max, n);
            now_ms() + wait.as_millis() as i64
        });
        Outcome::Failure { report, retry_at }
    }
}

/// How many times an attempt that failed because the database or the blob store was
/// unreachable (payload unreadable, output not stored) is run again before it counts
/// as an ordinary failure.
pub const STORE_RETRIES: u32 = 10;

/// Settles an execution whose main process has ended: what it left running (in its
/// process group, or anywhere with its attempt id) gets SIGTERM, and up to `grace` to
/// end; whatever is left then is killed (SIGKILL) and the output cut, even if
/// something outside the attempt's reach still holds it open. Then the killer is
/// released. An execution that left nothing costs one look (and a timer).
async fn settle(killer: Arc<dyn Killer>, grace: Duration, cut: Cut) {
    let alive = |k: &Arc<dyn Killer>| {
        let k = k.clone();
        async move {
            tokio::task::spawn_blocking(move || k.alive())
                .await
                .unwrap_or(true)
        }
    };
    let until = Instant::now() + grace;
    if alive(&killer).await {
        killer.stop(Stop::Terminate);
        let mut left = true;
        while left && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            left = alive(&killer).await;
        }
        if left {
            let k = killer.clone();
            let _ = tokio::task::spawn_blocking(move || k.stop_all()).await;
        }
    }
    let _ = tokio::task::spawn_blocking(move || killer.release()).await;
    tokio::time::sleep_until(until).await;
    cut.cut();
}

/// `base · 2^(n-1)`, capped at `max`, times a random factor in [0.5, 1.5).
fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    policy::backoff(base, max, n, 0.5 + fastrand::f64())
}

fn send(
    reports: &Option<mpsc::UnboundedSender<Report>>,
    claim: &Claim,
    report: AttemptReport,
    finished: Option<Finished>,
) {
    if let Some(tx) = reports {
        let _ = tx.send(Report {
            job: claim.job,
            instance: claim.token.id,
            created: claim.created,
            attempt: claim.token.token,
            report,
            finished,
        });
    }
}

fn open_live(path: &PathBuf) -> Option<std::fs::File> {
    std::fs::File::create(path)
        .map_err(|e| tracing::warn!("live output {}: {e}", path.display()))
        .ok()
}

/// Mirrors every byte of a job's output into a local file for live readers. A
/// failure to mirror never fails the job: the mirror is dropped instead.
struct Mirror(Option<std::fs::File>);

impl Inspector for Mirror {
    fn chunk(&mut self, bytes: &[u8]) {
        use std::io::Write;
        if let Some(f) = self.0.as_mut() {
            if f.write_all(bytes).is_err() {
                self.0 = None;
            }
        }
    }
}
