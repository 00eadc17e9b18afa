//! Connections: how `serve` accepts them, bounds their number, times out the ones
//! that stall, and closes them.
//!
//! - A client has [`Limits::header_timeout`] to send a request's headers, counted
//!   from the connection's start or from the end of its previous response: a
//!   connection that sends nothing (or a header byte now and then) is closed then.
//! - A request body must make progress: no byte for [`Limits::body_timeout`] ends
//!   the request with an error (a slow but moving upload of any size goes through).
//! - At most [`Limits::max_connections`] connections are open. When a new one
//!   arrives at the limit, the connection idle the longest (no request in progress:
//!   between requests, or still sending its headers) is closed to make room; when
//!   every connection is busy, new ones wait in the listen backlog until one ends.
//!   Either way a warning is logged (at most every 10 s), so a flood of idle
//!   connections never locks a real client out.
//! - With TLS, each connection's task first does the handshake, which must end
//!   within [`Limits::header_timeout`]; until then the connection counts as idle.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::handoff;

/// Bounds on what clients may hold of a server; [`Limits::default`] is what
/// `batchdb serve` uses unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The most connections open at once (at least 2).
    pub max_connections: usize,
    /// The most event streams (`/events`, `/api/output/{id}`) open at once; one more
    /// is answered 503.
    pub max_streams: usize,
    /// How long a connection may take to send a request's headers, and how long it
    /// may stay idle between requests.
    pub header_timeout: Duration,
    /// How long a request body may go without a byte before the request fails.
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

impl Limits {
    /// What `batchdb serve` uses unless told otherwise: 4,096 connections, 2,048
    /// event streams, 30 s for a request's headers, 60 s without a body byte.
    pub const DEFAULT: Limits = Limits {
        max_connections: 4096,
        max_streams: 2048,
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(60),
    };

    /// These limits with the given connection and stream caps and timeouts.
    #[must_use]
    pub fn new(
        (max_connections, max_streams): (usize, usize),
        header_timeout: Duration,
        body_timeout: Duration,
    ) -> Limits {
        Limits {
            max_connections,
            max_streams,
            header_timeout,
            body_timeout,
        }
    }
}

/// What the accept loop knows of one open connection.
struct Entry {
    /// Requests in progress (from the call until the response body is dropped).
    busy: Arc<AtomicUsize>,
    /// When it last became idle (ms since the loop started).
    idle_since: Arc<AtomicU64>,
    /// Closes it at once.
    close: CancellationToken,
}

/// The open connections.
#[derive(Default)]
struct Conns {
    map: Mutex<HashMap<u64, Entry>>,
    /// Signalled when a connection ends.
    ended: Notify,
    /// Connections ended so far.
    removed: AtomicU64,
}

/// Returns freed heap memory to the system: after thousands of connections (an SSE
/// flood, say) have closed, glibc's allocator would otherwise keep their buffers.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only releases free memory held by the allocator.
        unsafe { libc::malloc_trim(0) };
    });
}

impl Conns {
    fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    fn remove(&self, id: u64) {
        let left = self.map.lock().map_or(1, |mut m| {
            m.remove(&id);
            m.len()
        });
        self.ended.notify_one();
        let n = self.removed.fetch_add(1, Ordering::Relaxed) + 1;
        if left == 0 || n % 1024 == 0 {
            give_back_memory();
        }
    }

    /// Closes the connection idle the longest, if one is idle; whether one was.
    fn evict_idle(&self) -> bool {
        let Ok(mut m) = self.map.lock() else {
            return false;
        };
        let victim = m
            .iter()
            .filter(|(_, e)| e.busy.load(Ordering::SeqCst) == 0)
            // Ties (a burst accepted within one millisecond) go to the oldest: the
            // connection just accepted, still in its TLS handshake or sending its
            // first request, is the last to go.
            .min_by_key(|(id, e)| (e.idle_since.load(Ordering::SeqCst), **id))
            .map(|(id, _)| *id);
        match victim.and_then(|id| m.remove(&id)) {
            Some(e) => {
                e.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Logs a warning at most every 10 s.
struct Throttled(Option<Instant>);

impl Throttled {
    fn warn(&mut self, msg: std::fmt::Arguments<'_>) {
        if self
            .0
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.0 = Some(Instant::now());
            tracing::warn!("{msg}");
        }
    }
}

/// Accepts connections on `listener` and serves `router` on each, within `limits`,
/// over TLS with `tls`, until `stop` turns true; then asks every connection to close
/// once its request in progress is answered, and returns when none is left or after
/// `grace`.
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    (router, tls): (Router, Option<TlsAcceptor>),
    limits: Limits,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let conns = Arc::new(Conns::default());
    accept(
        &listener,
        (&router, tls.as_ref()),
        limits,
        &mut stop,
        &conns,
    )
    .await;
    drop(listener);
    let _ = tokio::time::timeout(grace, async {
        while conns.len() > 0 {
            conns.ended.notified().await;
        }
    })
    .await;
}

async fn accept(
    listener: &tokio::net::TcpListener,
    (router, tls): (&Router, Option<&TlsAcceptor>),
    limits: Limits,
    stop: &mut watch::Receiver<bool>,
    conns: &Arc<Conns>,
) {
    let epoch = Instant::now();
    let mut full = Throttled(None);
    let mut next_id = 0u64;
    loop {
        while conns.len() >= limits.max_connections.max(2) {
            if conns.evict_idle() {
                full.warn(format_args!(
                    "connection limit ({}) reached: closing the connection idle the longest",
                    limits.max_connections
                ));
                break;
            }
            full.warn(format_args!(
                "connection limit ({}) reached and every connection busy: new connections wait",
                limits.max_connections
            ));
            tokio::select! {
                () = conns.ended.notified() => {}
                _ = stop.changed() => return,
            }
        }
        if *stop.borrow() {
            return;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                full.warn(format_args!("accept error: {e}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let entry = Entry {
            busy: Arc::default(),
            idle_since: Arc::new(AtomicU64::new(millis(epoch))),
            close: CancellationToken::new(),
        };
        let task = Connection {
            id: next_id,
            busy: entry.busy.clone(),
            idle_since: entry.idle_since.clone(),
            close: entry.close.clone(),
            conns: conns.clone(),
            epoch,
        };
        if let Ok(mut m) = conns.map.lock() {
            m.insert(next_id, entry);
        }
        tokio::spawn(task.run(stream, (router.clone(), tls.cloned()), limits, stop.clone()));
    }
}

fn millis(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One connection's task.
struct Connection {
    id: u64,
    busy: Arc<AtomicUsize>,
    idle_since: Arc<AtomicU64>,
    close: CancellationToken,
    conns: Arc<Conns>,
    epoch: Instant,
}

impl Connection {
    /// Serves the connection (after the TLS handshake, with `tls`) until it ends or
    /// is closed; then removes it from the open ones.
    async fn run(
        self,
        stream: tokio::net::TcpStream,
        (router, tls): (Router, Option<TlsAcceptor>),
        limits: Limits,
        stop: watch::Receiver<bool>,
    ) {
        // Each boxed, so that once an event stream is handed over, what served the
        // connection until then (hyper's state, the handshake's) is freed: a
        // long-lived stream keeps only the small future of `handoff::stream`.
        let handed = match tls {
            None => Box::pin(self.serve(stream, router, limits, stop.clone())).await,
            Some(acceptor) => {
                Box::pin(self.serve_tls(&acceptor, stream, router, limits, stop.clone())).await
            }
        };
        if let Some((io, handed)) = handed {
            handoff::stream(io, handed, (&self.close, stop)).await;
        }
        self.conns.remove(self.id);
    }

    /// [`Connection::serve`] after the TLS handshake.
    async fn serve_tls(
        &self,
        acceptor: &TlsAcceptor,
        stream: tokio::net::TcpStream,
        router: Router,
        limits: Limits,
        mut stop: watch::Receiver<bool>,
    ) -> Option<(handoff::BoxedIo, Handed)> {
        let shaken = tokio::select! {
            s = crate::tls::handshake(acceptor, stream, limits.header_timeout) => s,
            () = self.close.cancelled() => None,
            () = async { let _ = stop.wait_for(|s| *s).await; } => None,
        };
        self.serve(shaken?, router, limits, stop).await
    }

    /// Serves HTTP on `stream` until the connection ends or is closed, or a
    /// response is an event stream: then returns the stream and that response, for
    /// [`handoff::stream`] to write.
    async fn serve<S>(
        &self,
        stream: S,
        router: Router,
        limits: Limits,
        mut stop: watch::Receiver<bool>,
    ) -> Option<(handoff::BoxedIo, Handed)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (busy, idle_since, epoch) = (self.busy.clone(), self.idle_since.clone(), self.epoch);
        let (slot, mut handed) = handoff::Slot::new();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let guard = Busy::enter(busy.clone(), idle_since.clone(), epoch);
            let version = req.version();
            // (Asked before the timeout's wrapper, which does not pass the question on.)
            let bodiless = http_body::Body::is_end_stream(req.body());
            let (req, read) = ReadToEnd::wrap(
                req.map(|b| {
                    Body::new(tower_http::timeout::TimeoutBody::new(
                        limits.body_timeout,
                        b,
                    ))
                }),
                bodiless,
            );
            let (router, slot) = (router.clone(), slot.clone());
            async move {
                let mut resp = router.oneshot(req).await?;
                if read.is_some_and(|r| !r.load(Ordering::SeqCst)) {
                    // Answered before its body was read (an error, say): the
                    // connection cannot carry another request, and says so, lest
                    // the client send one on it as it closes.
                    resp.headers_mut().insert(
                        axum::http::header::CONNECTION,
                        axum::http::HeaderValue::from_static("close"),
                    );
                }
                let Some((resp, guard)) = slot.offer(version, resp, guard) else {
                    // The connection's task writes it: hyper gets no answer.
                    return std::future::pending().await;
                };
                Ok::<_, std::convert::Infallible>(resp.map(|body| {
                    Body::new(Tracked {
                        body,
                        _guard: guard,
                    })
                }))
            }
        });
        let (io, flushed) = handoff::Watched::new(crate::bare::JsonParseErrors::new(stream));
        let mut conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_headers(256)
            .serve_connection(TokioIo::new(io), service);
        let handed = tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!("connection: {e}");
                }
                None
            }
            h = &mut handed => h.ok(),
            () = self.close.cancelled() => None,
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                Pin::new(&mut conn).graceful_shutdown();
                tokio::select! {
                    _ = &mut conn => None,
                    h = &mut handed => h.ok(),
                    () = self.close.cancelled() => None,
                }
            }
        };
        let handed = handed?;
        let all_out = tokio::select! {
            ok = handoff::written_out(&mut conn, &flushed) => ok,
            () = self.close.cancelled() => false,
        };
        all_out.then(|| {
            let io: handoff::BoxedIo = Box::new(conn.into_parts().io.into_inner().into_inner());
            (io, handed)
        })
    }
}

/// An event-stream response handed over by a connection's service.
type Handed = handoff::Handed<Busy>;

/// A request in progress on a connection: counted from the call until its response
/// body is dropped (sent, or the connection gone).
struct Busy {
    busy: Arc<AtomicUsize>,
    idle_since: Arc<AtomicU64>,
    epoch: Instant,
}

impl Busy {
    fn enter(busy: Arc<AtomicUsize>, idle_since: Arc<AtomicU64>, epoch: Instant) -> Busy {
        busy.fetch_add(1, Ordering::SeqCst);
        Busy {
            busy,
            idle_since,
            epoch,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.idle_since.store(millis(self.epoch), Ordering::SeqCst);
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A request body that records when it has been read to its end.
struct ReadToEnd {
    body: Body,
    read: Arc<AtomicBool>,
}

impl ReadToEnd {
    /// `req` with its body wrapped, and the flag that turns true once the body is
    /// read to its end; no flag for a request without a body (`bodiless`).
    fn wrap(req: Request, bodiless: bool) -> (Request, Option<Arc<AtomicBool>>) {
        if bodiless {
            return (req, None);
        }
        let read = Arc::new(AtomicBool::new(false));
        let flag = read.clone();
        (
            req.map(|body| Body::new(ReadToEnd { body, read })),
            Some(flag),
        )
    }
}

impl http_body::Body for ReadToEnd {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || self.body.is_end_stream() {
            self.read.store(true, Ordering::SeqCst);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request counted as in progress until dropped.
struct Tracked {
    body: Body,
    _guard: Busy,
}

impl http_body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
