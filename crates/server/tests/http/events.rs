//! `GET /events` (the event log as SSE, Last-Event-ID) and `GET /api/output/{id}`.

use std::sync::Arc;

use batchdb::runner::ShellRunner;
use batchdb::worker::WorkerOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_the_log_and_resume_from_last_event_id() {
    let s = Server::start().await;
    let (key, id) = s.create("echo one").await;
    let mut sse = Sse::new(s.get("/events").await);
    let create = sse.next().await;
    assert_eq!(create.id.as_deref(), Some("1"));
    assert_eq!(create.json()["event"], "create");
    assert_eq!(create.json()["job"], key.as_str());
    let push = sse.next().await;
    assert_eq!(push.id.as_deref(), Some("2"));
    assert_eq!(push.json()["event"], "push");
    assert_eq!(push.json()["instance"], id);
    // New events follow live: from another handle on the same database, as another
    // process would make them.
    let other = batchdb::BatchDb::open(&batchdb::Config::in_dir(s.dir.path()))
        .await
        .unwrap();
    other
        .add(&b"echo two"[..], &Default::default())
        .await
        .unwrap();
    let next = sse.next().await;
    assert_eq!(next.id.as_deref(), Some("3"));
    assert_eq!(next.json()["event"], "create");
    drop(sse);

    // A reconnecting EventSource sends Last-Event-ID: it resumes right after it.
    let r = s
        .client
        .get(s.url("/events?after=0"))
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    let mut sse = Sse::new(r);
    let first = sse.next().await;
    assert_eq!(first.id.as_deref(), Some("3"));
    assert_eq!(sse.next().await.id.as_deref(), Some("4"));
    // ?after= works the same for a first connection.
    let mut sse = Sse::new(s.get("/events?after=3").await);
    assert_eq!(sse.next().await.id.as_deref(), Some("4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_run_shows_as_start_and_result_events() {
    let s = Server::start().await;
    let mut sse = Sse::new(s.get("/events").await);
    let (_, id) = s.create("echo done").await;
    s.run_until_empty().await;
    let kinds: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let m = sse.next().await.json();
            if m["event"] != "create" {
                assert_eq!(m["instance"], id);
            }
            v.push(m["event"].as_str().unwrap().to_string());
        }
        v
    };
    assert_eq!(kinds, ["create", "push", "start", "result"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_follows_a_running_job_live_then_ends() {
    let s = Server::start().await;
    let go = s.dir.path().join("go");
    let script = format!(
        "echo first line; echo err line >&2; while [ ! -e '{}' ]; do sleep 0.02; done; echo second line",
        go.display()
    );
    let (_, id) = s.create(&script).await;
    let db = s.db.clone();
    let worker = tokio::spawn(async move {
        let opts = {
            let mut o = WorkerOptions::default();
            o.until_empty = true;
            o
        };
        db.worker(Arc::new(ShellRunner::default()), opts)
            .run(None)
            .await
    });
    let mut sse = Sse::new(s.get(&format!("/api/output/{id}")).await);
    let mut stdout = String::new();
    let mut stderr = String::new();
    // The first line arrives while the job still waits for `go`.
    while !stdout.contains("first line") {
        let m = sse.next().await;
        match m.event.as_str() {
            "stdout" => stdout.push_str(m.json()["text"].as_str().unwrap()),
            "stderr" => stderr.push_str(m.json()["text"].as_str().unwrap()),
            "attempt" => assert_eq!(m.json()["attempt"], 1),
            other => panic!("unexpected {other} event before the job was released"),
        }
    }
    assert_eq!(
        s.json(&format!("/api/instance/{id}")).await["state"],
        "running"
    );
    std::fs::write(&go, b"").unwrap();
    let end = loop {
        let m = sse.next().await;
        match m.event.as_str() {
            "stdout" => stdout.push_str(m.json()["text"].as_str().unwrap()),
            "stderr" => stderr.push_str(m.json()["text"].as_str().unwrap()),
            "end" => break m.json(),
            _ => {}
        }
    };
    assert_eq!(end["state"], "result");
    assert_eq!(stdout, "first line\nsecond line\n");
    wait_for("stderr", || {
        let done = stderr == "err line\n";
        async move { done.then_some(()) }
    })
    .await;
    assert!(
        sse.next_or_end().await.is_none(),
        "the stream ends after end"
    );
    worker.await.unwrap().unwrap();

    // A finished instance's output streams from its blobs.
    let mut sse = Sse::new(s.get(&format!("/api/output/id:{id}")).await);
    let mut again = String::new();
    loop {
        let m = sse.next().await;
        match m.event.as_str() {
            "stdout" => again.push_str(m.json()["text"].as_str().unwrap()),
            "end" => break,
            _ => {}
        }
    }
    assert_eq!(again, stdout);
    assert_error(s.get("/api/output/12345").await, 404, "no instance").await;
}

/// Decodes a chunked body, checking its framing; the bytes it carried.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap(), 16)
            .expect("hex chunk size");
        body = &body[line_end + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n", "the last chunk ends the body");
            return out;
        }
        out.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n");
        body = &body[size + 2..];
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_after_other_responses_on_one_connection_follows_them_and_closes_it() {
    let s = Server::start().await;
    let (_, id) = s.create("echo streamed").await;
    s.run_until_empty().await;
    // Two requests in one write (pipelined): the event stream's answer must come
    // after the whole first answer, though the server takes the connection from the
    // HTTP library to write it.
    let request = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /api/output/{id} HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    let (status, head, rest) = raw(s.addr, request.as_bytes()).await;
    assert_eq!(status, 200, "{head}");
    let length = content_length(&head);
    let second = &rest[length..];
    let split = second
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the event stream's head");
    let sse_head = String::from_utf8_lossy(&second[..split]).into_owned();
    assert!(sse_head.starts_with("HTTP/1.1 200 OK\r\n"), "{sse_head}");
    for want in [
        "content-type: text/event-stream",
        "transfer-encoding: chunked",
        "connection: close",
    ] {
        assert!(sse_head.lines().any(|l| l == want), "{want}: {sse_head}");
    }
    let events = String::from_utf8(dechunk(&second[split + 4..])).unwrap();
    assert!(events.contains("event: stdout"), "{events}");
    assert!(events.contains(r#"{"text":"streamed\n"}"#), "{events}");
    assert!(events.contains("event: end"), "{events}");

    // One after the other on a kept-alive connection, the same.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"\r\n\r\nok\n") {
        let n = c.read(&mut buf).await.unwrap();
        assert_ne!(n, 0, "closed after one answer");
        got.extend_from_slice(&buf[..n]);
    }
    c.write_all(format!("GET /api/output/{id} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(DEADLINE, c.read_to_end(&mut all))
        .await
        .expect("the stream ends")
        .unwrap();
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("event: end"), "{text}");
}
