//! The worker endpoints (`/worker/...`), driven through the library's own remote port
//! ([`RemotePort`]) as `batchdb run --server` drives them, and raw where a worker
//! would not send it.

use std::sync::Arc;
use std::time::Duration;

use batchdb::Error;
use batchdb::queue::{
    AttemptReport, ClaimRequest, Dependency, Finished, Outcome, PushOptions, Selector, State,
};
use batchdb::remote::{RemoteOptions, RemotePort};
use batchdb::runner::ShellRunner;
use batchdb::worker::wire::{self, PROTOCOL};
use batchdb::worker::{Worker, WorkerOptions, WorkerPort};
use batchdb_server::ServeOptions;

use crate::util::*;

async fn port(s: &Server, token: Option<&str>) -> RemotePort {
    let mut o = RemoteOptions::new(s.url(""));
    o.token = token.map(str::to_string);
    RemotePort::connect(&o).await.expect("connect")
}

fn claim_req(lease_ms: u64) -> ClaimRequest {
    ClaimRequest::new("remote-test", 1, Duration::from_millis(lease_ms))
}

fn report() -> AttemptReport {
    let mut r = AttemptReport::default();
    r.exit_code = Some(0);
    r.keep_inline(b"out\n".to_vec());
    r.stdout = Some(batchdb::blob::BlobInfo {
        hash: batchdb::Hash::of(b"out\n"),
        size: 4,
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attempts_heartbeat_finish_output_and_live_are_refused_409() {
    let s = Server::start().await;
    s.add("echo x").await;
    let p = port(&s, None).await;
    let old = p.claim(&claim_req(100)).await.expect("claim").remove(0);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let new = p
        .claim(&claim_req(30_000))
        .await
        .expect("takeover")
        .remove(0);
    assert!(new.takeover);
    let t = old.token;
    assert!(fenced(p.heartbeat(&t, Duration::from_secs(5)).await));
    assert!(fenced(p.status(&t).await));
    assert!(fenced(p.finish(&t, &Outcome::Success(report())).await));
    let mut big: &[u8] = &[7u8; 100_000];
    assert!(fenced(p.put_output(&t, &mut big).await));
    let live = format!("/worker/live/{}/{}/stdout", t.id, t.token);
    let r = s
        .client
        .post(s.url(&live))
        .header("batchdb-worker-protocol", PROTOCOL.to_string())
        .body("late bytes")
        .send()
        .await
        .expect("POST");
    assert_error(r, 409, "fenced").await;
    // The current attempt records; the stale one recorded nothing.
    let done = p.finish(&new.token, &Outcome::Success(report())).await;
    assert_eq!(done.expect("finish"), Finished::Result);
    let d = s.db.instance(t.id).await.expect("instance");
    assert_eq!(d.state, State::Result);
    assert_eq!(d.attempts.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_finish_records_once_and_recorded_says_what_the_first_did() {
    let s = Server::start().await;
    s.add("echo x").await;
    let p = port(&s, None).await;
    let c = p.claim(&claim_req(30_000)).await.expect("claim").remove(0);
    let outcome = Outcome::Success(report());
    assert_eq!(
        p.finish(&c.token, &outcome).await.expect("finish"),
        Finished::Result
    );
    // The reply was lost, say: the retry is fenced, and `recorded` says it landed.
    assert!(matches!(
        p.finish(&c.token, &outcome).await,
        Err(Error::Fenced { .. })
    ));
    assert_eq!(
        p.recorded(&c.token).await.expect("recorded"),
        Some(Finished::Result)
    );
    let counts = s.db.counts().await.expect("counts");
    assert_eq!((counts.result, counts.running), (1, 0));
    let rows =
        s.db.list_page(batchdb::queue::ListKind::Result, (0, 10), None)
            .await;
    assert_eq!(rows.expect("list").len(), 1);
    // The inline output travelled with the finish.
    let mut out = Vec::new();
    let mut r = s.db.get(&batchdb::Hash::of(b"out\n")).await.expect("get");
    tokio::io::AsyncReadExt::read_to_end(&mut r, &mut out)
        .await
        .expect("read");
    assert_eq!(out, b"out\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_another_protocol_is_refused_with_both_versions_named() {
    let s = Server::start().await;
    for header in [None, Some("999")] {
        let mut rb = s.client.post(s.url("/worker/claim")).body("{}");
        if let Some(h) = header {
            rb = rb.header("batchdb-worker-protocol", h);
        }
        let r = rb.send().await.expect("POST");
        let theirs = header.unwrap_or("none");
        assert_error(
            r,
            400,
            &format!("worker protocol {theirs}, this server speaks {PROTOCOL}"),
        )
        .await;
    }
    // `hello` answers anyone, so a worker learns why.
    let hello = s.json("/worker/hello").await;
    assert_eq!(hello["protocol"], PROTOCOL);
    assert_eq!(hello["version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_are_refused_413_and_record_nothing() {
    let s = Server::start().await;
    let inst = s.add("echo x").await;
    let p = port(&s, None).await;
    let c = p.claim(&claim_req(30_000)).await.expect("claim").remove(0);
    // An inline output longer than the inline limit.
    let body = serde_json::json!({
        "token": c.token,
        "outcome": Outcome::Success(AttemptReport::default()),
        "inline": [hex_of(batchdb::INLINE_MAX + 1)],
    });
    let r = s
        .client
        .post(s.url("/worker/finish"))
        .header("batchdb-worker-protocol", PROTOCOL.to_string())
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_error(r, 413, "longer than").await;
    // A JSON body past the 2 MiB request limit.
    let r = s
        .client
        .post(s.url("/worker/claim"))
        .header("batchdb-worker-protocol", PROTOCOL.to_string())
        .header("content-type", "application/json")
        .body(vec![b' '; 3 << 20])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 413);
    let d = s.db.instance(inst.id).await.expect("instance");
    assert_eq!(d.state, State::Running, "nothing was recorded");
}

fn fenced<T>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Fenced { .. }))
}

fn hex_of(n: usize) -> String {
    "ab".repeat(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_token_opens_the_worker_endpoints_only() {
    let s = Server::with(ServeOptions {
        token: Some("client".into()),
        worker_token: Some("worker".into()),
        ..Default::default()
    })
    .await;
    for token in [None, Some("client"), Some("wrong")] {
        let mut o = RemoteOptions::new(s.url(""));
        o.token = token.map(str::to_string);
        let e = RemotePort::connect(&o).await.expect_err("refused");
        assert!(
            matches!(
                e,
                Error::Server {
                    status: Some(401),
                    ..
                }
            ),
            "{token:?}: {e}"
        );
    }
    let p = port(&s, Some("worker")).await;
    assert_eq!(p.counts().await.expect("counts").pending, 0);
    let r = s
        .client
        .post(s.url("/api/cancel/1"))
        .bearer_auth("worker")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 401, "the worker token is not a client token");
    // Without a worker token, the client token opens them.
    let s = Server::with(ServeOptions {
        token: Some("client".into()),
        ..Default::default()
    })
    .await;
    port(&s, Some("client")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_worker_over_http_runs_large_payloads_outputs_and_dependencies() {
    let s = Server::start().await;
    // A payload past the inline limit (served from the blob store), an output past
    // it (uploaded), and a dependent reading its dependency's result.
    let big_payload = format!(
        "head -c 50000 /dev/zero | tr '\\0' y\n#{}",
        "p".repeat(20_000)
    );
    let first =
        s.db.add(big_payload.as_bytes(), &PushOptions::default())
            .await
            .expect("add");
    let mut opts = PushOptions::default();
    opts.after = vec![Dependency::on_result(Selector::Id(first.id))];
    let second =
        s.db.add(&b"cut -d' ' -f2 \"$BATCHDB_DEPS\""[..], &opts)
            .await
            .expect("add dependent");
    let p = Arc::new(port(&s, None).await);
    let mut wo = WorkerOptions::default();
    wo.until_empty = true;
    wo.concurrency = 2;
    let w = Worker::with_port(p.clone(), Arc::new(ShellRunner::default()), wo);
    tokio::time::timeout(DEADLINE, w.run(None))
        .await
        .expect("drained in time")
        .expect("worker");
    let one = s.db.instance(first.id).await.expect("first");
    let two = s.db.instance(second.id).await.expect("second");
    assert_eq!((one.state, two.state), (State::Result, State::Result));
    let out = one.attempts[0].report.stdout.expect("stdout");
    assert_eq!(out.size, 50_000);
    assert_eq!(out.hash, batchdb::Hash::of(&[b'y'; 50_000]));
    let dep_out = two.attempts[0].report.stdout.expect("stdout");
    assert_eq!(
        dep_out.hash,
        batchdb::Hash::of(format!("{}\n", out.hash).as_bytes())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_upload_that_breaks_off_stores_nothing() {
    use futures_util::StreamExt;
    let s = Server::start().await;
    s.add("echo x").await;
    let p = port(&s, None).await;
    let c = p.claim(&claim_req(30_000)).await.expect("claim").remove(0);
    let path = format!(
        "{}/worker/output/{}/{}",
        s.prefix, c.token.id, c.token.token
    );
    // 1 MB announced, 100 KB sent, then the connection closes.
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nbatchdb-worker-protocol: {PROTOCOL}\r\nContent-Length: 1000000\r\n\r\n",
        s.addr
    );
    let mut req = head.into_bytes();
    req.extend(std::iter::repeat_n(b'z', 100_000));
    let mut conn = tokio::net::TcpStream::connect(s.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut conn, &req)
        .await
        .expect("write");
    drop(conn);
    // Whatever the server got is not a blob, now or later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blobs: Vec<_> = s.db.blobs().list().collect().await;
    assert!(blobs.is_empty(), "{blobs:?}");
    let tmp = s.dir.path().join("blobs").join("tmp");
    let left = std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "temporary files left in {}", tmp.display());
    // The same bytes, sent whole, are stored under their hash.
    let mut whole: &[u8] = &[b'z'; 100_000];
    let info = p.put_output(&c.token, &mut whole).await.expect("upload");
    assert_eq!(info.hash, batchdb::Hash::of(&[b'z'; 100_000]));
    assert!(s.db.blobs().contains(&info.hash).await.expect("contains"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_claim_records_the_outcome_and_hands_the_slot_its_next_instance() {
    let s = Server::start().await;
    assert_eq!(s.json("/worker/hello").await["finish_claim"], true);
    let x = s.add("echo x").await;
    let y = s.add("echo y").await;
    let p = port(&s, None).await;
    let c = p.claim(&claim_req(30_000)).await.expect("claim").remove(0);
    let (second, script) = if c.token.id == x.id {
        (y, "echo y")
    } else {
        (x, "echo x")
    };
    let outcome = Outcome::Success(report());
    let (finished, next) = p
        .finish_and_claim(&c.token, &outcome, &claim_req(30_000))
        .await
        .expect("finish and claim");
    assert_eq!(finished, Finished::Result);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].token.id, second.id);
    // Its payload came with it, and reads back checked.
    let mut payload = Vec::new();
    let mut r = p.blob(&next[0].job).await.expect("payload");
    tokio::io::AsyncReadExt::read_to_end(&mut r, &mut payload)
        .await
        .expect("read");
    assert_eq!(payload, script.as_bytes());
    // A stale attempt is refused and claims nothing.
    let third = s.add("echo z").await;
    assert!(fenced(
        p.finish_and_claim(&c.token, &outcome, &claim_req(30_000))
            .await
    ));
    let d = s.db.instance(third.id).await.expect("instance");
    assert_eq!(d.state, State::Pending);
    // A claim limit out of range is refused before anything is recorded.
    let mut none = claim_req(30_000);
    none.limit = 0;
    let body = serde_json::json!({
        "finish": wire::Finish::new(next[0].token, &outcome),
        "next": none,
    });
    let r = s
        .client
        .post(s.url("/worker/finish-claim"))
        .header("batchdb-worker-protocol", PROTOCOL.to_string())
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_error(r, 400, "limit 0 out of range").await;
    let d = s.db.instance(second.id).await.expect("instance");
    assert_eq!(d.state, State::Running, "nothing was recorded");
}
