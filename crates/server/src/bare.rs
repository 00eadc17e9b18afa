//! The answers the HTTP parser writes by itself — 400, 414 or 431 with an empty body,
//! for a request it could not parse, before any route runs — given the JSON error
//! body every other error has.
//!
//! [`JsonParseErrors`] wraps a connection's stream. A write that is exactly such an
//! answer (a 400/414/431 head with `content-length: 0` and nothing after it: every
//! error the routes send has a body) is replaced by the same head with the JSON body;
//! every other byte passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose parser-made error answers carry the JSON error body.
pub(crate) struct JsonParseErrors<S> {
    inner: S,
    /// Bytes of a rewritten answer not yet written.
    pending: Vec<u8>,
}

impl<S> JsonParseErrors<S> {
    pub(crate) fn new(inner: S) -> Self {
        JsonParseErrors {
            inner,
            pending: Vec::new(),
        }
    }
}

/// The JSON-bodied replacement of `buf`, if `buf` is one of the parser's own answers.
fn rewrite(buf: &[u8]) -> Option<Vec<u8>> {
    let msg = match buf.get(..13)? {
        b"HTTP/1.1 400 " => "malformed request",
        b"HTTP/1.1 414 " => "request target too long",
        b"HTTP/1.1 431 " => "request header fields too large",
        _ => return None,
    };
    let head = std::str::from_utf8(buf).ok()?;
    // The whole write is the head, ending the answer: no body follows.
    let head = head.strip_suffix("\r\n\r\n")?;
    if head.contains("\r\n\r\n") {
        return None;
    }
    let mut lines: Vec<&str> = head.split("\r\n").collect();
    let at = lines
        .iter()
        .position(|l| l.eq_ignore_ascii_case("content-length: 0"))?;
    let body = serde_json::json!({ "error": msg }).to_string();
    let length = format!("content-length: {}", body.len());
    lines[at] = &length;
    lines.push("content-type: application/json");
    Some(format!("{}\r\n\r\n{body}", lines.join("\r\n")).into_bytes())
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    /// Writes what is pending; ready once nothing is.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.pending.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        if let Some(answer) = rewrite(buf) {
            // Taken whole: what the stream does not take now goes with the flush.
            this.pending = answer;
            let _ = this.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(first) if first.starts_with(b"HTTP/1.1 4") => self.poll_write(cx, first),
            _ => {
                let this = &mut *self;
                if this.drain(cx)?.is_pending() {
                    return Poll::Pending;
                }
                Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_parsers_empty_error_answers_are_rewritten() {
        let bare =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let got = String::from_utf8(rewrite(bare).expect("rewritten")).unwrap();
        let (head, body) = got.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("content-type: application/json"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "request header fields too large");
        for keep in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 431 x\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 x\r\ncontent-length: 0\r\n\r\n{}",
            b"HTTP/1.1 400 x\r\ncontent-length: 0\r\n",
            b"some body bytes",
        ] {
            assert!(rewrite(keep).is_none(), "{}", String::from_utf8_lossy(keep));
        }
    }
}
