//! Claims that respect what instances need and what workers have: counted resources
//! (named units and amounts), the reservation that keeps a large instance from
//! starving, concurrency keys under racing claimers, and the live-worker registry
//! that says what nothing could run.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use batchdb::queue::{
    AttemptReport, Claim, ClaimRequest, Concurrency, Needs, Outcome, PushOptions, Resource,
    Resources,
};

use crate::Backend;
use crate::util::{job, opts, req};

const LONG: Duration = Duration::from_secs(600);

fn needing(specs: &[&str]) -> PushOptions {
    let mut o = opts();
    let mut n = Needs::default();
    for s in specs {
        n.add(s).unwrap();
    }
    o.needs = n;
    o
}

fn resources(specs: &[&str]) -> Resources {
    let mut r = Resources::default();
    for s in specs {
        r.add(s).unwrap();
    }
    r
}

/// A claim by `worker` for up to `limit`, with `total` resources of which `free` are
/// free now.
fn with(worker: &str, limit: usize, total: &Resources, free: &Resources) -> ClaimRequest {
    let mut r = req(worker, limit, LONG);
    r.resources = total.clone();
    r.free = free.clone();
    r
}

fn ok() -> Outcome {
    Outcome::Success(AttemptReport::default())
}

fn units(c: &Claim, name: &str) -> Vec<String> {
    match c.assigned.0.get(name) {
        Some(Resource::Units(u)) => u.clone(),
        other => panic!("no units of {name}: {other:?}"),
    }
}

pub async fn needs_aware_claims_land_only_where_they_fit(b: &Backend) {
    let q = &b.queue;
    let gpu1 = q.add(&job(1), &needing(&["gpu=1"])).await.unwrap().id;
    let gpu1b = q.add(&job(2), &needing(&["gpu=1"])).await.unwrap().id;
    let gpu2 = q.add(&job(3), &needing(&["gpu=2"])).await.unwrap().id;
    let mem = q.add(&job(4), &needing(&["mem=4G"])).await.unwrap().id;
    let plain = q.add(&job(5), &opts()).await.unwrap().id;
    let fpga = q.add(&job(6), &needing(&["fpga=1"])).await.unwrap().id;
    // A worker with memory and no GPU: the plain job and the one needing memory.
    let cpu_box = resources(&["mem=8G"]);
    let got = q.claim(&with("cpu", 10, &cpu_box, &cpu_box)).await.unwrap();
    let mut ids: Vec<i64> = got.iter().map(|c| c.token.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [mem, plain]);
    let m = got.iter().find(|c| c.token.id == mem).unwrap();
    assert_eq!(m.assigned.0["mem"], Resource::Quantity(4 << 30));
    // A two-GPU worker: both one-GPU jobs, on different units; the two-GPU job does
    // not fit what is left, and nothing takes the FPGA job.
    let gpu_box = resources(&["gpu=0,1"]);
    let got = q.claim(&with("gpu", 10, &gpu_box, &gpu_box)).await.unwrap();
    let mut ids: Vec<i64> = got.iter().map(|c| c.token.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [gpu1, gpu1b]);
    let mut given: Vec<String> = got.iter().flat_map(|c| units(c, "gpu")).collect();
    given.sort();
    assert_eq!(given, ["0", "1"]);
    for c in &got {
        q.finish(&c.token, &ok()).await.unwrap();
    }
    let got = q.claim(&with("gpu", 10, &gpu_box, &gpu_box)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].token.id, gpu2);
    assert_eq!(units(&got[0], "gpu"), ["0", "1"]);
    // A worker without resources never claims what needs some.
    assert!(q.claim(&req("bare", 10, LONG)).await.unwrap().is_empty());
    let detail = q.instance(fpga).await.unwrap();
    assert_eq!(detail.needs.to_string(), "fpga=1");
}

pub async fn a_starving_instance_reserves_units_until_it_fits(b: &Backend) {
    let q = &b.queue;
    let total = resources(&["gpu=0,1"]);
    let big = q.add(&job(1), &needing(&["gpu=2"])).await.unwrap().id;
    for n in 2..6 {
        q.add(&job(n), &needing(&["gpu=1"])).await.unwrap();
    }
    let mut first = with("w", 1, &total, &total);
    first.order = batchdb::queue::Order::Newest;
    first.reserve_after = Duration::from_millis(300);
    // Not waiting long yet: a small one backfills and takes a unit.
    let small = q.claim(&first).await.unwrap();
    assert_eq!(small.len(), 1);
    assert_ne!(small[0].token.id, big);
    let mut left = total.clone();
    left.remove(&small[0].assigned);
    let mut before = first.clone();
    before.limit = 4;
    before.free = left.clone();
    let backfill = q.claim(&before).await.unwrap();
    assert_eq!(backfill.len(), 1, "backfill before the big one starves");
    q.finish(&backfill[0].token, &ok()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Now it has waited: the free unit is kept for it, no small one takes it.
    assert!(q.claim(&before).await.unwrap().is_empty(), "reserved");
    q.finish(&small[0].token, &ok()).await.unwrap();
    let mut all_free = before;
    all_free.free = total.clone();
    let got = q.claim(&all_free).await.unwrap();
    assert_eq!(got[0].token.id, big, "the starving one runs first");
    assert_eq!(units(&got[0], "gpu"), ["0", "1"]);
    assert_eq!(got.len(), 1, "nothing left for the small ones");
}

pub async fn concurrency_keys_never_run_more_than_their_limit_under_racing_claims(b: &Backend) {
    const LIMIT: i64 = 3;
    for n in 0..48 {
        let mut o = opts();
        o.concurrency = Some(Concurrency::parse(&format!("api={LIMIT}")).unwrap());
        b.queue.add(&job(n), &o).await.unwrap();
    }
    b.queue.add(&job(100), &opts()).await.unwrap();
    let running = Arc::new(AtomicI64::new(0));
    let most = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for w in 0..6 {
        let q = (b.reopen)().await;
        let (running, most) = (running.clone(), most.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let mut idle = 0;
            while idle < 20 {
                let got = q.claim(&req(&format!("w{w}"), 2, LONG)).await.unwrap();
                if got.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                idle = 0;
                let keyed = got.iter().filter(|c| c.job != job(100).hash).count();
                let keyed = i64::try_from(keyed).unwrap();
                let now = running.fetch_add(keyed, Ordering::SeqCst) + keyed;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(25)).await;
                // Counted down before the finish commits: the count never runs ahead
                // of the database's.
                running.fetch_sub(keyed, Ordering::SeqCst);
                for c in got {
                    q.finish(&c.token, &ok()).await.unwrap();
                    done += 1;
                }
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    assert_eq!(done, 49, "every instance ran once");
    let most = most.load(Ordering::SeqCst);
    assert!(most <= LIMIT, "{most} ran at once with a limit of {LIMIT}");
    assert_eq!(most, LIMIT, "the limit is reached, not just kept");
}

/// Instances a claim passes over (here: their concurrency key is full) leave their
/// priority to the next one down, in either order; oldest first reads one priority
/// at a time, so this crosses its windows, a window that ends exactly at a priority's
/// last row, and priorities with nothing left that can run.
pub async fn passed_over_instances_leave_their_priority_to_the_next_in_either_order(b: &Backend) {
    let add = |n: u64, priority: i64, key: bool| {
        let mut o = opts();
        o.priority = priority;
        if key {
            o.concurrency = Some(Concurrency::parse("api=1").unwrap());
        }
        let q = b.queue.clone();
        async move { q.add(&job(n), &o).await.unwrap().id }
    };
    let h: Vec<i64> = vec![
        add(0, 5, true).await,
        add(1, 5, true).await,
        add(2, 5, true).await,
    ];
    let m = [add(3, 0, false).await, add(4, 0, false).await];
    let l = [add(5, -3, false).await, add(6, -3, false).await];
    let ids = |got: Vec<Claim>| got.iter().map(|c| c.token.id).collect::<Vec<_>>();
    let got = ids(b.queue.claim(&req("w", 4, LONG)).await.unwrap());
    assert_eq!(got, [h[0], m[0], m[1], l[0]], "oldest first, by priority");
    // A first window of exactly the two keyed ones left, both passed over.
    let got = ids(b.queue.claim(&req("w", 2, LONG)).await.unwrap());
    assert_eq!(got, [l[1]], "past a full priority to the last one");
    let (n_hi, n_lo) = (add(7, 5, false).await, add(8, -3, false).await);
    let mut newest = req("w", 3, LONG);
    newest.order = batchdb::queue::Order::Newest;
    let got = ids(b.queue.claim(&newest).await.unwrap());
    assert_eq!(got, [n_hi, n_lo], "newest first, by priority");
    assert!(b.queue.claim(&req("w", 4, LONG)).await.unwrap().is_empty());
}

pub async fn one_claim_of_several_counts_its_own_starts_against_a_keys_limit(b: &Backend) {
    for n in 0..3 {
        let mut o = opts();
        o.concurrency = Some(Concurrency::parse("one=1").unwrap());
        b.queue.add(&job(n), &o).await.unwrap();
    }
    b.queue.add(&job(100), &opts()).await.unwrap();
    let got = b.queue.claim(&req("w", 4, LONG)).await.unwrap();
    let keyed = got.iter().filter(|c| c.job != job(100).hash).count();
    assert_eq!((got.len(), keyed), (2, 1), "{got:?}");
    assert_eq!(b.queue.counts().await.unwrap().running, 2);
}

pub async fn a_lost_workers_concurrency_slot_passes_to_the_takeover(b: &Backend) {
    let q = &b.queue;
    let mut o = opts();
    o.concurrency = Some(Concurrency::parse("db=1").unwrap());
    let first = q.add(&job(1), &o).await.unwrap().id;
    let second = q.add(&job(2), &o).await.unwrap().id;
    let dead = q
        .claim(&req("dead", 2, Duration::from_millis(100)))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "one slot");
    assert_eq!(dead[0].token.id, first);
    assert!(q.claim(&req("other", 2, LONG)).await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The dead worker's attempt is taken over: its slot goes with it, the other
    // instance still waits.
    let taken = q.claim(&req("other", 2, LONG)).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(taken[0].takeover);
    assert_eq!(taken[0].token.id, first);
    q.finish(&taken[0].token, &ok()).await.unwrap();
    let next = q.claim(&req("other", 2, LONG)).await.unwrap();
    assert_eq!(next[0].token.id, second, "the slot is free again");
}

pub async fn unrunnable_counts_what_no_live_worker_has(b: &Backend) {
    let q = &b.queue;
    q.add(&job(1), &needing(&["gpu=4"])).await.unwrap();
    q.add(&job(2), &needing(&["gpu=1"])).await.unwrap();
    q.add(&job(3), &opts()).await.unwrap();
    assert_eq!(q.unrunnable(None).await.unwrap(), 2, "no worker is live");
    q.worker_seen("a", &resources(&["gpu=0,1"]), LONG)
        .await
        .unwrap();
    assert_eq!(q.unrunnable(None).await.unwrap(), 1);
    q.worker_seen("b", &resources(&["gpu=0,1,2,3"]), Duration::ZERO)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        q.unrunnable(None).await.unwrap(),
        1,
        "a lapsed entry has nothing"
    );
    q.worker_seen("b", &resources(&["gpu=0,1,2,3"]), LONG)
        .await
        .unwrap();
    assert_eq!(q.unrunnable(None).await.unwrap(), 0);
    let small = resources(&["gpu=0"]);
    assert_eq!(
        q.unrunnable(Some(&small)).await.unwrap(),
        1,
        "for one worker"
    );
    q.worker_gone("b").await.unwrap();
    q.worker_gone("a").await.unwrap();
    assert_eq!(q.unrunnable(None).await.unwrap(), 2);
}
