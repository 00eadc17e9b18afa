//! `batchdb serve` as a real process: its flags, a 1 GiB upload in flat
//! memory, an event made by a separate CLI process arriving over SSE, and the
//! dashboard driven in headless Chromium through chromedriver's WebDriver API.
//!
//! Every other route is tested in-process in `crates/server/tests/http`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

/// A running `batchdb serve`, and where it listens.
struct Served {
    proc: Proc,
    addr: SocketAddr,
    prefix: String,
}

/// Starts `batchdb serve --listen 127.0.0.1:0 ARGS...` and waits for its
/// `listening on http://ADDR/PREFIX/` line.
fn serve(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Served {
    let mut cmd = env.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.args(args).env_remove("BATCHDB_TOKEN");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut proc = env.start(cmd, None);
    let out = proc.wait_stdout("/\n");
    let url = out
        .lines()
        .find_map(|l| l.strip_prefix("listening on http://"))
        .unwrap_or_else(|| panic!("no listening line in {out:?}"));
    let (addr, prefix) = url.split_once('/').expect("a path in the url");
    Served {
        proc,
        addr: addr.parse().expect("socket address"),
        prefix: format!("/{}", prefix.trim_end_matches('/'))
            .trim_end_matches('/')
            .to_string(),
    }
}

/// One HTTP/1.1 exchange over a fresh connection (`Connection: close`); returns
/// (status, head, body), the body de-chunked.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("write head");
    s.write_all(body).expect("write body");
    // Read the head, then exactly the body its framing announces: not every server
    // closes the connection after answering.
    let mut r = BufReader::new(s);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let n = r.read_line(&mut head).expect("read response head");
        assert_ne!(n, 0, "connection closed in the head: {head:?}");
    }
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let lower = head.to_ascii_lowercase();
    let length = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let mut body = Vec::new();
    if method == "HEAD" || status == 304 || status == 204 {
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).expect("read response body");
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).expect("chunk size");
            let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|e| panic!("chunk size {size:?}: {e}"));
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).expect("chunk");
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).expect("read response body");
    }
    (status, head, body)
}

/// A memory figure of a process in KiB, by its `/proc/PID/status` name: `VmHWM`
/// (peak resident) or `VmRSS` (resident now).
fn vm_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

#[test]
fn serve_flags_prefix_token_and_signals() {
    let env = Env::new();
    // bad flags are one-line errors
    let out = env.cmd(&["serve", "--listen", "127.0.0.1:0", "--prefix", "no-slash"]);
    let msg = assert_one_line_error(&out, &["serve", "--prefix", "no-slash"]);
    assert!(msg.contains("prefix"), "{msg}");
    let out = env.cmd(&["serve", "--listen", "not an address"]);
    let msg = assert_one_line_error(&out, &["serve", "--listen", "not an address"]);
    assert!(msg.contains("listen on"), "{msg}");
    let out = env.cmd(&["serve", "--auth-reads"]);
    assert!(!out.status.success(), "--auth-reads needs a token");

    let mut s = serve(&env, &["--prefix", "/q/"], &[("BATCHDB_TOKEN", "tok3n")]);
    assert_eq!(s.prefix, "/q");
    let (status, head, _) = http(s.addr, "POST", "/q/create", &[], b"echo hi");
    assert_eq!(status, 401, "{head}");
    let (status, _, body) = http(
        s.addr,
        "POST",
        "/q/create",
        &[("Authorization", "Bearer tok3n")],
        b"echo hi",
    );
    assert_eq!(status, 200);
    let key = text(&body).trim().to_string();
    assert_eq!(key, sha256(b"echo hi"));
    // the server and the CLI share the database named by the global options
    assert_eq!(env.list("pending").len(), 1);
    let (status, _, body) = http(s.addr, "GET", "/q/list/job", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(json_lines(&text(&body))[0]["key"], key.as_str());
    let (status, _, _) = http(s.addr, "GET", "/list/job", &[], b"");
    assert_eq!(status, 404);
    // SIGTERM stops it cleanly
    s.proc.signal("TERM");
    assert!(s.proc.wait().success());
}

/// `cmd` run under `ulimit -n files` (which sets the hard limit too, so the
/// server cannot raise it).
fn with_open_files(cmd: &std::process::Command, files: u32) -> std::process::Command {
    let mut c = std::process::Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -n {files} && exec \"$@\""))
        .arg("sh")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

#[test]
fn serve_answers_a_real_client_through_an_idle_connection_flood_past_its_descriptors() {
    let env = Env::new();
    let cmd = env.command(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--max-connections",
        "64",
        "--header-timeout",
        "120",
    ]);
    let mut proc = env.start(with_open_files(&cmd, 128), None);
    let out = proc.wait_stdout("/\n");
    let addr: SocketAddr = out
        .lines()
        .find_map(|l| l.strip_prefix("listening on http://"))
        .and_then(|u| u.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no listening line in {out:?}"));
    // Three times the descriptors the server has, none of which will time out
    // during the test: without a cap it runs out of descriptors and accepts nothing.
    let mut flood = Vec::new();
    for i in 0..400 {
        let mut c = TcpStream::connect(addr).expect("connect");
        if i % 2 == 0 {
            c.write_all(b"GET / HTTP/1.1\r\nX-Slow: ").expect("write");
        }
        flood.push(c);
    }
    for _ in 0..3 {
        let (status, head, _) = http(addr, "GET", "/healthz", &[], b"");
        assert_eq!(status, 200, "{head}");
    }
    let (status, _, body) = http(addr, "POST", "/create", &[], b"echo hi");
    assert_eq!(status, 200);
    assert_eq!(text(&body).trim(), sha256(b"echo hi"));
    drop(flood);
    let log = proc.stderr();
    assert!(log.contains("connection limit (64) reached"), "{log}");
    proc.signal("TERM");
    assert!(proc.wait().success());
}

/// A process's CPU time (user + system) in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
}

#[test]
fn serve_idle_event_streams_cost_no_cpu_and_their_memory_is_given_back() {
    let env = Env::new();
    env.add("echo hi");
    let mut s = serve(&env, &[], &[]);
    let pid = s.proc.pid();
    let (status, _, _) = http(s.addr, "GET", "/healthz", &[], b"");
    assert_eq!(status, 200);
    let before = vm_kib(pid, "VmRSS");
    let mut streams = Vec::new();
    for _ in 0..1000 {
        let mut c = TcpStream::connect(s.addr).expect("connect");
        c.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("write");
        streams.push(c);
    }
    // Every stream answered (the log's two events each), then idle.
    for c in &mut streams {
        c.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"push\"") {
            let n = c.read(&mut buf).expect("read the stream");
            assert_ne!(n, 0, "stream closed");
            got.extend_from_slice(&buf[..n]);
        }
    }
    let open = vm_kib(pid, "VmRSS");
    let idle_from = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(3));
    let idle = cpu_ticks(pid) - idle_from;
    // Before, each stream read the log every second: 1,000 of them kept a good part of
    // a core busy. Now one follower reads it for all.
    assert!(
        idle <= 10,
        "{idle} ticks of CPU in 3 s with 1,000 idle streams"
    );
    let per_stream = (open.saturating_sub(before)) / 1000;
    assert!(per_stream <= 40, "{per_stream} KiB per open stream");
    drop(streams);
    // Once they close, what they held goes back to the system.
    let back = wait_until("the streams' memory to be given back", || {
        let now = vm_kib(pid, "VmRSS");
        (now < before + (open - before) / 2).then_some(now)
    });
    assert!(back < open);
    s.proc.signal("TERM");
    assert!(s.proc.wait().success());
}

#[test]
fn serve_upload_of_1_gib_streams_in_flat_memory() {
    const MIB: usize = 1 << 20;
    const SIZE: usize = 1024 * MIB;
    let env = Env::new();
    let s = serve(&env, &[], &[]);
    let before = vm_kib(s.proc.pid(), "VmHWM");
    let mut conn = TcpStream::connect(s.addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(600)))
        .expect("timeout");
    write!(
        conn,
        "POST /create HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {SIZE}\r\n\r\n",
        s.addr
    )
    .expect("head");
    let mut chunk = vec![0u8; MIB];
    for (i, b) in chunk.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut hasher = batchdb::Hasher::new();
    for i in 0..SIZE / MIB {
        chunk[..8].copy_from_slice(&(i as u64).to_le_bytes());
        hasher.update(&chunk);
        conn.write_all(&chunk).expect("upload");
    }
    let mut resp = String::new();
    conn.read_to_string(&mut resp).expect("response");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let key = hasher.finish().to_hex();
    assert!(resp.ends_with(&format!("\r\n\r\n{key}\n")), "{resp}");
    let after = vm_kib(s.proc.pid(), "VmHWM");
    println!("1 GiB upload: batchdb serve peak RSS (VmHWM) {before} KiB before, {after} KiB after");
    // Flat: far below the upload's size (a buffered body would need over 1 GiB).
    assert!(
        after < 256 * 1024,
        "peak RSS {after} KiB after a 1 GiB upload (before: {before} KiB)"
    );
    let job = &env.list("job")[0];
    assert_eq!(job["key"], key.as_str());
    assert_eq!(job["size"], SIZE as u64);
}

#[test]
fn serve_events_show_what_a_separate_cli_process_does() {
    let env = Env::new();
    env.add("echo before");
    let s = serve(&env, &[], &[]);
    let mut conn = TcpStream::connect(s.addr).expect("connect");
    conn.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(
        conn,
        "GET /events HTTP/1.1\r\nHost: {}\r\nLast-Event-ID: 2\r\n\r\n",
        s.addr
    )
    .expect("request");
    let mut reader = BufReader::new(conn);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert_ne!(reader.read_line(&mut head).expect("head"), 0, "{head}");
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    let (key, created) = env.add("echo from another process");
    let mut ids = Vec::new();
    let start = Instant::now();
    loop {
        let mut line = String::new();
        // chunked framing: the size lines are not `id:`/`data:` lines, so skip them
        assert_ne!(
            reader.read_line(&mut line).expect("event line"),
            0,
            "stream ended"
        );
        if let Some(id) = line.trim_end().strip_prefix("id: ") {
            ids.push(id.parse::<i64>().expect("event id"));
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            let ev: Value = serde_json::from_str(data).expect("event json");
            if ev["event"] == "push" && ev["job"] == key.as_str() {
                assert_eq!(ev["created"], created);
                break;
            }
        }
        assert!(start.elapsed() < DEADLINE, "no push event for {key}");
    }
    // resumed after event 2: the first event sent is 3, and in order
    assert_eq!(ids, [3, 4]);
}

// ---- the dashboard in headless Chromium --------------------------------------

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver session in headless Chromium, through chromedriver.
struct Browser {
    driver: SocketAddr,
    session: String,
    _chromedriver: Proc,
}

impl Browser {
    fn start(env: &Env) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: the dashboard test needs Debian's chromium and \
                 chromium-driver (apt-get install -y chromium chromium-driver)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = std::process::Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .current_dir(env.root())
            .stdin(std::process::Stdio::null());
        let proc = env.start(cmd, None);
        let driver: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_until("chromedriver to be ready", || {
            TcpStream::connect(driver).ok()?;
            let (status, _, body) = http(driver, "GET", "/status", &[], b"");
            let v: Value = serde_json::from_slice(&body).ok()?;
            (status == 200 && v["value"]["ready"] == true).then_some(())
        });
        let profile = env.file("chrome-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-quic", "--window-size=1400,1200",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let mut b = Browser {
            driver,
            session: String::new(),
            _chromedriver: proc,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session in {v}"))
            .to_string();
        b
    }

    /// A WebDriver command; returns its `value`, failing the test on an error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, out) = http(
            self.driver,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let v: Value = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", text(&out)));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Waits until `script` returns something other than null or false.
    fn wait_js(&self, what: &str, script: &str) -> Value {
        wait_until(what, || {
            let v = self.js(script);
            (!v.is_null() && v != false).then_some(v)
        })
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn screenshot(&self, path: &std::path::Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("artifact dir");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.driver,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                b"",
            );
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Where test artifacts go: `target/test-artifacts/` of the workspace.
fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("test-artifacts").join(name)
}

/// The instance id of the one row of `table` (pending, running, results, failures)
/// for `job`, once the page shows it.
fn row_id(b: &Browser, table: &str, job: &str) -> i64 {
    let script = format!(
        "for (const tr of document.querySelectorAll('#{table} tbody tr')) {{
           if (tr.children[1].title === '{job}') return Number(tr.dataset.id); }}
         return null;"
    );
    b.wait_js(&format!("a {table} row of {job}"), &script)
        .as_i64()
        .expect("id")
}

fn text_of(b: &Browser, css: &str) -> String {
    b.js(&format!(
        "return document.querySelector('{css}').textContent;"
    ))
    .as_str()
    .unwrap_or("")
    .to_string()
}

#[test]
fn dashboard_in_headless_chromium() {
    let env = Env::new();
    let s = serve(&env, &[], &[]);
    let b = Browser::start(&env);
    b.cmd(
        "POST",
        "/url",
        Some(json!({ "url": format!("http://{}/", s.addr) })),
    );
    b.wait_js(
        "the page to follow the event stream",
        "return document.getElementById('live').textContent === 'live';",
    );

    // Add a job from the page's text box. It prints a line, waits for `go`, then
    // prints another.
    let payload =
        "echo first part; while [ ! -e go ]; do sleep 0.05; done; echo hello from the browser";
    let key = sha256(payload.as_bytes());
    b.type_into("#payload", payload);
    b.click("#add");
    let id = row_id(&b, "pending", &key);
    assert_eq!(env.list("pending")[0]["job"], key.as_str());
    b.wait_js(
        "the pending count",
        "return document.getElementById('count-pending').textContent === '1';",
    );

    // A worker in another process takes it: the row moves to running, live.
    let _worker = env.spawn(&["run"]);
    assert_eq!(row_id(&b, "running", &key), id);
    // Its output follows live while it runs.
    b.click(&format!("#running tr[data-id=\"{id}\"] button.output"));
    b.wait_js(
        "live output of the running job",
        "return document.getElementById('stdout').textContent.includes('first part');",
    );
    assert!(!text_of(&b, "#stdout").contains("hello from the browser"));
    env.touch("go");
    assert_eq!(row_id(&b, "results", &key), id);
    b.wait_js(
        "the rest of the output",
        "return document.getElementById('stdout').textContent === 'first part\\nhello from the browser\\n';",
    );

    // A job added by the CLI shows up live; cancel it from the page.
    let (later, _) = env.add_with(&["--delay", "3600"], "echo never runs");
    let later_id = row_id(&b, "pending", &later);
    b.click(&format!(
        "#pending tr[data-id=\"{later_id}\"] button.cancel"
    ));
    assert_eq!(row_id(&b, "failures", &later), later_id);
    b.wait_js(
        "the cancelled row",
        &format!(
            "const tr = document.querySelector('#failures tr[data-id=\"{later_id}\"]');
             return tr && tr.dataset.state === 'cancelled';"
        ),
    );
    assert_eq!(env.list("cancelled").len(), 1);

    // A failing job lands in failures; retry it from the page.
    let (bad, _) = env.add("echo something broke >&2; exit 3");
    let bad_id = row_id(&b, "failures", &bad);
    b.click(&format!("#failures tr[data-id=\"{bad_id}\"] button.retry"));
    b.wait_js(
        "the retried instance",
        &format!(
            "return document.querySelector('tr[data-id=\"{}\"]') !== null;",
            bad_id + 1
        ),
    );
    let retried = env.show_json(&format!("id:{}", bad_id + 1));
    assert_eq!(retried["job"], bad.as_str());
    b.wait_js(
        "the retry to fail again",
        &format!(
            "const tr = document.querySelector('#failures tr[data-id=\"{}\"]');
             return tr && tr.dataset.state === 'fail';",
            bad_id + 1
        ),
    );

    // Open the result's output for the picture.
    b.click(&format!("#results tr[data-id=\"{id}\"] button.output"));
    b.wait_js(
        "the result's output",
        "return document.getElementById('stdout').textContent.includes('hello from the browser')
           && document.getElementById('output-meta').textContent.includes('state result');",
    );
    b.wait_js(
        "the counts",
        "return document.getElementById('count-result').textContent === '1'
           && document.getElementById('count-fail').textContent === '2'
           && document.getElementById('count-cancelled').textContent === '1';",
    );
    let errors = text_of(&b, "#message");
    assert!(
        b.js("return document.getElementById('message').hidden;") == true
            || errors.contains("pushed")
            || errors.contains("cancel requested"),
        "the page reported an error: {errors}"
    );
    let png = artifact("dashboard.png");
    b.screenshot(&png);
    println!("dashboard screenshot: {}", png.display());
}

#[test]
fn dashboard_batch_view_in_headless_chromium() {
    let env = Env::new();
    env.ok(&[
        "map", "-q", "--batch", "maps", "echo {}", ":::", "a", "b", "c",
    ]);
    let (reduce, _) = env.add_with(&["--batch", "red", "--after", "batch:maps"], "echo reduced");
    env.add("echo in no batch");
    let s = serve(&env, &[], &[]);
    let b = Browser::start(&env);
    b.cmd(
        "POST",
        "/url",
        Some(json!({ "url": format!("http://{}/", s.addr) })),
    );
    let row = |name: &str, col: usize| {
        format!(
            "const tr = document.querySelector('#batches tr[data-batch=\"{name}\"]');
             return tr && tr.children[{col}].textContent;"
        )
    };
    b.wait_js(
        "the maps batch",
        &format!("{} === '0/3';", row("maps", 2).trim_end_matches(';')),
    );
    b.wait_js(
        "red waits",
        &format!("{} === '1';", row("red", 4).trim_end_matches(';')),
    );
    b.wait_js(
        "the waiting count",
        "return document.getElementById('count-waiting').textContent === '1';",
    );
    // A click on a batch shows only its instances: the waiting reduce.
    b.click("#batches tr[data-batch=\"red\"] a.batch");
    b.wait_js(
        "the filter",
        "return !document.getElementById('filter').hidden
           && document.querySelectorAll('#pending tbody tr').length === 1
           && document.querySelector('#pending tbody tr').dataset.state === 'waiting';",
    );
    assert_eq!(row_id(&b, "pending", &reduce), 4);
    // A worker in another process runs everything; the bars fill live, and the
    // filtered tables follow only the batch.
    env.run_until_empty(&[]);
    b.wait_js(
        "red done",
        &format!("{} === '1/1';", row("red", 2).trim_end_matches(';')),
    );
    b.wait_js(
        "maps done, bar full",
        "const tr = document.querySelector('#batches tr[data-batch=\"maps\"]');
         return tr && tr.children[2].textContent === '3/3'
           && tr.querySelector('.bar .result').style.width === '100%';",
    );
    assert_eq!(row_id(&b, "results", &reduce), 4);
    b.wait_js(
        "only the batch's result",
        "return document.querySelectorAll('#results tbody tr').length === 1;",
    );
    b.click("#filter-clear");
    b.wait_js(
        "every result again",
        "return document.getElementById('filter').hidden
           && document.querySelectorAll('#results tbody tr').length === 5;",
    );
    // Cancel and retry a whole batch from its row.
    env.ok(&[
        "map", "-q", "--batch", "later", "--delay", "3600", "echo {}", ":::", "x", "y",
    ]);
    b.wait_js(
        "the later batch",
        &format!("{} === '0/2';", row("later", 2).trim_end_matches(';')),
    );
    b.click("#batches tr[data-batch=\"later\"] button.cancel");
    b.wait_js(
        "cancelled",
        &format!("{} === '2';", row("later", 5).trim_end_matches(';')),
    );
    assert_eq!(env.list("cancelled").len(), 2);
    b.click("#batches tr[data-batch=\"later\"] button.retry");
    b.wait_js(
        "retried",
        &format!("{} === '2/4';", row("later", 2).trim_end_matches(';')),
    );
    assert_eq!(env.list("pending").len(), 2);
    let png = artifact("dashboard-batches.png");
    b.screenshot(&png);
    println!("dashboard screenshot: {}", png.display());
}
