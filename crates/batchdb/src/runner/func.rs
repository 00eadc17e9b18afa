//! [`FnRunner`]: a runner built from a closure, running jobs in the worker's process.

use std::fmt;
use std::io;
use std::sync::Arc;

use super::{Execution, ExitStatus, Killer, Reader, RunContext, Runner, Stop, Writer};
use crate::error::{Error, Result};

/// The streams a [`FnRunner`] closure returns: where the payload is written, and
/// where the output is read from.
pub type Duplex = (Writer, Reader);

/// A runner built from a closure returning a writer/reader pair, like the seed's
/// `opts.run` returning a duplex stream. The execution succeeds (exit code 0) when
/// the reader reaches its end without error; it has no stderr.
///
/// ```
/// use batchdb::runner::FnRunner;
/// use tokio::io::AsyncWriteExt;
/// // A fake runner whose output is always "ok\n".
/// let runner = FnRunner::new("fake", |_ctx| {
///     let (mut tx, rx) = tokio::io::duplex(64);
///     tokio::spawn(async move { let _ = tx.write_all(b"ok\n").await; });
///     Ok((Box::pin(tokio::io::sink()), Box::pin(rx)))
/// });
/// ```
pub struct FnRunner<F> {
    name: String,
    f: F,
}

impl<F> FnRunner<F>
where
    F: Fn(&RunContext) -> io::Result<Duplex> + Send + Sync + 'static,
{
    /// A runner named `name` (its cache spec) that calls `f` for every execution.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        FnRunner {
            name: name.into(),
            f,
        }
    }
}

impl<F> fmt::Debug for FnRunner<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnRunner")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

struct NoKiller;
impl Killer for NoKiller {
    fn stop(&self, _how: Stop) {}
}

impl<F> Runner for FnRunner<F>
where
    F: Fn(&RunContext) -> io::Result<Duplex> + Send + Sync + 'static,
{
    /// Calls the closure, which sees the instance's directory and environment in
    /// `ctx.exec` (it runs in the worker's process: applying them is its business).
    /// Limits cannot be enforced in the worker's process: an instance with limits
    /// fails its attempt ([`Error::AttemptSetup`]) rather than run unlimited.
    fn spawn(&self, ctx: &RunContext) -> Result<Execution> {
        if !ctx.exec.limits.is_none() {
            return Err(Error::AttemptSetup(format!(
                "limits not enforced: runner {:?} runs jobs in the worker's process",
                self.name
            )));
        }
        let (stdin, stdout) = (self.f)(ctx).map_err(|e| Error::Spawn {
            command: self.name.clone(),
            source: e,
        })?;
        Ok(Execution {
            stdin: Some(stdin),
            stdout,
            stderr: None,
            wait: Box::pin(async {
                Ok(ExitStatus {
                    code: Some(0),
                    ..ExitStatus::default()
                })
            }),
            killer: Arc::new(NoKiller),
        })
    }

    fn spec(&self) -> String {
        format!("fn:{}", self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_it_cannot_enforce_fail_the_attempt() {
        let runner = FnRunner::new("fake", |_ctx| {
            Ok((
                Box::pin(tokio::io::sink()) as Writer,
                Box::pin(tokio::io::empty()) as Reader,
            ))
        });
        let mut exec = crate::queue::ExecContext::default();
        exec.limits.pids = Some(20);
        let ctx = RunContext {
            job: crate::hash::Hash::of(b"x"),
            instance: 1,
            created: 1,
            attempt: 1,
            worker: "w".into(),
            attempt_id: "a".into(),
            deps_file: None,
            exec,
        };
        let err = runner.spawn(&ctx).err().expect("refused");
        assert!(matches!(err, Error::AttemptSetup(_)), "{err}");
    }
}
