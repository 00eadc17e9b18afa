//! A reader adapter that lets a small inspector see every byte as it passes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::error::{Error, Result};

/// Reads up to [`crate::INLINE_MAX`]` + 1` bytes of `reader`: all of it if it fits
/// inline (the caller keeps it in the queue), else the head of a longer stream (the
/// caller chains it before the rest). A read error is [`Error::Stream`] on `what`.
pub(crate) async fn read_inline_head(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    what: &str,
) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    reader
        .take(crate::INLINE_MAX as u64 + 1)
        .read_to_end(&mut head)
        .await
        .map_err(|e| Error::Stream {
            what: what.into(),
            source: e,
        })?;
    Ok(head)
}

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

/// A switch that ends streams early: once thrown, every [`CutReader`] made from it
/// reports the end of its stream, and [`Cut::wait`] returns.
#[derive(Clone, Default)]
pub(crate) struct Cut(std::sync::Arc<CutInner>);

#[derive(Default)]
struct CutInner {
    cut: std::sync::atomic::AtomicBool,
    wakers: std::sync::Mutex<Vec<std::task::Waker>>,
    notify: tokio::sync::Notify,
}

impl Cut {
    /// Throws the switch (idempotent).
    pub(crate) fn cut(&self) {
        self.0.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(mut w) = self.0.wakers.lock() {
            for waker in w.drain(..) {
                waker.wake();
            }
        }
        self.0.notify.notify_waiters();
    }

    fn is_cut(&self) -> bool {
        self.0.cut.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns once the switch is thrown.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.is_cut() {
                return;
            }
            notified.await;
        }
    }

    fn register(&self, waker: &std::task::Waker) {
        if let Ok(mut w) = self.0.wakers.lock() {
            w.retain(|x| !x.will_wake(waker));
            w.push(waker.clone());
        }
    }
}

/// Passes `inner` through until its [`Cut`] is thrown, then reports end of stream.
pub(crate) struct CutReader<R> {
    inner: R,
    cut: Cut,
}

impl<R> CutReader<R> {
    pub(crate) fn new(inner: R, cut: Cut) -> Self {
        CutReader { inner, cut }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for CutReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.cut.register(cx.waker());
        if this.cut.is_cut() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

/// Whether [`blocking`] may run its work on the calling thread (see
/// [`crate::set_inline_blocking`]).
static INLINE_BLOCKING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// See [`crate::set_inline_blocking`].
pub(crate) fn set_inline_blocking(on: bool) {
    INLINE_BLOCKING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether blocking work runs on the calling thread. On a current-thread runtime only
/// when asked (its one thread runs every task). On a multi-thread runtime only when
/// the caller is not one of its tasks (`in_task`): then it is the thread in
/// `block_on` (the body of `#[tokio::main]`), which is none of the runtime's workers,
/// so blocking it stalls no other task, only the future it drives, which is waiting
/// for this work anyway. A task's work goes to the blocking pool, so that it never
/// stalls a worker thread.
fn runs_inline(asked: bool, flavor: &tokio::runtime::RuntimeFlavor, in_task: bool) -> bool {
    match flavor {
        tokio::runtime::RuntimeFlavor::CurrentThread => asked,
        tokio::runtime::RuntimeFlavor::MultiThread => !in_task,
        _ => false,
    }
}

/// Runs blocking `f` off the async threads, on tokio's blocking pool; or right here
/// when that stalls no other task (see [`runs_inline`]): a caller in `block_on` of a
/// multi-thread runtime, or on a current-thread runtime when
/// [`crate::set_inline_blocking`] asked for it. Handing work to the pool and back
/// costs two thread wake-ups: on virtual CPUs about 35 µs in all, measured as a fifth
/// of a durable one-job add (`docs/performance.md`).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> crate::Result<T> {
    let flavor = tokio::runtime::Handle::current().runtime_flavor();
    if runs_inline(
        INLINE_BLOCKING.load(std::sync::atomic::Ordering::Relaxed),
        &flavor,
        tokio::task::try_id().is_some(),
    ) {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| crate::Error::Task(e.to_string()))
}

#[cfg(test)]
mod blocking_tests {
    use super::*;
    use tokio::runtime::RuntimeFlavor;

    #[test]
    fn blocking_work_runs_inline_when_asked_on_a_current_thread_runtime_or_outside_a_task() {
        for in_task in [false, true] {
            assert!(runs_inline(true, &RuntimeFlavor::CurrentThread, in_task));
            assert!(!runs_inline(false, &RuntimeFlavor::CurrentThread, in_task));
        }
        for asked in [false, true] {
            assert!(!runs_inline(asked, &RuntimeFlavor::MultiThread, true));
            assert!(runs_inline(asked, &RuntimeFlavor::MultiThread, false));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn on_a_multi_thread_runtime_a_tasks_blocking_work_leaves_the_async_thread() {
        let (here, there) = tokio::spawn(async {
            let here = std::thread::current().id();
            (
                here,
                blocking(|| std::thread::current().id()).await.unwrap(),
            )
        })
        .await
        .unwrap();
        assert_ne!(here, there);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn on_a_multi_thread_runtime_block_on_runs_blocking_work_in_place() {
        let here = std::thread::current().id();
        let there = blocking(|| std::thread::current().id()).await.unwrap();
        assert_eq!(here, there);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn on_a_current_thread_runtime_blocking_work_leaves_unless_asked() {
        // INLINE_BLOCKING is off in this test binary: nothing here turns it on.
        let here = std::thread::current().id();
        let there = blocking(|| std::thread::current().id()).await.unwrap();
        assert_ne!(here, there);
    }
}
