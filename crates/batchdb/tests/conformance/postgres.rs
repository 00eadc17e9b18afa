//! Tests of the PostgreSQL queue that need its server: migrations, URLs, reconnects.

use std::time::Duration;

use batchdb::Error;
use batchdb::queue::{PG_SCHEMA_VERSION, PgQueue, PushOptions, Queue};
use batchdb_testkit::postgres::{Postgres, shared};

async fn fresh_url() -> String {
    tokio::task::spawn_blocking(|| shared().create_database())
        .await
        .expect("start postgres")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_processes_may_migrate_a_fresh_database_at_once() {
    let url = fresh_url().await;
    let opens: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgQueue::open(&url).await })
        })
        .collect();
    for o in opens {
        o.await.expect("join").expect("open while others migrate");
    }
    let q = PgQueue::open(&url).await.unwrap();
    assert!(q.check().await.unwrap().problems.is_empty());
    let db = url.rsplit('/').next().unwrap().to_string();
    let versions = tokio::task::spawn_blocking(move || {
        shared().sql(&db, "SELECT count(*) FROM batchdb.schema_migrations")
    })
    .await
    .unwrap();
    assert!(
        versions.contains(&PG_SCHEMA_VERSION.to_string()),
        "{versions}"
    );
}

#[tokio::test]
async fn newer_schema_is_refused_with_a_clear_message() {
    let url = fresh_url().await;
    PgQueue::open(&url).await.unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        shared().sql(
            &db,
            "INSERT INTO batchdb.schema_migrations(version) VALUES (99)",
        )
    })
    .await
    .unwrap();
    let err = PgQueue::open(&url).await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[tokio::test]
async fn passwords_never_appear_in_errors() {
    let port = batchdb_testkit::free_port();
    let err = PgQueue::open(&format!(
        "postgres://u:hunter2@127.0.0.1:{port}/db?connect_timeout=2"
    ))
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains("hunter2"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_recovers_after_the_server_restarts() {
    let pg = tokio::task::spawn_blocking(|| Postgres::start_new(false))
        .await
        .unwrap();
    let q = PgQueue::open(&pg.url("postgres")).await.unwrap();
    let job = batchdb::blob::BlobInfo {
        hash: batchdb::Hash::of(b"x"),
        size: 1,
    };
    q.add(&job, &PushOptions::default()).await.unwrap();
    // A waiter listening for changes before the restart...
    let seen = q.change_seq();
    let pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    assert!(q.counts().await.is_err(), "the server is down");
    let pg = tokio::task::spawn_blocking(move || {
        pg.start();
        pg
    })
    .await
    .unwrap();
    // ...and the pool hands out new connections once it is back.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let counts = loop {
        match q.counts().await {
            Ok(c) => break c,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert_eq!(counts.pending, 1);
    // A change made by another handle wakes this one (the listener re-listened).
    let other = PgQueue::open(&pg.url("postgres")).await.unwrap();
    let seen2 = q.change_seq();
    let waiter = {
        let q = q.clone();
        tokio::spawn(async move { q.wait_change(seen2, Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    other.add(&job, &PushOptions::default()).await.unwrap();
    let t = std::time::Instant::now();
    waiter.await.unwrap();
    assert!(q.change_seq() != seen, "woken");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "woken by the notification"
    );
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_rehashes_inline_payloads_and_outputs() {
    use batchdb::queue::{AttemptReport, NewJob, Outcome};
    let url = fresh_url().await;
    let q = PgQueue::open(&url).await.unwrap();
    q.add_many(
        &[NewJob::inline(b"echo a".to_vec())],
        &PushOptions::default(),
    )
    .await
    .unwrap();
    let claims = q
        .claim(&crate::util::req("w", 1, Duration::from_secs(60)))
        .await
        .unwrap();
    let out = batchdb::blob::BlobInfo {
        hash: batchdb::Hash::of(b"a\n"),
        size: 2,
    };
    let report = {
        let mut o = AttemptReport::default();
        o.stdout = Some(out);
        o.keep_inline(b"a\n".to_vec());
        o
    };
    q.finish(&claims[0].token, &Outcome::Success(report))
        .await
        .unwrap();
    assert!(q.check().await.unwrap().problems.is_empty());
    assert_eq!(
        q.inline_blob(&out.hash).await.unwrap(),
        Some(b"a\n".to_vec())
    );
    let db = url.rsplit('/').next().unwrap().to_string();
    tokio::task::spawn_blocking(move || {
        shared().sql(
            &db,
            "UPDATE batchdb.inline_blobs SET data = '\\x00'; UPDATE batchdb.jobs SET payload = '\\x01'",
        )
    })
    .await
    .unwrap();
    let problems = q.check().await.unwrap().problems;
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("job ") && problems[0].contains("inline payload"));
    assert!(problems[1].starts_with(&format!("inline blob {}", out.hash)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_3_database_is_migrated_and_its_running_attempt_taken_over() {
    let url = fresh_url().await;
    let q = std::sync::Arc::new(PgQueue::open(&url).await.unwrap());
    let db = url.rsplit('/').next().unwrap().to_string();
    let downgrade = async {
        tokio::task::spawn_blocking(move || {
            shared().sql(
                &db,
                "DROP INDEX batchdb.instances_pending;
                 CREATE INDEX instances_pending_newest ON batchdb.instances(priority DESC, created DESC, id DESC)
                   WHERE state = 'pending';
                 CREATE INDEX instances_pending_oldest ON batchdb.instances(priority DESC, created ASC, id ASC)
                   WHERE state = 'pending';
                 DROP TABLE batchdb.workers;
                 ALTER TABLE batchdb.instances DROP COLUMN context, DROP COLUMN needs,
                   DROP COLUMN conc_key, DROP COLUMN conc_limit;
                 ALTER TABLE batchdb.attempts DROP COLUMN max_rss, DROP COLUMN cpu_user_ms,
                   DROP COLUMN cpu_sys_ms, DROP COLUMN resources;
                 DROP INDEX batchdb.cache_instance; DROP TABLE batchdb.batches; DROP TABLE batchdb.deps;
                 ALTER TABLE batchdb.instances DROP COLUMN batch, DROP COLUMN deps,
                   DROP COLUMN waiting_on, DROP COLUMN note;
                 ALTER TABLE batchdb.attempts DROP COLUMN attempt_id;
                 DELETE FROM batchdb.schema_migrations WHERE version > 3",
            )
        })
        .await
        .unwrap();
    };
    let reopen = async {
        std::sync::Arc::new(PgQueue::open(&url).await.unwrap()) as std::sync::Arc<dyn Queue>
    };
    crate::util::a_version_3_running_attempt_is_taken_over(q, downgrade, reopen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cancelled_at_any_point_leaves_no_transaction_open_and_nothing_half_done() {
    let url = fresh_url().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let q = PgQueue::open(&url).await.unwrap();
    let job = |i: u64| batchdb::blob::BlobInfo {
        hash: batchdb::Hash::of(&i.to_le_bytes()),
        size: 8,
    };
    // How long an add takes here and now (the machine may be busy)...
    let mut took = Vec::new();
    for i in 1000..1010u64 {
        let t = std::time::Instant::now();
        q.add(&job(i), &PushOptions::default()).await.unwrap();
        took.push(t.elapsed());
    }
    took.sort();
    let typical = took[5];
    // ...then each add cut off after 0 to twice that: before its first statement,
    // between two, or while its commit is in flight.
    let mut done = 0;
    for i in 0..300u64 {
        let cut = typical * u32::try_from(i % 50).unwrap() / 25;
        let (j, opts) = (job(i), PushOptions::default());
        if matches!(tokio::time::timeout(cut, q.add(&j, &opts)).await, Ok(Ok(_))) {
            done += 1;
        }
    }
    assert!(done < 300, "some adds were cut off");
    // Every later write goes through...
    for i in 300..320u64 {
        q.add(&job(i), &PushOptions::default()).await.unwrap();
    }
    // ...each add committed whole or not at all...
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            tokio::task::spawn_blocking(move || shared().count(&db, sql))
                .await
                .unwrap()
        }
    };
    let jobs = count("SELECT count(*) FROM batchdb.jobs").await;
    let instances = count("SELECT count(*) FROM batchdb.instances").await;
    assert_eq!(jobs, instances, "a job without its instance");
    assert!(instances >= done + 30, "{instances} < {done} + 30");
    // ...and no connection is left inside a transaction: those cut off were closed,
    // not handed out again (their server sessions end as the sockets close).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let open = count(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .await;
        if open == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{open} sessions left in a transaction"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The connections the queue's own statements hold on database `db` (this count's
/// own and the listener's excluded).
async fn statement_connections(db: &str) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}'
           AND pid <> pg_backend_pid() AND query NOT LIKE 'LISTEN%'"
    );
    tokio::task::spawn_blocking(move || shared().count("postgres", &sql))
        .await
        .unwrap()
}

/// 24 adds at once, each in a transaction of its own.
async fn add_at_once(q: &PgQueue) {
    let adds = (0..24).map(|i| {
        let q = q.clone();
        tokio::spawn(async move {
            let job = batchdb::queue::NewJob::inline(format!("echo {i}").into_bytes());
            q.add_many(&[job], &PushOptions::default()).await
        })
    });
    for a in adds.collect::<Vec<_>>() {
        a.await.expect("join").expect("add");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_opened_with_n_connections_never_holds_more() {
    let url = fresh_url().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let q = PgQueue::open_with(&url, 2).await.unwrap();
    add_at_once(&q).await;
    assert_eq!(
        q.counts().await.unwrap().pending,
        24,
        "every add waited its turn"
    );
    let held = statement_connections(&db).await;
    assert!((1..=2).contains(&held), "{held} connections");
    // The same adds on a queue opened with the default hold more: the bound above is
    // the option's doing, not the workload's.
    let url = fresh_url().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let q = PgQueue::open(&url).await.unwrap();
    add_at_once(&q).await;
    let held = statement_connections(&db).await;
    assert!(held > 2, "{held} connections");
}

/// Index scans of table `instances` of database `db` and the index entries they
/// read, once the server's statistics show more than `after` scans (a backend
/// reports them some time after its transaction, at most about ten seconds later).
async fn instance_index_reads(db: &str, after: i64) -> (i64, i64) {
    let db = db.to_string();
    tokio::task::spawn_blocking(move || {
        let stat = || {
            let sum = |col: &str| {
                shared().count(
                    &db,
                    &format!(
                        "SELECT COALESCE(sum({col}), 0) FROM pg_stat_user_indexes
                         WHERE relname = 'instances'"
                    ),
                )
            };
            (sum("idx_scan"), sum("idx_tup_read"))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while stat().0 <= after && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        stat()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_the_first_pending_rows_even_before_the_table_is_analyzed() {
    let url = fresh_url().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let q = PgQueue::open(&url).await.unwrap();
    let jobs: Vec<_> = (0..2_000)
        .map(|i| batchdb::queue::NewJob::inline(format!("echo {i}").into_bytes()))
        .collect();
    q.add_many(&jobs, &PushOptions::default()).await.unwrap();
    // What the planner would do on its own here: never analyzed, the table's
    // statistics promise about one pending row, so it reads every pending row and
    // sorts them.
    let plan = {
        let db = db.clone();
        tokio::task::spawn_blocking(move || {
            shared().sql(
                &db,
                "EXPLAIN SELECT id FROM batchdb.instances
                 WHERE state = 'pending' AND run_at <= 9000000000000000 AND (false OR needs IS NULL)
                 ORDER BY priority DESC, created DESC, id DESC LIMIT 2 OFFSET 0
                 FOR UPDATE SKIP LOCKED",
            )
        })
        .await
        .unwrap()
    };
    assert!(plan.contains("Sort"), "{plan}");
    let (scans, before) = instance_index_reads(&db, -1).await;
    for order in [batchdb::queue::Order::Newest, batchdb::queue::Order::Oldest] {
        let mut req = batchdb::queue::ClaimRequest::new("w", 2, Duration::from_secs(60));
        req.order = order;
        assert_eq!(q.claim(&req).await.unwrap().len(), 2);
    }
    // Two claims: each scans the expired-lease and the pending index, and updates
    // two rows by id. Through the ordered indexes that reads a handful of entries;
    // reading the pending rows to sort them would read 2,000 at each claim.
    let (now, after) = instance_index_reads(&db, scans + 3).await;
    assert!(
        now > scans + 3,
        "the claims' index scans were never reported"
    );
    let read = after - before;
    assert!(read < 100, "{read} index entries read by two claims");
}
