//! Retention (`prune`): every backend must pass each of these.

use std::sync::Arc;
use std::time::Duration;

use batchdb::queue::{
    AttemptReport, CacheSpec, Dependency, ListKind, ListRow, Outcome, PruneRequest, PushOptions,
    Selector, State,
};
use batchdb::runner::{Runner, ShellRunner};
use batchdb::worker::WorkerOptions;
use batchdb::{BatchDb, Error};
use futures_util::StreamExt;

use crate::Backend;
use crate::util::{job, now_ms, req};

const LONG: Duration = Duration::from_secs(60);

fn ended(stdout: u64, ok: bool) -> Outcome {
    let mut r = AttemptReport::default();
    (r.start, r.end) = (now_ms(), now_ms());
    r.stdout = Some(job(1000 + stdout));
    if ok {
        Outcome::Success(r)
    } else {
        Outcome::Failure {
            report: r,
            retry_at: None,
        }
    }
}

/// Claims what is claimable (which must include `want`), ends `want` with `outcome`
/// and gives the others back.
async fn run(b: &Backend, want: i64, outcome: &Outcome) {
    let c = b.queue.claim(&req("w", 10, LONG)).await.unwrap();
    assert!(c.iter().any(|c| c.token.id == want), "{want} claimable");
    for c in c {
        let o = if c.token.id == want {
            outcome.clone()
        } else {
            Outcome::Released(AttemptReport::default())
        };
        b.queue.finish(&c.token, &o).await.unwrap();
    }
}

fn only(result: bool, fail: bool, cancelled: bool) -> PruneRequest {
    let mut r = PruneRequest::before(now_ms() + 1);
    (r.result, r.fail, r.cancelled) = (result, fail, cancelled);
    // Small steps, so that a test crosses several of them.
    r.chunk = 2;
    r
}

async fn gone(b: &Backend, id: i64) -> bool {
    matches!(b.queue.instance(id).await, Err(Error::InstanceNotFound(_)))
}

async fn job_keys(db: &BatchDb) -> Vec<String> {
    db.list(ListKind::Job, None)
        .map(|r| match r.unwrap() {
            ListRow::Job(j) => j.key.to_hex(),
            other => panic!("{other:?}"),
        })
        .collect()
        .await
}

pub async fn prune_removes_ended_instances_before_the_cutoff_and_keeps_the_rest(b: &Backend) {
    let none = PushOptions::default();
    let ok = b.queue.add(&job(1), &none).await.unwrap();
    let bad = b.queue.add(&job(2), &none).await.unwrap();
    let off = b.queue.add(&job(3), &none).await.unwrap();
    run(b, ok.id, &ended(1, true)).await;
    run(b, bad.id, &ended(2, false)).await;
    b.queue.cancel(&Selector::Id(off.id)).await.unwrap();
    let waiting = b.queue.add(&job(4), &none).await.unwrap();
    let same_job = b.queue.add(&job(1), &none).await.unwrap();
    let db = b.db();
    // A cutoff before everything ended removes nothing.
    let early = PruneRequest::before(ok.created - 1);
    assert_eq!(db.prune_count(&early).await.unwrap(), 0);
    assert_eq!(db.prune(&early).await.unwrap().instances, 0);
    // Results only; a dry run counts first and removes nothing.
    assert_eq!(db.prune_count(&only(true, false, false)).await.unwrap(), 1);
    assert!(!gone(b, ok.id).await);
    let c = db.prune(&only(true, false, false)).await.unwrap();
    assert_eq!((c.instances, c.attempts, c.jobs), (1, 1, 0), "{c:?}");
    assert!(gone(b, ok.id).await && !gone(b, bad.id).await);
    // Then failures and cancelled ones: their jobs go with their last instance.
    let c = db.prune(&only(true, true, true)).await.unwrap();
    assert_eq!((c.instances, c.jobs), (2, 2), "{c:?}");
    assert!(gone(b, bad.id).await && gone(b, off.id).await);
    let mut keys = job_keys(&db).await;
    keys.sort();
    let mut want = vec![job(1).hash.to_hex(), job(4).hash.to_hex()];
    want.sort();
    assert_eq!(keys, want, "the jobs still in use stay");
    for id in [waiting.id, same_job.id] {
        assert_eq!(b.queue.instance(id).await.unwrap().state, State::Pending);
    }
    // The log keeps nothing about what is gone, and everything else.
    let events = b.queue.events(0, 10_000).await.unwrap();
    assert!(c.events > 0);
    for e in &events {
        if let Some(id) = e.instance {
            assert!([waiting.id, same_job.id].contains(&id), "{e:?}");
        } else {
            assert!(want.contains(&e.job.to_hex()), "{e:?}");
        }
    }
    assert!(events.iter().any(|e| e.instance == Some(waiting.id)));
    let counts = b.queue.counts().await.unwrap();
    assert_eq!((counts.pending, counts.result, counts.fail), (2, 0, 0));
}

/// No id is given twice: after a prune removed the newest instance and every event,
/// the next push's instance and events are numbered past them, and again after a
/// second such prune (its floor raised, not reset).
pub async fn ids_are_never_given_again_after_a_prune_removed_the_newest(b: &Backend) {
    let mut last = (0, 0);
    for n in 1..=3 {
        let added = b.queue.add(&job(n), &PushOptions::default()).await.unwrap();
        assert!(added.id > last.0, "instance {} after {}", added.id, last.0);
        run(b, added.id, &ended(n, true)).await;
        let events = b.queue.events(0, 10_000).await.unwrap();
        assert!(
            !events.is_empty() && events.iter().all(|e| e.id > last.1),
            "{events:?}"
        );
        last = (added.id, events.last().unwrap().id);
        let c = b.db().prune(&only(true, false, false)).await.unwrap();
        assert_eq!(c.instances, 1, "{c:?}");
        let left = b.queue.events(0, 10_000).await.unwrap();
        assert!(left.is_empty(), "the whole log was pruned: {left:?}");
    }
}

pub async fn prune_keeps_what_a_kept_instance_depends_on_then_removes_the_chain(b: &Backend) {
    let none = PushOptions::default();
    let a = b.queue.add(&job(1), &none).await.unwrap();
    run(b, a.id, &ended(1, true)).await;
    let mut o = PushOptions::default();
    o.batch = Some("chain".into());
    o.after = vec![Dependency::on_result(Selector::Id(a.id))];
    let r = b.queue.add(&job(2), &o).await.unwrap();
    let mut o2 = PushOptions::default();
    o2.after = vec![Dependency::on_result(Selector::Id(r.id))];
    let leaf = b.queue.add(&job(3), &o2).await.unwrap();
    let db = b.db();
    // `r` and `leaf` have not run: `a`, whose result they read, stays.
    assert_eq!(db.prune_count(&only(true, true, true)).await.unwrap(), 0);
    assert_eq!(
        db.prune(&only(true, true, true)).await.unwrap().instances,
        0
    );
    assert!(!gone(b, a.id).await);
    run(b, r.id, &ended(2, true)).await;
    run(b, leaf.id, &ended(3, true)).await;
    let c = db.prune(&only(true, true, true)).await.unwrap();
    assert_eq!((c.instances, c.batches), (3, 1), "{c:?}");
    for id in [a.id, r.id, leaf.id] {
        assert!(gone(b, id).await);
    }
    assert_eq!(db.batches().count().await, 0, "the empty batch went too");
}

pub async fn prune_removes_the_cache_entries_and_inline_outputs_only_it_referenced(b: &Backend) {
    let db = b.db();
    let cached = {
        let mut o = PushOptions::default();
        o.cached = true;
        o
    };
    // Two jobs with the same small output (kept inline once), one of them cached.
    let first = db.add(&b"echo same"[..], &cached).await.unwrap();
    // Another job with the same output, which fails: pruning results keeps it.
    let second = db
        .add(&b"echo same; exit 1"[..], &PushOptions::default())
        .await
        .unwrap();
    let worker_opts = || {
        let mut o = WorkerOptions::default();
        o.until_empty = true;
        o
    };
    db.worker(Arc::new(ShellRunner::default()), worker_opts())
        .run(None)
        .await
        .unwrap();
    let out = b.queue.instance(first.id).await.unwrap();
    let hash = out
        .last_attempt()
        .and_then(|a| a.report.stdout)
        .unwrap()
        .hash;
    assert!(db.get(&hash).await.is_ok());
    // The cache serves a new cached push of the first job at once.
    let spec = CacheSpec::new(ShellRunner::default().spec(), None);
    let hit = db.add(&b"echo same"[..], &cached).await.unwrap();
    let mut creq = req("w", 4, LONG);
    creq.cache = Some(spec.clone());
    let c = b.queue.claim(&creq).await.unwrap();
    assert!(
        c.iter()
            .any(|c| c.token.id == hit.id && c.cache_hit.is_some())
    );
    let c = db.prune(&only(true, false, false)).await.unwrap();
    assert_eq!((c.instances, c.cache_entries), (2, 1), "{c:?}");
    assert!(
        db.get(&hash).await.is_ok(),
        "the failed attempt still names it"
    );
    let c = db.prune(&only(false, true, false)).await.unwrap();
    assert_eq!(c.instances, 1, "{c:?}");
    assert!(gone(b, second.id).await);
    assert!(
        c.inline_outputs >= 1,
        "the shared output went with its last attempt"
    );
    assert!(matches!(db.get(&hash).await, Err(Error::BlobNotFound(_))));
    // The cache entry went with its instance: a new cached push runs again.
    let again = db.add(&b"echo same"[..], &cached).await.unwrap();
    let c = b.queue.claim(&creq).await.unwrap();
    let mine = c.iter().find(|c| c.token.id == again.id).expect("claimed");
    assert!(mine.cache_hit.is_none(), "no entry left to serve it");
}

/// The result cache keeps the first good result of a key: later results of the same
/// payload leave the entry alone (filling it takes no lock that finishes of one payload
/// would queue for), and once a prune removes the result it names, the next good
/// result fills it again.
pub async fn the_first_good_result_of_a_payload_stays_cached_until_pruned(b: &Backend) {
    let spec = CacheSpec::new("shell:sh", None);
    let none = Default::default();
    let key = batchdb::queue::cache_key(&job(1).hash, &spec.runner, None, None, &none);
    let good = |n: u64| {
        let Outcome::Success(mut r) = ended(n, true) else {
            unreachable!()
        };
        r.cache_key = Some(key);
        Outcome::Success(r)
    };
    let cached = {
        let mut o = PushOptions::default();
        o.cached = true;
        o
    };
    let mut creq = req("w", 10, LONG);
    creq.cache = Some(spec);
    let served = async |b: &Backend| {
        let hit = b.queue.add(&job(1), &cached).await.unwrap();
        let c = b.queue.claim(&creq).await.unwrap();
        let mine = c.iter().find(|c| c.token.id == hit.id).expect("claimed");
        mine.cache_hit.as_ref().and_then(|h| h.stdout)
    };
    for n in [1, 2] {
        let i = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
        run(b, i.id, &good(n)).await;
    }
    assert_eq!(served(b).await, Some(job(1001)), "the first result stays");
    let c = b
        .queue
        .prune_count(&only(true, false, false))
        .await
        .unwrap();
    assert_eq!(c, 3);
    b.db().prune(&only(true, false, false)).await.unwrap();
    assert_eq!(served(b).await, None, "its entry went with it");
    let i = b.queue.add(&job(1), &PushOptions::default()).await.unwrap();
    run(b, i.id, &good(3)).await;
    assert_eq!(served(b).await, Some(job(1003)), "filled again");
}
