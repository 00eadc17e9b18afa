//! `batches`, `status --batch`, `wait`.

use batchdb::WaitOutcome;

use super::progress::{self, Progress};
use super::*;

/// `batches`: one JSON line per batch, with its counts.
pub(super) async fn batches(db: &BatchDb) -> Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let rows = db.batches();
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.next().await {
        serde_json::to_writer(&mut out, &row?).map_err(|e| stdout_err(e.into()))?;
        out.write_all(b"\n").map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)?;
    Ok(ExitCode::SUCCESS)
}

/// `status --batch NAME`: that batch's counts, in the `status` shape.
pub(super) async fn status(db: &BatchDb, name: &str, json: bool) -> Result<ExitCode> {
    let b = db.batch(name).await?;
    super::list::print_counts(&b.counts, json)
}

/// `wait [SELECTOR...] [--batch NAME] [--timeout SECS]`: exit 0 when every named
/// instance has a result, 1 if any failed or was cancelled (a FAIL line each), 2 on
/// timeout.
pub(super) async fn wait(db: &BatchDb, w: WaitArgs) -> Result<ExitCode> {
    let mut sels: Vec<Selector> = w
        .selectors
        .iter()
        .map(|s| s.parse())
        .collect::<Result<_>>()?;
    if let Some(b) = &w.batch {
        batchdb::queue::check_batch_name(b)?;
        sels.push(Selector::Batch(b.clone()));
    }
    let timeout = w.timeout.map(|t| secs("timeout", t)).transpose()?;
    let line = Progress::new(&w.progress, progress::BAR);
    let outcome = db
        .wait(&sels, timeout, |p| {
            line.set(p.ended, Some(p.total), || {
                format!("ended, {} running, {} failed", p.running, p.failed)
            });
        })
        .await?;
    line.finish();
    report(&outcome)
}

/// Prints the failures and picks the exit code.
fn report(o: &WaitOutcome) -> Result<ExitCode> {
    for f in &o.failures {
        let msg = f.message.replace('\n', " ");
        line(format_args!("FAIL {} {} {msg}", f.job, f.created))?;
    }
    if o.timed_out {
        let p = &o.progress;
        eprintln!(
            "batchdb: wait timed out: {} of {} ended ({} without a result)",
            p.ended, p.total, p.failed
        );
        return Ok(ExitCode::from(2));
    }
    if o.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}
