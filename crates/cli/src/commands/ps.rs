//! `ps`: the newest instances as an aligned table for a person to read (scripts use
//! `list`), and `status` as one readable line on a terminal.

use std::collections::HashMap;
use std::io::IsTerminal;

use batchdb::queue::{Counts, InstanceSummary, RecentQuery};
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::*;
use crate::args::PsArgs;

/// `ps [--state S]... [--batch NAME] [--limit N]`.
pub(super) async fn ps(db: &BatchDb, a: PsArgs) -> Result<ExitCode> {
    let mut q = RecentQuery::newest(a.limit);
    q.states = a
        .states
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<State>>>()?;
    if let Some(b) = &a.batch {
        batchdb::queue::check_batch_name(b)?;
    }
    q.batch = a.batch;
    let rows = db.recent(&q).await?;
    let now = now_ms();
    // A batch column only when one of the rows is in a batch.
    let batches = rows.iter().any(|r| r.batch.is_some());
    let mut header: Vec<String> = HEADER.map(String::from).to_vec();
    if batches {
        header.insert(header.len() - 1, "BATCH".into());
    }
    let mut table = vec![header];
    let mut states = vec![None];
    // A payload whose blob is gone says so; any other error fails `ps`.
    let previews: HashMap<Hash, String> = db
        .previews(rows.iter().map(|r| r.job))
        .await
        .into_iter()
        .map(|(job, p)| match p {
            Err(Error::BlobNotFound(_)) => Ok((job, "(payload missing)".into())),
            p => p.map(|p| (job, p)),
        })
        .collect::<Result<_>>()?;
    for r in &rows {
        let preview = previews.get(&r.job).cloned().unwrap_or_default();
        let mut row = cells(r, preview, now);
        if batches {
            row.insert(row.len() - 1, r.batch.clone().unwrap_or_else(|| "-".into()));
        }
        table.push(row);
        states.push(Some(r.state));
    }
    let terminal = std::io::stdout().is_terminal();
    let style = Styling {
        colour: terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        width: terminal_width(terminal),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for line in render(&table, &states, &style) {
        writeln!(out, "{line}").map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)?;
    Ok(ExitCode::SUCCESS)
}

const HEADER: [&str; 7] = ["ID", "STATE", "AGE", "TIME", "TRIES", "EXIT", "COMMAND"];

/// One row's cells, in [`HEADER`]'s order.
fn cells(r: &InstanceSummary, preview: String, now: i64) -> Vec<String> {
    let time = match (r.start, r.end, r.state) {
        (Some(s), None, State::Running) => span(now - s),
        (Some(s), Some(e), _) => span(e - s),
        _ => "-".into(),
    };
    let exit = match (r.exit_code, r.signal) {
        (Some(c), _) => c.to_string(),
        (None, Some(s)) => format!("sig {s}"),
        (None, None) => "-".into(),
    };
    vec![
        r.id.to_string(),
        r.state.as_str().into(),
        span(now - r.created),
        time,
        r.attempts.to_string(),
        exit,
        preview,
    ]
}

/// How the table is drawn: in colour, and cut to a width (a terminal's).
struct Styling {
    colour: bool,
    width: Option<usize>,
}

/// The table's lines: every column but the last padded to its widest cell (in
/// terminal columns, so wide characters line up), the last cut to the width.
fn render(table: &[Vec<String>], states: &[Option<State>], style: &Styling) -> Vec<String> {
    let columns = table.first().map_or(0, Vec::len);
    let last = columns.saturating_sub(1);
    let mut widths = vec![0usize; columns];
    for row in table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.width());
        }
    }
    let used: usize = widths[..last].iter().map(|w| w + 2).sum();
    let room = style.width.map(|w| w.saturating_sub(used).max(10));
    table
        .iter()
        .zip(states)
        .map(|(row, state)| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let text = if i == last {
                    cut(cell, room)
                } else {
                    pad(cell, widths[i])
                };
                let text = match (i, state) {
                    (1, Some(s)) if style.colour => paint(*s, &text),
                    (_, None) if style.colour => {
                        console::style(text).bold().force_styling(true).to_string()
                    }
                    _ => text,
                };
                line.push_str(&text);
                if i < last {
                    line.push_str("  ");
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

fn pad(cell: &str, width: usize) -> String {
    let mut s = cell.to_owned();
    s.extend(std::iter::repeat_n(' ', width.saturating_sub(cell.width())));
    s
}

/// `text` cut to `room` terminal columns (with `…` when cut).
fn cut(text: &str, room: Option<usize>) -> String {
    let Some(room) = room else {
        return text.to_owned();
    };
    if text.width() <= room {
        return text.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        let w = c.width().unwrap_or(0);
        if used + w + 1 > room {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

fn paint(state: State, text: &str) -> String {
    let s = console::style(text).force_styling(true);
    match state {
        State::Result => s.green(),
        State::Fail => s.red(),
        State::Running => s.yellow(),
        State::Pending => s.cyan(),
        State::Waiting => s.blue(),
        State::Cancelled => s.dim(),
    }
    .to_string()
}

/// A span of milliseconds the way `ps` shows it: `850ms`, `12.3s`, `4m05s`, `3h20m`,
/// `2d04h`.
fn span(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", s / 60, s % 60),
        3_600_000..86_400_000 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// The width to cut the table to: `COLUMNS` if set, else the terminal's; none when
/// stdout is not a terminal.
fn terminal_width(terminal: bool) -> Option<usize> {
    if let Some(c) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(c);
    }
    terminal
        .then(|| console::Term::stdout().size_checked())
        .flatten()
        .map(|(_, cols)| usize::from(cols))
}

fn now_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// `status` on a terminal: `3 pending, 1 running, 10 results, 2 failed` (states with
/// none are left out, but for pending and running).
pub(super) fn status_line(c: &Counts) -> String {
    let mut parts = vec![
        format!("{} pending", c.pending),
        format!("{} running", c.running),
    ];
    let rest = [
        (c.waiting, "waiting"),
        (c.result, if c.result == 1 { "result" } else { "results" }),
        (c.fail, "failed"),
        (c.cancelled, "cancelled"),
        (
            c.unrunnable,
            "unrunnable for now (no live worker has what they need)",
        ),
    ];
    parts.extend(
        rest.iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}")),
    );
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_as_a_person_says_them() {
        assert_eq!(span(850), "850ms");
        assert_eq!(span(12_345), "12.3s");
        assert_eq!(span(245_000), "4m05s");
        assert_eq!(span(12_000_000), "3h20m");
        assert_eq!(span(187_200_000), "2d04h");
        assert_eq!(span(-5), "0ms");
    }

    #[test]
    fn cutting_counts_terminal_columns_of_wide_characters() {
        assert_eq!(cut("日本語のテキスト", Some(7)), "日本語…");
        assert_eq!(cut("short", Some(7)), "short");
        assert_eq!(cut("exactly7", Some(7)), "exactl…");
        assert_eq!(cut("anything", None), "anything");
    }
}
