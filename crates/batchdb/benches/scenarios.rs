//! The benchmark suite: each scenario measures batchdb and, right beside it in the
//! same run on the same machine, a baseline of what the machine allows, and reports
//! the ratio. Absolute numbers drift on a shared machine; ratios much less.
//!
//! `cargo bench -p batchdb --bench scenarios` (add `-- quick` for a smaller run, `--
//! only=list` for one scenario).
//! The table it prints is kept in `docs/performance.md`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchdb::blob::DirStore;
use batchdb::queue::{
    AttemptReport, ClaimRequest, EventKind, ListKind, Order, Outcome, PushOptions, Queue,
    SqliteQueue,
};
use batchdb::runner::ShellRunner;
use batchdb::worker::WorkerOptions;
use batchdb::{BatchDb, Hash};
use futures_util::StreamExt;

#[path = "scenarios/batches.rs"]
mod batches;
#[path = "scenarios/enqueue.rs"]
mod enqueue;
#[path = "scenarios/pg_bulk.rs"]
mod pg_bulk;
#[path = "scenarios/prune.rs"]
mod prune;
#[path = "scenarios/resources.rs"]
mod resources;

struct Row {
    scenario: String,
    ours: String,
    base: String,
    ratio: f64,
    rss_mib: f64,
}

impl Row {
    /// A row comparing two series of rates (higher is better) by their medians, shown
    /// divided by `scale` in `unit`.
    fn rates(
        scenario: String,
        (ours, base): (Vec<f64>, Vec<f64>),
        scale: f64,
        unit: &str,
        baseline: &str,
    ) -> Row {
        let (o, b) = (median(ours), median(base));
        Row {
            scenario,
            ours: format!("{:.0} {unit}", o / scale),
            base: format!("{:.0} {unit} ({baseline})", b / scale),
            ratio: o / b,
            rss_mib: peak_mib(),
        }
    }
}

/// Resets the peak-RSS counter of this process (Linux: `clear_refs` 5).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak RSS since the last reset, in MiB.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn open(dir: &Path) -> BatchDb {
    let q = Arc::new(
        SqliteQueue::open(dir.join("q.sqlite"))
            .await
            .expect("open queue"),
    );
    let b = Arc::new(DirStore::open(dir.join("blobs")).await.expect("open blobs"));
    BatchDb::new(q, b)
}

fn sh(script: &str) -> Duration {
    let t = Instant::now();
    let st = Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("sh");
    assert!(st.success(), "baseline failed: {script}");
    t.elapsed()
}

/// Jobs per second of one `add_many` of `n` distinct small payloads (`echo bulk R I`,
/// round `r`) into `db`, peak RSS counted from its start.
async fn timed_add_many(db: &BatchDb, r: usize, n: usize) -> f64 {
    let payloads: Vec<Vec<u8>> = (0..n)
        .map(|i| format!("echo bulk {r} {i}").into_bytes())
        .collect();
    reset_peak();
    let t = Instant::now();
    let added = db
        .add_many(payloads, &PushOptions::default())
        .await
        .unwrap();
    let rate = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(added.len(), n);
    rate
}

/// `run -j 2 --until-empty` (the library worker, shell runner) over `n` pending
/// `echo i` jobs, against `xargs -P 2` running the same payloads through `sh`.
async fn drain(n: usize, reps: usize) -> Row {
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for r in 0..reps {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).await;
        for i in 0..n {
            db.add(format!("echo {r} {i}").as_bytes(), &PushOptions::default())
                .await
                .unwrap();
        }
        reset_peak();
        let opts = {
            let mut o = WorkerOptions::default();
            o.concurrency = 2;
            o.until_empty = true;
            o.order = Order::Oldest;
            o
        };
        let t = Instant::now();
        db.worker(Arc::new(ShellRunner::default()), opts)
            .run(None)
            .await
            .unwrap();
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        assert_eq!(db.counts().await.unwrap().result, n as u64);
        let took = sh(&format!(
            "seq 1 {n} | xargs -P 2 -I{{}} sh -c 'echo {r} {{}}' > /dev/null"
        ));
        base.push(n as f64 / took.as_secs_f64());
    }
    Row::rates(
        format!("drain {n} trivial shell jobs, 2 at a time"),
        (ours, base),
        1.0,
        "jobs/s",
        "xargs -P 2 sh -c",
    )
}

/// One job writing `mib` MiB to stdout, against hashing the same bytes with openssl
/// and against writing them plainly to the same disk (with a final fsync).
async fn big_output(mib: u64, reps: usize) -> Row {
    let bytes = mib << 20;
    let mut ours = Vec::new();
    let mut hash = Vec::new();
    let mut write = Vec::new();
    for _ in 0..reps {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).await;
        db.add(
            format!("head -c {bytes} /dev/zero").as_bytes(),
            &PushOptions::default(),
        )
        .await
        .unwrap();
        reset_peak();
        let opts = {
            let mut o = WorkerOptions::default();
            o.until_empty = true;
            o
        };
        let t = Instant::now();
        db.worker(Arc::new(ShellRunner::default()), opts)
            .run(None)
            .await
            .unwrap();
        ours.push(mib as f64 / t.elapsed().as_secs_f64());
        let h = sh(&format!(
            "head -c {bytes} /dev/zero | openssl dgst -sha256 > /dev/null"
        ));
        hash.push(mib as f64 / h.as_secs_f64());
        let out = dir.path().join("plain");
        let w = sh(&format!(
            "head -c {bytes} /dev/zero > '{0}' && sync '{0}'",
            out.display()
        ));
        write.push(mib as f64 / w.as_secs_f64());
    }
    let (o, h, w) = (median(ours), median(hash), median(write));
    let slower = h.min(w);
    Row {
        scenario: format!("one job writing {mib} MiB to stdout"),
        ours: format!("{o:.0} MiB/s"),
        base: format!("{h:.0} MiB/s sha256 (openssl), {w:.0} MiB/s plain write+fsync"),
        ratio: o / slower,
        rss_mib: peak_mib(),
    }
}

/// Fills a queue with `n` pending instances straight through SQL (fast set-up).
fn fill(path: &Path, n: usize) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("BEGIN").unwrap();
    {
        let mut job = conn
            .prepare("INSERT INTO jobs(key, size, created) VALUES (?1, 8, ?2)")
            .unwrap();
        let mut inst = conn
            .prepare(
                "INSERT INTO instances(job, created, state, priority, run_at, cached)
                 VALUES (?1, ?2, 'pending', 0, 0, 0)",
            )
            .unwrap();
        for i in 0..n {
            let key = Hash::of(format!("fill {i}").as_bytes()).to_hex();
            job.execute(rusqlite::params![key, i as i64]).unwrap();
            inst.execute(rusqlite::params![key, i as i64 + 1]).unwrap();
        }
    }
    conn.execute_batch("COMMIT").unwrap();
}

/// `list pending` of `n` rows (streamed, serialised as JSON lines to a sink), against
/// a raw SQLite scan of the same rows.
async fn list(n: usize, reps: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let db = open(dir.path()).await;
    fill(&dir.path().join("q.sqlite"), n);
    let mut ours = Vec::new();
    let mut base = Vec::new();
    reset_peak();
    for _ in 0..reps {
        let t = Instant::now();
        let rows = db.list(ListKind::Pending, None);
        futures_util::pin_mut!(rows);
        let mut sink = std::io::sink();
        let mut count = 0;
        while let Some(r) = rows.next().await {
            serde_json::to_writer(&mut sink, &r.unwrap()).unwrap();
            count += 1;
        }
        assert_eq!(count, n);
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        let conn = rusqlite::Connection::open(dir.path().join("q.sqlite")).unwrap();
        let t = Instant::now();
        let mut stmt = conn
            .prepare("SELECT id, job, created, state, priority, run_at, attempts FROM instances WHERE state IN ('pending','running')")
            .unwrap();
        let mut rows = stmt.query([]).unwrap();
        let mut count = 0;
        // Every selected column is read (as the list reads them), none decoded further.
        while let Some(r) = rows.next().unwrap() {
            let _: (i64, &str, i64, &str) = (
                r.get(0).unwrap(),
                r.get_ref(1).unwrap().as_str().unwrap(),
                r.get(2).unwrap(),
                r.get_ref(3).unwrap().as_str().unwrap(),
            );
            let _: (i64, i64, i64) = (r.get(4).unwrap(), r.get(5).unwrap(), r.get(6).unwrap());
            count += 1;
        }
        assert_eq!(count, n);
        base.push(n as f64 / t.elapsed().as_secs_f64());
    }
    Row::rates(
        format!("list pending, {n} rows"),
        (ours, base),
        1000.0,
        "k rows/s",
        "raw SQLite scan",
    )
}

/// Mean time of one claim + finish with `n` pending (and `waiting` instances waiting
/// for dependencies beside them).
async fn claim_finish_cost(n: usize, waiting: usize, ops: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let q = SqliteQueue::open(&path).await.unwrap();
    fill(&path, n);
    if waiting > 0 {
        batches::fill_waiting(&path, waiting);
    }
    let req = {
        let mut o = ClaimRequest::new("bench", 1, Duration::from_secs(60));
        o.order = Order::Newest;
        o
    };
    let t = Instant::now();
    for _ in 0..ops {
        let c = q.claim(&req).await.unwrap();
        q.finish(&c[0].token, &batches::success()).await.unwrap();
    }
    t.elapsed().as_secs_f64() / ops as f64
}

async fn scale(big: usize, ops: usize) -> Row {
    reset_peak();
    let small = claim_finish_cost(1000, 0, ops).await;
    let large = claim_finish_cost(big, 0, ops).await;
    Row {
        scenario: format!("claim + finish with {big} pending vs 1000 pending"),
        ours: format!("{:.2} ms", large * 1000.0),
        base: format!("{:.2} ms (1000 pending)", small * 1000.0),
        // Here lower is better: report growth, target ≤ 1.5.
        ratio: large / small,
        rss_mib: peak_mib(),
    }
}

/// Push (through another handle, as another process) → start of the job, median.
async fn wakeup(n: usize) -> Row {
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
    wakeup_on(db, other, n, "SQLite", 50.0).await
}

/// The wake-up scenario on any pair of handles on one database: a worker on `db`,
/// adds through `other`; the ratio is the median against `target_ms`.
async fn wakeup_on(db: BatchDb, other: BatchDb, n: usize, what: &str, target_ms: f64) -> Row {
    reset_peak();
    let worker = db.worker(Arc::new(ShellRunner::default()), WorkerOptions::default());
    let stop = worker.shutdown_handle();
    let task = tokio::spawn(worker.run(None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::new();
    for i in 0..n {
        let inst = other
            .add(format!("echo wake {i}").as_bytes(), &PushOptions::default())
            .await
            .unwrap();
        let events = other.events(0, true);
        futures_util::pin_mut!(events);
        while let Some(e) = events.next().await {
            let e = e.unwrap();
            if e.event == EventKind::Start && e.instance == Some(inst.id) {
                break;
            }
        }
        // Push and start are both stamped by their rows; the follow loop above only
        // waits for the start to exist.
        let start_ms = other.instance(inst.id).await.unwrap().attempts[0]
            .report
            .start;
        lat.push((start_ms - inst.created) as f64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.graceful();
    task.await.unwrap().unwrap();
    let m = median(lat);
    Row {
        scenario: format!("{what} wake-up: add in another handle → job start ({n} samples)"),
        ours: format!("{m:.1} ms median"),
        base: format!("target < {target_ms} ms"),
        ratio: m / target_ms,
        rss_mib: peak_mib(),
    }
}

/// A fresh PostgreSQL + S3 database on the bench's servers (a PostgreSQL cluster
/// with fsync on, and a Garage node, both started for this run).
async fn open_distributed(
    pg: &batchdb_testkit::postgres::Postgres,
    g: &batchdb_testkit::garage::Garage,
) -> (String, BatchDb) {
    let url = pg.create_database();
    (url.clone(), open_url(&url, g).await)
}

/// Another handle (its own connection pool and S3 client, as another machine's
/// worker would have) on the PostgreSQL + S3 database at `url`.
async fn open_url(url: &str, g: &batchdb_testkit::garage::Garage) -> BatchDb {
    let q = Arc::new(batchdb::queue::PgQueue::open(url).await.expect("open pg"));
    let opts = {
        let mut o = batchdb::blob::S3Options::default();
        o.endpoint = Some(g.endpoint.clone());
        o.region = g.region.clone();
        o.access_key_id = g.access_key_id.clone();
        o.secret_access_key = g.secret_access_key.clone();
        o.allow_http = true;
        o.virtual_hosted_style = false;
        o
    };
    let b =
        Arc::new(batchdb::blob::S3Store::with_options(&g.bucket, "bench", &opts).expect("open s3"));
    BatchDb::new(q, b)
}

/// `w` workers (each with its own handles, 2 slots) on PostgreSQL + S3 draining `n`
/// pending `echo i` jobs, against `xargs -P 2w` running the same payloads.
async fn drain_distributed(
    pg: &batchdb_testkit::postgres::Postgres,
    g: &batchdb_testkit::garage::Garage,
    workers: usize,
    n: usize,
    reps: usize,
) -> Row {
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for r in 0..reps {
        let (url, db) = open_distributed(pg, g).await;
        for i in 0..n {
            db.add(format!("echo {r} {i}").as_bytes(), &PushOptions::default())
                .await
                .unwrap();
        }
        let mut handles = Vec::new();
        for _ in 0..workers {
            handles.push(open_url(&url, g).await);
        }
        reset_peak();
        let t = Instant::now();
        let mut tasks = Vec::new();
        for (k, h) in handles.into_iter().enumerate() {
            let opts = {
                let mut o = WorkerOptions::default();
                o.concurrency = 2;
                o.until_empty = true;
                o.order = Order::Oldest;
                o.name = format!("bench-{k}");
                o
            };
            tasks.push(tokio::spawn(
                h.worker(Arc::new(ShellRunner::default()), opts).run(None),
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        ours.push(n as f64 / t.elapsed().as_secs_f64());
        assert_eq!(db.counts().await.unwrap().result, n as u64);
        let took = sh(&format!(
            "seq 1 {n} | xargs -P {} -I{{}} sh -c 'echo {r} {{}}' > /dev/null",
            2 * workers
        ));
        base.push(n as f64 / took.as_secs_f64());
    }
    Row::rates(
        format!("PostgreSQL + S3: drain {n} trivial jobs, {workers} worker(s) × 2 slots"),
        (ours, base),
        1.0,
        "jobs/s",
        &format!("xargs -P {} sh -c", 2 * workers),
    )
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "distributed") {
        // Only the PostgreSQL + S3 rows (they start their own servers).
        let quick = std::env::args().any(|a| a == "quick");
        let (n, reps) = if quick { (200, 1) } else { (600, 3) };
        let pg =
            tokio::task::spawn_blocking(|| batchdb_testkit::postgres::Postgres::start_new(true))
                .await
                .unwrap();
        let g = tokio::task::spawn_blocking(batchdb_testkit::garage::garage)
            .await
            .unwrap();
        let only: Option<String> =
            std::env::args().find_map(|a| a.strip_prefix("only=").map(String::from));
        let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
        let mut rows = Vec::new();
        if want("drain") {
            for w in [1, 2, 4] {
                rows.push(drain_distributed(&pg, g, w, n, reps).await);
            }
        }
        if want("bulk") {
            let n = if quick { 10_000 } else { 100_000 };
            rows.push(pg_bulk::bulk_postgres(&pg, g, n, reps).await);
        }
        if want("wakeup") {
            let (url, db) = open_distributed(&pg, g).await;
            let other = open_url(&url, g).await;
            let samples = if quick { 10 } else { 30 };
            rows.push(wakeup_on(db, other, samples, "PostgreSQL + S3", 20.0).await);
        }
        if want("prune") {
            let big = if quick { 100_000 } else { 1_000_000 };
            rows.push(prune::prune_postgres(&pg, g, big).await);
        }
        print_rows(rows);
        return;
    }
    let quick = std::env::args().any(|a| a == "quick");
    let k = if quick { 1 } else { 5 };
    let reps = if quick { 1 } else { 3 };
    // `only=NAME` (enqueue, drain, output, list, scale, wakeup, batches, needs, prune, bulk) runs one
    // scenario.
    let only: Option<String> =
        std::env::args().find_map(|a| a.strip_prefix("only=").map(String::from));
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut rows = Vec::new();
    if want("enqueue") {
        rows.extend(enqueue::enqueue_one(400 * k, reps).await);
    }
    if want("drain") {
        rows.push(drain(200 * k, reps).await);
    }
    if want("output") {
        rows.push(big_output(if quick { 256 } else { 1024 }, reps).await);
    }
    if want("list") {
        rows.push(list(if quick { 100_000 } else { 1_000_000 }, reps).await);
    }
    if want("scale") {
        rows.push(scale(if quick { 100_000 } else { 1_000_000 }, 200).await);
    }
    if want("wakeup") {
        rows.push(wakeup(if quick { 10 } else { 30 }).await);
    }
    if want("batches") {
        rows.push(batches::fan_in(if quick { 2_000 } else { 10_000 }).await);
        rows.push(batches::claim_beside_waiting(100_000, 200, reps).await);
        rows.push(batches::wait_latency(if quick { 10 } else { 30 }).await);
    }
    // Last: their 100,000 payloads in memory would inflate the peak RSS of the others.
    if want("batches") {
        rows.push(batches::fan_out(if quick { 20_000 } else { 100_000 }, reps).await);
    }
    if want("needs") {
        rows.extend(resources::needs_aware_claims(100_000, 200, reps).await);
    }
    if want("prune") {
        rows.push(prune::prune_sqlite(if quick { 100_000 } else { 1_000_000 }).await);
    }
    if want("bulk") {
        rows.extend(enqueue::enqueue_bulk(if quick { 20_000 } else { 100_000 }, reps).await);
    }
    print_rows(rows);
}

fn print_rows(rows: Vec<Row>) {
    println!("| scenario | batchdb | baseline (same run) | ratio | peak RSS |");
    println!("|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} MiB |",
            r.scenario, r.ours, r.base, r.ratio, r.rss_mib
        );
    }
}
