//! The shell runner's start without a fork of the worker ([`spawn::spawn_with`] on
//! the spawner thread), blocking its caller or, for the worker, awaited.

use std::ffi::OsString;
use std::path::Path;

use super::cgroup::Group;
use super::leader::Leader;
use super::{Execution, RunContext, ShellRunner, spawn};
use crate::error::{Error, Result};

/// What a start hands back beside the job: its set-up (for an error message) and the
/// attempt's cgroup, which travels with the job so that it outlives it.
type Kept = (spawn::Setup, Option<Group>);

/// What the spawner thread runs to start one job.
type Start = Box<dyn FnOnce() -> (std::result::Result<spawn::Spawned, spawn::Failed>, Kept) + Send>;

/// What the spawner thread answered: the start's outcome, or that it never ran (the
/// cgroup, empty, went with the unrun start).
type Started = std::io::Result<(std::result::Result<spawn::Spawned, spawn::Failed>, Kept)>;

impl ShellRunner {
    /// Starts `program` through [`spawn::spawn_with`]; the calling thread blocks until
    /// the job's `execve`.
    pub(super) fn spawn_fast(&self, ctx: &RunContext, program: &Path) -> Result<Execution> {
        let (start, rlimit_memory) = self.fast_start(ctx, program)?;
        let started = spawn::on_spawner_thread(start);
        self.fast_started(ctx, started, rlimit_memory)
    }

    /// [`spawn_fast`](Self::spawn_fast), awaited: the calling thread runs other tasks
    /// while the job starts. If this task is dropped meanwhile, the job is killed and
    /// reaped before its cgroup is removed ([`spawn::Handover`]).
    pub(super) async fn spawn_fast_async(
        &self,
        ctx: &RunContext,
        program: &Path,
    ) -> Result<Execution> {
        let (start, rlimit_memory) = self.fast_start(ctx, program)?;
        let started = spawn::on_spawner_thread_async(move || spawn::Handover::new(start()))
            .await
            .map(spawn::Handover::take);
        self.fast_started(ctx, started, rlimit_memory)
    }

    /// The start for the spawner thread (arguments, environment, the attempt's set-up
    /// and cgroup prepared here), and any rlimit memory limit.
    fn fast_start(&self, ctx: &RunContext, program: &Path) -> Result<(Start, Option<u64>)> {
        let env = Self::env(ctx);
        let args: Vec<OsString> = self.argv[1..].iter().map(Into::into).collect();
        let (program, arg0) = (program.to_path_buf(), OsString::from(&self.argv[0]));
        let (setup, group, rlimit_memory) = self.setup(ctx)?;
        let start: Start = Box::new(move || {
            let r = spawn::spawn_with(&program, &arg0, &args, &env, &setup);
            (r, (setup, group))
        });
        Ok((start, rlimit_memory))
    }

    /// The execution of what the spawner thread `started`, or the error it is (the
    /// attempt's cgroup removed then).
    fn fast_started(
        &self,
        ctx: &RunContext,
        started: Started,
        rlimit_memory: Option<u64>,
    ) -> Result<Execution> {
        let (child, group) = match started {
            Ok((Ok(child), (_, group))) => (child, group),
            Ok((Err(failed), (setup, mut group))) => {
                if let Some(g) = group.as_mut() {
                    g.remove();
                }
                return Err(self.setup_err(&setup, failed));
            }
            Err(e) => return Err(self.spawn_err(e)),
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::task::Poll;

    use super::*;
    use crate::hash::Hash;
    use crate::queue::{ExecContext, Limits};
    use crate::runner::{Enforcer, LimitMode};

    /// Every directory named `name` under the cgroup mounts.
    fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
        fn walk(d: &Path, name: &str, depth: usize, out: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(d) else {
                return;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let p = e.path();
                if p.file_name().is_some_and(|n| n == name) {
                    out.push(p.clone());
                }
                if depth > 0 {
                    walk(&p, name, depth - 1, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(Path::new("/sys/fs/cgroup"), name, 8, &mut out);
        out
    }

    #[tokio::test]
    async fn a_job_started_for_a_task_that_stopped_waiting_is_reaped_before_its_cgroup_goes() {
        let limits = Enforcer::new(LimitMode::Cgroup).expect("a writable cgroup hierarchy");
        let runner = ShellRunner::default().with_limits(limits);
        let program = runner.fast_program().expect("pidfds").to_path_buf();
        let exec = ExecContext {
            limits: Limits {
                memory: Some(64 << 20),
                ..Limits::default()
            },
            ..ExecContext::default()
        };
        let ctx = RunContext {
            job: Hash::of(b"handover"),
            instance: 1,
            created: 1,
            attempt: 1,
            worker: "w".into(),
            attempt_id: format!("handover-test-{}", std::process::id()),
            deps_file: None,
            exec,
        };
        // The spawner thread held busy, so the start waits behind it.
        let (busy_tx, busy_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let blocker = std::thread::spawn(move || {
            spawn::on_spawner_thread(move || {
                let _ = busy_tx.send(());
                let _ = go_rx.recv();
            })
        });
        busy_rx.recv().unwrap();
        let mut start = Box::pin(runner.spawn_fast_async(&ctx, &program));
        std::future::poll_fn(|cx| {
            assert!(start.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        go_tx.send(()).unwrap();
        blocker.join().unwrap().unwrap();
        // Calls run in order: once this one ran, the job has started in its group.
        spawn::on_spawner_thread(|| ()).unwrap();
        let dirs = cgroup_dirs(&ctx.attempt_id);
        assert!(!dirs.is_empty(), "the attempt's cgroup");
        let procs = std::fs::read_to_string(dirs[0].join("cgroup.procs")).unwrap();
        let pid: i32 = procs.trim().parse().expect("one process in the group");
        // The task stops waiting with the job started and its answer unread.
        drop(start);
        // SAFETY: kill with signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "the job still runs, or is a zombie");
        assert_eq!(cgroup_dirs(&ctx.attempt_id), Vec::<PathBuf>::new());
    }
}
