//! Event streams written outside hyper, so an open one costs a few KB.
//!
//! hyper keeps two 8 KiB buffers for every HTTP/1 connection (what it reads, what it
//! writes) as long as the connection lives. An event stream lives for hours and
//! writes a few hundred bytes now and then: with thousands open, those buffers were
//! most of the server's memory. So once a route answers with an event stream
//! (`text/event-stream`, to an HTTP/1.1 request), the connection is taken back from
//! hyper — its buffers freed — and the stream written here, chunked, with
//! `connection: close`: it is the connection's last response.
//!
//! The order of events on one connection:
//!
//! 1. The service (in `conn.rs`) gets the route's response. If it is an event
//!    stream and the connection's [`Slot`] is still there, it sends the response's
//!    head and body through the slot and never answers hyper, which therefore
//!    writes nothing more.
//! 2. The connection's task, woken by the slot, keeps polling hyper until
//!    everything hyper had to write (the end of an earlier response on the same
//!    connection) has reached the socket — [`Watched`] sees the writes and the
//!    flushes — and then takes the socket back (`into_parts`).
//! 3. [`stream`] writes the head and the body's frames until the body ends, the
//!    client goes away, or the connection is closed.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, Version, header, response};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

/// What a connection's stream is to [`stream`]: any byte stream.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection's stream, plain or TLS.
pub(crate) type BoxedIo = Box<dyn Io>;

/// A response taken out of hyper, with what must live as long as it is written.
pub(crate) struct Handed<G> {
    head: response::Parts,
    body: Body,
    /// Kept until the stream ends (the connection counts as busy till then).
    guard: G,
}

/// Where a connection's service hands an event-stream response to the connection's
/// task: one hand-off per connection, its last response.
pub(crate) struct Slot<G>(Mutex<Option<oneshot::Sender<Handed<G>>>>);

impl<G> Slot<G> {
    /// A slot, and what the connection's task waits on.
    pub(crate) fn new() -> (Arc<Slot<G>>, oneshot::Receiver<Handed<G>>) {
        let (tx, rx) = oneshot::channel();
        (Arc::new(Slot(Mutex::new(Some(tx)))), rx)
    }

    /// Hands `resp` over if it is an event stream answering an HTTP/1.1 request and
    /// nothing was handed over before (`None`); otherwise gives it back, with
    /// `guard`.
    pub(crate) fn offer(
        &self,
        version: Version,
        resp: axum::response::Response,
        guard: G,
    ) -> Option<(axum::response::Response, G)> {
        if version != Version::HTTP_11 || !is_event_stream(resp.headers()) {
            return Some((resp, guard));
        }
        let Some(tx) = self.0.lock().ok().and_then(|mut s| s.take()) else {
            return Some((resp, guard));
        };
        let (head, body) = resp.into_parts();
        tx.send(Handed { head, body, guard }).err().map(|h| {
            (
                axum::response::Response::from_parts(h.head, h.body),
                h.guard,
            )
        })
    }
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// A connection's stream that records whether everything written to it has been
/// flushed: true from the start and after each completed flush, false after each
/// write.
pub(crate) struct Watched<S> {
    inner: S,
    flushed: Arc<AtomicBool>,
}

impl<S> Watched<S> {
    /// `inner`, and the flag telling whether what was written to it is flushed.
    pub(crate) fn new(inner: S) -> (Self, Arc<AtomicBool>) {
        let flushed = Arc::new(AtomicBool::new(true));
        (
            Watched {
                inner,
                flushed: flushed.clone(),
            },
            flushed,
        )
    }

    /// The stream inside.
    pub(crate) fn into_inner(self) -> S {
        self.inner
    }

    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.flushed.store(false, Ordering::SeqCst);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.flushed.store(true, Ordering::SeqCst);
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Polls `conn` (hyper's connection, whose service holds back its answer) until
/// everything it had to write is flushed to the socket — `flushed` is
/// [`Watched`]'s flag — so that the socket can be taken from it: true then; false
/// if the connection ended first. hyper writes nothing new meanwhile: the only
/// answer it waits for is the one handed over.
pub(crate) async fn written_out<C: Future + Unpin>(conn: &mut C, flushed: &AtomicBool) -> bool {
    std::future::poll_fn(|cx| {
        if flushed.load(Ordering::SeqCst) {
            return Poll::Ready(true);
        }
        if Pin::new(&mut *conn).poll(cx).is_ready() {
            return Poll::Ready(false);
        }
        if flushed.load(Ordering::SeqCst) {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The response head as written on the wire: hyper's framing headers replaced by
/// chunked framing and `connection: close`.
fn head_bytes(head: &response::Parts) -> Vec<u8> {
    let status: StatusCode = head.status;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &head.headers {
        if [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONNECTION,
            header::DATE,
        ]
        .contains(name)
        {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    out
}

/// One chunk of the chunked body: its size in hex, the bytes, CRLF.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.reserve(data.len() + 2);
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// What ended a wait of [`stream`].
enum Next {
    Frame(Option<Result<axum::body::Bytes, axum::Error>>),
    Gone,
    Read,
}

/// Writes `handed` on `io` until its body ends or `stop` turns true (then the last
/// chunk), the client closes its side, writing fails, or `close` is cancelled; then
/// closes `io`.
pub(crate) async fn stream<S, G>(
    mut io: S,
    handed: Handed<G>,
    (close, mut stop): (&CancellationToken, watch::Receiver<bool>),
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Handed { head, body, guard } = handed;
    let mut frames = body.into_data_stream();
    let mut scratch = [0u8; 32];
    let mut out = head_bytes(&head);
    drop(head);
    loop {
        if !out.is_empty() {
            let sent = tokio::select! {
                r = async { io.write_all(&out).await?; io.flush().await } => r.is_ok(),
                () = close.cancelled() => false,
            };
            if !sent {
                break;
            }
            out = Vec::new();
        }
        // A client sends nothing more on this connection: what it might send is
        // read and dropped, to see it close.
        let next = tokio::select! {
            f = frames.next() => Next::Frame(f),
            r = io.read(&mut scratch) => match r {
                Ok(0) | Err(_) => Next::Gone,
                Ok(_) => Next::Read,
            },
            () = close.cancelled() => Next::Gone,
            // The server stops: the stream ends cleanly, and a client reconnects.
            () = async { let _ = stop.wait_for(|s| *s).await; } => Next::Frame(None),
        };
        match next {
            Next::Frame(Some(Ok(data))) if data.is_empty() => {}
            Next::Frame(Some(Ok(data))) => out = chunk(&data),
            Next::Frame(None) => {
                let _ = io.write_all(b"0\r\n\r\n").await;
                break;
            }
            Next::Frame(Some(Err(e))) => {
                // Ended without the last chunk: the client sees the stream cut.
                tracing::debug!("event stream: {e}");
                break;
            }
            Next::Gone => break,
            Next::Read => {}
        }
    }
    let _ = io.shutdown().await;
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sse_response() -> axum::response::Response {
        axum::response::Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .header(header::CONTENT_LENGTH, "5")
            .body(Body::from("data: x\n\n"))
            .expect("response")
    }

    #[test]
    fn only_an_http_1_1_event_stream_is_handed_over_and_only_once() {
        let (slot, mut rx) = Slot::new();
        let json = axum::response::Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::empty())
            .expect("response");
        assert!(slot.offer(Version::HTTP_11, json, ()).is_some());
        assert!(slot.offer(Version::HTTP_10, sse_response(), ()).is_some());
        assert!(rx.try_recv().is_err());
        assert!(slot.offer(Version::HTTP_11, sse_response(), ()).is_none());
        assert!(rx.try_recv().is_ok());
        assert!(slot.offer(Version::HTTP_11, sse_response(), ()).is_some());
    }

    #[test]
    fn a_head_has_chunked_framing_and_closes_the_connection() {
        let (head, _) = sse_response().into_parts();
        let text = String::from_utf8(head_bytes(&head)).expect("ascii");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"));
        let lines: Vec<&str> = text.trim_end().split("\r\n").collect();
        for want in [
            "content-type: text/event-stream",
            "cache-control: no-cache",
            "transfer-encoding: chunked",
            "connection: close",
        ] {
            assert!(lines.contains(&want), "{want} missing in {text}");
        }
        assert!(!text.contains("content-length"), "{text}");
        assert!(lines.iter().any(|l| l.starts_with("date: ")));
        assert_eq!(chunk(b"data: x\n\n"), b"9\r\ndata: x\n\n\r\n");
    }

    #[tokio::test]
    async fn a_stream_writes_its_chunks_then_the_last_one_and_closes() {
        let (server, mut client) = tokio::io::duplex(1024);
        let (slot, rx) = Slot::new();
        assert!(slot.offer(Version::HTTP_11, sse_response(), ()).is_none());
        let handed = rx.await.expect("handed");
        let close = CancellationToken::new();
        let (_stop_tx, stop) = watch::channel(false);
        stream(server, handed, (&close, stop)).await;
        let mut got = String::new();
        client.read_to_string(&mut got).await.expect("read");
        let (_, body) = got.split_once("\r\n\r\n").expect("head");
        assert_eq!(body, "9\r\ndata: x\n\n\r\n0\r\n\r\n");
    }

    #[tokio::test]
    async fn a_stream_ends_when_its_client_closes_its_side() {
        let (server, mut client) = tokio::io::duplex(1024);
        let (slot, rx) = Slot::new();
        let endless = axum::response::Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .body(Body::from_stream(futures_util::stream::pending::<
                Result<axum::body::Bytes, io::Error>,
            >()))
            .expect("response");
        assert!(slot.offer(Version::HTTP_11, endless, ()).is_none());
        let handed = rx.await.expect("handed");
        let close = CancellationToken::new();
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(async move { stream(server, handed, (&close, stop)).await });
        let mut head = [0u8; 8];
        client.read_exact(&mut head).await.expect("head");
        assert_eq!(&head, b"HTTP/1.1");
        client.shutdown().await.expect("shutdown");
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("the stream ended")
            .expect("joined");
        drop(stop_tx);
    }
}
