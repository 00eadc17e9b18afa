//! A local worker's live output files, and keeping one as its output's blob.
//!
//! While an attempt runs, [`LocalPort`](super::LocalPort) mirrors each output stream
//! into a file in its live directory (`<instance>.<attempt>.stdout`) for `logs -f`
//! and the dashboard. The file is made once the attempt has run for [`HOLD_FOR`] and
//! written to the stream, or written more than [`HOLD_BYTES`] to it; until then the
//! bytes are held in memory, so a short job with a small output, or a stream that
//! stays quiet, makes no file at all (a reader finds no file, which reads as no
//! output yet). When the stream ends, the file holds every byte of the output: if the
//! blob store can keep a local file ([`BlobStore::adopt`]), the file is hashed as it
//! fills, on the blocking pool ([`crate::blob::behind`]), and linked in as the blob,
//! so its bytes are written once, not twice.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::port::OutputStream;
use crate::blob::behind::Behind;
use crate::blob::{BlobInfo, BlobStore};
use crate::error::{Error, Result};
use crate::queue::ClaimToken;

/// Bytes read at a time from an output kept as its live file.
const CHUNK: usize = 256 * 1024;

/// Output held in memory before its live file is made (an output this small is kept
/// inline in the queue anyway).
const HOLD_BYTES: usize = crate::INLINE_MAX;

/// How long after an attempt starts its live files are made, whatever it wrote: the
/// longest a live reader waits for bytes it could have read from a file.
const HOLD_FOR: Duration = Duration::from_millis(50);

/// One live file, shared by the sink that writes it and the port that may keep it.
#[derive(Debug)]
struct Mirror {
    path: PathBuf,
    held: Mutex<Held>,
    /// Bytes in the file so far (every write completes before its bytes are read on).
    written: AtomicU64,
}

/// A live file not made yet, and the bytes held for it.
#[derive(Debug, Default)]
struct Held {
    file: Option<std::fs::File>,
    bytes: Vec<u8>,
    /// Made at the next write, whatever its size ([`HOLD_FOR`] has passed).
    due: bool,
    /// Its sink is gone: never made from now on.
    closed: bool,
}

impl Mirror {
    fn lock(&self) -> std::io::Result<std::sync::MutexGuard<'_, Held>> {
        self.held
            .lock()
            .map_err(|_| std::io::Error::other("live file state poisoned"))
    }

    /// Makes the file, with the bytes held for it, if it is not made yet.
    fn make(&self, h: &mut Held) -> std::io::Result<()> {
        if h.closed {
            return Err(std::io::Error::other("live file closed"));
        }
        if h.file.is_none() {
            // Readable too: if it cannot be kept as the blob, it is read back.
            let mut f = std::fs::File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path)?;
            if let Err(e) = f.write_all(&h.bytes) {
                // Not left half written: the next try makes it anew.
                let _ = std::fs::remove_file(&self.path);
                return Err(e);
            }
            self.written
                .fetch_add(h.bytes.len() as u64, Ordering::SeqCst);
            h.bytes = Vec::new();
            h.file = Some(f);
        }
        Ok(())
    }

    /// Mirrors `buf`: held while the file is not due, else written to it.
    fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
        let mut h = self.lock()?;
        if h.file.is_none() && !h.due && h.bytes.len() + buf.len() <= HOLD_BYTES {
            h.bytes.extend_from_slice(buf);
            return Ok(buf.len());
        }
        self.make(&mut h)?;
        let mut f = h
            .file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no live file"))?;
        let n = f.write(buf)?;
        self.written.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    /// [`HOLD_FOR`] has passed: the file is made now, with what was held; if nothing
    /// was, at the first write (a quiet stream, like most jobs' stderr, makes none).
    fn due(&self) {
        let Ok(mut h) = self.lock() else { return };
        h.due = true;
        if h.bytes.is_empty() {
            return;
        }
        if let Err(e) = self.make(&mut h) {
            if !h.closed {
                tracing::warn!("live output {}: {e}", self.path.display());
            }
        }
    }

    /// The file (another handle on it), made now with what was held if need be.
    fn file(&self) -> std::io::Result<std::fs::File> {
        let mut h = self.lock()?;
        self.make(&mut h)?;
        let f = h
            .file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no live file"))?;
        f.try_clone()
    }
}

/// Which attempt's stream a live file mirrors.
type Key = (i64, i64, OutputStream);

/// The live files of the attempts running now, by attempt and stream.
#[derive(Debug, Clone, Default)]
pub(super) struct Mirrors(Arc<Mutex<HashMap<Key, Arc<Mirror>>>>);

impl Mirrors {
    /// The live file of attempt `t`'s `stream` in `dir`, made when its first bytes are
    /// due (see the module's documentation); it is removed when the returned sink is
    /// dropped.
    pub(super) fn create(
        &self,
        dir: &std::path::Path,
        t: &ClaimToken,
        stream: OutputStream,
    ) -> LiveFile {
        let path = dir.join(format!("{}.{}.{}", t.id, t.token, stream.name()));
        let mirror = Arc::new(Mirror {
            path,
            held: Mutex::default(),
            written: AtomicU64::new(0),
        });
        let key = (t.id, t.token, stream);
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, mirror.clone());
        }
        // The file made after HOLD_FOR, unless the sink is gone by then.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let later = Arc::downgrade(&mirror);
            rt.spawn(async move {
                tokio::time::sleep(HOLD_FOR).await;
                if let Some(m) = later.upgrade() {
                    m.due();
                }
            });
        }
        LiveFile {
            mirror,
            key,
            mirrors: self.clone(),
        }
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
        // Made now if it was not yet; if it cannot be, the stream is put instead.
        let file = mirror.file().ok()?;
        Some(keep(blobs, (&mirror, &file), reader).await)
    }
}

/// Reads `reader` to its end, hashing `mirror` (which gets the same bytes) behind
/// it, and keeps the mirror as the blob; copies it into `blobs` if the store cannot
/// keep this file. If the mirror misses bytes (a write to it failed), the output is
/// put instead: what the file holds, then the rest of the stream.
async fn keep(
    blobs: &dyn BlobStore,
    (mirror, file): (&Mirror, &std::fs::File),
    reader: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<BlobInfo> {
    let theirs = file
        .try_clone()
        .map_err(|e| Error::io("duplicate", &mirror.path, e))?;
    let mut behind = Behind::start(theirs);
    let mut seen = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| Error::Stream {
            what: "read output".into(),
            source: e,
        })?;
        // Every byte went to the mirror before it reached this reader.
        let written = mirror.written.load(Ordering::SeqCst);
        if written < seen + n as u64 {
            // `written >= seen`: the bytes up to this chunk were all checked.
            drop(behind);
            let missed = usize::try_from(written - seen).unwrap_or(0);
            let held = reopen(file, &mirror.path).await?.take(written);
            let mut rest = held
                .chain(std::io::Cursor::new(buf[missed..n].to_vec()))
                .chain(reader);
            return blobs.put(&mut rest).await;
        }
        if n == 0 {
            break;
        }
        seen += n as u64;
        behind.ready(seen);
    }
    drop(buf);
    let hasher = behind
        .finish(seen)
        .await
        .map_err(|e| Error::io("hash", &mirror.path, e))?;
    let info = BlobInfo {
        size: hasher.len(),
        hash: hasher.finish(),
    };
    if blobs.adopt(file, info).await? {
        return Ok(info);
    }
    // Not linked (another file system, or one without hard links): copy the file.
    let stored = blobs.put(&mut reopen(file, &mirror.path).await?).await?;
    if stored != info {
        let e = std::io::Error::other("changed after its output ended");
        return Err(Error::io("copy", &mirror.path, e));
    }
    Ok(stored)
}

/// Live file `file` (named `path`) to be read from its start, even if its name is
/// gone: another handle on it, at offset 0 (the offset is shared with the sink's,
/// which writes nothing more: its stream ended, or a write failed and dropped it).
async fn reopen(file: &std::fs::File, path: &std::path::Path) -> Result<tokio::fs::File> {
    use tokio::io::AsyncSeekExt;
    let f = file.try_clone().map_err(|e| Error::io("open", path, e))?;
    let mut f = tokio::fs::File::from_std(f);
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| Error::io("seek", path, e))?;
    Ok(f)
}

/// A live output file, removed when dropped.
pub(super) struct LiveFile {
    mirror: Arc<Mirror>,
    key: Key,
    mirrors: Mirrors,
}

impl Write for LiveFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.mirror.write(buf)
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
        // A file never made is never removed (nor made later).
        let made = self.mirror.lock().map_or(true, |mut h| {
            h.closed = true;
            h.file.is_some()
        });
        if made {
            let _ = std::fs::remove_file(&self.mirror.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::DirStore;
    use crate::hash::Hash;

    const T: ClaimToken = ClaimToken { id: 7, token: 2 };

    /// A directory holding a blob store (`blobs/`) and the live files, and no mirrors.
    async fn fixture() -> (tempfile::TempDir, DirStore, Mirrors) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = DirStore::open(dir.path().join("blobs")).await.unwrap();
        (dir, blobs, Mirrors::default())
    }

    #[tokio::test]
    async fn a_live_file_that_missed_bytes_is_not_kept_but_the_output_is_stored_whole() {
        use std::os::unix::fs::MetadataExt;
        let (dir, blobs, mirrors) = fixture().await;
        let mut sink = mirrors.create(dir.path(), &T, OutputStream::Stdout);
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
        let (dir, blobs, mirrors) = fixture().await;
        let mut sink = mirrors.create(dir.path(), &T, OutputStream::Stderr);
        let path = dir.path().join("7.2.stderr");
        let data = vec![9u8; 40_000];
        sink.write_all(&data).unwrap();
        assert!(path.exists(), "made once past HOLD_BYTES");
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

    #[tokio::test]
    async fn a_short_small_output_makes_no_file_and_a_longer_run_makes_it_with_what_was_held() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::default();
        let path = dir.path().join("7.2.stdout");
        // Ended within HOLD_FOR, having written a little: no file, then or later.
        let mut quick = mirrors.create(dir.path(), &T, OutputStream::Stdout);
        quick.write_all(b"done\n").unwrap();
        assert!(!path.exists());
        drop(quick);
        tokio::time::sleep(HOLD_FOR * 2).await;
        assert!(!path.exists(), "never made");
        // Still running after HOLD_FOR: made with what was held, then appended to.
        let t = ClaimToken { id: 7, token: 3 };
        let path = dir.path().join("7.3.stdout");
        let mut slow = mirrors.create(dir.path(), &t, OutputStream::Stdout);
        slow.write_all(b"starting\n").unwrap();
        tokio::time::sleep(HOLD_FOR * 2).await;
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"starting\n",
            "made by the timer"
        );
        slow.write_all(b"more\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"starting\nmore\n");
        drop(slow);
        assert!(!path.exists(), "removed with its sink");
    }

    #[tokio::test]
    async fn a_quiet_stream_makes_no_file_until_its_first_write_after_the_hold() {
        let dir = tempfile::tempdir().unwrap();
        let mirrors = Mirrors::default();
        let path = dir.path().join("7.2.stderr");
        let mut quiet = mirrors.create(dir.path(), &T, OutputStream::Stderr);
        tokio::time::sleep(HOLD_FOR * 2).await;
        assert!(!path.exists(), "nothing to show: no file");
        // The hold is over: the first bytes go straight to a new file.
        quiet.write_all(b"late\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"late\n");
        drop(quiet);
        assert!(!path.exists(), "removed with its sink");
    }
}
