//! Push options as a front end receives them (seconds as numbers, a delay or a
//! time), validated once for the CLI and the HTTP API alike.

use std::time::Duration;

use super::batch::{Dependency, check_batch_name};
use super::context::{Concurrency, ExecContext, Needs, parse_size};
use super::types::{PushOptions, Selector, now_ms};
use crate::error::{Error, Result};

/// The longest duration any option takes: ten years.
pub const MAX_SECS: f64 = 315_360_000.0;

/// Seconds (fractions allowed) as a duration: finite, from 0 to [`MAX_SECS`];
/// anything else is [`Error::Config`] naming the option `what`.
pub fn secs(what: &'static str, v: f64) -> Result<Duration> {
    let bad = || Error::Config {
        what,
        value: v.to_string(),
        why: format!("expected a number of seconds from 0 to {MAX_SECS}"),
    };
    if !(0.0..=MAX_SECS).contains(&v) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(v).map_err(|_| bad())
}

/// CPUs (fractions allowed, at least 0.01, at most 4096) in thousandths.
fn millicpus(cpus: f64) -> Result<u64> {
    if !(0.01..=4096.0).contains(&cpus) {
        return Err(Error::Config {
            what: "cpu limit",
            value: cpus.to_string(),
            why: "expected a number of CPUs from 0.01 to 4096".into(),
        });
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // in range
    Ok((cpus * 1000.0).round() as u64)
}

/// A push as a front end received it, before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushRequest {
    /// Higher runs first.
    pub priority: i64,
    /// Not before this many seconds from now.
    pub delay: Option<f64>,
    /// Not before this time (epoch milliseconds).
    pub run_at: Option<i64>,
    /// Kill the run after this many seconds.
    pub timeout: Option<f64>,
    /// Retry a failed run up to this many times.
    pub retries: Option<u32>,
    /// Serve from the result cache when possible.
    pub cached: bool,
    /// The batch to join (`[A-Za-z0-9._-]{1,128}`).
    pub batch: Option<String>,
    /// Selectors whose instances must all end with a result first (`--after`).
    pub after: Vec<String>,
    /// Selectors whose instances must all end first, whatever the outcome
    /// (`--after-any`).
    pub after_any: Vec<String>,
    /// The working directory, absolute (a front end makes `.` absolute).
    pub cwd: Option<String>,
    /// Environment variables, each `KEY=VALUE` (a later one wins).
    pub env: Vec<String>,
    /// The memory limit, as [`parse_size`] reads it (`512M`).
    pub memory: Option<String>,
    /// The CPU limit in CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// The limit on processes at once.
    pub pids: Option<u64>,
    /// What it needs from a worker, each `NAME=AMOUNT`.
    pub needs: Vec<String>,
    /// Its concurrency key, `KEY=N`.
    pub concurrency: Option<String>,
}

impl PushRequest {
    /// The push options it asks for. A delay and a time together, a negative time,
    /// or seconds that [`secs`] refuses are [`Error::Config`].
    pub fn options(&self) -> Result<PushOptions> {
        let run_at = match (self.run_at, self.delay) {
            (Some(_), Some(d)) => {
                return Err(Error::Config {
                    what: "delay",
                    value: d.to_string(),
                    why: "give a delay or a time to run at, not both".into(),
                });
            }
            (Some(t), None) if t < 0 => {
                return Err(Error::Config {
                    what: "run_at",
                    value: t.to_string(),
                    why: "expected epoch milliseconds from 0".into(),
                });
            }
            (Some(t), None) => Some(t),
            (None, Some(d)) => {
                let ms = i64::try_from(secs("delay", d)?.as_millis()).unwrap_or(i64::MAX);
                Some(now_ms().saturating_add(ms))
            }
            (None, None) => None,
        };
        Ok(PushOptions {
            priority: self.priority,
            run_at,
            timeout: self.timeout.map(|t| secs("timeout", t)).transpose()?,
            retries: self.retries,
            cached: self.cached,
            batch: self.batch.clone(),
            after: self.dependencies()?,
            context: self.context()?,
            needs: self.needs()?,
            concurrency: self
                .concurrency
                .as_deref()
                .map(Concurrency::parse)
                .transpose()?,
        })
    }

    /// The working directory, environment and limits asked for.
    fn context(&self) -> Result<ExecContext> {
        let mut c = ExecContext::default();
        if let Some(d) = &self.cwd {
            if !d.starts_with('/') || d.contains('\0') {
                return Err(Error::Config {
                    what: "working directory",
                    value: d.clone(),
                    why: "expected an absolute path".into(),
                });
            }
            c.cwd = Some(d.clone());
        }
        for kv in &self.env {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            if !kv.contains('=') {
                return Err(Error::Config {
                    what: "environment variable",
                    value: kv.clone(),
                    why: "expected KEY=VALUE".into(),
                });
            }
            ExecContext::check_env(k, v)?;
            c.env.insert(k.into(), v.into());
        }
        c.limits.memory = self
            .memory
            .as_deref()
            .map(|m| parse_size("memory limit", m))
            .transpose()?;
        if c.limits.memory == Some(0) {
            return Err(Error::Config {
                what: "memory limit",
                value: "0".into(),
                why: "a limit must be above 0".into(),
            });
        }
        c.limits.millicpus = self.cpus.map(millicpus).transpose()?;
        c.limits.pids = match self.pids {
            Some(0) => {
                return Err(Error::Config {
                    what: "pids limit",
                    value: "0".into(),
                    why: "a limit must be at least 1".into(),
                });
            }
            p => p,
        };
        Ok(c)
    }

    /// The needs asked for.
    fn needs(&self) -> Result<Needs> {
        let mut n = Needs::default();
        for spec in &self.needs {
            n.add(spec)?;
        }
        Ok(n)
    }

    /// The dependencies asked for, each selector parsed; a batch name or selector
    /// that does not parse is [`Error::Config`] (or [`Error::InvalidHash`]).
    fn dependencies(&self) -> Result<Vec<Dependency>> {
        if let Some(b) = &self.batch {
            check_batch_name(b)?;
        }
        let all = self.after.iter().map(|s| (s, false));
        let any = self.after_any.iter().map(|s| (s, true));
        all.chain(any)
            .map(|(s, any)| {
                let sel: Selector = s.parse()?;
                Ok(if any {
                    Dependency::on_end(sel)
                } else {
                    Dependency::on_result(sel)
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_must_be_finite_and_in_range() {
        assert_eq!(secs("t", 1.5).unwrap(), Duration::from_millis(1500));
        assert_eq!(secs("t", 0.0).unwrap(), Duration::ZERO);
        for bad in [-1.0, f64::NAN, f64::INFINITY, MAX_SECS * 2.0] {
            let err = secs("timeout", bad).unwrap_err();
            assert!(err.to_string().contains("invalid timeout"), "{err}");
        }
    }

    #[test]
    fn a_request_becomes_options_or_a_clear_error() {
        let req = PushRequest {
            priority: 3,
            run_at: Some(5000),
            timeout: Some(2.0),
            retries: Some(1),
            cached: true,
            ..PushRequest::default()
        };
        let o = req.options().unwrap();
        assert_eq!(
            (o.priority, o.run_at, o.retries, o.cached),
            (3, Some(5000), Some(1), true)
        );
        assert_eq!(o.timeout, Some(Duration::from_secs(2)));
        let before = now_ms();
        let delayed = PushRequest {
            delay: Some(10.0),
            ..PushRequest::default()
        };
        let at = delayed.options().unwrap().run_at.unwrap();
        assert!(at >= before + 10_000 && at <= now_ms() + 10_000);
        let both = PushRequest {
            delay: Some(1.0),
            run_at: Some(1),
            ..PushRequest::default()
        };
        assert!(both.options().unwrap_err().to_string().contains("not both"));
        let negative = PushRequest {
            run_at: Some(-1),
            ..PushRequest::default()
        };
        assert!(matches!(
            negative.options(),
            Err(Error::Config { what: "run_at", .. })
        ));
    }
}
