//! `batchdb serve` as a real process: its flags, TLS with a private CA's
//! certificate, a 1 GiB upload in flat memory, an event made by a separate CLI
//! process arriving over SSE. The dashboard
//! in headless Chromium is in `dashboard.rs`.
//!
//! Every other route is tested in-process in `crates/server/tests/http`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// A running `batchdb serve`, and where it listens.
pub(crate) struct Served {
    pub(crate) proc: Proc,
    pub(crate) addr: SocketAddr,
    pub(crate) prefix: String,
}

/// Starts `batchdb serve --listen 127.0.0.1:0 ARGS...` and waits for its
/// `listening on http://ADDR/PREFIX/` line (`https://` with TLS).
pub(crate) fn serve(env: &Env, args: &[&str], vars: &[(&str, &str)]) -> Served {
    let mut cmd = env.command(&["serve", "--listen", "127.0.0.1:0"]);
    cmd.args(args).env_remove("BATCHDB_TOKEN");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut proc = env.start(cmd, None);
    let out = proc.wait_stdout("/\n");
    let url = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("listening on http://")
                .or_else(|| l.strip_prefix("listening on https://"))
        })
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
pub(crate) fn http(
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
        .find_map(|l| {
            l.strip_prefix("listening on http://")
                .or_else(|| l.strip_prefix("listening on https://"))
        })
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

/// Opens `n` `/events` streams and reads each until the log's `push` event: every
/// stream answered, then idle.
fn open_event_streams(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut streams = Vec::new();
    for _ in 0..n {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(b"GET /events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("write");
        streams.push(c);
    }
    for c in &mut streams {
        read_until(c, "\"push\"");
    }
    streams
}

/// Reads the open stream `c` until what it sent contains `needle`.
fn read_until(c: &mut TcpStream, needle: &str) {
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = c.read(&mut buf).expect("read the stream");
        assert_ne!(n, 0, "stream closed");
        got.extend_from_slice(&buf[..n]);
    }
}

/// Closes `streams` and waits until the server `pid` has let go of their sockets.
fn close_event_streams(pid: u32, streams: Vec<TcpStream>) {
    let open_files = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let with = open_files();
    let n = streams.len();
    drop(streams);
    wait_until("the server to close the streams", || {
        (open_files() + n <= with).then_some(())
    });
}

#[test]
fn serve_idle_event_streams_cost_a_few_kib_no_cpu_and_closed_ones_hold_nothing() {
    let env = Env::new();
    env.add("echo hi");
    let mut s = serve(&env, &[], &[]);
    let pid = s.proc.pid();
    let (status, _, _) = http(s.addr, "GET", "/healthz", &[], b"");
    assert_eq!(status, 200);
    let before = vm_kib(pid, "VmRSS");
    let streams = open_event_streams(s.addr, 1000);
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
    // hyper's two 8 KiB buffers per connection made a stream cost 20–24 KiB; a
    // stream written outside it (`handoff.rs`) costs about 5, counting what the
    // first streams warm up (code, caches, the blocking threads' arenas).
    let per_stream = open.saturating_sub(before) as f64 / 1000.0;
    println!("1,000 open event streams: {per_stream:.1} KiB each");
    assert!(per_stream <= 8.0, "{per_stream:.1} KiB per open stream");
    close_event_streams(pid, streams);
    // Closed streams hold nothing: a second thousand reuses what the first held
    // (before, the server kept every closed stream's memory).
    let closed = vm_kib(pid, "VmRSS");
    close_event_streams(pid, open_event_streams(s.addr, 1000));
    let again = vm_kib(pid, "VmRSS");
    println!(
        "RSS {before} KiB, {open} with 1,000 streams, {closed} once closed, {again} after 1,000 more"
    );
    assert!(
        again <= closed + open.saturating_sub(before) / 2,
        "RSS {closed} KiB after 1,000 streams closed, {again} KiB after 1,000 more"
    );
    s.proc.signal("TERM");
    assert!(s.proc.wait().success());
}

#[test]
fn serve_stopping_ends_open_event_streams_with_their_last_chunk() {
    let env = Env::new();
    env.add(&format!(
        "echo started; touch started; {}",
        wait_file_sh("go")
    ));
    let mut run = env.spawn(&["run", "--until-empty"]);
    env.wait_file("started");
    let mut s = serve(&env, &[], &[]);
    // The output of the running job, and the event log.
    let mut output = TcpStream::connect(s.addr).expect("connect");
    output
        .write_all(b"GET /api/output/id:1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    read_until(&mut output, "started");
    let mut streams = open_event_streams(s.addr, 1);
    streams.push(output);
    s.proc.signal("TERM");
    // Each stream gets its last chunk (a clean end, after which a client
    // reconnects), not a cut connection.
    for c in &mut streams {
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).expect("read to the stream's end");
        // (What came before was read already: the last chunk may be all.)
        assert!(
            rest == b"0\r\n\r\n" || rest.ends_with(b"\r\n0\r\n\r\n"),
            "{:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    assert!(s.proc.wait().success());
    env.touch("go");
    run.wait_ok();
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

/// A private CA and a server certificate it signed for `localhost` and 127.0.0.1,
/// written to `dir`: (the CA's PEM, the certificate file, the key file).
pub(crate) fn private_ca(
    dir: &std::path::Path,
) -> (String, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "batchdb test CA");
    let ca_key = KeyPair::generate().expect("CA key");
    let ca_pem = ca.self_signed(&ca_key).expect("CA certificate").pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("server params");
    server.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("server key");
    let cert = server.signed_by(&key, &issuer).expect("server certificate");
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, cert.pem()).expect("write cert.pem");
    std::fs::write(&key_file, key.serialize_pem()).expect("write key.pem");
    (ca_pem, cert_file, key_file)
}

/// `GET url` from a client that trusts only the CA in `ca_pem`: the status, or the
/// error's text.
fn get_trusting(ca_pem: &str, url: &str) -> Result<u16, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA PEM");
        let client = reqwest::Client::builder()
            .tls_certs_only([ca])
            .timeout(DEADLINE)
            .build()
            .expect("client");
        match client.get(url).send().await {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) => Err(format!("{e:?}")),
        }
    })
}

#[test]
fn serve_over_tls_with_a_private_ca() {
    let env = Env::new();
    let (ca_pem, cert, key) = private_ca(env.root());
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let mut s = serve(&env, &["--tls-cert", &cert, "--tls-key", &key], &[]);
    let out = s.proc.stdout();
    assert!(
        out.contains(&format!("listening on https://{}/", s.addr)),
        "{out}"
    );
    let port = s.addr.port();
    assert_eq!(
        get_trusting(&ca_pem, &format!("https://localhost:{port}/healthz")),
        Ok(200)
    );
    assert_eq!(
        get_trusting(&ca_pem, &format!("https://127.0.0.1:{port}/healthz")),
        Ok(200)
    );
    // Plain HTTP gets no HTTP answer.
    let mut c = TcpStream::connect(s.addr).expect("connect");
    c.set_read_timeout(Some(DEADLINE)).expect("timeout");
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("write");
    let mut got = Vec::new();
    let _ = c.read_to_end(&mut got);
    assert!(!text(&got).starts_with("HTTP/"), "{got:?}");
    // Loopback: no warning about clear text.
    assert!(
        !s.proc.stderr().contains("without TLS"),
        "{}",
        s.proc.stderr()
    );
    s.proc.signal("TERM");
    assert!(s.proc.wait().success());
}

#[test]
fn serve_tls_bad_files_and_flags() {
    let env = Env::new();
    let (_, cert, key) = private_ca(env.root());
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let missing = env.root().join("missing.pem");
    let missing = missing.to_string_lossy();
    let garbage = env.root().join("garbage.pem");
    std::fs::write(&garbage, "not a key\n").expect("write garbage");
    let garbage = garbage.to_string_lossy();
    for (c, k, file, why) in [
        (&*cert, &*missing, &*missing, "no such file"),
        (&*cert, &*garbage, &*garbage, "no private key"),
        (&*missing, &*key, &*missing, "no such file"),
        (&*key, &*key, &*key, "no certificate"),
    ] {
        let args = [
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            c,
            "--tls-key",
            k,
        ];
        // The server does not start: the command ends with one line on stderr.
        let out = env.cmd(&args);
        let msg = assert_one_line_error(&out, &args);
        assert!(msg.contains(file) && msg.contains(why), "{msg}");
    }
    // One without the other is a usage error.
    for args in [
        ["serve", "--listen", "127.0.0.1:0", "--tls-cert", &*cert],
        ["serve", "--listen", "127.0.0.1:0", "--tls-key", &*key],
    ] {
        let out = env.cmd(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = text(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        let other = if args[3] == "--tls-cert" {
            "--tls-key"
        } else {
            "--tls-cert"
        };
        assert!(
            err.starts_with("batchdb: ") && err.contains(other) && err.contains("(see --help)"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn serve_warns_of_clear_text_on_a_non_loopback_address() {
    let env = Env::new();
    let started = |args: &[&str]| {
        let mut cmd = env.command(&["serve", "--listen", "0.0.0.0:0"]);
        cmd.args(args).env("BATCHDB_TOKEN", "tok3n");
        let mut proc = env.start(cmd, None);
        proc.wait_stdout("/\n");
        let (out, err) = (proc.stdout(), proc.stderr());
        proc.signal("TERM");
        assert!(proc.wait().success());
        (out, err)
    };
    let (out, err) = started(&[]);
    assert!(out.contains("listening on http://0.0.0.0:"), "{out}");
    assert!(
        err.contains("batchdb: warning: listening on 0.0.0.0:")
            && err.contains("without TLS (--tls-cert/--tls-key)"),
        "{err}"
    );
    let (_, cert, key) = private_ca(env.root());
    let (out, err) = started(&[
        "--tls-cert",
        &cert.to_string_lossy(),
        "--tls-key",
        &key.to_string_lossy(),
    ]);
    assert!(out.contains("listening on https://0.0.0.0:"), "{out}");
    assert!(!err.contains("without TLS"), "{err}");
}
