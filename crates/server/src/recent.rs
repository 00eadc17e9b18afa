//! `GET /api/recent/{type}`: the newest terminal rows, found by reading the event log
//! backwards, a page at a time, with their payload previews.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use batchdb::queue::{EventKind, ListKind, ListRow};
use futures_util::StreamExt;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::AppState;
use crate::api::{PAGE, query};
use crate::error::ApiError;
use crate::rows::{self, TextFilter, job_of};

/// Parameters of `GET /api/recent/{type}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecentParams {
    /// At most this many rows (1..=500, default 50).
    limit: Option<usize>,
    /// Only events older than this one (the `next` of the previous page).
    before: Option<i64>,
    /// Only rows whose payload preview contains this text (any case) or whose job
    /// key starts with it.
    text: Option<String>,
    #[serde(rename = "access_token")]
    _access_token: Option<IgnoredAny>,
}

/// Event-log windows examined per recent request, 1000 events each.
const RECENT_WINDOWS: i64 = 100;

/// Candidates examined per request with a text filter (each needs its row and its
/// payload's preview).
const TEXT_CANDIDATES: usize = 1000;

/// Rows and previews read at once.
const CONCURRENT: usize = 8;

fn kinds(kind: &str) -> Result<(ListKind, EventKind), ApiError> {
    match kind {
        "result" => Ok((ListKind::Result, EventKind::Result)),
        "fail" => Ok((ListKind::Fail, EventKind::Fail)),
        "cancelled" => Ok((ListKind::Cancelled, EventKind::Cancel)),
        _ => Err(ApiError::not_found(
            "unknown recent type: expected result, fail or cancelled",
        )),
    }
}

/// How many instances are in `list`'s state now.
async fn existing(app: &AppState, list: ListKind) -> Result<u64, ApiError> {
    let c = app.db.counts().await?;
    Ok(match list {
        ListKind::Result => c.result,
        ListKind::Fail => c.fail,
        _ => c.cancelled,
    })
}

/// Candidates `(event id, instance id)`, newest first, from events below `before`:
/// up to `want`, and the event id to continue below (`None`: the log's start). When
/// the newest window does not hold them all, it stops once it found as many
/// instances as are in the list's state now (none: it reads no further).
async fn candidates(
    app: &AppState,
    (list, ev): (ListKind, EventKind),
    before: Option<i64>,
    want: usize,
) -> Result<(Vec<(i64, i64)>, Option<i64>), ApiError> {
    let db = &app.db;
    let mut exist = u64::MAX;
    let mut hi = match before {
        Some(b) => b - 1,
        None => db.last_event_id().await?,
    };
    let mut found: Vec<(i64, i64)> = Vec::new();
    let mut windows = 0;
    while hi > 0 && windows < RECENT_WINDOWS {
        let lo = (hi - PAGE as i64).max(0);
        let evs = db.event_page(lo, PAGE).await?;
        for e in evs.iter().rev().filter(|e| e.id <= hi && e.event == ev) {
            if let Some(id) = e.instance {
                if !found.iter().any(|(_, i)| *i == id) {
                    found.push((e.id, id));
                    if found.len() == want {
                        return Ok((found, Some(e.id)));
                    }
                    if found.len() as u64 >= exist && before.is_none() {
                        return Ok((found, None));
                    }
                }
            }
        }
        hi = lo;
        windows += 1;
        if windows == 1 && before.is_none() && hi > 0 {
            exist = existing(app, list).await?;
            if found.len() as u64 >= exist {
                return Ok((found, None));
            }
        }
    }
    Ok((found, (hi > 0).then_some(hi + 1)))
}

/// `GET /api/recent/{result|fail|cancelled}[?limit=N&before=E&text=T]`: the newest
/// terminal rows, newest first, as `{"rows": [...], "next": E | null}` in the list
/// shapes plus `preview`. Found by reading the event log backwards (at most 100 000
/// events per request), so it costs the same on a queue of any length; pass `next`
/// as `before` for older rows. A `text` filter examines at most 1,000 candidates per
/// request, so its page may be short while `next` is not null.
pub(crate) async fn recent(
    State(app): State<AppState>,
    Path(kind): Path<String>,
    p: Result<Query<RecentParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (list, ev) = kinds(&kind)?;
    let p = query(p)?;
    let limit = p.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::bad_request(format!(
            "invalid limit {limit}: expected 1 to 500"
        )));
    }
    if p.before.is_some_and(|b| b < 1) {
        return Err(ApiError::bad_request(
            "invalid before: expected an event id",
        ));
    }
    let text = TextFilter::new(p.text.as_deref());
    let want = if text.is_empty() {
        limit
    } else {
        TEXT_CANDIDATES
    };
    let (found, mut next) = candidates(&app, (list, ev), p.before, want).await?;
    let db = &app.db;
    let mut fetched = futures_util::stream::iter(found)
        .map(|(eid, id)| async move {
            let row = db.list_page(list, (id - 1, 1), None).await?.pop();
            let row = row.filter(|r| r.cursor() == id);
            let known = match &row {
                Some(r) => rows::previews(db, [job_of(r)]).await,
                None => Default::default(),
            };
            Ok::<_, batchdb::Error>((eid, row, known))
        })
        .buffered(CONCURRENT);
    let mut out: Vec<ListRow> = Vec::new();
    let mut known = std::collections::HashMap::default();
    while let Some(got) = fetched.next().await {
        let (eid, row, previews) = got?;
        let Some(row) = row else { continue };
        let job = job_of(&row);
        let preview = previews.get(&job).cloned().flatten();
        if text.matches(&job, preview.as_deref()) {
            known.insert(job, preview);
            out.push(row);
            if out.len() == limit {
                next = Some(eid);
                break;
            }
        }
    }
    let rows = rows::attach(out, &known);
    Ok(Json(serde_json::json!({ "rows": rows, "next": next })).into_response())
}
