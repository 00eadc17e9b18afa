//! Hashing a file behind the writer that fills it.
//!
//! A blob written to a local file (a worker's live output file kept as its blob, or
//! [`super::DirStore`]'s temporary file) is hashed as it is written. Hashing on the
//! writing thread puts SHA-256 in series with the copy into the file; handing each
//! chunk to another thread costs a wake-up per chunk. Instead a [`Behind`] reads the
//! file back on a blocking thread of its own, a [`STEP`] at a time, woken only when a
//! whole step more is in the file (or at the end): the hash overlaps the writes, at
//! one wake-up per step. After hashing a step it asks the kernel to start writing it
//! to disk (`sync_file_range`, Linux), so the fsync at the end finds little left to
//! write.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::hash::Hasher;

/// Bytes read back and hashed at a time.
pub(crate) const STEP: u64 = 1 << 20;

/// What the writer tells the hashing thread.
#[derive(Debug, Default)]
struct Shared {
    /// Bytes `[0, ready)` are in the file.
    ready: AtomicU64,
    /// Guards the waits on [`Shared::wake`]: (the stream ended, the hash is wanted
    /// no more).
    state: Mutex<(bool, bool)>,
    wake: Condvar,
}

impl Shared {
    /// Sets the end or the stop, and wakes the hashing thread.
    fn set(&self, end: bool, stop: bool) {
        if let Ok(mut s) = self.state.lock() {
            s.0 |= end;
            s.1 |= stop;
        }
        self.wake.notify_one();
    }

    /// Waits until the next step may be hashed: returns the end of the bytes to
    /// hash next (`hashed` if there are none and the stream ended), or `None` when
    /// stopped.
    fn next(&self, hashed: u64) -> Option<u64> {
        let mut s = self.state.lock().ok()?;
        loop {
            let (ended, stopped) = *s;
            if stopped {
                return None;
            }
            let ready = self.ready.load(Ordering::SeqCst);
            if ended || ready >= hashed + STEP {
                return Some(ready.min(hashed + STEP));
            }
            s = self.wake.wait(s).ok()?;
        }
    }
}

/// A file being hashed behind its writer (see the module's documentation). Dropped
/// before [`Behind::finish`], its thread stops at its next step.
pub(crate) struct Behind {
    shared: Arc<Shared>,
    task: Option<tokio::task::JoinHandle<std::io::Result<Hasher>>>,
    /// `ready` when the hashing thread was last woken.
    woken: u64,
}

impl Behind {
    /// Starts hashing `file` (open for reading) from its start, as its bytes are
    /// declared ready. Needs a tokio runtime (the thread is from its blocking pool).
    pub(crate) fn start(file: std::fs::File) -> Behind {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let task = tokio::task::spawn_blocking(move || hash_behind(&file, &theirs));
        Behind {
            shared,
            task: Some(task),
            woken: 0,
        }
    }

    /// Bytes `[0, n)` are in the file: wakes the hashing thread once a whole step
    /// more is ready.
    pub(crate) fn ready(&mut self, n: u64) {
        self.shared.ready.store(n, Ordering::SeqCst);
        if n / STEP > self.woken / STEP {
            self.woken = n;
            // Taking the lock orders this wake-up after the thread's last look.
            drop(self.shared.state.lock());
            self.shared.wake.notify_one();
        }
    }

    /// The file's first `n` bytes are all of it: the hash of them, once hashed.
    pub(crate) async fn finish(mut self, n: u64) -> std::io::Result<Hasher> {
        self.shared.ready.store(n, Ordering::SeqCst);
        self.shared.set(true, false);
        let task = self.task.take().ok_or_else(gone)?;
        task.await.map_err(|_| gone())?
    }
}

impl Drop for Behind {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.shared.set(false, true);
        }
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("hashing thread gone")
}

/// The hashing thread: hashes `file` step by step as `shared` declares its bytes
/// ready, starting each hashed step's writeback, until the stream's end.
fn hash_behind(file: &std::fs::File, shared: &Shared) -> std::io::Result<Hasher> {
    let mut hasher = Hasher::new();
    let mut buf = vec![0u8; usize::try_from(STEP).unwrap_or(1 << 20)];
    loop {
        let hashed = hasher.len();
        let end = shared.next(hashed).ok_or_else(gone)?;
        if end == hashed {
            return Ok(hasher);
        }
        let len = usize::try_from(end - hashed).map_err(std::io::Error::other)?;
        let chunk = &mut buf[..len];
        file.read_exact_at(chunk, hashed)?;
        hasher.update(chunk);
        write_behind(file, hashed, end - hashed);
    }
}

/// Asks the kernel to start writing `[offset, offset + len)` of `file` to disk, not
/// waiting for it: a hint, whose failure changes nothing (the fsync at the end
/// writes whatever is left).
fn write_behind(file: &std::fs::File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a plain system call on an open descriptor that outlives it.
    let _ = unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hash_behind_is_the_hash_of_the_bytes_written_in_any_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let mut w = std::fs::File::create(&path).unwrap();
        let mut behind = Behind::start(std::fs::File::open(&path).unwrap());
        // 3.5 steps in uneven chunks, so steps end mid-chunk and the tail is short.
        let total = usize::try_from(STEP).unwrap() * 7 / 2;
        let bytes: Vec<u8> = (0..total)
            .map(|i| u8::try_from(i * 31 % 251).unwrap())
            .collect();
        let mut n = 0;
        for chunk in bytes.chunks(12_345) {
            w.write_all(chunk).unwrap();
            n += chunk.len() as u64;
            behind.ready(n);
        }
        let hasher = behind.finish(n).await.unwrap();
        assert_eq!(hasher.len(), total as u64);
        assert_eq!(hasher.finish(), crate::Hash::of(&bytes));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_shorter_than_a_step_is_hashed_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"abc").unwrap();
        let behind = Behind::start(std::fs::File::open(&path).unwrap());
        let hasher = behind.finish(3).await.unwrap();
        assert_eq!(hasher.finish(), crate::Hash::of(b"abc"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_missing_bytes_it_was_said_to_hold_is_an_error_not_a_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, b"abc").unwrap();
        let behind = Behind::start(std::fs::File::open(&path).unwrap());
        assert!(behind.finish(10).await.is_err());
    }

    #[test]
    fn a_stopped_hash_wakes_and_ends_though_no_step_is_ready() {
        let shared = Arc::new(Shared::default());
        let theirs = shared.clone();
        let waiter = std::thread::spawn(move || theirs.next(0));
        std::thread::sleep(std::time::Duration::from_millis(20));
        shared.set(false, true);
        assert_eq!(waiter.join().unwrap(), None);
    }

    #[test]
    fn the_next_step_waits_for_a_whole_step_until_the_end() {
        let shared = Shared::default();
        shared.ready.store(STEP * 2 + 5, Ordering::SeqCst);
        assert_eq!(shared.next(0), Some(STEP));
        assert_eq!(shared.next(STEP), Some(STEP * 2));
        shared.set(true, false);
        assert_eq!(shared.next(STEP * 2), Some(STEP * 2 + 5));
        assert_eq!(shared.next(STEP * 2 + 5), Some(STEP * 2 + 5));
    }
}
