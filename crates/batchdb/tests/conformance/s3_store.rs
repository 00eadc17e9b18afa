//! Tests of the S3 blob store that need its objects or its server: the layout, a
//! corrupt object, an unreachable endpoint, configuration from the environment, and
//! the server stopped and started in the middle of a put or a get.

use std::sync::Arc;
use std::time::Duration;

use batchdb::blob::{BlobStore, S3Store};
use batchdb::{Error, Hash};
use batchdb_testkit::garage::{Garage, garage};
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncReadExt;

use crate::backends::{s3_options, s3_store};

/// The store's multipart part size (8 MiB): blobs larger than this go up in parts.
const PART_SIZE: usize = 8 * 1024 * 1024;

/// Every raw object key in `store`'s bucket under its prefix.
async fn raw_keys(store: &S3Store, prefix: &str) -> Vec<String> {
    let raw = store.object_store();
    let prefix = Path::from(prefix);
    let mut keys: Vec<String> = raw
        .list(Some(&prefix))
        .map(|m| m.expect("list").location.to_string())
        .collect()
        .await;
    keys.sort();
    keys
}

fn prefix_of(store: &S3Store) -> String {
    let loc = store.location();
    let rest = loc.strip_prefix("s3://").expect("s3 url");
    rest.split_once('/').expect("a prefix").1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layout_and_no_leftover_temporary_objects() {
    let store = s3_store().await;
    let prefix = prefix_of(&store);
    let small = store.put(&mut &b"sleep 5; date"[..]).await.unwrap();
    let hex = small.hash.to_hex();
    assert_eq!(
        hex,
        "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0"
    );
    assert_eq!(store.key_of(&small.hash), format!("{prefix}/ce/{hex}"));
    let big: Vec<u8> = (0..(PART_SIZE * 2 + 1)).map(|i| (i % 251) as u8).collect();
    let large = store.put(&mut &big[..]).await.unwrap();
    let mut want = vec![store.key_of(&small.hash), store.key_of(&large.hash)];
    want.sort();
    assert_eq!(raw_keys(&store, &prefix).await, want);
    assert_eq!(
        store.location(),
        format!("s3://{}/{prefix}", garage().bucket)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_skips_what_is_not_a_blob_at_its_place() {
    let store = s3_store().await;
    let prefix = prefix_of(&store);
    let good = store.put(&mut &b"a blob"[..]).await.unwrap();
    let other = Hash::of(b"other").to_hex();
    let raw = store.object_store();
    for junk in [
        format!("{prefix}/tmp/123-0-00.part"),
        format!("{prefix}/zz/{other}"),
        format!("{prefix}/{}/{other}x", &other[..2]),
        format!("{prefix}/{}", other),
        format!("{prefix}/{}/{}/{other}", &other[..2], &other[2..4]),
        format!("{prefix}/{}/{}", &other[..2], other.to_uppercase()),
    ] {
        raw.put(&Path::from(junk.as_str()), PutPayload::from("junk"))
            .await
            .unwrap();
    }
    let listed: Vec<_> = store.list().map(|e| e.unwrap().hash).collect().await;
    assert_eq!(listed, vec![good.hash]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_object_is_an_error_naming_the_hash() {
    let store = s3_store().await;
    for size in [10, PART_SIZE + 10] {
        let good = vec![b'g'; size];
        let info = store.put(&mut &good[..]).await.unwrap();
        let evil = vec![b'e'; size];
        store
            .object_store()
            .put(
                &Path::from(store.key_of(&info.hash)),
                PutPayload::from(evil),
            )
            .await
            .unwrap();
        let mut r = store.get(&info.hash).await.unwrap();
        let mut v = Vec::new();
        let err = r.read_to_end(&mut v).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        let inner = err.into_inner().unwrap().downcast::<Error>().unwrap();
        assert!(matches!(*inner, Error::BlobCorrupt { hash, .. } if hash == info.hash));
        assert!(inner.to_string().contains(&info.hash.to_hex()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_is_a_clear_error_with_the_url() {
    let g = tokio::task::spawn_blocking(garage).await.unwrap();
    let port = batchdb_testkit::free_port();
    let mut opts = s3_options(g, Duration::from_secs(1));
    opts.endpoint = Some(format!("http://127.0.0.1:{port}"));
    let store = S3Store::with_options(&g.bucket, "nowhere", &opts).unwrap();
    let h = Hash::of(b"x");
    let key = format!("s3://{}/nowhere/{}/{h}", g.bucket, &h.to_hex()[..2]);
    let start = std::time::Instant::now();
    let err = store.contains(&h).await.unwrap_err();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(matches!(err, Error::ObjectStore { .. }), "{msg}");
    assert!(msg.contains(&key), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(20), "retries bounded");
    let err = store.put(&mut &b"x"[..]).await.unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    let err = store.list().next().await.unwrap().unwrap_err();
    assert!(err.to_string().contains("s3://"), "{err}");
}

/// A plain `http://` endpoint is refused unless allowed (AWS_ALLOW_HTTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_needs_allow_http() {
    let g = tokio::task::spawn_blocking(garage).await.unwrap();
    let mut opts = s3_options(g, Duration::from_secs(1));
    opts.allow_http = false;
    let store = S3Store::with_options(&g.bucket, "p", &opts).unwrap();
    let err = store.contains(&Hash::of(b"x")).await.unwrap_err();
    assert!(err.to_string().contains("s3://"), "{err}");
}

#[tokio::test]
async fn bad_prefixes_are_refused() {
    let opts = batchdb::blob::S3Options::default();
    for bad in ["a/../b", "a/./b", "sp ace", "q?x"] {
        let err = S3Store::with_options("bucket", bad, &opts).unwrap_err();
        assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
    }
    let ok = S3Store::with_options("bucket", "/a/b/", &opts).unwrap();
    assert_eq!(ok.location(), "s3://bucket/a/b");
    let root = S3Store::with_options("bucket", "", &opts).unwrap();
    assert_eq!(root.location(), "s3://bucket");
    assert_eq!(
        root.key_of(&Hash::of(b"sleep 5; date")),
        "ce/ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0"
    );
}

/// Whether this process is the child [`run_child`] started to run test `name`.
fn in_child(name: &str) -> bool {
    std::env::var("BATCHDB_TEST_CHILD").as_deref() == Ok(name)
}

/// Runs test `name` of this binary again as a child process (where [`in_child`] is
/// true) with the shared server's [`Garage::env`], a bucket and a fresh prefix in its
/// environment, and fails unless it passes there: for tests that need the process
/// environment or the process's memory to themselves.
async fn run_child(name: &str) {
    let g = tokio::task::spawn_blocking(garage).await.unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .envs(g.env())
        .env("BATCHDB_TEST_CHILD", name)
        .env("BATCHDB_TEST_S3_BUCKET", &g.bucket)
        .env("BATCHDB_TEST_S3_PREFIX", Garage::fresh_prefix())
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

/// `S3Store::open` (what `--blobs s3://...` uses) reads the `AWS_*` environment. The
/// environment of this process is not changed (other tests run beside): the test runs
/// itself again in a child process whose environment points at the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reads_the_aws_environment() {
    const NAME: &str = "s3_store::open_reads_the_aws_environment";
    if !in_child(NAME) {
        return run_child(NAME).await;
    }
    let bucket = std::env::var("BATCHDB_TEST_S3_BUCKET").unwrap();
    let prefix = std::env::var("BATCHDB_TEST_S3_PREFIX").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = batchdb::Config {
        blobs: batchdb::BlobLocation::parse(&format!("s3://{bucket}/{prefix}")).unwrap(),
        ..batchdb::Config::in_dir(dir.path())
    };
    let db = batchdb::BatchDb::open(&config).await.unwrap();
    let store = S3Store::open(&bucket, &prefix).await.unwrap();
    let info = store.put(&mut &b"from the environment"[..]).await.unwrap();
    let mut r = db.get(&info.hash).await.unwrap();
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.unwrap();
    assert_eq!(v, b"from the environment");
}

/// A reader that yields `total` bytes slowly (`chunk` bytes every `every`).
struct Slow {
    left: usize,
    chunk: usize,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    every: Duration,
}

impl Slow {
    fn new(total: usize, chunk: usize, every: Duration) -> Slow {
        Slow {
            left: total,
            chunk,
            sleep: None,
            every,
        }
    }
}

impl tokio::io::AsyncRead for Slow {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Ok(()));
        }
        let every = self.every;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        std::task::ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        let n = self.left.min(self.chunk).min(buf.remaining());
        buf.put_slice(&vec![b's'; n]);
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

use std::future::Future as _;

/// A restart of the server for a few seconds is ridden out: requests made while it is
/// down are retried until it is back; a put or get that it interrupts either succeeds
/// (retried) or fails cleanly, leaving nothing visible. Uses a private server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_during_put_and_get() {
    let g = Arc::new(
        tokio::task::spawn_blocking(Garage::start_new)
            .await
            .unwrap(),
    );
    let store = Arc::new(
        S3Store::with_options(
            &g.bucket,
            "outage",
            &s3_options(&g, Duration::from_secs(30)),
        )
        .unwrap(),
    );
    let restart = |g: Arc<Garage>, down: Duration| {
        tokio::task::spawn_blocking(move || {
            g.stop();
            std::thread::sleep(down);
            g.start();
        })
    };

    // 1. Requests made while the server is down wait for it.
    let stored = store.put(&mut &b"before"[..]).await.unwrap();
    let g2 = g.clone();
    tokio::task::spawn_blocking(move || g2.stop())
        .await
        .unwrap();
    let during = {
        let store = store.clone();
        tokio::spawn(async move {
            let small = store.put(&mut &b"while down"[..]).await?;
            let mut v = Vec::new();
            store
                .get(&stored.hash)
                .await?
                .read_to_end(&mut v)
                .await
                .map_err(|e| Error::Stream {
                    what: "read".into(),
                    source: e,
                })?;
            assert_eq!(v, b"before");
            Ok::<_, Error>(small)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !during.is_finished(),
        "still retrying while the server is down"
    );
    let g2 = g.clone();
    tokio::task::spawn_blocking(move || g2.start())
        .await
        .unwrap();
    let small = during
        .await
        .unwrap()
        .expect("retried until the server was back");
    assert!(store.contains(&small.hash).await.unwrap());

    // 2. A large put (~40 MiB, streamed slowly) with the server restarted midway.
    let total = 40 * 1024 * 1024;
    let put = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut r = Slow::new(total, 1024 * 1024, Duration::from_millis(100));
            store.put(&mut r).await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    restart(g.clone(), Duration::from_secs(2)).await.unwrap();
    let want = Hash::of(&vec![b's'; total]);
    match put.await.unwrap() {
        Ok(info) => {
            assert_eq!(info.hash, want);
            let mut v = Vec::new();
            store
                .get(&info.hash)
                .await
                .unwrap()
                .read_to_end(&mut v)
                .await
                .unwrap();
            assert_eq!(v.len(), total);
        }
        Err(e) => {
            eprintln!("put interrupted by the restart failed cleanly: {e}");
            assert!(!store.contains(&want).await.unwrap());
        }
    }
    let listed: Vec<Hash> = store.list().map(|e| e.unwrap().hash).collect().await;
    assert!(
        listed
            .iter()
            .all(|h| [stored.hash, small.hash, want].contains(h)),
        "{listed:?}"
    );

    // 3. A get read slowly with the server restarted midway: the right bytes or an
    //    error, never wrong bytes.
    let data: Vec<u8> = (0..(24 * 1024 * 1024)).map(|i| (i % 241) as u8).collect();
    let info = store.put(&mut &data[..]).await.unwrap();
    let mut r = store.get(&info.hash).await.unwrap();
    let mut got = vec![0u8; 1024 * 1024];
    r.read_exact(&mut got).await.unwrap();
    restart(g.clone(), Duration::from_secs(2)).await.unwrap();
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest).await {
        Ok(_) => {
            got.extend_from_slice(&rest);
            assert!(
                got == data,
                "a get that survived the restart read the right bytes"
            );
        }
        Err(e) => eprintln!("get interrupted by the restart failed cleanly: {e}"),
    }
    // And the store works after it.
    let mut v = Vec::new();
    store
        .get(&info.hash)
        .await
        .unwrap()
        .read_to_end(&mut v)
        .await
        .unwrap();
    assert!(v == data);
}

/// Memory stays bounded whatever the blob's size: a 160 MiB blob streamed in and out
/// leaves the process's peak resident memory far below its size. Measured in a child
/// process (the test runs itself again) so that no other test's memory counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_memory_is_bounded() {
    const NAME: &str = "s3_store::put_and_get_memory_is_bounded";
    if !in_child(NAME) {
        return run_child(NAME).await;
    }
    const SIZE: u64 = 160 * 1024 * 1024;
    let bucket = std::env::var("BATCHDB_TEST_S3_BUCKET").unwrap();
    let prefix = std::env::var("BATCHDB_TEST_S3_PREFIX").unwrap();
    let store = S3Store::open(&bucket, &prefix).await.unwrap();
    let before = peak_rss();
    let info = store
        .put(&mut Generated { left: SIZE, at: 0 })
        .await
        .unwrap();
    assert_eq!(info.size, SIZE);
    let mut r = store.get(&info.hash).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(total, SIZE, "read back whole and verified");
    let grew = peak_rss().saturating_sub(before);
    eprintln!("peak resident memory grew by {} MiB", grew >> 20);
    assert!(grew < 96 * 1024 * 1024, "peak grew by {grew} bytes");
}

/// Yields `left` bytes of a repeating pattern without holding them.
struct Generated {
    left: u64,
    at: u64,
}

impl tokio::io::AsyncRead for Generated {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left).min(64 * 1024) as usize;
        let at = self.at;
        let chunk: Vec<u8> = (0..n as u64).map(|i| ((at + i) % 253) as u8).collect();
        buf.put_slice(&chunk);
        self.left -= n as u64;
        self.at += n as u64;
        std::task::Poll::Ready(Ok(()))
    }
}

/// Peak resident memory of this process (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// `touch` is the copy AWS S3 allows onto the same key: `x-amz-copy-source` naming the
/// object itself and `x-amz-metadata-directive: REPLACE`, signed. (Garage refreshes the
/// time without the directive too, so this is checked on the wire.)
#[tokio::test]
async fn touch_is_a_signed_self_copy_replacing_metadata() {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let body = "<CopyObjectResult><LastModified>2026-01-01T00:00:00.000Z</LastModified>\
                    <ETag>\"e\"</ETag></CopyObjectResult>";
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(resp.as_bytes()).await.unwrap();
        String::from_utf8_lossy(&req).to_lowercase()
    });
    let opts = {
        let mut o = batchdb::blob::S3Options::default();
        o.endpoint = Some(format!("http://127.0.0.1:{port}"));
        o.region = "garage".into();
        o.access_key_id = "GK0123".into();
        o.secret_access_key = "secret".into();
        o.allow_http = true;
        o.retry_for = Duration::from_secs(1);
        o
    };
    let store = S3Store::with_options("bucket", "p", &opts).unwrap();
    let h = Hash::of(b"x");
    store.touch(&h).await.unwrap();
    let req = server.await.unwrap();
    let key = store.key_of(&h);
    assert!(
        req.starts_with(&format!("put /bucket/{key} http/1.1\r\n")),
        "{req}"
    );
    assert!(
        req.contains(&format!("x-amz-copy-source: bucket/{key}\r\n")),
        "{req}"
    );
    assert!(
        req.contains("x-amz-metadata-directive: replace\r\n"),
        "{req}"
    );
    let auth = req
        .lines()
        .find(|l| l.starts_with("authorization:"))
        .expect("signed");
    assert!(auth.contains("x-amz-metadata-directive"), "{auth}");
}
