//! Blob-store conformance tests: every backend must pass each of these.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use batchdb::{Error, Hash};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::Backend;

async fn read_all(b: &Backend, h: &Hash) -> Vec<u8> {
    let mut r = b.blobs.get(h).await.expect("get");
    let mut v = Vec::new();
    r.read_to_end(&mut v).await.expect("read");
    v
}

pub async fn roundtrip_sizes(b: &Backend) {
    let mut big = vec![0u8; 5 * 1024 * 1024 + 7];
    for (i, x) in big.iter_mut().enumerate() {
        *x = (i * 31 % 251) as u8;
    }
    for data in [
        Vec::new(),
        b"sleep 5; date".to_vec(),
        b"nul\0bytes\0\xff\xfe".to_vec(),
        big,
    ] {
        let info = b.blobs.put(&mut &data[..]).await.unwrap();
        assert_eq!(info.hash, Hash::of(&data));
        assert_eq!(info.size, data.len() as u64);
        assert!(b.blobs.contains(&info.hash).await.unwrap());
        assert_eq!(read_all(b, &info.hash).await, data);
    }
}

pub async fn identical_content_stored_once(b: &Backend) {
    let a = b.blobs.put(&mut &b"same"[..]).await.unwrap();
    let c = b.blobs.put(&mut &b"same"[..]).await.unwrap();
    assert_eq!(a, c);
    assert_eq!(read_all(b, &a.hash).await, b"same");
}

pub async fn missing_blob_is_not_found(b: &Backend) {
    let h = Hash::of(b"never stored");
    assert!(!b.blobs.contains(&h).await.unwrap());
    match b.blobs.get(&h).await {
        Err(Error::BlobNotFound(x)) => assert_eq!(x, h),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("missing blob opened"),
    }
}

/// Yields some bytes, then fails, like a client that disconnects mid-upload.
struct Broken(usize);

impl AsyncRead for Broken {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.0 == 0 {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone")));
        }
        let n = self.0.min(buf.remaining()).min(1000);
        buf.put_slice(&vec![b'x'; n]);
        self.0 -= n;
        Poll::Ready(Ok(()))
    }
}

pub async fn failed_put_stores_nothing(b: &Backend) {
    let err = b.blobs.put(&mut Broken(10_000)).await.unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
    let partial = Hash::of(&[b'x'; 10_000]);
    assert!(!b.blobs.contains(&partial).await.unwrap());
}

pub async fn concurrent_puts_of_same_content(b: &Backend) {
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (blobs, data) = (b.blobs.clone(), data.clone());
        tasks.push(tokio::spawn(async move { blobs.put(&mut &data[..]).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().hash, Hash::of(&data));
    }
    assert_eq!(read_all(b, &Hash::of(&data)).await, data);
}

pub async fn delete_removes(b: &Backend) {
    let a = b.blobs.put(&mut &b"gone soon"[..]).await.unwrap();
    assert!(b.blobs.delete(&a.hash).await.unwrap());
    assert!(!b.blobs.contains(&a.hash).await.unwrap());
    assert!(!b.blobs.delete(&a.hash).await.unwrap());
}

pub async fn list_reports_every_blob(b: &Backend) {
    let mut want = std::collections::HashSet::new();
    for n in 0..50u32 {
        want.insert(b.blobs.put(&mut &n.to_le_bytes()[..]).await.unwrap().hash);
    }
    let listed: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(b.blobs.list()).await;
    let got: std::collections::HashSet<Hash> =
        listed.into_iter().map(|e| e.unwrap().hash).collect();
    assert_eq!(got, want);
}

/// `len` bytes of a fixed pseudo-random pattern (no run of it repeats at a part size).
fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub async fn get_range_reads_parts_clamped(b: &Backend) {
    let data = pattern(100_000);
    let info = b.blobs.put(&mut &data[..]).await.unwrap();
    for (range, want) in [
        (0..10, &data[0..10]),
        (40_000..40_123, &data[40_000..40_123]),
        (99_990..100_000, &data[99_990..]),
        (99_990..1_000_000, &data[99_990..]),
        (0..u64::MAX, &data[..]),
        (5..5, &data[0..0]),
        (100_000..100_010, &data[0..0]),
        (200_000..300_000, &data[0..0]),
    ] {
        let mut r = b.blobs.get_range(&info.hash, range.clone()).await.unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert!(got == want, "range {range:?}: {} bytes", got.len());
    }
    let missing = Hash::of(b"never stored");
    match b.blobs.get_range(&missing, 0..10).await {
        Err(Error::BlobNotFound(h)) => assert_eq!(h, missing),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("missing blob opened"),
    }
}

async fn modified_of(b: &Backend, h: &Hash) -> std::time::SystemTime {
    let listed: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(b.blobs.list()).await;
    listed
        .into_iter()
        .map(|e| e.unwrap())
        .find(|e| e.hash == *h)
        .expect("blob listed")
        .modified
        .expect("store reports modification times")
}

/// `touch`, and storing the same content again, make `list`'s `modified` fresh, which
/// `gc`'s grace period relies on. (S3 times have 1 s resolution: wait longer.)
pub async fn touch_and_store_again_refresh_modified(b: &Backend) {
    let info = b.blobs.put(&mut &b"touch me"[..]).await.unwrap();
    let first = modified_of(b, &info.hash).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    b.blobs.touch(&info.hash).await.unwrap();
    let touched = modified_of(b, &info.hash).await;
    assert!(touched > first, "{touched:?} > {first:?}");
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(b.blobs.put(&mut &b"touch me"[..]).await.unwrap(), info);
    let again = modified_of(b, &info.hash).await;
    assert!(again > touched, "{again:?} > {touched:?}");
    assert_eq!(read_all(b, &info.hash).await, b"touch me");
    let missing = Hash::of(b"never stored");
    assert!(b.blobs.touch(&missing).await.is_err());
}

/// Larger than any backend's single-request or in-memory threshold (S3: 8 MiB parts).
const LARGE: usize = 20 * 1024 * 1024 + 12_345;

pub async fn large_blob_roundtrips(b: &Backend) {
    let data = pattern(LARGE);
    let info = b.blobs.put(&mut &data[..]).await.unwrap();
    assert_eq!(info.hash, Hash::of(&data));
    assert_eq!(info.size, LARGE as u64);
    assert!(b.blobs.contains(&info.hash).await.unwrap());
    assert!(read_all(b, &info.hash).await == data, "content differs");
    // Stored again: same answer, still one blob.
    assert_eq!(b.blobs.put(&mut &data[..]).await.unwrap(), info);
    let listed: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(b.blobs.list()).await;
    let listed: Vec<_> = listed.into_iter().map(|e| e.unwrap()).collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].hash, listed[0].size), (info.hash, info.size));
}

pub async fn failed_large_put_leaves_nothing_listed(b: &Backend) {
    let err = b.blobs.put(&mut Broken(LARGE)).await.unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
    let listed: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(b.blobs.list()).await;
    assert!(listed.is_empty(), "{listed:?}");
    assert!(
        !b.blobs
            .contains(&Hash::of(&vec![b'x'; LARGE]))
            .await
            .unwrap()
    );
}

/// Yields `n` bytes, then never ends: a producer that hangs.
struct Stalled(usize);

impl AsyncRead for Stalled {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.0 == 0 {
            return Poll::Pending;
        }
        let n = self.0.min(buf.remaining()).min(64 * 1024);
        buf.put_slice(&vec![b'y'; n]);
        self.0 -= n;
        Poll::Ready(Ok(()))
    }
}

pub async fn dropped_put_leaves_nothing_listed(b: &Backend) {
    for n in [1000, LARGE] {
        let blobs = b.blobs.clone();
        let task = tokio::spawn(async move { blobs.put(&mut Stalled(n)).await });
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
    }
    // Give a backend's background cleanup a moment; nothing may become visible.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let listed: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(b.blobs.list()).await;
    assert!(listed.is_empty(), "{listed:?}");
}

/// A local file holding `data`, written and flushed.
fn local_file(data: &[u8]) -> (tempfile::TempDir, std::fs::File) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(data)
        .unwrap();
    let file = std::fs::File::open(&path).unwrap();
    (dir, file)
}

pub async fn adopt_keeps_a_file_whole_or_stores_nothing(b: &Backend) {
    let data = pattern(300_000);
    let info = batchdb::blob::BlobInfo {
        hash: Hash::of(&data),
        size: data.len() as u64,
    };
    let (_dir, file) = local_file(&data);
    let kept = b.blobs.adopt(&file, info).await.unwrap();
    assert_eq!(kept, b.blobs.adopts_files());
    if !kept {
        assert!(
            !b.blobs.contains(&info.hash).await.unwrap(),
            "stored nothing"
        );
        return;
    }
    assert!(read_all(b, &info.hash).await == data, "content differs");
    assert_eq!(b.blobs.size(&info.hash).await.unwrap(), info.size);
    // The same content again (from another file, or put) is harmless: still one blob.
    let (_again, other) = local_file(&data);
    assert!(b.blobs.adopt(&other, info).await.unwrap());
    assert_eq!(b.blobs.put(&mut &data[..]).await.unwrap(), info);
    assert!(read_all(b, &info.hash).await == data, "content differs");
    // A file that is not as long as its caller hashed is refused, and stores nothing.
    let short = pattern(1000);
    let (_short, file) = local_file(&short[..999]);
    let claimed = batchdb::blob::BlobInfo {
        hash: Hash::of(&short),
        size: 1000,
    };
    let err = b.blobs.adopt(&file, claimed).await.unwrap_err();
    assert!(err.to_string().contains("not the 1000 hashed"), "{err}");
    assert!(!b.blobs.contains(&claimed.hash).await.unwrap());
}
