//! A server per test, over its own temporary database, plus small HTTP helpers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use batchdb::queue::PushOptions;
use batchdb::runner::ShellRunner;
use batchdb::worker::WorkerOptions;
use batchdb::{BatchDb, Config};
use batchdb_server::ServeOptions;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any wait gives a condition before the test fails: only a bound so that
/// a broken build fails instead of hanging, never a speed assertion.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub struct Server {
    pub db: BatchDb,
    pub addr: std::net::SocketAddr,
    pub prefix: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    pub async fn start() -> Server {
        Server::with(ServeOptions::default()).await
    }

    /// A server with these options.
    pub async fn with(opts: ServeOptions) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("batchdb-http-test-")
            .tempdir()
            .expect("temp dir");
        let cfg = Config::in_dir(dir.path());
        let db = BatchDb::open(&cfg).await.expect("open db");
        let prefix = opts.normalized_prefix().expect("prefix");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let db2 = db.clone();
        let task = tokio::spawn(async move {
            batchdb_server::serve(listener, db2, opts, std::future::pending())
                .await
                .expect("serve");
        });
        Server {
            db,
            addr,
            prefix,
            client: reqwest::Client::new(),
            dir,
            task,
        }
    }

    /// The absolute URL of `path` (under the prefix).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.addr, self.prefix, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// `POST /create` with `payload`; returns (job key, instance id).
    pub async fn create(&self, payload: &str) -> (String, i64) {
        let r = self.post("/create", payload.to_string()).await;
        assert_eq!(r.status(), 200, "POST /create");
        let id = r
            .headers()
            .get("x-batchdb-instance")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("x-batchdb-instance");
        let key = r.text().await.expect("body");
        assert!(key.ends_with('\n'));
        (key.trim_end().to_string(), id)
    }

    /// Adds a job through the library (not over HTTP).
    pub async fn add(&self, payload: &str) -> batchdb::queue::Instance {
        self.db
            .add(payload.as_bytes(), &PushOptions::default())
            .await
            .expect("add")
    }

    /// Runs every pending job with a shell worker in this process until none is left.
    pub async fn run_until_empty(&self) {
        let opts = {
            let mut o = WorkerOptions::default();
            o.until_empty = true;
            o
        };
        self.worker(opts).await;
    }

    pub async fn worker(&self, opts: WorkerOptions) {
        self.db
            .worker(Arc::new(ShellRunner::default()), opts)
            .run(None)
            .await
            .expect("worker");
    }

    pub async fn json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.expect("json")
    }

    pub async fn lines(&self, path: &str) -> Vec<Value> {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        json_lines(&r.text().await.expect("body"))
    }
}

pub fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Waits until `f` returns `Some`, failing the test after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts an error response: this status and a JSON body `{"error": "..."}`
/// mentioning `needle`.
pub async fn assert_error(r: reqwest::Response, status: u16, needle: &str) {
    let url = r.url().to_string();
    assert_eq!(r.status(), status, "{url}");
    let body: Value = r.json().await.expect("error body is JSON");
    let msg = body["error"].as_str().expect("error message");
    assert!(
        msg.contains(needle),
        "{url}: error {msg:?} does not mention {needle:?}"
    );
}

/// Asserts a [`raw`] exchange answered `status` with the JSON error body, its
/// message mentioning `needle`.
pub fn assert_raw_error((got, head, body): (u16, String, Vec<u8>), status: u16, needle: &str) {
    assert_eq!(got, status, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    let v: Value = serde_json::from_slice(&body).expect("a JSON body");
    let msg = v["error"].as_str().expect("an error message");
    assert!(
        msg.contains(needle),
        "error {msg:?} does not mention {needle:?}"
    );
}

/// The `content-length` of a response head (header names as the server writes
/// them: lowercase).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("content-length")
        .parse()
        .expect("a length")
}

/// One raw HTTP/1.1 exchange: sends `request` as is and reads the response until
/// the server closes. Returns (status, head, body).
pub async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .expect("response within the deadline")
        .expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head, buf[split + 4..].to_vec())
}

/// A Server-Sent Events reader over a streaming response.
pub struct Sse {
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

#[derive(Debug, Clone, Default)]
pub struct SseMsg {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseMsg {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{:?}: {e}", self.data))
    }
}

impl Sse {
    pub fn new(r: reqwest::Response) -> Sse {
        assert_eq!(r.status(), 200, "SSE response");
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(ct.starts_with("text/event-stream"), "content type {ct}");
        Sse {
            stream: r.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped); fails the test after [`DEADLINE`].
    pub async fn next(&mut self) -> SseMsg {
        tokio::time::timeout(DEADLINE, self.next_inner())
            .await
            .expect("an event within the deadline")
            .expect("the stream ended")
    }

    /// The next event, or `None` once the stream ends.
    pub async fn next_or_end(&mut self) -> Option<SseMsg> {
        tokio::time::timeout(DEADLINE, self.next_inner())
            .await
            .expect("an event or the end within the deadline")
    }

    async fn next_inner(&mut self) -> Option<SseMsg> {
        loop {
            if let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut msg = SseMsg {
                    event: "message".into(),
                    ..Default::default()
                };
                let mut data = Vec::new();
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match k {
                        "id" => msg.id = Some(v.to_string()),
                        "event" => msg.event = v.to_string(),
                        "data" => data.push(v.to_string()),
                        _ => {}
                    }
                }
                if data.is_empty() && msg.id.is_none() {
                    continue;
                }
                msg.data = data.join("\n");
                return Some(msg);
            }
            match self.stream.next().await {
                Some(Ok(b)) => self.buf.push_str(&String::from_utf8_lossy(&b)),
                Some(Err(e)) => panic!("SSE stream: {e}"),
                None => return None,
            }
        }
    }
}
