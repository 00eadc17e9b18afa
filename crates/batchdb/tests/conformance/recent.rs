//! Newest-first pages of instances (`ps`, the dashboard): order, paging, the state
//! and batch filters, and the last attempt's timing and exit on each row.

use std::time::Duration;

use batchdb::queue::{AttemptReport, Order, Outcome, RecentQuery, Selector, State};

use crate::Backend;
use crate::util::{job, now_ms, opts, req};

const LONG: Duration = Duration::from_secs(600);

fn ended(exit_code: i32, start: i64) -> AttemptReport {
    let mut r = AttemptReport::default();
    r.start = start;
    r.end = start + 250;
    r.exit_code = Some(exit_code);
    r.stdout = Some(job(9000));
    r.message = (exit_code != 0).then(|| format!("exit code {exit_code}"));
    r
}

fn query(states: &[State], batch: Option<&str>, before: Option<i64>, limit: usize) -> RecentQuery {
    let mut q = RecentQuery::newest(limit);
    q.states = states.to_vec();
    q.batch = batch.map(String::from);
    q.before = before;
    q
}

async fn ids(b: &Backend, q: &RecentQuery) -> Vec<i64> {
    b.queue
        .recent_page(q)
        .await
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect()
}

/// Instances 1..=6: 1 result, 2 fail, 3 cancelled, 4 running, 5 and 6 pending; 2, 4
/// and 6 in batch `b`.
async fn six(b: &Backend) {
    for n in 1..=6 {
        let mut o = opts();
        o.batch = (n % 2 == 0).then(|| "b".to_owned());
        b.queue.add(&job(n), &o).await.unwrap();
    }
    b.queue.cancel(&Selector::Id(3)).await.unwrap();
    let mut oldest = req("w", 3, LONG);
    oldest.order = Order::Oldest;
    let c = b.queue.claim(&oldest).await.unwrap();
    let claimed: Vec<i64> = c.iter().map(|c| c.token.id).collect();
    assert_eq!(claimed, [1, 2, 4]);
    let t0 = now_ms();
    b.queue
        .finish(&c[0].token, &Outcome::Success(ended(0, t0)))
        .await
        .unwrap();
    let failed = Outcome::Failure {
        report: ended(3, t0),
        retry_at: None,
    };
    b.queue.finish(&c[1].token, &failed).await.unwrap();
}

pub async fn recent_pages_go_newest_first_and_page_by_id(b: &Backend) {
    six(b).await;
    assert_eq!(ids(b, &RecentQuery::newest(10)).await, [6, 5, 4, 3, 2, 1]);
    assert_eq!(ids(b, &query(&[], None, None, 4)).await, [6, 5, 4, 3]);
    assert_eq!(ids(b, &query(&[], None, Some(3), 4)).await, [2, 1]);
    assert_eq!(
        ids(b, &query(&[], None, Some(1), 4)).await,
        Vec::<i64>::new()
    );
}

pub async fn recent_pages_filter_by_states_and_batch(b: &Backend) {
    six(b).await;
    let states = |s: &[State]| query(s, None, None, 10);
    assert_eq!(ids(b, &states(&[State::Pending])).await, [6, 5]);
    assert_eq!(ids(b, &states(&[State::Running])).await, [4]);
    let ended = [State::Cancelled, State::Result, State::Fail, State::Result];
    assert_eq!(ids(b, &states(&ended)).await, [3, 2, 1]);
    assert_eq!(ids(b, &query(&ended, None, None, 2)).await, [3, 2]);
    assert_eq!(ids(b, &query(&ended, None, Some(3), 10)).await, [2, 1]);
    assert_eq!(ids(b, &query(&[], Some("b"), None, 10)).await, [6, 4, 2]);
    let pending_in_b = query(&[State::Pending], Some("b"), None, 10);
    assert_eq!(ids(b, &pending_in_b).await, [6]);
    assert!(ids(b, &query(&[], Some("nope"), None, 10)).await.is_empty());
}

pub async fn recent_rows_carry_the_last_attempt(b: &Backend) {
    six(b).await;
    let rows = b.queue.recent_page(&RecentQuery::newest(10)).await.unwrap();
    let row = |id: i64| rows.iter().find(|r| r.id == id).unwrap();
    let (r1, r2, r4, r5) = (row(1), row(2), row(4), row(5));
    assert_eq!(
        (r1.state, r1.exit_code, r1.attempts),
        (State::Result, Some(0), 1)
    );
    // The start is the claim's; the end the report's.
    let took = r1.end.zip(r1.start).map(|(e, s)| e - s);
    assert!(took.is_some_and(|t| (250..60_000).contains(&t)), "{took:?}");
    assert_eq!((r2.state, r2.exit_code), (State::Fail, Some(3)));
    assert_eq!(r2.batch.as_deref(), Some("b"));
    assert_eq!(r1.batch, None);
    assert_eq!(
        (r4.state, r4.end, r4.exit_code),
        (State::Running, None, None)
    );
    assert!(r4.start.is_some(), "a running attempt has started");
    assert_eq!((r5.state, r5.attempts), (State::Pending, 0));
    assert_eq!(r5.job, job(5).hash);
}
