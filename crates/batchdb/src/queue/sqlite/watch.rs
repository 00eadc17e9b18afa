//! Noticing other processes' commits: inotify on the database's directory (every
//! commit writes the WAL file), backed by `PRAGMA data_version` polling.
//!
//! Wake-ups from the kernel when any file in the database's directory is written
//! (the WAL file is, on every commit by any process), so that an idle waiter costs
//! no CPU and learns of a commit at once.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::{FALLBACK_POLL, Inner, POLL, SqliteQueue, open_conn};

/// An inotify watch on one directory.
pub struct DirWatch(AsyncFd<OwnedFd>);

impl DirWatch {
    /// Watches `dir` for files being modified, created or renamed into it.
    pub fn new(dir: &Path) -> io::Result<DirWatch> {
        // SAFETY: plain syscalls; the returned descriptor is owned right away.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let mask = libc::IN_MODIFY | libc::IN_CREATE | libc::IN_MOVED_TO;
        // SAFETY: `c` is a valid NUL-terminated path; `fd` is an inotify descriptor.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is an open descriptor owned by the OwnedFd, which the AsyncFd
        // keeps (and never changes) for its whole life.
        let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(DirWatch(afd))
    }

    /// Waits for at least one event, then drains all pending ones.
    pub async fn wait(&self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut guard = self.0.readable().await?;
            let mut got = false;
            loop {
                // SAFETY: reading into a local buffer of the given length.
                let n =
                    unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if got {
                return Ok(());
            }
        }
    }
}

/// The WAL file of a database file.
pub(super) fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

impl SqliteQueue {
    pub(super) fn start_poller(&self) {
        if self.inner.poller.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let path = self.inner.path.clone();
        tokio::spawn(async move {
            let conn = match open_conn(&path) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("change watcher for {}: {e}", path.display());
                    return;
                }
            };
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let notify = match DirWatch::new(dir) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::info!(
                        "no inotify on {} ({e}); polling every {POLL:?}",
                        dir.display()
                    );
                    None
                }
            };
            let every = if notify.is_some() {
                FALLBACK_POLL
            } else {
                POLL
            };
            let mut last: Option<i64> = None;
            loop {
                let woke = if let Some(w) = &notify {
                    tokio::select! {
                        r = w.wait() => r.is_ok(),
                        () = tokio::time::sleep(every) => false,
                    }
                } else {
                    tokio::time::sleep(every).await;
                    false
                };
                let Some(inner) = weak.upgrade() else { return };
                if woke {
                    // A write to the WAL file is seen before the writer publishes the
                    // commit in shared memory: wake waiters now, and once more shortly
                    // after, so that a reader that looked too early looks again.
                    inner.changes.bump();
                    drop(inner);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.changes.bump();
                    continue;
                }
                match conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) {
                    Ok(v) => {
                        if last.is_some_and(|l| l != v) {
                            inner.changes.bump();
                        }
                        last = Some(v);
                    }
                    Err(e) => tracing::warn!("change watcher for {}: {e}", path.display()),
                }
            }
        });
    }
}
