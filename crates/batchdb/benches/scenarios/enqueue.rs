//! Enqueue, one at a time and in bulk: the library's durable adds against the same
//! rows inserted straight into SQLite, and the same raw inserts into batchdb's own
//! schema, which shows how much of the gap its rows and index entries alone make.

use super::*;

/// The baseline database of the enqueue scenarios: the same job and instance rows,
/// WAL, `synchronous=FULL`, no indexes but the key's.
fn raw_sqlite(dir: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(dir.join("raw.sqlite")).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE jobs(id INTEGER PRIMARY KEY, key TEXT UNIQUE, size INTEGER, created INTEGER, payload BLOB);
         CREATE TABLE instances(id INTEGER PRIMARY KEY, job TEXT, created INTEGER, state TEXT);",
    )
    .unwrap();
    conn
}

/// The baseline's rows of one `add`: the job and its instance.
const BASE_ADD: [&str; 2] = [
    "INSERT INTO jobs(key, size, created, payload) VALUES (?1, ?2, ?3, ?4)",
    "INSERT INTO instances(job, created, state) VALUES (?1, ?2, 'pending')",
];

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
/// which is then closed), WAL, `synchronous=FULL` and the page cache as the library
/// runs it.
async fn schema_sqlite(dir: &Path) -> rusqlite::Connection {
    let path = dir.join("schema.sqlite");
    drop(SqliteQueue::open(&path).await.expect("migrate schema"));
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-16384;",
    )
    .unwrap();
    conn
}

/// Inserts the rows of one `add` of `payload` at time `created` with `stmts`: those
/// of [`BASE_ADD`] or of [`SCHEMA_ADD`], prepared on `conn`.
fn raw_add(
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
    if let [_, _, create, push] = stmts {
        let instance = conn.last_insert_rowid();
        let data = format!("{{\"size\":{size}}}");
        create.execute((&key, created, &data)).unwrap();
        push.execute((&key, created, instance)).unwrap();
    }
}

/// Inserts `n` jobs (round `r`) into `conn`, each statement prepared once (as the
/// library's are): the baseline's rows, or with `schema` those of [`SCHEMA_ADD`]; one
/// transaction per job, or with `one_txn` one for all. Returns jobs per second.
fn raw_adds(
    conn: &rusqlite::Connection,
    (r, n): (usize, usize),
    schema: bool,
    one_txn: bool,
) -> f64 {
    let sql: &[&str] = if schema { &SCHEMA_ADD } else { &BASE_ADD };
    let t = Instant::now();
    let mut stmts: Vec<_> = sql
        .iter()
        .map(|q| conn.prepare_cached(q).unwrap())
        .collect();
    let txn = |sql: &str| conn.execute_batch(sql).unwrap();
    if one_txn {
        txn("BEGIN");
    }
    for i in 0..n {
        if !one_txn {
            txn("BEGIN");
        }
        let created = i64::try_from(i).unwrap() + 1;
        raw_add(conn, &mut stmts, &format!("echo raw {r} {i}"), created);
        if !one_txn {
            txn("COMMIT");
        }
    }
    if one_txn {
        txn("COMMIT");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// The row of batchdb (`what`) and that of the raw inserts into its schema (`schema`),
/// each against the same baseline.
fn with_ceiling(
    (what, schema): (String, String),
    (ours, base, into_schema): (Vec<f64>, Vec<f64>, Vec<f64>),
    baseline: &str,
) -> Vec<Row> {
    vec![
        Row::rates(what, (ours, base.clone()), 1.0, "jobs/s", baseline),
        Row::rates(schema, (into_schema, base), 1.0, "jobs/s", baseline),
    ]
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
            base.push(raw_adds(&raw, (r, n), false, false));
            schema.push(raw_adds(&full, (r, n), true, false));
        }
        let t = Instant::now();
        for i in 0..n {
            db.add(format!("echo {r} {i}").as_bytes(), &PushOptions::default())
                .await
                .unwrap();
        }
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        if r % 2 == 0 {
            schema.push(raw_adds(&full, (r, n), true, false));
            base.push(raw_adds(&raw, (r, n), false, false));
        }
    }
    let what = format!("enqueue one at a time ({n} adds, durable)");
    let into = format!("  raw SQL into batchdb's schema ({n} adds, no library)");
    with_ceiling((what, into), (ours, base, schema), "raw SQLite, 1 txn each")
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
        base.push(raw_adds(&raw_sqlite(dir.path()), (r, n), false, true));
        let full = schema_sqlite(dir.path()).await;
        schema.push(raw_adds(&full, (r, n), true, true));
    }
    let what = format!("enqueue bulk ({n} payloads, one add_many, durable)");
    let into = format!("  raw SQL into batchdb's schema ({n} jobs, 1 txn, no library)");
    with_ceiling((what, into), (ours, base, schema), "raw SQLite, 1 txn")
}
