//! Hashing a file behind the writer that fills it.
//!
//! A blob written to a local file (a worker's live output file kept as its blob, or
//! [`super::DirStore`]'s temporary file) is hashed as it is written. Hashing on the
//! writing thread puts SHA-256 in series with the copy into the file; handing each
//! chunk to another thread costs a wake-up per chunk. Instead a [`Behind`] reads the
//! file back on tokio's blocking pool, whole [`STEP`]s at a time, as the writer
//! declares them written: the hash overlaps the writes. No thread waits for the
//! writer: a task is started once a whole step is in the file, hashes every whole
//! step written while it runs, and ends when it has caught up; the writer's next
//! declaration starts the next. After hashing a step it asks the kernel to start
//! writing it to disk (`sync_file_range`, Linux), so the fsync at the end finds little
//! left to write.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use crate::hash::Hasher;

/// Bytes read back and hashed at a time.
pub(crate) const STEP: u64 = 1 << 20;

/// What the writer tells its hashing tasks.
#[derive(Debug, Default)]
struct Mark {
    /// Bytes `[0, ready)` are in the file.
    ready: AtomicU64,
    /// The hash is wanted no more: a task stops at its next step.
    stop: AtomicBool,
}

/// The hash of the bytes so far, and the buffer steps are read into.
type State = (Hasher, Vec<u8>);

/// Where a task leaves its result (looked at without awaiting it).
type Done = Arc<Mutex<Option<std::io::Result<State>>>>;

/// A file being hashed behind its writer (see the module's documentation). Dropped
/// before its hash is finished, a task still running stops at its next step.
pub(crate) struct Behind {
    file: Arc<std::fs::File>,
    mark: Arc<Mark>,
    /// The hash so far, while no task runs.
    idle: Option<State>,
    /// The task hashing now, and where it leaves its result.
    busy: Option<(JoinHandle<()>, Done)>,
    /// The first failure of a task, reported by [`Behind::finish`].
    failed: Option<std::io::Error>,
}

impl Behind {
    /// Hashes `file` (open for reading) from its start, as its bytes are declared
    /// written. Needs a tokio runtime (the tasks run on its blocking pool).
    pub(crate) fn start(file: std::fs::File) -> Behind {
        Behind {
            file: Arc::new(file),
            mark: Arc::default(),
            idle: Some((Hasher::new(), Vec::new())),
            busy: None,
            failed: None,
        }
    }

    /// Bytes `[0, n)` are in the file: a task running hashes their whole steps too;
    /// if none runs and a whole step is not hashed yet, one is started.
    pub(crate) fn ready(&mut self, n: u64) {
        self.mark.ready.store(n, Ordering::SeqCst);
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
        let behind = |(h, _): &State| h.len() < n / STEP * STEP;
        if self.idle.as_ref().is_some_and(behind) {
            if let Some(state) = self.idle.take() {
                self.busy = Some(self.hash(state, None));
            }
        }
    }

    /// The file's first `n` bytes are all of it: the hash of them, once hashed.
    pub(crate) async fn finish(mut self, n: u64) -> std::io::Result<Hasher> {
        self.mark.ready.store(n, Ordering::SeqCst);
        if let Some(busy) = self.busy.take() {
            self.idle = Some(ended(busy).await?);
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let state = self.idle.take().ok_or_else(gone)?;
        let (hasher, _) = ended(self.hash(state, Some(n))).await?;
        Ok(hasher)
    }

    /// A task hashing from where `state` stopped: up to `end`, or while whole steps
    /// are ready.
    fn hash(&self, state: State, end: Option<u64>) -> (JoinHandle<()>, Done) {
        let (file, mark) = (self.file.clone(), self.mark.clone());
        let done = Done::default();
        let theirs = done.clone();
        let task = tokio::task::spawn_blocking(move || {
            let result = hash_range(&file, &mark, state, end);
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
        self.mark.stop.store(true, Ordering::SeqCst);
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("hashing stopped before its end")
}

/// Hashes `file` from where `hasher` stopped, a step at a time, up to `end`, or
/// (without one) while whole steps are ready by `mark`, starting each hashed step's
/// writeback; stops early (an error) once `mark` says stop.
fn hash_range(
    file: &std::fs::File,
    mark: &Mark,
    (mut hasher, mut buf): State,
    end: Option<u64>,
) -> std::io::Result<State> {
    loop {
        if mark.stop.load(Ordering::SeqCst) {
            return Err(gone());
        }
        let from = hasher.len();
        let to = end.unwrap_or_else(|| mark.ready.load(Ordering::SeqCst) / STEP * STEP);
        if from >= to {
            return Ok((hasher, buf));
        }
        let len = usize::try_from((to - from).min(STEP)).map_err(std::io::Error::other)?;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        let chunk = &mut buf[..len];
        file.read_exact_at(chunk, from)?;
        hasher.update(chunk);
        write_behind(file, from, len as u64);
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

    /// A file holding `bytes`, open for reading (with the directory that holds it).
    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        (dir, file)
    }

    /// `len` copies of `byte`.
    fn filled(byte: u8, len: u64) -> Vec<u8> {
        vec![byte; usize::try_from(len).unwrap()]
    }

    /// The state of a hash not begun.
    fn fresh() -> State {
        (Hasher::new(), Vec::new())
    }

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
        let (_dir, file) = file_of(b"abc");
        let behind = Behind::start(file);
        let hasher = behind.finish(3).await.unwrap();
        assert_eq!(hasher.finish(), crate::Hash::of(b"abc"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_missing_bytes_it_was_said_to_hold_is_an_error_not_a_hash() {
        let (_dir, file) = file_of(b"abc");
        let behind = Behind::start(file);
        assert!(behind.finish(10).await.is_err());
    }

    #[test]
    fn a_stopped_task_ends_at_its_next_step_with_an_error() {
        let (_dir, file) = file_of(&filled(7, STEP * 2));
        let mark = Mark::default();
        mark.stop.store(true, Ordering::SeqCst);
        assert!(hash_range(&file, &mark, fresh(), Some(STEP * 2)).is_err());
        let mark = Mark::default();
        let (hasher, _) = hash_range(&file, &mark, fresh(), Some(STEP * 2)).unwrap();
        assert_eq!(hasher.len(), STEP * 2);
    }

    #[test]
    fn a_task_without_an_end_hashes_the_whole_steps_ready_and_stops_there() {
        let (_dir, file) = file_of(&filled(7, STEP * 3));
        let mark = Mark::default();
        mark.ready.store(STEP * 2 + 100, Ordering::SeqCst);
        let (hasher, _) = hash_range(&file, &mark, fresh(), None).unwrap();
        assert_eq!(hasher.len(), STEP * 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_task_starts_before_a_whole_step_is_ready() {
        let total = STEP * 2 + 5;
        let (_dir, file) = file_of(&filled(1, total));
        let mut behind = Behind::start(file);
        behind.ready(STEP - 1);
        assert!(behind.busy.is_none(), "less than a step starts no task");
        behind.ready(STEP);
        assert!(behind.busy.is_some(), "a whole step starts one");
        let hasher = behind.finish(total).await.unwrap();
        assert_eq!(hasher.len(), total);
        let want = crate::Hash::of(&filled(1, total));
        assert_eq!(hasher.finish(), want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_that_ended_is_taken_up_even_when_the_callers_budget_is_spent() {
        // A reading loop whose reads never wait spends its task's coop budget; a
        // join handle polled then reads as pending although its task ended.
        let total = STEP * 3;
        let (_dir, file) = file_of(&filled(3, total));
        let mut behind = Behind::start(file);
        behind.ready(STEP);
        let done = behind.busy.as_ref().unwrap().1.clone();
        while done.lock().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        while tokio::task::coop::has_budget_remaining() {
            tokio::task::coop::consume_budget().await;
        }
        behind.ready(total);
        assert!(behind.busy.is_some(), "the next steps are handed out");
        let hasher = behind.finish(total).await.unwrap();
        assert_eq!(hasher.len(), total);
    }

    #[test]
    fn concurrent_puts_finish_with_a_single_blocking_thread() {
        // Writes to the temporary files and the hashing tasks share one blocking
        // thread: a hasher that waited there for its writer would never be released.
        use crate::blob::BlobStore;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::blob::DirStore::open(dir.path()).await.unwrap();
            let data = filled(5, STEP * 3 + 17);
            let puts = (0..4).map(|_| {
                let (store, data) = (store.clone(), data.clone());
                async move { store.put(&mut &data[..]).await }
            });
            let all = futures_util::future::join_all(puts);
            let done = tokio::time::timeout(std::time::Duration::from_secs(120), all).await;
            for stored in done.expect("the puts finished") {
                assert_eq!(stored.unwrap().hash, crate::Hash::of(&data));
            }
        });
    }
}
