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
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::{Error, Result};
use crate::hash::Hash;

mod spawn;

/// What a runner knows about the attempt it runs (also exported to a shell runner's
/// environment as `BATCHDB_JOB`, `BATCHDB_INSTANCE`, `BATCHDB_CREATED`,
/// `BATCHDB_ATTEMPT` and `BATCHDB_WORKER`).
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

/// Stops an execution; safe to call any number of times. Once the execution has
/// ended and been reaped, its process group id may be reused by the system: callers
/// check [`Killer::alive`] first and do not hold a killer long after the end.
pub trait Killer: Send + Sync {
    /// Sends the stop request.
    fn stop(&self, how: Stop);

    /// Whether anything of the execution (say, a process its main process left behind)
    /// is still running.
    fn alive(&self) -> bool {
        false
    }
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

    /// Stops whatever attempt `attempt` of instance `instance`, run by the (dead)
    /// worker named `worker`, left running on this machine. Called before a takeover
    /// runs the instance again, so that one instance never runs twice at once here.
    fn stop_lost(&self, _worker: &str, _instance: i64, _attempt: i64) {}
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
            program: Default::default(),
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
            program: Default::default(),
        })
    }
}

struct GroupKiller {
    pgid: i32,
}

impl Killer for GroupKiller {
    fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks that the process group exists.
        self.pgid > 0 && unsafe { libc::kill(-self.pgid, 0) } == 0
    }

    fn stop(&self, how: Stop) {
        let sig = match how {
            Stop::Terminate => libc::SIGTERM,
            Stop::Kill => libc::SIGKILL,
        };
        if self.pgid > 0 {
            // SAFETY: kill(2) has no memory-safety preconditions; a negative pid
            // addresses the process group we created for this execution.
            unsafe {
                libc::kill(-self.pgid, sig);
            }
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
    /// The `BATCHDB_*` variables every execution gets.
    fn env(ctx: &RunContext) -> [(&'static str, String); 5] {
        [
            ("BATCHDB_JOB", ctx.job.to_hex()),
            ("BATCHDB_INSTANCE", ctx.instance.to_string()),
            ("BATCHDB_CREATED", ctx.created.to_string()),
            ("BATCHDB_ATTEMPT", ctx.attempt.to_string()),
            ("BATCHDB_WORKER", ctx.worker.clone()),
        ]
    }

    /// Starts `program` through [`spawn::spawn`] (no fork of the worker).
    fn spawn_fast(&self, ctx: &RunContext, program: &std::path::Path) -> Result<Execution> {
        use tokio::net::unix::pipe;
        let spawn_err = |e| Error::Spawn {
            command: self.argv.join(" "),
            source: e,
        };
        let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = Self::env(ctx)
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let args: Vec<std::ffi::OsString> = self.argv[1..].iter().map(Into::into).collect();
        let (program, arg0) = (
            program.to_path_buf(),
            std::ffi::OsString::from(&self.argv[0]),
        );
        let child = spawn::on_spawner_thread(move || spawn::spawn(&program, &arg0, &args, &env))
            .and_then(|r| r)
            .map_err(spawn_err)?;
        let (pid, killer) = (child.pid, Arc::new(GroupKiller { pgid: child.pid }));
        let mut wait = match spawn::ChildWait::new(child.pidfd) {
            Ok(w) => w,
            Err(e) => {
                // It runs, but cannot be waited for: stop it rather than lose it.
                killer.stop(Stop::Kill);
                spawn::reap(pid);
                return Err(spawn_err(e));
            }
        };
        let pipes = (|| {
            Ok::<_, io::Error>((
                pipe::Sender::from_owned_fd(child.stdin)?,
                pipe::Receiver::from_owned_fd(child.stdout)?,
                pipe::Receiver::from_owned_fd(child.stderr)?,
            ))
        })();
        let (stdin, stdout, stderr) = match pipes {
            Ok(p) => p,
            Err(e) => {
                killer.stop(Stop::Kill);
                return Err(spawn_err(e));
            }
        };
        Ok(Execution {
            stdin: Some(Box::pin(stdin)),
            stdout: Box::pin(stdout),
            stderr: Some(Box::pin(stderr)),
            wait: Box::pin(async move {
                let (code, signal) = wait.wait().await?;
                Ok(ExitStatus { code, signal })
            }),
            killer,
        })
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
        let mut cmd = tokio::process::Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .envs(Self::env(ctx))
            .process_group(0)
            .kill_on_drop(false);
        let parent = std::process::id() as i32;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, getppid, _exit).
        {
            unsafe {
                cmd.pre_exec(move || {
                    // If this worker dies (even by SIGKILL), the job's shell dies with it.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() != parent {
                        libc::_exit(137);
                    }
                    Ok(())
                });
            }
        }
        let spawn_err = |e| Error::Spawn {
            command: self.argv.join(" "),
            source: e,
        };
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|e| spawn_err(io::Error::other(e)))?;
        let mut child = spawn::on_spawner_thread(move || {
            let _inside = runtime.enter();
            cmd.spawn()
        })
        .and_then(|r| r)
        .map_err(spawn_err)?;
        let pgid = child.id().map_or(0, |p| p as i32);
        let missing = || spawn_err(io::Error::other("child pipe missing"));
        let stdin = child.stdin.take().ok_or_else(missing)?;
        let stdout = child.stdout.take().ok_or_else(missing)?;
        let stderr = child.stderr.take().ok_or_else(missing)?;
        Ok(Execution {
            stdin: Some(Box::pin(stdin)),
            stdout: Box::pin(stdout),
            stderr: Some(Box::pin(stderr)),
            wait: Box::pin(async move {
                let st = child.wait().await?;
                Ok(ExitStatus {
                    code: st.code(),
                    signal: st.signal(),
                })
            }),
            killer: Arc::new(GroupKiller { pgid }),
        })
    }

    fn spec(&self) -> String {
        format!("shell:{}", self.argv.join(" "))
    }

    /// Kills (SIGKILL) every process on this machine whose environment says it belongs
    /// to that attempt of that worker (`BATCHDB_WORKER`, `BATCHDB_INSTANCE` and
    /// `BATCHDB_ATTEMPT`, inherited by every child and grandchild), found through
    /// `/proc`: a recycled pid, or a job of another worker or database, is never hit.
    fn stop_lost(&self, worker: &str, instance: i64, attempt: i64) {
        let want = [
            format!("BATCHDB_WORKER={worker}"),
            format!("BATCHDB_INSTANCE={instance}"),
            format!("BATCHDB_ATTEMPT={attempt}"),
        ];
        for _round in 0..50 {
            let mut found = false;
            let Ok(procs) = std::fs::read_dir("/proc") else {
                return;
            };
            for p in procs.flatten() {
                let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                let Ok(env) = std::fs::read(p.path().join("environ")) else {
                    continue;
                };
                let mut hits = [false; 3];
                for v in env.split(|b| *b == 0) {
                    for (hit, w) in hits.iter_mut().zip(&want) {
                        *hit |= v == w.as_bytes();
                    }
                }
                if hits == [true; 3] {
                    found = true;
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            if !found {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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
            .finish()
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
