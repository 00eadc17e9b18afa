//! `map`: fan-out, one job per input, payloads built from a GNU parallel template.

use batchdb::template::Template;
use tokio::io::AsyncBufReadExt;

use std::sync::atomic::{AtomicU64, Ordering};

use super::progress::{self, Progress};
use super::*;
use crate::args::ProgressArgs;

/// Where a map's inputs come from.
enum Inputs {
    /// One input per line of a reader.
    Lines(tokio::io::BufReader<Box<dyn AsyncRead + Send + Unpin>>),
    /// Every combination of the `:::` lists, first list varying slowest.
    Product {
        lists: Vec<Vec<String>>,
        /// The next combination's index in each list; `None` when done.
        next: Option<Vec<usize>>,
    },
}

impl Inputs {
    /// Puts the next input's arguments in `args`; false at the end.
    async fn next(&mut self, args: &mut Vec<Vec<u8>>) -> Result<bool> {
        args.clear();
        match self {
            Inputs::Lines(r) => {
                let mut buf = Vec::new();
                let n = r
                    .read_until(b'\n', &mut buf)
                    .await
                    .map_err(|e| Error::Stream {
                        what: "read map inputs".into(),
                        source: e,
                    })?;
                if n == 0 {
                    return Ok(false);
                }
                if buf.last() == Some(&b'\n') {
                    buf.pop();
                }
                args.push(buf);
                Ok(true)
            }
            Inputs::Product { lists, next } => {
                let Some(idx) = next.as_mut() else {
                    return Ok(false);
                };
                args.extend(
                    idx.iter()
                        .zip(lists.iter())
                        .map(|(&i, l)| l[i].as_bytes().to_vec()),
                );
                // Odometer: the last list turns fastest.
                let mut k = idx.len();
                loop {
                    if k == 0 {
                        *next = None;
                        break;
                    }
                    k -= 1;
                    idx[k] += 1;
                    if idx[k] < lists[k].len() {
                        break;
                    }
                    idx[k] = 0;
                }
                Ok(true)
            }
        }
    }
}

/// Splits `TEMPLATE... [::: ARG...]...` into the template and the `:::` lists.
fn split(words: &[String]) -> Result<(String, Option<Vec<Vec<String>>>)> {
    let mut parts = words.split(|w| w == ":::");
    let template = parts.next().unwrap_or_default().join(" ");
    if template.trim().is_empty() {
        return Err(Error::Config {
            what: "map template",
            value: template,
            why: "give a command template before :::".into(),
        });
    }
    let lists: Vec<Vec<String>> = parts.map(<[String]>::to_vec).collect();
    if lists.is_empty() {
        return Ok((template, None));
    }
    Ok((template, Some(lists)))
}

/// `map [--batch NAME] [-f FILE] [--dry-run] [-q] [QUEUE OPTIONS] TEMPLATE [::: ARG...]...`.
pub(super) async fn map(db: &BatchDb, m: MapArgs) -> Result<ExitCode> {
    let (template, lists) = split(&m.template)?;
    let template = Template::parse(&template);
    let (mut inputs, mut line) = inputs(&m, lists).await?;
    let mut opts = push_options(&m.queue)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if !m.dry_run {
        let name = opts
            .batch
            .get_or_insert_with(batchdb::queue::new_batch_name);
        writeln!(out, "batch {name}").map_err(stdout_err)?;
        out.flush().map_err(stdout_err)?;
    }
    let (mut args, mut seq, mut payload) = (Vec::new(), 0u64, Vec::new());
    let mut bulk = db.bulk(&opts);
    let mut report = |added: Vec<batchdb::queue::Instance>, out: &mut std::io::BufWriter<_>| {
        if added.is_empty() {
            return Ok(());
        }
        line.advance(added.len() as u64);
        line.progress
            .print(out, |out| {
                if !m.quiet {
                    for inst in &added {
                        writeln!(out, "pushed {} {}", inst.job, inst.created)?;
                    }
                }
                out.flush()
            })
            .map_err(stdout_err)
    };
    while inputs.next(&mut args).await? {
        seq += 1;
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        template.expand_into(seq, &refs, &mut payload);
        if m.dry_run {
            out.write_all(&payload)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(stdout_err)?;
        } else {
            report(bulk.push(&payload[..]).await?, &mut out)?;
        }
    }
    report(bulk.finish().await?, &mut out)?;
    line.progress.finish();
    out.flush().map_err(stdout_err)?;
    Ok(ExitCode::SUCCESS)
}

/// A map's progress: jobs added out of the combinations, or bytes of its input file
/// read, or a count.
struct MapProgress {
    progress: Progress,
    added: u64,
    /// How many jobs the `:::` lists make.
    total: Option<u64>,
    /// Bytes of the input file read so far, and its size.
    read: Option<(Arc<AtomicU64>, u64)>,
}

impl MapProgress {
    fn advance(&mut self, n: u64) {
        self.added += n;
        let added = self.added;
        match &self.read {
            Some((read, size)) => {
                self.progress
                    .set(read.load(Ordering::Relaxed), Some(*size), || {
                        format!("{added} added")
                    })
            }
            None => self.progress.set(added, self.total, || "added".into()),
        }
    }
}

/// The inputs of a map, and its progress line (never shown for `--dry-run`).
async fn inputs(m: &MapArgs, lists: Option<Vec<Vec<String>>>) -> Result<(Inputs, MapProgress)> {
    let flags = ProgressArgs {
        progress: m.progress.progress && !m.dry_run,
        no_progress: m.progress.no_progress || m.dry_run,
    };
    if let Some(lists) = lists {
        let empty = lists.iter().any(Vec::is_empty);
        let next = (!empty).then(|| vec![0; lists.len()]);
        let total = lists
            .iter()
            .map(|l| l.len() as u64)
            .try_fold(1u64, u64::checked_mul);
        let progress = Progress::new(&flags, progress::BAR);
        let line = MapProgress {
            progress,
            added: 0,
            total,
            read: None,
        };
        return Ok((Inputs::Product { lists, next }, line));
    }
    let p = PayloadArgs {
        file: m.file.clone(),
        payload: Vec::new(),
    };
    let size = progress::file_size(m.file.as_deref());
    let (reader, read) = progress::Counted::new(payload(&p).await?);
    let template = if size.is_some() {
        progress::BYTES
    } else {
        progress::COUNT
    };
    let line = MapProgress {
        progress: Progress::new(&flags, template),
        added: 0,
        total: None,
        read: size.map(|s| (read, s)),
    };
    let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(reader);
    Ok((Inputs::Lines(tokio::io::BufReader::new(reader)), line))
}
