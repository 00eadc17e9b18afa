//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The heading of the options every command takes, apart from each command's own.
const GLOBAL: &str = "Global options";

/// Queue batch jobs and stream their results into a content-addressed blob store.
#[derive(Debug, Parser)]
#[command(name = "batchdb", version)]
pub struct Cli {
    /// Directory holding the SQLite database, the blob directory and live output
    /// [default: $XDG_DATA_HOME/batchdb or ~/.local/share/batchdb]
    #[arg(long, env = "BATCHDB_DIR", global = true, help_heading = GLOBAL)]
    pub dir: Option<PathBuf>,
    /// Queue database: a SQLite file path or a postgres:// URL [default: DIR/batchdb.sqlite]
    #[arg(long, env = "BATCHDB_DB", global = true, help_heading = GLOBAL)]
    pub db: Option<String>,
    /// Blob store: a directory path or an s3://bucket/prefix URL [default: DIR/blobs]
    #[arg(long, env = "BATCHDB_BLOBS", global = true, help_heading = GLOBAL)]
    pub blobs: Option<String>,
    /// More log output on stderr (-v info, -vv debug)
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a job and push it onto the pending queue in one step.
    Add(AddArgs),
    /// Store a job's payload without queueing it.
    Create(PayloadArgs),
    /// Push an instance of an existing job onto the pending queue.
    Push(PushArgs),
    /// Add one job per input: each line of FILE (or stdin), or each combination of
    /// the ::: lists, substituted into TEMPLATE as GNU parallel does.
    Map(MapArgs),
    /// Print rows of one type as JSON lines: job, pending, result, fail, cancelled.
    List {
        /// job | pending | result | fail | cancelled
        kind: String,
        /// Only the instances of this batch (jobs with one in it).
        #[arg(long)]
        batch: Option<String>,
    },
    /// Print one JSON line per batch with its counts by state.
    Batches,
    /// Wait until every named instance has ended: exit 0 if all have a result, 1 if
    /// any failed or was cancelled (one FAIL line each), 2 on timeout.
    Wait(WaitArgs),
    /// Run pending jobs.
    Run(RunArgs),
    /// Write a blob (payload or result) to stdout.
    Get {
        /// The blob's hash (64 lowercase hex).
        hash: String,
    },
    /// Print an instance's stdout (and stderr to stderr) and exit with its exit code.
    Show {
        /// created time, job key, result id, or id:N
        selector: String,
        /// Print the instance and all its attempts as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Print a job's output, following it live while it runs with -f.
    Logs {
        /// created time, job key, result id, or id:N
        selector: String,
        /// Follow the output until the instance ends.
        #[arg(short, long)]
        follow: bool,
    },
    /// Print the event log as JSON lines.
    Events {
        /// Keep following new events.
        #[arg(short, long)]
        follow: bool,
        /// Start after this event id.
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Cancel pending instances or kill running ones.
    Cancel {
        /// created time, job key, result id, or id:N
        #[arg(required = true)]
        selectors: Vec<String>,
    },
    /// Push failed or cancelled instances again.
    Retry {
        /// created time, job key, result id, id:N, or batch:NAME
        #[arg(required_unless_present = "all_failed")]
        selectors: Vec<String>,
        /// Every failed instance.
        #[arg(long, conflicts_with = "selectors")]
        all_failed: bool,
        /// Also push again what their failure cancelled (instances waiting for them
        /// with --after), down the whole graph.
        #[arg(long)]
        with_dependents: bool,
    },
    /// Print how many instances are in each state: one readable line on a terminal,
    /// JSON otherwise (or with --json).
    Status {
        /// Only this batch's instances.
        #[arg(long)]
        batch: Option<String>,
        /// Print JSON even on a terminal.
        #[arg(long)]
        json: bool,
    },
    /// Show the newest instances as a table: id, state, age, run time, attempts,
    /// exit code and the first line of the payload.
    Ps(PsArgs),
    /// Re-hash every blob and check every row's references; problems as JSON lines.
    Verify,
    /// Serve the HTTP API and the live dashboard.
    Serve(ServeArgs),
    /// Remove ended instances older than a cutoff, with their attempts, events,
    /// result-cache entries and the jobs, batches and inline outputs left unused;
    /// `gc` then reclaims the blobs they named.
    Prune(PruneArgs),
    /// Print a shell completion script for SHELL to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (batchdb.1 and one per command) into DIR, or print
    /// batchdb.1 to stdout without it.
    Man {
        /// The directory to write the pages into (created if missing), e.g.
        /// ~/.local/share/man/man1.
        #[arg(value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Remove blobs that no row names.
    Gc {
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Leave blobs younger than SECS alone (they may be about to be named).
        #[arg(long, default_value_t = 3600.0)]
        grace: f64,
    },
}

/// `batchdb ps`.
#[derive(Debug, Args)]
pub struct PsArgs {
    /// Only instances in this state: waiting, pending, running, result, fail or
    /// cancelled (repeatable).
    #[arg(long = "state", value_name = "STATE")]
    pub states: Vec<String>,
    /// Only the instances of batch NAME.
    #[arg(long, value_name = "NAME")]
    pub batch: Option<String>,
    /// Show at most N instances, the newest.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub limit: usize,
}

/// `batchdb prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Remove instances that ended more than this long ago: `30d`, `12h`, `90m`,
    /// `45s`, `1h 30m`.
    #[arg(long, value_name = "DURATION")]
    pub older_than: String,
    /// Only instances in this state: result, fail or cancelled (repeatable; default
    /// all three).
    #[arg(long = "state", value_name = "STATE")]
    pub states: Vec<String>,
    /// Print how many instances would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Where a payload comes from.
#[derive(Debug, Args)]
pub struct PayloadArgs {
    /// Read the payload from FILE.
    #[arg(short, long, conflicts_with = "payload")]
    pub file: Option<PathBuf>,
    /// The payload: these words joined by single spaces (stdin if neither is given).
    pub payload: Vec<String>,
}

/// How an instance is queued.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// Higher runs first.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i64,
    /// Run no sooner than SECS from now.
    #[arg(long, conflicts_with = "at")]
    pub delay: Option<f64>,
    /// Run no sooner than TIME (epoch seconds, or YYYY-MM-DDTHH:MM:SS[Z] in UTC).
    #[arg(long)]
    pub at: Option<String>,
    /// Kill the run (its whole process group) after SECS.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Retry a failed run up to N times, with exponential backoff.
    #[arg(long)]
    pub retries: Option<u32>,
    /// Serve the result from the result cache when this payload already ran well.
    #[arg(long)]
    pub cached: bool,
    /// Put the instances in batch NAME ([A-Za-z0-9._-], up to 128 characters).
    #[arg(long, value_name = "NAME")]
    pub batch: Option<String>,
    /// Wait until every instance SELECTOR names has a result (repeatable); cancelled
    /// if one of them fails for good or is cancelled.
    #[arg(long, value_name = "SELECTOR")]
    pub after: Vec<String>,
    /// Wait until every instance SELECTOR names has ended, whatever the outcome
    /// (repeatable).
    #[arg(long, value_name = "SELECTOR")]
    pub after_any: Vec<String>,
    /// Run in DIR (`.`: this directory, made absolute); not part of the job key, part
    /// of the result-cache key.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Set KEY to VALUE for the job (repeatable; `--env KEY` takes this shell's value);
    /// part of the result-cache key.
    #[arg(long, value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Set the variables of FILE (KEY=VALUE lines; blank lines and # comments
    /// skipped; `--env` wins over it).
    #[arg(long, value_name = "FILE")]
    pub env_file: Option<PathBuf>,
    /// Limit the job's memory to SIZE (512M, 8G): past it the job is killed and
    /// fails with "out of memory".
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Limit the job to N CPUs' worth of time (fractions allowed: 0.5).
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub cpus: Option<f64>,
    /// Limit the job to N processes and threads at once.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Run only on a worker with NAME=AMOUNT free (`gpu=2`, `mem=8G`; repeatable).
    #[arg(long, value_name = "NAME=AMOUNT")]
    pub needs: Vec<String>,
    /// Run at most N instances carrying KEY at once, across every worker.
    #[arg(long, value_name = "KEY=N")]
    pub concurrency: Option<String>,
}

/// `batchdb map`.
#[derive(Debug, Args)]
pub struct MapArgs {
    /// Print only the batch name.
    #[arg(short, long)]
    pub quiet: bool,
    /// Read the inputs from FILE, one per line (default: stdin), when there is no :::.
    #[arg(short, long)]
    pub file: Option<PathBuf>,
    /// Print the payloads, one per line, and add nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
    /// The command template, then optionally `::: ARG...` lists (GNU parallel's
    /// replacement strings: {} {.} {/} {//} {/.} {#} {1} {2.} ...).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEMPLATE [::: ARG...]"
    )]
    pub template: Vec<String>,
}

/// `batchdb wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// created time, job key, result id, id:N, or batch:NAME
    #[arg(required_unless_present = "batch")]
    pub selectors: Vec<String>,
    /// Every instance of batch NAME (including ones added while waiting).
    #[arg(long, value_name = "NAME")]
    pub batch: Option<String>,
    /// Give up after SECS (exit 2).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// Whether a long command shows a live progress line on stderr (by default: when
/// stderr is a terminal).
#[derive(Debug, Args)]
pub struct ProgressArgs {
    /// Show a progress line on stderr even when it is not a terminal.
    #[arg(long, conflicts_with = "no_progress")]
    pub progress: bool,
    /// Never show a progress line.
    #[arg(long)]
    pub no_progress: bool,
}

/// `batchdb add`.
#[derive(Debug, Args)]
pub struct AddArgs {
    /// Print only the job key.
    #[arg(short, long)]
    pub quiet: bool,
    /// Bulk add: every non-empty line of the input (stdin or --file) is one job's
    /// payload; they are committed up to 50,000 (or 16 MiB of small payloads) to a
    /// transaction.
    #[arg(long, conflicts_with = "payload")]
    pub lines: bool,
    #[command(flatten)]
    pub payload: PayloadArgs,
    #[command(flatten)]
    pub queue: QueueArgs,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// `batchdb push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The job key.
    pub jobkey: String,
    #[command(flatten)]
    pub queue: QueueArgs,
}

/// `batchdb run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Run up to N jobs at once.
    #[arg(short = 'j', long = "jobs", default_value_t = 1)]
    pub jobs: usize,
    /// The runner command; the payload goes to its stdin.
    #[arg(long, env = "BATCHDB_SHELL", default_value = "sh")]
    pub shell: String,
    /// Which pending jobs first: newest or oldest.
    #[arg(long, default_value = "newest")]
    pub order: String,
    /// Exit once nothing is pending or running.
    #[arg(long)]
    pub until_empty: bool,
    /// Also write each result's bytes after its RESULT line.
    #[arg(long)]
    pub print: bool,
    /// Lease of each claim in seconds; renewed every third of it.
    #[arg(long, default_value_t = 30.0)]
    pub lease: f64,
    /// Default timeout in seconds for jobs added without one.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Default retries for jobs added without --retries.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// First retry delay in seconds (doubles each failure, ±50 % jitter).
    #[arg(long, default_value_t = 1.0)]
    pub backoff: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping a job.
    #[arg(long, default_value_t = 5.0)]
    pub kill_grace: f64,
    /// Serve every job from the result cache when possible.
    #[arg(long)]
    pub cached: bool,
    /// How jobs' --memory, --cpus and --pids are enforced: auto (a cgroup per
    /// attempt where one can be made; else jobs with limits fail), cgroup (refuse to
    /// start without one), rlimit (RLIMIT_DATA, RLIMIT_NPROC; jobs with --cpus fail)
    /// or none (jobs with limits fail).
    #[arg(long, value_name = "HOW", default_value = "auto")]
    pub limits: String,
    /// Also prune, now and periodically, instances that ended more than DURATION
    /// ago (as `batchdb prune --older-than DURATION` does).
    #[arg(long, value_name = "DURATION")]
    pub prune_after: Option<String>,
    /// What this worker has for jobs that --needs it (repeatable): named units
    /// (`gpu=0,1,2,3`) or an amount (`mem=64G`, `licences=5`).
    #[arg(long, value_name = "NAME=UNITS|AMOUNT")]
    pub resource: Vec<String>,
    /// Seconds a job whose needs do not fit may wait before smaller jobs stop being
    /// started around it (it then gets the next free units).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60.0,
        allow_hyphen_values = true
    )]
    pub reserve_after: f64,
    /// Seconds: after a job that ran less than this, its slot claims the next job
    /// ahead, held to start the moment the running job ends (the ended job's outcome
    /// commits meanwhile); the held job is given back to pending if the running job
    /// goes on for a second (or SECS, if longer). 0: claim only what starts.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 0.05,
        allow_hyphen_values = true
    )]
    pub ahead: f64,
    /// Work for the `batchdb serve` at URL (`https://host:5000`) instead of opening
    /// the database: every queue and blob call goes through its worker endpoints, so
    /// this machine needs no database, bucket or shared filesystem.
    #[arg(
        long,
        env = "BATCHDB_SERVER",
        value_name = "URL",
        conflicts_with = "prune_after"
    )]
    pub server: Option<String>,
    /// The server's worker token (its --worker-token, or its --token without one);
    /// only with --server (`BATCHDB_TOKEN` in the environment is ignored without it).
    #[arg(long, env = "BATCHDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Trust only the certificate authorities in this PEM file for an https
    /// --server (a private CA).
    #[arg(long, value_name = "FILE", requires = "server")]
    pub ca_cert: Option<PathBuf>,
    #[command(flatten)]
    pub progress: ProgressArgs,
}

/// `batchdb serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, HOST:PORT (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:5000")]
    pub listen: String,
    /// Mount every route under this path (e.g. /batchdb).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Require `Authorization: Bearer TOKEN` on every mutating request.
    #[arg(long, env = "BATCHDB_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Require the token on reads too (lists, blobs, events, metrics).
    #[arg(long, requires = "token")]
    pub auth_reads: bool,
    /// The token remote workers (`batchdb run --server`) must present; it authorises
    /// the worker endpoints and nothing else. Without it, they need --token (if set).
    #[arg(long, env = "BATCHDB_WORKER_TOKEN", hide_env_values = true)]
    pub worker_token: Option<String>,
    /// The most connections open at once; at the limit, the connection idle the
    /// longest is closed to make room.
    #[arg(long, default_value_t = batchdb_server::Limits::DEFAULT.max_connections)]
    pub max_connections: usize,
    /// The most event streams (/events, /api/output) open at once; beyond, 503.
    #[arg(long, default_value_t = batchdb_server::Limits::DEFAULT.max_streams)]
    pub max_streams: usize,
    /// Seconds a client may take to send a request's headers (or stay idle between
    /// requests).
    #[arg(long, default_value_t = batchdb_server::Limits::DEFAULT.header_timeout.as_secs_f64())]
    pub header_timeout: f64,
    /// Seconds a request body may go without a byte before the request fails.
    #[arg(long, default_value_t = batchdb_server::Limits::DEFAULT.body_timeout.as_secs_f64())]
    pub body_timeout: f64,
    /// Also prune, now and periodically, instances that ended more than DURATION
    /// ago (as `batchdb prune --older-than DURATION` does).
    #[arg(long, value_name = "DURATION")]
    pub prune_after: Option<String>,
    /// Serve HTTPS with the certificate in FILE (PEM; the server's certificate
    /// first, then any intermediates). Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert's certificate (PEM: PKCS#8, PKCS#1 or SEC1).
    /// Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}
