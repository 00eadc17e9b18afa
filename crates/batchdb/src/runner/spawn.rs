//! Starting a job's process cheaply, tied to its worker.
//!
//! A worker is a large multi-threaded process; `fork` copies its page tables for every
//! job and the exec throws the copy away again, which costs more than a trivial job
//! does. `posix_spawn` avoids that with `clone(CLONE_VM | CLONE_VFORK)` (the child
//! borrows the parent's memory until it execs), but cannot set `PR_SET_PDEATHSIG`,
//! which makes a job die with its worker even when the worker is killed with SIGKILL.
//! This module does what `posix_spawn` does, plus that one call:
//!
//! 1. the parent prepares everything the child needs (paths, argv, envp as C strings,
//!    pipes) and blocks every signal;
//! 2. the child, on a stack of its own, sets `PR_SET_PDEATHSIG` (and exits if the
//!    worker already died), starts a process group of its own, enters the job's
//!    working directory, joins the attempt's cgroup (writing `0` to each
//!    `cgroup.procs`), sets its rlimits ([`Setup`]), moves the pipes to fds 0–2,
//!    resets signal handlers and the mask, and execs. It only makes raw system
//!    calls: no allocation, no locks, nothing that could touch the parent's state;
//! 3. an error before the exec is passed back through memory both share.
//!
//! The parent waits for the child through a pidfd ([`super::leader::Leader`]), so
//! nothing else (tokio's SIGCHLD handling included) reaps it.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::OnceLock;

/// The child's stack (it only makes system calls), plus a guard page below it.
const STACK: usize = 64 * 1024;

/// A started process: the parent's ends of its pipes and a pidfd to wait on.
pub(crate) struct Spawned {
    /// Process id (and process group id).
    pub pid: i32,
    /// Write end of its stdin.
    pub stdin: OwnedFd,
    /// Read end of its stdout.
    pub stdout: OwnedFd,
    /// Read end of its stderr.
    pub stderr: OwnedFd,
    /// Refers to the process until it is reaped.
    pub pidfd: OwnedFd,
}

/// A call for the spawner thread.
type Job = Box<dyn FnOnce() + Send>;

/// Hands `job` to the one thread that starts every job of this process (started at
/// the first call). `PR_SET_PDEATHSIG` fires when the *thread* that created a process
/// exits, not the process: a job started from a pool thread that later retires (tokio
/// retires idle blocking threads) would be killed with it. This thread never ends.
fn submit(job: Job) -> io::Result<()> {
    static SPAWNER: OnceLock<Option<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    let sender = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("batchdb-spawner".into())
                .spawn(move || {
                    super::orphans::spawner_started();
                    for job in rx {
                        job();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
        .ok_or_else(gone)?;
    sender.send(job).map_err(|_| gone())
}

/// The spawner thread could not start, or has ended.
fn gone() -> io::Error {
    io::Error::other("the batchdb spawner thread is gone")
}

/// Runs `f` on the spawner thread ([`submit`]) and returns what it returned; the
/// calling thread blocks until then.
pub(crate) fn on_spawner_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    submit(Box::new(move || {
        let _ = reply.send(f());
    }))?;
    answer.recv().map_err(|_| gone())
}

/// [`on_spawner_thread`] without blocking the calling thread: the caller's task
/// waits while the process starts (a `clone`, the child's set-up and its `execve`,
/// during which a `vfork`-style parent is suspended), and its thread runs other
/// tasks meanwhile — the other slots' outputs and exits. Should the caller stop
/// waiting (its task dropped), what `f` returned is dropped: a started job travels
/// in a [`Handover`].
pub(crate) async fn on_spawner_thread_async<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    submit(Box::new(move || {
        let _ = reply.send(f());
    }))?;
    answer.await.map_err(|_| gone())
}

/// A start's outcome on its way to the task that will watch the job, with `T`: what
/// must outlive the job (its cgroup). Dropped before that task takes it (the task
/// was dropped while the job started), a started job is killed (its process group,
/// SIGKILL) and reaped — it neither runs unwatched nor stays a zombie — and only then
/// is `T` dropped (so a cgroup it holds is empty when it is removed).
pub(crate) struct Handover<T>(Option<(std::result::Result<Spawned, Failed>, T)>);

impl<T> Handover<T> {
    /// Wraps a start's outcome and what must outlive its job.
    pub(crate) fn new(outcome: (std::result::Result<Spawned, Failed>, T)) -> Handover<T> {
        Handover(Some(outcome))
    }

    /// The outcome and what it kept, for the job's watcher.
    pub(crate) fn take(mut self) -> (std::result::Result<Spawned, Failed>, T) {
        match self.0.take() {
            Some(outcome) => outcome,
            None => unreachable!("a handover is taken once, by value"),
        }
    }
}

impl<T> Drop for Handover<T> {
    fn drop(&mut self) {
        let Some((Ok(child), keep)) = self.0.take() else {
            return;
        };
        // SAFETY: kill and waitid are plain system calls; the pidfd is open (owned
        // by `child`) until the end of this block, so the pid is still this child's.
        unsafe {
            libc::kill(-child.pid, libc::SIGKILL);
        }
        let _ = super::leader::waitid_pidfd(child.pidfd.as_raw_fd(), 0);
        drop(child);
        drop(keep);
    }
}

/// Whether this kernel has pidfds and `waitid(P_PIDFD)` (Linux 5.4+), checked once.
pub(crate) fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        // SAFETY: pidfd_open has no memory-safety preconditions.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: a new fd we own.
        let Ok(fd) = RawFd::try_from(fd) else {
            return false;
        };
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // We are not our own child: ECHILD where P_PIDFD is known, EINVAL (5.3) where not.
        matches!(super::leader::waitid_pidfd(fd.as_raw_fd(), libc::WNOHANG), Err(e) if e.raw_os_error() == Some(libc::ECHILD))
    })
}

/// Sets this thread's signal mask to all (`true`) or none of the 64 signals with the
/// raw system call: glibc's wrappers quietly keep its two internal signals unblocked.
/// Returns the previous mask.
///
/// # Safety
/// Only a plain system call; callers restore the mask they replaced.
unsafe fn set_mask(all: bool) -> u64 {
    let mask: u64 = if all { !0 } else { 0 };
    let mut old: u64 = 0;
    // SAFETY: both pointers are valid 8-byte sigsets, the size the kernel expects.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const mask,
            &raw mut old,
            8usize,
        );
    }
    old
}

/// Restores a mask returned by [`set_mask`].
///
/// # Safety
/// Only a plain system call.
unsafe fn restore_mask(old: u64) {
    // SAFETY: a valid 8-byte sigset.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &raw const old,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "argument or environment contains a NUL byte",
        )
    })
}

/// A pipe whose two ends are close-on-exec: `(read, write)`.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are new descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What the child sets up before its exec, beside its pipes and process group.
#[derive(Debug, Default)]
pub(crate) struct Setup {
    /// The working directory to enter (`None`: the worker's).
    pub cwd: Option<std::path::PathBuf>,
    /// The `cgroup.procs` files to write `0` to (joining the attempt's cgroup).
    pub cgroup_procs: Vec<std::path::PathBuf>,
    /// `(resource, value)` pairs for `setrlimit` (soft and hard).
    pub rlimits: Vec<(u32, u64)>,
}

/// Which step of starting a job failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Anything but the three below (pipes, clone, the exec itself...).
    Start,
    /// Entering the working directory.
    Cwd,
    /// Joining the attempt's cgroup.
    Cgroup,
    /// Setting an rlimit.
    Rlimit,
}

impl Stage {
    fn code(self) -> i32 {
        match self {
            Stage::Start => 0,
            Stage::Cwd => 1,
            Stage::Cgroup => 2,
            Stage::Rlimit => 3,
        }
    }

    fn of(code: i32) -> Stage {
        match code {
            1 => Stage::Cwd,
            2 => Stage::Cgroup,
            3 => Stage::Rlimit,
            _ => Stage::Start,
        }
    }
}

/// A job that could not be started: the step, and why.
#[derive(Debug)]
pub(crate) struct Failed {
    /// The step that failed.
    pub stage: Stage,
    /// Why.
    pub error: io::Error,
}

impl From<io::Error> for Failed {
    fn from(error: io::Error) -> Failed {
        Failed {
            stage: Stage::Start,
            error,
        }
    }
}

/// An rlimit as the child sets it.
#[repr(C)]
struct Rlimit {
    resource: u32,
    limit: libc::rlimit,
}

/// What the child reads (all prepared by the parent) and writes (its error).
#[repr(C)]
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    /// The child's ends of stdin, stdout and stderr.
    fds: [RawFd; 3],
    /// The worker's pid: if the child's parent is another, the worker already died.
    parent: libc::pid_t,
    /// The directory to enter, or null.
    cwd: *const libc::c_char,
    /// The `cgroup.procs` files to join, `ncgroup` of them.
    cgroup: *const *const libc::c_char,
    ncgroup: usize,
    /// The rlimits to set, `nrlimits` of them.
    rlimits: *const Rlimit,
    nrlimits: usize,
    /// errno of the step that failed, or 0.
    err: i32,
    /// The [`Stage`] code of the step that failed.
    stage: i32,
}

/// Runs in the child, on its own stack, sharing the parent's memory until it execs:
/// only raw system calls from here.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's ChildArgs, alive (the parent is suspended
    // until this process execs or exits); every call below is a plain system call.
    unsafe {
        let a = &mut *arg.cast::<ChildArgs>();
        let fail = |a: &mut ChildArgs| -> ! {
            // Never 0: the parent reads 0 as "it exec'd".
            let errno = *libc::__errno_location();
            std::ptr::write_volatile(&raw mut a.err, if errno == 0 { libc::EIO } else { errno });
            libc::_exit(127)
        };
        let fail_at = |a: &mut ChildArgs, stage: Stage| -> ! {
            std::ptr::write_volatile(&raw mut a.stage, stage.code());
            fail(a)
        };
        // Caught signals go back to their default action (a handler must never run
        // here, on the parent's memory), and SIGPIPE and SIGXFSZ too (Rust and the CLI
        // ignore them; jobs should not inherit that). The mask is still all-blocked,
        // from the parent.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &raw mut old) != 0 {
                continue;
            }
            let caught = old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN;
            if caught || sig == libc::SIGPIPE || sig == libc::SIGXFSZ {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &raw const dfl, std::ptr::null_mut());
            }
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            fail(a);
        }
        if libc::getppid() != a.parent {
            // The worker died before the signal was armed: never run the job.
            libc::_exit(137);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(a);
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
            fail_at(a, Stage::Cwd);
        }
        for i in 0..a.ncgroup {
            if join_cgroup(*a.cgroup.add(i)) != 0 {
                fail_at(a, Stage::Cgroup);
            }
        }
        for i in 0..a.nrlimits {
            let r = &*a.rlimits.add(i);
            if libc::setrlimit(r.resource, &raw const r.limit) != 0 {
                fail_at(a, Stage::Rlimit);
            }
        }
        for (target, fd) in (0..).zip(a.fds) {
            if fd == target {
                // dup2 onto itself would keep close-on-exec: clear it instead.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    fail(a);
                }
            } else if libc::dup2(fd, target) < 0 {
                fail(a);
            }
        }
        set_mask(false);
        libc::execve(a.path, a.argv, a.envp);
        fail(a)
    }
}

/// This process's environment with `env` over it, as `KEY=VALUE` C strings.
fn environ(env: &[(OsString, OsString)]) -> io::Result<Vec<CString>> {
    let inherited = std::env::vars_os().filter(|(k, _)| !env.iter().any(|(ek, _)| ek == k));
    inherited
        .chain(env.iter().cloned())
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstr(&kv)
        })
        .collect()
}

/// Pointers to `strings`, followed by a null pointer (an `argv`/`envp` array; the
/// cgroup list ignores the null, counted by length).
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Writes `0` to the `cgroup.procs` file `path` (moving the calling process into
/// that group) with raw system calls; -1 with errno set on failure.
///
/// # Safety
/// `path` is a NUL-terminated string. Async-signal-safe.
pub(crate) unsafe fn join_cgroup(path: *const libc::c_char) -> i32 {
    // SAFETY: plain system calls on a descriptor opened here.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return -1;
        }
        let n = libc::write(fd, b"0".as_ptr().cast(), 1);
        let errno = *libc::__errno_location();
        libc::close(fd);
        if n != 1 {
            *libc::__errno_location() = errno;
            return -1;
        }
        0
    }
}

/// Starts `program` (an executable's path) with `args` (argv[1..]) and this process's
/// environment plus `env`, its stdin, stdout and stderr piped, in a process group of
/// its own, with `PR_SET_PDEATHSIG` = SIGKILL. Check [`supported`] first.
#[cfg(test)]
pub(crate) fn spawn(
    program: &Path,
    arg0: &OsStr,
    args: &[OsString],
    env: &[(OsString, OsString)],
) -> io::Result<Spawned> {
    spawn_with(program, arg0, args, env, &Setup::default()).map_err(|f| f.error)
}

/// [`spawn`], with `setup` carried out in the child before its exec; a failure says
/// which step failed.
pub(crate) fn spawn_with(
    program: &Path,
    arg0: &OsStr,
    args: &[OsString],
    env: &[(OsString, OsString)],
    setup: &Setup,
) -> Result<Spawned, Failed> {
    let path = cstr(program.as_os_str())?;
    let argv_c = std::iter::once(arg0)
        .chain(args.iter().map(OsString::as_os_str))
        .map(cstr)
        .collect::<io::Result<Vec<_>>>()?;
    let env_c = environ(env)?;
    let (argv, envp) = (pointers(&argv_c), pointers(&env_c));
    let cwd = setup
        .cwd
        .as_ref()
        .map(|d| cstr(d.as_os_str()))
        .transpose()?;
    let cgroup_c = setup
        .cgroup_procs
        .iter()
        .map(|p| cstr(p.as_os_str()))
        .collect::<io::Result<Vec<_>>>()?;
    let cgroup = pointers(&cgroup_c);
    let rlimits: Vec<Rlimit> = setup
        .rlimits
        .iter()
        .map(|&(resource, v)| Rlimit {
            resource,
            limit: libc::rlimit {
                rlim_cur: v,
                rlim_max: v,
            },
        })
        .collect();
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    // A larger stdout pipe (the default is 64 KiB) lets a job that writes a lot run
    // further ahead of the worker, which then reads (and hashes and writes) in bigger
    // pieces. 256 KiB, not the 1 MiB maximum: pipe pages count against a per-user
    // limit (`fs.pipe-user-pages-soft`, 64 MiB), past which every new pipe of the
    // user shrinks to one page. Best effort.
    // SAFETY: fcntl on a descriptor we own.
    unsafe { libc::fcntl(out_r.as_raw_fd(), libc::F_SETPIPE_SZ, 256 << 10) };
    let (err_r, err_w) = pipe()?;
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        fds: [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()],
        // SAFETY: getpid has no preconditions.
        parent: unsafe { libc::getpid() },
        cwd: cwd.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        cgroup: cgroup.as_ptr(),
        ncgroup: cgroup_c.len(),
        rlimits: rlimits.as_ptr(),
        nrlimits: rlimits.len(),
        err: 0,
        stage: 0,
    };
    let stack = match STACK_CACHE.with(std::cell::Cell::take) {
        Some(stack) => stack,
        None => Stack::new()?,
    };
    // SAFETY: the mask is restored right after clone returns; the child only reads
    // `args` and the C strings above (all alive until then: CLONE_VFORK suspends this
    // thread until the child execs or exits) and writes `args.err`.
    let pid = unsafe {
        let old = set_mask(true);
        let pid = libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&raw mut args).cast::<libc::c_void>(),
        );
        let clone_err = io::Error::last_os_error();
        restore_mask(old);
        // The child has exec'd or exited (`CLONE_VFORK`): its stack is free again.
        STACK_CACHE.with(|c| c.set(Some(stack)));
        if pid < 0 {
            return Err(clone_err.into());
        }
        pid
    };
    // SAFETY: reading what the (now exec'd or exited) child wrote.
    let err = unsafe { std::ptr::read_volatile(&raw const args.err) };
    if err != 0 {
        reap(pid);
        // SAFETY: as above.
        let stage = unsafe { std::ptr::read_volatile(&raw const args.stage) };
        return Err(Failed {
            stage: Stage::of(stage),
            error: io::Error::from_raw_os_error(err),
        });
    }
    // SAFETY: pidfd_open has no memory-safety preconditions.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let pidfd = RawFd::try_from(pidfd).unwrap_or(-1);
    if pidfd < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: kill(2) has no memory-safety preconditions. Aimed: `pid` is our own
        // child, not yet reaped (only the reap below frees its pid), so it names that
        // process and no other.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        reap(pid);
        return Err(e.into());
    }
    drop((in_r, out_w, err_w));
    Ok(Spawned {
        pid,
        stdin: in_w,
        stdout: out_r,
        stderr: err_r,
        // SAFETY: a new descriptor we own.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd) },
    })
}

/// Waits (blocking) for child `pid` to end and discards its status.
fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    while unsafe { libc::waitpid(pid, &raw mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

thread_local! {
    /// This thread's child stack, kept from one spawn to the next (each job's is free
    /// again once its `clone` returns): mapping, guarding and unmapping a fresh one
    /// for every job took three system calls, and unmapping touched pages flushes
    /// the other CPUs' TLBs (`perf record` of a drain of `echo` jobs: the spawner
    /// thread's share of all samples went from 10.2 % to 9.4 %).
    static STACK_CACHE: std::cell::Cell<Option<Stack>> = const { std::cell::Cell::new(None) };
}

/// The base address of this thread's kept child stack, if it has one.
#[cfg(test)]
pub(crate) fn kept_stack() -> Option<usize> {
    STACK_CACHE.with(|c| {
        let stack = c.take();
        let base = stack.as_ref().map(|s| s.base as usize);
        c.set(stack);
        base
    })
}

/// A mapped stack with a guard page below it (an overflow faults instead of writing
/// over the parent's memory).
struct Stack {
    base: *mut libc::c_void,
    len: usize,
}

impl Stack {
    fn new() -> io::Result<Stack> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).unwrap_or(0).max(4096);
        let len = STACK + page;
        // SAFETY: a fresh private anonymous mapping, owned by the returned Stack.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base, len };
        // SAFETY: the lowest page of our own mapping.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The top of the stack (it grows down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        let end = self.base as usize + self.len;
        (end & !15) as *mut libc::c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used (the child has exec'd or exited).
        unsafe {
            libc::munmap(self.base, self.len);
        }
    }
}

#[cfg(test)]
mod tests;
