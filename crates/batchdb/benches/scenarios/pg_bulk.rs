//! A bulk add on PostgreSQL + S3, against the same rows written straight into the
//! same tables.

use std::time::Instant;

use batchdb::Hash;
use tokio_postgres::types::ToSql;

use super::{Row, open_distributed, timed_add_many};

/// Library `add_many` of `n` distinct small payloads (durable on return) on a fresh
/// PostgreSQL + S3 database, against the same number of job and instance rows
/// inserted into the same tables by one client in one transaction, every statement
/// prepared and pipelined (a thousand sent before the first answer is read).
pub async fn bulk_postgres(
    pg: &batchdb_testkit::postgres::Postgres,
    g: &batchdb_testkit::garage::Garage,
    n: usize,
    reps: usize,
) -> Row {
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for r in 0..reps {
        let (url, db) = open_distributed(pg, g).await;
        ours.push(timed_add_many(&db, r, n).await);
        base.push(raw_bulk(&url, r, n).await);
    }
    Row::rates(
        format!("PostgreSQL + S3: enqueue bulk ({n} payloads, one add_many, durable)"),
        (ours, base),
        1.0,
        "jobs/s",
        "raw PostgreSQL, 1 txn, pipelined",
    )
}

/// Rows per second of `n` job and instance rows written by one client in one
/// transaction (see [`bulk_postgres`]).
async fn raw_bulk(url: &str, r: usize, n: usize) -> f64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows: Vec<(String, i64, Vec<u8>, i64)> = (0..n)
        .map(|i| {
            let payload = format!("echo raw {r} {i}").into_bytes();
            let len = i64::try_from(payload.len()).unwrap();
            let created = i64::try_from(i).unwrap() + 1;
            (Hash::of(&payload).to_hex(), len, payload, created)
        })
        .collect();
    let t = Instant::now();
    client.batch_execute("BEGIN").await.unwrap();
    let job = client
        .prepare("INSERT INTO batchdb.jobs(key, size, created, payload) VALUES ($1, $2, 0, $3)")
        .await
        .unwrap();
    let inst = client
        .prepare(
            "INSERT INTO batchdb.instances(job, created, state, priority, run_at, cached)
             VALUES ($1, $2, 'pending', 0, 0, false)",
        )
        .await
        .unwrap();
    let params: Vec<[Vec<&(dyn ToSql + Sync)>; 2]> = rows
        .iter()
        .map(|(key, len, payload, created)| {
            let job: Vec<&(dyn ToSql + Sync)> = vec![key, len, payload];
            let inst: Vec<&(dyn ToSql + Sync)> = vec![key, created];
            [job, inst]
        })
        .collect();
    // As many statements in flight at once as batchdb's pipelines hold.
    for window in params.chunks(512) {
        let runs = window
            .iter()
            .flat_map(|[j, i]| [client.execute(&job, j), client.execute(&inst, i)]);
        futures_util::future::try_join_all(runs).await.unwrap();
    }
    client.batch_execute("COMMIT").await.unwrap();
    n as f64 / t.elapsed().as_secs_f64()
}
