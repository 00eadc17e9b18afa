//! The worker endpoints under `/worker/` (see `batchdb::worker::wire` for the
//! bodies): a remote worker's every call to the queue and the blob store, answered
//! with the database's own [`LocalPort`](batchdb::worker::LocalPort), so a remote
//! worker has the same leases, fencing and guarantees as a local one. Each call after
//! the claim names its attempt; a stale one is answered 409. Authorised by the worker
//! token (`auth.rs`).

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use batchdb::Hash;
use batchdb::queue::{Claim, ClaimRequest, ClaimToken, Outcome, Resources};
use batchdb::worker::wire::{
    self, Beat, Deps, Finish, FinishClaim, Gone, Hello, PROTOCOL, Seen, Wait,
};
use batchdb::worker::{LocalPort, OutputStream, WorkerPort};
use futures_util::{StreamExt, TryStreamExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::AppState;
use crate::error::ApiError;

/// The longest a `wait` holds its request.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The most dependency results one page returns.
const MAX_DEPS: usize = 4096;

/// The most instances one claim asks for.
const MAX_CLAIM: usize = 1024;

/// Bytes per chunk of a blob sent to a worker.
const CHUNK: usize = 64 * 1024;

/// Refuses a worker whose protocol differs from the server's (400, naming both),
/// before any handler runs; `hello` is exempt, so a worker can learn why.
pub(crate) async fn protocol(req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(wire::PROTOCOL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if req.uri().path().ends_with("/worker/hello") || given == Some(PROTOCOL) {
        return next.run(req).await;
    }
    let theirs = given.map_or_else(|| "none".to_string(), |p| p.to_string());
    ApiError::bad_request(format!(
        "worker protocol {theirs}, this server speaks {PROTOCOL} (batchdb {}): run the same batchdb version on both",
        env!("CARGO_PKG_VERSION")
    ))
    .into_response()
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError::new(e.status(), e.body_text()))
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// `GET /worker/hello`: the server's version and worker protocol.
pub(crate) async fn hello() -> Json<Hello> {
    Json(Hello {
        version: env!("CARGO_PKG_VERSION").to_string(),
        protocol: PROTOCOL,
        finish_claim: true,
    })
}

/// `POST /worker/claim`: claims.
pub(crate) async fn claim(
    State(app): State<AppState>,
    b: Result<Json<ClaimRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = body(b)?;
    check_limit(&req)?;
    let port = app.db.worker_port();
    let claims = port.claim(&req).await?;
    Ok(Json(claimed(&port, claims)?).into_response())
}

/// A claim's limit, checked.
fn check_limit(req: &ClaimRequest) -> Result<(), ApiError> {
    if req.limit == 0 || req.limit > MAX_CLAIM {
        return Err(ApiError::bad_request(format!(
            "limit {} out of range 1..={MAX_CLAIM}",
            req.limit
        )));
    }
    Ok(())
}

/// A claim's reply: small payloads travel with their claims (one request less per
/// job).
fn claimed(port: &LocalPort, mut claims: Vec<Claim>) -> Result<wire::Claimed, ApiError> {
    let mut payloads = Vec::with_capacity(claims.len());
    for c in &mut claims {
        let inline = match c.cache_hit {
            Some(_) => None,
            None => port.claim_payload(c)?,
        };
        payloads.push(inline.map(hex::encode));
    }
    Ok(wire::Claimed { claims, payloads })
}

/// `POST /worker/wait`: returns once the server's change counter differs from
/// `seen` (at once if it already does; or when the wait, capped at 30 s, is over),
/// with the counter now.
pub(crate) async fn wait(
    State(app): State<AppState>,
    b: Result<Json<Wait>, JsonRejection>,
) -> Result<Response, ApiError> {
    let w = body(b)?;
    let port = app.db.worker_port();
    if port.change_seq() == w.seen {
        port.wait_change(w.seen, millis(w.timeout_ms).min(MAX_WAIT))
            .await;
    }
    Ok(Json(wire::Seq {
        seq: port.change_seq(),
    })
    .into_response())
}

/// `POST /worker/heartbeat`.
pub(crate) async fn heartbeat(
    State(app): State<AppState>,
    b: Result<Json<Beat>, JsonRejection>,
) -> Result<Response, ApiError> {
    let beat = body(b)?;
    let port = app.db.worker_port();
    let hb = port.heartbeat(&beat.token, millis(beat.lease_ms)).await?;
    Ok(Json(hb).into_response())
}

/// `POST /worker/status`.
pub(crate) async fn status(
    State(app): State<AppState>,
    b: Result<Json<ClaimToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t = body(b)?;
    Ok(Json(app.db.worker_port().status(&t).await?).into_response())
}

/// `POST /worker/finish`: idempotent through fencing (a repeat is 409, and
/// `recorded` then says what the first one did).
pub(crate) async fn finish(
    State(app): State<AppState>,
    b: Result<Json<Finish>, JsonRejection>,
) -> Result<Response, ApiError> {
    let (token, outcome) = finished_attempt(body(b)?)?;
    let done = app.db.worker_port().finish(&token, &outcome).await?;
    Ok(Json(done).into_response())
}

/// The attempt a finish names and its outcome, with the inline outputs it carries
/// decoded (413 if they are over the inline limit).
fn finished_attempt(f: Finish) -> Result<(ClaimToken, Outcome), ApiError> {
    let token = f.token;
    let outcome = f
        .into_outcome()
        .map_err(|m| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, m))?;
    Ok((token, outcome))
}

/// `POST /worker/finish-claim`: a finish, then a claim for the freed slot, in one
/// transaction (`WorkerPort::finish_and_claim`).
pub(crate) async fn finish_claim(
    State(app): State<AppState>,
    b: Result<Json<FinishClaim>, JsonRejection>,
) -> Result<Response, ApiError> {
    let f = body(b)?;
    check_limit(&f.next)?;
    let (token, outcome) = finished_attempt(f.finish)?;
    let port = app.db.worker_port();
    let (finished, claims) = port.finish_and_claim(&token, &outcome, &f.next).await?;
    let claimed = claimed(&port, claims)?;
    Ok(Json(wire::FinishedClaimed { finished, claimed }).into_response())
}

/// `POST /worker/recorded`: what an ended attempt recorded (`null`: not ended).
pub(crate) async fn recorded(
    State(app): State<AppState>,
    b: Result<Json<ClaimToken>, JsonRejection>,
) -> Result<Response, ApiError> {
    let t = body(b)?;
    Ok(Json(app.db.worker_port().recorded(&t).await?).into_response())
}

/// `GET /worker/blob/{hash}`: a payload or an output, inline or stored; the body
/// breaks off (never ends cleanly) if the blob turns out corrupt.
pub(crate) async fn blob(
    State(app): State<AppState>,
    Path(hash): Path<String>,
) -> Result<Response, ApiError> {
    let hash: Hash = hash.parse()?;
    let reader = app.db.worker_port().blob(&hash).await?;
    let body = Body::from_stream(ReaderStream::with_capacity(reader, CHUNK));
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// `POST /worker/output/{id}/{attempt}`: an output of a current attempt, the body
/// streamed into the blob store; answers its [`BlobInfo`](batchdb::blob::BlobInfo)
/// once durable (409 if the attempt is not current). A body that breaks off stores
/// nothing.
pub(crate) async fn output(
    State(app): State<AppState>,
    Path((id, attempt)): Path<(i64, i64)>,
    body: Body,
) -> Result<Response, ApiError> {
    let t = ClaimToken { id, token: attempt };
    let port = app.db.worker_port();
    port.status(&t).await?;
    let stream = body
        .into_data_stream()
        .map_err(|e| std::io::Error::other(format!("reading the request body: {e}")));
    let mut reader = StreamReader::new(stream);
    let info = port.put_output(&t, &mut reader).await?;
    Ok(Json(info).into_response())
}

/// `POST /worker/live/{id}/{attempt}/{stream}`: a running attempt's output as it is
/// written, mirrored into this server's live files for `logs -f` and the dashboard
/// until the body ends (then the file is removed, as a local worker's is). 409 if the
/// attempt is not current.
pub(crate) async fn live(
    State(app): State<AppState>,
    Path((id, attempt, stream)): Path<(i64, i64, String)>,
    body: Body,
) -> Result<Response, ApiError> {
    let which = OutputStream::parse(&stream)
        .ok_or_else(|| ApiError::not_found(format!("no output stream {stream:?}")))?;
    let t = ClaimToken { id, token: attempt };
    let port = app.db.worker_port();
    port.status(&t).await?;
    let Some(mut sink) = port.live(&t, which) else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let Ok(bytes) = chunk else { break };
        if std::io::Write::write_all(&mut sink, &bytes).is_err() {
            break;
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /worker/deps`: a page of dependency results.
pub(crate) async fn deps(
    State(app): State<AppState>,
    b: Result<Json<Deps>, JsonRejection>,
) -> Result<Response, ApiError> {
    let d = body(b)?;
    let page = app
        .db
        .worker_port()
        .dependency_results(d.id, d.after, d.limit.min(MAX_DEPS))
        .await?;
    Ok(Json(page).into_response())
}

/// `POST /worker/idle`: whether a worker with these resources would find nothing.
pub(crate) async fn idle(
    State(app): State<AppState>,
    b: Result<Json<Resources>, JsonRejection>,
) -> Result<Response, ApiError> {
    let r = body(b)?;
    Ok(Json(app.db.worker_port().idle(&r).await?).into_response())
}

/// `GET /worker/counts`.
pub(crate) async fn counts(State(app): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(app.db.worker_port().counts().await?).into_response())
}

/// `POST /worker/seen`.
pub(crate) async fn seen(
    State(app): State<AppState>,
    b: Result<Json<Seen>, JsonRejection>,
) -> Result<Response, ApiError> {
    let s = body(b)?;
    let port = app.db.worker_port();
    port.worker_seen(&s.name, &s.resources, millis(s.ttl_ms))
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /worker/gone`.
pub(crate) async fn gone(
    State(app): State<AppState>,
    b: Result<Json<Gone>, JsonRejection>,
) -> Result<Response, ApiError> {
    let g = body(b)?;
    app.db.worker_port().worker_gone(&g.name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Whether a request is a worker endpoint's (below the prefix).
pub(crate) fn is_worker_path(rel: &str) -> bool {
    rel.starts_with("/worker/")
}
