//! How an attempt ended, decided without I/O: what the worker saw (a stop it asked
//! for, the exit status, what went wrong with the payload and the outputs) in, what
//! it records out.

use std::time::Duration;

use crate::runner::ExitStatus;

/// Why the worker stopped an attempt before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stopped {
    /// Its timeout ran out.
    Timeout,
    /// A cancel was requested.
    Cancel,
    /// The lease was lost (fenced, or not renewed in time).
    Lost,
    /// The worker was shut down by force.
    Shutdown,
}

/// What the worker saw of an ended attempt.
#[derive(Debug, Clone, Default)]
pub(super) struct Ended {
    /// The stop the worker asked for, if any.
    pub stopped: Option<Stopped>,
    /// How the runner ended.
    pub status: ExitStatus,
    /// Why waiting for the runner failed, if it did.
    pub wait_error: Option<String>,
    /// What went wrong storing outputs or feeding the payload, in that order.
    pub problems: Vec<String>,
    /// Whether an output could not be stored (the store's fault, not the job's).
    pub store_failed: bool,
    /// The attempt's timeout.
    pub timeout: Option<Duration>,
}

/// What the worker records for an ended attempt, with the message it records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Nothing: another worker may own the instance now.
    Abandon(String),
    /// The instance goes back to pending, unfinished.
    Release(String),
    /// The instance is cancelled.
    Cancel(String),
    /// The job failed (it runs again if its retry budget allows).
    Fail(String),
    /// The store failed, not the job: it runs again later.
    StoreRetry(String),
    /// The job succeeded.
    Success,
}

/// The verdict on an attempt that ended as `e` says. A stop the worker asked for
/// decides first; then an output the store could not take; then the job's own
/// failures (a wait error, a non-zero exit, a broken stream, a payload not fed).
pub(super) fn classify(e: Ended) -> Verdict {
    match e.stopped {
        Some(Stopped::Lost) => {
            return Verdict::Abandon("lease lost to another worker; attempt abandoned".into());
        }
        Some(Stopped::Shutdown) => {
            return Verdict::Release("worker shut down; returned to pending".into());
        }
        Some(Stopped::Cancel) => return Verdict::Cancel("cancelled".into()),
        Some(Stopped::Timeout) => {
            let secs = e.timeout.map_or(0.0, |t| t.as_secs_f64());
            return Verdict::Fail(format!("timed out after {secs}s ({})", e.status));
        }
        None => {}
    }
    if e.store_failed {
        return Verdict::StoreRetry(format!("{}; output not stored", e.problems.join("; ")));
    }
    if let Some(limit) = e.status.oom {
        return Verdict::Fail(format!(
            "out of memory (limit {})",
            crate::runner::format_size(limit)
        ));
    }
    let mut problems = Vec::new();
    problems.extend(e.wait_error);
    if !e.status.success() {
        problems.push(e.status.to_string());
        if let Some(limit) = e.status.rlimit_memory {
            problems.push(format!(
                "memory limited to {} (RLIMIT_DATA): an allocation past it fails inside \
                 the job",
                crate::runner::format_size(limit)
            ));
        }
    }
    problems.extend(e.problems);
    if problems.is_empty() {
        Verdict::Success
    } else {
        Verdict::Fail(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            ..ExitStatus::default()
        }
    }

    #[test]
    fn an_oom_kill_is_out_of_memory_and_an_rlimit_is_named() {
        let killed = ExitStatus {
            signal: Some(9),
            oom: Some(64 << 20),
            ..ExitStatus::default()
        };
        let ended = |status| Ended {
            status,
            ..Ended::default()
        };
        assert_eq!(
            classify(ended(killed)),
            Verdict::Fail("out of memory (limit 64 MiB)".into())
        );
        let limited = ExitStatus {
            rlimit_memory: Some(64 << 20),
            ..exited(1)
        };
        let Verdict::Fail(m) = classify(ended(limited)) else {
            panic!("a failure")
        };
        assert_eq!(
            m,
            "exit code 1; memory limited to 64 MiB (RLIMIT_DATA): an allocation past it fails inside the job"
        );
        let fine = ExitStatus {
            rlimit_memory: Some(64 << 20),
            ..exited(0)
        };
        assert_eq!(classify(ended(fine)), Verdict::Success);
    }

    #[test]
    fn a_stop_the_worker_asked_for_decides_first() {
        let base = Ended {
            status: exited(1),
            problems: vec!["storing stdout: disk full".into()],
            store_failed: true,
            timeout: Some(Duration::from_millis(1500)),
            ..Ended::default()
        };
        let with = |s| {
            classify(Ended {
                stopped: Some(s),
                ..base.clone()
            })
        };
        assert!(matches!(with(Stopped::Lost), Verdict::Abandon(_)));
        assert!(matches!(with(Stopped::Shutdown), Verdict::Release(_)));
        assert_eq!(with(Stopped::Cancel), Verdict::Cancel("cancelled".into()));
        assert_eq!(
            with(Stopped::Timeout),
            Verdict::Fail("timed out after 1.5s (exit code 1)".into())
        );
    }

    #[test]
    fn an_output_the_store_could_not_take_runs_again() {
        let v = classify(Ended {
            status: exited(0),
            problems: vec!["storing stderr: unreachable".into()],
            store_failed: true,
            ..Ended::default()
        });
        assert_eq!(
            v,
            Verdict::StoreRetry("storing stderr: unreachable; output not stored".into())
        );
    }

    #[test]
    fn the_jobs_own_failures_are_listed_in_order() {
        assert_eq!(
            classify(Ended {
                status: exited(0),
                ..Ended::default()
            }),
            Verdict::Success
        );
        assert_eq!(
            classify(Ended {
                status: exited(3),
                wait_error: Some("waiting for runner: gone".into()),
                problems: vec!["feeding payload: broken".into()],
                ..Ended::default()
            }),
            Verdict::Fail("waiting for runner: gone; exit code 3; feeding payload: broken".into())
        );
        let killed = ExitStatus {
            signal: Some(9),
            ..ExitStatus::default()
        };
        assert_eq!(
            classify(Ended {
                status: killed,
                ..Ended::default()
            }),
            Verdict::Fail("killed by signal 9".into())
        );
    }
}
