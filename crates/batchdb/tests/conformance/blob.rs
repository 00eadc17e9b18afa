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
