//! The worker loop: claim → run → finish, with leases, timeouts, retries,
//! cancellation, live output and graceful or forced shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::blob::BlobStore;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::queue::{
    AttemptReport, CacheSpec, Claim, ClaimRequest, Finished, Order, Outcome, Queue, RESERVE_AFTER,
    Resources, millis, now_ms, policy,
};
use crate::runner::{Reader, Runner};

mod attempt;

pub use attempt::Settling;
#[cfg(feature = "remote")]
pub(crate) use port::finish_then_claim;
pub use port::{LiveSink, LocalPort, OutputStream, WorkerPort};
mod classify;
mod deps;
mod live;
mod port;
mod slot;
pub use slot::{AHEAD, HOLD};
mod supervise;
pub mod wire;

/// How often a worker renews its entry among the live workers (it lapses after three
/// times this without renewal).
const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// The longest a worker waits to announce itself or remove its entry (the registry
/// only feeds `status`; claims never wait for it).
const REGISTRY_WAIT: Duration = Duration::from_secs(1);

/// Payloads up to this size are verified before their job starts.
const PREFETCH: u64 = 8 << 20;

/// How a worker behaves.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// Where running jobs' output is mirrored for live readers (`logs -f`), for a
    /// worker built by [`Worker::new`] (a [`LocalPort`]).
    pub live_dir: Option<PathBuf>,
    /// What this worker has to give jobs that need it (`--resource gpu=0,1`): it
    /// claims an instance only when its needs fit what is free.
    pub resources: Resources,
    /// How long an instance whose needs do not fit may wait before this worker stops
    /// claiming smaller ones around it (see [`ClaimRequest::reserve_after`]).
    pub reserve_after: Duration,
    /// A job that ran less than this makes its slot claim one more instance with its
    /// outcome, held to start the moment the next job ends (so that the commit of
    /// each outcome overlaps the next job); a held claim is given back once the job
    /// before it has run [`HOLD`] (or this, if longer; or a quarter of the lease, if
    /// shorter). Zero: a slot claims only what it starts. Default [`AHEAD`] (50 ms).
    /// Not for a worker with [`WorkerOptions::resources`], whose claims are made by
    /// its main loop.
    pub ahead: Duration,
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
            resources: Resources::default(),
            reserve_after: RESERVE_AFTER,
            ahead: AHEAD,
        }
    }
}

/// `host:pid:random`, unique enough to tell workers apart in attempt rows.
pub fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |h| h.trim().to_string());
    format!("{host}:{}:{:04x}", std::process::id(), fastrand::u16(..))
}

/// What a worker reports as each attempt ends (a claim held ahead and given back
/// before it started is not reported: nothing ran).
#[derive(Debug, Clone)]
#[non_exhaustive]
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
            self.graceful();
        } else {
            self.force();
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

/// A worker over one queue and one blob store, reached through a [`WorkerPort`].
pub struct Worker {
    port: Arc<dyn WorkerPort>,
    runner: Arc<dyn Runner>,
    opts: WorkerOptions,
    shutdown: Shutdown,
    /// Set when the worker cannot go on (its runner cannot start).
    fatal: std::sync::Mutex<Option<Error>>,
    /// What of [`WorkerOptions::resources`] no running attempt holds.
    free: std::sync::Mutex<Resources>,
    /// What ended attempts left running, being settled (see [`Worker::settling`]).
    settling: Settling,
}

impl Worker {
    /// A worker over `queue` and `blobs` (a [`LocalPort`] with
    /// [`WorkerOptions::live_dir`]); call [`Worker::run`] to start it.
    pub fn new(
        queue: Arc<dyn Queue>,
        blobs: Arc<dyn BlobStore>,
        runner: Arc<dyn Runner>,
        opts: WorkerOptions,
    ) -> Worker {
        let port = LocalPort::new(queue, blobs, opts.live_dir.clone());
        Worker::with_port(Arc::new(port), runner, opts)
    }

    /// A worker whose queue and blob calls go through `port` (a remote worker's is
    /// HTTP to `batchdb serve`); call [`Worker::run`] to start it.
    pub fn with_port(
        port: Arc<dyn WorkerPort>,
        runner: Arc<dyn Runner>,
        opts: WorkerOptions,
    ) -> Worker {
        Worker {
            port,
            runner,
            shutdown: Shutdown::new(),
            fatal: std::sync::Mutex::new(None),
            free: std::sync::Mutex::new(opts.resources.clone()),
            opts,
            settling: Settling::default(),
        }
    }

    /// The settling of this worker's ended attempts: what each left running is
    /// stopped, and its cgroup removed, in the background, within the kill grace
    /// after it ended ([`Worker::run`] returns without waiting for that). Await
    /// [`Settling::wait`] before the runtime ends (the process exits), so that
    /// nothing an attempt left outlives the worker; `batchdb run` does.
    pub fn settling(&self) -> Settling {
        self.settling.clone()
    }

    /// The handle that stops this worker.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Runs until shut down (or, with `until_empty`, until nothing is pending or
    /// running). Each ended attempt is sent to `reports` (if given) after its row is
    /// committed. While the queue is unreachable it retries with backoff (logging
    /// each failure), forever. Returns an error if the runner cannot start a job: the
    /// instance is given back to pending and the worker stops. A job whose own setup
    /// fails ([`Error::AttemptSetup`]: its working directory, a limit this worker
    /// cannot enforce, its cgroup) is not that: its attempt fails, and the worker
    /// goes on.
    ///
    /// Awaited outside any task (in `block_on`, the body of `#[tokio::main]`), the
    /// worker runs as a task of its own, aborted if this future is dropped: its
    /// database calls then keep to the blocking pool, where the bounds on its
    /// heartbeats and registry calls can cut a wait short (see `io::blocking`).
    pub async fn run(self, reports: Option<mpsc::UnboundedSender<Report>>) -> Result<()> {
        if tokio::task::try_id().is_some() {
            return self.run_here(reports).await;
        }
        match AbortOnDropHandle::new(tokio::spawn(self.run_here(reports))).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::Task(format!("the worker's task: {e}"))),
        }
    }

    /// [`run`](Self::run) on the calling task.
    async fn run_here(self, reports: Option<mpsc::UnboundedSender<Report>>) -> Result<()> {
        let this = Arc::new(self);
        let slots = this.opts.concurrency.max(1);
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut db_errors = 0u32;
        let mut req = ClaimRequest::new(this.opts.name.clone(), slots, this.opts.lease);
        req.order = this.opts.order;
        req.cache = Some(CacheSpec {
            runner: this.runner.spec(),
            default_timeout: this.opts.timeout,
        });
        req.cache_all = this.opts.cache_all;
        req.resources = this.opts.resources.clone();
        req.reserve_after = this.opts.reserve_after;
        let req = Arc::new(req);
        let mut announce = Instant::now();
        loop {
            while tasks.try_join_next().is_some() {}
            if this.shutdown.level() >= 1 {
                break;
            }
            if Instant::now() >= announce && db_errors == 0 {
                announce = Instant::now() + ANNOUNCE_EVERY;
                this.announce().await;
            }
            let seen = this.port.change_seq();
            let free = slots - tasks.len();
            let mut claimed_any = false;
            if free > 0 {
                let ask = ClaimRequest {
                    limit: free,
                    free: this.free_now(),
                    ..(*req).clone()
                };
                match this.port.claim(&ask).await {
                    Ok(claims) => {
                        db_errors = 0;
                        for claim in claims {
                            claimed_any = true;
                            this.start(claim, &req, &mut tasks, reports.as_ref()).await;
                        }
                    }
                    Err(e @ Error::Protocol { .. }) => {
                        // A server of another version: retrying cannot help.
                        if let Ok(mut f) = this.fatal.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                    Err(e) => {
                        db_errors += 1;
                        let wait = backoff(
                            Duration::from_millis(100),
                            Duration::from_secs(10),
                            db_errors,
                        );
                        tracing::warn!("claim failed ({e}); retrying in {wait:?}");
                        // A stop takes effect at once, however long the backoff.
                        tokio::select! {
                            () = tokio::time::sleep(wait) => {}
                            () = this.shutdown.wait_level(1) => {}
                        }
                        continue;
                    }
                }
            }
            if claimed_any && tasks.len() < slots {
                continue;
            }
            if this.opts.until_empty && tasks.is_empty() && !claimed_any && this.empty().await {
                break;
            }
            // Sleep until the queue changes, a slot frees up, or a delayed job may be due.
            tokio::select! {
                () = this.port.wait_change(seen, Duration::from_secs(1)) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                () = this.shutdown.wait_level(1) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
        // Best effort, and never a wait past a stop (not at all while the queue is
        // unreachable): the entry lapses by itself.
        if db_errors == 0 {
            let gone = this.port.worker_gone(&this.opts.name);
            match tokio::time::timeout(REGISTRY_WAIT, gone).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("removing this worker's entry failed: {e}"),
                Err(_) => tracing::warn!("removing this worker's entry timed out"),
            }
        }
        match this.fatal.lock().ok().and_then(|mut f| f.take()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Starts claim `claim` in a slot of its own in `tasks` (or reports its cache hit).
    async fn start(
        self: &Arc<Self>,
        claim: Claim,
        req: &Arc<ClaimRequest>,
        tasks: &mut JoinSet<()>,
        reports: Option<&mpsc::UnboundedSender<Report>>,
    ) {
        let Some(claim) = self.admit(claim, reports).await else {
            return;
        };
        let (w, req, r) = (self.clone(), req.clone(), reports.cloned());
        tasks.spawn(async move { w.run_slot(claim, &req, r.as_ref()).await });
    }

    /// Takes `claim` on: holds what it was assigned, reports it if the result cache
    /// served it (`None`: nothing to run), stops what its lost attempt left running.
    async fn admit(
        &self,
        claim: Claim,
        reports: Option<&mpsc::UnboundedSender<Report>>,
    ) -> Option<Claim> {
        self.hold(&claim.assigned, true);
        if let Some(hit) = claim.cache_hit.clone() {
            send(reports, &claim, hit, Some(Finished::Result));
            return None;
        }
        if let Some(lost) = claim.lost.clone() {
            // Whatever the lost attempt left running here must stop before the
            // instance runs again. Aimed by the lost attempt's own id
            // (Runner::stop_lost): it never reaches a live attempt, here or of any
            // other database.
            let runner = self.runner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                runner.stop_lost(&lost);
            })
            .await;
        }
        Some(claim)
    }

    /// Whether nothing is running and nothing pending that this worker could ever run
    /// (a pending instance needing more than it has waits for another worker).
    async fn empty(&self) -> bool {
        self.port
            .idle(&self.opts.resources)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!("counting instances failed: {e}");
                false
            })
    }

    /// What of the worker's resources no running attempt holds.
    fn free_now(&self) -> Resources {
        self.free.lock().map(|f| f.clone()).unwrap_or_default()
    }

    /// Marks `assigned` as held by an attempt (`held`), or free again.
    fn hold(&self, assigned: &Resources, held: bool) {
        if assigned.is_empty() {
            return;
        }
        if let Ok(mut f) = self.free.lock() {
            if held {
                f.remove(assigned);
            } else {
                f.give_back(assigned);
            }
        }
    }

    /// Records (renews) this worker's entry among the live workers, with what it has.
    async fn announce(&self) {
        let ttl = ANNOUNCE_EVERY * 3;
        let seen = self
            .port
            .worker_seen(&self.opts.name, &self.opts.resources, ttl);
        match tokio::time::timeout(REGISTRY_WAIT, seen).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("announcing this worker failed: {e}"),
            Err(_) => tracing::warn!("announcing this worker timed out"),
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
        let retry_at = Some(now_ms().saturating_add(millis(wait)));
        (report.clone(), Some(Outcome::Failure { report, retry_at }))
    }

    /// Opens a claim's payload: the inline one it came with (checked against the job's
    /// hash), else from the port; up to [`PREFETCH`] bytes are read (and so verified)
    /// before this returns; a larger payload streams.
    async fn prefetch(&self, claim: &Claim) -> Result<Reader> {
        use tokio::io::AsyncReadExt;
        let job = &claim.job;
        if let Some(bytes) = &claim.payload {
            // Read with the claim: checked here, as a read of it would be.
            let bytes = crate::checked(job, bytes.clone())?;
            return Ok(Box::pin(std::io::Cursor::new(bytes)));
        }
        let r = self.port.blob(job).await?;
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
            now_ms().saturating_add(millis(wait))
        });
        Outcome::Failure { report, retry_at }
    }
}

/// How many times an attempt that failed because the database or the blob store was
/// unreachable (payload unreadable, output not stored) is run again before it counts
/// as an ordinary failure.
pub const STORE_RETRIES: u32 = 10;

/// `base · 2^(n-1)`, capped at `max`, times a random factor in [0.5, 1.5).
fn backoff(base: Duration, max: Duration, n: u32) -> Duration {
    policy::backoff(base, max, n, 0.5 + fastrand::f64())
}

fn send(
    reports: Option<&mpsc::UnboundedSender<Report>>,
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
