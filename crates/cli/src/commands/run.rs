//! `run`: the worker, printing each ended attempt.

use std::io::IsTerminal;

use batchdb::remote::{RemoteOptions, RemotePort, check_url};
use batchdb::worker::{Worker, WorkerPort};

use super::progress::{self, Progress};
use super::*;
use crate::args::ProgressArgs;

/// The shortest lease `run` takes: renewed every third of it, a shorter one would
/// spend the worker on heartbeats.
const MIN_LEASE: Duration = Duration::from_millis(100);

/// How many PostgreSQL connections a worker with `jobs` slots holds at most: one per
/// four slots, 2 to 16. A slot holds one only while it records an outcome and takes
/// its next job (a few milliseconds a job), so four share one with little waiting,
/// and the second serves the loop's own claims, heartbeats and counts meanwhile.
/// Every connection is a server process that learns the schema and plans each
/// statement anew: 16 workers of 8 slots held 145 where 48 do.
pub(super) fn db_connections(jobs: usize) -> usize {
    jobs.div_ceil(4).clamp(2, batchdb::DEFAULT_DB_CONNECTIONS)
}

/// `batchdb run`: a worker on the database this process opens.
pub(super) async fn run(db: &BatchDb, r: RunArgs) -> Result<ExitCode> {
    // `BATCHDB_TOKEN` may be in the environment for other commands; a --token given
    // on this command line without --server is a mistake.
    if r.token.is_some() && std::env::var("BATCHDB_TOKEN").ok() != r.token {
        return Err(Error::Config {
            what: "token",
            value: "(hidden)".into(),
            why: "--token is a remote worker's: give --server URL too".into(),
        });
    }
    let (runner, opts) = worker_setup(&r)?;
    let prune_age = r
        .prune_after
        .as_deref()
        .map(|d| maint::duration("prune-after", d))
        .transpose()?;
    let worker = db.worker(runner, opts);
    let pruner = prune_age.map(|age| maint::prune_in_background(db, age));
    let port: Arc<dyn WorkerPort> = Arc::new(db.worker_port());
    drive(worker, port, &r, pruner).await
}

/// `batchdb run --server URL`: a worker whose every queue and blob call goes to
/// that server.
pub(super) async fn run_remote(r: RunArgs) -> Result<ExitCode> {
    let (runner, opts) = worker_setup(&r)?;
    let mut remote = RemoteOptions::new(check_url(r.server.as_deref().unwrap_or_default())?);
    remote.token.clone_from(&r.token);
    remote.ca_cert.clone_from(&r.ca_cert);
    if remote.url.starts_with("http://") && !loopback_url(&remote.url) {
        eprintln!(
            "batchdb: warning: {} is plain HTTP: the token, payloads and outputs cross the network in clear text (use https://)",
            remote.url
        );
    }
    let port = Arc::new(RemotePort::connect(&remote).await?);
    tracing::info!("working for {}", remote.url);
    let worker = Worker::with_port(port.clone(), runner, opts);
    drive(worker, port, &r, None).await
}

/// Whether `url`'s host is a loopback name or address.
fn loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The runner and the worker options `r` asks for, checked.
fn worker_setup(r: &RunArgs) -> Result<(Arc<ShellRunner>, WorkerOptions)> {
    let order: Order = r.order.parse()?;
    let mode: batchdb::runner::LimitMode = r.limits.parse()?;
    let enforcer = batchdb::runner::Enforcer::new(mode)?;
    // The worker's startup line: how it enforces limits (shown with -v; a worker
    // that enforces none says so at warning level).
    if enforcer.enforces() {
        tracing::info!("limits: {enforcer}");
    } else {
        tracing::warn!("limits: {enforcer}");
    }
    let runner = Arc::new(ShellRunner::new(&r.shell)?.with_limits(enforcer));
    // This process starts no children but jobs: it adopts what they leave running,
    // so the look for leftovers at each job's end reads its own children only.
    if let Err(e) = batchdb::runner::adopt_orphans() {
        tracing::warn!(
            "not adopting jobs' orphans ({e}): leftovers are looked for among all processes"
        );
    }
    if r.jobs == 0 {
        return Err(Error::Config {
            what: "jobs",
            value: "0".into(),
            why: "expected at least 1 job at a time".into(),
        });
    }
    let lease = secs("lease", r.lease)?;
    if lease < MIN_LEASE {
        return Err(Error::Config {
            what: "lease",
            value: r.lease.to_string(),
            why: format!("expected at least {} s", MIN_LEASE.as_secs_f64()),
        });
    }
    let opts = {
        let mut o = WorkerOptions::default();
        o.concurrency = r.jobs;
        o.order = order;
        o.lease = lease;
        o.timeout = r.timeout.map(|t| secs("timeout", t)).transpose()?;
        o.kill_grace = secs("kill-grace", r.kill_grace)?;
        o.retries = r.retries;
        o.backoff = secs("backoff", r.backoff)?;
        o.cache_all = r.cached;
        o.until_empty = r.until_empty;
        for spec in &r.resource {
            o.resources.add(spec)?;
        }
        o.reserve_after = secs("reserve-after", r.reserve_after)?;
        o.ahead = secs("ahead", r.ahead)?;
        o
    };
    Ok((runner, opts))
}

/// Runs `worker` until it stops, printing each ended attempt (reading results and
/// counts through `port`).
async fn drive(
    worker: Worker,
    port: Arc<dyn WorkerPort>,
    r: &RunArgs,
    pruner: Option<tokio::task::JoinHandle<()>>,
) -> Result<ExitCode> {
    let settling = worker.settling();
    let shutdown = worker.shutdown_handle();
    let stop = shutdown.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            shutdown.escalate();
        }
    });
    let work = tokio::spawn(worker.run(Some(tx)));
    let mut line = RunProgress::new(port.as_ref(), &r.progress, r.print);
    let mut print_error = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let rep = tokio::select! {
            rep = rx.recv() => match rep {
                Some(rep) => rep,
                None => break,
            },
            _ = tick.tick(), if line.progress.shown() => {
                line.refresh().await;
                continue;
            }
        };
        line.ended(&rep);
        if print_error.is_none() {
            let printed = print_report(port.as_ref(), &rep, r.print, &line.progress).await;
            if let Err(e) = printed {
                // Nowhere to report to: give running jobs back and stop, but keep
                // recording what still finishes.
                stop.force();
                print_error = Some(e);
            }
        }
    }
    if line.progress.shown() {
        line.refresh().await;
    }
    line.progress.finish();
    signals.abort();
    if let Some(p) = pruner {
        p.abort();
    }
    let worked = work.await;
    // What the last attempts left running is stopped (and their cgroups removed)
    // before this process exits, within the kill grace.
    settling.wait().await;
    worked.map_err(|e| Error::Task(format!("worker: {e}")))??;
    match print_error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The progress line of `run`: what this worker ended, out of that plus what is
/// pending, waiting or running (the counts refreshed every second).
struct RunProgress<'a> {
    port: &'a dyn WorkerPort,
    progress: Progress,
    done: u64,
    failed: u64,
    /// `done` plus what was left at the last refresh.
    total: u64,
    running: u64,
}

impl<'a> RunProgress<'a> {
    /// Not shown with `--print` when stdout is a terminal: the results' bytes are
    /// the progress there, and would garble the line.
    fn new(port: &'a dyn WorkerPort, flags: &ProgressArgs, print: bool) -> RunProgress<'a> {
        let flags = ProgressArgs {
            progress: flags.progress,
            no_progress: flags.no_progress || (print && std::io::stdout().is_terminal()),
        };
        RunProgress {
            port,
            progress: Progress::new(&flags, progress::BAR),
            done: 0,
            failed: 0,
            total: 0,
            running: 0,
        }
    }

    async fn refresh(&mut self) {
        // A count that fails now is tried again at the next tick; the line only lags.
        if let Ok(c) = self.port.counts().await {
            self.total = self.done + c.pending + c.waiting + c.running;
            self.running = c.running;
        }
        self.draw();
    }

    fn ended(&mut self, rep: &Report) {
        match rep.finished {
            Some(Finished::Result | Finished::Cancelled) => self.done += 1,
            Some(Finished::Fail) => {
                self.done += 1;
                self.failed += 1;
            }
            _ => return,
        }
        self.draw();
    }

    fn draw(&self) {
        let (running, failed) = (self.running, self.failed);
        self.progress
            .set(self.done, Some(self.total.max(self.done)), || {
                format!("done, {running} running, {failed} failed")
            });
    }
}

async fn print_report(
    port: &dyn WorkerPort,
    rep: &Report,
    print: bool,
    line: &Progress,
) -> Result<()> {
    let msg = rep
        .report
        .message
        .as_deref()
        .unwrap_or("")
        .replace('\n', " ");
    let say = |text: String| {
        let mut out = std::io::stdout().lock();
        line.print(&mut out, |o| writeln!(o, "{text}").and_then(|()| o.flush()))
            .map_err(stdout_err)
    };
    match rep.finished {
        Some(Finished::Result) => {
            let Some(out) = rep.report.stdout else {
                return Ok(());
            };
            say(format!("RESULT {} {}", rep.job, out.hash))?;
            if print {
                copy_to(port.blob(&out.hash).await?, tokio::io::stdout(), &out.hash).await?;
            }
        }
        Some(Finished::Fail) => say(format!("FAIL {} {} {msg}", rep.job, rep.created))?,
        Some(Finished::Retry(at)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            let now = now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let wait = (at - now).max(0) as f64 / 1000.0;
            line.note(&format!(
                "batchdb: retry {} {} in {wait:.1}s: {msg}",
                rep.job, rep.created
            ));
        }
        Some(Finished::Cancelled) => {
            line.note(&format!("batchdb: cancelled {} {}", rep.job, rep.created));
        }
        Some(Finished::Released) => line.note(&format!(
            "batchdb: released {} {} back to pending",
            rep.job, rep.created
        )),
        None => line.note(&format!("batchdb: {} {}: {msg}", rep.job, rep.created)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::db_connections;

    #[test]
    fn a_worker_holds_one_connection_per_four_slots_from_2_to_16() {
        let got: Vec<usize> = [1, 2, 8, 9, 16, 64, 1000]
            .into_iter()
            .map(db_connections)
            .collect();
        assert_eq!(got, [2, 2, 2, 3, 4, 16, 16]);
    }
}
