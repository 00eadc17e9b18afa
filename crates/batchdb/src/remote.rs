//! A worker's port over HTTP (`batchdb run --server URL`): every call a worker makes
//! to the queue and the blob store, made to a `batchdb serve` instead, so the worker's
//! machine needs no database, no bucket and no shared filesystem. The server answers
//! with the database's own port; the leases, fencing and retries are the queue's.
//!
//! - Payloads and outputs stream both ways; a payload is checked against its hash
//!   here as it arrives.
//! - A running job's output is mirrored to the server as it is written (one streamed
//!   request per output, opened at its first byte), so `logs -f` and the dashboard
//!   on the server's side follow it live.
//! - A call that fails (the server restarting, the network) is an error like a
//!   database's: the worker retries claims and finishes and keeps its lease by
//!   heartbeats, as it does with an unreachable database.

use std::io;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

use crate::blob::BlobInfo;
use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::queue::{
    Claim, ClaimRequest, ClaimToken, Counts, DependencyResult, Finished, Heartbeat, Outcome,
    Resources, millis,
};
use crate::runner::Reader;
use crate::worker::wire::{self, PROTOCOL, PROTOCOL_HEADER};
use crate::worker::{LiveSink, OutputStream, WorkerPort};

/// How long a call other than `wait` and a stream may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one long poll for changes waits at the server.
const POLL: Duration = Duration::from_secs(25);

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Chunks of live output queued for the server; when it falls this far behind, the
/// live mirror is dropped (the recorded output is whole either way).
const LIVE_QUEUE: usize = 64;

/// Bytes read from an output per chunk sent.
const CHUNK: usize = 64 * 1024;

/// What a remote worker connects with.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RemoteOptions {
    /// The server's URL (`https://host:port/prefix`).
    pub url: String,
    /// The worker token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
    /// PEM file of the only certificate authorities trusted for `https` (a private
    /// CA); without it, the system's roots.
    pub ca_cert: Option<std::path::PathBuf>,
}

impl RemoteOptions {
    /// Options for the server at `url`, without a token or a CA file.
    pub fn new(url: impl Into<String>) -> RemoteOptions {
        RemoteOptions {
            url: url.into(),
            ..RemoteOptions::default()
        }
    }
}

/// The connection of a worker to `batchdb serve`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RemotePort {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: reqwest::Client,
    /// The URL without a trailing slash.
    base: String,
    token: Option<String>,
    /// A counter of the changes the server reported (see [`RemotePort::watch`]).
    changes: watch::Receiver<u64>,
    /// Small payloads that came with their claims, until the attempt reads them.
    payloads: std::sync::Mutex<std::collections::HashMap<Hash, Vec<u8>>>,
    /// The server answers `POST /worker/finish-claim` (its hello says so).
    finish_claim: std::sync::atomic::AtomicBool,
}

/// How a non-success answer maps to an error beyond the generic one.
#[derive(Clone, Copy)]
enum On {
    /// Nothing special.
    Plain,
    /// 409 is this attempt's [`Error::Fenced`].
    Attempt(ClaimToken),
    /// 404 is this blob's [`Error::BlobNotFound`].
    Blob(Hash),
}

fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Config {
        what: "ca-cert",
        value: path.display().to_string(),
        why: format!("not a PEM certificate bundle: {e}"),
    })?;
    if certs.is_empty() {
        return Err(Error::Config {
            what: "ca-cert",
            value: path.display().to_string(),
            why: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

/// The error and its causes on one line (reqwest's own message alone says little).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s = format!("{s}: {m}");
        }
        cur = c.source();
    }
    s
}

/// `url` without its trailing slashes, if it is an `http://` or `https://` URL with
/// a host.
pub fn check_url(url: &str) -> Result<String> {
    let bad = |why: &str| Error::Config {
        what: "server",
        value: url.to_string(),
        why: why.into(),
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("expected an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(bad("no host in it"));
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl RemotePort {
    /// Connects to the server `opts` names and checks that it speaks this build's
    /// worker protocol ([`Error::Protocol`] if not); a wrong token, an untrusted
    /// certificate or an unreachable server is [`Error::Server`].
    pub async fn connect(opts: &RemoteOptions) -> Result<RemotePort> {
        let url = check_url(&opts.url)?;
        let mut b = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .no_proxy();
        if let Some(ca) = &opts.ca_cert {
            b = b.tls_certs_only(load_ca(ca)?);
        }
        let client = b.build().map_err(|e| Error::Server {
            url: url.clone(),
            status: None,
            message: format!("building the HTTP client: {}", chain(&e)),
        })?;
        let (tx, changes) = watch::channel(0);
        let port = RemotePort {
            inner: Arc::new(Inner {
                client,
                base: url,
                token: opts.token.clone(),
                changes,
                payloads: std::sync::Mutex::default(),
                finish_claim: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        let hello: wire::Hello = port.get("/hello", "connecting", On::Plain).await?;
        if hello.protocol != PROTOCOL {
            return Err(Error::Protocol {
                url: port.inner.base.clone(),
                theirs: hello.protocol.to_string(),
                version: hello.version,
                ours: PROTOCOL,
            });
        }
        port.inner
            .finish_claim
            .store(hello.finish_claim, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(Self::watch(Arc::downgrade(&port.inner), tx));
        Ok(port)
    }

    /// Follows the server's changes with one long poll at a time (`POST /worker/wait`,
    /// up to [`POLL`]), for every waiter of this port: each answer whose counter
    /// differs from the last one bumps the local counter waiters wait on. One
    /// connection stays open while idle, and no waiter ever drops a request midway
    /// (which would cost a new connection). Ends with the port.
    async fn watch(inner: Weak<Inner>, tx: watch::Sender<u64>) {
        let mut server_seq = 0u64;
        let mut failures = 0u32;
        loop {
            let Some(inner) = inner.upgrade() else { return };
            let port = RemotePort { inner };
            let body = wire::Wait {
                seen: server_seq,
                timeout_ms: u64::try_from(millis(POLL)).unwrap_or(u64::MAX),
            };
            let rb = port
                .request(reqwest::Method::POST, "/wait")
                .json(&body)
                .timeout(POLL + CALL_TIMEOUT);
            let got = match port.send(rb, "waiting for a change", On::Plain).await {
                Ok(resp) => resp.json::<wire::Seq>().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            drop(port);
            match got {
                Ok(s) => {
                    failures = 0;
                    if s.seq != server_seq {
                        server_seq = s.seq;
                        tx.send_modify(|v| *v += 1);
                    }
                }
                Err(e) => {
                    // The worker's own calls report the outage; here, only wait.
                    failures += 1;
                    tracing::debug!("{e}");
                    let wait = crate::queue::policy::backoff(
                        Duration::from_millis(100),
                        Duration::from_secs(2),
                        failures,
                        1.0,
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}/worker{path}", self.inner.base);
        let mut rb = self
            .inner
            .client
            .request(method, url)
            .header(PROTOCOL_HEADER, PROTOCOL.to_string());
        if let Some(t) = &self.inner.token {
            rb = rb.bearer_auth(t);
        }
        rb
    }

    fn server_error(&self, status: Option<u16>, message: String) -> Error {
        Error::Server {
            url: self.inner.base.clone(),
            status,
            message,
        }
    }

    /// Sends `rb`; a non-success answer becomes the error it stands for.
    async fn send(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
        on: On,
    ) -> Result<reqwest::Response> {
        let resp = rb
            .send()
            .await
            .map_err(|e| self.server_error(None, format!("{what}: {}", chain(&e))))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error")?.as_str().map(str::to_string))
            .unwrap_or(text);
        match (status.as_u16(), on) {
            (409, On::Attempt(t)) => {
                return Err(Error::Fenced {
                    instance: t.id,
                    token: t.token,
                });
            }
            (404, On::Blob(h)) => return Err(Error::BlobNotFound(h)),
            (400, _) if message.starts_with("worker protocol") => {
                // "worker protocol N, this server speaks M (batchdb V): ..."
                let after = |key: &str, end: char| {
                    let rest = &message[message.find(key)? + key.len()..];
                    Some(rest[..rest.find(end)?].to_string())
                };
                return Err(Error::Protocol {
                    url: self.inner.base.clone(),
                    theirs: after("this server speaks ", ' ').unwrap_or_else(|| "?".into()),
                    version: after("(batchdb ", ')').unwrap_or_else(|| "?".into()),
                    ours: PROTOCOL,
                });
            }
            _ => {}
        }
        Err(self.server_error(
            Some(status.as_u16()),
            format!("{what}: {} {message}", status.as_u16()),
        ))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
        what: &str,
        on: On,
    ) -> Result<T> {
        let resp = self.send(rb.timeout(CALL_TIMEOUT), what, on).await?;
        resp.json().await.map_err(|e| {
            self.server_error(None, format!("{what}: reading the answer: {}", chain(&e)))
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, what: &str, on: On) -> Result<T> {
        self.json(self.request(reqwest::Method::GET, path), what, on)
            .await
    }

    /// The claims of a claim's reply, keeping the payloads that came with them.
    fn keep_payloads(&self, got: wire::Claimed) -> Vec<Claim> {
        if let Ok(mut kept) = self.inner.payloads.lock() {
            for (c, p) in got.claims.iter().zip(&got.payloads) {
                // Not hex: left out, and read by a request of its own.
                if let Some(bytes) = p.as_deref().and_then(|h| hex::decode(h).ok()) {
                    kept.insert(c.job, bytes);
                }
            }
        }
        got.claims
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        what: &str,
        on: On,
    ) -> Result<T> {
        let rb = self.request(reqwest::Method::POST, path).json(body);
        self.json(rb, what, on).await
    }

    async fn post_empty<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
        what: &str,
    ) -> Result<()> {
        let rb = self.request(reqwest::Method::POST, path).json(body);
        self.send(rb.timeout(CALL_TIMEOUT), what, On::Plain).await?;
        Ok(())
    }
}

/// A body fed chunk by chunk through a channel.
fn channel_body(rx: mpsc::Receiver<io::Result<Bytes>>) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    }))
}

/// A running attempt's output stream, mirrored to the server: the request opens at
/// the first byte; a server that falls behind (or is gone) drops the mirror.
struct LiveUpload {
    port: RemotePort,
    path: String,
    tx: Option<mpsc::Sender<io::Result<Bytes>>>,
}

impl io::Write for LiveUpload {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.tx.is_none() {
            let (tx, rx) = mpsc::channel(LIVE_QUEUE);
            let rb = self
                .port
                .request(reqwest::Method::POST, &self.path)
                .body(channel_body(rx));
            let port = self.port.clone();
            tokio::spawn(async move {
                if let Err(e) = port.send(rb, "live output", On::Plain).await {
                    tracing::debug!("{e}");
                }
            });
            self.tx = Some(tx);
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| io::Error::other("no live upload"))?;
        tx.try_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::other("the server fell behind the live output"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[async_trait]
impl WorkerPort for RemotePort {
    async fn claim(&self, req: &ClaimRequest) -> Result<Vec<Claim>> {
        let got: wire::Claimed = self.post("/claim", req, "claiming", On::Plain).await?;
        Ok(self.keep_payloads(got))
    }

    async fn heartbeat(&self, t: &ClaimToken, lease: Duration) -> Result<Heartbeat> {
        let body = wire::Beat {
            token: *t,
            lease_ms: u64::try_from(millis(lease)).unwrap_or(u64::MAX),
        };
        self.post("/heartbeat", &body, "renewing a lease", On::Attempt(*t))
            .await
    }

    async fn status(&self, t: &ClaimToken) -> Result<Heartbeat> {
        self.post("/status", t, "reading an attempt's status", On::Attempt(*t))
            .await
    }

    async fn finish(&self, t: &ClaimToken, outcome: &Outcome) -> Result<Finished> {
        let body = wire::Finish::new(*t, outcome);
        self.post("/finish", &body, "recording an attempt", On::Attempt(*t))
            .await
    }

    async fn finish_and_claim(
        &self,
        t: &ClaimToken,
        outcome: &Outcome,
        next: &ClaimRequest,
    ) -> Result<(Finished, Vec<Claim>)> {
        use std::sync::atomic::Ordering;
        if !self.inner.finish_claim.load(Ordering::Relaxed) {
            return crate::worker::finish_then_claim(self, t, outcome, next).await;
        }
        let body = wire::FinishClaim {
            finish: wire::Finish::new(*t, outcome),
            next: next.clone(),
        };
        let got: wire::FinishedClaimed = self
            .post(
                "/finish-claim",
                &body,
                "recording an attempt",
                On::Attempt(*t),
            )
            .await?;
        Ok((got.finished, self.keep_payloads(got.claimed)))
    }

    async fn recorded(&self, t: &ClaimToken) -> Result<Option<Finished>> {
        self.post(
            "/recorded",
            t,
            "reading what an attempt recorded",
            On::Plain,
        )
        .await
    }

    async fn blob(&self, hash: &Hash) -> Result<Reader> {
        let kept = self
            .inner
            .payloads
            .lock()
            .ok()
            .and_then(|mut k| k.remove(hash));
        if let Some(bytes) = kept {
            let bytes = crate::checked(hash, bytes)?;
            return Ok(Box::pin(std::io::Cursor::new(bytes)));
        }
        let rb = self.request(reqwest::Method::GET, &format!("/blob/{hash}"));
        let resp = self.send(rb, "reading a blob", On::Blob(*hash)).await?;
        let stream = resp.bytes_stream().map_err(io::Error::other);
        let reader = tokio_util::io::StreamReader::new(stream);
        Ok(Box::pin(crate::blob::verifying(reader, *hash)))
    }

    async fn counts(&self) -> Result<Counts> {
        self.get("/counts", "counting instances", On::Plain).await
    }

    async fn dependency_results(
        &self,
        id: i64,
        after: i64,
        limit: usize,
    ) -> Result<Vec<DependencyResult>> {
        let body = wire::Deps { id, after, limit };
        self.post("/deps", &body, "reading dependency results", On::Plain)
            .await
    }

    async fn put_output(
        &self,
        t: &ClaimToken,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Result<BlobInfo> {
        let (tx, rx) = mpsc::channel(4);
        let rb = self
            .request(
                reqwest::Method::POST,
                &format!("/output/{}/{}", t.id, t.token),
            )
            .body(channel_body(rx));
        let sent = async {
            let resp = self.send(rb, "storing an output", On::Attempt(*t)).await?;
            resp.json::<BlobInfo>()
                .await
                .map_err(|e| self.server_error(None, format!("storing an output: {}", chain(&e))))
        };
        let pump = async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        let chunk = Bytes::copy_from_slice(&buf[..n]);
                        if tx.send(Ok(chunk)).await.is_err() {
                            // The request ended early: its answer says why.
                            return Ok(());
                        }
                    }
                    Err(e) => {
                        // Never let the server store a cut output as whole.
                        let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                        return Err(e);
                    }
                }
            }
        };
        let (pumped, sent) = tokio::join!(pump, sent);
        pumped.map_err(|e| Error::Stream {
            what: "output".into(),
            source: e,
        })?;
        sent
    }

    fn live(&self, t: &ClaimToken, stream: OutputStream) -> Option<LiveSink> {
        Some(Box::new(LiveUpload {
            port: self.clone(),
            path: format!("/live/{}/{}/{}", t.id, t.token, stream.name()),
            tx: None,
        }))
    }

    async fn idle(&self, resources: &Resources) -> Result<bool> {
        self.post("/idle", resources, "counting instances", On::Plain)
            .await
    }

    async fn worker_seen(&self, name: &str, resources: &Resources, ttl: Duration) -> Result<()> {
        let body = wire::Seen {
            name: name.to_string(),
            resources: resources.clone(),
            ttl_ms: u64::try_from(millis(ttl)).unwrap_or(u64::MAX),
        };
        self.post_empty("/seen", &body, "announcing this worker")
            .await
    }

    async fn worker_gone(&self, name: &str) -> Result<()> {
        let body = wire::Gone {
            name: name.to_string(),
        };
        self.post_empty("/gone", &body, "removing this worker's entry")
            .await
    }

    fn change_seq(&self) -> u64 {
        *self.inner.changes.borrow()
    }

    async fn wait_change(&self, seen: u64, timeout: Duration) {
        let mut rx = self.inner.changes.clone();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|v| *v > seen)).await;
    }

    fn location(&self) -> String {
        self.inner.base.clone()
    }
}
