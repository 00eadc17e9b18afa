//! batchdb beside the tools people queue shell commands with, as a user runs them:
//! `n` `echo` commands from a file (default 500), run 2 at a time, every output kept
//! (except by `xargs`, the baseline: no queue, nothing kept). Whole processes, wall
//! time from the first command to the last output, each run in a fresh directory;
//! the order of the tools reverses every round. Every run starts after a `sync`.
//!
//! - `xargs -P 2`: `xargs -P 2 -d '\n' -I{} sh -c {} < jobs`
//! - batchdb: `batchdb add --lines -q < jobs && batchdb run -j 2 --until-empty`
//! - GNU parallel: `parallel -j 2 --results DIR < jobs`
//! - task-spooler: `tsp -S 2`, then one `tsp sh -c LINE` per line, then `tsp -w` on
//!   the last two jobs (a fresh server per run, its outputs in the run's directory)
//!
//! Then one job writing 1 GiB to its stdout (`-- quick`: 256 MiB), run by a whole
//! `batchdb run --until-empty` (the job queued beforehand, untimed), beside the two
//! limits of what it does with those bytes, measured the same way: hashing them
//! (`head -c N /dev/zero | openssl dgst -sha256`) and writing them durably, two ways:
//! `head -c N /dev/zero > FILE && sync FILE`, and a MiB at a time with the kernel
//! asked to start writing each MiB to disk at once (`sync_file_range`, as the worker
//! does), then an fsync (this bench's own `write-behind` mode). The slower limit is
//! the hash or the faster of the two writes. Each run starts after a `sync`, so one
//! run's writeback does not land in the next; the order reverses every round.
//!
//! Then how fast one-shot commands start, as a shell loop runs them: loops of
//! 1,000 (`-- quick`: 200) `batchdb add -q 'echo start N'`, `batchdb status`,
//! `batchdb get KEY` (a payload) and `batchdb show KEY` (a finished job's stdout),
//! each beside a loop of as many `/bin/true` (what starting any process from that
//! loop costs), on a database holding the 500 jobs, run; the order reverses every
//! round.
//!
//! GNU parallel and task-spooler come from Debian (`parallel`, `task-spooler`); run as
//! root, the bench installs whichever is missing, as `scripts/test` does.
//!
//! `cargo bench -p batchdb-cli --bench end_to_end [-- quick]`; `BATCHDB_BENCH_BIN=PATH`
//! measures another build of `batchdb` instead. The table it prints is kept in
//! `docs/performance.md`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `batchdb` binary measured: this build's, or `BATCHDB_BENCH_BIN` (to put
/// another build beside this one).
fn bin() -> String {
    std::env::var("BATCHDB_BENCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_batchdb").into())
}

/// One way of doing a scenario's work, as bash scripts run in a fresh directory
/// holding `jobs.txt` (`$BYTES`: the 1 GiB scenario's output size).
struct Tool<'a> {
    name: &'a str,
    /// Run first, untimed (then a `sync`).
    setup: &'a str,
    /// The timed part.
    script: &'a str,
}

/// The 1 GiB output scenario: batchdb, then the two limits.
const BIG: &[Tool<'static>] = &[
    Tool {
        name: "batchdb run --until-empty",
        setup: r#"export BATCHDB_DIR="$PWD/db"; "$BATCHDB" add "head -c $BYTES /dev/zero" > /dev/null"#,
        script: r#"BATCHDB_DIR="$PWD/db" "$BATCHDB" run --until-empty > /dev/null"#,
    },
    Tool {
        name: "sha256 (openssl dgst)",
        setup: "",
        script: "head -c $BYTES /dev/zero | openssl dgst -sha256 > /dev/null",
    },
    Tool {
        name: "write + fsync",
        setup: "",
        script: "head -c $BYTES /dev/zero > plain && sync plain",
    },
    Tool {
        name: "write + fsync, written behind (1 MiB writes, `sync_file_range` after each)",
        setup: "",
        script: r#""$BENCH" write-behind plain $BYTES"#,
    },
];

const TOOLS: &[Tool<'static>] = &[
    Tool {
        name: "xargs -P 2 (nothing kept)",
        setup: "",
        script: r"xargs -P 2 -d '\n' -I{} sh -c {} < jobs.txt > /dev/null",
    },
    Tool {
        name: "batchdb add --lines + run -j 2 --until-empty",
        setup: "",
        script: r#"export BATCHDB_DIR="$PWD/db"
"$BATCHDB" add --lines -q < jobs.txt > /dev/null
"$BATCHDB" run -j 2 --until-empty > /dev/null"#,
    },
    Tool {
        name: "GNU parallel -j 2 --results",
        setup: "",
        script: r"parallel -j 2 --results out < jobs.txt > /dev/null",
    },
    Tool {
        name: "task-spooler (tsp -S 2, one tsp per job)",
        setup: "",
        script: r#"export TS_SOCKET="$PWD/ts.sock" TMPDIR="$PWD" TS_MAXFINISHED=100000
tsp -S 2
while IFS= read -r line; do last=$(tsp sh -c "$line"); done < jobs.txt
tsp -w "$last" > /dev/null || true
tsp -w "$((last - 1))" > /dev/null || true
test "$(tsp -l | grep -c finished)" -eq "$(wc -l < jobs.txt)"
tsp -K"#,
    },
];

/// The database the one-shot commands run against: the `echo` jobs queued and run,
/// and one more whose job key is in `key`.
const START_SETUP: &str = r#"export BATCHDB_DIR="$PWD/db"
"$BATCHDB" add --lines -q < jobs.txt > /dev/null
"$BATCHDB" run -j 2 --until-empty > /dev/null
"$BATCHDB" add -q 'echo hi' > key
"$BATCHDB" run --until-empty > /dev/null"#;

/// The CLI start scenario: each command run `$LOOPS` times from a shell loop (`$i`
/// the iteration, `$key` the job key of [`START_SETUP`]); the first is the baseline.
const START: &[(&str, &str)] = &[
    ("/bin/true", "/bin/true"),
    (
        "batchdb add -q 'echo start N'",
        r#""$BATCHDB" add -q "echo start $i""#,
    ),
    ("batchdb status", r#""$BATCHDB" status"#),
    ("batchdb get KEY", r#""$BATCHDB" get "$key""#),
    ("batchdb show KEY", r#""$BATCHDB" show "$key""#),
];

/// Installs GNU parallel and task-spooler when missing (as root), or stops with what
/// to install.
fn ensure_tools() {
    let has = |cmd: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = [("parallel", "parallel"), ("tsp", "task-spooler")]
        .into_iter()
        .filter(|(cmd, _)| !has(cmd))
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    // SAFETY: getuid has no preconditions.
    assert!(
        unsafe { libc::getuid() } == 0,
        "install the Debian packages {missing:?} (or run the bench as root)"
    );
    let apt = |args: &[&str]| {
        let ok = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "apt-get {args:?} failed");
    };
    apt(&["update", "-q"]);
    let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install);
}

/// Runs `tool` once in a fresh directory holding `jobs.txt`, with `$BYTES` and
/// `$LOOPS` set; the wall time of its script.
fn run(tool: &Tool, jobs: &Path, bytes: u64, loops: usize) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(jobs, dir.path().join("jobs.txt")).expect("copy jobs");
    let bash = |script: &str| {
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(dir.path())
            .env("BATCHDB", bin())
            .env("BYTES", bytes.to_string())
            .env("LOOPS", loops.to_string())
            .env("BENCH", std::env::current_exe().expect("bench binary"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        bash(&format!("{}\nsync", tool.setup)),
        "{}: set-up failed",
        tool.name
    );
    let start = Instant::now();
    let ok = bash(tool.script);
    let took = start.elapsed();
    assert!(ok, "{} failed", tool.name);
    took
}

/// Runs each of `n` scenarios `rounds` times, the order reversed every round; the
/// times of each.
fn rounds(n: usize, rounds: usize, mut one: impl FnMut(usize) -> Duration) -> Vec<Vec<Duration>> {
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); n];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..n).collect()
        } else {
            (0..n).rev().collect()
        };
        for i in order {
            times[i].push(one(i));
        }
    }
    times
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "write-behind") {
        let bytes = args.get(3).and_then(|b| b.parse().ok()).expect("BYTES");
        write_behind(args.get(2).expect("FILE"), bytes);
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    let (n, rounds_n) = if quick { (200, 2) } else { (500, 6) };
    ensure_tools();
    let jobs_dir = tempfile::tempdir().expect("temp dir");
    let jobs = jobs_dir.path().join("jobs.txt");
    let lines: String = (0..n).map(|i| format!("echo {i}\n")).collect();
    std::fs::write(&jobs, lines).expect("write jobs");
    let times = rounds(TOOLS.len(), rounds_n, |i| run(&TOOLS[i], &jobs, 0, 0));
    let base = median(times[0].clone()).as_secs_f64();
    println!("{n} `echo` jobs, 2 at a time, median of {rounds_n} runs (order reversed each round)");
    println!("| tool | wall time | jobs/s | against xargs -P 2 |");
    println!("|---|---|---|---|");
    for (tool, t) in TOOLS.iter().zip(times) {
        let m = median(t).as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let rate = n as f64 / m;
        println!("| {} | {m:.2} s | {rate:.0} | {:.2} |", tool.name, base / m);
    }
    big_output(if quick { 256 } else { 1024 }, rounds_n, &jobs);
    cli_start(if quick { 200 } else { 1000 }, rounds_n, &jobs);
}

/// The CLI start scenario (see the module's documentation).
fn cli_start(loops: usize, rounds_n: usize, jobs: &Path) {
    let scripts: Vec<String> = START
        .iter()
        .map(|(_, cmd)| {
            format!(
                "export BATCHDB_DIR=\"$PWD/db\"; key=$(cat key)\n\
                 for i in $(seq $LOOPS); do {cmd} > /dev/null; done"
            )
        })
        .collect();
    let tools: Vec<Tool> = START
        .iter()
        .zip(&scripts)
        .map(|(&(name, _), script)| Tool {
            name,
            setup: START_SETUP,
            script,
        })
        .collect();
    let times = rounds(tools.len(), rounds_n, |i| run(&tools[i], jobs, 0, loops));
    #[allow(clippy::cast_precision_loss)]
    let each: Vec<f64> = times
        .into_iter()
        .map(|t| median(t).as_secs_f64() * 1e6 / loops as f64)
        .collect();
    println!();
    println!("one-shot commands, loops of {loops} processes, median of {rounds_n} runs");
    println!("| command | per process | against /bin/true |");
    println!("|---|---|---|");
    for (tool, us) in tools.iter().zip(&each) {
        println!("| {} | {us:.0} µs | {:.2}× |", tool.name, us / each[0]);
    }
}

/// The 1 GiB output scenario (see the module's documentation).
fn big_output(mib: u64, rounds_n: usize, jobs: &Path) {
    let times = rounds(BIG.len(), rounds_n, |i| run(&BIG[i], jobs, mib << 20, 0));
    #[allow(clippy::cast_precision_loss)]
    let rates: Vec<f64> = times
        .into_iter()
        .map(|t| mib as f64 / median(t).as_secs_f64())
        .collect();
    // The limits: hashing the bytes, and writing them durably the faster of the two
    // ways measured.
    let slower = rates[1].min(rates[2].max(rates[3]));
    println!();
    println!("one job writing {mib} MiB to stdout, whole processes, median of {rounds_n} runs");
    println!("| what | MiB/s | against the slower limit | against write + fsync |");
    println!("|---|---|---|---|");
    for (tool, rate) in BIG.iter().zip(&rates) {
        println!(
            "| {} | {rate:.0} | {:.2} | {:.2} |",
            tool.name,
            rate / slower,
            rate / rates[2]
        );
    }
}

/// `write-behind FILE BYTES`: writes `BYTES` zeros to `FILE` a MiB at a time, asking
/// the kernel after each write to start writing that MiB to disk
/// (`sync_file_range`), then fsyncs it: the durable write the worker now does.
fn write_behind(path: &str, bytes: u64) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let mut f = std::fs::File::create(path).expect("create");
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < bytes {
        let n = usize::try_from((bytes - at).min(1 << 20)).expect("chunk size");
        f.write_all(&chunk[..n]).expect("write");
        // SAFETY: a plain system call on an open descriptor.
        let r = unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                i64::try_from(at).expect("offset"),
                i64::try_from(n).expect("length"),
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        assert_eq!(r, 0, "sync_file_range");
        at += n as u64;
    }
    f.sync_all().expect("fsync");
}
