//! `batchdb`: the command-line interface to a batchdb database.
//!
//! Every error is reported on one line (`batchdb: <what failed and on what>`) with a
//! non-zero exit status.

mod args;
mod commands;
mod time;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    limit_malloc_arenas();
    ignore_file_size_signal();
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    init_logging(cli.verbose);
    // A worker and a server run many tasks at once; every other command is one task,
    // and starts faster without worker threads, and without a blocking thread for
    // SQLite: its calls run on the one thread.
    let many = matches!(cli.command, args::Command::Run(_) | args::Command::Serve(_));
    let mut builder = if many {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        batchdb::set_inline_blocking(true);
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("batchdb: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A worker or a server runs as a task (on this thread, as before), as all its
    // other work does: the library runs SQLite calls in place for a caller outside any
    // task (`block_on` itself), and these must never stall what else their future
    // polls.
    let outcome = if many {
        let local = tokio::task::LocalSet::new();
        rt.block_on(local.run_until(async {
            match tokio::task::spawn_local(commands::dispatch(cli)).await {
                Ok(outcome) => outcome,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(batchdb::Error::Task(format!("the command's task: {e}"))),
            }
        }))
    } else {
        rt.block_on(commands::dispatch(cli))
    };
    match outcome {
        Ok(code) => code,
        // A closed stdout (`batchdb events | head`) is how pipelines end, not a failure.
        Err(batchdb::Error::Stream { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            let msg = e.to_string().replace('\n', " ");
            eprintln!("batchdb: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// A command line that does not parse: `--help` and `--version` print as clap prints
/// them; anything else is one line, `batchdb: <what is wrong> (see --help)`, and exit
/// status 2 (usage errors, as is the custom; 1 is for everything that fails later).
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        eprintln!("batchdb: a command is missing (see --help)");
        return ExitCode::from(2);
    }
    let text = e.render().to_string();
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("invalid command line");
    let mut what = first.strip_prefix("error: ").unwrap_or(first).to_string();
    // "the following required arguments were not provided:" lists them below,
    // indented: name them on the one line.
    if what.ends_with(':') {
        let listed: Vec<&str> = lines
            .take_while(|l| l.starts_with(char::is_whitespace) && !l.trim().is_empty())
            .map(str::trim)
            .collect();
        if !listed.is_empty() {
            what = format!("{what} {}", listed.join(", "));
        }
    }
    eprintln!("batchdb: {what} (see --help)");
    ExitCode::from(2)
}

/// A write past a file-size limit (`ulimit -f`) fails with EFBIG instead of killing
/// the process with SIGXFSZ: `add` then reports it on one line and removes its
/// temporary file, and `run` gives the attempt back instead of dying with its
/// instances leased. (Jobs start with the default action again: `runner::spawn`.)
fn ignore_file_size_signal() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler; called
    // before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Streams pass their buffers through tokio's blocking threads (file and stdin I/O);
/// under load the pool starts many threads, and glibc gives each its own malloc arena,
/// which keeps freed buffers. A 5 GiB `add` once peaked at 263 MiB in a loaded test
/// run (14 MiB otherwise); capping the arenas bounds that growth.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
