//! What a client may hold of the server: the header and body timeouts, the
//! connection cap (an idle flood never locks a real client out), the event-stream
//! cap, and streams fed from one follower of the log (a stream that falls behind
//! catches up from the log, with no gap).

use std::time::{Duration, Instant};

use batchdb::queue::PushOptions;
use batchdb_server::{Limits, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::*;

fn limited(max_connections: usize, max_streams: usize, timeouts: f64) -> ServeOptions {
    ServeOptions {
        limits: Limits::new(
            (max_connections, max_streams),
            Duration::from_secs_f64(timeouts),
            Duration::from_secs_f64(timeouts),
        ),
        ..ServeOptions::default()
    }
}

/// Reads until the server closes the connection; what it sent.
async fn read_until_closed(c: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut buf))
        .await
        .expect("the server closes the connection")
        .map_or_else(|_| Vec::new(), |_| buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_finishes_its_headers_is_closed_after_the_header_timeout() {
    let s = Server::with(limited(64, 8, 1.0)).await;
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    partial.write_all(b"GET /healthz HT").await.unwrap();
    read_until_closed(&mut silent).await;
    read_until_closed(&mut partial).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    // A keep-alive connection idle after its response is closed the same way.
    let mut kept = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut kept).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_flood_does_not_lock_out_a_real_client() {
    let s = Server::with(limited(32, 8, 30.0)).await;
    // Ten times the cap, some silent, some half-way through a header: far past the
    // cap, and none of them will time out during the test.
    let mut flood = Vec::new();
    for i in 0..320 {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        if i % 2 == 0 {
            c.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").await.unwrap();
        }
        flood.push(c);
    }
    for _ in 0..5 {
        let r = tokio::time::timeout(DEADLINE, s.client.get(s.url("/healthz")).send())
            .await
            .expect("a real client is served during the flood")
            .expect("GET /healthz");
        assert_eq!(r.status(), 200);
    }
    // The longest-idle connections were closed to make room.
    let mut closed = 0;
    for c in &mut flood[..64] {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(50), c.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(closed >= 32, "{closed} of the oldest 64 closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_fails_after_the_body_timeout_and_a_slow_moving_one_is_stored() {
    let s = Server::with(limited(64, 8, 1.0)).await;
    let head = "POST /create HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\n";
    let mut stalled = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.write_all(b"echo ").await.unwrap();
    let started = Instant::now();
    let got = read_until_closed(&mut stalled).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    let text = String::from_utf8_lossy(&got);
    assert!(!text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        s.db.counts().await.unwrap().pending,
        0,
        "no job from a stalled upload"
    );

    // One byte every 400 ms: slower than nothing for a second, never idle that long.
    let mut slow = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(head.as_bytes()).await.unwrap();
    for b in b"echo slow\n" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        slow.write_all(&[*b]).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, slow.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(s.db.counts().await.unwrap().pending, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_beyond_the_cap_are_refused_with_503_until_one_closes() {
    let s = Server::with(limited(64, 2, 30.0)).await;
    let (_, id) = s.create("echo one").await;
    let a = Sse::new(s.get("/events").await);
    let b = Sse::new(s.get(&format!("/api/output/{id}")).await);
    assert_error(s.get("/events").await, 503, "too many event streams").await;
    assert_error(s.get(&format!("/api/output/{id}")).await, 503, "limit 2").await;
    // Other requests are served as usual.
    assert_eq!(s.get("/healthz").await.status(), 200);
    drop((a, b));
    wait_for("a stream slot after closing one", || async {
        (s.get("/events").await.status() == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_each_see_every_new_event_and_a_lagging_one_catches_up_without_gaps() {
    let s = Server::start().await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        streams.push(Sse::new(s.get("/events").await));
    }
    s.create("echo one").await;
    for sse in &mut streams {
        assert_eq!(sse.next().await.json()["event"], "create");
        assert_eq!(sse.next().await.json()["event"], "push");
    }
    // One stream is not read while far more events than the fan-out keeps are
    // written (each add is a create and a push): it must read the log to catch up.
    let mut lagging = Sse::new(s.get("/events?after=2").await);
    let payloads: Vec<Vec<u8>> = (0..3000)
        .map(|i| format!("echo {i}").into_bytes())
        .collect();
    s.db.add_many(payloads, &PushOptions::default())
        .await
        .unwrap();
    let last = s.db.last_event_id().await.unwrap();
    let mut want = 3;
    while want <= last {
        let m = lagging.next().await;
        assert_eq!(
            m.id,
            Some(want.to_string()),
            "events in order, none missing"
        );
        want += 1;
    }
    for sse in &mut streams {
        let m = sse.next().await;
        assert_eq!(m.id.as_deref(), Some("3"));
    }
}

/// Sends `request` on `c` and reads one response's head (lowercase), and what came
/// after it in the same reads.
async fn head_of(c: &mut tokio::net::TcpStream, request: &[u8]) -> (String, Vec<u8>) {
    c.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(DEADLINE, c.read(&mut buf))
            .await
            .expect("an answer")
            .expect("read");
        assert_ne!(n, 0, "closed before an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    (head, got[end + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_sent_before_its_request_body_was_read_says_the_connection_closes() {
    let s = Server::with(ServeOptions {
        token: Some("s3cret-token".into()),
        ..ServeOptions::default()
    })
    .await;
    // Refused before its body is read: the server cannot take another request on
    // this connection, so its answer tells the client not to send one.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (head, _) = head_of(
        &mut c,
        b"POST /create HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\necho partial",
    )
    .await;
    assert!(head.starts_with("http/1.1 401"), "{head}");
    assert!(head.lines().any(|l| l == "connection: close"), "{head}");
    // A request whose body was read keeps its connection, and so does one without
    // a body.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    for _ in 0..2 {
        let (head, rest) = head_of(
            &mut c,
            b"POST /create HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token\r\n\
              Content-Length: 6\r\n\r\necho 1",
        )
        .await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let length = content_length(&head);
        let mut body = vec![0u8; length - rest.len()];
        c.read_exact(&mut body).await.expect("body");
    }
    let (head, _) = head_of(&mut c, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!head.contains("connection: close"), "{head}");
}
