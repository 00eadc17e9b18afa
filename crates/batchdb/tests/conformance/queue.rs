//! Queue conformance tests: every backend must pass each of these.

use std::collections::HashSet;
use std::time::Duration;

use batchdb::queue::{
    AttemptReport, CacheSpec, EventKind, Finished, ListKind, ListRow, Order, Outcome, PushOptions,
    Selector, State,
};
use batchdb::{Error, Hash};
use futures_util::StreamExt;

use crate::Backend;
use crate::util::{job, now_ms, opts, req};

const LONG: Duration = Duration::from_secs(60);

fn success(stdout: u64) -> Outcome {
    Outcome::Success({
        let mut o = AttemptReport::default();
        o.start = now_ms();
        o.end = now_ms();
        o.exit_code = Some(0);
        o.stdout = Some(job(1000 + stdout));
        o
    })
}

fn failure(retry_at: Option<i64>) -> Outcome {
    Outcome::Failure {
        report: {
            let mut o = AttemptReport::default();
            o.end = now_ms();
            o.exit_code = Some(1);
            o.message = Some("exit code 1".into());
            o
        },
        retry_at,
    }
}

async fn rows(b: &Backend, kind: ListKind) -> Vec<ListRow> {
    let db = b.db();
    let s = db.list(kind, None);
    futures_util::pin_mut!(s);
    let mut out = Vec::new();
    while let Some(r) = s.next().await {
        out.push(r.expect("list row"));
    }
    out
}

async fn state(b: &Backend, id: i64) -> State {
    b.queue.instance(id).await.expect("instance").state
}

pub async fn create_is_idempotent(b: &Backend) {
    assert!(b.queue.create(&job(1)).await.unwrap());
    assert!(!b.queue.create(&job(1)).await.unwrap());
    let jobs = rows(b, ListKind::Job).await;
    assert!(
        matches!(&jobs[..], [ListRow::Job(j)] if j.key == job(1).hash),
        "{jobs:?}"
    );
    let creates = b.queue.events(0, 100).await.unwrap();
    assert_eq!(
        creates
            .iter()
            .filter(|e| e.event == EventKind::Create)
            .count(),
        1
    );
    assert!(
        rows(b, ListKind::Pending).await.is_empty(),
        "create must not push"
    );
}

pub async fn push_unknown_job_fails(b: &Backend) {
    let err = b.queue.push(&job(9).hash, &opts()).await.unwrap_err();
    assert!(
        matches!(err, Error::JobNotFound(h) if h == job(9).hash),
        "{err}"
    );
    assert!(rows(b, ListKind::Pending).await.is_empty());
}

pub async fn push_existing_job_twice_gives_two_instances(b: &Backend) {
    b.queue.create(&job(1)).await.unwrap();
    let a = b.queue.push(&job(1).hash, &opts()).await.unwrap();
    let c = b.queue.push(&job(1).hash, &opts()).await.unwrap();
    assert_ne!(a.id, c.id);
    assert_ne!(a.created, c.created);
    assert_eq!(rows(b, ListKind::Pending).await.len(), 2);
}

pub async fn concurrent_pushes_stay_distinct(b: &Backend) {
    b.queue.create(&job(1)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        // Half through this handle, half through other handles (as other processes).
        let q = if i % 2 == 0 {
            b.queue.clone()
        } else {
            (b.reopen)().await
        };
        tasks.push(tokio::spawn(async move {
            q.push(&job(1).hash, &PushOptions::default()).await
        }));
    }
    let mut ids = HashSet::new();
    let mut created = HashSet::new();
    for t in tasks {
        let inst = t.await.unwrap().unwrap();
        assert!(ids.insert(inst.id));
        assert!(
            created.insert(inst.created),
            "duplicate created {}",
            inst.created
        );
    }
    assert_eq!(rows(b, ListKind::Pending).await.len(), 40);
}

/// Many writes at once through one handle (they may share commits): the ones that
/// fail (fenced finishes) leave no trace and never undo the others.
pub async fn concurrent_writes_that_fail_undo_only_themselves(b: &Backend) {
    for n in 0..20 {
        b.queue.add(&job(n), &opts()).await.unwrap();
    }
    let claims = b.queue.claim(&req("w", 20, LONG)).await.unwrap();
    assert_eq!(claims.len(), 20);
    let mut tasks = Vec::new();
    for (i, c) in claims.iter().enumerate() {
        let q = b.queue.clone();
        let mut token = c.token;
        let stale = i % 2 == 1;
        if stale {
            token.token += 7; // no such attempt: fenced
        }
        tasks.push(tokio::spawn(async move {
            (stale, token.id, q.finish(&token, &success(i as u64)).await)
        }));
        let q = b.queue.clone();
        tasks.push(tokio::spawn(async move {
            (
                false,
                -1,
                q.add(&job(100 + i as u64), &opts())
                    .await
                    .map(|_| Finished::Result),
            )
        }));
    }
    let mut finished = HashSet::new();
    for t in tasks {
        let (stale, id, r) = t.await.unwrap();
        match r {
            Err(Error::Fenced { .. }) if stale => {}
            Ok(_) if !stale => {
                if id >= 0 {
                    finished.insert(id);
                }
            }
            other => panic!("stale={stale} instance {id}: {other:?}"),
        }
    }
    assert_eq!(finished.len(), 10);
    let results = rows(b, ListKind::Result).await;
    assert_eq!(results.len(), 10, "exactly the valid finishes");
    for r in &results {
        let ListRow::Result(r) = r else { panic!() };
        assert!(finished.contains(&r.value.id));
    }
    // The stale finishes changed nothing: their instances still run, one attempt each.
    let counts = b.queue.counts().await.unwrap();
    assert_eq!(
        (counts.running, counts.pending, counts.result),
        (10, 20, 10)
    );
    for c in &claims {
        if !finished.contains(&c.token.id) {
            let d = b.queue.instance(c.token.id).await.unwrap();
            assert_eq!(d.attempts.len(), 1);
            assert_eq!(d.attempts[0].outcome, None, "{d:?}");
        }
    }
}

pub async fn created_is_unique_across_jobs(b: &Backend) {
    let mut seen = HashSet::new();
    for n in 0..50 {
        let inst = b.queue.add(&job(n), &opts()).await.unwrap();
        assert!(
            seen.insert(inst.created),
            "created {} taken twice",
            inst.created
        );
        assert_eq!(
            b.queue
                .select(&Selector::Created(inst.created))
                .await
                .unwrap(),
            [inst.id]
        );
    }
}

pub async fn add_writes_job_and_instance_together(b: &Backend) {
    let i1 = b.queue.add(&job(1), &opts()).await.unwrap();
    let i2 = b.queue.add(&job(1), &opts()).await.unwrap();
    assert_eq!(i1.job, i2.job);
    let jobs = rows(b, ListKind::Job).await;
    assert_eq!(jobs.len(), 1);
    let evs = b.queue.events(0, 100).await.unwrap();
    let kinds: Vec<EventKind> = evs.iter().map(|e| e.event).collect();
    assert_eq!(kinds, [EventKind::Create, EventKind::Push, EventKind::Push]);
    assert_eq!(evs[1].instance, Some(i1.id));
    assert_eq!(evs[2].created, Some(i2.created));
}

pub async fn an_attempts_usage_is_recorded_listed_and_in_its_event(b: &Backend) {
    // Past 32 bits, both figures (bytes of memory; ms of CPU).
    let usage = batchdb::queue::Usage::new(5 << 30, 3_000_000_000, 7);
    let inst = b.queue.add(&job(1), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    let mut ok = success(1);
    if let Outcome::Success(r) = &mut ok {
        r.usage = Some(usage);
    }
    b.queue.finish(&c[0].token, &ok).await.unwrap();
    let d = b.queue.instance(inst.id).await.unwrap();
    assert_eq!(d.last_attempt().unwrap().report.usage, Some(usage));
    let rows = rows(b, ListKind::Result).await;
    let ListRow::Result(r) = &rows[0] else {
        panic!("a result row: {rows:?}")
    };
    assert_eq!(r.value.max_rss, Some(5 << 30));
    assert_eq!(r.value.cpu_ms, Some(3_000_000_007));
    let evs = b.queue.events(0, 100).await.unwrap();
    let end = evs.iter().find(|e| e.event == EventKind::Result).unwrap();
    assert_eq!(end.data["max_rss"], 5u64 << 30);
    assert_eq!(end.data["cpu_ms"], 3_000_000_007u64);
}

pub async fn claim_order_newest_and_oldest(b: &Backend) {
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(b.queue.add(&job(n), &opts()).await.unwrap().id);
    }
    let newest = {
        let mut o = req("w", 1, LONG);
        o.order = Order::Newest;
        o
    };
    let c = b.queue.claim(&newest).await.unwrap();
    assert_eq!(c[0].token.id, ids[3]);
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    assert_eq!(c[0].token.id, ids[0], "oldest first");
    let c = b.queue.claim(&newest).await.unwrap();
    assert_eq!(c[0].token.id, ids[2]);
}

pub async fn claim_priority_first(b: &Backend) {
    let low = b.queue.add(&job(1), &opts()).await.unwrap();
    let high = b
        .queue
        .add(&job(2), &{
            let mut o = opts();
            o.priority = 5;
            o
        })
        .await
        .unwrap();
    let neg = b
        .queue
        .add(&job(3), &{
            let mut o = opts();
            o.priority = -1;
            o
        })
        .await
        .unwrap();
    let got: Vec<i64> = b
        .queue
        .claim(&req("w", 3, LONG))
        .await
        .unwrap()
        .iter()
        .map(|c| c.token.id)
        .collect();
    assert_eq!(got, [high.id, low.id, neg.id]);
}

pub async fn delayed_instance_waits_for_run_at(b: &Backend) {
    let later = b
        .queue
        .add(&job(1), &{
            let mut o = opts();
            o.run_at = Some(now_ms() + 600);
            o
        })
        .await
        .unwrap();
    assert!(b.queue.claim(&req("w", 1, LONG)).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(650)).await;
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    assert_eq!(c[0].token.id, later.id);
}

pub async fn running_instance_listed_as_running(b: &Backend) {
    b.queue.add(&job(1), &opts()).await.unwrap();
    b.queue.add(&job(2), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    let pend = rows(b, ListKind::Pending).await;
    assert_eq!(pend.len(), 2, "running instances stay in the pending list");
    for r in pend {
        let ListRow::Pending(p) = r else {
            panic!("not a pending row")
        };
        assert_eq!(p.running, p.id == c[0].token.id);
    }
    let jobs = rows(b, ListKind::Job).await;
    let ListRow::Job(j) = &jobs[0] else {
        panic!("not a job row")
    };
    assert_eq!(j.running, vec![c[0].created]);
}

pub async fn concurrent_claims_never_share_an_instance(b: &Backend) {
    for n in 0..60 {
        b.queue.add(&job(n), &opts()).await.unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..6 {
        let q = (b.reopen)().await;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = q.claim(&req(&format!("w{w}"), 3, LONG)).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|c| c.token.id));
            }
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(all.insert(id), "instance {id} claimed twice");
        }
    }
    assert_eq!(all.len(), 60);
}

pub async fn expired_lease_is_taken_over_and_old_token_fenced(b: &Backend) {
    let inst = b.queue.add(&job(1), &opts()).await.unwrap();
    let first = b
        .queue
        .claim(&req("dead", 1, Duration::from_millis(100)))
        .await
        .unwrap();
    assert!(
        b.queue
            .claim(&req("other", 1, LONG))
            .await
            .unwrap()
            .is_empty(),
        "lease still valid"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = b.queue.claim(&req("other", 1, LONG)).await.unwrap();
    assert_eq!(second.len(), 1);
    assert!(second[0].takeover);
    assert_eq!(second[0].token.id, inst.id);
    assert!(second[0].token.token > first[0].token.token);
    // The stale worker can neither renew nor record anything.
    let e = b.queue.heartbeat(&first[0].token, LONG).await.unwrap_err();
    assert!(matches!(e, Error::Fenced { .. }), "{e}");
    let e = b
        .queue
        .finish(&first[0].token, &success(1))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Fenced { .. }), "{e}");
    assert_eq!(
        b.queue.finish(&second[0].token, &success(2)).await.unwrap(),
        Finished::Result
    );
    let d = b.queue.instance(inst.id).await.unwrap();
    let outcomes: Vec<_> = d
        .attempts
        .iter()
        .map(|a| a.outcome.clone().unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["lost", "result"]);
    assert_eq!(rows(b, ListKind::Result).await.len(), 1);
}

pub async fn heartbeat_keeps_a_long_job(b: &Backend) {
    b.queue.add(&job(1), &opts()).await.unwrap();
    // The lease is 1 s and renewed every 350 ms: over 1.4 s the job outlives its first
    // lease several times over and is never taken.
    let lease = Duration::from_secs(1);
    let c = b.queue.claim(&req("w", 1, lease)).await.unwrap();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(350)).await;
        let hb = b.queue.heartbeat(&c[0].token, lease).await.unwrap();
        assert!(!hb.cancel_requested);
        assert!(
            b.queue
                .claim(&req("thief", 1, lease))
                .await
                .unwrap()
                .is_empty()
        );
    }
    assert_eq!(
        b.queue.finish(&c[0].token, &success(1)).await.unwrap(),
        Finished::Result
    );
}

pub async fn failure_retries_then_fails(b: &Backend) {
    let inst = b.queue.add(&job(1), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    let at = now_ms() + 600;
    assert_eq!(
        b.queue
            .finish(&c[0].token, &failure(Some(at)))
            .await
            .unwrap(),
        Finished::Retry(at)
    );
    assert_eq!(state(b, inst.id).await, State::Pending);
    assert!(
        b.queue.claim(&req("w", 1, LONG)).await.unwrap().is_empty(),
        "backoff respected"
    );
    tokio::time::sleep(Duration::from_millis(650)).await;
    let c2 = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    assert_eq!(c2[0].failures, 1);
    assert_eq!(
        b.queue.finish(&c2[0].token, &failure(None)).await.unwrap(),
        Finished::Fail
    );
    assert_eq!(state(b, inst.id).await, State::Fail);
    let fails = rows(b, ListKind::Fail).await;
    let ListRow::Fail(f) = &fails[0] else {
        panic!("not a fail row")
    };
    assert_eq!(f.key, (inst.job, inst.created));
    assert_eq!(f.value.message, "exit code 1");
    assert_eq!(f.value.attempts, 2);
    let d = b.queue.instance(inst.id).await.unwrap();
    assert_eq!(d.attempts.len(), 2);
    assert_eq!(d.attempts[0].outcome.as_deref(), Some("retry"));
    assert_eq!(d.attempts[1].report.exit_code, Some(1));
}

pub async fn release_returns_to_pending(b: &Backend) {
    let inst = b.queue.add(&job(1), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    let r = Outcome::Released(AttemptReport::default());
    assert_eq!(
        b.queue.finish(&c[0].token, &r).await.unwrap(),
        Finished::Released
    );
    assert_eq!(state(b, inst.id).await, State::Pending);
    let c2 = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    assert_eq!(c2[0].failures, 0, "a release is not a failure");
}

pub async fn cancel_pending_and_running(b: &Backend) {
    let p = b.queue.add(&job(1), &opts()).await.unwrap();
    let r = b.queue.add(&job(2), &opts()).await.unwrap();
    let c = b
        .queue
        .claim(&{
            let mut o = req("w", 1, LONG);
            o.order = Order::Newest;
            o
        })
        .await
        .unwrap();
    assert_eq!(c[0].token.id, r.id);
    let done = b.queue.cancel(&Selector::Id(p.id)).await.unwrap();
    assert_eq!(done.iter().map(|i| i.id).collect::<Vec<_>>(), [p.id]);
    assert_eq!(state(b, p.id).await, State::Cancelled);
    b.queue.cancel(&Selector::Hash(r.job)).await.unwrap();
    assert!(b.queue.status(&c[0].token).await.unwrap().cancel_requested);
    assert!(
        b.queue
            .heartbeat(&c[0].token, LONG)
            .await
            .unwrap()
            .cancel_requested
    );
    let out = Outcome::Cancelled(AttemptReport::default());
    assert_eq!(
        b.queue.finish(&c[0].token, &out).await.unwrap(),
        Finished::Cancelled
    );
    assert_eq!(rows(b, ListKind::Cancelled).await.len(), 2);
    assert!(b.queue.claim(&req("w", 5, LONG)).await.unwrap().is_empty());
    // A cancel request on an instance whose worker died ends it instead of rerunning it.
    let d = b.queue.add(&job(3), &opts()).await.unwrap();
    b.queue
        .claim(&req("dead", 1, Duration::from_millis(50)))
        .await
        .unwrap();
    b.queue.cancel(&Selector::Id(d.id)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(b.queue.claim(&req("w", 1, LONG)).await.unwrap().is_empty());
    assert_eq!(state(b, d.id).await, State::Cancelled);
}

pub async fn retry_pushes_failed_again(b: &Backend) {
    let inst = b
        .queue
        .add(&job(1), &{
            let mut o = opts();
            o.priority = 3;
            o
        })
        .await
        .unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    b.queue.finish(&c[0].token, &failure(None)).await.unwrap();
    assert!(
        b.queue
            .retry(&Selector::Created(inst.created + 1_000_000), false)
            .await
            .unwrap()
            .is_empty()
    );
    let again = b.queue.retry(&Selector::AllFailed, false).await.unwrap();
    assert_eq!(again.len(), 1);
    assert!(
        b.queue
            .retry(&Selector::AllFailed, false)
            .await
            .unwrap()
            .is_empty(),
        "retried once only"
    );
    assert!(
        b.queue
            .retry(&Selector::Id(inst.id), false)
            .await
            .unwrap()
            .is_empty(),
        "retried once only"
    );
    assert_eq!(again[0].job, inst.job);
    assert_ne!(again[0].id, inst.id);
    assert_eq!(b.queue.instance(again[0].id).await.unwrap().priority, 3);
    assert_eq!(state(b, inst.id).await, State::Fail, "the failed row stays");
    let evs = b.queue.events(0, 100).await.unwrap();
    assert!(
        evs.iter()
            .any(|e| e.event == EventKind::Retry && e.instance == Some(again[0].id))
    );
}

pub async fn list_streams_pages_in_order(b: &Backend) {
    for n in 0..2500 {
        b.queue.add(&job(n % 7), &opts()).await.unwrap();
    }
    let pend = rows(b, ListKind::Pending).await;
    assert_eq!(pend.len(), 2500);
    let ids: Vec<i64> = pend.iter().map(ListRow::cursor).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(rows(b, ListKind::Job).await.len(), 7);
}

pub async fn events_cover_every_transition_in_order(b: &Backend) {
    let a = b.queue.add(&job(1), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    b.queue.finish(&c[0].token, &success(1)).await.unwrap();
    b.queue.add(&job(2), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    b.queue.finish(&c[0].token, &failure(None)).await.unwrap();
    let evs = b.queue.events(0, 100).await.unwrap();
    let kinds: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "create", "push", "start", "result", "create", "push", "start", "fail"
        ]
    );
    assert!(evs.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(evs[3].data["hash"], serde_json::json!(job(1001).hash));
    assert_eq!(evs[3].created, Some(a.created));
    assert_eq!(b.queue.last_event_id().await.unwrap(), evs[7].id);
    // Paging.
    let tail = b.queue.events(evs[5].id, 100).await.unwrap();
    assert_eq!(tail.len(), 2);
}

pub async fn counts_match_lists(b: &Backend) {
    for n in 0..5 {
        b.queue.add(&job(n), &opts()).await.unwrap();
    }
    let c = b.queue.claim(&req("w", 3, LONG)).await.unwrap();
    b.queue.finish(&c[0].token, &success(1)).await.unwrap();
    b.queue.finish(&c[1].token, &failure(None)).await.unwrap();
    b.queue.cancel(&Selector::Id(5)).await.unwrap();
    let counts = b.queue.counts().await.unwrap();
    assert_eq!(
        (
            counts.pending,
            counts.running,
            counts.result,
            counts.fail,
            counts.cancelled
        ),
        (1, 1, 1, 1, 1)
    );
    assert_eq!(
        rows(b, ListKind::Pending).await.len() as u64,
        counts.pending + counts.running
    );
    assert_eq!(rows(b, ListKind::Result).await.len() as u64, counts.result);
    assert_eq!(rows(b, ListKind::Fail).await.len() as u64, counts.fail);
}

pub async fn wait_change_wakes_on_another_handle(b: &Backend) {
    let other = (b.reopen)().await;
    let seen = b.queue.change_seq();
    let q = b.queue.clone();
    let waiter = tokio::spawn(async move {
        q.wait_change(seen, Duration::from_secs(30)).await;
        q.change_seq()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    other.add(&job(1), &opts()).await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(20), waiter)
        .await
        .expect("a commit by another handle must wake the waiter")
        .unwrap();
    assert_ne!(after, seen);
}

pub async fn result_cache_serves_and_dedupes(b: &Backend) {
    let spec = CacheSpec::new("shell:sh", None);
    let cached = {
        let mut o = opts();
        o.cached = true;
        o
    };
    let creq = {
        let mut o = req("w", 4, LONG);
        o.cache = Some(spec.clone());
        o
    };
    let a = b.queue.add(&job(1), &cached).await.unwrap();
    let dup = b.queue.add(&job(1), &cached).await.unwrap();
    let uncached = b.queue.add(&job(1), &opts()).await.unwrap();
    // Identical cached instances: only one runs at a time; the uncached one runs too.
    let c = b.queue.claim(&creq).await.unwrap();
    let ids: HashSet<i64> = c.iter().map(|c| c.token.id).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&uncached.id));
    let first = c.iter().find(|c| c.token.id != uncached.id).unwrap();
    let waiting = if first.token.id == a.id { dup.id } else { a.id };
    assert!(
        b.queue.claim(&creq).await.unwrap().is_empty(),
        "duplicate waits for the first"
    );
    let none = Default::default();
    let key = batchdb::queue::cache_key(&job(1).hash, &spec.runner, None, None, &none);
    let mut ok = success(7);
    if let Outcome::Success(r) = &mut ok {
        r.cache_key = Some(key);
    }
    b.queue.finish(&first.token, &ok).await.unwrap();
    let hit = b.queue.claim(&creq).await.unwrap();
    assert_eq!(hit.len(), 1);
    assert_eq!(hit[0].token.id, waiting);
    let served = hit[0].cache_hit.as_ref().expect("served from cache");
    assert!(served.cached);
    assert_eq!(served.stdout, Some(job(1007)));
    assert_eq!(state(b, waiting).await, State::Result);
    let res = rows(b, ListKind::Result).await;
    let ListRow::Result(r) = res.iter().find(|r| r.cursor() == waiting).unwrap() else {
        panic!()
    };
    assert!(r.value.cached);
    assert_eq!(r.value.hash, job(1007).hash);
    // A different runner spec misses; failures never fill the cache.
    b.queue.add(&job(1), &cached).await.unwrap();
    let other = {
        let mut o = req("w", 4, LONG);
        o.cache = Some(CacheSpec::new("shell:bash", None));
        o
    };
    let miss = b.queue.claim(&other).await.unwrap();
    assert!(miss[0].cache_hit.is_none());
    let mut bad = failure(None);
    if let Outcome::Failure { report, .. } = &mut bad {
        report.cache_key = Some(batchdb::queue::cache_key(
            &job(1).hash,
            "shell:bash",
            None,
            None,
            &none,
        ));
    }
    b.queue.finish(&miss[0].token, &bad).await.unwrap();
    b.queue.add(&job(1), &cached).await.unwrap();
    let again = b.queue.claim(&other).await.unwrap();
    assert!(
        again[0].cache_hit.is_none(),
        "a failure is never served from the cache"
    );
}

pub async fn select_by_created_job_and_result(b: &Backend) {
    let a = b.queue.add(&job(1), &opts()).await.unwrap();
    let a2 = b.queue.add(&job(1), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    b.queue.finish(&c[0].token, &success(5)).await.unwrap();
    assert_eq!(
        b.queue.select(&Selector::Hash(a.job)).await.unwrap(),
        [a.id, a2.id]
    );
    assert_eq!(
        b.queue
            .select(&Selector::Created(a2.created))
            .await
            .unwrap(),
        [a2.id]
    );
    assert_eq!(
        b.queue
            .select(&Selector::Hash(job(1005).hash))
            .await
            .unwrap(),
        [a.id]
    );
    assert!(
        b.queue
            .select(&Selector::Hash(Hash::of(b"nothing")))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.queue.select(&Selector::Id(a2.id)).await.unwrap(), [a2.id]);
}

pub async fn cancel_wins_over_a_retry_or_release(b: &Backend) {
    for outcome in [
        failure(Some(now_ms())),
        Outcome::Released(AttemptReport::default()),
    ] {
        let inst = b.queue.add(&job(1), &opts()).await.unwrap();
        let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
        b.queue.cancel(&Selector::Id(inst.id)).await.unwrap();
        assert_eq!(
            b.queue.finish(&c[0].token, &outcome).await.unwrap(),
            Finished::Cancelled
        );
        assert_eq!(state(b, inst.id).await, State::Cancelled);
    }
    // A result that came in before the kill is still recorded.
    let inst = b.queue.add(&job(2), &opts()).await.unwrap();
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    b.queue.cancel(&Selector::Id(inst.id)).await.unwrap();
    assert_eq!(
        b.queue.finish(&c[0].token, &success(1)).await.unwrap(),
        Finished::Result
    );
}

pub async fn cached_duplicates_do_not_block_the_queue(b: &Backend) {
    let creq = {
        let mut o = req("w", 1, LONG);
        o.cache = Some(CacheSpec::new("shell:sh", None));
        o
    };
    let cached = {
        let mut o = opts();
        o.cached = true;
        o
    };
    for _ in 0..40 {
        b.queue.add(&job(1), &cached).await.unwrap();
    }
    let other = b.queue.add(&job(2), &opts()).await.unwrap();
    let first = b.queue.claim(&creq).await.unwrap();
    assert_eq!(first[0].job, job(1).hash);
    // 39 identical runs wait for the first; the job behind them is not held up.
    let next = b.queue.claim(&creq).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.token.id).collect::<Vec<_>>(),
        [other.id]
    );
}

pub async fn a_job_whose_worker_keeps_dying_fails(b: &Backend) {
    let inst = b.queue.add(&job(1), &opts()).await.unwrap();
    let short = Duration::from_millis(30);
    for _ in 0..batchdb::queue::MAX_LOST {
        assert_eq!(
            b.queue.claim(&req("doomed", 1, short)).await.unwrap().len(),
            1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(b.queue.claim(&req("w", 1, LONG)).await.unwrap().is_empty());
    assert_eq!(state(b, inst.id).await, State::Fail);
    let d = b.queue.instance(inst.id).await.unwrap();
    let msg = d
        .last_attempt()
        .unwrap()
        .report
        .message
        .clone()
        .unwrap_or_default();
    assert!(msg.contains("worker lost"), "{msg}");
}

/// Whether `r` failed with [`Error::Corrupt`] naming `what`.
fn is_corrupt<T: std::fmt::Debug>(r: batchdb::Result<T>, what: &str) -> bool {
    match r {
        Err(Error::Corrupt { what: w, .. }) => w.contains(what) || what.is_empty(),
        other => {
            eprintln!("not corrupt: {other:?}");
            false
        }
    }
}

/// A value read back that batchdb never writes — an unknown state, a bad hash, an
/// unknown event kind — is the same error on every backend: [`Error::Corrupt`].
pub async fn corrupt_values_read_back_are_one_error(b: &Backend) {
    let q = &b.queue;
    let i = q.add(&job(1), &opts()).await.unwrap();
    (b.raw_sql)(format!(
        "UPDATE instances SET state = 'bogus' WHERE id = {}",
        i.id
    ))
    .await;
    assert!(is_corrupt(q.counts().await, "bogus"));
    assert!(is_corrupt(q.cancel(&Selector::Id(i.id)).await, "bogus"));
    (b.raw_sql)(format!(
        "UPDATE instances SET state = 'pending' WHERE id = {}",
        i.id
    ))
    .await;
    assert_eq!(q.counts().await.unwrap().pending, 1);

    (b.raw_sql)(format!(
        "UPDATE jobs SET key = 'not-a-hash' WHERE key = '{}'",
        job(1).hash
    ))
    .await;
    assert!(is_corrupt(
        q.list_page(ListKind::Job, (0, 10), None).await,
        "not-a-hash"
    ));

    (b.raw_sql)("UPDATE events SET kind = 'bogus'".into()).await;
    assert!(is_corrupt(q.events(0, 10).await, ""));
}

/// The claim, finish and detail paths decode through the same rows: a bad job hash met
/// by a claim, a bad output hash in an attempt, and a negative size are each
/// [`Error::Corrupt`] on every backend, and the queue stays usable around them.
pub async fn corrupt_values_on_every_path_are_one_error(b: &Backend) {
    let q = &b.queue;
    let done = q.add(&job(1), &opts()).await.unwrap();
    let c = q.claim(&req("w", 1, LONG)).await.unwrap();
    q.finish(&c[0].token, &success(1)).await.unwrap();
    (b.raw_sql)(format!(
        "UPDATE attempts SET stdout = 'xyz' WHERE instance = {}",
        done.id
    ))
    .await;
    assert!(is_corrupt(q.instance(done.id).await, "xyz"));
    assert!(is_corrupt(
        q.list_page(ListKind::Result, (0, 10), None).await,
        "xyz"
    ));

    (b.raw_sql)(format!(
        "UPDATE jobs SET size = -5 WHERE key = '{}'",
        job(1).hash
    ))
    .await;
    assert!(is_corrupt(
        q.list_page(ListKind::Job, (0, 10), None).await,
        "-5"
    ));

    let bad = q.add(&job(2), &opts()).await.unwrap();
    (b.raw_sql)(format!(
        "UPDATE instances SET job = 'not-a-hash' WHERE id = {}",
        bad.id
    ))
    .await;
    assert!(is_corrupt(q.claim(&req("w", 1, LONG)).await, "not-a-hash"));
    // Nothing was claimed by the failed transaction.
    assert_eq!(q.counts().await.unwrap().pending, 1);
}
