//! Any bytes stored in the directory blob store come back identical, under their
//! sha256, and a second store of them is deduplicated.
#![no_main]

use std::sync::OnceLock;

use batchdb::Hash;
use batchdb::blob::{BlobStore, DirStore};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

struct Env {
    rt: tokio::runtime::Runtime,
    store: DirStore,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = rt.block_on(DirStore::open(dir.path())).unwrap();
        Env { rt, store, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let e = env();
    e.rt.block_on(async {
        let info = e.store.put(&mut &data[..]).await.unwrap();
        assert_eq!(info.hash, Hash::of(data));
        assert_eq!(info.size, data.len() as u64);
        assert_eq!(e.store.put(&mut &data[..]).await.unwrap(), info);
        let mut back = Vec::new();
        e.store.get(&info.hash).await.unwrap().read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
        assert!(e.store.delete(&info.hash).await.unwrap());
    });
});
