//! The old batchdb-web-api routes (`POST /create`, `GET /list/{type}`) and the JSON
//! API under `/api/`.

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use batchdb::queue::{Instance, ListKind, ListRow, PushOptions, PushRequest, Selector};
use batchdb::{Error, Hash};
use futures_util::{Stream, TryStreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::collections::HashMap;
use tokio_util::io::StreamReader;

use crate::AppState;
use crate::error::ApiError;
use crate::rows::{self, Previewed, TextFilter, job_of};

/// Rows fetched per query while streaming or filtering.
pub(crate) const PAGE: usize = 1000;
/// The largest `limit` one page may ask for.
pub(crate) const MAX_LIMIT: usize = 10_000;
/// At most this many rows are examined for one filtered page; the page then ends
/// early (with a `next` cursor) rather than scan a million rows for one request.
const SCAN_BUDGET: usize = 100_000;
/// At most this many rows are examined for one page filtered by text (each needs its
/// payload's preview).
const TEXT_SCAN_BUDGET: usize = 5_000;

/// How an instance is queued: the CLI's queue options, as query parameters of
/// `POST /create` or fields of `POST /api/push`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueueParams {
    /// Higher runs first.
    priority: Option<i64>,
    /// Not before this many seconds from now.
    delay: Option<f64>,
    /// Not before this time (epoch milliseconds).
    run_at: Option<i64>,
    /// Kill the run after this many seconds.
    timeout: Option<f64>,
    /// Retry a failed run up to this many times.
    retries: Option<u32>,
    /// Serve from the result cache when possible.
    cached: Option<bool>,
    /// The batch to join.
    batch: Option<String>,
    /// Wait for a result of every instance these selectors name.
    after: Option<Selectors>,
    /// Wait for every instance these selectors name to end.
    after_any: Option<Selectors>,
    /// The working directory (absolute).
    cwd: Option<String>,
    /// Environment variables: a JSON object, or `KEY=VALUE` lines.
    env: Option<EnvParam>,
    /// The memory limit (`512M`).
    memory: Option<String>,
    /// The CPU limit, in CPUs.
    cpus: Option<f64>,
    /// The limit on processes at once.
    pids: Option<u64>,
    /// What it needs from a worker: `NAME=AMOUNT` strings, or one comma-separated.
    needs: Option<Selectors>,
    /// Its concurrency key, `KEY=N`.
    concurrency: Option<String>,
}

/// Environment variables as a JSON object, or as `KEY=VALUE` lines (as a query
/// parameter carries them).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum EnvParam {
    /// `{"KEY": "VALUE"}`.
    Map(std::collections::BTreeMap<String, String>),
    /// `KEY=VALUE` lines.
    Lines(String),
}

impl EnvParam {
    fn list(v: Option<&EnvParam>) -> Vec<String> {
        match v {
            None => Vec::new(),
            Some(EnvParam::Map(m)) => m.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            Some(EnvParam::Lines(s)) => s.lines().map(str::to_string).collect(),
        }
    }
}

/// Selectors as a JSON array, or one string of comma-separated selectors (as a
/// query parameter carries them).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Selectors {
    /// `["id:1", "batch:maps"]`.
    Many(Vec<String>),
    /// `id:1,batch:maps`.
    Joined(String),
}

impl Selectors {
    fn list(v: Option<&Selectors>) -> Vec<String> {
        match v {
            None => Vec::new(),
            Some(Selectors::Many(v)) => v.clone(),
            Some(Selectors::Joined(s)) => s.split(',').map(str::to_string).collect(),
        }
    }
}

impl QueueParams {
    fn options(&self) -> Result<PushOptions, ApiError> {
        Ok(PushRequest {
            priority: self.priority.unwrap_or(0),
            delay: self.delay,
            run_at: self.run_at,
            timeout: self.timeout,
            retries: self.retries,
            cached: self.cached.unwrap_or(false),
            batch: self.batch.clone(),
            after: Selectors::list(self.after.as_ref()),
            after_any: Selectors::list(self.after_any.as_ref()),
            cwd: self.cwd.clone(),
            env: EnvParam::list(self.env.as_ref()),
            memory: self.memory.clone(),
            cpus: self.cpus,
            pids: self.pids,
            needs: Selectors::list(self.needs.as_ref()),
            concurrency: self.concurrency.clone(),
        }
        .options()?)
    }
}

pub(crate) fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn json_body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError::new(e.status(), e.body_text()))
}

/// `POST /create`: the body (streamed to the blob store, never held whole) is a
/// payload; the job is created and pushed. Answers the job key and a newline, with
/// the instance in `X-Batchdb-Instance` and `X-Batchdb-Created`. A body that breaks
/// off (the client went away) stores nothing and queues nothing.
pub(crate) async fn create(
    State(app): State<AppState>,
    q: Result<Query<QueueParams>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let opts = query(q)?.options()?;
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(format!("reading the request body: {e}")));
    let mut reader = StreamReader::new(stream);
    // `add` stores the blob first; if the body fails, `put` removes its temporary
    // file and returns the error before any row is written.
    let inst = app.db.add(&mut reader, &opts).await?;
    let mut r = (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{}\n", inst.job),
    )
        .into_response();
    let h = r.headers_mut();
    h.insert("x-batchdb-instance", HeaderValue::from(inst.id));
    h.insert("x-batchdb-created", HeaderValue::from(inst.created));
    Ok(r)
}

/// Filters and paging of the list routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// Only rows after this cursor (the `next` of the previous page).
    after: Option<i64>,
    /// At most this many rows (1..=10000).
    limit: Option<usize>,
    /// Only rows of this job.
    job: Option<String>,
    /// `pending` only: only running (true) or only waiting (false) instances.
    running: Option<bool>,
    /// Only the instances of this batch.
    batch: Option<String>,
    /// `/api/list` only: rows whose payload preview contains this text (any case) or
    /// whose job key starts with it.
    text: Option<String>,
    #[serde(rename = "access_token")]
    _access_token: Option<IgnoredAny>,
}

/// A parsed row filter.
#[derive(Debug, Clone, Copy, Default)]
struct Filter {
    job: Option<Hash>,
    running: Option<bool>,
}

impl Filter {
    fn is_empty(&self) -> bool {
        self.job.is_none() && self.running.is_none()
    }

    fn matches(&self, row: &ListRow) -> bool {
        let job = match row {
            ListRow::Job(r) => r.key,
            ListRow::Pending(r) => r.job,
            ListRow::Result(r) => r.key.0,
            ListRow::Fail(r) => r.key.0,
        };
        if self.job.is_some_and(|j| j != job) {
            return false;
        }
        match (self.running, row) {
            (Some(want), ListRow::Pending(r)) => r.running == want,
            _ => true,
        }
    }
}

/// `job | pending | result | fail | cancelled`; anything else is a 404.
fn list_kind(s: &str) -> Result<ListKind, ApiError> {
    match s {
        "job" | "pending" | "result" | "fail" | "cancelled" => s.parse().map_err(ApiError::from),
        _ => Err(ApiError::not_found(format!(
            "unknown list type {:?}: expected job, pending, result, fail or cancelled",
            s.chars().take(100).collect::<String>()
        ))),
    }
}

struct ListQuery {
    kind: ListKind,
    batch: Option<String>,
    after: i64,
    limit: Option<usize>,
    filter: Filter,
    text: TextFilter,
}

fn list_query(kind: &str, p: ListParams) -> Result<ListQuery, ApiError> {
    let kind = list_kind(kind)?;
    let after = p.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request(format!("invalid after {after}")));
    }
    if let Some(l) = p.limit {
        if l == 0 || l > MAX_LIMIT {
            return Err(ApiError::bad_request(format!(
                "invalid limit {l}: expected 1 to {MAX_LIMIT}"
            )));
        }
    }
    if p.running.is_some() && kind != ListKind::Pending {
        return Err(ApiError::bad_request(
            "the running filter applies to the pending list only",
        ));
    }
    let job = p.job.as_deref().map(str::parse::<Hash>).transpose()?;
    if let Some(b) = &p.batch {
        batchdb::queue::check_batch_name(b)?;
    }
    Ok(ListQuery {
        kind,
        batch: p.batch,
        after,
        limit: p.limit,
        filter: Filter {
            job,
            running: p.running,
        },
        text: TextFilter::new(p.text.as_deref()),
    })
}

/// One page: up to `limit` matching rows after `after`, and the cursor to continue
/// from (`None` once the end was reached). The previews a text filter read are left
/// in `known`.
async fn page(
    app: &AppState,
    q: &ListQuery,
    limit: usize,
    known: &mut HashMap<Hash, Option<String>>,
) -> Result<(Vec<ListRow>, Option<i64>), Error> {
    let mut rows = Vec::new();
    let mut cursor = q.after;
    let mut scanned = 0;
    let (chunk, budget) = if q.text.is_empty() {
        (PAGE, SCAN_BUDGET)
    } else {
        (PAGE.min(limit.max(100)), TEXT_SCAN_BUDGET)
    };
    loop {
        let want = if q.filter.is_empty() && q.text.is_empty() {
            limit - rows.len()
        } else {
            chunk
        };
        let got = app
            .db
            .list_page(q.kind, (cursor, want), q.batch.as_deref())
            .await?;
        let n = got.len();
        let got: Vec<ListRow> = got.into_iter().filter(|r| q.filter.matches(r)).collect();
        if !q.text.is_empty() {
            let missing: Vec<Hash> = got
                .iter()
                .map(job_of)
                .filter(|j| !known.contains_key(j))
                .collect();
            known.extend(rows::previews(&app.db, missing).await);
        }
        for row in got {
            cursor = row.cursor();
            let job = job_of(&row);
            if q.text
                .matches(&job, known.get(&job).and_then(Option::as_deref))
            {
                rows.push(row);
                if rows.len() == limit {
                    return Ok((rows, Some(cursor)));
                }
            }
        }
        scanned += n;
        if n < want {
            return Ok((rows, None));
        }
        if scanned >= budget {
            return Ok((rows, Some(cursor)));
        }
    }
}

/// Every matching row after `after`, a page at a time, as JSON lines.
fn line_stream(
    app: AppState,
    q: ListQuery,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(q.after), move |cursor| {
        let app = app.clone();
        let filter = q.filter;
        let kind = q.kind;
        let batch = q.batch.clone();
        async move {
            let after = cursor?;
            match app
                .db
                .list_page(kind, (after, PAGE), batch.as_deref())
                .await
            {
                Ok(rows) => {
                    let next = (rows.len() == PAGE).then(|| rows.last().map(ListRow::cursor));
                    let mut buf = Vec::new();
                    for row in rows.iter().filter(|r| filter.matches(r)) {
                        if let Err(e) = serde_json::to_writer(&mut buf, row) {
                            return Some((Err(std::io::Error::other(e)), None));
                        }
                        buf.push(b'\n');
                    }
                    Some((Ok(Bytes::from(buf)), next.flatten()))
                }
                Err(e) => {
                    tracing::error!("list: {e}");
                    Some((Err(std::io::Error::other(e.to_string())), None))
                }
            }
        }
    })
    .try_filter(|b| futures_util::future::ready(!b.is_empty()))
}

const NDJSON: &str = "application/x-ndjson";

/// `GET /list/{type}`: rows as JSON lines in the CLI's shapes, in push order. Without
/// `limit` every row after `after` streams (memory stays flat however many there
/// are); with `limit`, one page, whose continuation cursor is in `X-Next-After` (and
/// a `Link: rel="next"`) unless the end was reached.
pub(crate) async fn list_lines(
    State(app): State<AppState>,
    Path(kind): Path<String>,
    p: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = list_query(&kind, query(p)?)?;
    if !q.text.is_empty() {
        return Err(ApiError::bad_request(
            "the text filter applies to /api/list only",
        ));
    }
    let Some(limit) = q.limit else {
        let body = Body::from_stream(line_stream(app, q));
        return Ok(([(header::CONTENT_TYPE, NDJSON)], body).into_response());
    };
    let (rows, next) = page(&app, &q, limit, &mut HashMap::new()).await?;
    let mut buf = Vec::new();
    for row in &rows {
        serde_json::to_writer(&mut buf, row)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        buf.push(b'\n');
    }
    let mut r = ([(header::CONTENT_TYPE, NDJSON)], buf).into_response();
    if let Some(n) = next {
        let h = r.headers_mut();
        h.insert("x-next-after", HeaderValue::from(n));
        let link = format!(
            "<{}/list/{kind}?after={n}&limit={limit}{}>; rel=\"next\"",
            app.prefix,
            filter_query(&q.filter)
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            h.insert(header::LINK, v);
        }
    }
    Ok(r)
}

fn filter_query(f: &Filter) -> String {
    let mut s = String::new();
    if let Some(j) = f.job {
        s.push_str(&format!("&job={j}"));
    }
    if let Some(r) = f.running {
        s.push_str(&format!("&running={r}"));
    }
    s
}

/// `GET /api/list/{type}`: one page as `{"rows": [...], "next": cursor | null}`
/// (`limit` defaults to 100), each row in its list shape plus `preview` (the
/// payload's first line, at most 120 bytes). Pass `next` as `after` for the following
/// page; a filtered page may hold fewer rows than `limit` while `next` is not null
/// (a `text` filter examines at most 5,000 rows per page).
pub(crate) async fn list_json(
    State(app): State<AppState>,
    Path(kind): Path<String>,
    p: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = list_query(&kind, query(p)?)?;
    let mut known = HashMap::new();
    let (rows, next) = page(&app, &q, q.limit.unwrap_or(100), &mut known).await?;
    let missing: Vec<Hash> = rows
        .iter()
        .map(job_of)
        .filter(|j| !known.contains_key(j))
        .collect();
    known.extend(rows::previews(&app.db, missing).await);
    let rows = rows::attach(rows, &known);
    Ok(Json(serde_json::json!({ "rows": rows, "next": next })).into_response())
}

/// An instance id in a path: `N` or `id:N`.
pub(crate) fn instance_id(s: &str) -> Result<i64, ApiError> {
    let digits = s.strip_prefix("id:").unwrap_or(s);
    match digits.parse::<i64>() {
        Ok(id) if id > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(ApiError::bad_request(format!(
            "invalid instance id {:?}: expected a positive integer",
            s.chars().take(100).collect::<String>()
        ))),
    }
}

/// `GET /api/instance/{id}`: everything about one instance, as `show --json` prints
/// it: state, options and every attempt (exit code, signal, times, stdout and
/// stderr blob ids and sizes, outcome), plus `preview`, its payload's first line.
pub(crate) async fn instance(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = instance_id(&id)?;
    let detail = app.db.instance(id).await?;
    let preview = rows::previews(&app.db, [detail.job]).await;
    let preview = preview.get(&detail.job).cloned().flatten();
    Ok(Json(Previewed {
        row: detail,
        preview,
    })
    .into_response())
}

/// `POST /api/push` with `{"job": key}` and any of the queue options
/// ([`QueueParams`]: `"priority"`, `"delay"`, `"run_at"`, `"timeout"`, `"retries"`,
/// `"cached"`, `"batch"`, `"after"`, `"after_any"`, `"cwd"`, `"env"`, `"memory"`,
/// `"cpus"`, `"pids"`, `"needs"`, `"concurrency"`): pushes another instance of a
/// stored job; answers `{"id", "job", "created"}`.
pub(crate) async fn push(
    State(app): State<AppState>,
    b: Result<Json<serde_json::Map<String, serde_json::Value>>, JsonRejection>,
) -> Result<Response, ApiError> {
    let mut b = json_body(b)?;
    let job = match b.remove("job") {
        Some(serde_json::Value::String(j)) => j,
        _ => return Err(ApiError::bad_request("expected \"job\": a job key")),
    };
    let job: Hash = job.parse()?;
    let q: QueueParams = serde_json::from_value(serde_json::Value::Object(b))
        .map_err(|e| ApiError::bad_request(format!("Failed to deserialize the JSON body: {e}")))?;
    let inst = app.db.push(&job, &q.options()?).await?;
    Ok(Json(inst).into_response())
}

fn selector(s: &str, all_failed: bool) -> Result<Selector, ApiError> {
    if all_failed && s == "failed" {
        return Ok(Selector::AllFailed);
    }
    Ok(s.parse()?)
}

fn instances(done: Vec<Instance>, what: &str, sel: &Selector) -> Result<Response, ApiError> {
    if done.is_empty() && *sel != Selector::AllFailed {
        return Err(ApiError::not_found(format!(
            "no {what} instance matches {sel}"
        )));
    }
    Ok(Json(done).into_response())
}

/// `POST /api/cancel/{selector}` (`id:N`, a created time, a job key or result id):
/// cancels the pending or running instances it names; answers them as
/// `[{"id", "job", "created"}]`, 404 if none.
pub(crate) async fn cancel(
    State(app): State<AppState>,
    Path(sel): Path<String>,
) -> Result<Response, ApiError> {
    let sel = selector(&sel, false)?;
    let done = app.db.cancel(&sel).await?;
    instances(done, "pending or running", &sel)
}

/// The query of `POST /api/retry/{selector}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryParams {
    /// Also push again what their failure cancelled, down the graph.
    with_dependents: Option<bool>,
    #[serde(rename = "access_token")]
    _access_token: Option<IgnoredAny>,
}

/// `POST /api/retry/{selector}[?with_dependents=true]` (or `failed` for every
/// failed instance): pushes the failed or cancelled instances it names again;
/// answers the new instances.
pub(crate) async fn retry(
    State(app): State<AppState>,
    Path(sel): Path<String>,
    q: Result<Query<RetryParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let sel = selector(&sel, true)?;
    let deps = query(q)?.with_dependents.unwrap_or(false);
    let done = app.db.retry(&sel, deps).await?;
    instances(done, "failed or cancelled (not yet retried)", &sel)
}

/// `GET /api/batches`: every batch with its counts, as `batchdb batches` prints them
/// (a JSON array).
pub(crate) async fn batches(State(app): State<AppState>) -> Result<Response, ApiError> {
    let all: Vec<_> = app.db.batches().try_collect().await?;
    Ok(Json(all).into_response())
}

/// `GET /api/batch/{name}`: one batch's counts; 404 if there is no such batch.
pub(crate) async fn batch(
    State(app): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(app.db.batch(&name).await?).into_response())
}

/// `GET /api/counts`: instances by state, as `batchdb status` prints them.
pub(crate) async fn counts(State(app): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(app.db.counts().await?).into_response())
}

/// `GET /api/last-event`: `{"id": N}`, the newest event's id (0 if none): load a
/// view, then follow `/events?after=N` to miss nothing.
pub(crate) async fn last_event(State(app): State<AppState>) -> Result<Response, ApiError> {
    let id = app.db.last_event_id().await?;
    Ok(Json(serde_json::json!({ "id": id })).into_response())
}

/// `GET /healthz`: `ok` once the database answers, 503 with the error otherwise.
pub(crate) async fn healthz(State(app): State<AppState>) -> Response {
    match app.db.last_event_id().await {
        Ok(_) => ([(header::CONTENT_TYPE, "text/plain")], "ok\n").into_response(),
        Err(e) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
