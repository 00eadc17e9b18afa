//! How a worker enforces an instance's limits (`--memory`, `--cpus`, `--pids`): a
//! cgroup per attempt where it can make one, rlimits where it was told to use them,
//! and otherwise not at all — then an attempt with limits fails, saying why. A limit
//! is never silently ignored.

use std::fmt;
use std::str::FromStr;

use super::cgroup::{self, Group, Hierarchy};
use crate::error::{Error, Result};
use crate::queue::Limits;

/// What `run --limits` asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitMode {
    /// A cgroup per attempt where the worker can make one; where it cannot, an
    /// attempt with limits fails (with the reason and the fix in its message).
    #[default]
    Auto,
    /// A cgroup per attempt; the worker does not start where it cannot make one.
    Cgroup,
    /// rlimits: memory through `RLIMIT_DATA`, processes through `RLIMIT_NPROC` (per
    /// user, not per job, and not enforced for root); `--cpus` cannot be enforced
    /// this way, and an attempt with it fails.
    Rlimit,
    /// Nothing is enforced: an attempt with limits fails.
    None,
}

impl FromStr for LimitMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<LimitMode> {
        match s {
            "auto" => Ok(LimitMode::Auto),
            "cgroup" => Ok(LimitMode::Cgroup),
            "rlimit" => Ok(LimitMode::Rlimit),
            "none" => Ok(LimitMode::None),
            _ => Err(Error::Config {
                what: "limits",
                value: s.into(),
                why: "expected auto, cgroup, rlimit or none".into(),
            }),
        }
    }
}

/// How this worker enforces limits, decided once when it starts ([`Enforcer::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enforcer(How);

#[derive(Debug, Clone, PartialEq, Eq)]
enum How {
    Cgroup(Hierarchy),
    Rlimit,
    /// Nothing can or may be enforced, for this reason.
    Off(String),
}

/// What an attempt with limits runs under, made by [`Enforcer::prepare`].
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    /// Its cgroup, which the job's process joins before its exec.
    pub group: Option<Group>,
    /// `(resource, value)` pairs to set with `setrlimit` before the exec.
    pub rlimits: Vec<(u32, u64)>,
    /// A memory limit set as an rlimit (for the failure's message).
    pub rlimit_memory: Option<u64>,
}

impl Enforcer {
    /// Decides how to enforce limits as `mode` asks: for `auto` and `cgroup`, finds a
    /// cgroup hierarchy this worker may write (cgroup v2 with `memory`, `cpu` and
    /// `pids` available to the worker's group, else the v1 hierarchies), and makes
    /// its `batchdb` directory under the worker's group. Errors only for `cgroup`
    /// without one ([`Error::Config`], saying why).
    pub fn new(mode: LimitMode) -> Result<Enforcer> {
        Ok(Enforcer(match mode {
            LimitMode::Rlimit => How::Rlimit,
            LimitMode::None => How::Off("this worker runs with --limits none".into()),
            LimitMode::Auto | LimitMode::Cgroup => match cgroup::detect() {
                Ok(h) => How::Cgroup(h),
                Err(why) if mode == LimitMode::Auto => How::Off(format!(
                    "this worker cannot make a cgroup ({why}); delegate the memory, cpu \
                     and pids controllers to it, or run it with --limits rlimit"
                )),
                Err(why) => {
                    return Err(Error::Config {
                        what: "limits",
                        value: "cgroup".into(),
                        why: format!("no cgroup can be made: {why}"),
                    });
                }
            },
        }))
    }

    /// Whether it enforces limits at all (through a cgroup or rlimits).
    pub fn enforces(&self) -> bool {
        !matches!(self.0, How::Off(_))
    }

    /// An enforcer that enforces nothing (an attempt with limits fails).
    pub fn off() -> Enforcer {
        Enforcer(How::Off("this worker enforces no limits".into()))
    }

    /// What an attempt with `limits` runs under: its cgroup (made now), or its
    /// rlimits. `Err` is the attempt's failure message: a limit this worker cannot
    /// enforce, or a cgroup it could not make.
    pub(crate) fn prepare(&self, attempt_id: &str, limits: &Limits) -> Result<Prepared, String> {
        if limits.is_none() {
            return Ok(Prepared::default());
        }
        match &self.0 {
            How::Off(why) => Err(format!("limits {} not enforced: {why}", show(limits))),
            How::Cgroup(h) => Group::create(h, attempt_id, limits)
                .map(|g| Prepared {
                    group: Some(g),
                    ..Prepared::default()
                })
                .map_err(|e| format!("cannot make the attempt's cgroup: {e}")),
            How::Rlimit => {
                if limits.millicpus.is_some() {
                    return Err(format!(
                        "limits {} not enforced: --cpus needs a cgroup and this worker \
                         runs with --limits rlimit",
                        show(limits)
                    ));
                }
                let mut rlimits = Vec::new();
                rlimits.extend(limits.memory.map(|m| (libc::RLIMIT_DATA, m)));
                rlimits.extend(limits.pids.map(|p| (libc::RLIMIT_NPROC, p)));
                Ok(Prepared {
                    group: None,
                    rlimits,
                    rlimit_memory: limits.memory,
                })
            }
        }
    }
}

impl fmt::Display for Enforcer {
    /// What the worker's startup line says: `cgroup v1 (...)`, `rlimit (...)` or
    /// `none (why)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            How::Cgroup(h) => f.write_str(&h.describe()),
            How::Rlimit => f.write_str(
                "rlimit (memory: RLIMIT_DATA; pids: RLIMIT_NPROC, per user; --cpus cannot be \
                 enforced: such jobs fail)",
            ),
            How::Off(why) => write!(f, "none ({why}; jobs with limits fail)"),
        }
    }
}

/// A size in bytes as people read it: `64 MiB`, `1.5 GiB`, `100 bytes`.
pub fn size(bytes: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (unit, shift) in UNITS {
        let div = 1u64 << shift;
        if bytes >= div {
            if bytes % div == 0 {
                return format!("{} {unit}", bytes / div);
            }
            #[allow(clippy::cast_precision_loss)] // for people, one decimal
            let v = bytes as f64 / div as f64;
            return format!("{v:.1} {unit}");
        }
    }
    format!("{bytes} bytes")
}

/// Limits as the options that set them: `--memory 64 MiB --cpus 1.5 --pids 20`.
fn show(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(m) = l.memory {
        parts.push(format!("--memory {}", size(m)));
    }
    if let Some(c) = l.millicpus {
        #[allow(clippy::cast_precision_loss)] // thousandths of a CPU
        parts.push(format!("--cpus {}", c as f64 / 1000.0));
    }
    if let Some(p) = l.pids {
        parts.push(format!("--pids {p}"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(size(64 << 20), "64 MiB");
        assert_eq!(size(512 << 20), "512 MiB");
        assert_eq!(size(8 << 30), "8 GiB");
        assert_eq!(size(1536 << 20), "1.5 GiB");
        assert_eq!(size(100), "100 bytes");
        assert_eq!(size(1024), "1 KiB");
    }

    #[test]
    fn modes_parse_and_an_unenforceable_limit_fails_the_attempt() {
        assert_eq!("rlimit".parse::<LimitMode>().unwrap(), LimitMode::Rlimit);
        assert!("cgroups".parse::<LimitMode>().is_err());
        let limits = Limits {
            memory: Some(64 << 20),
            millicpus: Some(500),
            pids: None,
        };
        let none = Enforcer::new(LimitMode::None).unwrap();
        let err = none.prepare("a", &limits).unwrap_err();
        assert_eq!(
            err,
            "limits --memory 64 MiB --cpus 0.5 not enforced: this worker runs with --limits none"
        );
        assert!(
            none.prepare("a", &Limits::default()).is_ok(),
            "no limits, nothing to do"
        );
        let rl = Enforcer::new(LimitMode::Rlimit).unwrap();
        assert!(
            rl.prepare("a", &limits)
                .unwrap_err()
                .contains("--cpus needs a cgroup")
        );
        let mem = Limits {
            millicpus: None,
            pids: Some(20),
            ..limits
        };
        let p = rl.prepare("a", &mem).unwrap();
        assert_eq!(
            p.rlimits,
            vec![(libc::RLIMIT_DATA, 64 << 20), (libc::RLIMIT_NPROC, 20)]
        );
    }
}
