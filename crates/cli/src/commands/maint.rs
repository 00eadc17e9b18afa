//! `verify` and `gc`.

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
        "batchdb: verified {} blobs ({} bytes) and {} references: {} problems",
        sum.blobs, sum.bytes, sum.references, sum.problems
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
