//! A worker's life as its caller sees it: awaited outside any task (the body of
//! `#[tokio::main]`, here the test's own), it runs as a task of its own, and ends
//! with the future that awaits it.

use std::sync::Arc;
use std::time::Duration;

use batchdb::queue::{ListKind, ListRow, PushOptions};
use batchdb::runner::ShellRunner;
use batchdb::worker::WorkerOptions;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::Backend;

pub async fn a_worker_awaited_outside_any_task_stops_when_its_future_is_dropped(b: &Backend) {
    let db = b.db();
    let worker = db.worker(Arc::new(ShellRunner::default()), WorkerOptions::default());
    let (tx, mut rx) = mpsc::unbounded_channel();
    // With nothing to do it runs until stopped: dropping the future is the stop.
    let ran = tokio::time::timeout(Duration::from_millis(300), worker.run(Some(tx))).await;
    assert!(ran.is_err(), "an idle worker ended by itself: {ran:?}");
    // Its report sender went with it: the channel closes.
    let closed = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert!(
        matches!(closed, Ok(None)),
        "the worker's task outlived its future"
    );
    // And nothing claims what is added after it (its claims wait at most a second
    // for a change, so a worker left running would have taken it by then).
    let inst = db
        .add(b"echo after".as_slice(), &PushOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed: Vec<_> = db.list(ListKind::Pending, None).collect().await;
    let rows: Vec<(i64, bool)> = listed
        .into_iter()
        .map(|r| match r {
            Ok(ListRow::Pending(p)) => (p.id, p.running),
            other => panic!("not a pending row: {other:?}"),
        })
        .collect();
    assert_eq!(rows, vec![(inst.id, false)], "pending, not running");
}
