//! Tests of the directory blob store that need its files.

use batchdb::blob::{BlobStore, DirStore};
use batchdb::{Error, Hash};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn layout_and_no_leftover_temp_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path()).await.unwrap();
    let info = store.put(&mut &b"sleep 5; date"[..]).await.unwrap();
    let hex = info.hash.to_hex();
    assert_eq!(
        hex,
        "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0"
    );
    let path = dir.path().join("ce").join("6c").join(&hex);
    assert_eq!(std::fs::read(&path).unwrap(), b"sleep 5; date");
    store.put(&mut &b"sleep 5; date"[..]).await.unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );
}

#[tokio::test]
async fn corrupt_blob_is_an_error_naming_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path()).await.unwrap();
    let info = store.put(&mut &b"good bytes"[..]).await.unwrap();
    std::fs::write(store.path_of(&info.hash), b"evil bytes").unwrap();
    let mut r = store.get(&info.hash).await.unwrap();
    let mut v = Vec::new();
    let err = r.read_to_end(&mut v).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    let inner = err.into_inner().unwrap().downcast::<Error>().unwrap();
    assert!(matches!(*inner, Error::BlobCorrupt { hash, .. } if hash == info.hash));
    assert!(inner.to_string().contains(&info.hash.to_hex()));
}

#[tokio::test]
async fn hash_paths_never_leave_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path().join("s")).await.unwrap();
    for bad in [
        "../../etc/passwd",
        "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258C0",
    ] {
        assert!(bad.parse::<Hash>().is_err());
    }
    let h = Hash::of(b"x");
    assert!(store.path_of(&h).starts_with(dir.path().join("s")));
}

#[tokio::test]
async fn verify_reports_a_corrupt_blob() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let queue = Arc::new(
        batchdb::queue::SqliteQueue::open(dir.path().join("q"))
            .await
            .unwrap(),
    );
    let store = DirStore::open(dir.path().join("b")).await.unwrap();
    let db = batchdb::BatchDb::new(queue, Arc::new(store.clone()));
    // Too large to be kept inline: a blob file.
    let big = format!("echo x {}", "#".repeat(batchdb::INLINE_MAX));
    let inst = db.add(big.as_bytes(), &Default::default()).await.unwrap();
    std::fs::write(store.path_of(&inst.job), b"echo y").unwrap();
    let mut problems = Vec::new();
    db.verify(|p| problems.push(p)).await.unwrap();
    assert_eq!(
        problems,
        [batchdb::integrity::Problem::Corrupt {
            hash: inst.job,
            actual: Hash::of(b"echo y")
        }]
    );
}

#[tokio::test]
async fn a_symlink_at_a_blob_path_is_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path()).await.unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"not yours to read").unwrap();
    // A link planted where a blob lives, and one where a blob would go.
    let info = store.put(&mut &b"a real blob"[..]).await.unwrap();
    let path = store.path_of(&info.hash);
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    let other = Hash::of(b"never stored");
    let opath = store.path_of(&other);
    std::fs::create_dir_all(opath.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&secret, &opath).unwrap();
    for h in [info.hash, other] {
        let err = store
            .get_range(&h, 0..5)
            .await
            .err()
            .expect("a range read refused");
        assert!(err.to_string().contains("refused"), "{err}");
        assert!(store.get(&h).await.is_err());
        assert!(store.size(&h).await.is_err());
    }
    // A linked fan-out directory too.
    let third = store.put(&mut &b"third"[..]).await.unwrap();
    let tpath = store.path_of(&third.hash);
    let fan = tpath.parent().unwrap().to_path_buf();
    let moved = dir.path().join("elsewhere");
    std::fs::rename(&fan, &moved).unwrap();
    std::os::unix::fs::symlink(&moved, &fan).unwrap();
    let err = store
        .get_range(&third.hash, 0..2)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn an_adopted_file_is_the_blob_itself_not_a_copy() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path().join("blobs")).await.unwrap();
    let data = vec![7u8; 100_000];
    let path = dir.path().join("live-output");
    std::fs::write(&path, &data).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let info = batchdb::blob::BlobInfo {
        hash: Hash::of(&data),
        size: data.len() as u64,
    };
    assert!(store.adopt(&file, info).await.unwrap());
    let blob = std::fs::metadata(store.path_of(&info.hash)).unwrap();
    assert_eq!(
        blob.ino(),
        file.metadata().unwrap().ino(),
        "one inode, two names"
    );
    // The file's own name can go: the blob stays.
    std::fs::remove_file(&path).unwrap();
    let mut v = Vec::new();
    store
        .get(&info.hash)
        .await
        .unwrap()
        .read_to_end(&mut v)
        .await
        .unwrap();
    assert!(v == data);
}

/// A SQLite queue and a directory store under `dir`, live files in `live`.
async fn local_db(dir: &std::path::Path, live: &std::path::Path) -> batchdb::BatchDb {
    let config = batchdb::Config {
        db: batchdb::DbLocation::Sqlite(dir.join("q.sqlite")),
        blobs: batchdb::BlobLocation::Dir(dir.join("blobs")),
        live_dir: Some(live.to_path_buf()),
        db_connections: None,
    };
    batchdb::BatchDb::open(&config).await.unwrap()
}

/// Runs `job` with a shell runner until the queue is empty; its attempt's report.
async fn run_one(db: &batchdb::BatchDb, job: &str) -> batchdb::queue::AttemptReport {
    let added = db
        .add(job.as_bytes(), &batchdb::queue::PushOptions::default())
        .await
        .unwrap();
    let mut opts = batchdb::worker::WorkerOptions::default();
    opts.until_empty = true;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runner = std::sync::Arc::new(batchdb::runner::ShellRunner::default());
    db.worker(runner, opts).run(Some(tx)).await.unwrap();
    let r = rx.try_recv().unwrap();
    assert_eq!(r.job, added.job);
    r.report
}

async fn read(db: &batchdb::BatchDb, h: &Hash) -> Vec<u8> {
    let mut v = Vec::new();
    db.get(h).await.unwrap().read_to_end(&mut v).await.unwrap();
    v
}

#[tokio::test]
async fn a_large_output_is_written_once_its_live_file_becoming_its_blob() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let db = local_db(dir.path(), &live).await;
    // The store's temporary directory made unusable: a put that writes a copy fails.
    let tmp = dir.path().join("blobs").join("tmp");
    std::fs::remove_dir(&tmp).unwrap();
    std::fs::write(&tmp, b"in the way").unwrap();
    let store = DirStore::open(dir.path().join("blobs")).await;
    assert!(
        store.is_err(),
        "the store's temporary directory is unusable"
    );
    let report = run_one(&db, "head -c 3000000 /dev/zero").await;
    assert_eq!(report.exit_code, Some(0), "{report:?}");
    let out = report.stdout.unwrap();
    assert_eq!(out.size, 3_000_000);
    assert!(read(&db, &out.hash).await == vec![0u8; 3_000_000]);
    assert_eq!(
        std::fs::read_dir(&live).unwrap().count(),
        0,
        "live file removed"
    );
}

#[tokio::test]
async fn a_live_file_on_another_file_system_is_copied_into_the_store() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // /dev/shm is a tmpfs: another file system than the temporary directory's.
    let live = tempfile::tempdir_in("/dev/shm").expect("/dev/shm, a tmpfs, is needed");
    let dev = |p: &std::path::Path| std::fs::metadata(p).unwrap().dev();
    assert_ne!(dev(dir.path()), dev(live.path()), "two file systems");
    let db = local_db(dir.path(), live.path()).await;
    let report = run_one(&db, "seq 100000").await;
    let out = report.stdout.unwrap();
    let seq: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    assert!(read(&db, &out.hash).await == seq.as_bytes());
    assert_eq!(std::fs::read_dir(live.path()).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs").join("tmp"))
            .unwrap()
            .count(),
        0
    );
}
