//! Hashing a file behind the writer that fills it.
//!
//! A blob written to a local file (a worker's live output file kept as its blob, or
//! [`super::DirStore`]'s temporary file) is hashed as it is written. Hashing on the
//! writing thread puts SHA-256 in series with the copy into the file; handing each
//! chunk to another thread costs a wake-up per chunk. Instead a [`Behind`] reads the
//! file back on tokio's blocking pool, whole [`STEP`]s at a time, as the writer
//! declares them written: the hash overlaps the writes, at about one task per step.
//! No thread waits for the writer: a task is started only for steps already in the
//! file (at most [`MAX_TASK`] of them), and the next when it is done. After hashing a
//! step it asks the kernel to start writing it to disk (`sync_file_range`, Linux), so
//! the fsync at the end finds little left to write.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::hash::Hasher;

/// Bytes read back and hashed at a time.
pub(crate) const STEP: u64 = 1 << 20;

/// The most bytes one hashing task takes on: a task of a dropped [`Behind`] ends
/// within a step, and one still running when more is ready hands the rest to the next.
const MAX_TASK: u64 = 8 * STEP;

/// The hash of the bytes so far, and the buffer steps are read into.
type State = (Hasher, Vec<u8>);

/// Where a task leaves its result (looked at without awaiting it).
type Done = Arc<Mutex<Option<std::io::Result<State>>>>;

/// A file being hashed behind its writer (see the module's documentation). Dropped
/// before its hash is finished, a task still running stops at its next step.
pub(crate) struct Behind {
    file: Arc<std::fs::File>,
    stop: Arc<AtomicBool>,
    /// The hash so far, while no task runs.
    idle: Option<State>,
    /// The task hashing now, and where it leaves its result.
    busy: Option<(JoinHandle<()>, Done)>,
    /// Bytes handed to tasks so far (hashed, or being hashed).
    handed: u64,
    /// The first failure of a task, reported by [`Behind::finish`].
    failed: Option<std::io::Error>,
}

impl Behind {
    /// Hashes `file` (open for reading) from its start, as its bytes are declared
    /// written. Needs a tokio runtime (the tasks run on its blocking pool).
    pub(crate) fn start(file: std::fs::File) -> Behind {
        Behind {
            file: Arc::new(file),
            stop: Arc::default(),
            idle: Some((Hasher::new(), Vec::new())),
            busy: None,
            handed: 0,
            failed: None,
        }
    }

    /// Bytes `[0, n)` are in the file: once no task runs, the whole steps among them
    /// not hashed yet are handed to a new one.
    pub(crate) fn ready(&mut self, n: u64) {
        if let Some((_, done)) = &self.busy {
            let Some(result) = done.lock().ok().and_then(|mut d| d.take()) else {
                return; // still hashing (or it panicked: `finish` reports it)
            };
            self.busy = None;
            match result {
                Ok(state) => self.idle = Some(state),
                Err(e) => self.failed = Some(e),
            }
        }
        let to = (n / STEP * STEP).min(self.handed + MAX_TASK);
        if to > self.handed {
            if let Some(state) = self.idle.take() {
                self.busy = Some(self.hash_until(state, to));
            }
        }
    }

    /// The file's first `n` bytes are all of it: the hash of them, once hashed.
    pub(crate) async fn finish(mut self, n: u64) -> std::io::Result<Hasher> {
        if let Some(busy) = self.busy.take() {
            self.idle = Some(ended(busy).await?);
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let state = self.idle.take().ok_or_else(gone)?;
        let (hasher, _) = ended(self.hash_until(state, n)).await?;
        Ok(hasher)
    }

    /// A task hashing from where `state` stopped up to byte `to`.
    fn hash_until(&mut self, state: State, to: u64) -> (JoinHandle<()>, Done) {
        self.handed = to;
        let (file, stop) = (self.file.clone(), self.stop.clone());
        let done = Done::default();
        let theirs = done.clone();
        let task = tokio::task::spawn_blocking(move || {
            let result = hash_range(&file, &stop, state, to);
            if let Ok(mut d) = theirs.lock() {
                *d = Some(result);
            }
        });
        (task, done)
    }
}

/// The result of a task, once it ended.
async fn ended((task, done): (JoinHandle<()>, Done)) -> std::io::Result<State> {
    task.await.map_err(|_| gone())?;
    let result = done.lock().ok().and_then(|mut d| d.take());
    result.unwrap_or_else(|| Err(gone()))
}

impl Drop for Behind {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("hashing stopped before its end")
}

/// Hashes `file` from where `hasher` stopped up to byte `to`, a step at a time,
/// starting each hashed step's writeback; stops early (an error) once `stop` is set.
fn hash_range(
    file: &std::fs::File,
    stop: &AtomicBool,
    (mut hasher, mut buf): State,
    to: u64,
) -> std::io::Result<State> {
    while hasher.len() < to {
        if stop.load(Ordering::SeqCst) {
            return Err(gone());
        }
        let from = hasher.len();
        let len = usize::try_from((to - from).min(STEP)).map_err(std::io::Error::other)?;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let chunk = &mut buf[..len];
        file.read_exact_at(chunk, from)?;
        hasher.update(chunk);
        write_behind(file, from, len as u64);
    }
    Ok((hasher, buf))
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
    fn a_stopped_task_ends_at_its_next_step_with_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, vec![7u8; usize::try_from(STEP).unwrap() * 2]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let stop = AtomicBool::new(true);
        let state = (Hasher::new(), Vec::new());
        assert!(hash_range(&file, &stop, state, STEP * 2).is_err());
        let stop = AtomicBool::new(false);
        let (hasher, _) = hash_range(&file, &stop, (Hasher::new(), Vec::new()), STEP * 2).unwrap();
        assert_eq!(hasher.len(), STEP * 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_whole_steps_are_handed_out_before_the_end_and_at_most_max_task() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let total = MAX_TASK + STEP * 2 + 5;
        std::fs::write(&path, vec![1u8; usize::try_from(total).unwrap()]).unwrap();
        let mut behind = Behind::start(std::fs::File::open(&path).unwrap());
        behind.ready(STEP - 1);
        assert_eq!(behind.handed, 0, "less than a step is not handed out");
        behind.ready(total);
        assert_eq!(behind.handed, MAX_TASK, "one task takes at most MAX_TASK");
        let hasher = behind.finish(total).await.unwrap();
        assert_eq!(hasher.len(), total);
        let want = crate::Hash::of(&vec![1u8; usize::try_from(total).unwrap()]);
        assert_eq!(hasher.finish(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_ended_is_taken_up_even_when_the_callers_budget_is_spent() {
        // A reading loop whose reads never wait spends its task's coop budget; a
        // join handle polled then reads as pending although its task ended.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let total = STEP * 3;
        std::fs::write(&path, vec![3u8; usize::try_from(total).unwrap()]).unwrap();
        let mut behind = Behind::start(std::fs::File::open(&path).unwrap());
        behind.ready(STEP);
        let done = behind.busy.as_ref().unwrap().1.clone();
        while done.lock().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        while tokio::task::coop::has_budget_remaining() {
            tokio::task::coop::consume_budget().await;
        }
        behind.ready(total);
        assert_eq!(behind.handed, total, "the next steps are handed out");
        let hasher = behind.finish(total).await.unwrap();
        assert_eq!(hasher.len(), total);
    }
}
