//! `list`, `events`, `status`: what the database holds, as JSON lines.

use super::*;

/// `list KIND [--batch NAME]`: one JSON object per row, streamed.
pub(super) async fn list(db: &BatchDb, kind: String, batch: Option<String>) -> Result<ExitCode> {
    let kind: ListKind = kind.parse()?;
    if let Some(b) = &batch {
        batchdb::queue::check_batch_name(b)?;
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let rows = db.list(kind, batch);
    futures_util::pin_mut!(rows);
    while let Some(row) = rows.next().await {
        let row = row?;
        serde_json::to_writer(&mut out, &row).map_err(|e| stdout_err(e.into()))?;
        out.write_all(b"\n").map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)?;
    Ok(ExitCode::SUCCESS)
}

/// `events`: the event log, followed with `-f`.
pub(super) async fn events(db: &BatchDb, follow: bool, after: i64) -> Result<ExitCode> {
    let events = db.events(after, follow);
    futures_util::pin_mut!(events);
    while let Some(ev) = events.next().await {
        let ev = ev?;
        let json = serde_json::to_string(&ev).map_err(|e| stdout_err(e.into()))?;
        line(format_args!("{json}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `status`: instance counts by state.
pub(super) async fn status(db: &BatchDb, json: bool) -> Result<ExitCode> {
    print_counts(&db.counts().await?, json)
}

/// Counts by state: one readable line on a terminal, else (or with `json`) the JSON
/// object scripts read.
pub(super) fn print_counts(c: &batchdb::queue::Counts, json: bool) -> Result<ExitCode> {
    use std::io::IsTerminal;
    if !json && std::io::stdout().is_terminal() {
        line(format_args!("{}", super::ps::status_line(c)))?;
    } else {
        let text = serde_json::to_string(c).map_err(|e| stdout_err(e.into()))?;
        line(format_args!("{text}"))?;
    }
    Ok(ExitCode::SUCCESS)
}
