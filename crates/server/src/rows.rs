//! The dashboard API's rows: a library row with a one-line preview of its payload
//! beside it, and the text filter that matches previews and job keys.
//!
//! The preview is added here, in the API layer, so the JSON-lines rows of
//! `GET /list/{type}` (and the CLI's `list`) keep exactly their shape.

use std::collections::HashMap;

use batchdb::queue::ListRow;
use batchdb::{BatchDb, Hash};
use serde::Serialize;

/// A row as the API answers it: the row's own fields, and `preview`.
#[derive(Debug, Serialize)]
pub(crate) struct Previewed<T> {
    /// The row, its fields unchanged.
    #[serde(flatten)]
    pub row: T,
    /// The payload's first non-blank line (at most 120 bytes, control characters
    /// escaped); `null` if the payload could not be read (e.g. its blob is gone).
    pub preview: Option<String>,
}

/// The job key a list row is about.
pub(crate) fn job_of(row: &ListRow) -> Hash {
    match row {
        ListRow::Job(r) => r.key,
        ListRow::Pending(r) => r.job,
        ListRow::Result(r) => r.key.0,
        ListRow::Fail(r) => r.key.0,
    }
}

/// The preview of each distinct job in `jobs` ([`BatchDb::previews`]); a payload that
/// cannot be read maps to `None` (and is logged).
pub(crate) async fn previews(
    db: &BatchDb,
    jobs: impl IntoIterator<Item = Hash>,
) -> HashMap<Hash, Option<String>> {
    db.previews(jobs)
        .await
        .into_iter()
        .map(|(job, p)| {
            let p = p
                .inspect_err(|e| tracing::debug!("preview of {job}: {e}"))
                .ok();
            (job, p)
        })
        .collect()
}

/// Each row with its job's preview from `known`.
pub(crate) fn attach(
    rows: Vec<ListRow>,
    known: &HashMap<Hash, Option<String>>,
) -> Vec<Previewed<ListRow>> {
    rows.into_iter()
        .map(|row| {
            let preview = known.get(&job_of(&row)).cloned().flatten();
            Previewed { row, preview }
        })
        .collect()
}

/// A case-insensitive text filter: a row matches when its preview contains the text
/// or its job key starts with it.
#[derive(Debug, Clone, Default)]
pub(crate) struct TextFilter(Option<String>);

impl TextFilter {
    /// The filter for `text` (none when it is empty or blank).
    pub(crate) fn new(text: Option<&str>) -> TextFilter {
        TextFilter(
            text.map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_lowercase),
        )
    }

    /// Whether no text was given (everything matches).
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Whether a row of `job` whose payload previews as `preview` matches.
    pub(crate) fn matches(&self, job: &Hash, preview: Option<&str>) -> bool {
        let Some(t) = &self.0 else { return true };
        job.to_string().starts_with(t.as_str())
            || preview.is_some_and(|p| p.to_lowercase().contains(t.as_str()))
    }
}
