//! Attempt isolation: whatever a worker does to stop what one attempt left running
//! never reaches another attempt — of another worker, in another process, on another
//! database, or in a later run with the same worker names.
//!
//! Each test runs several rounds back to back, each on a fresh database (so instance
//! ids and attempt numbers start at 1 again) drained by workers with the same names
//! every round: the names and numbers repeat within the kill grace of the round
//! before, which is what a kill aimed by those alone would hit.

use std::sync::Arc;
use std::time::Duration;

use batchdb::BatchDb;
use batchdb::queue::{ListKind, ListRow, PushOptions};
use batchdb::runner::ShellRunner;
use batchdb::worker::WorkerOptions;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use crate::Backend;

/// Makes a fresh, empty backend pair.
pub type Fresh = dyn Fn() -> BoxFuture<'static, Backend> + Send + Sync;

/// Rounds per test, each on a fresh database. Before attempt ids, a kill aimed by
/// worker name, instance and attempt failed both tests in 10 runs of 10 on SQLite with
/// these settings (round 1 to 4 of 8 was the first with a killed job).
const ROUNDS: usize = 8;
/// Jobs per round.
const JOBS: usize = 200;
/// Workers per round.
const WORKERS: usize = 4;

/// The options every worker of these tests runs with: two slots, a kill grace about
/// as long as a few rounds take (so that what a round does after it lands in a later
/// one), and a name that repeats every round.
fn options(k: usize) -> WorkerOptions {
    {
        let mut o = WorkerOptions::default();
        o.concurrency = 2;
        o.until_empty = true;
        o.name = format!("w-{k}");
        o.kill_grace = Duration::from_secs(1);
        o
    }
}

/// Queues round `round`'s trivial jobs (a 10 ms sleep and an echo), at random priorities, so that an instance id
/// runs at a different moment of each round (with one order every round, a kill aimed
/// by worker name and instance id would hit either every round or none).
async fn queue_jobs(db: &BatchDb, round: usize) {
    let mut levels: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 25];
    for i in 0..JOBS {
        let payload = format!("sleep 0.01; echo r{round} {i}");
        let level = fastrand::usize(..levels.len());
        levels[level].push(payload.into_bytes());
    }
    let mut order: Vec<usize> = (0..levels.len()).collect();
    fastrand::shuffle(&mut order);
    for level in order {
        let payloads = std::mem::take(&mut levels[level]);
        if payloads.is_empty() {
            continue;
        }
        let opts = {
            let mut o = PushOptions::default();
            o.priority = level as i64;
            o
        };
        db.add_many(payloads, &opts).await.expect("add");
    }
}

/// Every instance ended as a result with exit code 0: prints what did not.
async fn assert_all_results(db: &BatchDb, round: usize) {
    let failed: Vec<String> = db
        .list(ListKind::Fail, None)
        .map(|r| match r.expect("list") {
            ListRow::Fail(f) => format!("{:?}", f.value),
            other => panic!("not a failure row: {other:?}"),
        })
        .collect()
        .await;
    assert!(failed.is_empty(), "round {round}: {failed:#?}");
    let counts = db.counts().await.expect("counts");
    assert_eq!(counts.result, JOBS as u64, "round {round}: {counts:?}");
    let results: Vec<i32> = db
        .list(ListKind::Result, None)
        .map(|r| match r.expect("list") {
            ListRow::Result(r) => r.value.exit_code.unwrap_or(-1),
            other => panic!("not a result row: {other:?}"),
        })
        .collect()
        .await;
    assert!(
        results.iter().all(|c| *c == 0),
        "round {round}: {results:?}"
    );
}

/// Several workers in one process, each with its own handle on the database, drain
/// round after round: every job ends as its own result.
pub async fn workers_in_one_process_never_kill_each_others_jobs(fresh: &Fresh, _me: &str) {
    for round in 0..ROUNDS {
        let b = fresh().await;
        let db = b.db();
        queue_jobs(&db, round).await;
        let mut workers = tokio::task::JoinSet::new();
        for k in 0..WORKERS {
            let db = BatchDb::new((b.reopen)().await, b.blobs.clone());
            let runner = Arc::new(ShellRunner::default());
            workers.spawn(async move { db.worker(runner, options(k)).run(None).await });
        }
        while let Some(r) = workers.join_next().await {
            r.expect("worker task").expect("worker");
        }
        assert_all_results(&db, round).await;
    }
}

/// One worker process: drains the database the environment names, then exits.
async fn run_child_worker() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set"));
    let config = batchdb::Config {
        db: batchdb::DbLocation::parse(&var("BATCHDB_TEST_DB")).expect("db"),
        blobs: batchdb::BlobLocation::parse(&var("BATCHDB_TEST_BLOBS")).expect("blobs"),
        live_dir: None,
        db_connections: None,
    };
    let db = BatchDb::open(&config).await.expect("open");
    let k: usize = var("BATCHDB_TEST_WORKER").parse().expect("worker number");
    let opts = options(k);
    let linger = opts.kill_grace * 2;
    db.worker(Arc::new(ShellRunner::default()), opts)
        .run(None)
        .await
        .expect("worker");
    // A worker process lives on after its queue is empty (as `batchdb run` does,
    // waiting for work), while the next round runs beside it: whatever it does after
    // its jobs ended must not reach the next round's.
    tokio::time::sleep(linger).await;
}

/// Several worker processes drain round after round, each living on into the next
/// round: every job ends as its own result. `me` is this test's full name: it starts
/// itself again as each worker process.
pub async fn worker_processes_never_kill_each_others_jobs(fresh: &Fresh, me: &str) {
    if std::env::var("BATCHDB_TEST_CHILD").as_deref() == Ok(me) {
        return run_child_worker().await;
    }
    let exe = std::env::current_exe().expect("test binary");
    let mut children = Vec::new();
    let mut backends = Vec::new();
    for round in 0..ROUNDS {
        let b = fresh().await;
        let db = b.db();
        queue_jobs(&db, round).await;
        for k in 0..WORKERS {
            let child = tokio::process::Command::new(&exe)
                .args(["--exact", me, "--nocapture", "--test-threads=1"])
                .envs(b.spec.env.iter().cloned())
                .env("BATCHDB_TEST_CHILD", me)
                .env("BATCHDB_TEST_DB", &b.spec.db)
                .env("BATCHDB_TEST_BLOBS", &b.spec.blobs)
                .env("BATCHDB_TEST_WORKER", k.to_string())
                .kill_on_drop(true)
                .output();
            children.push(tokio::spawn(child));
        }
        // The next round starts once this one is drained, its workers still alive.
        loop {
            let c = db.counts().await.expect("counts");
            if c.pending == 0 && c.running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        backends.push((round, db, b));
    }
    for child in children {
        let out = child.await.expect("join").expect("worker process");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }
    for (round, db, _b) in &backends {
        assert_all_results(db, *round).await;
    }
}

/// Runs `payload` as one job with a one-second kill grace and returns its output
/// (the pid of what it left behind) and how long the worker took.
async fn run_leaving(db: &BatchDb, payload: &str) -> (i32, Duration) {
    db.add(payload.as_bytes(), &PushOptions::default())
        .await
        .expect("add");
    let opts = {
        let mut o = WorkerOptions::default();
        o.until_empty = true;
        o.kill_grace = Duration::from_secs(1);
        o
    };
    let started = std::time::Instant::now();
    db.worker(Arc::new(ShellRunner::default()), opts)
        .run(None)
        .await
        .expect("worker");
    let took = started.elapsed();
    let rows: Vec<ListRow> = db
        .list(ListKind::Result, None)
        .map(|r| r.expect("list"))
        .collect()
        .await;
    let [ListRow::Result(r)] = &rows[..] else {
        panic!("one result: {rows:?}");
    };
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut db.get(&r.value.hash).await.expect("get"), &mut out)
        .await
        .expect("read");
    let pid = String::from_utf8_lossy(&out).trim().parse().expect("a pid");
    (pid, took)
}

/// Waits up to `within` for process `pid` (started with `marker` in its command line)
/// to be gone; whether it went.
async fn gone(pid: i32, marker: &str, within: Duration) -> bool {
    let until = std::time::Instant::now() + within;
    loop {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if zombie || !String::from_utf8_lossy(&cmdline).contains(marker) {
            return true;
        }
        if std::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job that starts `command` in a session of its own (so outside its process
/// group), waits until it is there, and prints its pid.
fn detached(command: &str) -> String {
    format!(
        "setsid {command} & p=$!; \
         until [ \"$(cut -d' ' -f6 /proc/$p/stat)\" = \"$p\" ]; do sleep 0.01; done; echo $p"
    )
}

/// A process the job left in its process group is stopped (SIGTERM) as soon as the
/// job's main process exits.
pub async fn what_a_job_leaves_in_its_group_is_stopped_when_it_exits(fresh: &Fresh, _me: &str) {
    let b = fresh().await;
    let (pid, _) = run_leaving(&b.db(), "sleep 301 >/dev/null 2>&1 & echo $!").await;
    assert!(
        gone(pid, "301", Duration::from_millis(900)).await,
        "sleep 301 still runs"
    );
}

/// A process that left the job's group but holds its output is killed after the kill
/// grace (found by its attempt id), and the output is cut there: the attempt ends.
pub async fn a_leftover_outside_the_group_holding_the_output_is_killed_after_the_grace(
    fresh: &Fresh,
    _me: &str,
) {
    let b = fresh().await;
    let (pid, took) = run_leaving(&b.db(), &detached("sleep 302")).await;
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(
        gone(pid, "302", Duration::from_secs(3)).await,
        "sleep 302 still runs"
    );
}

/// A process that left the job's group and its output is killed after the kill grace
/// too; the job's result does not wait for it.
pub async fn a_detached_leftover_is_killed_after_the_grace(fresh: &Fresh, _me: &str) {
    let b = fresh().await;
    let (pid, took) = run_leaving(&b.db(), &detached("sleep 303 </dev/null >/dev/null 2>&1")).await;
    assert!(took < Duration::from_millis(900), "{took:?}");
    assert!(
        !gone(pid, "303", Duration::ZERO).await,
        "killed before the grace"
    );
    assert!(
        gone(pid, "303", Duration::from_secs(3)).await,
        "sleep 303 still runs"
    );
}
