//! `verify`, `prune` and `gc`.

use super::*;

/// `verify`: every blob re-hashed, every reference checked.
pub(super) async fn verify(db: &BatchDb) -> Result<ExitCode> {
    let mut out_err = None;
    let sum = db
        .verify(|p| {
            let json = serde_json::to_string(&p).unwrap_or_default();
            if let Err(e) = line(format_args!("{json}")) {
                out_err.get_or_insert(e);
            }
        })
        .await?;
    if let Some(e) = out_err {
        return Err(e);
    }
    eprintln!(
        "batchdb: verified {} blobs ({} bytes), {} inline blobs ({} bytes) and {} references: {} problems",
        sum.blobs, sum.bytes, sum.inline, sum.inline_bytes, sum.references, sum.problems
    );
    if sum.problems > 0 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `gc`: blobs no row names, and files killed processes left behind, removed.
pub(super) async fn gc(db: &BatchDb, dry_run: bool, grace: f64) -> Result<ExitCode> {
    let opts = {
        let mut o = GcOptions::new(secs("grace", grace)?);
        o.dry_run = dry_run;
        o
    };
    let verb = if dry_run { "would remove" } else { "removed" };
    // Each removal is printed as it happens (a later failure loses no line).
    let sum = db
        .gc(opts, |e| {
            let _ = line(format_args!("{verb} {} {}", e.hash, e.size));
        })
        .await?;
    // What killed processes left: temporary files, live output of ended attempts.
    let left = db
        .sweep(opts, |l| {
            let _ = line(format_args!(
                "{verb} leftover {} {}",
                l.path.display(),
                l.size
            ));
        })
        .await?;
    eprintln!(
        "batchdb: examined {} blobs; {verb} {} ({} bytes) and {left} leftover files",
        sum.blobs, sum.removed, sum.bytes
    );
    Ok(ExitCode::SUCCESS)
}

/// A `--older-than` / `--prune-after` duration (`30d`, `12h`, `1h 30m`, `45s`).
pub(super) fn duration(what: &'static str, s: &str) -> Result<Duration> {
    humantime::parse_duration(s.trim()).map_err(|e| Error::Config {
        what,
        value: s.into(),
        why: format!("{e}; expected a duration such as 30d, 12h, 90m or 45s"),
    })
}

/// `prune`: ended instances older than the cutoff removed, bounded step by step;
/// one JSON line of what was removed (or, with `--dry-run`, would be).
pub(super) async fn prune(db: &BatchDb, p: PruneArgs) -> Result<ExitCode> {
    let age = duration("older-than", &p.older_than)?;
    let mut req = PruneRequest::older_than(age);
    if !p.states.is_empty() {
        (req.result, req.fail, req.cancelled) = (false, false, false);
        for s in &p.states {
            match s.as_str() {
                "result" => req.result = true,
                "fail" => req.fail = true,
                "cancelled" => req.cancelled = true,
                other => {
                    return Err(Error::Config {
                        what: "state",
                        value: other.into(),
                        why: "expected result, fail or cancelled".into(),
                    });
                }
            }
        }
    }
    if p.dry_run {
        let n = db.prune_count(&req).await?;
        line(format_args!(
            "{}",
            serde_json::json!({ "dry_run": true, "instances": n })
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let counts = db.prune(&req).await?;
    let mut json = serde_json::to_value(counts).unwrap_or_default();
    json["dry_run"] = false.into();
    line(format_args!("{json}"))?;
    Ok(ExitCode::SUCCESS)
}

/// Runs `batchdb prune --older-than AGE` now and periodically until aborted,
/// logging each run that removed something (and each failure).
pub(super) fn prune_in_background(db: &BatchDb, age: Duration) -> tokio::task::JoinHandle<()> {
    let db = db.clone();
    tokio::spawn(async move {
        db.prune_periodically(age, |r| match r {
            Ok(c) if c.instances > 0 => tracing::info!(
                "pruned {} instances ended more than {} ago ({} events, {} jobs)",
                c.instances,
                humantime::format_duration(age),
                c.events,
                c.jobs
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("prune: {e}"),
        })
        .await;
    })
}
