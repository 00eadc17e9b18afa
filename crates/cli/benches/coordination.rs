//! Coordination at scale, as a user runs it: `W` worker processes (`batchdb run -j 8
//! --until-empty`) started at once on one database drain `sleep 0.5` jobs, so the
//! jobs' CPU is not the bound and what is measured is how well the workers share the
//! queue. The efficiency is the ideal time (jobs × 0.5 s / (W × 8) slots) over the
//! measured time, from the workers' start to the last one's exit. Each run queues 31
//! rounds of jobs for its slots (3,968 jobs at 16 × 8), so the ideal is 15.5 s at
//! every width.
//!
//! PostgreSQL + S3 (a throwaway cluster with fsync on and a Garage node, on the same 2
//! cores as the workers) at 1, 2, 4, 8 and 16 workers; SQLite at 1, 8 and 16 workers.
//! Beside each: the database server's CPU time (PostgreSQL: the postmaster and its
//! backends, from `/proc`) and the workers' CPU time (from `wait4`).
//!
//! `cargo bench -p batchdb-cli --bench coordination [-- quick] [only=postgres|sqlite]
//! [workers=N]` (`quick`: 8 rounds instead of 31; `workers=N`: that width only).
//! `BATCHDB_BENCH_BIN=PATH` measures another build of `batchdb` instead. The table it
//! prints is kept in `docs/performance.md`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use batchdb_testkit::garage::{Garage, garage};
use batchdb_testkit::postgres::Postgres;

/// The `batchdb` binary measured: this build's, or `BATCHDB_BENCH_BIN` (to put
/// another build beside it).
fn bin() -> String {
    std::env::var("BATCHDB_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_batchdb").into())
}
const SLOTS: usize = 8;
const JOB_SECS: f64 = 0.5;

/// Where the workers' database is: the arguments and environment every `batchdb`
/// process of one run gets.
struct Target {
    args: Vec<String>,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Target {
    fn sqlite() -> Target {
        let dir = tempfile::tempdir().expect("temp dir");
        let args = vec!["--dir".into(), dir.path().display().to_string()];
        Target {
            args,
            env: Vec::new(),
            _dir: dir,
        }
    }

    fn postgres(pg: &Postgres, g: &Garage) -> Target {
        let db = pg.create_database();
        let blobs = g.url(&Garage::fresh_prefix());
        Target {
            args: vec!["--db".into(), db, "--blobs".into(), blobs],
            env: g
                .env()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            _dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(&self.args).args(args).envs(self.env.iter().cloned());
        c.env_remove("BATCHDB_DIR").stdout(Stdio::null());
        c
    }

    /// Queues `n` distinct `sleep 0.5` jobs (distinct, so the result cache serves none).
    fn queue(&self, n: usize) {
        let lines: String = (0..n)
            .map(|i| format!("sleep {JOB_SECS} # {i}\n"))
            .collect();
        let mut add = self
            .command(&["add", "--lines", "-q"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("add");
        std::io::Write::write_all(&mut add.stdin.take().expect("stdin"), lines.as_bytes())
            .expect("write");
        assert!(add.wait().expect("add").success(), "add --lines failed");
    }
}

/// Waits for `child`; its CPU time (user + system, its children's included).
fn reap(child: &Child) -> Duration {
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: waits for our own child, writing only the two structs passed.
    let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut ru) };
    assert_eq!(r, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "worker failed"
    );
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The CPU time of process `pid` (its own, plus its reaped children's with
/// `children`), from `/proc/PID/stat`.
fn proc_cpu(pid: u32, children: bool) -> Option<(Duration, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14).
    let ticks = num(11) + num(12) + if children { num(13) + num(14) } else { 0 };
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let ppid = u32::try_from(num(1)).unwrap_or(0);
    Some((Duration::from_millis(ticks * 1000 / hz), ppid))
}

/// The CPU time of the PostgreSQL server so far: the postmaster with the backends it
/// reaped, and every live child of it.
fn server_cpu(pg: &Postgres) -> Duration {
    let Some(pm) = pg.pid() else {
        return Duration::ZERO;
    };
    let mut total = proc_cpu(pm, true).map_or(Duration::ZERO, |(t, _)| t);
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((t, ppid)) = proc_cpu(pid, false)
                && ppid == pm
            {
                total += t;
            }
        }
    }
    total
}

/// One measured run: the wall time, the workers' CPU time and the server's.
struct Run {
    efficiency: f64,
    took: Duration,
    workers_cpu: Duration,
    server_cpu: Option<Duration>,
}

fn run(target: &Target, workers: usize, rounds: usize, pg: Option<&Postgres>) -> Run {
    let n = rounds * workers * SLOTS;
    target.queue(n);
    let cpu0 = pg.map(server_cpu);
    let start = Instant::now();
    let children: Vec<Child> = (0..workers)
        .map(|_| {
            target
                .command(&["run", "-j", &SLOTS.to_string(), "--until-empty"])
                .stderr(Stdio::null())
                .spawn()
                .expect("run")
        })
        .collect();
    let workers_cpu = children.iter().map(reap).sum();
    let took = start.elapsed();
    let server_cpu = pg.map(|p| server_cpu(p).saturating_sub(cpu0.unwrap_or_default()));
    let ideal = n as f64 * JOB_SECS / (workers * SLOTS) as f64;
    Run {
        efficiency: ideal / took.as_secs_f64(),
        took,
        workers_cpu,
        server_cpu,
    }
}

fn row(backend: &str, workers: usize, rounds: usize, r: &Run) {
    let n = rounds * workers * SLOTS;
    let server = r
        .server_cpu
        .map_or("—".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    println!(
        "| {backend} | {workers} × {SLOTS} | {n} | {:.1} s | {:.1} s | **{:.2}** | {:.0} jobs/s | {server} | {:.1} s |",
        r.took.as_secs_f64(),
        n as f64 * JOB_SECS / (workers * SLOTS) as f64,
        r.efficiency,
        n as f64 / r.took.as_secs_f64(),
        r.workers_cpu.as_secs_f64(),
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let only: Option<String> =
        std::env::args().find_map(|a| a.strip_prefix("only=").map(String::from));
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let width: Option<usize> =
        std::env::args().find_map(|a| a.strip_prefix("workers=").and_then(|w| w.parse().ok()));
    let widths = |all: &[usize]| -> Vec<usize> { width.map_or_else(|| all.to_vec(), |w| vec![w]) };
    let rounds = if quick { 8 } else { 31 };
    println!(
        "| backend | workers × slots | jobs | took | ideal | efficiency | throughput | server CPU | workers' CPU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    if want("postgres") {
        let pg = Postgres::start_new(true);
        let g = garage();
        for w in widths(&[1, 2, 4, 8, 16]) {
            let t = Target::postgres(&pg, g);
            let r = run(&t, w, rounds, Some(&pg));
            row("PostgreSQL + S3", w, rounds, &r);
        }
    }
    if want("sqlite") {
        for w in widths(&[1, 8, 16]) {
            let t = Target::sqlite();
            let r = run(&t, w, rounds, None);
            row("SQLite", w, rounds, &r);
        }
    }
}
