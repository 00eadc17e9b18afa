//! `add` (one payload, or one per line), `create`, `push`.

use super::*;

/// `add --lines`: one job per non-empty line, committed 10,000 at a time.
pub(super) async fn add_lines(db: &BatchDb, a: AddArgs) -> Result<ExitCode> {
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
