//! Uploads: bodies stream to the store; a client that goes away leaves nothing.

use std::time::Duration;

use batchdb::Hasher;
use tokio::io::AsyncWriteExt;

use crate::util::*;

/// Files in the blob store outside `tmp/` (complete blobs), and in `tmp/`.
fn blob_files(s: &Server) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let root = s.dir.path().join("blobs");
    let mut all = Vec::new();
    walk(&root, &mut all);
    let tmp = root.join("tmp");
    all.into_iter().partition(|p| !p.starts_with(&tmp))
}

async fn assert_nothing_left(s: &Server) {
    wait_for("the temporary file to be removed", || {
        let (_, tmp) = blob_files(s);
        async move { tmp.is_empty().then_some(()) }
    })
    .await;
    assert_eq!(blob_files(s).0, Vec::<std::path::PathBuf>::new(), "no blob");
    let c = s.db.counts().await.unwrap();
    assert_eq!(c.pending, 0, "no job queued");
    assert!(s.lines("/list/job").await.is_empty(), "no job row");
    assert_eq!(s.db.queue().last_event_id().await.unwrap(), 0, "no event");
}

/// Sends the head and part of a body, waits until the server is writing it to a
/// temporary file, then drops the connection.
async fn upload_then_vanish(s: &Server, head: &str, chunk: impl Fn(usize) -> Vec<u8>) {
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut i = 0;
    // Keep sending until the store has a temporary file open for this upload.
    loop {
        conn.write_all(&chunk(i)).await.unwrap();
        i += 1;
        if !blob_files(s).1.is_empty() {
            break;
        }
        assert!(i < 10_000, "the server never started writing the upload");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_upload_leaves_no_job_and_no_blob() {
    let s = Server::start().await;
    let head = "POST /create HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n";
    upload_then_vanish(&s, head, |_| vec![b'x'; 64 * 1024]).await;
    assert_nothing_left(&s).await;
    // and the server carries on
    assert_eq!(s.get("/healthz").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_upload_cut_short_leaves_nothing() {
    let s = Server::start().await;
    let head = "POST /create HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    upload_then_vanish(&s, head, |_| {
        let mut c = format!("{:x}\r\n", 64 * 1024).into_bytes();
        c.extend(vec![b'y'; 64 * 1024]);
        c.extend(b"\r\n");
        c
    })
    .await;
    assert_nothing_left(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_streamed_body_is_stored_whole() {
    let s = Server::start().await;
    const CHUNKS: usize = 512; // 512 x 128 KiB = 64 MiB
    let chunk = |i: usize| -> Vec<u8> {
        (0..128 * 1024)
            .map(|j| ((i * 31 + j) % 253) as u8)
            .collect()
    };
    let mut h = Hasher::new();
    for i in 0..CHUNKS {
        h.update(&chunk(i));
    }
    let expected = h.finish().to_hex();
    let body =
        futures_util::stream::iter((0..CHUNKS).map(move |i| Ok::<_, std::io::Error>(chunk(i))));
    let r = s
        .client
        .post(s.url("/create"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), format!("{expected}\n"));
    let size = s.lines("/list/job").await[0]["size"].as_u64().unwrap();
    assert_eq!(size, (CHUNKS * 128 * 1024) as u64);
    let head = s
        .client
        .head(s.url(&format!("/blob/{expected}")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.headers()["content-length"],
        (CHUNKS * 128 * 1024).to_string().as_str()
    );
    assert!(blob_files(&s).1.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_body_is_an_empty_job() {
    let s = Server::start().await;
    let (key, _) = s.create("").await;
    assert_eq!(key, batchdb::Hash::of(b"").to_hex());
    let r = s.get(&format!("/blob/{key}")).await;
    assert_eq!(r.headers()["content-length"], "0");
    assert!(r.bytes().await.unwrap().is_empty());
}
