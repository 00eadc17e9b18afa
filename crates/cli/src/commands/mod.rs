//! One module per subcommand (as pueue does); this one dispatches and holds what
//! they share.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use batchdb::integrity::GcOptions;
use batchdb::queue::{
    Finished, ListKind, Order, PruneRequest, PushOptions, PushRequest, Selector, State,
};
use batchdb::runner::ShellRunner;
use batchdb::worker::{Report, WorkerOptions};
use batchdb::{BatchDb, BlobLocation, Config, DbLocation, Error, Hash, Result};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::args::{
    AddArgs, Cli, Command, MapArgs, PayloadArgs, PruneArgs, PushArgs, QueueArgs, RunArgs,
    ServeArgs, WaitArgs,
};
use crate::time::{parse_at, secs};

mod add;
mod batch;
mod control;
mod list;
mod maint;
mod manual;
mod map;
mod progress;
mod ps;
mod run;
mod serve;
mod show;

/// Runs the command `cli` names and returns the process's exit code.
pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Completions { shell } => return manual::completions(*shell),
        Command::Man { out } => return manual::man(out.as_deref()),
        _ => {}
    }
    let cfg = config(&cli)?;
    let command = cli.command;
    if let Command::Run(r) = command {
        // A remote worker opens no database: the server does. (An empty
        // `BATCHDB_SERVER` is no server.)
        if r.server.as_deref().is_some_and(|s| !s.is_empty()) {
            return run::run_remote(r).await;
        }
        let cfg = Config {
            db_connections: Some(run::db_connections(r.jobs)),
            ..cfg
        };
        return run::run(&BatchDb::open(&cfg).await?, r).await;
    }
    let db = BatchDb::open(&cfg).await?;
    match command {
        Command::Add(a) if a.lines => add::add_lines(&db, a).await,
        Command::Add(a) => add::add(&db, a).await,
        Command::Create(p) => add::create(&db, p).await,
        Command::Push(p) => add::push(&db, p).await,
        Command::Map(m) => map::map(&db, m).await,
        Command::List { kind, batch } => list::list(&db, kind, batch).await,
        Command::Batches => batch::batches(&db).await,
        Command::Wait(w) => batch::wait(&db, w).await,
        Command::Serve(s) => serve::serve(db, s).await,
        Command::Get { hash } => show::get(&db, hash).await,
        Command::Show { selector, json } => show::show(&db, &selector, json).await,
        Command::Logs { selector, follow } => show::logs(&db, &selector, follow).await,
        Command::Events { follow, after } => list::events(&db, follow, after).await,
        Command::Cancel { selectors } => control::cancel(&db, selectors).await,
        Command::Retry {
            selectors,
            all_failed,
            with_dependents,
        } => control::retry(&db, selectors, all_failed, with_dependents).await,
        Command::Verify => maint::verify(&db).await,
        Command::Gc { dry_run, grace } => maint::gc(&db, dry_run, grace).await,
        Command::Prune(p) => maint::prune(&db, p).await,
        Command::Status { batch: None, json } => list::status(&db, json).await,
        Command::Status {
            batch: Some(b),
            json,
        } => batch::status(&db, &b, json).await,
        Command::Ps(a) => ps::ps(&db, a).await,
        Command::Completions { .. } | Command::Man { .. } | Command::Run(_) => {
            unreachable!("answered above")
        }
    }
}

fn config(cli: &Cli) -> Result<Config> {
    let dir = match &cli.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    let mut cfg = Config::in_dir(&dir);
    if let Some(db) = &cli.db {
        cfg.db = DbLocation::parse(db)?;
    }
    if let Some(b) = &cli.blobs {
        cfg.blobs = BlobLocation::parse(b)?;
    }
    Ok(cfg)
}

/// `$XDG_DATA_HOME/batchdb`, else `$HOME/.local/share/batchdb`.
fn default_dir() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = nonempty("XDG_DATA_HOME") {
        return Ok(PathBuf::from(x).join("batchdb"));
    }
    if let Some(h) = nonempty("HOME") {
        return Ok(PathBuf::from(h).join(".local/share/batchdb"));
    }
    Err(Error::Config {
        what: "data directory",
        value: String::new(),
        why: "neither --dir, BATCHDB_DIR, XDG_DATA_HOME nor HOME is set".into(),
    })
}

fn stdout_err(e: std::io::Error) -> Error {
    Error::Stream {
        what: "write to stdout".into(),
        source: e,
    }
}

/// Prints one line to stdout and flushes it (readers may be waiting on a pipe).
fn line(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush())
        .map_err(stdout_err)
}

async fn payload(p: &PayloadArgs) -> Result<Box<dyn AsyncRead + Send + Unpin>> {
    if let Some(f) = &p.file {
        let file = tokio::fs::File::open(f)
            .await
            .map_err(|e| Error::io("open", f, e))?;
        return Ok(Box::new(file));
    }
    if !p.payload.is_empty() {
        return Ok(Box::new(std::io::Cursor::new(
            p.payload.join(" ").into_bytes(),
        )));
    }
    Ok(Box::new(tokio::io::stdin()))
}

fn push_options(q: &QueueArgs) -> Result<PushOptions> {
    // clap makes --at and --delay exclusive; --at wins should both ever arrive.
    let run_at = q.at.as_deref().map(parse_at).transpose()?;
    PushRequest {
        priority: q.priority,
        delay: if run_at.is_some() { None } else { q.delay },
        run_at,
        timeout: q.timeout,
        retries: q.retries,
        cached: q.cached,
        batch: q.batch.clone(),
        after: q.after.clone(),
        after_any: q.after_any.clone(),
        cwd: q.cwd.as_deref().map(absolute_dir).transpose()?,
        env: environment(q)?,
        memory: q.memory.clone(),
        cpus: q.cpus,
        pids: q.pids,
        needs: q.needs.clone(),
        concurrency: q.concurrency.clone(),
    }
    .options()
}

/// `--cwd DIR` as an absolute path (this directory joined in front of a relative
/// one; not resolved further, as the directory is entered on the worker's machine).
fn absolute_dir(dir: &Path) -> Result<String> {
    let abs = std::path::absolute(dir).map_err(|e| Error::io("resolve", dir, e))?;
    abs.into_os_string()
        .into_string()
        .map_err(|p| Error::Config {
            what: "working directory",
            value: p.to_string_lossy().into_owned(),
            why: "the path is not UTF-8".into(),
        })
}

/// The variables of `--env-file` then `--env` (a later one wins), each `KEY=VALUE`;
/// `--env KEY` takes this process's value of KEY.
fn environment(q: &QueueArgs) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if let Some(f) = &q.env_file {
        let text = std::fs::read_to_string(f).map_err(|e| Error::io("read", f, e))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            if !line.contains('=') {
                return Err(Error::Config {
                    what: "environment file line",
                    value: format!("{}:{}: {line}", f.display(), n + 1),
                    why: "expected KEY=VALUE".into(),
                });
            }
            out.push(line.to_string());
        }
    }
    for kv in &q.env {
        if kv.contains('=') {
            out.push(kv.clone());
            continue;
        }
        let v = std::env::var(kv).map_err(|_| Error::Config {
            what: "environment variable",
            value: kv.clone(),
            why: "expected KEY=VALUE, or the name of a variable set here".into(),
        })?;
        out.push(format!("{kv}={v}"));
    }
    Ok(out)
}

async fn copy_to(
    mut from: impl AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    hash: &Hash,
) -> Result<u64> {
    let n = tokio::io::copy(&mut from, &mut to)
        .await
        .map_err(|e| Error::Stream {
            what: format!("blob {hash}"),
            source: e,
        })?;
    to.flush().await.map_err(stdout_err)?;
    Ok(n)
}
