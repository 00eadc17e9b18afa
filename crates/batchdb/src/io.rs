//! A reader adapter that lets a small inspector see every byte as it passes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Sees the bytes of a stream as they pass through an [`Inspect`] reader.
pub(crate) trait Inspector {
    /// Called with every chunk read.
    fn chunk(&mut self, bytes: &[u8]);
    /// Called once at the end of the stream; an error here becomes the stream's.
    fn end(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes `inner` through unchanged, showing every chunk to `inspector`.
pub(crate) struct Inspect<R, I> {
    inner: R,
    inspector: I,
    ended: bool,
}

impl<R, I> Inspect<R, I> {
    pub(crate) fn new(inner: R, inspector: I) -> Self {
        Inspect {
            inner,
            inspector,
            ended: false,
        }
    }
}

impl<R: AsyncRead + Unpin, I: Inspector + Unpin> AsyncRead for Inspect<R, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if !new.is_empty() {
                    this.inspector.chunk(new);
                } else if !this.ended && buf.remaining() > 0 {
                    this.ended = true;
                    return Poll::Ready(this.inspector.end());
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}
