//! A cgroup per attempt: finding a hierarchy the worker may write (cgroup v2 with
//! the `memory`, `cpu` and `pids` controllers delegated, else the v1 `memory`, `cpu`,
//! `cpuacct` and `pids` hierarchies), making one group per attempt with its limits,
//! reading what it used and whether the kernel killed something in it for memory,
//! and removing it once its processes are gone.
//!
//! Every group lives under the worker's own group (from `/proc/self/cgroup`), in a
//! `batchdb` directory: `<mount><own>/batchdb/<attempt id>`. The job's process joins
//! it before its exec (see [`super::spawn`]), so the job's own code never runs
//! outside it.

use std::io;
use std::path::{Path, PathBuf};

use crate::queue::{Limits, Usage};

/// The CPU period written beside a quota (v1 `cpu.cfs_period_us`, v2 `cpu.max`).
const PERIOD_US: u64 = 100_000;

/// The v2 controllers an attempt's group needs.
const V2_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// Where attempts' groups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    /// cgroup v2: the `batchdb` directory (its `cgroup.subtree_control` enables
    /// memory, cpu and pids).
    V2(PathBuf),
    /// cgroup v1: the `batchdb` directory in each hierarchy.
    V1 {
        /// In the memory hierarchy.
        memory: PathBuf,
        /// In the cpu hierarchy.
        cpu: PathBuf,
        /// In the cpuacct hierarchy (the same as `cpu` where they are co-mounted).
        cpuacct: Option<PathBuf>,
        /// In the pids hierarchy.
        pids: PathBuf,
    },
}

impl Hierarchy {
    /// Says which it is and where, for the worker's startup line.
    pub(crate) fn describe(&self) -> String {
        match self {
            Hierarchy::V2(p) => format!("cgroup v2 ({})", p.display()),
            Hierarchy::V1 {
                memory, cpu, pids, ..
            } => format!(
                "cgroup v1 ({}, {}, {})",
                memory.display(),
                cpu.display(),
                pids.display()
            ),
        }
    }
}

/// One mounted cgroup hierarchy from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mount {
    /// The hierarchy's directory that is mounted (`/` unless in a container).
    pub root: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// `None` for cgroup v2; the controllers of a v1 hierarchy.
    pub controllers: Option<Vec<String>>,
}

/// The cgroup mounts listed in a `/proc/<pid>/mountinfo` text.
pub(crate) fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let (root, point) = (l.nth(3)?, l.next()?);
            let mut r = right.split(' ');
            let (fstype, _source, options) = (r.next()?, r.next()?, r.next()?);
            let controllers = match fstype {
                "cgroup2" => None,
                "cgroup" => Some(
                    options
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(String::from)
                        .collect(),
                ),
                _ => return None,
            };
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                controllers,
            })
        })
        .collect()
}

/// mountinfo's octal escapes (`\040` for a space) decoded.
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The worker's group in each hierarchy, from a `/proc/<pid>/cgroup` text: `(controllers,
/// path)`, controllers empty for v2.
pub(crate) fn parse_own(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.splitn(3, ':');
            let (_id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

/// The directory of group `own` (a path in the hierarchy) under mount `m`, if the
/// mount shows it.
fn own_dir(m: &Mount, own: &str) -> Option<PathBuf> {
    let rel = if m.root == "/" {
        own
    } else {
        own.strip_prefix(m.root.as_str())?
    };
    Some(m.point.join(rel.trim_start_matches('/')))
}

/// Finds a hierarchy this worker can make attempts' groups in, and makes its
/// `batchdb` directory; `Err` says why there is none.
pub(crate) fn detect() -> Result<Hierarchy, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let (mounts, own) = (parse_mounts(&mounts), parse_own(&own));
    let v2 = detect_v2(&mounts, &own);
    if let Ok(h) = v2 {
        return Ok(h);
    }
    let v1 = detect_v1(&mounts, &own);
    v1.map_err(|e1| format!("{}; {e1}", v2.err().unwrap_or_default()))
}

/// cgroup v2 with memory, cpu and pids available to the worker's group.
fn detect_v2(mounts: &[Mount], own: &[(Vec<String>, String)]) -> Result<Hierarchy, String> {
    let m = mounts
        .iter()
        .find(|m| m.controllers.is_none())
        .ok_or("cgroup v2 is not mounted")?;
    let path = own
        .iter()
        .find(|(c, _)| c.is_empty())
        .map(|(_, p)| p.as_str())
        .ok_or("no cgroup v2 group in /proc/self/cgroup")?;
    let dir = own_dir(m, path).ok_or("the worker's cgroup v2 group is not mounted")?;
    let available = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = V2_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !available.split_whitespace().any(|a| a == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "cgroup v2 group {} lacks the {} controller(s) (not delegated)",
            dir.display(),
            missing.join(", ")
        ));
    }
    let enable = "+memory +cpu +pids";
    let why = |e: io::Error| format!("cgroup v2 group {}: {e}", dir.display());
    if std::fs::write(dir.join("cgroup.subtree_control"), enable).is_err() {
        // A group with processes cannot enable controllers for its children (the
        // "no internal processes" rule): move this worker into a leaf of its own.
        let leaf = dir.join("batchdb-worker");
        mkdir(&leaf).map_err(why)?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string()).map_err(why)?;
        std::fs::write(dir.join("cgroup.subtree_control"), enable).map_err(why)?;
    }
    let parent = dir.join("batchdb");
    mkdir(&parent).map_err(why)?;
    std::fs::write(parent.join("cgroup.subtree_control"), enable).map_err(why)?;
    Ok(Hierarchy::V2(parent))
}

/// The v1 memory, cpu and pids hierarchies (and cpuacct, if mounted), each writable.
fn detect_v1(mounts: &[Mount], own: &[(Vec<String>, String)]) -> Result<Hierarchy, String> {
    let dir = |name: &str| -> Result<PathBuf, String> {
        let m = mounts
            .iter()
            .find(|m| {
                m.controllers
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|c| c == name))
            })
            .ok_or_else(|| format!("the cgroup v1 {name} hierarchy is not mounted"))?;
        let path = own
            .iter()
            .find(|(c, _)| c.iter().any(|c| c == name))
            .map_or("/", |(_, p)| p.as_str());
        let parent = own_dir(m, path)
            .ok_or_else(|| format!("the worker's cgroup v1 {name} group is not mounted"))?
            .join("batchdb");
        mkdir(&parent).map_err(|e| format!("cgroup v1 {}: {e}", parent.display()))?;
        Ok(parent)
    };
    let (memory, cpu, pids) = (dir("memory")?, dir("cpu")?, dir("pids")?);
    let cpuacct = dir("cpuacct").ok();
    Ok(Hierarchy::V1 {
        memory,
        cpu,
        cpuacct,
        pids,
    })
}

/// `mkdir`, an existing directory being fine.
fn mkdir(p: &Path) -> io::Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// One attempt's group (one directory per v1 hierarchy), removed by [`Group::remove`]
/// (or, with a single try, when dropped).
#[derive(Debug)]
pub(crate) struct Group {
    v2: bool,
    /// `/batchdb/<attempt id>`: how its members' `/proc/<pid>/cgroup` lines end.
    suffix: String,
    /// Every directory made, memory's first.
    dirs: Vec<PathBuf>,
    /// Where the CPU counters are (v2: the group; v1: cpuacct's, if mounted).
    cpu_counters: Option<PathBuf>,
    /// The memory limit set, in bytes.
    pub memory: Option<u64>,
}

impl Group {
    /// Makes attempt `id`'s group in `h` with `limits` set. A half-made group is
    /// removed again before the error is returned.
    pub(crate) fn create(h: &Hierarchy, id: &str, limits: &Limits) -> io::Result<Group> {
        let mut g = Group {
            v2: matches!(h, Hierarchy::V2(_)),
            suffix: format!("/batchdb/{id}"),
            dirs: Vec::new(),
            cpu_counters: None,
            memory: limits.memory,
        };
        let made = g.make(h, id, limits);
        if made.is_err() {
            g.remove();
        }
        made.map(|()| g)
    }

    fn make(&mut self, h: &Hierarchy, id: &str, limits: &Limits) -> io::Result<()> {
        let write = |dir: &Path, file: &str, value: String| {
            std::fs::write(dir.join(file), value)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
        };
        match h {
            Hierarchy::V2(parent) => {
                let d = parent.join(id);
                std::fs::create_dir(&d)?;
                self.dirs.push(d.clone());
                self.cpu_counters = Some(d.clone());
                if let Some(bytes) = limits.memory {
                    write(&d, "memory.max", bytes.to_string())?;
                    // Swap would let the job dodge the limit.
                    if d.join("memory.swap.max").exists() {
                        write(&d, "memory.swap.max", "0".into())?;
                    }
                }
                if let Some(millicpus) = limits.millicpus {
                    write(&d, "cpu.max", format!("{} {PERIOD_US}", quota(millicpus)))?;
                }
                if let Some(n) = limits.pids {
                    write(&d, "pids.max", n.to_string())?;
                }
            }
            Hierarchy::V1 {
                memory,
                cpu,
                cpuacct,
                pids,
            } => {
                for parent in [memory, cpu, pids].into_iter().chain(cpuacct.as_ref()) {
                    let d = parent.join(id);
                    if self.dirs.contains(&d) {
                        continue; // co-mounted cpu,cpuacct
                    }
                    std::fs::create_dir(&d)?;
                    self.dirs.push(d);
                }
                self.cpu_counters = cpuacct.as_ref().map(|c| c.join(id));
                let (mem_dir, cpu_dir) = (memory.join(id), cpu.join(id));
                if let Some(bytes) = limits.memory {
                    write(&mem_dir, "memory.limit_in_bytes", bytes.to_string())?;
                    // Swap would let the job dodge the limit (memsw counts memory
                    // plus swap; it exists where swap accounting is on).
                    if mem_dir.join("memory.memsw.limit_in_bytes").exists() {
                        write(&mem_dir, "memory.memsw.limit_in_bytes", bytes.to_string())?;
                    }
                }
                if let Some(millicpus) = limits.millicpus {
                    write(&cpu_dir, "cpu.cfs_period_us", PERIOD_US.to_string())?;
                    write(&cpu_dir, "cpu.cfs_quota_us", quota(millicpus).to_string())?;
                }
                if let Some(n) = limits.pids {
                    write(&pids.join(id), "pids.max", n.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` file of each of its directories: writing `0` to each moves
    /// the writer in.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// What its processes used so far: peak memory (v2 `memory.peak`, v1
    /// `memory.max_usage_in_bytes`), user and system CPU (v2 `cpu.stat`, v1
    /// `cpuacct.usage` split as [`split_v1`] says). `None` where a counter cannot be
    /// read.
    pub(crate) fn usage(&self) -> Option<Usage> {
        let mem = self.dirs.first()?;
        let cpu = self.cpu_counters.as_ref()?;
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok();
        if self.v2 {
            let peak = read(mem, "memory.peak")?.trim().parse().ok()?;
            let (user, sys) = parse_cpu_stat(&read(cpu, "cpu.stat")?)?;
            return Some(Usage::new(peak, user, sys));
        }
        let peak = read(mem, "memory.max_usage_in_bytes")?
            .trim()
            .parse()
            .ok()?;
        let ns = |f| read(cpu, f).and_then(|t| t.trim().parse::<u64>().ok());
        let total = ns("cpuacct.usage")?;
        let (user, sys) = split_v1(total, ns("cpuacct.usage_user")?, ns("cpuacct.usage_sys")?);
        Some(Usage::new(peak, user / 1_000_000, sys / 1_000_000))
    }

    /// Whether the kernel killed a process of the group for memory (v2
    /// `memory.events`, v1 `memory.oom_control`: their `oom_kill` counters).
    pub(crate) fn oom_killed(&self) -> bool {
        let Some(mem) = self.dirs.first() else {
            return false;
        };
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(mem.join(file))
            .ok()
            .and_then(|t| parse_oom_kills(&t))
            .is_some_and(|n| n > 0)
    }

    /// The processes in it now (in any of its directories).
    pub(crate) fn members(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Kills (SIGKILL) every process in it, looking again until none is left (a
    /// process may fork while it is being killed), for up to about a second. Each
    /// kill goes through the process's `/proc` directory after checking it is still
    /// in this group, so a reused pid is never hit.
    pub(crate) fn kill_all(&self) {
        for _round in 0..50 {
            let mut found = false;
            for pid in self.members() {
                found |= super::sweep::kill_if_in_group(pid, &self.suffix);
            }
            if !found {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Removes its directories, waiting up to a second for exiting processes to
    /// leave them (a group with processes cannot be removed). What is still there
    /// then is logged and left.
    pub(crate) fn remove(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while let Some(d) = self.dirs.last() {
            match std::fs::remove_dir(d) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    if std::time::Instant::now() >= deadline {
                        tracing::warn!("cgroup {} not removed: {e}", d.display());
                        self.dirs.pop();
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
                _ => {
                    self.dirs.pop();
                }
            }
        }
    }
}

impl Drop for Group {
    /// One try at removing what is left (the attempt was dropped mid-way): an empty
    /// group goes, one with processes is logged and left.
    fn drop(&mut self) {
        while let Some(d) = self.dirs.pop() {
            if let Err(e) = std::fs::remove_dir(&d) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!("cgroup {} not removed: {e}", d.display());
                }
            }
        }
    }
}

/// The quota per [`PERIOD_US`] for `millicpus` thousandths of a CPU (at least 1 ms,
/// the kernel's smallest).
fn quota(millicpus: u64) -> u64 {
    (millicpus.saturating_mul(PERIOD_US) / 1000).max(1000)
}

/// v1's CPU time `(user, system)` in ns: the total is `cpuacct.usage` (the group's
/// tasks' run time, as rusage counts it); `cpuacct.usage_user`/`usage_sys` only
/// split it, since their sum can also hold interrupt time the kernel handled while a
/// task of the group was current (seen 12 % over, under heavy I/O elsewhere).
pub(crate) fn split_v1(total: u64, user: u64, sys: u64) -> (u64, u64) {
    let both = u128::from(user) + u128::from(sys);
    if both == 0 {
        return (total, 0);
    }
    let u = u64::try_from(u128::from(total) * u128::from(user) / both).unwrap_or(total);
    (u, total - u.min(total))
}

/// `(user, system)` milliseconds from a v2 `cpu.stat` text.
pub(crate) fn parse_cpu_stat(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == name).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    Some((field("user_usec")? / 1000, field("system_usec")? / 1000))
}

/// The `oom_kill` counter of a v2 `memory.events` or v1 `memory.oom_control` text.
pub(crate) fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "oom_kill").then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
27 25 0:25 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
28 25 0:26 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
29 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
30 25 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
31 25 0:29 / /mnt/with\\040space rw - ext4 /dev/sda rw";

    #[test]
    fn mountinfo_gives_each_hierarchy_with_its_controllers_and_root() {
        let m = parse_mounts(MOUNTINFO);
        assert_eq!(m.len(), 5, "{m:?}");
        assert_eq!(m[0].point, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[0].controllers, Some(vec!["cpu".into(), "cpuacct".into()]));
        assert_eq!(m[1].root, "/docker/abc");
        assert_eq!(m[3].controllers, None, "v2");
        assert_eq!(m[4].controllers, Some(vec!["xattr".into()]));
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
    }

    #[test]
    fn own_groups_are_mapped_under_their_mounts() {
        let own = parse_own("4:memory:/docker/abc/inner\n2:cpu,cpuacct:/\n0::/user.slice\n");
        assert_eq!(
            own[0],
            (vec!["memory".to_string()], "/docker/abc/inner".into())
        );
        assert_eq!(own[1].0, vec!["cpu".to_string(), "cpuacct".into()]);
        assert_eq!(own[2], (vec![], "/user.slice".into()));
        let m = parse_mounts(MOUNTINFO);
        assert_eq!(
            own_dir(&m[1], "/docker/abc/inner"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/inner"))
        );
        assert_eq!(own_dir(&m[1], "/elsewhere"), None);
        assert_eq!(
            own_dir(&m[0], "/"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
    }

    #[test]
    fn counters_are_parsed() {
        let stat = "usage_usec 3500\nuser_usec 2500\nsystem_usec 1000\nnr_periods 0\n";
        assert_eq!(parse_cpu_stat(stat), Some((2, 1)));
        assert_eq!(parse_cpu_stat("usage_usec 1\n"), None);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(parse_oom_kills(v1), Some(2));
        let v2 = "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kills(v2), Some(1));
        assert_eq!(parse_oom_kills("oom 1\n"), None);
        assert_eq!(split_v1(1000, 300, 100), (750, 250));
        assert_eq!(split_v1(1000, 0, 0), (1000, 0));
        assert_eq!(quota(1500), 150_000);
        assert_eq!(quota(1), 1000, "the kernel's smallest quota");
    }
}
