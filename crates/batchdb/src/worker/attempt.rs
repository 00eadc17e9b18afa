//! One attempt: the payload fed in, the outputs stored (inline when small), the
//! lease renewed and the stops (timeout, cancel, lost lease, shutdown) carried out
//! while it runs, what it left behind settled after it ends.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use super::classify::{Ended, Stopped, Verdict, classify};
use super::{LiveSink, OutputStream, Worker, WorkerPort};
use crate::blob::BlobInfo;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::io::{Cut, CutReader, Inspect, Inspector};
use crate::queue::{AttemptReport, Claim, ClaimToken, Outcome, cache_key, now_ms};
use crate::runner::{ExitStatus, Killer, Reader, RunContext, Stop};

/// An attempt's report and outcome (`None`: lease lost, record nothing).
pub(super) type Attempted = (AttemptReport, Option<Outcome>);

/// What the parts of a running attempt ended with: feeding the payload, storing
/// stdout, storing stderr (if the runner has one), waiting for the runner.
type Results = (
    io::Result<()>,
    Result<Stored>,
    Option<Result<Stored>>,
    io::Result<ExitStatus>,
);

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
    store: &dyn WorkerPort,
    (t, stream): (&ClaimToken, OutputStream),
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
    let info = store.put_mirrored(t, stream, &mut rest).await?;
    Ok(Stored { info, inline: None })
}

/// Settles an execution whose main process has ended: what it left running (in its
/// process group, or anywhere with its attempt id) gets SIGTERM, and up to `grace` to
/// end; whatever is left then is killed (SIGKILL) and the output cut, even if
/// something outside the attempt's reach still holds it open. Then the killer is
/// released. An execution that left nothing costs one look (and a timer). If its
/// output is still open when the grace ends although that look found nothing (a
/// process caught mid-`exec`, say), everything carrying the attempt's mark is killed
/// before the cut, so no leftover outlives a job that ended.
async fn settle(killer: Arc<dyn Killer>, grace: Duration, cut: Cut, drained: Arc<AtomicBool>) {
    let alive = |k: &Arc<dyn Killer>| {
        let k = k.clone();
        async move {
            tokio::task::spawn_blocking(move || k.alive())
                .await
                .unwrap_or(true)
        }
    };
    let until = Instant::now() + grace;
    // One look, and (if nothing is left, the common case) the release, in one trip
    // to a blocking thread.
    let k = killer.clone();
    let left = tokio::task::spawn_blocking(move || {
        let left = k.alive();
        if !left {
            k.release();
        }
        left
    })
    .await
    .unwrap_or(true);
    if left {
        killer.stop(Stop::Terminate);
        let mut left = true;
        while left && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            left = alive(&killer).await;
        }
        let k = killer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if left {
                k.stop_all();
            }
            k.release();
        })
        .await;
    }
    // Until the grace ends the output may still be open: once it has drained there
    // is nothing left to cut (and the worker's run need not wait for this).
    while !drained.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= until {
            break;
        }
        tokio::time::sleep((until - now).min(Duration::from_millis(50))).await;
    }
    if !left && !drained.load(Ordering::SeqCst) {
        let k = killer.clone();
        let _ = tokio::task::spawn_blocking(move || k.stop_all()).await;
    }
    cut.cut();
}

/// The settling of a worker's ended attempts (see
/// [`Worker::settling`](super::Worker::settling)).
#[derive(Debug, Default, Clone)]
pub struct Settling(Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl Settling {
    /// Keeps `task` (and forgets those already done).
    fn add(&self, task: tokio::task::JoinHandle<()>) {
        if let Ok(mut tasks) = self.0.lock() {
            tasks.retain(|t| !t.is_finished());
            tasks.push(task);
        }
    }

    /// Waits until every attempt ended so far is settled: what it left running
    /// stopped, its cgroup removed (each within the kill grace after it ended).
    pub async fn wait(&self) {
        let tasks = self.0.lock().map(|mut t| std::mem::take(&mut *t));
        for t in tasks.unwrap_or_default() {
            let _ = t.await;
        }
    }
}

/// Stores a job's stdout and (if separate) stderr as they stream, and sets `drained`
/// once both reached their end (nothing holds them open any more). Each reader is
/// dropped as soon as its own store ends, so a failed store closes that pipe at once
/// (the job then gets EPIPE instead of blocking on it).
async fn store_outputs<R: tokio::io::AsyncRead + Send + Unpin>(
    (blobs, t): (Arc<dyn WorkerPort>, ClaimToken),
    stdout: R,
    stderr: Option<R>,
    drained: Arc<AtomicBool>,
) -> (Result<Stored>, Option<Result<Stored>>) {
    let out_store = blobs.clone();
    let outputs = async move {
        let mut stdout = stdout;
        store_output(out_store.as_ref(), (&t, OutputStream::Stdout), &mut stdout).await
    };
    let errors = async move {
        let mut stderr = stderr?;
        Some(store_output(blobs.as_ref(), (&t, OutputStream::Stderr), &mut stderr).await)
    };
    let both = tokio::join!(outputs, errors);
    drained.store(true, Ordering::SeqCst);
    both
}

/// Mirrors every byte of a job's output for live readers (see [`WorkerPort::live`]).
/// A failure to mirror never fails the job: the mirror is dropped instead (and a port
/// that would have kept it as the output's blob stores the output another way).
struct Mirror(Option<LiveSink>);

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

impl Worker {
    /// Runs one attempt and decides its outcome (`None`: lease lost, record nothing).
    pub(super) async fn execute(&self, claim: &Claim) -> (AttemptReport, Option<Outcome>) {
        let timeout = claim.timeout.or(self.opts.timeout);
        let mut report = AttemptReport {
            start: claim.start,
            ..AttemptReport::default()
        };
        let deps = match self.deps_file(claim).await {
            Ok(d) => d,
            // The database or the local disk failed, not the job: run it again later.
            Err(e) => return self.infra_retry(claim, report, format!("dependencies: {e}")),
        };
        let ctx = self.context(claim, deps.as_ref());
        // A payload up to PREFETCH bytes is read and verified against its hash before
        // anything runs, so a corrupt payload never reaches the runner; a larger one
        // streams, and a corruption found at its end kills the run.
        let payload: Reader = match self.prefetch(claim).await {
            Ok(p) => p,
            // A missing or corrupt payload is the job's failure...
            Err(e @ (Error::BlobNotFound(_) | Error::BlobCorrupt { .. })) => {
                return self.fail(claim, report, format!("payload: {e}"));
            }
            // ...an unreachable database or store is not: run it again later.
            Err(e) => return self.infra_retry(claim, report, format!("payload: {e}")),
        };
        let exec = match self.runner.spawn_async(&ctx).await {
            Ok(x) => x,
            // Its directory, its limits or its cgroup: the job's failure, not the
            // worker's (which goes on with the next job).
            Err(Error::AttemptSetup(m)) => return self.fail(claim, report, m),
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
        let live_out = self.port.live(&claim.token, OutputStream::Stdout);
        let live_err = self.port.live(&claim.token, OutputStream::Stderr);
        let blobs = self.port.clone();
        // Thrown when the job is over but something still holds its pipes open.
        let cut = Cut::default();
        let stdout = CutReader::new(Inspect::new(exec.stdout, Mirror(live_out)), cut.clone());
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
                () = feed_cut.wait() => Ok(0),
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
        let drained = Arc::new(AtomicBool::new(false));
        let streams = store_outputs((blobs, claim.token), stdout, stderr, drained.clone());
        let (group, settle_cut) = (killer.clone(), cut.clone());
        let grace = self.opts.kill_grace;
        let settling = self.settling.clone();
        let waiting = async move {
            let st = exec.wait.await;
            // The job is its process group: once the leader exits, stragglers (which
            // may still hold its output open) are stopped too; whatever is left after
            // the grace period (even outside the group) is killed and the output cut.
            settling.add(tokio::spawn(settle(group, grace, settle_cut, drained)));
            st
        };
        let work = async {
            let (f, (o, e), w) = tokio::join!(feed, streams, waiting);
            (f, o, e, w)
        };
        let (results, stopped) = self.supervise(claim, &killer, &cut, timeout, work).await;
        let inputs = deps.as_ref().map(|d| d.digest);
        let spec = self.runner.spec();
        let key = cache_key(&claim.job, &spec, timeout, inputs.as_ref(), &claim.context);
        drop(deps);
        self.conclude(claim, report, results, stopped, (timeout, key))
    }

    /// What the runner knows of claim `claim`'s attempt.
    fn context(&self, claim: &Claim, deps: Option<&super::deps::DepsFile>) -> RunContext {
        RunContext {
            job: claim.job,
            instance: claim.token.id,
            created: claim.created,
            attempt: claim.token.token,
            worker: self.opts.name.clone(),
            attempt_id: claim.attempt_id.clone(),
            deps_file: deps.map(|d| d.path.clone()),
            exec: {
                // What the claim gave it, on top of its own variables.
                let mut exec = claim.context.clone();
                exec.env.extend(claim.assigned.env());
                exec
            },
        }
    }

    /// The attempt failed with `msg` (retried if its budget allows).
    fn fail(&self, claim: &Claim, mut report: AttemptReport, msg: String) -> Attempted {
        report.end = now_ms();
        report.message = Some(msg);
        let outcome = self.failure(claim, report.clone());
        (report, Some(outcome))
    }

    /// Records how an attempt ended in `report` and decides its outcome
    /// ([`classify`]).
    fn conclude(
        &self,
        claim: &Claim,
        mut report: AttemptReport,
        (fed, out, err, status): Results,
        stopped: Option<Stopped>,
        (timeout, key): (Option<Duration>, Hash),
    ) -> (AttemptReport, Option<Outcome>) {
        report.end = now_ms();
        let mut ended = Ended {
            stopped,
            timeout,
            ..Ended::default()
        };
        match status {
            Ok(s) => ended.status = s,
            Err(e) => ended.wait_error = Some(format!("waiting for runner: {e}")),
        }
        report.exit_code = ended.status.code;
        report.signal = ended.status.signal;
        report.usage = ended.status.usage;
        for (name, stored) in [("stdout", Some(out)), ("stderr", err)] {
            match stored {
                Some(Ok(Stored { info, inline })) => {
                    if name == "stdout" {
                        report.stdout = Some(info);
                    } else {
                        report.stderr = Some(info);
                    }
                    if let Some(data) = inline {
                        report.keep_inline(data);
                    }
                }
                Some(Err(e)) => {
                    // A broken output stream is the job's failure; anything else is
                    // the store's.
                    ended.store_failed |= !matches!(e, Error::Stream { .. });
                    ended.problems.push(format!("storing {name}: {e}"));
                }
                None => {}
            }
        }
        if let Err(e) = fed {
            ended.problems.push(format!("feeding payload: {e}"));
        }
        match classify(ended) {
            Verdict::Abandon(m) => {
                report.message = Some(m);
                (report, None)
            }
            Verdict::Release(m) => {
                report.message = Some(m);
                (report.clone(), Some(Outcome::Released(report)))
            }
            Verdict::Cancel(m) => {
                report.message = Some(m);
                (report.clone(), Some(Outcome::Cancelled(report)))
            }
            Verdict::Fail(m) => self.fail(claim, report, m),
            Verdict::StoreRetry(m) => self.infra_retry(claim, report, m),
            Verdict::Success => {
                report.cache_key = Some(key);
                (report.clone(), Some(Outcome::Success(report)))
            }
        }
    }
}
