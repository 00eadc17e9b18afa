//! A local worker's live output files, and keeping one as its output's blob.
//!
//! While an attempt runs, [`LocalPort`](super::LocalPort) mirrors each output stream
//! into a file in its live directory (`<instance>.<attempt>.stdout`) for `logs -f`
//! and the dashboard. When the stream ends, that file already holds every byte of the
//! output: if the blob store can keep a local file ([`BlobStore::adopt`]), the output
//! is hashed as it passes and the file is linked in as the blob, so its bytes are
//! written once, not twice.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};

use super::port::OutputStream;
use crate::blob::{BlobInfo, BlobStore};
use crate::error::{Error, Result};
use crate::hash::Hasher;
use crate::queue::ClaimToken;

/// Bytes read at a time while hashing an output.
const CHUNK: usize = 256 * 1024;

/// One live file, shared by the sink that writes it and the port that may keep it.
#[derive(Debug)]
struct Mirror {
    file: std::fs::File,
    path: PathBuf,
    /// Bytes written so far (every write completes before its bytes are read on).
    written: AtomicU64,
}

/// Which attempt's stream a live file mirrors.
type Key = (i64, i64, OutputStream);

/// The live files of the attempts running now, by attempt and stream.
#[derive(Debug, Clone, Default)]
pub(super) struct Mirrors(Arc<Mutex<HashMap<Key, Arc<Mirror>>>>);

impl Mirrors {
    /// Creates the live file of attempt `t`'s `stream` in `dir`; it is removed when
    /// the returned sink is dropped.
    pub(super) fn create(
        &self,
        dir: &std::path::Path,
        t: &ClaimToken,
        stream: OutputStream,
    ) -> std::io::Result<LiveFile> {
        let path = dir.join(format!("{}.{}.{}", t.id, t.token, stream.name()));
        let file = std::fs::File::create(&path)?;
        let mirror = Arc::new(Mirror {
            file,
            path,
            written: AtomicU64::new(0),
        });
        let key = (t.id, t.token, stream);
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, mirror.clone());
        }
        Ok(LiveFile {
            mirror,
            key,
            mirrors: self.clone(),
        })
    }

    /// The live file of attempt `t`'s `stream`, while its sink is open.
    fn get(&self, t: &ClaimToken, stream: OutputStream) -> Option<Arc<Mirror>> {
        let m = self.0.lock().ok()?;
        m.get(&(t.id, t.token, stream)).cloned()
    }

    /// Stores attempt `t`'s `stream`, read from `reader` to its end, in `blobs` by
    /// keeping its live file as the blob; `None` if there is no live file to keep
    /// (none was made, or the store cannot keep local files) and nothing was read.
    ///
    /// A live file that missed bytes (a write to it failed, and its sink was dropped)
    /// cannot be the blob: that is an error of the store's, not of the job's.
    pub(super) async fn store(
        &self,
        blobs: &dyn BlobStore,
        t: &ClaimToken,
        stream: OutputStream,
        reader: &mut (dyn AsyncRead + Send + Unpin),
    ) -> Option<Result<BlobInfo>> {
        let mirror = self.get(t, stream).filter(|_| blobs.adopts_files())?;
        Some(keep(blobs, &mirror, reader).await)
    }
}

/// Hashes `reader` to its end and keeps `mirror`, which holds the same bytes, as the
/// blob; copies it into `blobs` if the store cannot keep this file.
async fn keep(
    blobs: &dyn BlobStore,
    mirror: &Mirror,
    reader: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<BlobInfo> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| Error::Stream {
            what: "read output".into(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    drop(buf);
    let info = BlobInfo {
        size: hasher.len(),
        hash: hasher.finish(),
    };
    let written = mirror.written.load(Ordering::SeqCst);
    if written != info.size {
        let e = std::io::Error::other(format!(
            "the live file holds {written} of the output's {} bytes",
            info.size
        ));
        return Err(Error::io("mirror", &mirror.path, e));
    }
    if blobs.adopt(&mirror.file, info).await? {
        return Ok(info);
    }
    // Another file system: copy the file (a new open file, at its start).
    let own = PathBuf::from(format!("/proc/self/fd/{}", fd_of(&mirror.file)));
    let copy = std::fs::File::open(&own).map_err(|e| Error::io("open", &mirror.path, e))?;
    let stored = blobs.put(&mut tokio::fs::File::from_std(copy)).await?;
    if stored != info {
        let e = std::io::Error::other("changed after its output ended");
        return Err(Error::io("copy", &mirror.path, e));
    }
    Ok(stored)
}

fn fd_of(file: &std::fs::File) -> i32 {
    use std::os::fd::AsRawFd;
    file.as_raw_fd()
}

/// A live output file, removed when dropped.
pub(super) struct LiveFile {
    mirror: Arc<Mirror>,
    key: Key,
    mirrors: Mirrors,
}

impl Write for LiveFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = (&self.mirror.file).write(buf)?;
        self.mirror.written.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LiveFile {
    fn drop(&mut self) {
        if let Ok(mut m) = self.mirrors.0.lock() {
            if m.get(&self.key)
                .is_some_and(|x| Arc::ptr_eq(x, &self.mirror))
            {
                m.remove(&self.key);
            }
        }
        let _ = std::fs::remove_file(&self.mirror.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::DirStore;
    use crate::hash::Hash;

    const T: ClaimToken = ClaimToken { id: 7, token: 2 };

    #[tokio::test]
    async fn a_live_file_that_missed_bytes_is_not_kept_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = DirStore::open(dir.path().join("blobs")).await.unwrap();
        let mirrors = Mirrors::default();
        let mut sink = mirrors
            .create(dir.path(), &T, OutputStream::Stdout)
            .unwrap();
        let data = vec![5u8; 40_000];
        // The mirror got only part of what the reader yields.
        sink.write_all(&data[..30_000]).unwrap();
        let stored = mirrors
            .store(&blobs, &T, OutputStream::Stdout, &mut &data[..])
            .await
            .expect("a live file to keep");
        let err = stored.unwrap_err();
        assert!(
            err.to_string()
                .contains("holds 30000 of the output's 40000"),
            "{err}"
        );
        assert!(!blobs.contains(&Hash::of(&data)).await.unwrap());
    }

    #[tokio::test]
    async fn a_whole_live_file_is_kept_and_its_name_goes_with_its_sink() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = DirStore::open(dir.path().join("blobs")).await.unwrap();
        let mirrors = Mirrors::default();
        let mut sink = mirrors
            .create(dir.path(), &T, OutputStream::Stderr)
            .unwrap();
        let path = dir.path().join("7.2.stderr");
        assert!(path.exists());
        let data = vec![9u8; 40_000];
        sink.write_all(&data).unwrap();
        // Not the stream it mirrors: nothing to keep, nothing read.
        assert!(
            mirrors
                .store(&blobs, &T, OutputStream::Stdout, &mut &data[..])
                .await
                .is_none()
        );
        let info = mirrors
            .store(&blobs, &T, OutputStream::Stderr, &mut &data[..])
            .await
            .expect("a live file to keep")
            .unwrap();
        assert_eq!(info.hash, Hash::of(&data));
        assert_eq!(std::fs::read(blobs.path_of(&info.hash)).unwrap(), data);
        drop(sink);
        assert!(!path.exists());
        assert!(mirrors.get(&T, OutputStream::Stderr).is_none());
        assert_eq!(std::fs::read(blobs.path_of(&info.hash)).unwrap(), data);
    }
}
