//! Enqueue, one at a time and in bulk: the library's durable adds against the same
//! rows inserted straight into SQLite, and the same raw inserts into batchdb's own
//! schema, which shows how much of the gap its rows and index entries alone make.

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

/// The rows one `add` writes into batchdb's schema (the job, its pending instance,
/// the `create` and `push` events), as plain SQL with no library in between.
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

/// Inserts the rows of one `add` of `payload` at time `created` with `stmts` (the
/// statements of [`SCHEMA_ADD`], prepared on `conn`).
fn schema_add(
    conn: &rusqlite::Connection,
    stmts: &mut [rusqlite::CachedStatement<'_>],
    payload: &str,
    created: i64,
) {
    let key = Hash::of(payload.as_bytes()).to_hex();
    let size = i64::try_from(payload.len()).unwrap();
    stmts[0]
        .execute((&key, size, created, payload.as_bytes()))
        .unwrap();
    stmts[1].execute((&key, created)).unwrap();
    let instance = conn.last_insert_rowid();
    let data = format!("{{\"size\":{size}}}");
    stmts[2].execute((&key, created, &data)).unwrap();
    stmts[3].execute((&key, created, instance)).unwrap();
}

/// Inserts `n` jobs (round `r`) into `conn`, one transaction each: the baseline's two
/// rows, or with `schema` the four rows of [`SCHEMA_ADD`], each statement prepared
/// once (as the library's are). Returns jobs per second.
fn raw_adds(conn: &rusqlite::Connection, r: usize, n: usize, schema: bool) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let payload = format!("raw {r} {i}");
        conn.execute_batch("BEGIN").unwrap();
        if schema {
            let mut stmts = SCHEMA_ADD.map(|sql| conn.prepare_cached(sql).unwrap());
            schema_add(conn, &mut stmts, &payload, i64::try_from(i).unwrap() + 1);
        } else {
            let key = Hash::of(payload.as_bytes()).to_hex();
            conn.prepare_cached(
                "INSERT INTO jobs(key, size, created, payload) VALUES (?1, 10, 0, ?2)",
            )
            .unwrap()
            .execute((&key, payload.as_bytes()))
            .unwrap();
            conn.prepare_cached(
                "INSERT INTO instances(job, created, state) VALUES (?1, 0, 'pending')",
            )
            .unwrap()
            .execute([&key])
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

/// `n` jobs (round `r`) into `conn` in one transaction: the baseline's two rows each,
/// or with `schema` the four rows of [`SCHEMA_ADD`]. Returns jobs per second.
fn raw_bulk(conn: &mut rusqlite::Connection, r: usize, n: usize, schema: bool) -> f64 {
    let t = Instant::now();
    let tx = conn.transaction().unwrap();
    if schema {
        let mut stmts = SCHEMA_ADD.map(|sql| tx.prepare_cached(sql).unwrap());
        for i in 0..n {
            let payload = format!("echo raw {r} {i}");
            schema_add(&tx, &mut stmts, &payload, i64::try_from(i).unwrap() + 1);
        }
    } else {
        let mut job = tx
            .prepare("INSERT INTO jobs(key, size, created, payload) VALUES (?1, ?2, 0, ?3)")
            .unwrap();
        let mut inst = tx
            .prepare("INSERT INTO instances(job, created, state) VALUES (?1, 0, 'pending')")
            .unwrap();
        for i in 0..n {
            let payload = format!("echo raw {r} {i}");
            let key = Hash::of(payload.as_bytes()).to_hex();
            job.execute((&key, payload.len(), payload.as_bytes()))
                .unwrap();
            inst.execute([&key]).unwrap();
        }
    }
    tx.commit().unwrap();
    n as f64 / t.elapsed().as_secs_f64()
}

/// Library `add_many` of `n` distinct small payloads (durable on return), against the
/// same rows inserted straight into SQLite in one big transaction; then the raw
/// inserts into batchdb's schema, one transaction, against the same baseline.
pub async fn enqueue_bulk(n: usize, reps: usize) -> Vec<Row> {
    let (mut ours, mut base, mut schema) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..reps {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).await;
        ours.push(timed_add_many(&db, r, n).await);
        let mut conn = raw_sqlite(dir.path());
        base.push(raw_bulk(&mut conn, r, n, false));
        let mut full = schema_sqlite(dir.path()).await;
        schema.push(raw_bulk(&mut full, r, n, true));
    }
    vec![
        Row::rates(
            format!("enqueue bulk ({n} payloads, one add_many, durable)"),
            (ours, base.clone()),
            1.0,
            "jobs/s",
            "raw SQLite, 1 txn",
        ),
        Row::rates(
            format!("  raw SQL into batchdb's schema ({n} jobs, 1 txn, no library)"),
            (schema, base),
            1.0,
            "jobs/s",
            "raw SQLite, 1 txn",
        ),
    ]
}
