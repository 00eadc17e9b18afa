//! The batch scenarios: a fan-out in bulk against the same bulk add without a batch,
//! a fan-in's release, claims beside 100,000 waiting instances, and `wait`.

use batchdb::queue::{Dependency, Selector};

use super::*;

fn in_batch(name: &str) -> PushOptions {
    let mut o = PushOptions::default();
    o.batch = Some(name.into());
    o
}

/// A successful attempt's outcome, ended now.
pub fn success() -> Outcome {
    let mut r = AttemptReport::default();
    r.end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Outcome::Success(r)
}

/// `map` in the library: `n` payloads added in bulk into one batch, against the same
/// bulk add without a batch (alternating which goes first).
pub async fn fan_out(n: usize, reps: usize) -> Row {
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for r in 0..reps * 2 {
        for batch in if r % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let dir = tempfile::tempdir().unwrap();
            let db = open(dir.path()).await;
            let payloads: Vec<Vec<u8>> = (0..n)
                .map(|i| format!("echo {r} {i}").into_bytes())
                .collect();
            let opts = if batch {
                in_batch("m")
            } else {
                PushOptions::default()
            };
            reset_peak();
            let t = Instant::now();
            db.add_many(payloads, &opts).await.unwrap();
            let rate = n as f64 / t.elapsed().as_secs_f64();
            if batch {
                ours.push(rate)
            } else {
                base.push(rate)
            }
        }
    }
    Row::rates(
        format!("map fan-out: {n} jobs into one batch (durable)"),
        (ours, base),
        1.0,
        "jobs/s",
        "the same bulk add, no batch",
    )
}

/// A fan-in of `n` → 1: from the call that records the `n`-th dependency's result to
/// a claim that returns the dependent, against the same finish + claim of instances
/// without dependencies.
pub async fn fan_in(n: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    let q = db.queue().clone();
    let maps: Vec<Vec<u8>> = (0..n).map(|i| format!("map {i}").into_bytes()).collect();
    db.add_many(maps, &in_batch("maps")).await.unwrap();
    let mut o = PushOptions::default();
    o.after = vec![Dependency::on_result(Selector::Batch("maps".into()))];
    let reduce = db.add(&b"reduce"[..], &o).await.unwrap();
    let req = ClaimRequest::new("bench", 256, Duration::from_secs(60));
    let mut left = n;
    reset_peak();
    while left > 1 {
        for c in q.claim(&req).await.unwrap() {
            if left > 1 {
                q.finish(&c.token, &success()).await.unwrap();
                left -= 1;
            } else {
                q.finish(&c.token, &Outcome::Released(AttemptReport::default()))
                    .await
                    .unwrap();
            }
        }
    }
    let one = ClaimRequest::new("bench", 1, Duration::from_secs(60));
    let last = q.claim(&one).await.unwrap();
    let t = Instant::now();
    q.finish(&last[0].token, &success()).await.unwrap();
    let got = q.claim(&one).await.unwrap();
    let ours = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(got[0].token.id, reduce.id, "released");
    // Baseline: the same two calls on instances without dependencies.
    db.add(&b"a"[..], &PushOptions::default()).await.unwrap();
    db.add(&b"b"[..], &PushOptions::default()).await.unwrap();
    let a = q.claim(&one).await.unwrap();
    let t = Instant::now();
    q.finish(&a[0].token, &success()).await.unwrap();
    let b = q.claim(&one).await.unwrap();
    let base = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(b.len(), 1);
    Row {
        scenario: format!("fan-in {n} → 1: last result recorded → dependent claimed"),
        ours: format!("{ours:.2} ms"),
        base: format!("{base:.2} ms (finish + claim, no dependencies; target < 50 ms)"),
        ratio: ours / base,
        rss_mib: peak_mib(),
    }
}

/// Adds `n` waiting instances straight through SQL (fast set-up).
pub fn fill_waiting(path: &Path, n: usize) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    {
        let mut inst = conn
            .prepare(
                "INSERT INTO instances(job, created, state, priority, run_at, cached, deps, waiting_on)
                 VALUES (?1, ?2, 'waiting', 0, 0, 0, 1, 1)",
            )
            .unwrap();
        let key = Hash::of(b"waiting").to_hex();
        for i in 0..n {
            inst.execute(rusqlite::params![key, 1_000_000_000 + i as i64])
                .unwrap();
        }
    }
    conn.execute_batch("COMMIT").unwrap();
}

/// Claim + finish beside `waiting` waiting instances, against none (alternating).
pub async fn claim_beside_waiting(waiting: usize, ops: usize, reps: usize) -> Row {
    reset_peak();
    let (mut ours, mut base) = (Vec::new(), Vec::new());
    for r in 0..reps * 2 {
        if r % 2 == 0 {
            ours.push(claim_finish_cost(1000, waiting, ops).await);
            base.push(claim_finish_cost(1000, 0, ops).await);
        } else {
            base.push(claim_finish_cost(1000, 0, ops).await);
            ours.push(claim_finish_cost(1000, waiting, ops).await);
        }
    }
    let (o, b) = (median(ours), median(base));
    Row {
        scenario: format!("claim + finish beside {waiting} waiting instances"),
        ours: format!("{:.3} ms", o * 1000.0),
        base: format!("{:.3} ms (none waiting; target ratio ≤ 1.2)", b * 1000.0),
        ratio: o / b,
        rss_mib: peak_mib(),
    }
}

/// `wait` on one instance, in another handle (as another process): from the return
/// of the finish that ends it to the return of the wait, median of `n`.
pub async fn wait_latency(n: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    let other = BatchDb::new(
        Arc::new(
            SqliteQueue::open(dir.path().join("q.sqlite"))
                .await
                .unwrap(),
        ),
        db.blobs().clone(),
    );
    reset_peak();
    let mut lat = Vec::new();
    let one = ClaimRequest::new("bench", 1, Duration::from_secs(60));
    for i in 0..n {
        let inst = db
            .add(format!("w {i}").as_bytes(), &PushOptions::default())
            .await
            .unwrap();
        let waiter = BatchDb::new(other.queue().clone(), other.blobs().clone());
        let task = tokio::spawn(async move {
            let out = waiter
                .wait(&[Selector::Id(inst.id)], None, |_| {})
                .await
                .unwrap();
            assert!(out.failures.is_empty());
            Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let c = db.queue().claim(&one).await.unwrap();
        db.queue().finish(&c[0].token, &success()).await.unwrap();
        let done = Instant::now();
        let returned = task.await.unwrap();
        lat.push(returned.saturating_duration_since(done).as_secs_f64() * 1000.0);
    }
    let m = median(lat);
    Row {
        scenario: format!("wait in another handle: last result → wait returns ({n} samples)"),
        ours: format!("{m:.1} ms median"),
        base: "target < 50 ms".into(),
        ratio: m / 50.0,
        rss_mib: peak_mib(),
    }
}
