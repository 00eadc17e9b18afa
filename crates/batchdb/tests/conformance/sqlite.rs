//! Tests of the SQLite queue that need its file.

use batchdb::Error;
use batchdb::queue::{Queue, SqliteQueue};

/// Steps 10 and 9 undone (the ids' floors; the two pending indexes every schema
/// before had). Step 10's tables without `AUTOINCREMENT` stay: it rebuilds them from
/// whatever it finds.
macro_rules! before_step_9 {
    () => {
        "DROP TABLE id_floors;
         DROP INDEX instances_pending;
         CREATE INDEX instances_pending_newest ON instances(priority, created) WHERE state = 'pending';
         CREATE INDEX instances_pending_oldest ON instances(priority DESC, created ASC) WHERE state = 'pending';
         "
    };
}

#[tokio::test]
async fn newer_schema_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    SqliteQueue::open(&path).await.unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let err = SqliteQueue::open(&path).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::SchemaTooNew {
                found: 99,
                supported: batchdb::queue::SCHEMA_VERSION,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("schema version 99") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_openers_migrate_a_new_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("q.sqlite");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = path.clone();
        tasks.push(tokio::spawn(async move { SqliteQueue::open(&p).await }));
    }
    for t in tasks {
        let q = t.await.unwrap().expect("every concurrent opener succeeds");
        assert!(q.check().await.unwrap().problems.is_empty());
    }
    let v: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, batchdb::queue::SCHEMA_VERSION);
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    std::fs::write(&path, vec![7u8; 4096]).unwrap();
    let err = SqliteQueue::open(&path).await.unwrap_err();
    assert!(matches!(err, Error::Sqlite { .. }), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_version_1_database_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let q = SqliteQueue::open(&path).await.unwrap();
    let job = batchdb::blob::BlobInfo {
        hash: batchdb::Hash::of(b"old"),
        size: 3,
    };
    q.add(&job, &Default::default()).await.unwrap();
    drop(q);
    // What a version-1 batchdb left behind: no inline payload column, no inline
    // outputs table.
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(concat!(
            before_step_9!(),
            "DROP TABLE workers; DROP INDEX instances_conc; DROP INDEX instances_needs;
             ALTER TABLE instances DROP COLUMN context; ALTER TABLE instances DROP COLUMN needs;
             ALTER TABLE instances DROP COLUMN conc_key; ALTER TABLE instances DROP COLUMN conc_limit;
             ALTER TABLE attempts DROP COLUMN max_rss; ALTER TABLE attempts DROP COLUMN cpu_user_ms;
             ALTER TABLE attempts DROP COLUMN cpu_sys_ms; ALTER TABLE attempts DROP COLUMN resources;
             DROP INDEX cache_instance; DROP INDEX instances_batch; ALTER TABLE instances DROP COLUMN batch;
             ALTER TABLE instances DROP COLUMN deps; ALTER TABLE instances DROP COLUMN waiting_on;
             ALTER TABLE instances DROP COLUMN note; DROP TABLE batches; DROP TABLE deps;
             ALTER TABLE jobs DROP COLUMN payload; DROP TABLE inline_blobs;
             ALTER TABLE attempts DROP COLUMN attempt_id; PRAGMA user_version = 1",
        ))
        .unwrap();
    let q = SqliteQueue::open(&path).await.unwrap();
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, batchdb::queue::SCHEMA_VERSION);
    assert_eq!(q.counts().await.unwrap().pending, 1, "rows kept");
    assert_eq!(q.inline_blob(&job.hash).await.unwrap(), None);
    let inline = batchdb::queue::NewJob::inline(b"new".to_vec());
    q.add_many(&[inline], &Default::default()).await.unwrap();
    assert_eq!(
        q.inline_blob(&batchdb::Hash::of(b"new")).await.unwrap(),
        Some(b"new".to_vec())
    );
}

#[tokio::test]
async fn verify_reports_a_corrupt_inline_output() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let queue = Arc::new(SqliteQueue::open(&path).await.unwrap());
    let store = batchdb::blob::DirStore::open(dir.path().join("b"))
        .await
        .unwrap();
    let db = batchdb::BatchDb::new(queue, Arc::new(store));
    db.add(&b"echo hello"[..], &Default::default())
        .await
        .unwrap();
    let opts = {
        let mut o = batchdb::worker::WorkerOptions::default();
        o.until_empty = true;
        o
    };
    db.worker(Arc::new(batchdb::runner::ShellRunner::default()), opts)
        .run(None)
        .await
        .unwrap();
    let out = batchdb::Hash::of(b"hello\n");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE inline_blobs SET data = X'00' WHERE key = ?1",
            [out.to_hex()],
        )
        .unwrap();
    let mut problems = Vec::new();
    db.verify(|p| problems.push(p)).await.unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    let text = format!("{:?}", problems[0]);
    assert!(text.contains(&out.to_hex()), "{text}");
    assert!(
        matches!(db.get(&out).await, Err(batchdb::Error::BlobCorrupt { .. })),
        "a read of it fails"
    );
}

#[tokio::test]
async fn a_version_3_database_is_migrated_and_its_running_attempt_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.sqlite");
    let q = std::sync::Arc::new(SqliteQueue::open(&path).await.unwrap());
    let downgrade = async {
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(concat!(
                before_step_9!(),
                "DROP TABLE workers; DROP INDEX instances_conc; DROP INDEX instances_needs; ",
                "ALTER TABLE instances DROP COLUMN context; ALTER TABLE instances DROP COLUMN needs; ",
                "ALTER TABLE instances DROP COLUMN conc_key; ALTER TABLE instances DROP COLUMN conc_limit; ",
                "ALTER TABLE attempts DROP COLUMN max_rss; ALTER TABLE attempts DROP COLUMN cpu_user_ms; ",
                "ALTER TABLE attempts DROP COLUMN cpu_sys_ms; ALTER TABLE attempts DROP COLUMN resources; ",
                "DROP INDEX cache_instance; DROP INDEX instances_batch; ALTER TABLE instances DROP COLUMN batch; ALTER TABLE instances DROP COLUMN deps; ALTER TABLE instances DROP COLUMN waiting_on; ALTER TABLE instances DROP COLUMN note; DROP TABLE batches; DROP TABLE deps; ",
                "ALTER TABLE attempts DROP COLUMN attempt_id; PRAGMA user_version = 3"
            ))
            .unwrap();
    };
    let reopen = async {
        std::sync::Arc::new(SqliteQueue::open(&path).await.unwrap()) as std::sync::Arc<dyn Queue>
    };
    crate::util::a_version_3_running_attempt_is_taken_over(q, downgrade, reopen).await;
}
