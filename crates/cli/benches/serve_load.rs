//! The server under load, as a user runs it: a `batchdb serve` process (SQLite,
//! durable) with 1,000 Server-Sent-Events listeners following the event log, and
//! keep-alive clients sending a mix of `POST /create` and `GET /api/list/pending`
//! pages, beside the same clients sending `GET /healthz` (the cost of HTTP alone) as
//! the baseline; phases alternate A/B/B/A.
//!
//! `cargo bench -p batchdb-cli --bench serve_load [-- quick]`. The table it prints is
//! kept in `docs/performance.md`. `BATCHDB_BENCH_BIN=PATH` measures another build of
//! `batchdb` (an older one, for a before/after) in the same way.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_batchdb");

/// A `batchdb serve` process and where it listens.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &std::path::Path) -> Served {
    let bin = std::env::var("BATCHDB_BENCH_BIN").unwrap_or_else(|_| BIN.to_string());
    let mut child = Command::new(bin)
        .arg("--dir")
        .arg(dir)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start batchdb serve");
    let mut line = String::new();
    let out = child.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("read");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .and_then(|u| u.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no listening line: {line:?}"));
    Served { child, addr }
}

fn vm_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A keep-alive HTTP/1.1 connection that sends one request at a time.
struct Client(BufReader<TcpStream>);

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Client(BufReader::new(s))
    }

    /// Sends `req` and reads the whole response; its status.
    async fn send(&mut self, req: &[u8]) -> std::io::Result<u16> {
        self.0.get_mut().write_all(req).await?;
        let mut status = 0;
        let (mut length, mut chunked) = (0usize, false);
        let mut line = String::new();
        loop {
            line.clear();
            if self.0.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let l = line.trim_end().to_ascii_lowercase();
            if l.is_empty() {
                break;
            }
            if status == 0 {
                status = l
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            } else if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
        if chunked {
            loop {
                line.clear();
                self.0.read_line(&mut line).await?;
                let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
                let mut skip = vec![0; n + 2];
                self.0.read_exact(&mut skip).await?;
                if n == 0 {
                    break;
                }
            }
        } else {
            let mut skip = vec![0; length];
            self.0.read_exact(&mut skip).await?;
        }
        Ok(status)
    }
}

/// Opens `n` event streams following the log from its end, each read (and
/// dropped) as it arrives; they last until the tasks are aborted.
async fn listeners(addr: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.expect("connect a listener");
        s.write_all(b"GET /events?after=1000000000 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("subscribe");
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }));
    }
    tasks
}

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Healthz,
    Create,
    CreateAndList,
}

struct Stats {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

/// `conns` clients sending `load` for `dur`; requests per second and latencies.
async fn run(addr: SocketAddr, conns: usize, dur: Duration, load: Load, round: usize) -> Stats {
    let deadline = Instant::now() + dur;
    let mut tasks = Vec::new();
    for c in 0..conns {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            let mut i = 0usize;
            while Instant::now() < deadline {
                let req = match load {
                    Load::Healthz => {
                        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec()
                    }
                    Load::CreateAndList if i % 5 == 4 => {
                        b"GET /api/list/pending?limit=50 HTTP/1.1\r\nHost: localhost\r\n\r\n"
                            .to_vec()
                    }
                    Load::Create | Load::CreateAndList => {
                        let body = format!("echo {round} {c} {i}");
                        format!(
                            "POST /create HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    }
                };
                let t = Instant::now();
                match client.send(&req).await {
                    Ok(200) => lat.push(t.elapsed()),
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        client = Client::connect(addr).await;
                    }
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await.expect("client task");
        lat.extend(l);
        errors += e;
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    Stats {
        rate: lat.len() as f64 / dur.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (secs, rounds, listening, conns) = if quick {
        (2, 1, 1000, 32)
    } else {
        (8, 2, 1000, 32)
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let served = start(dir.path());
    let pid = served.child.id();
    let before = vm_kib(pid, "VmRSS:");
    let streams = listeners(served.addr, listening).await;
    // Every stream answered and idle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_streams = vm_kib(pid, "VmRSS:");
    let per_stream = (with_streams.saturating_sub(before)) as f64 / listening as f64;
    let dur = Duration::from_secs(secs);
    let (mut mix, mut create, mut base) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let mut order = [
            Load::Healthz,
            Load::CreateAndList,
            Load::Create,
            Load::Create,
            Load::CreateAndList,
            Load::Healthz,
        ];
        if r % 2 == 1 {
            order.reverse();
        }
        for (k, load) in order.into_iter().enumerate() {
            let s = run(served.addr, conns, dur, load, r * 6 + k).await;
            match load {
                Load::Healthz => base.push(s),
                Load::Create => create.push(s),
                Load::CreateAndList => mix.push(s),
            }
        }
    }
    let alive = streams.iter().filter(|t| !t.is_finished()).count();
    for t in &streams {
        t.abort();
    }
    let summary = |v: &[Stats]| {
        (
            median(v.iter().map(|s| s.rate).collect()),
            median(v.iter().map(|s| s.p50_ms).collect()),
            median(v.iter().map(|s| s.p99_ms).collect()),
            v.iter().map(|s| s.errors).sum::<usize>(),
        )
    };
    let (b, b50, b99, berr) = summary(&base);
    let hwm = vm_kib(pid, "VmHWM:") as f64 / 1024.0;
    let setting = format!(
        "{conns} keep-alive clients, {listening} SSE listeners ({alive} still open at the end, {per_stream:.1} KiB each)"
    );
    let baseline =
        format!("{b:.0} req/s GET /healthz, p50 {b50:.1} ms, p99 {b99:.1} ms, {berr} errors");
    println!("| scenario | batchdb | baseline (same run) | ratio | peak RSS |");
    println!("|---|---|---|---|---|");
    for (what, v) in [
        ("POST /create (durable)", &create),
        ("4 POST /create : 1 GET /api/list/pending?limit=50", &mix),
    ] {
        let (o, o50, o99, oerr) = summary(v);
        println!(
            "| serve: {what}; {setting} | {o:.0} req/s, p50 {o50:.1} ms, p99 {o99:.1} ms, {oerr} errors | {baseline} | {:.2} | {hwm:.0} MiB |",
            o / b
        );
    }
}
