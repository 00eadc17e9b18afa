//! Test harness: a throw-away batchdb directory per test, helpers that run the real
//! `batchdb` binary as child processes, and guards that clean every process up.
//!
//! Every process a test starts (the `batchdb` commands and, through them, every job
//! they run) has the test's temporary directory as its working directory. When an
//! [`Env`] is dropped it kills every process still working there, so a failing test
//! never leaves a job behind. Jobs also use that directory for their marker files:
//! payloads refer to markers by relative names (`started`, `go`, ...).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_batchdb");

/// How long any wait gives a condition before the test fails. Never a speed
/// assertion: only a bound so that a broken build fails instead of hanging. Two
/// minutes: a debug build draining thousands of jobs while the rest of the suite runs
/// beside it on two cores took over 30 s once.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Environment variables of the CLI that must not leak in from the user's shell.
const CLI_ENV: [&str; 4] = [
    "BATCHDB_DIR",
    "BATCHDB_DB",
    "BATCHDB_BLOBS",
    "BATCHDB_SHELL",
];

/// `--db` and `--blobs` URLs, and the environment variables that reach them.
type Remote = (String, String, Vec<(String, String)>);

/// One test's batchdb: `<tmp>/db` is passed as `--dir`; `<tmp>` itself is the working
/// directory of every process and holds the marker files jobs use.
pub struct Env {
    root: PathBuf,
    /// `--db` and `--blobs` URLs and the environment (AWS_*) that reach them, for a
    /// test of the distributed backends; `None` for the embedded default.
    remote: Option<Remote>,
    // Dropped after `Drop::drop` has killed the processes working in it.
    _tmp: TempDir,
    spawned: AtomicU64,
}

impl Env {
    pub fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("batchdb-cli-test-")
            .tempdir()
            .expect("create temp dir");
        // Canonical, so that it compares equal to /proc/<pid>/cwd links.
        let root = tmp.path().canonicalize().expect("canonicalize temp dir");
        Env {
            root,
            remote: None,
            _tmp: tmp,
            spawned: AtomicU64::new(0),
        }
    }

    /// Like [`Env::new`], but every command uses the queue at `db` and the blob store
    /// at `blobs` (URLs), with `vars` in its environment; `--dir` still holds the
    /// machine-local live output.
    #[allow(
        dead_code,
        reason = "used by the distributed test binary, which shares this file"
    )]
    pub fn distributed(db: String, blobs: String, vars: Vec<(String, String)>) -> Env {
        let mut env = Env::new();
        env.remote = Some((db, blobs, vars));
        env
    }

    /// The working directory of every process (marker files live here).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The batchdb directory (`--dir`).
    pub fn db_dir(&self) -> PathBuf {
        self.root.join("db")
    }

    /// Where the blob directory keeps blob `key` (64 hex digits).
    pub fn blob_path(&self, key: &str) -> PathBuf {
        self.db_dir()
            .join("blobs")
            .join(&key[0..2])
            .join(&key[2..4])
            .join(key)
    }

    /// A file in the working directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Creates an empty marker file (relative to the working directory).
    pub fn touch(&self, name: &str) {
        std::fs::write(self.file(name), b"").expect("create marker file");
    }

    pub fn exists(&self, name: &str) -> bool {
        self.file(name).exists()
    }

    /// Waits until a job has created file `name` (e.g. its `started` marker).
    pub fn wait_file(&self, name: &str) {
        wait_until(&format!("a job to create {name:?}"), || {
            self.exists(name).then_some(())
        });
    }

    /// Waits until a job has written its pid (`echo $$ > NAME`) and returns it. The
    /// pid of a job's shell is also its process group id.
    pub fn wait_pid(&self, name: &str) -> i64 {
        wait_until(&format!("a job to write its pid to {name:?}"), || {
            self.read(name).trim().parse().ok()
        })
    }

    /// Reads a file the jobs wrote (empty if it does not exist).
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }

    /// `batchdb` with a clean environment and this test's working directory, but no
    /// `--dir`.
    pub fn bare_command(&self) -> Command {
        let mut c = Command::new(BIN);
        for k in CLI_ENV {
            c.env_remove(k);
        }
        c.current_dir(&self.root).stdin(Stdio::null());
        c
    }

    /// `batchdb --dir <db> ARGS...`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = self.bare_command();
        c.arg("--dir").arg(self.db_dir());
        if let Some((db, blobs, vars)) = &self.remote {
            c.args(["--db", db, "--blobs", blobs]);
            c.envs(vars.iter().map(|(k, v)| (k, v)));
        }
        c.args(args);
        c
    }

    /// Runs `batchdb ARGS...` to completion (failing the test after [`DEADLINE`]).
    pub fn cmd(&self, args: &[&str]) -> Output {
        self.output_within(self.command(args), None, DEADLINE)
    }

    /// Runs `batchdb ARGS...` with `input` on stdin.
    pub fn cmd_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        self.output_within(self.command(args), Some(input), DEADLINE)
    }

    /// Runs any command to completion (see [`Env::start`]); kills it and fails the
    /// test if it is still running after `deadline`.
    pub fn output_within(&self, cmd: Command, input: Option<&[u8]>, deadline: Duration) -> Output {
        let mut proc = self.start(cmd, input);
        let status = proc.wait_within(deadline);
        Output {
            status,
            stdout: std::fs::read(&proc.out).unwrap_or_default(),
            stderr: std::fs::read(&proc.err).unwrap_or_default(),
        }
    }

    /// Starts any command in the background with `input` (if any) on its stdin and
    /// its stdout and stderr going to files (so that no pipe can fill up and output
    /// can be read while it runs).
    pub fn start(&self, mut cmd: Command, input: Option<&[u8]>) -> Proc {
        use std::io::Write;
        let n = self.spawned.fetch_add(1, Ordering::Relaxed);
        let out = self.root.join(format!("proc-{n}.stdout"));
        let err = self.root.join(format!("proc-{n}.stderr"));
        cmd.stdout(std::fs::File::create(&out).expect("create stdout file"))
            .stderr(std::fs::File::create(&err).expect("create stderr file"));
        if input.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let what = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().replace(BIN, "batchdb"))
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        if let Some(input) = input {
            // Closed at the end of this block: the child sees the end of its input.
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(input).expect("write stdin");
        }
        Proc {
            child,
            out,
            err,
            what,
        }
    }

    /// Runs `batchdb ARGS...`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert_success(&out, args);
        text(&out.stdout)
    }

    /// Starts `batchdb ARGS...` in the background, its output going to files.
    pub fn spawn(&self, args: &[&str]) -> Proc {
        self.start(self.command(args), None)
    }

    /// `batchdb add OPTS... -- PAYLOAD`; checks the two output lines and returns
    /// `(jobkey, created)`. Returns only once the clock has moved past `created`, so
    /// that instances added one after another never share a push time and their
    /// order is well defined.
    pub fn add_with(&self, opts: &[&str], payload: &str) -> (String, i64) {
        let mut args = vec!["add"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["--", payload]);
        let (key, created) = parse_add_output(&self.ok(&args));
        while now_ms() <= created {
            std::thread::sleep(Duration::from_millis(1));
        }
        (key, created)
    }

    /// `batchdb add -- PAYLOAD`, see [`Env::add_with`].
    pub fn add(&self, payload: &str) -> (String, i64) {
        self.add_with(&[], payload)
    }

    /// `batchdb push KEY`; checks its one line and returns the new `created`.
    pub fn push(&self, key: &str) -> i64 {
        let out = self.ok(&["push", key]);
        let line = out
            .strip_suffix('\n')
            .expect("push output ends with a newline");
        assert!(!line.contains('\n'), "push prints one line: {out:?}");
        parse_pushed(line, key)
    }

    /// `batchdb list KIND`, parsed.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        json_lines(&self.ok(&["list", kind]))
    }

    /// `batchdb show --json SELECTOR`, parsed.
    pub fn show_json(&self, selector: &str) -> Value {
        let out = self.ok(&["show", "--json", selector]);
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("show --json: {e}: {out}"))
    }

    /// `batchdb run --until-empty EXTRA...`, which must succeed; returns its stdout.
    pub fn run_until_empty(&self, extra: &[&str]) -> String {
        let mut args = vec!["run", "--until-empty"];
        args.extend_from_slice(extra);
        self.ok(&args)
    }

    /// `batchdb get HASH`, which must succeed; returns the bytes.
    pub fn get(&self, hash: &str) -> Vec<u8> {
        let out = self.cmd(&["get", hash]);
        assert_success(&out, &["get", hash]);
        out.stdout
    }

    /// The one row of `list KIND` whose `created` is `created`.
    pub fn row(&self, kind: &str, created: i64) -> Value {
        let rows = self.list(kind);
        rows.iter()
            .find(|r| row_created(r) == created)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} row with created {created} in {rows:#?}"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for pid in pids_where(|p| {
            std::fs::read_link(format!("/proc/{p}/cwd"))
                .is_ok_and(|cwd| cwd.starts_with(&self.root))
        }) {
            signal(pid as i64, "KILL");
        }
    }
}

/// A background `batchdb` process, killed (SIGKILL) when dropped if still running.
pub struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    what: String,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, ...).
    pub fn signal(&self, sig: &str) {
        signal(self.pid() as i64, sig);
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for it to exit (up to [`DEADLINE`]).
    pub fn wait(&mut self) -> ExitStatus {
        self.wait_within(DEADLINE)
    }

    /// Waits for it to exit; kills it and fails the test after `deadline`.
    pub fn wait_within(&mut self, deadline: Duration) -> ExitStatus {
        let status = try_wait_until(deadline, || self.try_status());
        status.unwrap_or_else(|| {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "{} still running after {deadline:?}\nstdout:\n{}\nstderr:\n{}",
                self.what,
                self.stdout(),
                self.stderr()
            )
        })
    }

    /// Waits for it to exit successfully; returns its stdout.
    pub fn wait_ok(&mut self) -> String {
        self.wait_ok_within(DEADLINE)
    }

    /// Waits up to `deadline` for it to exit successfully; returns its stdout.
    pub fn wait_ok_within(&mut self, deadline: Duration) -> String {
        let status = self.wait_within(deadline);
        assert!(
            status.success(),
            "{} exited with {status}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout(),
            self.stderr()
        );
        self.stdout()
    }

    /// Waits until its stdout contains `needle`; returns the stdout.
    pub fn wait_stdout(&mut self, needle: &str) -> String {
        let what = format!("{needle:?} in the stdout of {}", self.what);
        let found = try_wait_until(DEADLINE, || {
            let s = self.stdout();
            s.contains(needle).then_some(s)
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.stdout(),
                self.stderr()
            )
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Kills a whole process group when dropped (for job processes a test let loose,
/// e.g. the orphaned job of a worker that was killed with SIGKILL).
pub struct GroupGuard(pub i64);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        signal(-self.0, "KILL");
    }
}

/// Sends `sig` to `pid` (a negative pid names a process group).
pub fn signal(pid: i64, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Polls `f` every 20 ms until it returns `Some`, for at most [`DEADLINE`]; panics
/// with `what` if it never does.
pub fn wait_until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    try_wait_until(DEADLINE, f)
        .unwrap_or_else(|| panic!("timed out after {DEADLINE:?} waiting for {what}"))
}

fn try_wait_until<T>(deadline: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A shell snippet that waits until file `name` exists (polling every 50 ms). It
/// gives up with exit code 99 after two minutes, so that no job can wait forever.
pub fn wait_file_sh(name: &str) -> String {
    format!(
        "n=0; until [ -e {name} ]; do n=$((n+1)); \
         if [ $n -gt 2400 ]; then echo 'gave up waiting for {name}' >&2; exit 99; fi; \
         sleep 0.05; done"
    )
}

/// A number no other test (in this or a parallel test process) uses, for markers
/// such as `sleep 300.<n>` that must be found by `/proc` scans.
pub fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) * 1000 + N.fetch_add(1, Ordering::Relaxed)
}

/// Lowercase hex sha256 of `bytes` (via coreutils' `sha256sum`).
pub fn sha256(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Panics with the command's output unless it exited 0.
pub fn assert_success(out: &Output, args: &[&str]) {
    assert!(
        out.status.success(),
        "batchdb {} exited with {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The bad-input contract: a non-zero exit, nothing on stdout, and exactly one line
/// on stderr starting with `batchdb: `. Returns that line.
pub fn assert_one_line_error(out: &Output, args: &[&str]) -> String {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let ctx = format!(
        "batchdb {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        args.join(" ")
    );
    assert!(!out.status.success(), "expected a failure: {ctx}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1 (no panic, no signal): {ctx}"
    );
    assert!(stdout.is_empty(), "expected nothing on stdout: {ctx}");
    assert!(
        stderr.starts_with("batchdb: ") && stderr.ends_with('\n') && stderr.lines().count() == 1,
        "expected one line `batchdb: ...` on stderr: {ctx}"
    );
    stderr.trim_end().to_string()
}

/// Parses `created <key>\npushed <key> <created>\n`, checking its exact shape.
pub fn parse_add_output(out: &str) -> (String, i64) {
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "add prints two lines: {out:?}");
    assert!(
        out.ends_with('\n'),
        "add output ends with a newline: {out:?}"
    );
    let key = lines[0]
        .strip_prefix("created ")
        .unwrap_or_else(|| panic!("first line is `created <key>`: {out:?}"));
    assert_hash(key);
    (key.to_string(), parse_pushed(lines[1], key))
}

/// Parses `pushed <key> <created>` for a known key.
pub fn parse_pushed(line: &str, key: &str) -> i64 {
    let rest = line
        .strip_prefix(&format!("pushed {key} "))
        .unwrap_or_else(|| panic!("expected `pushed {key} <created>`, got {line:?}"));
    rest.parse()
        .unwrap_or_else(|_| panic!("created is an integer (epoch ms): {line:?}"))
}

/// Checks that `s` is 64 lowercase hex characters.
pub fn assert_hash(s: &str) {
    assert!(
        s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "not a 64-hex hash: {s:?}"
    );
}

pub fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// The `created` of a `pending` row, or of a `result`/`fail`/`cancelled` row.
pub fn row_created(r: &Value) -> i64 {
    r["created"]
        .as_i64()
        .or_else(|| r["key"][1].as_i64())
        .unwrap_or_else(|| panic!("row without created: {r}"))
}

/// The outcome of each attempt in `show --json` output, oldest first.
pub fn outcomes(detail: &Value) -> Vec<String> {
    detail["attempts"]
        .as_array()
        .unwrap_or_else(|| panic!("no attempts in {detail}"))
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("(none)").to_string())
        .collect()
}

/// A line `batchdb run` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunLine {
    Result {
        job: String,
        hash: String,
    },
    Fail {
        job: String,
        created: i64,
        message: String,
    },
}

/// Parses `run` output (without `--print`): every line must be RESULT or FAIL.
pub fn run_lines(out: &str) -> Vec<RunLine> {
    out.lines()
        .map(|l| {
            let parts: Vec<&str> = l.splitn(4, ' ').collect();
            match parts.as_slice() {
                ["RESULT", job, hash] => {
                    assert_hash(job);
                    assert_hash(hash);
                    RunLine::Result {
                        job: job.to_string(),
                        hash: hash.to_string(),
                    }
                }
                ["FAIL", job, created, message] => {
                    assert_hash(job);
                    RunLine::Fail {
                        job: job.to_string(),
                        created: created
                            .parse()
                            .unwrap_or_else(|_| panic!("bad created: {l:?}")),
                        message: message.to_string(),
                    }
                }
                _ => panic!("unexpected run output line {l:?} in\n{out}"),
            }
        })
        .collect()
}

/// The result ids of the RESULT lines for `job`.
pub fn results_for(lines: &[RunLine], job: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| match l {
            RunLine::Result { job: j, hash } if j == job => Some(hash.clone()),
            _ => None,
        })
        .collect()
}

/// Pids of live (not zombie) processes for which `keep(pid)` holds.
fn pids_where(mut keep: impl FnMut(u32) -> bool) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| p != std::process::id())
        .filter(|&p| proc_stat(p).is_some_and(|(state, _)| state != 'Z'))
        .filter(|&p| keep(p))
        .collect()
}

/// `(state, process group)` of a process, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, i64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    Some((state, f.next()?.parse().ok()?))
}

/// Live processes in process group `pgid`.
pub fn live_in_group(pgid: i64) -> Vec<u32> {
    pids_where(|p| proc_stat(p).is_some_and(|(_, g)| g == pgid))
}

/// Live processes whose command line contains `needle`.
pub fn live_with_cmdline(needle: &str) -> Vec<u32> {
    pids_where(|p| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(needle)
        })
    })
}

/// Three `run -j 3 --until-empty` workers on `env` drain 15 [`counted_job`]s pushed
/// with `--concurrency api=2`; then [`assert_counted`] checks at most 2 ran at once,
/// and 2 did.
pub fn concurrency_key_holds_by_a_count_the_jobs_keep(env: &Env) {
    let job = counted_job();
    for n in 0..15 {
        env.add_with(&["--concurrency", "api=2"], &format!("{job} # {n}"));
    }
    let workers: Vec<Proc> = (0..3)
        .map(|_| env.spawn(&["run", "-j", "3", "--until-empty"]))
        .collect();
    for mut w in workers {
        w.wait_ok_within(Duration::from_secs(300));
    }
    assert_counted(env, 15, 2);
}

/// A job that counts itself in and out of a count kept in the working directory
/// (`count`, under `flock`), with 0.2 s between, and keeps the highest count it saw
/// (`most`): how many ran at once, as the jobs themselves saw it.
fn counted_job() -> String {
    let count = |d: &str| {
        format!(
            "flock count.lock sh -c 'n=$(( $(cat count 2>/dev/null || echo 0) {d} )); \
             echo $n > count; m=$(cat most 2>/dev/null || echo 0); \
             if [ $n -gt $m ]; then echo $n > most; fi'"
        )
    };
    format!("{}; sleep 0.2; {}", count("+ 1"), count("- 1"))
}

/// What `n` [`counted_job`]s saw: all ended as results, the count is back at 0, and
/// at most `limit` ran at once, with `limit` reached.
fn assert_counted(env: &Env, n: usize, limit: u32) {
    assert_eq!(env.list("result").len(), n);
    assert_eq!(env.read("count").trim(), "0");
    assert_eq!(
        env.read("most").trim(),
        limit.to_string(),
        "never more than {limit}, and {limit} reached"
    );
}
