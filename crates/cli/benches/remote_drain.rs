//! Remote workers against local ones, as a user runs them: 1,000 trivial jobs
//! (`echo N`, queued with `add --lines`) drained by `batchdb run -j 2 --until-empty`
//! opening the SQLite database itself, beside the same drained by `batchdb run
//! --server URL -j 2 --until-empty` through a `batchdb serve` on the same database
//! (loopback HTTP). Whole processes, wall time from the worker's start to its exit;
//! each run on a fresh database; the order alternates local, remote, remote, local.
//! The remote worker's peak RSS comes from `wait4`.
//!
//! `cargo bench -p batchdb-cli --bench remote_drain [-- quick]`. The table it prints is
//! kept in `docs/performance.md`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_batchdb");

/// A fresh directory holding `n` queued jobs.
fn queued(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let lines: String = (0..n).map(|i| format!("echo {i}\n")).collect();
    let mut add = Command::new(BIN)
        .arg("--dir")
        .arg(dir.path())
        .args(["add", "--lines", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("add");
    std::io::Write::write_all(&mut add.stdin.take().expect("stdin"), lines.as_bytes())
        .expect("write");
    assert!(add.wait().expect("add").success());
    dir
}

/// Waits for `child`; its wall time since `start` and its peak RSS in KiB.
fn reap(child: &Child, start: Instant) -> (Duration, u64) {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: waits for our own child, writing only the two structs passed.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut ru) };
    assert_eq!(r, pid, "wait4");
    let took = start.elapsed();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "worker failed"
    );
    (took, u64::try_from(ru.ru_maxrss).unwrap_or(0))
}

fn local(n: usize) -> (Duration, u64) {
    let dir = queued(n);
    let start = Instant::now();
    #[allow(clippy::zombie_processes, reason = "reaped by wait4 in reap()")]
    let child = Command::new(BIN)
        .arg("--dir")
        .arg(dir.path())
        .args(["run", "-j", "2", "--until-empty"])
        .stdout(Stdio::null())
        .spawn()
        .expect("run");
    reap(&child, start)
}

fn remote(n: usize) -> (Duration, u64) {
    let dir = queued(n);
    let mut serve = Command::new(BIN)
        .arg("--dir")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    let out = serve.stdout.take().expect("stdout");
    std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).expect("read");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("no listening line: {line:?}"))
        .to_string();
    let start = Instant::now();
    #[allow(clippy::zombie_processes, reason = "reaped by wait4 in reap()")]
    let child = Command::new(BIN)
        .args(["run", "--server", &url, "-j", "2", "--until-empty"])
        .env_remove("BATCHDB_DIR")
        .stdout(Stdio::null())
        .spawn()
        .expect("run --server");
    let got = reap(&child, start);
    let _ = serve.kill();
    let _ = serve.wait();
    got
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (n, rounds) = if quick { (300, 1) } else { (1000, 3) };
    let (mut l, mut r, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        // A B B A: neither side always runs first on a warm machine.
        let (t, _) = local(n);
        l.push(n as f64 / t.as_secs_f64());
        for _ in 0..2 {
            let (t, kib) = remote(n);
            r.push(n as f64 / t.as_secs_f64());
            rss.push(kib as f64 / 1024.0);
        }
        let (t, _) = local(n);
        l.push(n as f64 / t.as_secs_f64());
    }
    let (ours, base) = (median(r), median(l));
    println!("| scenario | batchdb | baseline (same run) | ratio | remote worker peak RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| drain {n} `echo` jobs, `-j 2`, through `serve` (loopback) | {ours:.0} jobs/s | {base:.0} jobs/s local `run -j 2` | {:.2} | {:.0} MiB |",
        ours / base,
        median(rss)
    );
}
