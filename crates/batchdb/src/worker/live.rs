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
    /// is not kept: what it holds and the rest of the stream are put instead.
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
/// blob; copies it into `blobs` if the store cannot keep this file. If the mirror
/// misses bytes (a write to it failed), the output is put instead: what the file
/// holds, then the rest of the stream.
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
        // Every byte went to the mirror before it reached this reader.
        let (before, written) = (hasher.len(), mirror.written.load(Ordering::SeqCst));
        if written < before + n as u64 {
            // `written >= before`: the bytes up to this chunk were all checked.
            let missed = usize::try_from(written - before).unwrap_or(0);
            let held = mirror.reopen()?.take(written);
            let mut rest = held
                .chain(std::io::Cursor::new(buf[missed..n].to_vec()))
                .chain(reader);
            return blobs.put(&mut rest).await;
        }
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
    if blobs.adopt(&mirror.file, info).await? {
        return Ok(info);
    }
    // Another file system: copy the file.
    let stored = blobs.put(&mut mirror.reopen()?).await?;
    if stored != info {
        let e = std::io::Error::other("changed after its output ended");
        return Err(Error::io("copy", &mirror.path, e));
    }
    Ok(stored)
}

impl Mirror {
    /// The live file opened anew (its own offset, at the start), even if its name
    /// is gone.
    fn reopen(&self) -> Result<tokio::fs::File> {
        let own = PathBuf::from(format!("/proc/self/fd/{}", fd_of(&self.file)));
        let f = std::fs::File::open(&own).map_err(|e| Error::io("open", &self.path, e))?;
        Ok(tokio::fs::File::from_std(f))
    }
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
    async fn a_live_file_that_missed_bytes_is_not_kept_but_the_output_is_stored_whole() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let blobs = DirStore::open(dir.path().join("blobs")).await.unwrap();
        let mirrors = Mirrors::default();
        let mut sink = mirrors
            .create(dir.path(), &T, OutputStream::Stdout)
            .unwrap();
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        // The mirror got only part of what the reader yields (a write to it failed
        // at byte 300,000, in the middle of the reader's second chunk).
        sink.write_all(&data[..300_000]).unwrap();
        let info = mirrors
            .store(&blobs, &T, OutputStream::Stdout, &mut &data[..])
            .await
            .expect("a live file to keep")
            .unwrap();
        assert_eq!(info.hash, Hash::of(&data));
        assert_eq!(info.size, 600_000);
        let blob = blobs.path_of(&info.hash);
        assert_eq!(std::fs::read(&blob).unwrap(), data, "stored whole");
        let live = std::fs::metadata(dir.path().join("7.2.stdout")).unwrap();
        assert_ne!(
            std::fs::metadata(&blob).unwrap().ino(),
            live.ino(),
            "a copy"
        );
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
