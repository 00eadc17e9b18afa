//! The shell runner's start without a fork of the worker ([`spawn::spawn_with`] on
//! the spawner thread), blocking its caller or, for the worker, awaited.

use std::ffi::OsString;
use std::path::Path;

use super::cgroup::Group;
use super::leader::Leader;
use super::{Execution, RunContext, ShellRunner, spawn};
use crate::error::{Error, Result};

/// What the spawner thread runs to start one job: the start itself, and the set-up
/// handed back for the error message.
type Start = Box<
    dyn FnOnce() -> (
            std::result::Result<spawn::Spawned, spawn::Failed>,
            spawn::Setup,
        ) + Send,
>;

/// What the spawner thread answered: the started job, or why it did not start.
type Started = std::io::Result<(
    std::result::Result<spawn::Spawned, spawn::Failed>,
    spawn::Setup,
)>;

impl ShellRunner {
    /// Starts `program` through [`spawn::spawn_with`]; the calling thread blocks until
    /// the job's `execve`.
    pub(super) fn spawn_fast(&self, ctx: &RunContext, program: &Path) -> Result<Execution> {
        let (start, group, rlimit_memory) = self.fast_start(ctx, program)?;
        let started = spawn::on_spawner_thread(start);
        self.fast_started(ctx, started, group, rlimit_memory)
    }

    /// [`spawn_fast`](Self::spawn_fast), awaited: the calling thread runs other tasks
    /// while the job starts.
    pub(super) async fn spawn_fast_async(
        &self,
        ctx: &RunContext,
        program: &Path,
    ) -> Result<Execution> {
        let (start, group, rlimit_memory) = self.fast_start(ctx, program)?;
        let start = move || {
            let (r, setup) = start();
            (r.map(spawn::Handover::new), setup)
        };
        let started = spawn::on_spawner_thread_async(start)
            .await
            .map(|(r, setup)| (r.map(spawn::Handover::take), setup));
        self.fast_started(ctx, started, group, rlimit_memory)
    }

    /// The start for the spawner thread (arguments, environment, the attempt's set-up
    /// prepared here), with the attempt's cgroup and any rlimit memory limit.
    fn fast_start(
        &self,
        ctx: &RunContext,
        program: &Path,
    ) -> Result<(Start, Option<Group>, Option<u64>)> {
        let env = Self::env(ctx);
        let args: Vec<OsString> = self.argv[1..].iter().map(Into::into).collect();
        let (program, arg0) = (program.to_path_buf(), OsString::from(&self.argv[0]));
        let (setup, group, rlimit_memory) = self.setup(ctx)?;
        let start: Start = Box::new(move || {
            let r = spawn::spawn_with(&program, &arg0, &args, &env, &setup);
            (r, setup)
        });
        Ok((start, group, rlimit_memory))
    }

    /// The execution of what the spawner thread `started`, or the error it is (the
    /// attempt's cgroup removed then).
    fn fast_started(
        &self,
        ctx: &RunContext,
        started: Started,
        mut group: Option<Group>,
        rlimit_memory: Option<u64>,
    ) -> Result<Execution> {
        let child = match started {
            Ok((Ok(child), _)) => child,
            Ok((Err(failed), setup)) => {
                if let Some(g) = group.as_mut() {
                    g.remove();
                }
                return Err(self.setup_err(&setup, failed));
            }
            Err(e) => {
                if let Some(g) = group.as_mut() {
                    g.remove();
                }
                return Err(self.spawn_err(e));
            }
        };
        let leader = Leader::new(child.pid, Some(child.pidfd));
        self.execution(
            ctx,
            (leader, group, rlimit_memory),
            (child.stdin, child.stdout, child.stderr),
        )
    }

    /// A failed start as the error it is: the attempt's ([`Error::AttemptSetup`]:
    /// its directory, cgroup or rlimits), else the runner's ([`Error::Spawn`]).
    fn setup_err(&self, setup: &spawn::Setup, failed: spawn::Failed) -> Error {
        let e = failed.error;
        match failed.stage {
            spawn::Stage::Cwd => match &setup.cwd {
                Some(d) => super::cwd_err(d, &e),
                None => self.spawn_err(e),
            },
            spawn::Stage::Cgroup => {
                Error::AttemptSetup(format!("cannot join the attempt's cgroup: {e}"))
            }
            spawn::Stage::Rlimit => Error::AttemptSetup(format!("cannot set its rlimits: {e}")),
            spawn::Stage::Start => self.spawn_err(e),
        }
    }
}
