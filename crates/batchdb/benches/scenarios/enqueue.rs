//! One-at-a-time enqueue: the library's durable `add` against the same rows inserted
//! straight into SQLite, and the same raw inserts into batchdb's own schema, which
//! shows how much of the gap the schema's rows and index entries alone account for.

use super::*;

/// The baseline database of the enqueue scenarios: the same job and instance rows,
/// WAL, `synchronous=FULL`, no indexes but the key's.
pub fn raw_sqlite(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("raw.sqlite")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE jobs(id INTEGER PRIMARY KEY, key TEXT UNIQUE, size INTEGER, created INTEGER, payload BLOB);
         CREATE TABLE instances(id INTEGER PRIMARY KEY, job TEXT, created INTEGER, state TEXT);",
    )
    .unwrap();
    conn
}

/// The rows one `add` writes into batchdb's schema (job, pending instance, `create`
/// and `push` events), as plain SQL with no library in between.
const SCHEMA_ADD: [&str; 4] = [
    "INSERT INTO jobs(key, size, created, payload) VALUES (?1, ?2, ?3, ?4)",
    "INSERT INTO instances(job, created, state, priority, run_at, cached)
     VALUES (?1, ?2, 'pending', 0, ?2, 0)",
    "INSERT INTO events(time, kind, job, data) VALUES (?2, 'create', ?1, ?3)",
    "INSERT INTO events(time, kind, job, created, instance) VALUES (?2, 'push', ?1, ?2, ?3)",
];

/// A connection to a fresh batchdb SQLite schema under `dir` (migrated by the library,
/// which is then closed), WAL and `synchronous=FULL` as the library runs it.
async fn schema_sqlite(dir: &Path) -> rusqlite::Connection {
    let path = dir.join("schema.sqlite");
    drop(SqliteQueue::open(&path).await.expect("migrate schema"));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")
        .unwrap();
    conn
}

/// Inserts `n` jobs (round `r`) into `conn`, one transaction each: the baseline's two
/// rows, or with `schema` the four rows of [`SCHEMA_ADD`]. Returns jobs per second.
fn raw_adds(conn: &rusqlite::Connection, r: usize, n: usize, schema: bool) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let payload = format!("raw {r} {i}");
        let key = Hash::of(payload.as_bytes()).to_hex();
        let created = i64::try_from(r * n + i).unwrap() + 1;
        conn.execute_batch("BEGIN").unwrap();
        if schema {
            let size = i64::try_from(payload.len()).unwrap();
            conn.execute(SCHEMA_ADD[0], (&key, size, created, payload.as_bytes()))
                .unwrap();
            conn.execute(SCHEMA_ADD[1], (&key, created)).unwrap();
            let data = format!("{{\"size\":{size}}}");
            conn.execute(SCHEMA_ADD[2], (&key, created, &data)).unwrap();
            let instance = conn.last_insert_rowid();
            conn.execute(SCHEMA_ADD[3], (&key, created, instance))
                .unwrap();
        } else {
            conn.execute(
                "INSERT INTO jobs(key, size, created, payload) VALUES (?1, 10, 0, ?2)",
                (&key, payload.as_bytes()),
            )
            .unwrap();
            conn.execute(
                "INSERT INTO instances(job, created, state) VALUES (?1, 0, 'pending')",
                [&key],
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Library `add` of `n` distinct small payloads, each durable on return, against the
/// same rows inserted straight into SQLite one transaction each (synchronous=FULL);
/// then the raw inserts into batchdb's schema against the same baseline. The order of
/// the three alternates across rounds.
pub async fn enqueue_one(n: usize, reps: usize) -> Vec<Row> {
    let (mut ours, mut base, mut schema) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).await;
        let raw = raw_sqlite(dir.path());
        let full = schema_sqlite(dir.path()).await;
        reset_peak();
        if r % 2 == 1 {
            base.push(raw_adds(&raw, r, n, false));
            schema.push(raw_adds(&full, r, n, true));
        }
        let t = Instant::now();
        for i in 0..n {
            db.add(format!("echo {r} {i}").as_bytes(), &PushOptions::default())
                .await
                .unwrap();
        }
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        if r % 2 == 0 {
            schema.push(raw_adds(&full, r, n, true));
            base.push(raw_adds(&raw, r, n, false));
        }
    }
    vec![
        Row::rates(
            format!("enqueue one at a time ({n} adds, durable)"),
            (ours, base.clone()),
            1.0,
            "jobs/s",
            "raw SQLite, 1 txn each",
        ),
        Row::rates(
            format!("  raw SQL into batchdb's schema ({n} adds, no library)"),
            (schema, base),
            1.0,
            "jobs/s",
            "raw SQLite, 1 txn each",
        ),
    ]
}
