//! A job's main process, kept unreaped until its job is settled, so that a signal to
//! its process group can never reach another group.
//!
//! A process-group id is the pid of the process that created the group, and the
//! kernel frees a pid only when that process is reaped: a zombie keeps it. A job's
//! main process (the leader) creates its group (`setpgid(0, 0)` before the exec), so
//! while the leader is unreaped, group id `pid` names the job's own group and nothing
//! else can take it (only the process with pid `pid` can create a group of that id).
//! [`Leader::wait`] therefore observes the exit without reaping (`WNOWAIT`); every
//! group signal ([`Leader::signal_group`]) is sent under a lock and only while the
//! leader is unreaped; [`Leader::release`] reaps under the same lock. So no group
//! signal is ever sent after the reap, when the id could name a stranger's group.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;

use crate::queue::Usage;

/// Exit code, or the signal that ended the process.
pub(crate) type Status = (Option<i32>, Option<i32>);

/// A started job's main process (and process-group leader), owned by the worker.
pub(crate) struct Leader {
    pid: libc::pid_t,
    /// A pidfd where the kernel has them (the worker then never waits by pid).
    pidfd: Option<OwnedFd>,
    /// Whether it has been reaped: from then on its pid may name another process.
    reaped: Mutex<bool>,
    /// How it ended, once seen (so later looks need no system call).
    status: std::sync::OnceLock<Status>,
    /// What it used (with the children it waited for), seen with its end.
    usage: std::sync::OnceLock<Usage>,
}

impl Leader {
    /// Takes ownership of child `pid` (not yet reaped), waited for through `pidfd`
    /// when given, else by pid (which no one else in this process may wait for).
    pub(crate) fn new(pid: libc::pid_t, pidfd: Option<OwnedFd>) -> Arc<Leader> {
        Arc::new(Leader {
            pid,
            pidfd,
            reaped: Mutex::new(false),
            status: std::sync::OnceLock::new(),
            usage: std::sync::OnceLock::new(),
        })
    }

    /// What it used, counting the descendants it waited for (as `wait4` reports, and
    /// `/usr/bin/time`): known once [`Leader::wait`] has seen it end.
    pub(crate) fn usage(&self) -> Option<Usage> {
        self.usage.get().copied()
    }

    /// Its pid, which is also its process group's id.
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits until it exits and returns how, leaving it unreaped (see the module).
    /// With a pidfd this waits without blocking a thread; by pid, on a blocking one.
    pub(crate) async fn wait(self: &Arc<Self>) -> io::Result<Status> {
        if let Some(fd) = &self.pidfd {
            // A duplicate of the pidfd, owned by the registration for as long as it
            // lasts (the leader's own descriptor stays for waitid and release).
            let dup = fd.try_clone()?;
            // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and the
            // same descriptor) until it is dropped.
            let fd =
                unsafe { AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)? };
            loop {
                let mut ready = fd.readable().await?;
                match self.peek()? {
                    Some(status) => return Ok(status),
                    None => ready.clear_ready(),
                }
            }
        }
        if let Some(status) = self.status.get() {
            return Ok(*status);
        }
        let me = self.clone();
        let status = tokio::task::spawn_blocking(move || me.waitid(libc::WNOWAIT))
            .await
            .map_err(io::Error::other)??
            .unwrap_or_default();
        Ok(*self.status.get_or_init(|| status))
    }

    /// How it ended, if it has (without reaping it).
    fn peek(&self) -> io::Result<Option<Status>> {
        if let Some(status) = self.status.get() {
            return Ok(Some(*status));
        }
        Ok(self
            .waitid(libc::WNOHANG | libc::WNOWAIT)?
            .map(|s| *self.status.get_or_init(|| s)))
    }

    /// Whether it has exited (or been reaped).
    pub(crate) fn exited(&self) -> bool {
        if self.status.get().is_some() || self.reaped.lock().map_or(true, |r| *r) {
            return true;
        }
        !matches!(self.peek(), Ok(None))
    }

    /// Sends `sig` to its process group, unless it has been reaped. The lock makes
    /// the check and the signal one step with respect to [`Leader::release`].
    pub(crate) fn signal_group(&self, sig: libc::c_int) {
        let Ok(reaped) = self.reaped.lock() else {
            return;
        };
        if !*reaped && self.pid > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions. The leader is not
            // reaped (checked under the lock release takes), so `pid` is still its
            // pid and group `pid` is the group it created: see the module.
            unsafe { libc::kill(-self.pid, sig) };
        }
    }

    /// Reaps it: after this no signal is sent to its group. A leader still running is
    /// killed first (with its group), so this never waits long.
    pub(crate) fn release(&self) {
        let Ok(mut reaped) = self.reaped.lock() else {
            return;
        };
        if *reaped {
            return;
        }
        if matches!(self.peek(), Ok(None)) {
            // SAFETY: as in signal_group: unreaped, under the lock.
            unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        }
        let _ = self.waitid(0);
        *reaped = true;
    }

    /// `waitid(WEXITED | flags)` on this child: `None` if (with WNOHANG) it still runs.
    /// Keeps the usage the kernel reports with the first status seen.
    fn waitid(&self, flags: libc::c_int) -> io::Result<Option<Status>> {
        let (idtype, id) = match &self.pidfd {
            Some(fd) => (libc::P_PIDFD, id_t(fd.as_raw_fd())),
            None => (libc::P_PID, id_t(self.pid)),
        };
        // SAFETY: zeroed is a valid rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let status = waitid_usage(idtype, id, flags, Some(&mut ru))?;
        if status.is_some() {
            self.usage.get_or_init(|| usage_of(&ru));
        }
        Ok(status)
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.reaped.get_mut().map_or(true, |r| *r) {
            return;
        }
        // Nobody settled it (the attempt was dropped mid-way): reap it whenever it
        // ends, on a thread of its own, and never signal it from here.
        let (pid, pidfd) = (self.pid, self.pidfd.take());
        let _ = std::thread::Builder::new()
            .name("batchdb-reap".into())
            .spawn(move || {
                let _ = match &pidfd {
                    Some(fd) => waitid(libc::P_PIDFD, id_t(fd.as_raw_fd()), 0),
                    None => waitid(libc::P_PID, id_t(pid), 0),
                };
            });
    }
}

/// `waitid(idtype, id, WEXITED | flags)`: `None` if (with WNOHANG) it still runs.
pub(crate) fn waitid(
    idtype: libc::idtype_t,
    id: libc::id_t,
    flags: libc::c_int,
) -> io::Result<Option<Status>> {
    waitid_usage(idtype, id, flags, None)
}

/// Peak RSS and CPU times from a `rusage`.
fn usage_of(ru: &libc::rusage) -> Usage {
    let ms = |t: libc::timeval| {
        let (s, us) = (u64::try_from(t.tv_sec), u64::try_from(t.tv_usec));
        s.unwrap_or(0).saturating_mul(1000) + us.unwrap_or(0) / 1000
    };
    let kib = u64::try_from(ru.ru_maxrss).unwrap_or(0);
    Usage::new(kib.saturating_mul(1024), ms(ru.ru_utime), ms(ru.ru_stime))
}

/// [`waitid`] through the raw system call, whose fifth argument (which glibc's
/// wrapper does not offer) receives the child's usage, counting the descendants it
/// waited for; the kernel fills it with `WNOWAIT` too.
fn waitid_usage(
    idtype: libc::idtype_t,
    id: libc::id_t,
    flags: libc::c_int,
    mut usage: Option<&mut libc::rusage>,
) -> io::Result<Option<Status>> {
    loop {
        // SAFETY: info is written by the kernel; zeroed is a valid siginfo_t.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let ru: *mut libc::rusage = match usage.as_deref_mut() {
            Some(r) => r,
            None => std::ptr::null_mut(),
        };
        // SAFETY: waitid on our own child; both pointers are valid or null.
        let r = unsafe {
            libc::syscall(
                libc::SYS_waitid,
                idtype,
                id,
                &raw mut info,
                libc::WEXITED | flags,
                ru,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: filled in by a successful waitid.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => (Some(status), None),
            _ => (None, Some(status)),
        }));
    }
}

/// A process id from std (a `u32`) as the kernel's `pid_t` (pids never exceed
/// `pid_max`, at most 2^22; anything larger becomes an id no process has).
pub(crate) fn pid_of(id: u32) -> libc::pid_t {
    libc::pid_t::try_from(id).unwrap_or(libc::pid_t::MAX)
}

/// A descriptor or a process id as `waitid`'s `id_t` (neither is ever negative; a
/// negative one becomes an id no process has).
fn id_t(n: i32) -> libc::id_t {
    libc::id_t::try_from(n).unwrap_or(libc::id_t::MAX)
}

/// `waitid(P_PIDFD, fd, WEXITED | flags)`.
pub(crate) fn waitid_pidfd(fd: RawFd, flags: libc::c_int) -> io::Result<Option<Status>> {
    waitid(libc::P_PIDFD, id_t(fd), flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state letter of `pid` from `/proc/<pid>/stat`, if it exists.
    fn state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit(')')
            .next()?
            .split_whitespace()
            .next()?
            .chars()
            .next()
    }

    fn start(script: &str) -> Arc<Leader> {
        let child = super::super::spawn::spawn(
            std::path::Path::new("/bin/sh"),
            std::ffi::OsStr::new("sh"),
            &["-c".into(), script.into()],
            &[],
        )
        .unwrap();
        Leader::new(child.pid, Some(child.pidfd))
    }

    #[tokio::test]
    async fn an_exited_leader_keeps_its_pid_until_released() {
        let leader = start("exit 4");
        assert_eq!(leader.wait().await.unwrap(), (Some(4), None));
        assert!(leader.exited());
        // Waiting again gives the same status: nothing was reaped.
        assert_eq!(leader.wait().await.unwrap(), (Some(4), None));
        assert_eq!(state(leader.pid()), Some('Z'), "a zombie holds the pid");
        leader.release();
        assert_eq!(state(leader.pid()), None, "reaped");
        // After the release a group signal is never sent (the id may be reused).
        leader.signal_group(libc::SIGKILL);
    }

    #[tokio::test]
    async fn its_usage_counts_the_children_it_waited_for() {
        // The shell itself does little; the child it waits for touches 64 MiB and
        // burns some CPU.
        let leader = start(
            "head -c 67108864 /dev/zero | tail -c 1 >/dev/null; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done",
        );
        assert_eq!(leader.usage(), None, "not before it ends");
        assert_eq!(leader.wait().await.unwrap(), (Some(0), None));
        let u = leader.usage().expect("usage at its end");
        assert!(u.max_rss > 1 << 20, "{u:?}");
        assert!(u.cpu_ms() > 0, "{u:?}");
        leader.release();
        assert_eq!(leader.usage(), Some(u), "kept");
    }

    #[tokio::test]
    async fn a_group_signal_reaches_what_the_leader_left_behind() {
        // The leader exits at once and leaves a member of its group running.
        let leader = start("sleep 30 & echo $! > /dev/null; exit 0");
        assert_eq!(leader.wait().await.unwrap(), (Some(0), None));
        let pgid = leader.pid();
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| *p != pgid)
                // SAFETY: getpgid has no preconditions.
                .filter(|p| unsafe { libc::getpgid(*p) } == pgid)
                .filter(|p| state(*p).is_some_and(|s| s != 'Z'))
                .count()
        };
        assert_eq!(members(), 1);
        leader.signal_group(libc::SIGKILL);
        for _ in 0..100 {
            if members() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(members(), 0);
        leader.release();
    }

    #[tokio::test]
    #[allow(clippy::zombie_processes)] // the Leader waits for it, by pid
    async fn a_leader_waited_for_by_pid_reports_the_same() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "kill -9 $$"])
            .spawn()
            .unwrap();
        let leader = Leader::new(pid_of(child.id()), None);
        assert_eq!(leader.wait().await.unwrap(), (None, Some(libc::SIGKILL)));
        assert_eq!(state(leader.pid()), Some('Z'));
        leader.release();
        assert_eq!(state(leader.pid()), None);
    }
}
