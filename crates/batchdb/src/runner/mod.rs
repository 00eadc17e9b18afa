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

mod cgroup;
mod fast;
mod func;
mod leader;
mod limits;
mod orphans;
mod spawn;
mod sweep;

pub use func::{Duplex, FnRunner};
pub use limits::{Enforcer, LimitMode, size as format_size};
pub use orphans::adopt_orphans;
pub use sweep::ATTEMPT_ID_VAR;

use crate::queue::{LostAttempt, Usage};
use cgroup::Group;
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
    /// What it used, where the runner measures it ([`ShellRunner`] always does:
    /// from the attempt's cgroup if it has one, which counts every descendant, else
    /// from the main process's rusage, which counts the descendants it waited for).
    #[serde(skip)]
    pub usage: Option<Usage>,
    /// The memory limit in bytes, when the kernel killed a process of the execution
    /// for going past it (seen in the attempt's cgroup): the attempt failed for that.
    #[serde(skip)]
    pub oom: Option<u64>,
    /// A memory limit enforced as an rlimit: an allocation past it fails inside the
    /// job, which the runner cannot tell from the job's other failures.
    #[serde(skip)]
    pub rlimit_memory: Option<u64>,
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

    /// [`spawn`](Self::spawn) for a caller on an async runtime, which the worker uses:
    /// a runner whose start blocks (a process's `execve`) lets the calling thread run
    /// other tasks meanwhile. The same execution and errors as `spawn`; by default,
    /// `spawn` itself.
    fn spawn_async<'a>(
        &'a self,
        ctx: &'a RunContext,
    ) -> Pin<Box<dyn Future<Output = Result<Execution>> + Send + 'a>> {
        Box::pin(std::future::ready(self.spawn(ctx)))
    }

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
    /// How instances' limits are enforced.
    limits: Arc<Enforcer>,
}

impl Default for ShellRunner {
    /// `sh`, enforcing no limits (an attempt with limits fails: see
    /// [`ShellRunner::with_limits`]).
    fn default() -> Self {
        ShellRunner {
            argv: vec!["sh".into()],
            program: std::sync::OnceLock::default(),
            limits: Arc::new(Enforcer::off()),
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
            limits: Arc::new(Enforcer::off()),
        })
    }

    /// The same runner, enforcing instances' limits through `limits`. Without this, a
    /// runner enforces none, and an attempt of an instance with limits fails.
    #[must_use]
    pub fn with_limits(mut self, limits: Enforcer) -> ShellRunner {
        self.limits = Arc::new(limits);
        self
    }

    /// How this runner enforces limits.
    pub fn limits(&self) -> &Enforcer {
        &self.limits
    }
}

/// Stops a shell execution: its process group, through the leader it keeps unreaped
/// (so the group id can never name another group: see [`leader`]), and every process
/// carrying its attempt id (see [`sweep`]).
struct ShellKiller {
    leader: Arc<Leader>,
    attempt_id: String,
    started: std::time::Instant,
    /// The attempt's cgroup, removed at the release.
    group: Arc<std::sync::Mutex<Option<Group>>>,
}

impl ShellKiller {
    /// `f` of the attempt's cgroup; the default where it has none.
    fn in_group<T: Default>(&self, f: impl FnOnce(&Group) -> T) -> T {
        match self.group.lock().ok().as_deref() {
            Some(Some(g)) => f(g),
            _ => T::default(),
        }
    }
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
            || self.in_group(|g| !g.members().is_empty())
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
        self.in_group(Group::kill_all);
    }

    fn release(&self) {
        self.leader.release();
        // Whatever is still in the attempt's cgroup (it left the process group and
        // dropped the attempt id) goes too, so the group can be removed.
        self.in_group(Group::kill_all);
        let group = self.group.lock().ok().and_then(|mut g| g.take());
        if let Some(mut g) = group {
            g.remove();
        }
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
    /// The instance's environment ([`crate::queue::ExecContext::env`]) and, over
    /// it, the `BATCHDB_*` variables every execution gets.
    fn env(ctx: &RunContext) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let ours = Self::batchdb_env(ctx);
        let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = ctx
            .exec
            .env
            .iter()
            .filter(|(k, _)| !ours.iter().any(|(o, _)| o == k))
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        env.extend(ours.into_iter().map(|(k, v)| (k.into(), v)));
        env
    }

    /// The `BATCHDB_*` variables every execution gets.
    fn batchdb_env(ctx: &RunContext) -> Vec<(&'static str, std::ffi::OsString)> {
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

    /// The execution around a started leader and the parent's ends of its pipes;
    /// `group` is the attempt's cgroup (if any), removed at the killer's release.
    fn execution(
        &self,
        ctx: &RunContext,
        (leader, group, rlimit_memory): (Arc<Leader>, Option<Group>, Option<u64>),
        (stdin, stdout, stderr): (OwnedFd, OwnedFd, OwnedFd),
    ) -> Result<Execution> {
        use tokio::net::unix::pipe;
        let group = Arc::new(std::sync::Mutex::new(group));
        let killer = Arc::new(ShellKiller {
            leader: leader.clone(),
            attempt_id: ctx.attempt_id.clone(),
            started: std::time::Instant::now(),
            group: group.clone(),
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
                // Read when the main process has ended (the group is removed only
                // at the release, after what it left behind is stopped).
                let (group_usage, oom) = match group.lock().ok().as_deref() {
                    Some(Some(g)) => (g.usage(), g.oom_killed().then(|| g.memory.unwrap_or(0))),
                    _ => (None, None),
                };
                Ok(ExitStatus {
                    code,
                    signal,
                    usage: group_usage.or_else(|| leader.usage()),
                    oom,
                    rlimit_memory,
                })
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

    /// What the job's process sets up before its exec (its working directory, its
    /// cgroup, its rlimits), with the cgroup itself and any rlimit memory limit. A
    /// limit this worker cannot enforce, a cgroup it cannot make or a directory that
    /// is not there is the attempt's failure ([`Error::AttemptSetup`]).
    fn setup(&self, ctx: &RunContext) -> Result<(spawn::Setup, Option<Group>, Option<u64>)> {
        let prepared = self
            .limits
            .prepare(&ctx.attempt_id, &ctx.exec.limits)
            .map_err(Error::AttemptSetup)?;
        let cwd = ctx.exec.cwd.as_ref().map(std::path::PathBuf::from);
        if let Some(d) = &cwd {
            // Checked here too (the child's chdir is what counts), so the fork path
            // names the directory as well.
            let entered = std::fs::metadata(d).and_then(|m| {
                if m.is_dir() {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(libc::ENOTDIR))
                }
            });
            if let Err(e) = entered {
                let mut group = prepared.group;
                if let Some(g) = group.as_mut() {
                    g.remove();
                }
                return Err(cwd_err(d, &e));
            }
        }
        let setup = spawn::Setup {
            cwd,
            cgroup_procs: prepared
                .group
                .as_ref()
                .map(Group::procs_files)
                .unwrap_or_default(),
            rlimits: prepared.rlimits,
        };
        Ok((setup, prepared.group, prepared.rlimit_memory))
    }

    /// The program to start without a fork of the worker ([`fast`]), where the
    /// kernel allows it and `BATCHDB_SPAWN=fork` does not ask otherwise.
    fn fast_program(&self) -> Option<&std::path::Path> {
        if !spawn::supported() || force_fork() {
            return None;
        }
        self.program
            .get_or_init(|| resolve(&self.argv[0]))
            .as_deref()
    }

    /// Starts the command through fork + exec (`std`), waited for by pid.
    fn spawn_fork(&self, ctx: &RunContext) -> Result<Execution> {
        use std::os::unix::process::CommandExt;
        if resolve(&self.argv[0]).is_none() {
            return Err(self.spawn_err(io::Error::from(io::ErrorKind::NotFound)));
        }
        let (setup, mut group, rlimit_memory) = self.setup(ctx)?;
        let mut cmd = std::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(Self::env(ctx))
            .process_group(0);
        if let Some(d) = &setup.cwd {
            cmd.current_dir(d);
        }
        let parent = leader::pid_of(std::process::id());
        let procs = fork_setup(&setup).map_err(|e| self.spawn_err(e))?;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, signal, getppid, open, write, close,
        // setrlimit, _exit) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                // If this worker dies (even by SIGKILL), the job's shell dies with it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // The CLI ignores SIGXFSZ; the job gets the default action back.
                libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
                if libc::getppid() != parent {
                    libc::_exit(137);
                }
                for p in &procs.0 {
                    if spawn::join_cgroup(p.as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for r in &procs.1 {
                    if libc::setrlimit(r.0, &raw const r.1) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let spawned = spawn::on_spawner_thread(move || cmd.spawn()).and_then(|r| r);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                if let Some(g) = group.as_mut() {
                    g.remove();
                }
                // The command was found: a failure of the steps before the exec is
                // the attempt's (std does not say which step it was).
                return Err(
                    if setup.cwd.is_some()
                        || !setup.cgroup_procs.is_empty()
                        || !setup.rlimits.is_empty()
                    {
                        Error::AttemptSetup(format!(
                            "cannot start the job in its working directory, cgroup or rlimits: {e}"
                        ))
                    } else {
                        self.spawn_err(e)
                    },
                );
            }
        };
        // From here the worker alone waits for it, by pid (std's Child never does
        // unless asked, and is dropped below).
        let leader = Leader::new(leader::pid_of(child.id()), None);
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            leader.release();
            return Err(self.spawn_err(io::Error::other("child pipe missing")));
        };
        self.execution(
            ctx,
            (leader, group, rlimit_memory),
            (stdin.into(), stdout.into(), stderr.into()),
        )
    }
}

/// The `cgroup.procs` paths and rlimits of `setup` as the forked child uses them.
type ForkSetup = (Vec<std::ffi::CString>, Vec<(u32, libc::rlimit)>);

fn fork_setup(setup: &spawn::Setup) -> io::Result<ForkSetup> {
    use std::os::unix::ffi::OsStrExt;
    let procs = setup
        .cgroup_procs
        .iter()
        .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other))
        .collect::<io::Result<Vec<_>>>()?;
    let rlimits = setup
        .rlimits
        .iter()
        .map(|&(r, v)| {
            (
                r,
                libc::rlimit {
                    rlim_cur: v,
                    rlim_max: v,
                },
            )
        })
        .collect();
    Ok((procs, rlimits))
}

/// The attempt's failure for working directory `dir` that cannot be entered.
fn cwd_err(dir: &std::path::Path, e: &io::Error) -> Error {
    Error::AttemptSetup(format!(
        "cannot enter working directory {}: {e}",
        dir.display()
    ))
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
    ///
    /// The instance's environment goes over the worker's (the `BATCHDB_*` variables
    /// over both); its working directory is entered and its limits applied (see
    /// [`Enforcer`]) before the exec, so the job's own code never runs without them.
    /// A directory that cannot be entered, a limit that cannot be enforced or a
    /// cgroup that cannot be made or joined is [`Error::AttemptSetup`]: the attempt
    /// fails, not the worker.
    fn spawn(&self, ctx: &RunContext) -> Result<Execution> {
        match self.fast_program() {
            Some(program) => self.spawn_fast(ctx, program),
            None => self.spawn_fork(ctx),
        }
    }

    /// The start without a fork is awaited (the worker's thread runs other tasks
    /// while the job's `execve` goes on); the fork + exec fallback blocks, as in
    /// [`spawn`](Runner::spawn).
    fn spawn_async<'a>(
        &'a self,
        ctx: &'a RunContext,
    ) -> Pin<Box<dyn Future<Output = Result<Execution>> + Send + 'a>> {
        match self.fast_program() {
            Some(program) => Box::pin(self.spawn_fast_async(ctx, program)),
            None => Box::pin(std::future::ready(self.spawn_fork(ctx))),
        }
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
