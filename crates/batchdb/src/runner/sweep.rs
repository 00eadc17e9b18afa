//! Finding and killing what an attempt left running on this machine, by `/proc`.
//!
//! Every process of a shell execution carries its attempt's mark in its environment
//! (inherited by every child and grandchild, also those that leave the process group):
//! `BATCHDB_ATTEMPT_ID`, a random 128-bit value that the queue draws for each attempt
//! and keeps in the attempt's row. It is unique to that attempt of that job on that
//! database, whatever the worker is called and whatever the instance id and attempt
//! number are (they start at 1 again on every new database), so a sweep aimed by it
//! never reaches another attempt.
//!
//! Each kill is aimed without a race on pid reuse: a process is opened as its
//! `/proc/<pid>` directory first; its environment is read through that descriptor
//! (which fails once the process is gone, even if its pid is reused) and the signal
//! is sent through the same descriptor (`pidfd_send_signal` accepts a `/proc/<pid>`
//! directory), which names that process and no later one.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The environment variable that carries an attempt's mark.
pub const ATTEMPT_ID_VAR: &str = "BATCHDB_ATTEMPT_ID";

/// Which processes belong to one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mark<'a> {
    /// Those whose environment has `BATCHDB_ATTEMPT_ID=<id>`.
    Id(&'a str),
    /// An attempt started by a release without attempt ids: those whose environment
    /// has these three (`BATCHDB_WORKER`, `BATCHDB_INSTANCE`, `BATCHDB_ATTEMPT`) and
    /// no `BATCHDB_ATTEMPT_ID` at all (so never a process of a newer release).
    Legacy {
        worker: &'a str,
        instance: i64,
        attempt: i64,
    },
}

impl Mark<'_> {
    /// Whether an environment block (NUL-separated `KEY=VALUE`s) carries this mark.
    fn matches(&self, environ: &[u8]) -> bool {
        let vars = || environ.split(|b| *b == 0);
        match self {
            Mark::Id(id) => {
                let want = format!("{ATTEMPT_ID_VAR}={id}");
                vars().any(|v| v == want.as_bytes())
            }
            Mark::Legacy {
                worker,
                instance,
                attempt,
            } => {
                let want = [
                    format!("BATCHDB_WORKER={worker}"),
                    format!("BATCHDB_INSTANCE={instance}"),
                    format!("BATCHDB_ATTEMPT={attempt}"),
                ];
                let id_prefix = format!("{ATTEMPT_ID_VAR}=");
                let mut hits = [false; 3];
                for v in vars() {
                    if v.starts_with(id_prefix.as_bytes()) {
                        return false;
                    }
                    for (hit, w) in hits.iter_mut().zip(&want) {
                        *hit |= v == w.as_bytes();
                    }
                }
                hits == [true; 3]
            }
        }
    }
}

/// One process, opened as its `/proc/<pid>` directory: reads through it and signals
/// sent through it reach that process only, never one that reuses its pid later.
pub(crate) struct Proc {
    pid: i32,
    dir: OwnedFd,
}

impl Proc {
    /// Opens `/proc/<pid>`.
    fn open(pid: i32) -> io::Result<Proc> {
        let path = CString::new(format!("/proc/{pid}")).map_err(io::Error::other)?;
        // SAFETY: a valid C path; the new descriptor is owned below.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Proc { pid, dir })
    }

    /// Reads file `name` of this process (fails once the process is gone).
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let name = CString::new(name).map_err(io::Error::other)?;
        // SAFETY: a directory descriptor we own and a valid relative C path.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nobody else owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// `(state, process group)` from `stat`; `None` if the process is gone.
    fn state_and_group(&self) -> Option<(u8, i32)> {
        let st = Stat::parse(&self.read("stat").ok()?)?;
        Some((st.state, st.pgrp))
    }

    /// Whether this process carries `mark` (false once it is gone).
    fn carries(&self, mark: &Mark<'_>) -> bool {
        self.read("environ").is_ok_and(|env| mark.matches(&env))
    }

    /// Sends `sig` to this process and no other.
    fn signal(&self, sig: i32) {
        // SAFETY: pidfd_send_signal on a /proc/<pid> directory descriptor we own, with
        // no siginfo; it has no memory-safety preconditions.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.dir.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // A kernel older than 5.1: re-check, then the plain call, as close to the
            // check as possible (the only window in which the pid could be reused).
            if self.state_and_group().is_some() {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(self.pid, sig) };
            }
        }
    }
}

/// Every process on this machine, opened (those that vanish meanwhile are skipped).
fn processes() -> impl Iterator<Item = Proc> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(|pid| Proc::open(pid).ok())
}

/// The newest pid the kernel handed out in this pid namespace, if it says.
fn last_pid() -> Option<i32> {
    std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Up to this many pids handed out since a job started are looked at one by one;
/// past that, the process list is read instead.
const PROBE_MAX: i32 = 256;

/// Whether `pid` may have been handed out after `first`: pids are handed out in
/// increasing order, wrapping at `pid_max`, so a process started after `first`
/// has a pid in the cyclic interval `(first, last]`. That holds unless the counter
/// went all the way round since `first` was handed out, which callers rule out by
/// asking only about a recent `first`.
fn newer(pid: i32, first: i32, last: i32) -> bool {
    if last >= first {
        pid > first && pid <= last
    } else {
        pid > first || pid <= last
    }
}

/// What one `/proc/<pid>/stat` says about a process, for [`any_left`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    state: u8,
    ppid: i32,
    pgrp: i32,
    /// Clock ticks since boot at its start.
    start: u64,
}

impl Stat {
    /// Parses a `stat` file's text: "pid (comm) state ppid pgrp ..."; comm may hold
    /// spaces and parentheses, so fields are counted after the last ')'.
    fn parse(stat: &[u8]) -> Option<Stat> {
        let close = stat.iter().rposition(|b| *b == b')')?;
        let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
        let mut fields = rest.split_ascii_whitespace();
        let state = fields.next()?.bytes().next()?;
        let ppid = fields.next()?.parse().ok()?;
        let pgrp = fields.next()?.parse().ok()?;
        // starttime is the 22nd field of the line; state is its 3rd.
        let start = fields.nth(22 - 3 - 3)?.parse().ok()?;
        Some(Stat {
            state,
            ppid,
            pgrp,
            start,
        })
    }

    /// `/proc/<pid>/stat`, read by its path: a look, never a signal, goes by it.
    fn of(pid: i32, buf: &mut Vec<u8>) -> Option<Stat> {
        buf.clear();
        let mut f = std::fs::File::open(format!("/proc/{pid}/stat")).ok()?;
        f.read_to_end(buf).ok()?;
        Stat::parse(buf)
    }

    fn alive(&self) -> bool {
        !matches!(self.state, b'Z' | b'X')
    }
}

/// This process, its ancestors and pid 1: where an orphan of one of its jobs can be
/// reparented (the nearest subreaper among its ancestors, else init).
fn reapers(buf: &mut Vec<u8>) -> Vec<i32> {
    // SAFETY: getpid has no preconditions.
    let mut pid = unsafe { libc::getpid() };
    let mut out = vec![1];
    while pid > 1 && out.len() < 64 {
        out.push(pid);
        match Stat::of(pid, buf) {
            Some(s) => pid = s.ppid,
            None => break,
        }
    }
    out
}

/// Whether a process other than `pgid` (the leader, a zombie by now) is alive in
/// process group `pgid` or carries `mark`. Zombies do not count: they run nothing and
/// hold nothing open. With `recent` (the leader started well under a second ago), only
/// pids handed out after the leader's are listed, which keeps the look cheap for
/// short jobs; a look that misses something only leaves it running, it never signals
/// anything.
///
/// Every process of the attempt started after its leader and descends from it, so
/// only such processes can carry its mark, and an environment is read only where the
/// ancestry allows it. Walking up a process's parents while they too started after
/// the leader ends either at the leader (a descendant), or at a process started
/// before it. A descendant's parent is its creator, or — once that exited — the
/// nearest subreaper above the worker, or init: one of [`reapers`]. So a walk that
/// ends at any other older process (another worker's job, that worker) proves the
/// process is not the attempt's, and its environment is not read.
///
/// In a process that adopts its jobs' orphans ([`super::adopt_orphans`]) and has no
/// adopted child alive, nothing is left of any job, and no other process is read.
pub(crate) fn any_left(pgid: i32, mark: &Mark<'_>, recent: bool) -> bool {
    // In a process that adopts orphans, all that is left of any of its jobs hangs
    // from an adopted child: with none alive, nothing is left (see `orphans`).
    if super::orphans::adopted().is_some_and(|alive| alive.is_empty()) {
        return false;
    }
    let mut buf = Vec::with_capacity(512);
    let Some(leader) = Stat::of(pgid, &mut buf) else {
        // The leader is kept unreaped until the attempt settles; if its stat cannot
        // be read, read every process's environment as before.
        return any_marked(pgid, mark);
    };
    let last = if recent { last_pid() } else { None };
    let pids: Box<dyn Iterator<Item = i32>> = match last {
        // Few pids handed out since: look at each (a missing one costs one failed
        // open), rather than list every process.
        Some(last) if last > pgid && last - pgid <= PROBE_MAX => Box::new(pgid + 1..=last),
        _ => Box::new(
            std::fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
                .filter(move |pid| last.is_none_or(|last| newer(*pid, pgid, last))),
        ),
    };
    // Processes started no earlier than the leader, by pid.
    let mut younger = std::collections::HashMap::new();
    for pid in pids.filter(|p| *p != pgid) {
        let Some(st) = Stat::of(pid, &mut buf) else {
            continue;
        };
        if st.start < leader.start {
            continue;
        }
        if st.alive() && st.pgrp == pgid {
            return true;
        }
        younger.insert(pid, st);
    }
    let reapers = reapers(&mut buf);
    let may_descend = |st: &Stat| {
        let mut parent = st.ppid;
        for _ in 0..=younger.len() {
            if parent == pgid {
                return true;
            }
            match younger.get(&parent) {
                Some(p) => parent = p.ppid,
                None => return reapers.contains(&parent),
            }
        }
        // A cycle can only come from pids reused mid-look: look at it.
        true
    };
    younger.iter().any(|(pid, st)| {
        st.alive() && may_descend(st) && Proc::open(*pid).is_ok_and(|p| p.carries(mark))
    })
}

/// [`any_left`] without the ancestry: every live process's group and environment.
fn any_marked(pgid: i32, mark: &Mark<'_>) -> bool {
    processes().any(|p| {
        if p.pid == pgid {
            return false;
        }
        match p.state_and_group() {
            None | Some((b'Z' | b'X', _)) => false,
            Some((_, group)) => group == pgid || p.carries(mark),
        }
    })
}

/// Kills (SIGKILL) every process that carries `mark`, looking again until none is
/// left (a process may fork while it is being killed), for up to about a second.
pub(crate) fn kill_marked(mark: &Mark<'_>) {
    for _round in 0..50 {
        let mut found = false;
        for p in processes() {
            if p.carries(mark) {
                found = true;
                p.signal(libc::SIGKILL);
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills (SIGKILL) process `pid` if `/proc/<pid>/cgroup` (read through the same
/// `/proc` descriptor the signal goes through) has a group ending in `group`: a pid
/// that was reused by a process outside it is left alone. Whether it was signalled.
pub(crate) fn kill_if_in_group(pid: i32, group: &str) -> bool {
    let Ok(p) = Proc::open(pid) else {
        return false;
    };
    let inside = p.read("cgroup").is_ok_and(|text| {
        String::from_utf8_lossy(&text)
            .lines()
            .any(|l| l.ends_with(group))
    });
    if inside {
        p.signal(libc::SIGKILL);
    }
    inside
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_mark_matches_only_its_own_id() {
        let env = b"A=1\0BATCHDB_ATTEMPT_ID=abc\0BATCHDB_WORKER=w\0";
        assert!(Mark::Id("abc").matches(env));
        assert!(!Mark::Id("ab").matches(env));
        assert!(!Mark::Id("abcd").matches(env));
    }

    #[test]
    fn a_legacy_mark_never_matches_a_process_with_an_attempt_id() {
        let old = b"BATCHDB_WORKER=w\0BATCHDB_INSTANCE=1\0BATCHDB_ATTEMPT=2\0";
        let new =
            b"BATCHDB_WORKER=w\0BATCHDB_INSTANCE=1\0BATCHDB_ATTEMPT=2\0BATCHDB_ATTEMPT_ID=x\0";
        let mark = Mark::Legacy {
            worker: "w",
            instance: 1,
            attempt: 2,
        };
        assert!(mark.matches(old));
        assert!(!mark.matches(new));
        let other = Mark::Legacy {
            worker: "w",
            instance: 1,
            attempt: 3,
        };
        assert!(!other.matches(old));
    }

    #[test]
    fn newer_pids_are_those_after_the_first_in_cyclic_order() {
        assert!(newer(11, 10, 20) && newer(20, 10, 20));
        assert!(!newer(10, 10, 20) && !newer(21, 10, 20) && !newer(5, 10, 20));
        // The counter wrapped after 10 was handed out.
        assert!(newer(30_000, 10_000, 50) && newer(3, 10_000, 50) && newer(50, 10_000, 50));
        assert!(!newer(51, 10_000, 50) && !newer(10_000, 10_000, 50));
    }

    #[test]
    fn stat_is_parsed_after_the_last_parenthesis_of_the_command_name() {
        let line = b"4242 (a) (b c)) S 17 4242 4242 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 987654 1 2 3\n";
        let st = Stat::parse(line).unwrap();
        assert_eq!(
            st,
            Stat {
                state: b'S',
                ppid: 17,
                pgrp: 4242,
                start: 987_654,
            }
        );
        assert!(Stat::parse(b"4242 (no end").is_none());
    }

    #[test]
    fn this_process_and_its_parent_are_reapers_and_started_in_order() {
        let mut buf = Vec::new();
        // SAFETY: getpid/getppid have no preconditions.
        let (me, parent) = unsafe { (libc::getpid(), libc::getppid()) };
        let st = Stat::of(me, &mut buf).unwrap();
        assert_eq!(st.ppid, parent);
        let up = Stat::of(parent, &mut buf).unwrap();
        assert!(up.start <= st.start, "{up:?} {st:?}");
        let r = reapers(&mut buf);
        assert!(
            r.contains(&1) && r.contains(&me) && r.contains(&parent),
            "{r:?}"
        );
    }

    #[test]
    fn stat_gives_a_process_its_own_group() {
        // SAFETY: getpid/getpgrp have no preconditions.
        let (pid, pgrp) = unsafe { (libc::getpid(), libc::getpgrp()) };
        let me = Proc::open(pid).unwrap();
        let (state, group) = me.state_and_group().unwrap();
        assert_eq!(group, pgrp);
        assert!(state.is_ascii_uppercase(), "{}", state as char);
    }
}
