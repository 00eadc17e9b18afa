//! Bulk adds from a stream of lines (`add --lines`): one job per non-empty line, each
//! line streamed as it is read — a line longer than [`crate::INLINE_MAX`] goes to the
//! blob store without ever being held whole — and the jobs committed in chunks as
//! [`crate::Bulk`] does. Memory stays flat whatever the lines' lengths or number.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, ReadBuf};

use crate::BatchDb;
use crate::error::{Error, Result};
use crate::queue::{Instance, NewJob, PushOptions};

/// One line of a buffered reader, as a reader: the bytes up to the next `\n` (which
/// is consumed, not yielded) or the end of input, without a `\r` just before its end.
struct Line<'a, R> {
    inner: &'a mut R,
    /// A `\r` read but not yielded yet: it is dropped if the line ends right after it.
    held_cr: bool,
    done: bool,
}

impl<R: AsyncBufRead + Unpin> AsyncRead for Line<'_, R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        let start = buf.filled().len();
        while !me.done && buf.remaining() > 0 {
            let avail = match Pin::new(&mut *me.inner).poll_fill_buf(cx) {
                Poll::Ready(r) => r?,
                // What this call already yielded must reach the caller now.
                Poll::Pending if buf.filled().len() > start => break,
                Poll::Pending => return Poll::Pending,
            };
            if avail.is_empty() {
                me.done = true; // the end of input ends the line (a held `\r` is dropped)
                break;
            }
            let nl = avail.iter().position(|&b| b == b'\n');
            let seg = &avail[..nl.unwrap_or(avail.len())];
            if me.held_cr && !seg.is_empty() {
                buf.put_slice(b"\r");
                me.held_cr = false;
            }
            let mut take = seg.len().min(buf.remaining());
            let hold = take == seg.len() && seg.last() == Some(&b'\r');
            if hold {
                take -= 1;
            }
            buf.put_slice(&seg[..take]);
            let whole = take + usize::from(hold) == seg.len();
            let mut used = take + usize::from(hold);
            if whole && nl.is_some() {
                used += 1;
                me.done = true;
                me.held_cr = false;
            } else if hold {
                me.held_cr = true;
            }
            Pin::new(&mut *me.inner).consume(used);
            if take > 0 {
                break;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl BatchDb {
    /// Adds one job per non-empty line of `input` (a trailing `\r` is dropped), in
    /// order; calls `each` with every instance once its chunk has committed. A line of
    /// any length streams; a long one is durable in the blob store before the row that
    /// names it commits. Returns how many were added.
    pub async fn add_lines<R: AsyncBufRead + Send + Unpin>(
        &self,
        mut input: R,
        opts: &PushOptions,
        mut each: impl FnMut(&Instance) -> Result<()>,
    ) -> Result<u64> {
        let (mut bulk, mut added) = (self.bulk(opts), 0u64);
        let read_err = |e| Error::Stream {
            what: "read payload lines".into(),
            source: e,
        };
        let mut report = |done: Vec<Instance>| -> Result<()> {
            for inst in &done {
                each(inst)?;
                added += 1;
            }
            Ok(())
        };
        while !input.fill_buf().await.map_err(read_err)?.is_empty() {
            let line = Line {
                inner: &mut input,
                held_cr: false,
                done: false,
            };
            let job: NewJob = self.stage(line).await?;
            if job.info.size > 0 {
                report(bulk.push_staged(job).await?)?;
            }
        }
        report(bulk.finish().await?)?;
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    /// Splits `input` with [`Line`], reading through a buffer of `cap` bytes.
    async fn split(input: &[u8], cap: usize) -> Vec<Vec<u8>> {
        let mut r = BufReader::with_capacity(cap, input);
        let mut out = Vec::new();
        while !r.fill_buf().await.unwrap().is_empty() {
            let mut line = Vec::new();
            let mut l = Line {
                inner: &mut r,
                held_cr: false,
                done: false,
            };
            l.read_to_end(&mut line).await.unwrap();
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn lines_split_as_read_until_does_whatever_the_buffer_size() {
        let input = b"a\r\nbb\n\n\rc\r\rd\r\n\r\nlast\r";
        let want: Vec<&[u8]> = vec![b"a", b"bb", b"", b"\rc\r\rd", b"", b"last"];
        for cap in [1, 2, 3, 5, 64] {
            assert_eq!(split(input, cap).await, want, "buffer of {cap}");
        }
        assert_eq!(split(b"no newline", 4).await, vec![b"no newline".to_vec()]);
        assert!(split(b"", 4).await.is_empty());
    }
}
