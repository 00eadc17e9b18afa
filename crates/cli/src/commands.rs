//! One function per subcommand.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use batchdb::integrity::GcOptions;
use batchdb::queue::{
    Finished, ListKind, Order, PushOptions, PushRequest, Selector, State, now_ms,
};
use batchdb::runner::ShellRunner;
use batchdb::worker::{Report, WorkerOptions};
use batchdb::{BatchDb, BlobLocation, Config, DbLocation, Error, Hash, Result};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::args::{Cli, Command, PayloadArgs, QueueArgs, RunArgs, ServeArgs};
use crate::time::{parse_at, secs};

/// Runs the command `cli` names and returns the process's exit code.
pub async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cfg = config(&cli)?;
    let db = BatchDb::open(&cfg).await?;
    match cli.command {
        Command::Add(a) if a.lines => {
            use tokio::io::AsyncBufReadExt;
            let opts = push_options(&a.queue)?;
            let mut input = tokio::io::BufReader::new(payload(&a.payload).await?);
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut buf = Vec::new();
            let mut chunk: Vec<Vec<u8>> = Vec::new();
            loop {
                buf.clear();
                let n = input
                    .read_until(b'\n', &mut buf)
                    .await
                    .map_err(|e| Error::Stream {
                        what: "read payload lines".into(),
                        source: e,
                    })?;
                let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if !line.is_empty() {
                    chunk.push(line.to_vec());
                }
                if chunk.len() == batchdb::BULK_CHUNK || (n == 0 && !chunk.is_empty()) {
                    for inst in db.add_many(std::mem::take(&mut chunk), &opts).await? {
                        if a.quiet {
                            writeln!(out, "{}", inst.job)
                        } else {
                            writeln!(
                                out,
                                "created {}\npushed {} {}",
                                inst.job, inst.job, inst.created
                            )
                        }
                        .map_err(stdout_err)?;
                    }
                    out.flush().map_err(stdout_err)?;
                }
                if n == 0 {
                    break;
                }
            }
        }
        Command::Add(a) => {
            let opts = push_options(&a.queue)?;
            let inst = db.add(payload(&a.payload).await?, &opts).await?;
            if a.quiet {
                line(format_args!("{}", inst.job))?;
            } else {
                line(format_args!("created {}", inst.job))?;
                line(format_args!("pushed {} {}", inst.job, inst.created))?;
            }
        }
        Command::Create(p) => {
            let (key, _) = db.create(payload(&p).await?).await?;
            line(format_args!("created {key}"))?;
        }
        Command::Push(p) => {
            let key: Hash = p.jobkey.parse()?;
            let inst = db.push(&key, &push_options(&p.queue)?).await?;
            line(format_args!("pushed {} {}", inst.job, inst.created))?;
        }
        Command::List { kind } => {
            let kind: ListKind = kind.parse()?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let rows = db.list(kind);
            futures_util::pin_mut!(rows);
            while let Some(row) = rows.next().await {
                let row = row?;
                serde_json::to_writer(&mut out, &row).map_err(|e| stdout_err(e.into()))?;
                out.write_all(b"\n").map_err(stdout_err)?;
            }
            out.flush().map_err(stdout_err)?;
        }
        Command::Run(r) => return run(&db, r).await,
        Command::Serve(s) => return serve(db, s).await,
        Command::Get { hash } => {
            let hash: Hash = hash.parse()?;
            copy_to(db.get(&hash).await?, tokio::io::stdout(), &hash).await?;
        }
        Command::Show { selector, json } => return show(&db, &selector, json).await,
        Command::Logs { selector, follow } => return logs(&db, &selector, follow).await,
        Command::Events { follow, after } => {
            let events = db.events(after, follow);
            futures_util::pin_mut!(events);
            while let Some(ev) = events.next().await {
                let ev = ev?;
                let json = serde_json::to_string(&ev).map_err(|e| stdout_err(e.into()))?;
                line(format_args!("{json}"))?;
            }
        }
        Command::Cancel { selectors } => {
            for s in selectors {
                let sel: Selector = s.parse()?;
                let done = db.cancel(&sel).await?;
                if done.is_empty() {
                    return Err(Error::InstanceNotFound(format!(
                        "{sel} (pending or running)"
                    )));
                }
                for i in done {
                    line(format_args!("cancel {} {}", i.job, i.created))?;
                }
            }
        }
        Command::Retry {
            selectors,
            all_failed,
        } => {
            let sels: Vec<Selector> = if all_failed {
                vec![Selector::AllFailed]
            } else {
                selectors.iter().map(|s| s.parse()).collect::<Result<_>>()?
            };
            for sel in sels {
                let pushed = db.retry(&sel).await?;
                if pushed.is_empty() && sel != Selector::AllFailed {
                    return Err(Error::InstanceNotFound(format!(
                        "{sel} (failed or cancelled)"
                    )));
                }
                for i in pushed {
                    line(format_args!("pushed {} {}", i.job, i.created))?;
                }
            }
        }
        Command::Verify => {
            let mut out_err = None;
            let sum = db
                .verify(|p| {
                    let json = serde_json::to_string(&p).unwrap_or_default();
                    if let Err(e) = line(format_args!("{json}")) {
                        out_err.get_or_insert(e);
                    }
                })
                .await?;
            if let Some(e) = out_err {
                return Err(e);
            }
            eprintln!(
                "batchdb: verified {} blobs ({} bytes) and {} references: {} problems",
                sum.blobs, sum.bytes, sum.references, sum.problems
            );
            if sum.problems > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Gc { dry_run, grace } => {
            let opts = GcOptions {
                grace: secs("grace", grace)?,
                dry_run,
            };
            let verb = if dry_run { "would remove" } else { "removed" };
            // Each removal is printed as it happens (a later failure loses no line).
            let sum = db
                .gc(opts, |e| {
                    let _ = line(format_args!("{verb} {} {}", e.hash, e.size));
                })
                .await?;
            eprintln!(
                "batchdb: examined {} blobs; {verb} {} ({} bytes)",
                sum.blobs, sum.removed, sum.bytes
            );
        }
        Command::Status => {
            let c = db.counts().await?;
            let json = serde_json::to_string(&c).map_err(|e| stdout_err(e.into()))?;
            line(format_args!("{json}"))?;
        }
    }
    Ok(ExitCode::SUCCESS)
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
    }
    .options()
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

async fn run(db: &BatchDb, r: RunArgs) -> Result<ExitCode> {
    let order: Order = r.order.parse()?;
    let runner = Arc::new(ShellRunner::new(&r.shell)?);
    let opts = WorkerOptions {
        concurrency: r.jobs.max(1),
        order,
        lease: secs("lease", r.lease)?.max(Duration::from_millis(100)),
        timeout: r.timeout.map(|t| secs("timeout", t)).transpose()?,
        kill_grace: secs("kill-grace", r.kill_grace)?,
        retries: r.retries,
        backoff: secs("backoff", r.backoff)?,
        cache_all: r.cached,
        until_empty: r.until_empty,
        ..WorkerOptions::default()
    };
    let worker = db.worker(runner, opts);
    let shutdown = worker.shutdown_handle();
    let stop = shutdown.clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let signals = tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            shutdown.escalate();
        }
    });
    let work = tokio::spawn(worker.run(Some(tx)));
    let mut print_error = None;
    while let Some(rep) = rx.recv().await {
        if print_error.is_none() {
            if let Err(e) = print_report(db, &rep, r.print).await {
                // Nowhere to report to: give running jobs back and stop, but keep
                // recording what still finishes.
                stop.force();
                print_error = Some(e);
            }
        }
    }
    signals.abort();
    work.await
        .map_err(|e| Error::Task(format!("worker: {e}")))??;
    match print_error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn print_report(db: &BatchDb, rep: &Report, print: bool) -> Result<()> {
    let msg = rep
        .report
        .message
        .as_deref()
        .unwrap_or("")
        .replace('\n', " ");
    match rep.finished {
        Some(Finished::Result) => {
            let Some(out) = rep.report.stdout else {
                return Ok(());
            };
            line(format_args!("RESULT {} {}", rep.job, out.hash))?;
            if print {
                copy_to(db.get(&out.hash).await?, tokio::io::stdout(), &out.hash).await?;
            }
        }
        Some(Finished::Fail) => line(format_args!("FAIL {} {} {msg}", rep.job, rep.created))?,
        Some(Finished::Retry(at)) => {
            let wait = (at - now_ms()).max(0) as f64 / 1000.0;
            eprintln!(
                "batchdb: retry {} {} in {wait:.1}s: {msg}",
                rep.job, rep.created
            );
        }
        Some(Finished::Cancelled) => eprintln!("batchdb: cancelled {} {}", rep.job, rep.created),
        Some(Finished::Released) => eprintln!(
            "batchdb: released {} {} back to pending",
            rep.job, rep.created
        ),
        None => eprintln!("batchdb: {} {}: {msg}", rep.job, rep.created),
    }
    Ok(())
}

/// The instance a selector means for `show` and `logs`: the newest one it names.
async fn pick(db: &BatchDb, selector: &str) -> Result<i64> {
    let sel: Selector = selector.parse()?;
    let ids = db.select(&sel).await?;
    ids.last()
        .copied()
        .ok_or_else(|| Error::InstanceNotFound(sel.to_string()))
}

async fn show(db: &BatchDb, selector: &str, json: bool) -> Result<ExitCode> {
    let sel: Selector = selector.parse()?;
    let ids = db.select(&sel).await?;
    // The newest instance that has ended, else the newest one. A result id names the
    // instances that produced it (or, if it is also a job key, that job's instances).
    let mut detail = None;
    for id in ids.iter().rev() {
        let d = db.instance(*id).await?;
        if let Selector::Hash(h) = sel {
            let produced = d
                .last_attempt()
                .and_then(|a| a.report.stdout)
                .is_some_and(|b| b.hash == h);
            if !produced && d.job != h {
                continue;
            }
        }
        let ended = matches!(d.state, State::Result | State::Fail | State::Cancelled);
        if ended || detail.is_none() {
            detail = Some(d);
        }
        if ended {
            break;
        }
    }
    let detail = detail.ok_or_else(|| Error::InstanceNotFound(sel.to_string()))?;
    if json {
        let s = serde_json::to_string(&detail).map_err(|e| stdout_err(e.into()))?;
        line(format_args!("{s}"))?;
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(detail.state, State::Pending | State::Running) {
        return Err(Error::Config {
            what: "instance",
            value: format!("id:{}", detail.id),
            why: format!(
                "it is still {}; follow it with `batchdb logs -f id:{}`",
                detail.state.as_str(),
                detail.id
            ),
        });
    }
    let Some(last) = detail.last_attempt() else {
        return Err(Error::Config {
            what: "instance",
            value: format!("id:{}", detail.id),
            why: "it was cancelled before it ran, so it has no output".into(),
        });
    };
    if let Some(out) = last.report.stdout {
        copy_to(db.get(&out.hash).await?, tokio::io::stdout(), &out.hash).await?;
    }
    if let Some(err) = last.report.stderr {
        copy_to(db.get(&err.hash).await?, tokio::io::stderr(), &err.hash).await?;
    }
    let code = match (last.report.exit_code, last.report.signal) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// Prints bytes of `path` from `*offset` on, advancing the offset.
async fn tail_file(path: &std::path::Path, offset: &mut u64, to_stderr: bool) -> Result<()> {
    use tokio::io::AsyncSeekExt;
    let Ok(mut f) = tokio::fs::File::open(path).await else {
        return Ok(());
    };
    f.seek(std::io::SeekFrom::Start(*offset))
        .await
        .map_err(|e| Error::io("seek", path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| Error::io("read", path, e))?;
        if n == 0 {
            return Ok(());
        }
        *offset += n as u64;
        write_out(&buf[..n], to_stderr).await?;
    }
}

async fn write_out(buf: &[u8], to_stderr: bool) -> Result<()> {
    let r = if to_stderr {
        let mut e = tokio::io::stderr();
        e.write_all(buf).await.and(e.flush().await)
    } else {
        let mut o = tokio::io::stdout();
        o.write_all(buf).await.and(o.flush().await)
    };
    r.map_err(stdout_err)
}

/// Prints a stored blob from `offset` on.
async fn blob_from(db: &BatchDb, hash: &Hash, offset: u64, to_stderr: bool) -> Result<()> {
    let mut r = db.get(hash).await?;
    let mut skip = offset;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.map_err(|e| Error::Stream {
            what: format!("blob {hash}"),
            source: e,
        })?;
        if n == 0 {
            return Ok(());
        }
        let s = skip.min(n as u64) as usize;
        skip -= s as u64;
        write_out(&buf[s..n], to_stderr).await?;
    }
}

async fn logs(db: &BatchDb, selector: &str, follow: bool) -> Result<ExitCode> {
    let id = pick(db, selector).await?;
    let mut attempt = 0i64;
    let (mut out_off, mut err_off) = (0u64, 0u64);
    loop {
        let seen = db.queue().change_seq();
        let d = db.instance(id).await?;
        let last = d.last_attempt();
        let n = last.map_or(0, |a| a.attempt);
        if n != attempt {
            attempt = n;
            out_off = 0;
            err_off = 0;
        }
        match (d.state, last) {
            (State::Running, Some(a)) if a.outcome.is_none() => {
                if let Some(live) = db.live_dir() {
                    tail_file(&live.join(format!("{id}.{n}.stdout")), &mut out_off, false).await?;
                    tail_file(&live.join(format!("{id}.{n}.stderr")), &mut err_off, true).await?;
                }
            }
            (_, Some(a)) if a.outcome.is_some() => {
                // The attempt ended: its blobs hold exactly what the live files held.
                if let Some(b) = a.report.stdout {
                    blob_from(db, &b.hash, out_off, false).await?;
                    out_off = b.size;
                }
                if let Some(b) = a.report.stderr {
                    blob_from(db, &b.hash, err_off, true).await?;
                    err_off = b.size;
                }
                if matches!(d.state, State::Result | State::Fail | State::Cancelled) {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            _ if matches!(d.state, State::Result | State::Fail | State::Cancelled) => {
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
        if !follow {
            return Ok(ExitCode::SUCCESS);
        }
        // Live files grow without any database change: look again soon either way.
        db.queue()
            .wait_change(seen, Duration::from_millis(50))
            .await;
    }
}

/// `batchdb serve`: the HTTP API and dashboard until SIGINT or SIGTERM.
async fn serve(db: BatchDb, s: ServeArgs) -> Result<ExitCode> {
    if s.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(Error::Config {
            what: "token",
            value: String::new(),
            why: "empty; give a token or none".into(),
        });
    }
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .map_err(|e| Error::io("listen on", &s.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("read the address of", &s.listen, e))?;
    let opts = batchdb_server::ServeOptions {
        prefix: s.prefix,
        token: s.token,
        auth_reads: s.auth_reads,
        local_hosts_only: addr.ip().is_loopback(),
    };
    let prefix = opts.normalized_prefix()?;
    if opts.token.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "batchdb: warning: listening on {addr} without --token: anyone who can reach it can queue shell commands"
        );
    }
    line(format_args!("listening on http://{addr}{prefix}/"))?;
    let shutdown = async {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    };
    batchdb_server::serve(listener, db, opts, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
