//! `run`: the worker, printing each ended attempt.

use super::*;

/// The shortest lease `run` takes: renewed every third of it, a shorter one would
/// spend the worker on heartbeats.
const MIN_LEASE: Duration = Duration::from_millis(100);

pub(super) async fn run(db: &BatchDb, r: RunArgs) -> Result<ExitCode> {
    let order: Order = r.order.parse()?;
    let runner = Arc::new(ShellRunner::new(&r.shell)?);
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
        o
    };
    let prune_age = r
        .prune_after
        .as_deref()
        .map(|d| maint::duration("prune-after", d))
        .transpose()?;
    let worker = db.worker(runner, opts);
    let pruner = prune_age.map(|age| maint::prune_in_background(db, age));
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
    let mut print_error = None;
    while let Some(rep) = rx.recv().await {
        if print_error.is_none() {
            if let Err(e) = print_report(db, &rep, r.print).await {
                // Nowhere to report to: give running jobs back and stop, but keep
                // recording what still finishes.
                stop.force();
                print_error = Some(e);
            }
        }
    }
    signals.abort();
    if let Some(p) = pruner {
        p.abort();
    }
    work.await
        .map_err(|e| Error::Task(format!("worker: {e}")))??;
    match print_error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn print_report(db: &BatchDb, rep: &Report, print: bool) -> Result<()> {
    let msg = rep
        .report
        .message
        .as_deref()
        .unwrap_or("")
        .replace('\n', " ");
    match rep.finished {
        Some(Finished::Result) => {
            let Some(out) = rep.report.stdout else {
                return Ok(());
            };
            line(format_args!("RESULT {} {}", rep.job, out.hash))?;
            if print {
                copy_to(db.get(&out.hash).await?, tokio::io::stdout(), &out.hash).await?;
            }
        }
        Some(Finished::Fail) => line(format_args!("FAIL {} {} {msg}", rep.job, rep.created))?,
        Some(Finished::Retry(at)) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            let now = now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            let wait = (at - now).max(0) as f64 / 1000.0;
            eprintln!(
                "batchdb: retry {} {} in {wait:.1}s: {msg}",
                rep.job, rep.created
            );
        }
        Some(Finished::Cancelled) => eprintln!("batchdb: cancelled {} {}", rep.job, rep.created),
        Some(Finished::Released) => eprintln!(
            "batchdb: released {} {} back to pending",
            rep.job, rep.created
        ),
        None => eprintln!("batchdb: {} {}: {msg}", rep.job, rep.created),
    }
    Ok(())
}
