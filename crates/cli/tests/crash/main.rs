//! Crash trials: a mixed workload — a producer adding jobs, two workers running them
//! (with output, failures, retries), cancels and re-pushes — while the harness kills a
//! random process with SIGKILL at random moments and restarts it. After each trial
//! the queue's invariants must hold:
//!
//! 1. every accepted instance (its `pushed` line was printed) ends in exactly one
//!    terminal row once the queue is drained;
//! 2. no result row names a missing or wrong blob, and the database passes
//!    `PRAGMA integrity_check` (`batchdb verify`);
//! 3. no instance ever ran twice at the same time: each job holds an exclusive
//!    `flock` on a file named after its instance while it runs and records any
//!    failure to get it.
//!
//! Short mode (CI): 3 trials of 6 kills. Long mode:
//! `BATCHDB_CRASH_TRIALS=100 cargo test --release -p batchdb-cli --test crash -- --nocapture`
//! (`BATCHDB_CRASH_KILLS` and `BATCHDB_CRASH_SEED` tune it further).

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_batchdb");

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process of the workload, in its own process group, killed with it on drop.
struct Actor {
    name: &'static str,
    cmd: Vec<String>,
    out: PathBuf,
    child: Option<Child>,
}

impl Actor {
    fn start(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.out)
            .expect("open actor output");
        let err = out.try_clone().expect("clone actor output");
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("spawn actor");
        self.child = Some(child);
    }

    /// SIGKILL to the whole process group (for the producer: its `batchdb add` too).
    fn kill(&mut self, group: bool) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(if group { -pid } else { pid }, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        self.kill(true);
    }
}

fn batchdb(db: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--dir")
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run batchdb")
}

/// `(job, created)` of every `pushed` line in `text`.
fn pushed(text: &str) -> Vec<(String, i64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split(' ');
            match (
                w.next(),
                w.next(),
                w.next().and_then(|c| c.parse().ok()),
                w.next(),
            ) {
                (Some("pushed"), Some(k), Some(c), None) if k.len() == 64 => {
                    Some((k.to_string(), c))
                }
                _ => None,
            }
        })
        .collect()
}

#[test]
fn crash_trials() {
    let trials = env_num("BATCHDB_CRASH_TRIALS", 3);
    let kills = env_num("BATCHDB_CRASH_KILLS", 6);
    let seed = env_num("BATCHDB_CRASH_SEED", fastrand::u64(..));
    eprintln!("crash trials: {trials} trials × {kills} kills, seed {seed}");
    let mut total_accepted = 0;
    for t in 0..trials {
        total_accepted += trial(seed.wrapping_add(t), kills as usize);
    }
    eprintln!(
        "crash trials: {trials} trials, {total_accepted} accepted instances, 0 invariant violations"
    );
}

fn trial(seed: u64, kills: usize) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().expect("tempdir");
    let db = tmp.path().join("db");
    let locks = tmp.path().join("locks");
    std::fs::create_dir_all(&locks).unwrap();
    let overlap = tmp.path().join("overlap");
    let accepted_file = tmp.path().join("accepted");
    // Every job holds an exclusive lock named after its instance while it runs.
    let producer = format!(
        r##"i=0
while :; do
  i=$((i+1))
  case $((i % 7)) in
    0) work='echo failing; exit 1' ;;
    1) work='head -c 300000 /dev/zero | tr "\0" x' ;;
    *) work="echo out $i; echo err $i >&2; sleep 0.0$((i % 5))" ;;
  esac
  # Now and then a job that outlives its lease: it must be renewed, never taken over.
  [ $((i % 25)) = 3 ] && work='sleep 1.5; echo outlived its lease'
  "{bin}" --dir "{db}" add --retries 1 "# job $i
exec 9>'{locks}'/\$BATCHDB_INSTANCE
flock -n 9 || {{ echo \$BATCHDB_INSTANCE \$BATCHDB_ATTEMPT >> '{overlap}'; exit 0; }}
$work" >> "{accepted}" || true
done"##,
        bin = BIN,
        db = db.display(),
        locks = locks.display(),
        overlap = overlap.display(),
        accepted = accepted_file.display(),
    );
    // `batchdb --dir DB run` as every worker of the trial runs it, plus `extra`.
    let run = |extra: &[&str]| -> Vec<String> {
        let db = db.to_string_lossy();
        [
            BIN,
            "--dir",
            &db,
            "run",
            "-j",
            "2",
            "--lease",
            "1",
            "--backoff",
            "0.05",
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
    };
    let worker = |n: usize| Actor {
        name: "worker",
        cmd: run(&["--kill-grace", "0.2"]),
        out: tmp.path().join(format!("worker{n}.log")),
        child: None,
    };
    let mut actors = vec![
        Actor {
            name: "producer",
            cmd: vec!["sh".into(), "-c".into(), producer],
            out: tmp.path().join("producer.log"),
            child: None,
        },
        worker(1),
        worker(2),
    ];
    for a in &mut actors {
        a.start();
    }
    let mut repushed = String::new();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.u64(150..700)));
        let victim = rng.usize(0..actors.len());
        let a = &mut actors[victim];
        let group = a.name == "producer";
        a.kill(group);
        a.start();
        // Now and then, cancel something and push the failures again.
        let text = std::fs::read_to_string(&accepted_file).unwrap_or_default();
        let acc = pushed(&text);
        if k % 2 == 0 && !acc.is_empty() {
            let (_, created) = &acc[rng.usize(0..acc.len())];
            batchdb(&db, &["cancel", &created.to_string()]);
        }
        if k % 3 == 2 {
            let out = batchdb(&db, &["retry", "--all-failed"]);
            repushed.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    // Crash everything one last time, then drain with a fresh worker.
    for a in &mut actors {
        a.kill(true);
    }
    let drain_cmd = run(&["--until-empty"]);
    let mut drain = Command::new(&drain_cmd[0])
        .args(&drain_cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn drain");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(st) = drain.try_wait().expect("wait drain") {
            assert!(st.success(), "seed {seed}: drain failed: {st}");
            break;
        }
        if Instant::now() > deadline {
            let _ = drain.kill();
            panic!("seed {seed}: drain did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // 1. Every accepted instance is in exactly one terminal row.
    let mut accepted = pushed(&std::fs::read_to_string(&accepted_file).unwrap_or_default());
    accepted.extend(pushed(&repushed));
    let mut rows: HashMap<(String, i64), Vec<&str>> = HashMap::new();
    for kind in ["pending", "result", "fail", "cancelled"] {
        let out = batchdb(&db, &["list", kind]);
        assert!(out.status.success(), "seed {seed}: list {kind} failed");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json row");
            let key = if kind == "pending" {
                (
                    v["job"].as_str().unwrap_or_default().to_string(),
                    v["created"].as_i64().unwrap_or_default(),
                )
            } else {
                (
                    v["key"][0].as_str().unwrap_or_default().to_string(),
                    v["key"][1].as_i64().unwrap_or_default(),
                )
            };
            rows.entry(key).or_default().push(kind);
        }
    }
    assert!(!accepted.is_empty(), "seed {seed}: nothing was accepted");
    for inst in &accepted {
        let kinds = rows.get(inst).cloned().unwrap_or_default();
        assert!(
            kinds.len() == 1 && kinds[0] != "pending",
            "seed {seed}: accepted instance {inst:?} is in {kinds:?} after the drain"
        );
    }
    // 2. Every blob is whole and every reference resolves; the database is sound.
    let v = batchdb(&db, &["verify"]);
    assert!(
        v.status.success(),
        "seed {seed}: verify found problems:\n{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // 3. No instance ran twice at the same time.
    let overlaps = std::fs::read_to_string(&overlap).unwrap_or_default();
    assert!(
        overlaps.is_empty(),
        "seed {seed}: instances ran twice at once (instance attempt):\n{overlaps}"
    );
    accepted.len()
}
