//! Needs-aware claims: claim + finish with 100,000 pending instances of mixed needs,
//! by a worker with resources, against plain claims of as many plain instances.

use batchdb::queue::Resources;

use super::*;

/// Fills `n` pending instances: a quarter need nothing, a quarter `gpu=1`, a quarter
/// `mem=2G`, a quarter `gpu=2,mem=4G` (all due now: none has waited long enough to
/// reserve).
fn fill_mixed(path: &Path, n: usize) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    {
        let mut job = conn
            .prepare("INSERT INTO jobs(key, size, created) VALUES (?1, 8, ?2)")
            .unwrap();
        let mut inst = conn
            .prepare(
                "INSERT INTO instances(job, created, state, priority, run_at, cached, needs)
                 VALUES (?1, ?2, 'pending', 0, ?3, 0, ?4)",
            )
            .unwrap();
        let needs = [
            None,
            Some("gpu=1"),
            Some("mem=2147483648"),
            Some("gpu=2,mem=4294967296"),
        ];
        for i in 0..n {
            let key = Hash::of(format!("fill {i}").as_bytes()).to_hex();
            job.execute(rusqlite::params![key, i as i64]).unwrap();
            inst.execute(rusqlite::params![key, i as i64 + 1, now, needs[i % 4]])
                .unwrap();
        }
    }
    conn.execute_batch("COMMIT").unwrap();
}

/// Mean time of one claim + finish by a worker with `total` resources of which
/// `free` are free, with `n` pending instances of mixed needs; with `total` empty,
/// of `n` plain instances by a plain worker (the baseline).
async fn cost(n: usize, (total, free): (&[&str], &[&str]), ops: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let q = SqliteQueue::open(&path).await.unwrap();
    if total.is_empty() {
        fill(&path, n);
    } else {
        fill_mixed(&path, n);
    }
    let res = |specs: &[&str]| {
        let mut r = Resources::default();
        for s in specs {
            r.add(s).unwrap();
        }
        r
    };
    let mut req = ClaimRequest::new("bench", 1, Duration::from_secs(60));
    req.order = Order::Newest;
    req.resources = res(total);
    req.free = res(free);
    let t = Instant::now();
    for _ in 0..ops {
        let c = q.claim(&req).await.unwrap();
        q.finish(&c[0].token, &batches::success()).await.unwrap();
    }
    t.elapsed().as_secs_f64() / ops as f64
}

/// Needs-aware claim + finish (all free, then the GPUs busy) against plain ones,
/// alternating which runs first.
pub async fn needs_aware_claims(n: usize, ops: usize, reps: usize) -> Vec<Row> {
    let total: &[&str] = &["gpu=0,1,2,3", "mem=64G"];
    let busy: &[&str] = &["mem=64G"];
    let mut rows = Vec::new();
    for (free, what) in [(total, "all free"), (busy, "its GPUs busy")] {
        reset_peak();
        let (mut ours, mut base) = (Vec::new(), Vec::new());
        for r in 0..reps * 2 {
            if r % 2 == 0 {
                ours.push(cost(n, (total, free), ops).await);
                base.push(cost(n, (&[], &[]), ops).await);
            } else {
                base.push(cost(n, (&[], &[]), ops).await);
                ours.push(cost(n, (total, free), ops).await);
            }
        }
        let (o, b) = (median(ours), median(base));
        rows.push(Row {
            scenario: format!(
                "needs-aware claim + finish, {n} pending of mixed needs, worker's resources {what}"
            ),
            ours: format!("{:.3} ms", o * 1000.0),
            base: format!(
                "{:.3} ms (plain claims, {n} plain pending; target ≤ 1.2)",
                b * 1000.0
            ),
            ratio: o / b,
            rss_mib: peak_mib(),
        });
    }
    rows
}
