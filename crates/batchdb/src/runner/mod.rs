//! Runners: how one attempt of a job is executed.
//!
//! A [`Runner`] turns a job into an [`Execution`]: a writer the payload is streamed
//! into, readers for stdout and stderr, a future that resolves to the exit status and
//! a [`Killer`] that stops it. The default is [`ShellRunner`] (a shell reading the
//! payload on stdin, in its own process group); [`FnRunner`] builds one from any async
//! reader/writer pair, as the seed's `opts.run` did.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};
use crate::hash::Hash;

mod leader;
mod spawn;
mod sweep;

pub use sweep::ATTEMPT_ID_VAR;

use crate::queue::LostAttempt;
use leader::Leader;
use sweep::Mark;

/// What a runner knows about the attempt it runs (also exported to a shell runner's
/// environment as `BATCHDB_JOB`, `BATCHDB_INSTANCE`, `BATCHDB_CREATED`,
/// `BATCHDB_ATTEMPT`, `BATCHDB_WORKER`, `BATCHDB_ATTEMPT_ID` and, for an instance with
/// dependencies, `BATCHDB_DEPS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunContext {
    /// The job key.
    pub job: Hash,
    /// The instance id.
    pub instance: i64,
    /// The instance's push time.
    pub created: i64,
    /// The attempt number.
    pub attempt: i64,
    /// The name of the worker running it (unique to that worker process).
    pub worker: String,
    /// The attempt's random id ([`crate::queue::Claim::attempt_id`]): unique to this
    /// attempt of this job, whatever the worker's name or the database.
    pub attempt_id: String,
    /// For an instance with dependencies: a file of `JOBKEY RESULTID` lines, one per
    /// dependency result, in the dependencies' push order (`BATCHDB_DEPS`).
    pub deps_file: Option<std::path::PathBuf>,
    /// Where and with what to run it: working directory, environment (over the
    /// worker's, including the `BATCHDB_RESOURCE_*` variables of what it was given),
    /// limits.
    pub exec: crate::queue::ExecContext,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ExitStatus {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit code {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// How hard to stop an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Ask politely (SIGTERM to the whole process group).
    Terminate,
    /// Force (SIGKILL to the whole process group).
    Kill,
}

/// Stops an execution; safe to call any number of times, at any time: a killer never
/// signals anything but the execution's own processes, and nothing at all after
/// [`Killer::release`].
pub trait Killer: Send + Sync {
    /// Sends the stop request.
    fn stop(&self, how: Stop);

    /// Whether anything of the execution (say, a process its main process left behind)
    /// is still running. May scan the system: call it off the async threads.
    fn alive(&self) -> bool {
        false
    }

    /// Kills (SIGKILL) everything of the execution still running, also processes
    /// that left its process group. May scan the system: call it off the async
    /// threads.
    fn stop_all(&self) {}

    /// Ends the killer's hold on the execution (a shell runner reaps its main
    /// process, whose id named the process group): nothing is signalled after this.
    /// Call it once the execution has ended and its leftovers are stopped.
    fn release(&self) {}
}

/// A boxed async writer.
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;
/// A boxed async reader.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
/// A boxed future of an exit status.
pub type WaitFuture = Pin<Box<dyn Future<Output = io::Result<ExitStatus>> + Send>>;

/// One running execution.
pub struct Execution {
    /// Where the payload goes; `None` if the runner takes no input.
    pub stdin: Option<Writer>,
    /// The output that becomes the result blob.
    pub stdout: Reader,
    /// The error output, stored as its own blob; `None` if the runner has none.
    pub stderr: Option<Reader>,
    /// Resolves when the execution ends.
    pub wait: WaitFuture,
    /// Stops the execution.
    pub killer: Arc<dyn Killer>,
}

/// Starts executions of jobs.
pub trait Runner: Send + Sync + fmt::Debug {
    /// Starts one execution.
    fn spawn(&self, ctx: &RunContext) -> Result<Execution>;

    /// A string that identifies what this runner does, part of the result-cache key:
    /// two runners with the same spec must produce the same outcome for a payload.
    fn spec(&self) -> String;

    /// Stops whatever the lost attempt `lost` (its worker stopped renewing the lease)
    /// left running on this machine, and nothing else. Called before a takeover runs
    /// the instance again, so that one instance never runs twice at once here.
    fn stop_lost(&self, _lost: &LostAttempt) {}
}

/// Runs each job as `COMMAND` (default `sh`) with the payload on stdin, stdout and
/// stderr captured, in a process group of its own so that a stop reaches every
/// child and grandchild.
#[derive(Debug, Clone)]
pub struct ShellRunner {
    argv: Vec<String>,
    /// `argv[0]` found on `PATH`, looked up at the first spawn.
    program: std::sync::OnceLock<Option<std::path::PathBuf>>,
}

impl Default for ShellRunner {
    fn default() -> Self {
        ShellRunner {
            argv: vec!["sh".into()],
            program: std::sync::OnceLock::default(),
        }
    }
}

impl ShellRunner {
    /// A runner for `command`, split on whitespace (e.g. `"bash -e"`).
    pub fn new(command: &str) -> Result<ShellRunner> {
        let argv: Vec<String> = command.split_whitespace().map(String::from).collect();
        if argv.is_empty() {
            return Err(Error::Config {
                what: "shell",
                value: command.into(),
                why: "empty command".into(),
            });
        }
        Ok(ShellRunner {
            argv,
            program: std::sync::OnceLock::default(),
        })
    }
}

/// Stops a shell execution: its process group, through the leader it keeps unreaped
/// (so the group id can never name another group: see [`leader`]), and every process
/// carrying its attempt id (see [`sweep`]).
struct ShellKiller {
    leader: Arc<Leader>,
    attempt_id: String,
    started: std::time::Instant,
}

/// An execution younger than this looks for leftovers only among processes started
/// after it (see [`sweep::any_left`]); far too short a time for the pid counter to
/// wrap round.
const RECENT: std::time::Duration = std::time::Duration::from_secs(1);

impl Killer for ShellKiller {
    fn alive(&self) -> bool {
        let recent = self.started.elapsed() < RECENT;
        !self.leader.exited()
            || sweep::any_left(self.leader.pid(), &Mark::Id(&self.attempt_id), recent)
    }

    fn stop(&self, how: Stop) {
        self.leader.signal_group(match how {
            Stop::Terminate => libc::SIGTERM,
            Stop::Kill => libc::SIGKILL,
        });
    }

    fn stop_all(&self) {
        self.leader.signal_group(libc::SIGKILL);
        sweep::kill_marked(&Mark::Id(&self.attempt_id));
    }

    fn release(&self) {
        self.leader.release();
    }
}

/// Where `execvp` would find `program`: itself if it has a `/`, else the first
/// executable file of that name on `PATH`.
fn resolve(program: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let runnable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = std::path::PathBuf::from(program);
        return runnable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| runnable(p))
}

/// Whether `BATCHDB_SPAWN=fork` asks for the plain fork + exec path (checked once).
fn force_fork() -> bool {
    static FORK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORK.get_or_init(|| std::env::var_os("BATCHDB_SPAWN").is_some_and(|v| v == "fork"))
}

impl ShellRunner {
    /// The `BATCHDB_*` variables every execution gets.
    fn env(ctx: &RunContext) -> Vec<(&'static str, std::ffi::OsString)> {
        let mut env = vec![
            ("BATCHDB_JOB", ctx.job.to_hex().into()),
            ("BATCHDB_INSTANCE", ctx.instance.to_string().into()),
            ("BATCHDB_CREATED", ctx.created.to_string().into()),
            ("BATCHDB_ATTEMPT", ctx.attempt.to_string().into()),
            ("BATCHDB_WORKER", ctx.worker.clone().into()),
            (ATTEMPT_ID_VAR, ctx.attempt_id.clone().into()),
        ];
        if let Some(f) = &ctx.deps_file {
            env.push(("BATCHDB_DEPS", f.clone().into_os_string()));
        }
        env
    }

    /// The execution around a started leader and the parent's ends of its pipes.
    fn execution(
        &self,
        ctx: &RunContext,
        leader: Arc<Leader>,
        (stdin, stdout, stderr): (OwnedFd, OwnedFd, OwnedFd),
    ) -> Result<Execution> {
        use tokio::net::unix::pipe;
        let killer = Arc::new(ShellKiller {
            leader: leader.clone(),
            attempt_id: ctx.attempt_id.clone(),
            started: std::time::Instant::now(),
        });
        let pipes = (|| {
            Ok::<_, io::Error>((
                pipe::Sender::from_owned_fd(stdin)?,
                pipe::Receiver::from_owned_fd(stdout)?,
                pipe::Receiver::from_owned_fd(stderr)?,
            ))
        })();
        let (stdin, stdout, stderr) = match pipes {
            Ok(p) => p,
            Err(e) => {
                // It runs, but cannot be fed or read: stop it rather than lose it.
                killer.release();
                return Err(self.spawn_err(e));
            }
        };
        Ok(Execution {
            stdin: Some(Box::pin(stdin)),
            stdout: Box::pin(stdout),
            stderr: Some(Box::pin(stderr)),
            wait: Box::pin(async move {
                let (code, signal) = leader.wait().await?;
                Ok(ExitStatus { code, signal })
            }),
            killer,
        })
    }

    fn spawn_err(&self, source: io::Error) -> Error {
        Error::Spawn {
            command: self.argv.join(" "),
            source,
        }
    }

    /// Starts `program` through [`spawn::spawn`] (no fork of the worker).
    fn spawn_fast(&self, ctx: &RunContext, program: &std::path::Path) -> Result<Execution> {
        let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = Self::env(ctx)
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect();
        let args: Vec<std::ffi::OsString> = self.argv[1..].iter().map(Into::into).collect();
        let (program, arg0) = (
            program.to_path_buf(),
            std::ffi::OsString::from(&self.argv[0]),
        );
        let child = spawn::on_spawner_thread(move || spawn::spawn(&program, &arg0, &args, &env))
            .and_then(|r| r)
            .map_err(|e| self.spawn_err(e))?;
        let leader = Leader::new(child.pid, Some(child.pidfd));
        self.execution(ctx, leader, (child.stdin, child.stdout, child.stderr))
    }

    /// Starts the command through fork + exec (`std`), waited for by pid.
    fn spawn_fork(&self, ctx: &RunContext) -> Result<Execution> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(Self::env(ctx))
            .process_group(0);
        let parent = leader::pid_of(std::process::id());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, signal, getppid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                // If this worker dies (even by SIGKILL), the job's shell dies with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The CLI ignores SIGXFSZ; the job gets the default action back.
                libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
                if libc::getppid() != parent {
                    libc::_exit(137);
                }
                Ok(())
            });
        }
        let mut child = spawn::on_spawner_thread(move || cmd.spawn())
            .and_then(|r| r)
            .map_err(|e| self.spawn_err(e))?;
        // From here the worker alone waits for it, by pid (std's Child never does
        // unless asked, and is dropped below).
        let leader = Leader::new(leader::pid_of(child.id()), None);
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            leader.release();
            return Err(self.spawn_err(io::Error::other("child pipe missing")));
        };
        self.execution(ctx, leader, (stdin.into(), stdout.into(), stderr.into()))
    }
}

impl Runner for ShellRunner {
    /// Starts the command in a process group of its own that dies with this worker
    /// (`PR_SET_PDEATHSIG` = SIGKILL, armed before the exec; a command whose worker
    /// died before that never runs), even if the worker is killed by SIGKILL.
    ///
    /// The command starts without a fork of the worker (see [`spawn`]: `vfork`-style,
    /// as `posix_spawn` does) where the kernel has pidfds (Linux 5.4+); elsewhere, or
    /// with `BATCHDB_SPAWN=fork` in the environment, through fork + exec. Either way it
    /// is started from one thread that lives as long as the process (the signal fires
    /// when the *thread* that started a process ends). A command that cannot be found
    /// fails the spawn itself ([`Error::Spawn`]).
    fn spawn(&self, ctx: &RunContext) -> Result<Execution> {
        if spawn::supported() && !force_fork() {
            if let Some(program) = self.program.get_or_init(|| resolve(&self.argv[0])) {
                return self.spawn_fast(ctx, program);
            }
        }
        self.spawn_fork(ctx)
    }

    fn spec(&self) -> String {
        format!("shell:{}", self.argv.join(" "))
    }

    /// Kills (SIGKILL) every process on this machine that carries the lost attempt's
    /// id in its environment (`BATCHDB_ATTEMPT_ID`, inherited by every child and
    /// grandchild), and nothing else: the id is drawn at random for that attempt
    /// alone, so no other attempt — of another worker, database or run — carries it,
    /// and each kill goes through the process's `/proc` directory, so a reused pid is
    /// never hit (see [`sweep`]). An attempt recorded by a release without attempt ids
    /// is found by worker name, instance and attempt number, among processes without
    /// an attempt id only.
    fn stop_lost(&self, lost: &LostAttempt) {
        let mark = match &lost.attempt_id {
            Some(id) => Mark::Id(id),
            None => Mark::Legacy {
                worker: &lost.worker,
                instance: lost.instance,
                attempt: lost.attempt,
            },
        };
        sweep::kill_marked(&mark);
    }
}

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
    fn spawn(&self, ctx: &RunContext) -> Result<Execution> {
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
                    signal: None,
                })
            }),
            killer: Arc::new(NoKiller),
        })
    }

    fn spec(&self) -> String {
        format!("fn:{}", self.name)
    }
}
