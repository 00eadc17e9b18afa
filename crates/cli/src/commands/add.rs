//! `add` (one payload, or one per line), `create`, `push`.

use std::sync::atomic::Ordering;

use super::progress::{self, Progress};
use super::*;

/// `add --lines`: one job per non-empty line, each streamed, committed in chunks.
pub(super) async fn add_lines(db: &BatchDb, a: AddArgs) -> Result<ExitCode> {
    let opts = push_options(&a.queue)?;
    let size = progress::file_size(a.payload.file.as_deref());
    let line = Progress::new(
        &a.progress,
        if size.is_some() {
            progress::BYTES
        } else {
            progress::COUNT
        },
    );
    let (reader, read) = progress::Counted::new(payload(&a.payload).await?);
    let input = tokio::io::BufReader::with_capacity(256 << 10, reader);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut added = 0u64;
    db.add_lines(input, &opts, |inst| {
        added += 1;
        match size {
            Some(total) => line.set(read.load(Ordering::Relaxed), Some(total), || {
                format!("{added} added")
            }),
            None => line.set(added, None, || "added".into()),
        }
        line.print(&mut out, |out| {
            if a.quiet {
                writeln!(out, "{}", inst.job)
            } else {
                writeln!(
                    out,
                    "created {}\npushed {} {}",
                    inst.job, inst.job, inst.created
                )
            }
        })
        .map_err(stdout_err)
    })
    .await?;
    line.finish();
    out.flush().map_err(stdout_err)?;
    Ok(ExitCode::SUCCESS)
}

/// `add`: stores the payload and pushes it.
pub(super) async fn add(db: &BatchDb, a: AddArgs) -> Result<ExitCode> {
    let opts = push_options(&a.queue)?;
    let inst = db.add(payload(&a.payload).await?, &opts).await?;
    if a.quiet {
        line(format_args!("{}", inst.job))?;
    } else {
        line(format_args!("created {}", inst.job))?;
        line(format_args!("pushed {} {}", inst.job, inst.created))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `create`: stores the payload only.
pub(super) async fn create(db: &BatchDb, p: PayloadArgs) -> Result<ExitCode> {
    let (key, _) = db.create(payload(&p).await?).await?;
    line(format_args!("created {key}"))?;
    Ok(ExitCode::SUCCESS)
}

/// `push`: another instance of a stored job.
pub(super) async fn push(db: &BatchDb, p: PushArgs) -> Result<ExitCode> {
    let key: Hash = p.jobkey.parse()?;
    let inst = db.push(&key, &push_options(&p.queue)?).await?;
    line(format_args!("pushed {} {}", inst.job, inst.created))?;
    Ok(ExitCode::SUCCESS)
}
