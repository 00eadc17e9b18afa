//! A worker's slot claims its next instance ahead after a short job: the held claim
//! starts the moment the running job ends (while the ended job's outcome commits), is
//! given back if the running job runs long or the worker stops, and never starts once
//! cancelled.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use batchdb::queue::{EventKind, Instance, Order, PushOptions, Selector, State};
use batchdb::runner::ShellRunner;
use batchdb::worker::{Shutdown, WorkerOptions};
use batchdb::{BatchDb, Result};
use tokio::task::JoinHandle;

use crate::Backend;

/// One slot, oldest first, claiming ahead after any job shorter than `ahead`.
fn one_slot(ahead: Duration) -> WorkerOptions {
    let mut opts = WorkerOptions::default();
    opts.concurrency = 1;
    opts.order = Order::Oldest;
    opts.ahead = ahead;
    opts
}

/// Starts a worker with `opts` in the background.
fn start(db: &BatchDb, opts: WorkerOptions) -> (Shutdown, JoinHandle<Result<()>>) {
    let worker = db.worker(Arc::new(ShellRunner::default()), opts);
    let stop = worker.shutdown_handle();
    (stop, tokio::spawn(worker.run(None)))
}

async fn add(db: &BatchDb, script: &str) -> Instance {
    db.add(script.as_bytes(), &PushOptions::default())
        .await
        .unwrap()
}

/// Waits (up to 30 s) until instance `id` is in state `state`.
async fn until_state(db: &BatchDb, id: i64, state: State) {
    for _ in 0..3000 {
        if db.instance(id).await.unwrap().state == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("instance {id} never became {state:?}");
}

/// The outcomes and messages of instance `id`'s attempts, in order.
async fn attempts(db: &BatchDb, id: i64) -> Vec<(Option<String>, Option<String>)> {
    let d = db.instance(id).await.unwrap();
    d.attempts
        .iter()
        .map(|a| (a.outcome.clone(), a.report.message.clone()))
        .collect()
}

fn released() -> (Option<String>, Option<String>) {
    (
        Some("released".into()),
        Some("given back before it started".into()),
    )
}

fn result() -> (Option<String>, Option<String>) {
    (Some("result".into()), None)
}

/// Three jobs for one slot, oldest first: a short one, which makes the slot claim the
/// other two (the long one to run, the last to hold), a second-long one, and one that
/// creates `marker` if it ever runs.
async fn held_behind_a_long_job(db: &BatchDb, marker: &Path) -> (Instance, Instance) {
    add(db, "true").await;
    let long = add(db, "sleep 1").await;
    let held = add(db, &format!("touch {}", marker.display())).await;
    (long, held)
}

/// A shell job that appends `s N` and `e N` around its work to `log`.
fn logged(log: &Path, n: usize, work: &str) -> String {
    let log = log.display();
    format!("echo s {n} >> {log}; {work}; echo e {n} >> {log}")
}

pub async fn a_slot_starts_what_it_claimed_ahead_yet_runs_one_job_at_a_time(b: &Backend) {
    let db = b.db();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    for n in 0..30 {
        add(&db, &logged(&log, n, "true")).await;
    }
    let mut opts = one_slot(Duration::from_secs(1));
    opts.until_empty = true;
    let (_stop, task) = start(&db, opts);
    task.await.unwrap().unwrap();
    // The jobs ran one at a time, each once, in order.
    let text = std::fs::read_to_string(&log).unwrap();
    let want: String = (0..30).map(|n| format!("s {n}\ne {n}\n")).collect();
    assert_eq!(text, want);
    // Yet the slot held a second claim while a job ran: two attempts were open at
    // once in the log of events.
    let events = db.event_page(0, 10_000).await.unwrap();
    let (mut open, mut most) = (std::collections::HashSet::new(), 0);
    for e in &events {
        match e.event {
            EventKind::Start => {
                open.insert(e.instance);
            }
            EventKind::Result => {
                open.remove(&e.instance);
            }
            _ => {}
        }
        most = most.max(open.len());
    }
    assert_eq!(most, 2, "no claim was held ahead");
    let counts = db.counts().await.unwrap();
    assert_eq!(counts.result, 30, "{counts:?}");
}

pub async fn a_held_claim_is_given_back_when_the_job_before_it_runs_long(b: &Backend) {
    let db = b.db();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let short = add(&db, "true").await;
    let long = add(&db, "sleep 2").await;
    let held = add(&db, &logged(&log, 0, "true")).await;
    let mut opts = one_slot(Duration::from_secs(1));
    opts.until_empty = true;
    let (_stop, task) = start(&db, opts);
    // Held while the long job runs, then given back long before that job ends.
    until_state(&db, held.id, State::Running).await;
    until_state(&db, held.id, State::Pending).await;
    assert_eq!(db.instance(long.id).await.unwrap().state, State::Running);
    assert_eq!(attempts(&db, held.id).await, [released()]);
    task.await.unwrap().unwrap();
    assert_eq!(attempts(&db, short.id).await, [result()]);
    assert_eq!(attempts(&db, long.id).await, [result()]);
    assert_eq!(attempts(&db, held.id).await, [released(), result()]);
    // A released attempt is not a failure, and the job ran once.
    assert_eq!(db.instance(held.id).await.unwrap().state, State::Result);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "s 0\ne 0\n");
}

pub async fn a_held_claim_cancelled_ends_without_running(b: &Backend) {
    let db = b.db();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let (long, held) = held_behind_a_long_job(&db, &marker).await;
    let mut opts = one_slot(Duration::from_secs(30));
    opts.until_empty = true;
    let (_stop, task) = start(&db, opts);
    until_state(&db, held.id, State::Running).await;
    assert_eq!(db.instance(long.id).await.unwrap().state, State::Running);
    db.cancel(&Selector::Id(held.id)).await.unwrap();
    task.await.unwrap().unwrap();
    let d = db.instance(held.id).await.unwrap();
    assert_eq!(d.state, State::Cancelled);
    let last = d.last_attempt().unwrap();
    assert_eq!(
        last.report.message.as_deref(),
        Some("cancelled before it started")
    );
    assert!(!marker.exists(), "a cancelled held claim ran");
    assert_eq!(attempts(&db, long.id).await, [result()]);
}

pub async fn a_stopping_worker_gives_back_its_held_claims(b: &Backend) {
    let db = b.db();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let (long, held) = held_behind_a_long_job(&db, &marker).await;
    let (stop, task) = start(&db, one_slot(Duration::from_secs(30)));
    until_state(&db, held.id, State::Running).await;
    stop.graceful();
    task.await.unwrap().unwrap();
    // The running job finished; the held one is pending again, never started.
    assert_eq!(attempts(&db, long.id).await, [result()]);
    assert_eq!(db.instance(held.id).await.unwrap().state, State::Pending);
    assert_eq!(attempts(&db, held.id).await, [released()]);
    assert!(!marker.exists(), "a held claim ran after the stop");
}

pub async fn no_claim_is_held_ahead_when_ahead_is_zero(b: &Backend) {
    let db = b.db();
    for _ in 0..10 {
        add(&db, "true").await;
    }
    let mut opts = one_slot(Duration::ZERO);
    opts.until_empty = true;
    let (_stop, task) = start(&db, opts);
    task.await.unwrap().unwrap();
    let events = db.event_page(0, 10_000).await.unwrap();
    let mut open = 0i32;
    for e in &events {
        match e.event {
            EventKind::Start => open += 1,
            EventKind::Result => open -= 1,
            _ => {}
        }
        assert!(open <= 1, "a claim was held ahead");
    }
    assert_eq!(db.counts().await.unwrap().result, 10);
}
