//! `get`, `show` and `logs`: a blob, an instance's output, followed live.

use super::*;

/// `get HASH`: a blob to stdout, verified as it streams.
pub(super) async fn get(db: &BatchDb, hash: String) -> Result<ExitCode> {
    let hash: Hash = hash.parse()?;
    copy_to(db.get(&hash).await?, tokio::io::stdout(), &hash).await?;
    Ok(ExitCode::SUCCESS)
}

/// The instance a selector means for `show` and `logs`: the newest one it names.
async fn pick(db: &BatchDb, selector: &str) -> Result<i64> {
    let sel: Selector = selector.parse()?;
    let ids = db.select(&sel).await?;
    ids.last()
        .copied()
        .ok_or_else(|| Error::InstanceNotFound(sel.to_string()))
}

pub(super) async fn show(db: &BatchDb, selector: &str, json: bool) -> Result<ExitCode> {
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

pub(super) async fn logs(db: &BatchDb, selector: &str, follow: bool) -> Result<ExitCode> {
    let id = pick(db, selector).await?;
    let mut attempt = 0i64;
    let (mut out_off, mut err_off) = (0u64, 0u64);
    loop {
        let seen = db.change_seq();
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
        db.wait_change(seen, Duration::from_millis(50)).await;
    }
}
