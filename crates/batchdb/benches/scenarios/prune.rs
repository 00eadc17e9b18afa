//! Retention: `prune` of many instances that ended long ago, and what a worker's
//! claim + finish costs while it runs, beside the same claims without a prune.

use batchdb::queue::PruneRequest;

use super::*;

/// The rows of `n` instances that ended long ago, each with its job, one attempt and
/// four events (create, push, start, result), in SQL both dialects run; `$HEX(x)`
/// is the dialect's 64-digit hex of `x`, `$SERIES` its 1..n row source.
const ENDED: [&str; 4] = [
    "INSERT INTO jobs(key, size, created) SELECT $HEX(i), 8, i FROM $SERIES",
    "INSERT INTO instances(job, created, state, priority, run_at, cached, attempts, ended)
     SELECT $HEX(i), i, 'result', 0, 0, $FALSE, 1, i + 1 FROM $SERIES",
    "INSERT INTO attempts(instance, attempt, worker, start, \"end\", outcome, exit_code, stdout, stdout_size)
     SELECT i, 1, 'w', i, i + 1, 'result', 0, $HEX(i + 100000000), 8 FROM $SERIES",
    "INSERT INTO events(id, time, kind, job, created, instance)
     SELECT (i - 1) * 4 + k.n, i, k.kind, $HEX(i), CASE WHEN k.n = 1 THEN NULL ELSE i END,
            CASE WHEN k.n = 1 THEN NULL ELSE i END
     FROM $SERIES, (SELECT 1 AS n, 'create' AS kind UNION ALL SELECT 2, 'push'
                    UNION ALL SELECT 3, 'start' UNION ALL SELECT 4, 'result') AS k",
];

/// Fills the fresh SQLite queue at `path` with `n` ended instances.
pub fn fill_ended_sqlite(path: &Path, n: usize) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    for sql in ENDED {
        let sql = sql
            .replace("$HEX(i + 100000000)", "printf('%064x', i + 100000000)")
            .replace("$HEX(i)", "printf('%064x', i)")
            .replace("$FALSE", "0")
            .replace("$SERIES", "s");
        let sql = format!(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) {sql}"
        );
        conn.execute_batch(&sql).unwrap();
    }
    conn.execute_batch("COMMIT").unwrap();
}

/// Fills the fresh PostgreSQL database `db` of `pg` with `n` ended instances.
pub fn fill_ended_postgres(pg: &batchdb_testkit::postgres::Postgres, db: &str, n: usize) {
    for sql in ENDED {
        let sql = sql
            .replace(
                "$HEX(i + 100000000)",
                "lpad(to_hex(i + 100000000), 64, '0')",
            )
            .replace("$HEX(i)", "lpad(to_hex(i), 64, '0')")
            .replace("$FALSE", "FALSE")
            .replace("$SERIES", &format!("generate_series(1, {n}) AS i"));
        pg.sql(db, &format!("SET search_path TO batchdb; {sql}"));
    }
    // Event ids and push times are handed out from counters on PostgreSQL.
    pg.sql(
        db,
        &format!(
            "UPDATE batchdb.counters SET value = {} WHERE name = 'event';
             UPDATE batchdb.counters SET value = {n} WHERE name = 'created'; ANALYZE",
            4 * n
        ),
    );
}

/// Claim + finish latencies (seconds) on `q` until `stop` is set or `ops` are done.
async fn claims(
    q: Arc<dyn Queue>,
    ops: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<f64> {
    let req = ClaimRequest::new("bench", 1, Duration::from_secs(60));
    let mut lat = Vec::new();
    while lat.len() < ops && !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let t = Instant::now();
        let c = q.claim(&req).await.unwrap();
        let Some(c) = c.first() else { break };
        q.finish(&c.token, &batches::success()).await.unwrap();
        lat.push(t.elapsed().as_secs_f64());
    }
    lat
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
        * 1000.0
}

/// Prunes the `n` ended instances `db` holds (beside 100,000 pending ones), with a
/// worker claiming and finishing throughout; against the same claims before it.
pub async fn prune_under_claims(db: BatchDb, q: Arc<dyn Queue>, n: usize, what: &str) -> Row {
    let payloads: Vec<Vec<u8>> = (0..100_000)
        .map(|i| format!("echo p{i}").into_bytes())
        .collect();
    db.add_many(payloads, &PushOptions::default())
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut alone = claims(q.clone(), 2000, stop.clone()).await;
    reset_peak();
    let t = Instant::now();
    let claimer = tokio::spawn(claims(q.clone(), usize::MAX, stop.clone()));
    // Everything that ended before now.
    let counts = db
        .prune(&PruneRequest::older_than(Duration::ZERO))
        .await
        .unwrap();
    let took = t.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut during = claimer.await.unwrap();
    assert!(counts.instances >= n as u64, "{counts:?}");
    let (d50, d99) = (pct(&mut during, 0.5), pct(&mut during, 0.99));
    let (a50, a99) = (pct(&mut alone, 0.5), pct(&mut alone, 0.99));
    Row {
        scenario: format!("prune {n} ended instances ({what}), a worker claiming throughout"),
        ours: format!(
            "{took:.1} s ({:.0}k instances/s, {} events); claim + finish during it p50 {d50:.2} ms, p99 {d99:.2} ms ({} claims)",
            counts.instances as f64 / took / 1000.0,
            counts.events,
            during.len()
        ),
        base: format!("claim + finish alone p50 {a50:.2} ms, p99 {a99:.2} ms"),
        // Lower is better: how much a claim's p99 grows while the prune runs.
        ratio: d99 / a99,
        rss_mib: peak_mib(),
    }
}

/// The SQLite row.
pub async fn prune_sqlite(n: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    fill_ended_sqlite(&dir.path().join("q.sqlite"), n);
    let q: Arc<dyn Queue> = Arc::new(
        SqliteQueue::open(dir.path().join("q.sqlite"))
            .await
            .unwrap(),
    );
    prune_under_claims(db, q, n, "SQLite, durable").await
}

/// The PostgreSQL row (fsync on), on the bench's cluster.
pub async fn prune_postgres(
    pg: &batchdb_testkit::postgres::Postgres,
    g: &batchdb_testkit::garage::Garage,
    n: usize,
) -> Row {
    let (url, db) = open_distributed(pg, g).await;
    let name = url.rsplit('/').next().unwrap().to_string();
    fill_ended_postgres(pg, &name, n);
    let q: Arc<dyn Queue> = Arc::new(batchdb::queue::PgQueue::open(&url).await.unwrap());
    prune_under_claims(db, q, n, "PostgreSQL").await
}
