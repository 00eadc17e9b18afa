//! What an instance runs with besides its payload, and what running it takes: its
//! working directory, environment and limits ([`ExecContext`]), the counted
//! resources it needs from a worker ([`Needs`]), the concurrency key it shares with
//! other instances ([`Concurrency`]); what a worker has ([`Resources`]) and what an
//! attempt used ([`Usage`]). Pure: parsing, canonical forms, and the arithmetic of
//! fitting needs into what a worker has free.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Limits on one attempt: enforced by the worker through a cgroup per attempt, or
/// through rlimits where it was told to use them (`run --limits rlimit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Limits {
    /// Memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// CPU time per wall second, in thousandths of a CPU (`--cpus 1.5` is 1500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millicpus: Option<u64>,
    /// Processes (and threads) at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
}

impl Limits {
    /// No limit set.
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }
}

/// Where and with what an instance runs, besides its payload. It belongs to the
/// instance, not the job (the same payload may run in two directories), and its
/// directory and environment are part of the result-cache key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecContext {
    /// The working directory (absolute); `None`: the worker's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Variables set for the job, over the worker's environment (sorted by name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Limits on each attempt.
    #[serde(default, skip_serializing_if = "Limits::is_none")]
    pub limits: Limits,
}

impl ExecContext {
    /// Nothing set: the job runs as the worker runs it.
    pub fn is_empty(&self) -> bool {
        *self == ExecContext::default()
    }

    /// The JSON text stored in the instance row (`None` when empty): keys in a fixed
    /// order and the environment sorted, so equal contexts have equal text.
    pub(crate) fn to_text(&self) -> Option<String> {
        (!self.is_empty()).then(|| serde_json::to_string(self).unwrap_or_default())
    }

    /// The context stored as `text`; `Err` names what is wrong with it.
    pub(crate) fn from_text(text: Option<&str>) -> std::result::Result<ExecContext, String> {
        text.map_or(Ok(ExecContext::default()), |t| {
            serde_json::from_str(t).map_err(|e| format!("execution context {t:?}: {e}"))
        })
    }

    /// What of it decides a job's outcome for the result cache (directory and
    /// environment, not limits): `None` when neither is set.
    pub(crate) fn cache_text(&self) -> Option<String> {
        if self.cwd.is_none() && self.env.is_empty() {
            return None;
        }
        let key = ExecContext {
            limits: Limits::default(),
            ..self.clone()
        };
        key.to_text()
    }

    /// Checks an environment variable's name: not empty, no `=` and no NUL; its value
    /// no NUL.
    pub fn check_env(key: &str, value: &str) -> Result<()> {
        let bad = |why: &str| Error::Config {
            what: "environment variable",
            value: format!("{key}={value}"),
            why: why.into(),
        };
        if key.is_empty() || key.contains('=') || key.contains('\0') {
            return Err(bad("expected KEY=VALUE with a name of no '=' or NUL"));
        }
        if value.contains('\0') {
            return Err(bad("a value cannot hold a NUL byte"));
        }
        Ok(())
    }
}

/// A quantity as people write it: digits with an optional binary suffix `K`, `M`,
/// `G`, `T` (also `KiB`..., `KB`..., lower case), e.g. `512M` or `8G`. Fractions are
/// allowed with a suffix (`1.5G`).
pub fn parse_size(what: &'static str, s: &str) -> Result<u64> {
    let bad = || Error::Config {
        what,
        value: s.into(),
        why: "expected a size such as 512M or 8G".into(),
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    if num.is_empty() {
        return Err(bad());
    }
    if shift == 0 {
        return num.parse().map_err(|_| bad());
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes =
        (v * f64::from(1u32 << (shift / 2)) * f64::from(1u32 << (shift - shift / 2))).round();
    if !(0.0..18_446_744_073_709_551_615.0).contains(&bytes) {
        return Err(bad());
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked above
    Ok(bytes as u64)
}

/// Checks a resource or concurrency-key name: `[A-Za-z0-9._-]{1,64}`.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            what,
            value: name.into(),
            why: "expected 1 to 64 of A-Z a-z 0-9 . _ -".into(),
        })
    }
}

fn split_pair<'a>(what: &'static str, s: &'a str) -> Result<(&'a str, &'a str)> {
    let (k, v) = s.split_once('=').ok_or_else(|| Error::Config {
        what,
        value: s.into(),
        why: "expected NAME=VALUE".into(),
    })?;
    check_name(what, k)?;
    Ok((k, v))
}

/// What an instance needs from the worker that runs it: an amount of each named
/// resource (`gpu=2`, `mem=8G`). A worker claims it only when it has that much free.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Needs(pub BTreeMap<String, u64>);

impl Needs {
    /// Adds one `NAME=AMOUNT` (amount as [`parse_size`] reads it, at least 1); a name
    /// given twice is an error.
    pub fn add(&mut self, spec: &str) -> Result<()> {
        let (k, v) = split_pair("resource need", spec)?;
        let n = parse_size("resource need", v)?;
        if n == 0 {
            return Err(Error::Config {
                what: "resource need",
                value: spec.into(),
                why: "an amount must be at least 1".into(),
            });
        }
        if self.0.insert(k.to_string(), n).is_some() {
            return Err(Error::Config {
                what: "resource need",
                value: spec.into(),
                why: format!("{k} is given twice"),
            });
        }
        Ok(())
    }

    /// Nothing needed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The stored text, `name=amount` pairs sorted by name and joined by `,` (`None`
    /// when empty).
    pub(crate) fn to_text(&self) -> Option<String> {
        (!self.is_empty()).then(|| self.to_string())
    }

    /// Needs stored as `text`; `Err` says what is wrong with it.
    pub(crate) fn from_text(text: Option<&str>) -> std::result::Result<Needs, String> {
        let mut n = Needs::default();
        for part in text.into_iter().flat_map(|t| t.split(',')) {
            n.add(part).map_err(|e| e.to_string())?;
        }
        Ok(n)
    }
}

impl fmt::Display for Needs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

/// A concurrency key: at most `limit` instances carrying `key` run at once, across
/// every worker (checked by the database at claim time, against the candidate's own
/// limit).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Concurrency {
    /// The key.
    pub key: String,
    /// How many may run at once (at least 1).
    pub limit: u32,
}

impl Concurrency {
    /// Parses `KEY=N`.
    pub fn parse(spec: &str) -> Result<Concurrency> {
        let (k, v) = split_pair("concurrency key", spec)?;
        let limit = v.parse::<u32>().ok().filter(|&n| n >= 1);
        let limit = limit.ok_or_else(|| Error::Config {
            what: "concurrency key",
            value: spec.into(),
            why: "expected KEY=N with N a whole number from 1".into(),
        })?;
        Ok(Concurrency {
            key: k.into(),
            limit,
        })
    }
}

/// One resource a worker has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resource {
    /// Named units, handed out one by one (`gpu=0,1,2,3`): a job needing 2 gets two
    /// of the names, in `BATCHDB_RESOURCE_<NAME>`.
    Units(Vec<String>),
    /// An amount (`mem=64G`, `licences=5`).
    Quantity(u64),
}

impl Resource {
    /// How much of it there is.
    pub fn amount(&self) -> u64 {
        match self {
            Resource::Units(u) => u.len() as u64,
            Resource::Quantity(q) => *q,
        }
    }
}

/// What a worker has (`run --resource ...`), by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Resources(pub BTreeMap<String, Resource>);

impl Resources {
    /// Adds one `NAME=VALUE`: named units when the value is a comma-separated list,
    /// is not a number, or the name is `gpu` (`gpu=0,1`, `gpu=0`); else a quantity
    /// ([`parse_size`]: `mem=64G`, `licences=5`).
    pub fn add(&mut self, spec: &str) -> Result<()> {
        let (k, v) = split_pair("resource", spec)?;
        let quantity = (k != "gpu" && !v.contains(','))
            .then(|| parse_size("resource", v).ok())
            .flatten();
        let r = if let Some(q) = quantity {
            Resource::Quantity(q)
        } else {
            let units: Vec<String> = v.split(',').map(String::from).collect();
            if units.iter().any(String::is_empty) {
                return Err(Error::Config {
                    what: "resource",
                    value: spec.into(),
                    why: "expected NAME=AMOUNT or NAME=UNIT,UNIT,... with no empty unit".into(),
                });
            }
            Resource::Units(units)
        };
        if self.0.insert(k.to_string(), r).is_some() {
            return Err(Error::Config {
                what: "resource",
                value: spec.into(),
                why: format!("{k} is given twice"),
            });
        }
        Ok(())
    }

    /// Whether `needs` fit into these (every need named here, with enough of it).
    pub fn fits(&self, needs: &Needs) -> bool {
        needs
            .0
            .iter()
            .all(|(k, n)| self.0.get(k).is_some_and(|r| r.amount() >= *n))
    }

    /// Takes `needs` out of these (they must [`fit`](Self::fits)): returns what was
    /// taken (for units, the first free names, in order).
    #[must_use]
    pub fn take(&mut self, needs: &Needs) -> Resources {
        let mut taken = Resources::default();
        for (k, n) in &needs.0 {
            let Some(r) = self.0.get_mut(k) else { continue };
            let t = match r {
                Resource::Units(u) => {
                    let n = usize::try_from(*n).unwrap_or(usize::MAX).min(u.len());
                    Resource::Units(u.drain(..n).collect())
                }
                Resource::Quantity(q) => {
                    let t = (*n).min(*q);
                    *q -= t;
                    Resource::Quantity(t)
                }
            };
            taken.0.insert(k.clone(), t);
        }
        taken
    }

    /// Gives `taken` back (what [`take`](Self::take) returned).
    pub fn give_back(&mut self, taken: &Resources) {
        for (k, t) in &taken.0 {
            match (self.0.get_mut(k), t) {
                (Some(Resource::Units(u)), Resource::Units(back)) => {
                    u.extend(back.iter().cloned());
                }
                (Some(Resource::Quantity(q)), Resource::Quantity(back)) => *q += back,
                _ => {}
            }
        }
    }

    /// Removes `taken` (what a claim gave out of a copy of these) from these.
    pub fn remove(&mut self, taken: &Resources) {
        for (k, t) in &taken.0 {
            match (self.0.get_mut(k), t) {
                (Some(Resource::Units(u)), Resource::Units(gone)) => {
                    u.retain(|x| !gone.contains(x));
                }
                (Some(Resource::Quantity(q)), Resource::Quantity(gone)) => {
                    *q = q.saturating_sub(*gone);
                }
                _ => {}
            }
        }
    }

    /// Nothing declared.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The variables a job given these gets: `BATCHDB_RESOURCE_<NAME>` (upper case,
    /// `.` and `-` as `_`) with the units given, comma-separated, or the amount; and
    /// for `gpu`, `CUDA_VISIBLE_DEVICES` and `HIP_VISIBLE_DEVICES` with its units.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, r) in &self.0 {
            let v = match r {
                Resource::Units(u) => u.join(","),
                Resource::Quantity(q) => q.to_string(),
            };
            let name: String = k
                .chars()
                .map(|c| match c {
                    '.' | '-' => '_',
                    c => c.to_ascii_uppercase(),
                })
                .collect();
            if k == "gpu" {
                out.push(("CUDA_VISIBLE_DEVICES".into(), v.clone()));
                out.push(("HIP_VISIBLE_DEVICES".into(), v.clone()));
            }
            out.push((format!("BATCHDB_RESOURCE_{name}"), v));
        }
        out
    }
}

/// What one attempt used, measured by the worker (from the attempt's cgroup where it
/// has one, which counts every descendant; else from the main process's rusage,
/// which counts the descendants it waited for). Serialized as `max_rss`, `cpu_ms`
/// (their sum), `user_ms` and `sys_ms`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Peak memory (resident set), in bytes.
    pub max_rss: u64,
    /// User CPU time, in milliseconds.
    pub user_ms: u64,
    /// System CPU time, in milliseconds.
    pub sys_ms: u64,
}

impl Usage {
    /// Peak memory `max_rss` bytes, `user_ms` and `sys_ms` of CPU.
    pub fn new(max_rss: u64, user_ms: u64, sys_ms: u64) -> Usage {
        Usage {
            max_rss,
            user_ms,
            sys_ms,
        }
    }

    /// User plus system CPU time, in milliseconds.
    pub fn cpu_ms(&self) -> u64 {
        self.user_ms.saturating_add(self.sys_ms)
    }
}

impl Serialize for Usage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Usage", 4)?;
        st.serialize_field("max_rss", &self.max_rss)?;
        st.serialize_field("cpu_ms", &self.cpu_ms())?;
        st.serialize_field("user_ms", &self.user_ms)?;
        st.serialize_field("sys_ms", &self.sys_ms)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(parse_size("m", "512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("m", "8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("m", "1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("m", "4096").unwrap(), 4096);
        assert_eq!(parse_size("m", "64KiB").unwrap(), 64 << 10);
        for bad in ["", "M", "-1G", "1.5", "12X", "1e3", "99999999999T"] {
            assert!(parse_size("memory", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn needs_are_canonical_and_round_trip() {
        let mut n = Needs::default();
        n.add("mem=8G").unwrap();
        n.add("gpu=2").unwrap();
        assert_eq!(n.to_text().unwrap(), "gpu=2,mem=8589934592");
        assert_eq!(Needs::from_text(n.to_text().as_deref()).unwrap(), n);
        assert!(n.add("gpu=1").is_err(), "twice");
        for bad in ["gpu", "gpu=0", "=2", "g p u=1", "gpu=x"] {
            assert!(Needs::default().add(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resources_are_units_or_quantities_and_needs_fit_take_and_give_back() {
        let mut r = Resources::default();
        r.add("gpu=0,1,2,3").unwrap();
        r.add("mem=64G").unwrap();
        r.add("licences=5").unwrap();
        r.add("tpu=a").unwrap();
        assert_eq!(r.0["tpu"], Resource::Units(vec!["a".into()]));
        assert_eq!(r.0["licences"], Resource::Quantity(5));
        let mut need = Needs::default();
        need.add("gpu=2").unwrap();
        need.add("mem=8G").unwrap();
        assert!(r.fits(&need));
        let taken = r.take(&need);
        assert_eq!(
            taken.0["gpu"],
            Resource::Units(vec!["0".into(), "1".into()])
        );
        let taken2 = r.take(&need);
        assert!(!r.fits(&need), "no gpu left");
        r.give_back(&taken);
        assert!(r.fits(&need));
        r.give_back(&taken2);
        assert_eq!(r.0["mem"], Resource::Quantity(64 << 30));
        let mut copy = r.clone();
        let given = copy.take(&need);
        r.remove(&given);
        assert_eq!(r, copy, "removing what a copy gave leaves the same");
        let env = given.env();
        assert!(
            env.contains(&("BATCHDB_RESOURCE_GPU".into(), "0,1".into())),
            "{env:?}"
        );
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "0,1".into())));
        assert!(env.contains(&("HIP_VISIBLE_DEVICES".into(), "0,1".into())));
        assert!(env.contains(&("BATCHDB_RESOURCE_MEM".into(), (8u64 << 30).to_string())));
        let mut other = Needs::default();
        other.add("fpga=1").unwrap();
        assert!(!r.fits(&other), "a resource the worker lacks never fits");
        assert!(Resources::default().add("gpu=0,,1").is_err());
    }

    #[test]
    fn concurrency_keys_and_names_are_checked() {
        let c = Concurrency::parse("api=2").unwrap();
        assert_eq!((c.key.as_str(), c.limit), ("api", 2));
        for bad in ["api", "api=0", "api=-1", "a/b=1", "=1"] {
            assert!(Concurrency::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_context_is_stored_as_canonical_text_and_its_cache_part_leaves_out_limits() {
        let mut c = ExecContext::default();
        assert_eq!(c.to_text(), None);
        c.env.insert("B".into(), "2".into());
        c.env.insert("A".into(), "1".into());
        c.cwd = Some("/tmp".into());
        let text = c.to_text().unwrap();
        assert_eq!(text, r#"{"cwd":"/tmp","env":{"A":"1","B":"2"}}"#);
        assert_eq!(ExecContext::from_text(Some(&text)).unwrap(), c);
        let mut limited = c.clone();
        limited.limits.memory = Some(1 << 20);
        assert_eq!(limited.cache_text(), c.cache_text());
        assert!(ExecContext::check_env("A=B", "1").is_err());
        assert!(ExecContext::check_env("", "1").is_err());
        assert!(ExecContext::check_env("A", "x\0").is_err());
    }
}
