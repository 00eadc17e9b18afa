//! `batches`, `status --batch`, `wait`.

use std::io::IsTerminal;

use batchdb::{WaitOutcome, WaitProgress};

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
pub(super) async fn status(db: &BatchDb, name: &str) -> Result<ExitCode> {
    let b = db.batch(name).await?;
    let json = serde_json::to_string(&b.counts).map_err(|e| stdout_err(e.into()))?;
    line(format_args!("{json}"))?;
    Ok(ExitCode::SUCCESS)
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
    let show = w.progress || (!w.no_progress && std::io::stderr().is_terminal());
    let bar = show.then(progress_bar);
    let outcome = db
        .wait(&sels, timeout, |p| {
            if let Some(bar) = &bar {
                draw(bar, p);
            }
        })
        .await?;
    if let Some(bar) = &bar {
        bar.finish();
    }
    report(&outcome)
}

/// A progress line on stderr, redrawn at most 10 times a second (drawn even when
/// stderr is not a terminal: the caller decided it should be shown).
fn progress_bar() -> indicatif::ProgressBar {
    let target =
        indicatif::ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 10);
    let bar = indicatif::ProgressBar::with_draw_target(None, target);
    let style = indicatif::ProgressStyle::with_template(
        "{bar:30} {pos}/{len} ended, {msg} [{elapsed_precise}, {per_sec}, ETA {eta}]",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

fn draw(bar: &indicatif::ProgressBar, p: &WaitProgress) {
    bar.set_length(p.total);
    bar.set_position(p.ended);
    bar.set_message(format!("{} running, {} failed", p.running, p.failed));
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
