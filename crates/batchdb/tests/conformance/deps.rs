//! Batches and dependencies: every backend must pass each of these.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use batchdb::queue::{
    AttemptReport, CacheSpec, Dependency, EventKind, Finished, Instance, Outcome, PushOptions,
    Selector, State,
};
use batchdb::{Error, Hash};

use crate::Backend;
use crate::util::{job, now_ms, req};

const LONG: Duration = Duration::from_secs(60);

fn after(sels: &[Selector], any: bool, batch: Option<&str>) -> PushOptions {
    let mut o = PushOptions::default();
    o.batch = batch.map(String::from);
    o.after = sels
        .iter()
        .map(|s| {
            if any {
                Dependency::on_end(s.clone())
            } else {
                Dependency::on_result(s.clone())
            }
        })
        .collect();
    o
}

fn id(i: &Instance) -> Selector {
    Selector::Id(i.id)
}

fn ended(stdout: u64, ok: bool) -> Outcome {
    let mut r = AttemptReport::default();
    r.start = now_ms();
    r.end = now_ms();
    r.exit_code = Some(i32::from(!ok));
    r.stdout = Some(job(1000 + stdout));
    if ok {
        Outcome::Success(r)
    } else {
        r.message = Some("exit code 1".into());
        Outcome::Failure {
            report: r,
            retry_at: None,
        }
    }
}

async fn state(b: &Backend, id: i64) -> State {
    b.queue.instance(id).await.expect("instance").state
}

/// Claims what is claimable (which must include `want`), ends `want` with
/// `outcome` and gives the others back.
async fn run(b: &Backend, want: i64, outcome: &Outcome) {
    let c = b.queue.claim(&req("w", 10, LONG)).await.unwrap();
    assert!(c.iter().any(|c| c.token.id == want), "{want} claimable");
    for c in c {
        if c.token.id == want {
            b.queue.finish(&c.token, outcome).await.unwrap();
        } else {
            let back = Outcome::Released(AttemptReport::default());
            b.queue.finish(&c.token, &back).await.unwrap();
        }
    }
}

/// A claim that ends an expired instance (its cancel was requested) claims, in the
/// same transaction, the dependent that end released.
pub async fn a_takeover_that_ends_an_instance_lets_the_same_claim_take_its_dependent(b: &Backend) {
    let a = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
    let dep = b
        .queue
        .add(&job(2), &after(&[id(&a)], true, None))
        .await
        .unwrap();
    let short = b
        .queue
        .claim(&req("lost", 1, Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(short.len(), 1);
    b.queue.cancel(&Selector::Id(a.id)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = b.queue.claim(&req("w", 2, LONG)).await.unwrap();
    assert_eq!(state(b, a.id).await, State::Cancelled);
    let ids: Vec<i64> = got.iter().map(|c| c.token.id).collect();
    assert_eq!(ids, [dep.id], "the released dependent, in the same claim");
}

pub async fn a_dependency_is_released_in_the_transaction_of_its_result(b: &Backend) {
    let a = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
    let a2 = b.queue.add(&job(2), &PushOptions::default()).await.unwrap();
    let opts = after(&[id(&a), id(&a2)], false, Some("reduce"));
    let r = b.queue.add(&job(3), &opts).await.unwrap();
    assert_eq!(state(b, r.id).await, State::Waiting);
    let detail = b.queue.instance(r.id).await.unwrap();
    assert_eq!((detail.deps, detail.waiting_on), (2, 2));
    assert_eq!(detail.batch.as_deref(), Some("reduce"));
    run(b, a.id, &ended(1, true)).await;
    assert_eq!(state(b, r.id).await, State::Waiting, "one left");
    run(b, a2.id, &ended(2, true)).await;
    // Released by the finish itself: no poll, no claim needed in between.
    assert_eq!(state(b, r.id).await, State::Pending);
    let c = b.queue.claim(&req("w", 10, LONG)).await.unwrap();
    let mine = c.iter().find(|c| c.token.id == r.id).expect("released");
    assert_eq!(mine.deps, 2);
    let got = b.queue.dependency_results(r.id, 0, 10).await.unwrap();
    let lines: Vec<(i64, Hash, Hash)> = got.iter().map(|d| (d.instance, d.job, d.result)).collect();
    assert_eq!(
        lines,
        [
            (a.id, job(1).hash, job(1001).hash),
            (a2.id, job(2).hash, job(1002).hash)
        ]
    );
    let page = b.queue.dependency_results(r.id, a.id, 10).await.unwrap();
    assert_eq!(page.len(), 1, "paged by instance id");
    // A dependency that had its result already is met at once.
    let late = b
        .queue
        .add(&job(4), &after(&[id(&a)], false, None))
        .await
        .unwrap();
    assert_eq!(state(b, late.id).await, State::Pending);
}

pub async fn failure_and_cancel_propagate_down_the_graph(b: &Backend) {
    let none = PushOptions::default();
    let a = b.queue.add(&job(1), &none).await.unwrap();
    let mid = b
        .queue
        .add(&job(2), &after(&[id(&a)], false, Some("mid")))
        .await
        .unwrap();
    let leaf = b
        .queue
        .add(
            &job(3),
            &after(&[Selector::Batch("mid".into())], false, None),
        )
        .await
        .unwrap();
    let any = b
        .queue
        .add(&job(4), &after(&[id(&a)], true, None))
        .await
        .unwrap();
    let any_leaf = b
        .queue
        .add(&job(5), &after(&[id(&mid)], true, None))
        .await
        .unwrap();
    // A failure with retries left is no end: everything keeps waiting.
    let c = b.queue.claim(&req("w", 10, LONG)).await.unwrap();
    let again = Outcome::Failure {
        report: AttemptReport::default(),
        retry_at: Some(now_ms()),
    };
    b.queue.finish(&c[0].token, &again).await.unwrap();
    assert_eq!(state(b, mid.id).await, State::Waiting);
    assert_eq!(state(b, any.id).await, State::Waiting);
    run(b, a.id, &ended(1, false)).await;
    let d = b.queue.instance(mid.id).await.unwrap();
    assert_eq!(d.state, State::Cancelled);
    assert_eq!(
        d.message(),
        format!("dependency {} {} failed", a.job, a.created)
    );
    let d = b.queue.instance(leaf.id).await.unwrap();
    assert_eq!(d.state, State::Cancelled);
    assert_eq!(
        d.message(),
        format!("dependency {} {} cancelled", mid.job, mid.created)
    );
    // --after-any waits for the end, whatever it is.
    assert_eq!(state(b, any.id).await, State::Pending);
    assert_eq!(state(b, any_leaf.id).await, State::Pending);
    // Pushing after a broken dependency ends at once, the same way.
    let late = b
        .queue
        .add(&job(6), &after(&[id(&a)], false, None))
        .await
        .unwrap();
    assert_eq!(state(b, late.id).await, State::Cancelled);
    // Cancelling a waiting or pending instance propagates too.
    let x = b.queue.add(&job(7), &none).await.unwrap();
    let y = b
        .queue
        .add(&job(8), &after(&[id(&x)], false, None))
        .await
        .unwrap();
    let z = b
        .queue
        .add(&job(9), &after(&[id(&y)], false, None))
        .await
        .unwrap();
    b.queue.cancel(&id(&y)).await.unwrap();
    assert_eq!(state(b, y.id).await, State::Cancelled);
    assert_eq!(state(b, z.id).await, State::Cancelled);
    assert_eq!(state(b, x.id).await, State::Pending);
}

pub async fn retry_with_dependents_rewires_the_graph(b: &Backend) {
    let none = PushOptions::default();
    let a = b.queue.add(&job(1), &none).await.unwrap();
    let mid = b
        .queue
        .add(&job(2), &after(&[id(&a)], false, Some("m")))
        .await
        .unwrap();
    let leaf = b
        .queue
        .add(&job(3), &after(&[id(&mid)], false, None))
        .await
        .unwrap();
    run(b, a.id, &ended(1, false)).await;
    // A plain retry leaves what the failure cancelled alone.
    let again = b.queue.retry(&id(&a), false).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(state(b, mid.id).await, State::Cancelled);
    run(b, again[0].id, &ended(1, false)).await;
    let pushed = b
        .queue
        .retry(&Selector::Id(again[0].id), true)
        .await
        .unwrap();
    let jobs: Vec<Hash> = pushed.iter().map(|i| i.job).collect();
    assert_eq!(jobs, [a.job, mid.job, leaf.job]);
    let (a2, mid2, leaf2) = (pushed[0], pushed[1], pushed[2]);
    assert_eq!(state(b, mid2.id).await, State::Waiting);
    let d = b.queue.instance(mid2.id).await.unwrap();
    assert_eq!(d.batch.as_deref(), Some("m"), "the batch is kept");
    run(b, a2.id, &ended(1, true)).await;
    run(b, mid2.id, &ended(2, true)).await;
    run(b, leaf2.id, &ended(3, true)).await;
    // Retrying twice pushes nothing twice.
    assert!(b.queue.retry(&id(&leaf), true).await.unwrap().is_empty());
}

pub async fn cycles_and_unknown_selectors_are_rejected(b: &Backend) {
    let a = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
    let before = b.queue.counts().await.unwrap();
    assert_eq!(before.pending, 1);
    let bad = [
        after(&[Selector::Batch("b".into())], false, Some("b")),
        after(&[Selector::Hash(job(2).hash)], false, None),
        after(&[Selector::Batch("nothing".into())], false, None),
        after(&[Selector::Id(a.id + 100)], true, None),
        after(&[Selector::AllFailed], false, None),
    ];
    for opts in &bad {
        let e = b.queue.add(&job(2), opts).await.unwrap_err();
        assert!(e.to_string().contains("dependency"), "{e}");
    }
    let mut bad_name = PushOptions::default();
    bad_name.batch = Some("no spaces".into());
    assert!(b.queue.add(&job(2), &bad_name).await.is_err());
    assert_eq!(b.queue.counts().await.unwrap(), before, "nothing was added");
    assert!(b.queue.batches_page(0, 10, None).await.unwrap().is_empty());
    let other = b.queue.add(&job(5), &PushOptions::default()).await.unwrap();
    let e = b
        .queue
        .push(
            &job(1).hash,
            &after(&[Selector::Hash(other.job)], false, None),
        )
        .await;
    assert!(e.is_ok(), "another job's key is no cycle: {e:?}");
    let own = after(&[Selector::Hash(job(1).hash)], false, None);
    assert!(
        b.queue.push(&job(1).hash, &own).await.is_err(),
        "its own job is"
    );
}

pub async fn a_waiting_instance_is_never_claimed_by_racing_workers(b: &Backend) {
    let deps: Vec<Instance> = futures_util::future::join_all((0..4).map(|n| {
        let q = b.queue.clone();
        async move { q.add(&job(n), &PushOptions::default()).await.unwrap() }
    }))
    .await;
    let sels: Vec<Selector> = deps.iter().map(id).collect();
    let mut waiting = HashSet::new();
    for n in 10..40 {
        waiting.insert(
            b.queue
                .add(&job(n), &after(&sels, false, None))
                .await
                .unwrap()
                .id,
        );
    }
    let released = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..4 {
        let q = (b.reopen)().await;
        let (released, waiting) = (released.clone(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let until = std::time::Instant::now() + Duration::from_secs(20);
            while mine.len() < 30 && std::time::Instant::now() < until {
                let got = q.claim(&req(&format!("w{w}"), 2, LONG)).await.unwrap();
                // Set before the last dependency's finish begins: a claim that
                // returns while it is unset committed before that finish.
                let early = !released.load(Ordering::SeqCst);
                for c in got {
                    if waiting.contains(&c.token.id) {
                        assert!(!early, "waiting instance {} was claimed", c.token.id);
                        mine.push(c.token.id);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            mine
        }));
    }
    // The racing claimers take the dependencies; end them here.
    let mut done = 0;
    while done < deps.len() {
        for d in &deps {
            let s = b.queue.instance(d.id).await.unwrap();
            if s.state == State::Running {
                let t = batchdb::queue::ClaimToken {
                    id: d.id,
                    token: s.attempts.last().unwrap().attempt,
                };
                if done + 1 == deps.len() {
                    released.store(true, Ordering::SeqCst);
                }
                if b.queue.finish(&t, &ended(1, true)).await.is_ok() {
                    done += 1;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut all = HashSet::new();
    for t in tasks {
        for id in t.await.unwrap() {
            assert!(all.insert(id), "instance {id} claimed twice");
        }
    }
    assert_eq!(all, waiting, "each released instance ran once");
}

pub async fn the_cache_key_covers_the_dependency_results(b: &Backend) {
    let spec = CacheSpec::new("shell:sh", None);
    let creq = {
        let mut r = req("w", 10, LONG);
        r.cache = Some(spec.clone());
        r
    };
    // A reduce over an upstream whose output is `out`; returns the reduce's claim.
    async fn reduce(b: &Backend, creq: &batchdb::queue::ClaimRequest, out: u64) -> (i64, bool) {
        let up = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
        let c = b.queue.claim(creq).await.unwrap();
        assert_eq!(c[0].token.id, up.id);
        b.queue
            .finish(&c[0].token, &ended(out, true))
            .await
            .unwrap();
        let mut o = after(&[id(&up)], false, None);
        o.cached = true;
        let r = b.queue.add(&job(2), &o).await.unwrap();
        let c = b.queue.claim(creq).await.unwrap();
        assert_eq!(c[0].token.id, r.id);
        let hit = c[0].cache_hit.is_some();
        if !hit {
            // What the worker fills: the key over the BATCHDB_DEPS bytes.
            let deps = b.queue.dependency_results(r.id, 0, 100).await.unwrap();
            let lines: String = deps.iter().map(|d| d.line()).collect();
            let inputs = Hash::of(lines.as_bytes());
            let key = batchdb::queue::cache_key(
                &job(2).hash,
                "shell:sh",
                None,
                Some(&inputs),
                &Default::default(),
            );
            let mut done = ended(50 + out, true);
            if let Outcome::Success(rep) = &mut done {
                rep.cache_key = Some(key);
            }
            b.queue.finish(&c[0].token, &done).await.unwrap();
        }
        (r.id, hit)
    }
    assert!(!reduce(b, &creq, 7).await.1, "first run");
    assert!(reduce(b, &creq, 7).await.1, "same upstream output: a hit");
    assert!(
        !reduce(b, &creq, 8).await.1,
        "other upstream output: a miss"
    );
    // The same payload without dependencies never hits a dependent's entry.
    let mut o = PushOptions::default();
    o.cached = true;
    b.queue.add(&job(2), &o).await.unwrap();
    let c = b.queue.claim(&creq).await.unwrap();
    assert!(c[0].cache_hit.is_none());
}

pub async fn batches_count_and_select_their_instances(b: &Backend) {
    let mut o = PushOptions::default();
    o.batch = Some("maps".into());
    let one = b.queue.add(&job(1), &o).await.unwrap();
    let two = b.queue.add(&job(2), &o).await.unwrap();
    b.queue.add(&job(3), &PushOptions::default()).await.unwrap();
    let w = b
        .queue
        .add(
            &job(4),
            &after(&[Selector::Batch("maps".into())], false, Some("red")),
        )
        .await
        .unwrap();
    run_first(b, &ended(1, true)).await;
    let all = b.queue.batches_page(0, 10, None).await.unwrap();
    let names: Vec<&str> = all.iter().map(|b| b.batch.as_str()).collect();
    assert_eq!(names, ["maps", "red"]);
    assert_eq!(
        (all[0].total, all[0].counts.result, all[0].counts.pending),
        (2, 1, 1)
    );
    assert_eq!((all[1].total, all[1].counts.waiting), (1, 1));
    let one_page = b.queue.batches_page(all[0].id, 10, None).await.unwrap();
    assert_eq!(one_page.len(), 1, "paged by id");
    let named = b.queue.batches_page(0, 10, Some("red")).await.unwrap();
    assert_eq!(named.len(), 1);
    let ids = b
        .queue
        .select(&Selector::Batch("maps".into()))
        .await
        .unwrap();
    assert_eq!(ids, [one.id, two.id]);
    let pending = b
        .queue
        .list_page(batchdb::queue::ListKind::Pending, (0, 100), Some("red"))
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].cursor(), w.id);
    let json = serde_json::to_value(&pending[0]).unwrap();
    assert_eq!(json["waiting"], true, "{json}");
    assert!(
        b.queue
            .batches_page(0, 10, Some("none"))
            .await
            .unwrap()
            .is_empty()
    );
}

/// Claims the first claimable instance and ends it.
async fn run_first(b: &Backend, outcome: &Outcome) {
    let c = b.queue.claim(&req("w", 1, LONG)).await.unwrap();
    b.queue.finish(&c[0].token, outcome).await.unwrap();
}

pub async fn wait_follows_the_log_from_another_handle(b: &Backend) {
    let other = batchdb::BatchDb::new((b.reopen)().await, b.blobs.clone());
    let a = b
        .queue
        .add(&job(1), &after(&[], false, Some("w")))
        .await
        .unwrap();
    let d = b
        .queue
        .add(&job(2), &after(&[id(&a)], false, Some("w")))
        .await
        .unwrap();
    let sels = [Selector::Batch("w".into())];
    let waiter = {
        let other = other.clone();
        let sels = sels.clone();
        tokio::spawn(async move {
            other
                .wait(&sels, Some(Duration::from_secs(30)), |_| {})
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "nothing ended yet");
    run(b, a.id, &ended(1, true)).await;
    run(b, d.id, &ended(2, false)).await;
    let out = waiter.await.unwrap().unwrap();
    assert!(!out.timed_out);
    assert_eq!(
        (out.progress.total, out.progress.ended, out.progress.failed),
        (2, 2, 1)
    );
    let fails: Vec<i64> = out.failures.iter().map(|f| f.id).collect();
    assert_eq!(fails, [d.id]);
    assert_eq!(out.failures[0].message, "exit code 1");
    // A retry stands for what it retried: the wait covers the new instance.
    let again = b.queue.retry(&id(&d), false).await.unwrap();
    let waiter = {
        let other = other.clone();
        tokio::spawn(async move {
            other
                .wait(&sels, Some(Duration::from_secs(30)), |_| {})
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished(), "the retry has not run");
    run(b, again[0].id, &ended(2, true)).await;
    let out = waiter.await.unwrap().unwrap();
    assert!(out.failures.is_empty(), "{out:?}");
    assert_eq!(out.progress.total, 2);
    // Nothing runs: the timeout passes.
    let late = b.queue.add(&job(3), &PushOptions::default()).await.unwrap();
    let out = other
        .wait(&[id(&late)], Some(Duration::from_millis(200)), |_| {})
        .await
        .unwrap();
    assert!(out.timed_out);
    let none = other
        .wait(&[Selector::Batch("none".into())], None, |_| {})
        .await;
    assert!(none.is_err(), "a selector naming nothing");
}

/// `finish_and_claim`: the outcome and the slot's next claim commit together, the
/// claim sees what the finish released from waiting, and a fenced finish claims
/// nothing.
pub async fn a_finish_claims_the_next_instance_in_its_own_transaction(b: &Backend) {
    let a = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
    let opts = after(&[id(&a)], false, None);
    let r = b.queue.add(&job(2), &opts).await.unwrap();
    let c = b.queue.claim(&req("w", 10, LONG)).await.unwrap();
    assert_eq!(c.len(), 1, "the dependent waits");
    let (finished, next) = b
        .queue
        .finish_and_claim(&c[0].token, &ended(1, true), &req("w", 1, LONG))
        .await
        .unwrap();
    assert_eq!(finished, Finished::Result);
    assert_eq!(next.len(), 1);
    assert_eq!(
        next[0].token.id, r.id,
        "released by the finish and claimed by it"
    );
    assert_eq!(state(b, a.id).await, State::Result);
    assert_eq!(state(b, r.id).await, State::Running);
    let log = b.queue.events(0, 100).await.unwrap();
    let at = |i: i64, k: EventKind| {
        log.iter()
            .position(|e| e.instance == Some(i) && e.event == k)
            .unwrap_or_else(|| panic!("{k:?} of {i} in {log:?}"))
    };
    assert!(at(a.id, EventKind::Result) < at(r.id, EventKind::Start));

    let x = b.queue.add(&job(3), &PushOptions::default()).await.unwrap();
    let e = b
        .queue
        .finish_and_claim(&c[0].token, &ended(1, true), &req("w", 1, LONG))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Fenced { .. }), "{e}");
    assert_eq!(
        state(b, x.id).await,
        State::Pending,
        "a fenced finish claims nothing"
    );
    let (_, none) = b
        .queue
        .finish_and_claim(&next[0].token, &ended(2, true), &req("w", 0, LONG))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(state(b, r.id).await, State::Result);
    assert_eq!(state(b, x.id).await, State::Pending);
}
