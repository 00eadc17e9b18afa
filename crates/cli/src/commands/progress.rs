//! The live progress line of the long commands (`run --until-empty`, `add --lines`,
//! `map`, `wait`): on stderr, only when stderr is a terminal unless `--progress` or
//! `--no-progress` says otherwise, redrawn at most 10 times a second. Scripts (stderr
//! not a terminal) see exactly the output they saw without it.

use std::io::IsTerminal;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::io::ReadBuf;

use super::*;
use crate::args::ProgressArgs;

/// A bar that is filling: done/total, what is running and failed, rate and ETA.
pub(super) const BAR: &str = "{bar:20} {pos}/{len} {msg} · {rate} · ETA {eta}";
/// A count with no known total.
pub(super) const COUNT: &str = "{spinner} {pos} {msg} · {rate} · {elapsed}";
/// Bytes of an input file read so far, for inputs whose size is known.
pub(super) const BYTES: &str =
    "{bar:20} {bytes}/{total_bytes} read, {msg} · {bytes_per_sec} · ETA {eta}";

/// The progress line of one command, or nothing when it is not shown.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    /// Whether stdout is a terminal too: lines printed there then clear the bar first.
    shared_terminal: bool,
}

impl Progress {
    /// The line for `flags`, drawn with `template` (one of [`BAR`], [`COUNT`],
    /// [`BYTES`]) when it is to be shown.
    pub(super) fn new(flags: &ProgressArgs, template: &str) -> Progress {
        let show = flags.progress || (!flags.no_progress && std::io::stderr().is_terminal());
        let bar = show.then(|| {
            let target =
                ProgressDrawTarget::term_like_with_hz(Box::new(console::Term::stderr()), 10);
            let bar = ProgressBar::with_draw_target(None, target);
            let style = ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .with_key(
                    "rate",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.1}/s", s.per_sec());
                    },
                );
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        });
        Progress {
            bar,
            shared_terminal: std::io::stdout().is_terminal(),
        }
    }

    /// Whether the line is shown.
    pub(super) fn shown(&self) -> bool {
        self.bar.is_some()
    }

    /// Sets what is done, out of how many (`None`: not known), and the message.
    pub(super) fn set(&self, done: u64, total: Option<u64>, msg: impl FnOnce() -> String) {
        if let Some(bar) = &self.bar {
            if let Some(t) = total {
                bar.set_length(t);
            }
            bar.set_position(done);
            bar.set_message(msg());
        }
    }

    /// Writes to stdout through `out` with `write`; when stdout shares the terminal
    /// with the line, the line is cleared first and the write flushed before it is
    /// drawn again, so the two never garble each other.
    pub(super) fn print<W: Write>(
        &self,
        out: &mut W,
        write: impl FnOnce(&mut W) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        match &self.bar {
            Some(bar) if self.shared_terminal => bar.suspend(|| {
                write(out)?;
                out.flush()
            }),
            _ => write(out),
        }
    }

    /// Prints one line to stderr above the progress line (plainly, without one).
    pub(super) fn note(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{text}")),
            None => eprintln!("{text}"),
        }
    }

    /// Leaves the last state of the line on the terminal.
    pub(super) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// A reader that counts the bytes read through it (for a [`BYTES`] line).
pub(super) struct Counted<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R> Counted<R> {
    /// Wraps `inner`; the count is shared with the returned handle.
    pub(super) fn new(inner: R) -> (Counted<R>, Arc<AtomicU64>) {
        let read = Arc::new(AtomicU64::new(0));
        (
            Counted {
                inner,
                read: read.clone(),
            },
            read,
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Counted<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

/// The size of the regular file `-f FILE` names, if it has one (a pipe or a device
/// has none): the total of a [`BYTES`] line.
pub(super) fn file_size(file: Option<&std::path::Path>) -> Option<u64> {
    let meta = std::fs::metadata(file?).ok()?;
    (meta.is_file() && meta.len() > 0).then_some(meta.len())
}
