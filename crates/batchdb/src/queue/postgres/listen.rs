//! The `LISTEN` connection that wakes this process's waiters on every change.

use super::*;

impl PgQueue {
    /// Starts (once) the task that keeps a `LISTEN` connection open and wakes waiters.
    pub(super) fn start_listener(&self) {
        if self.inner.listening.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let config = self.inner.config.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let location = match weak.upgrade() {
                    Some(inner) => inner.location.clone(),
                    None => return,
                };
                let began = std::time::Instant::now();
                let r = listen_once(&config, &weak).await;
                if began.elapsed() > Duration::from_secs(30) {
                    // A session that lasted is a fresh start for the backoff.
                    failures = 0;
                }
                match r {
                    Ok(()) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        let wait = Duration::from_millis(100)
                            .saturating_mul(1 << failures.min(7))
                            .min(Duration::from_secs(10));
                        tracing::warn!(
                            "postgres {location}: change listener lost ({e}); reconnecting in {wait:?}"
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
                // Whatever happened while not listening: make waiters look again.
                match weak.upgrade() {
                    Some(inner) => inner.changes.bump(),
                    None => return,
                }
            }
        });
    }
}

/// One `LISTEN` session: connects, listens, wakes waiters on each notification, and
/// returns when the connection ends (an error) or the queue is dropped (`Ok`).
async fn listen_once(
    config: &tokio_postgres::Config,
    weak: &Weak<Inner>,
) -> std::result::Result<(), tokio_postgres::Error> {
    let (client, mut conn) = config.connect(NoTls).await?;
    let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    let (ended_tx, mut ended_rx) = tokio::sync::oneshot::channel();
    let w = weak.clone();
    let driver = tokio::spawn(async move {
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(_)) => match w.upgrade() {
                    Some(inner) => inner.changes.bump(),
                    None => return Ok(()),
                },
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        let _ = ended_tx.send(());
        Ok(())
    });
    client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
    if let Some(inner) = weak.upgrade() {
        inner.changes.bump();
    }
    // Keep the client alive while the connection lives and the queue exists.
    loop {
        tokio::select! {
            _ = &mut ended_rx => break,
            () = tokio::time::sleep(Duration::from_secs(5)) => {
                if weak.strong_count() == 0 {
                    driver.abort();
                    return Ok(());
                }
            }
        }
    }
    drop(client);
    match driver.await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}
