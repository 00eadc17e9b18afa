//! Remote workers (`batchdb run --server URL`) against a real `batchdb serve`: a
//! worker that cannot read the database or the blob directory drains jobs beside a
//! local one, takeover after `kill -9` of a remote worker, a server killed and
//! restarted mid-job, `logs -f` of a remote job, tokens and protocol versions, a
//! held job given back through the server.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::serve::{Served, serve};
use crate::util::*;

/// The id `nobody` runs as.
const NOBODY: &str = "65534";

/// A directory anyone may enter holding a link to the binary under test, for a
/// worker that runs as `nobody` (the checkout itself may be private). Removed when
/// dropped.
struct PublicBinary {
    dir: tempfile::TempDir,
}

impl PublicBinary {
    fn new() -> PublicBinary {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("batchdb-public-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let bin = dir.path().join("batchdb");
        if std::fs::hard_link(BIN, &bin).is_err() {
            std::fs::copy(BIN, &bin).expect("copy the binary");
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        PublicBinary { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("batchdb")
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `batchdb run --server URL ARGS...` as its own process, in `cwd`, with none of the
/// CLI's database variables; as `nobody` if `nobody` is given.
fn remote_command(url: &str, args: &[&str], cwd: &Path, nobody: Option<&PublicBinary>) -> Command {
    let mut c = match nobody {
        Some(bin) => {
            assert!(
                is_root(),
                "this test runs a worker as nobody: run it as root"
            );
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={NOBODY}"),
                &format!("--regid={NOBODY}"),
                "--clear-groups",
                "--",
            ])
            .arg(bin.path());
            c
        }
        None => Command::new(BIN),
    };
    for k in [
        "BATCHDB_DIR",
        "BATCHDB_DB",
        "BATCHDB_BLOBS",
        "BATCHDB_TOKEN",
    ] {
        c.env_remove(k);
    }
    c.current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .args(["run", "--server", url])
        .args(args);
    c
}

fn url(s: &Served) -> String {
    format!("http://{}{}", s.addr, s.prefix)
}

/// Waits until the instance pushed at `created` has a row of `kind`; returns it.
fn wait_row(env: &Env, kind: &str, created: i64) -> serde_json::Value {
    wait_until(&format!("a {kind} row for {created}"), || {
        env.list(kind)
            .into_iter()
            .find(|r| row_created(r) == created)
    })
}

#[test]
fn a_remote_worker_that_cannot_read_the_database_drains_500_jobs_beside_a_local_one_each_once() {
    let env = Env::new();
    let lines: String = (0..500).map(|i| format!("echo job {i}\n")).collect();
    let out = env.cmd_stdin(&["add", "--lines", "-q"], lines.as_bytes());
    assert_success(&out, &["add", "--lines"]);
    let server = serve(&env, &[], &[]);
    let bin = PublicBinary::new();
    // The database and the blobs are out of the remote worker's reach.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(env.root(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
    }
    let peek = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            "cat",
        ])
        .arg(env.db_dir().join("batchdb.sqlite"))
        .output()
        .expect("setpriv");
    assert!(!peek.status.success(), "nobody can read the database");
    let remote = remote_command(
        &url(&server),
        &["-j", "4", "--until-empty"],
        Path::new("/"),
        Some(&bin),
    );
    let mut remote = env.start(remote, None);
    let mut local = env.spawn(&["run", "-j", "2", "--until-empty"]);
    let remote_out = remote.wait_ok_within(DEADLINE);
    let local_out = local.wait_ok_within(DEADLINE);
    let (r, l) = (run_lines(&remote_out).len(), run_lines(&local_out).len());
    assert_eq!(r + l, 500, "remote {r} + local {l}");
    assert!(r > 0 && l > 0, "both worked: remote {r}, local {l}");
    let results = env.list("result");
    assert_eq!(results.len(), 500);
    for row in &results {
        assert_eq!(row["value"]["attempts"], 1, "{row}");
        let hash = row["value"]["hash"].as_str().expect("hash");
        let text = String::from_utf8(env.get(hash)).expect("utf-8");
        assert!(text.starts_with("job "), "{text}");
    }
    let status: serde_json::Value =
        serde_json::from_str(env.ok(&["status"]).trim()).expect("status json");
    assert_eq!(status["running"], 0);
    assert_eq!(status["fail"], 0);
}

#[test]
fn kill_9_of_a_remote_worker_mid_job_is_taken_over_within_the_lease_with_one_result() {
    let env = Env::new();
    let (_, created) = env.add(&format!(
        "if [ ! -e first ]; then touch first; {}; fi; echo done",
        wait_file_sh("never")
    ));
    let server = serve(&env, &[], &[]);
    let cmd = remote_command(&url(&server), &["--lease", "1"], env.root(), None);
    let mut remote = env.start(cmd, None);
    env.wait_file("first");
    remote.signal("KILL");
    remote.wait();
    // A second remote worker takes the instance over once the lease has expired.
    let cmd = remote_command(
        &url(&server),
        &["--lease", "1", "--until-empty"],
        env.root(),
        None,
    );
    let mut second = env.start(cmd, None);
    second.wait_ok_within(DEADLINE);
    let row = wait_row(&env, "result", created);
    assert_eq!(row["value"]["attempts"], 2, "{row}");
    assert_eq!(env.list("result").len(), 1);
    let hash = row["value"]["hash"].as_str().expect("hash");
    assert_eq!(env.get(hash), b"done\n");
}

/// A port free now, for a server that must come back on the same address.
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn serve_at(env: &Env, addr: SocketAddr) -> Proc {
    let mut cmd = env.command(&["serve", "--listen", &addr.to_string()]);
    cmd.env_remove("BATCHDB_TOKEN");
    let mut proc = env.start(cmd, None);
    proc.wait_stdout("/\n");
    proc
}

#[test]
fn kill_9_and_restart_of_the_server_mid_job_records_the_result_exactly_once() {
    let env = Env::new();
    let (_, created) = env.add(&format!(
        "echo before; touch started; {}; echo after",
        wait_file_sh("go")
    ));
    let addr = free_port();
    let mut server = serve_at(&env, addr);
    let cmd = remote_command(
        &format!("http://{addr}"),
        &["--lease", "20", "--until-empty"],
        env.root(),
        None,
    );
    let mut remote = env.start(cmd, None);
    env.wait_file("started");
    server.signal("KILL");
    server.wait();
    // The job ends while the server is down: its finish is retried until it is back.
    env.touch("go");
    std::thread::sleep(Duration::from_millis(1500));
    let _server = serve_at(&env, addr);
    let out = remote.wait_ok_within(DEADLINE);
    assert_eq!(run_lines(&out).len(), 1, "{out}");
    let row = wait_row(&env, "result", created);
    assert_eq!(row["value"]["attempts"], 1, "{row}");
    let hash = row["value"]["hash"].as_str().expect("hash");
    assert_eq!(env.get(hash), b"before\nafter\n");
    let shown = env.show_json(&created.to_string());
    assert_eq!(
        shown["attempts"].as_array().map(Vec::len),
        Some(1),
        "{shown}"
    );
}

#[test]
fn logs_follow_from_a_third_process_shows_a_remote_jobs_output_live() {
    let env = Env::new();
    let (_, created) = env.add(&format!(
        "echo first; echo oops >&2; {}; echo second",
        wait_file_sh("go")
    ));
    let server = serve(&env, &[], &[]);
    let cmd = remote_command(&url(&server), &["--until-empty"], env.root(), None);
    let mut remote = env.start(cmd, None);
    let mut logs = env.spawn(&["logs", "-f", &created.to_string()]);
    // "first" arrives while the job still runs (it waits for `go`).
    logs.wait_stdout("first\n");
    assert!(remote.running(), "the job is still running");
    env.touch("go");
    logs.wait_ok_within(DEADLINE);
    assert_eq!(logs.stdout(), "first\nsecond\n");
    assert!(logs.stderr().contains("oops"), "{}", logs.stderr());
    remote.wait_ok_within(DEADLINE);
}

#[test]
fn worker_tokens_authorise_the_worker_endpoints_only_and_a_wrong_one_is_a_one_line_error() {
    let env = Env::new();
    let (_, created) = env.add("echo via token");
    let server = serve(
        &env,
        &[
            "--token",
            "client-secret",
            "--worker-token",
            "worker-secret",
        ],
        &[],
    );
    // A wrong token, and the client token, are refused at once: one line, exit 1.
    for token in ["wrong", "client-secret"] {
        let cmd = remote_command(
            &url(&server),
            &["--until-empty", "--token", token],
            env.root(),
            None,
        );
        let out = env.output_within(cmd, None, DEADLINE);
        let msg = assert_one_line_error(&out, &["run", "--server", "--token", token]);
        assert!(msg.contains("401") && msg.contains("worker token"), "{msg}");
    }
    // The worker token does not authorise a client's request.
    let (status, _, _) = crate::serve::http(
        server.addr,
        "POST",
        &format!("{}/api/cancel/{created}", server.prefix),
        &[("Authorization", "Bearer worker-secret")],
        b"",
    );
    assert_eq!(status, 401);
    let mut cmd = remote_command(&url(&server), &["--until-empty"], env.root(), None);
    cmd.env("BATCHDB_TOKEN", "worker-secret");
    let out = env.output_within(cmd, None, DEADLINE);
    assert_success(&out, &["run", "--server"]);
    let row = env.row("result", created);
    assert_eq!(
        env.get(row["value"]["hash"].as_str().expect("hash")),
        b"via token\n"
    );
}

/// A stand-in server of another version: answers `/worker/hello` with protocol 999.
fn other_version_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let mut r = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let body = r#"{"version":"99.0.0","protocol":999}"#;
            let mut w = conn;
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[test]
fn a_server_of_another_version_is_a_clear_error_not_a_retry_loop() {
    let env = Env::new();
    let addr = other_version_server();
    let cmd = remote_command(&format!("http://{addr}"), &[], env.root(), None);
    let out = env.output_within(cmd, None, Duration::from_secs(30));
    let msg = assert_one_line_error(&out, &["run", "--server"]);
    assert!(
        msg.contains("protocol 999")
            && msg.contains("99.0.0")
            && msg.contains("same batchdb version"),
        "{msg}"
    );
}

#[test]
fn bad_server_urls_and_an_unreachable_server_are_one_line_errors() {
    let env = Env::new();
    for bad in ["ftp://host", "localhost:5000", "http://"] {
        let cmd = remote_command(bad, &[], env.root(), None);
        let out = env.output_within(cmd, None, DEADLINE);
        let msg = assert_one_line_error(&out, &["run", "--server", bad]);
        assert!(msg.contains("server"), "{msg}");
    }
    let addr = free_port();
    let cmd = remote_command(&format!("http://{addr}"), &[], env.root(), None);
    let out = env.output_within(cmd, None, DEADLINE);
    let msg = assert_one_line_error(&out, &["run", "--server"]);
    assert!(msg.contains(&addr.to_string()), "{msg}");
    // --prune-after belongs to the server.
    let out = env.cmd(&[
        "run",
        "--server",
        "http://127.0.0.1:1",
        "--prune-after",
        "1d",
    ]);
    assert!(!out.status.success());
}

#[test]
fn a_remote_worker_over_tls_trusts_only_the_given_ca() {
    let env = Env::new();
    let (ca_pem, cert, key) = crate::serve::private_ca(env.root());
    let ca = env.file("ca.pem");
    std::fs::write(&ca, &ca_pem).expect("write ca.pem");
    let other_dir = env.file("other");
    std::fs::create_dir(&other_dir).expect("mkdir");
    let (other_pem, _, _) = crate::serve::private_ca(&other_dir);
    let other = env.file("other-ca.pem");
    std::fs::write(&other, other_pem).expect("write other-ca.pem");
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let server = serve(&env, &["--tls-cert", &cert, "--tls-key", &key], &[]);
    let https = format!("https://localhost:{}", server.addr.port());
    let (_, created) = env.add("echo over tls");
    // Another CA, or the system's roots: the certificate is refused, one line.
    let wrong = other.to_string_lossy().to_string();
    for args in [vec!["--ca-cert", wrong.as_str()], vec![]] {
        let cmd = remote_command(&https, &args, env.root(), None);
        let out = env.output_within(cmd, None, DEADLINE);
        let msg = assert_one_line_error(&out, &["run", "--server", &https]);
        assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    }
    let ca = ca.to_string_lossy().to_string();
    let cmd = remote_command(
        &https,
        &["--ca-cert", &ca, "--until-empty"],
        env.root(),
        None,
    );
    let out = env.output_within(cmd, None, DEADLINE);
    assert_success(&out, &["run", "--server", &https]);
    // No clear-text warning over https.
    assert!(
        !text(&out.stderr).contains("plain HTTP"),
        "{}",
        text(&out.stderr)
    );
    let row = env.row("result", created);
    assert_eq!(
        env.get(row["value"]["hash"].as_str().expect("hash")),
        b"over tls\n"
    );
}

#[test]
fn a_worker_stopped_past_its_lease_is_fenced_off_and_the_takeover_records_the_result() {
    let env = Env::new();
    let (_, created) = env.add(&format!(
        "echo attempt; touch started.$$; {}",
        wait_file_sh("go")
    ));
    let server = serve(&env, &[], &[]);
    let cmd = remote_command(&url(&server), &["--lease", "1"], env.root(), None);
    let mut stale = env.start(cmd, None);
    wait_until("the first attempt to start", || {
        std::fs::read_dir(env.root())
            .ok()?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("started."))
            .then_some(())
    });
    // Frozen past its lease: another worker takes the instance over and finishes it.
    stale.signal("STOP");
    env.touch("go");
    let cmd = remote_command(
        &url(&server),
        &["--lease", "5", "--until-empty"],
        env.root(),
        None,
    );
    let mut second = env.start(cmd, None);
    second.wait_ok_within(DEADLINE);
    let row = wait_row(&env, "result", created);
    assert_eq!(row["value"]["attempts"], 2, "{row}");
    // Thawed, the stale worker's calls are refused (409): it records nothing and
    // stops that job.
    stale.signal("CONT");
    wait_until("the stale worker to give the job up", || {
        stale.stderr().contains("lease lost").then_some(())
    });
    stale.signal("TERM");
    stale.wait();
    let shown = env.show_json(&created.to_string());
    let attempts = shown["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{shown}");
    assert_eq!(env.list("result").len(), 1);
}

#[test]
fn a_token_in_the_environment_leaves_a_local_worker_alone_and_a_token_flag_needs_a_server() {
    let env = Env::new();
    let (_, created) = env.add("echo local");
    // BATCHDB_TOKEN set for other commands (serve, the API), empty BATCHDB_SERVER.
    let mut cmd = env.command(&["run", "--until-empty"]);
    cmd.env("BATCHDB_TOKEN", "client-secret")
        .env("BATCHDB_SERVER", "");
    let out = env.output_within(cmd, None, DEADLINE);
    assert_success(&out, &["run", "--until-empty"]);
    env.row("result", created);
    let out = env.cmd(&["run", "--until-empty", "--token", "t"]);
    let msg = assert_one_line_error(&out, &["run", "--token"]);
    assert!(msg.contains("--server"), "{msg}");
    assert!(!msg.contains("\"t\""), "the token is not echoed: {msg}");
}

#[test]
fn cancel_on_the_servers_side_stops_a_remote_job_at_once() {
    let env = Env::new();
    let (_, created) = env.add(&format!("touch started; {}", wait_file_sh("never")));
    let server = serve(&env, &[], &[]);
    // A long lease: the cancel must reach the job through the server's change
    // notification, not a heartbeat.
    let cmd = remote_command(
        &url(&server),
        &["--lease", "60", "--until-empty"],
        env.root(),
        None,
    );
    let mut remote = env.start(cmd, None);
    env.wait_file("started");
    let asked = std::time::Instant::now();
    env.ok(&["cancel", &created.to_string()]);
    let row = wait_row(&env, "cancelled", created);
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "cancelled after {:?}: {row}",
        asked.elapsed()
    );
    remote.wait_ok_within(DEADLINE);
    let shown = env.show_json(&created.to_string());
    assert_eq!(shown["state"], "cancelled", "{shown}");
}

#[test]
fn a_remote_worker_gives_back_the_job_it_held_when_the_one_before_runs_long() {
    let env = Env::new();
    let (_, short) = env.add("true");
    let (_, long) = env.add("sleep 3");
    let (_, held) = env.add("touch held-ran");
    let server = serve(&env, &[], &[]);
    // One slot, oldest first: the short job makes the slot claim the long one and
    // hold the third; the long one runs past a second, so the third goes back.
    let cmd = remote_command(
        &url(&server),
        &[
            "-j",
            "1",
            "--order",
            "oldest",
            "--ahead",
            "1",
            "--until-empty",
        ],
        env.root(),
        None,
    );
    let mut remote = env.start(cmd, None);
    let out = remote.wait_ok_within(DEADLINE);
    assert_eq!(run_lines(&out).len(), 3, "{out}");
    for id in [short, long] {
        let shown = env.show_json(&id.to_string());
        let outcomes: Vec<&str> = shown["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .map(|a| a["outcome"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(outcomes, ["result"], "{shown}");
    }
    let shown = env.show_json(&held.to_string());
    let attempts = shown["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{shown}");
    assert_eq!(attempts[0]["outcome"], "released", "{shown}");
    assert_eq!(
        attempts[0]["message"], "given back before it started",
        "{shown}"
    );
    assert_eq!(attempts[1]["outcome"], "result", "{shown}");
    assert_eq!(shown["state"], "result", "{shown}");
    assert!(env.exists("held-ran"));
}
