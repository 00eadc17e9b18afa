//! Server-Sent Events: the persisted event log (`GET /events`) and an instance's
//! output as it is produced (`GET /api/output/{id}`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use batchdb::queue::State as InstanceState;
use serde::Deserialize;
use serde::de::IgnoredAny;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::AppState;
use crate::api::instance_id;
use crate::error::ApiError;
use crate::metrics::Published;

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// The most output bytes sent in one event.
const CHUNK: u64 = 64 * 1024;

/// Query parameters of `GET /events`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    /// Start after this event id (0: the whole log); `Last-Event-ID` wins.
    after: Option<i64>,
    #[serde(rename = "access_token")]
    _access_token: Option<IgnoredAny>,
}

/// `GET /events`: the persisted event log as Server-Sent Events, following new
/// events from any process (a CLI `add`, a worker elsewhere) as they commit. Each
/// event's `id:` is its log id and its data the JSON line `batchdb events` prints.
/// It starts after `Last-Event-ID` (sent by a reconnecting `EventSource`), else
/// after `?after=N`, else at the log's start. A failure reading the log ends the
/// stream with an `error` event (a client then reconnects and resumes).
pub(crate) async fn sse(
    State(app): State<AppState>,
    headers: HeaderMap,
    p: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = p
        .map(|Query(p)| p)
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::bad_request("invalid Last-Event-ID: expected an event id"))?,
        None => p.after.unwrap_or(0),
    };
    if after < 0 {
        return Err(ApiError::bad_request(format!("invalid after {after}")));
    }
    let permit = stream_permit(&app)?;
    let tail = Tail {
        rx: app.metrics.subscribe(),
        app,
        after,
        page: VecDeque::new(),
        live: false,
        done: false,
        _permit: permit,
    };
    let stream = futures_util::stream::unfold(tail, |mut t| async move {
        let ev = t.next().await?;
        Some((Ok::<_, Infallible>(ev), t))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

/// One of the [`crate::Limits::max_streams`] event-stream permits, or 503.
fn stream_permit(app: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    app.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many event streams open (limit {}); try again later",
                app.opts.limits.max_streams
            ),
        )
    })
}

/// How many events a catching-up stream reads from the log at once.
const PAGE: usize = 512;

/// One `/events` stream: it reads the log itself until it has caught up, then takes
/// each new event from the server's one follower ([`crate::metrics::Metrics`]), and
/// reads the log again only if it fell too far behind.
struct Tail {
    app: AppState,
    rx: tokio::sync::broadcast::Receiver<Arc<Published>>,
    /// The last event id sent.
    after: i64,
    page: VecDeque<batchdb::queue::Event>,
    /// Caught up: new events come from `rx`.
    live: bool,
    done: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Tail {
    async fn next(&mut self) -> Option<SseEvent> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if self.done {
                return None;
            }
            if let Some(ev) = self.page.pop_front() {
                self.after = ev.id;
                return Some(
                    match SseEvent::default().id(ev.id.to_string()).json_data(&ev) {
                        Ok(e) => e,
                        Err(e) => self.fail(&e.to_string()),
                    },
                );
            }
            if !self.live {
                // Subscribed before this read: whatever commits after it arrives
                // through `rx` (and what it already holds is skipped by id).
                match self.app.db.event_page(self.after, PAGE).await {
                    Ok(evs) if evs.is_empty() => self.live = true,
                    Ok(evs) => self.page = evs.into(),
                    Err(e) => return Some(self.fail(&e.to_string())),
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(p) if p.id <= self.after => {}
                Ok(p) => {
                    self.after = p.id;
                    return Some(SseEvent::default().id(p.id.to_string()).data(&p.json));
                }
                Err(RecvError::Lagged(_)) => self.live = false,
                Err(RecvError::Closed) => return None,
            }
        }
    }

    fn fail(&mut self, msg: &str) -> SseEvent {
        self.done = true;
        error_event(msg)
    }
}

fn error_event(msg: &str) -> SseEvent {
    SseEvent::default()
        .event("error")
        .data(msg.replace(['\n', '\r'], " "))
}

/// Query parameters of `GET /api/output/{id}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutputParams {
    #[serde(rename = "access_token")]
    _access_token: Option<IgnoredAny>,
}

/// `GET /api/output/{id}`: an instance's stdout and stderr as Server-Sent Events,
/// as `batchdb logs -f` prints them: `stdout` and `stderr` events carry
/// `{"text": ...}` chunks (UTF-8, invalid bytes replaced); an `attempt` event
/// `{"attempt": n}` starts each new attempt (clear what was shown); while the
/// instance runs, its output follows live (from any worker on this machine); once
/// it has ended and everything is sent, an `end` event `{"state": ...}` closes the
/// stream.
pub(crate) async fn output(
    State(app): State<AppState>,
    Path(id): Path<String>,
    p: Result<Query<OutputParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    p.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let id = instance_id(&id)?;
    app.db.instance(id).await?;
    let permit = stream_permit(&app)?;
    let follow = Follow {
        _permit: permit,
        app,
        id,
        attempt: 0,
        off: [0, 0],
        carry: [Vec::new(), Vec::new()],
        queue: VecDeque::new(),
        done: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        loop {
            if let Some(e) = f.queue.pop_front() {
                return Some((Ok::<_, Infallible>(e), f));
            }
            if f.done {
                return None;
            }
            if let Err(e) = f.step().await {
                f.queue.push_back(error_event(&e.to_string()));
                f.done = true;
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// The state of one output follower.
struct Follow {
    _permit: tokio::sync::OwnedSemaphorePermit,
    app: AppState,
    id: i64,
    attempt: i64,
    off: [u64; 2],
    carry: [Vec<u8>; 2],
    queue: VecDeque<SseEvent>,
    done: bool,
}

impl Follow {
    /// Looks once for new output, queueing what it finds; waits a little when there
    /// is none.
    async fn step(&mut self) -> batchdb::Result<()> {
        let db = self.app.db.clone();
        let seen = db.change_seq();
        let d = db.instance(self.id).await?;
        let last = d.last_attempt();
        let n = last.map_or(0, |a| a.attempt);
        if n != self.attempt {
            self.attempt = n;
            self.off = [0, 0];
            self.carry = [Vec::new(), Vec::new()];
            self.push_json("attempt", serde_json::json!({ "attempt": n }));
        }
        let ended = matches!(
            d.state,
            InstanceState::Result | InstanceState::Fail | InstanceState::Cancelled
        );
        let mut progressed = false;
        match last {
            Some(a) if a.outcome.is_none() && d.state == InstanceState::Running => {
                if let Some(live) = db.live_dir().cloned() {
                    for (i, name) in STREAMS.iter().enumerate() {
                        let path = live.join(format!("{}.{n}.{name}", self.id));
                        let got = read_at(&path, self.off[i]).await?;
                        if !got.is_empty() {
                            self.off[i] += got.len() as u64;
                            self.chunk(i, &got, false);
                            progressed = true;
                        }
                    }
                }
            }
            Some(a) if a.outcome.is_some() => {
                // The attempt ended: its blobs hold exactly what the live files held.
                for (i, blob) in [a.report.stdout, a.report.stderr].into_iter().enumerate() {
                    let Some(b) = blob else { continue };
                    if self.off[i] < b.size {
                        let end = b.size.min(self.off[i] + CHUNK);
                        let mut r = db.get_range(&b.hash, self.off[i]..end).await?;
                        let mut buf = Vec::new();
                        r.read_to_end(&mut buf)
                            .await
                            .map_err(|e| batchdb::Error::Stream {
                                what: format!("blob {}", b.hash),
                                source: e,
                            })?;
                        if buf.is_empty() {
                            // Shorter than its row says: stop rather than spin.
                            self.off[i] = b.size;
                        } else {
                            self.off[i] += buf.len() as u64;
                            progressed = true;
                        }
                        let last_piece = self.off[i] >= b.size;
                        self.chunk(i, &buf, last_piece);
                    }
                }
                if !progressed && ended {
                    self.end(d.state);
                    return Ok(());
                }
            }
            _ if ended => {
                self.end(d.state);
                return Ok(());
            }
            _ => {}
        }
        if !progressed {
            // Live files grow without any database change: look again soon either way.
            db.wait_change(seen, Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn end(&mut self, state: InstanceState) {
        self.push_json("end", serde_json::json!({ "state": state }));
        self.done = true;
    }

    fn push_json(&mut self, event: &str, data: serde_json::Value) {
        self.queue
            .push_back(SseEvent::default().event(event).data(data.to_string()));
    }

    /// Queues bytes of stream `i` as text, holding back an incomplete UTF-8
    /// character at the end unless `flush`.
    fn chunk(&mut self, i: usize, bytes: &[u8], flush: bool) {
        let carry = &mut self.carry[i];
        carry.extend_from_slice(bytes);
        let cut = match std::str::from_utf8(carry) {
            Err(e) if !flush && e.error_len().is_none() => e.valid_up_to(),
            _ => carry.len(),
        };
        if cut == 0 {
            return;
        }
        let text = String::from_utf8_lossy(&carry[..cut]).into_owned();
        carry.drain(..cut);
        self.push_json(STREAMS[i], serde_json::json!({ "text": text }));
    }
}

/// Up to [`CHUNK`] bytes of `path` from `offset`; nothing if it does not exist (yet,
/// or any more).
async fn read_at(path: &std::path::Path, offset: u64) -> batchdb::Result<Vec<u8>> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(batchdb::Error::io("open", path, e)),
    };
    f.seek(std::io::SeekFrom::Start(offset))
        .await
        .map_err(|e| batchdb::Error::io("seek", path, e))?;
    let mut buf = Vec::new();
    f.take(CHUNK)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| batchdb::Error::io("read", path, e))?;
    Ok(buf)
}
