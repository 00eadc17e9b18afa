//! A worker process that adopts what its jobs leave behind, so that the look for
//! leftovers at each job's end ([`super::sweep::any_left`]) need not read every
//! process started since the job.
//!
//! [`adopt_orphans`] makes this process a child subreaper: a process whose parent
//! exits is then reparented to this process (the nearest subreaper among its
//! ancestors) rather than to init. Every job's main process is started by the one
//! spawner thread (`spawn::on_spawner_thread`, or its `_async` form, which the
//! worker awaits) and kept unreaped until its job
//! settles, so a zombie main process has no children: whatever of its job is still
//! alive hangs, through its parents, from a child of this process that was adopted.
//! The kernel hands an orphan to the subreaper's first live thread (`find_new_reaper`
//! and `find_alive_thread` in `kernel/exit.c`): its main thread, which lives as long as
//! the process does (a Rust process ends when its main thread returns), while every
//! job's main process is a child of the spawner thread. So the main thread's list
//! (`/proc/self/task/<pid>/children`) holds exactly the adopted children, and when it
//! is empty no job has anything left running: the look is one read of this process's
//! own file. When it is not, the full look runs as before (it tells whose leftover it
//! is).
//!
//! Adopted children that have exited are reaped by [`adopted`], so they do not
//! linger as zombies. A process that adopts must therefore start no child processes
//! of its own outside jobs (their exit would be reaped here): `batchdb run` starts
//! none.
//!
//! Why an empty list can be trusted: a process is reparented while its old parent
//! exits, under the kernel's task-list lock, before that parent can be seen to have
//! exited; and `children` lists its first entry under the same lock, so a read that
//! finds none was made while the list was empty.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Set once this process is a subreaper whose children lists can be read.
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// The spawner thread's id, recorded when it starts (0 before).
static SPAWNER_TID: AtomicI32 = AtomicI32::new(0);

/// Makes this process adopt the orphans of the jobs it runs (see the module), for a
/// process that starts no child processes of its own outside jobs. Call it before the
/// first job starts. Returns whether it did: `false` once a job has been started in
/// this process (what it left may have gone to init), or where the kernel does not
/// list a thread's children (`/proc/<pid>/task/<tid>/children`); the look for
/// leftovers then reads the process list as it does without this. Fails if the
/// process cannot become a subreaper.
pub fn adopt_orphans() -> io::Result<bool> {
    let me = std::process::id();
    if SPAWNER_TID.load(Ordering::SeqCst) != 0
        || std::fs::read(format!("/proc/self/task/{me}/children")).is_err()
    {
        return Ok(false);
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    ADOPTING.store(true, Ordering::SeqCst);
    Ok(true)
}

/// Records that the calling thread is the spawner thread.
pub(super) fn spawner_started() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    SPAWNER_TID.store(tid, Ordering::SeqCst);
}

/// The adopted children of this process that are still alive, after reaping those
/// that have exited; `None` if this process does not adopt orphans (or its lists
/// cannot be read), when nothing can be concluded from them.
pub(crate) fn adopted() -> Option<Vec<i32>> {
    if !ADOPTING.load(Ordering::SeqCst) {
        return None;
    }
    let spawner = SPAWNER_TID.load(Ordering::SeqCst);
    if spawner == 0 {
        return None;
    }
    let me = std::process::id();
    if i64::from(spawner) == i64::from(me) {
        // Jobs started from the main thread: its list is not the adopted children's.
        return None;
    }
    let list = std::fs::read_to_string(format!("/proc/self/task/{me}/children")).ok()?;
    let mut pids: Vec<i32> = list
        .split_ascii_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    pids.retain(|pid| !reap_if_exited(*pid));
    Some(pids)
}

/// Reaps adopted child `pid` if it has exited; whether it did.
fn reap_if_exited(pid: i32) -> bool {
    // SAFETY: a zeroed siginfo_t is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on one pid with a valid out-parameter. `pid` is a child of this
    // process that no job's start made (those are the spawner thread's children), so
    // nothing else here waits for it.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid.unsigned_abs(),
            &raw mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    // SAFETY: waitid filled in (or left zeroed) the siginfo.
    r == 0 && unsafe { info.si_pid() } == pid
}
