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
