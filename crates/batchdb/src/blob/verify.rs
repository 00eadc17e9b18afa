use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::error::Error;
use crate::hash::{Hash, Hasher};

/// Wraps a reader of a blob and checks, as the bytes pass, that they hash to the
/// blob's name. At the end of the stream a mismatch becomes an
/// [`io::ErrorKind::InvalidData`] error carrying [`Error::BlobCorrupt`], so a reader
/// of a corrupt blob never sees a clean end of stream.
pub struct VerifyingReader<R> {
    inner: R,
    expected: Hash,
    hasher: Option<Hasher>,
}

impl<R> VerifyingReader<R> {
    /// Checks `inner` against `expected`.
    pub fn new(inner: R, expected: Hash) -> Self {
        VerifyingReader {
            inner,
            expected,
            hasher: Some(Hasher::new()),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for VerifyingReader<R> {
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
                    if let Some(h) = this.hasher.as_mut() {
                        h.update(new);
                    }
                    return Poll::Ready(Ok(()));
                }
                // End of stream: check the digest once.
                if let Some(h) = this.hasher.take() {
                    let actual = h.finish();
                    if actual != this.expected {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            Error::BlobCorrupt {
                                hash: this.expected,
                                actual,
                            },
                        )));
                    }
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}
