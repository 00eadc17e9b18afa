//! Group commit: writes that arrive while another commits share the next
//! transaction and its one fsync, each in a savepoint of its own.

use super::watch::wal_path;
use super::*;

/// Hands a write's result to its caller once the commit's outcome is known.
pub(super) type Deliver = Box<dyn FnOnce(std::result::Result<(), &rusqlite::Error>) + Send>;

/// One write waiting for a group commit: run inside the shared transaction, it says
/// whether it needs an fsync and how to deliver its result.
pub(super) struct Queued {
    sync: Sync,
    /// Runs the write in the shared transaction (`None`: there is none, the batch
    /// failed to begin; the write only gets ready to report that).
    /// With `alone`, it is the batch's only write and runs without a savepoint.
    run: RunWrite,
}

/// See [`Queued::run`].
pub(super) type RunWrite = Box<dyn FnOnce(Option<&Transaction<'_>>, bool) -> Ran + Send>;

/// What running a queued write left to do.
pub(super) struct Ran {
    /// It succeeded (a failed write alone in its batch rolls the batch back).
    ok: bool,
    /// A savepoint statement around it failed: the batch cannot commit.
    broken: bool,
    /// It needs an fsync at commit even if lazy.
    must_sync: bool,
    deliver: Deliver,
}

/// At most this many writes share one commit (bounds the others' wait).
pub(super) const GROUP_MAX: usize = 64;

/// The same SQLite error again (one failed commit fails every write it held).
pub(super) fn copy_sql_error(e: &rusqlite::Error) -> rusqlite::Error {
    match e {
        rusqlite::Error::SqliteFailure(code, msg) => {
            rusqlite::Error::SqliteFailure(*code, msg.clone())
        }
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

impl Inner {
    /// Commits whatever writes are queued (none if another thread already did) in one
    /// transaction and delivers their results (before the connection is released, so
    /// a caller that gets the connection next finds its write answered).
    fn commit_queued(&self) -> Result<()> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| Error::Task("sqlite connection lock poisoned".into()))?;
        let batch: Vec<Queued> = {
            let mut q = self
                .queued
                .lock()
                .map_err(|_| Error::Task("sqlite write queue lock poisoned".into()))?;
            let n = q.len().min(GROUP_MAX);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return Ok(());
        }
        let lazy = batch.iter().all(|w| w.sync == Sync::Lazy);
        let before = conn.total_changes();
        let mut delivers = Vec::with_capacity(batch.len());
        let mut must_sync = false;
        let mut unrun = Some(batch);
        let committed = (|| -> rusqlite::Result<()> {
            // Set for every batch (a cached statement: no parse), so a failed reset
            // after a lazy batch can never leave a durable one at NORMAL.
            conn.prepare_cached(if lazy {
                "PRAGMA synchronous=NORMAL"
            } else {
                "PRAGMA synchronous=FULL"
            })?
            .execute([])?;
            let result = (|| {
                let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                let mut writes = unrun.take().unwrap_or_default().into_iter();
                let alone = writes.len() == 1;
                let mut all_ok = true;
                while let Some(w) = writes.next() {
                    let ran = (w.run)(Some(&tx), alone);
                    must_sync |= ran.must_sync;
                    all_ok &= ran.ok;
                    delivers.push(ran.deliver);
                    if ran.broken || tx.is_autocommit() {
                        // A savepoint statement failed, or SQLite rolled the whole
                        // transaction back itself (I/O error, full disk): nothing of
                        // this batch may commit; the writes not yet run fail unrun.
                        unrun = Some(writes.collect());
                        return Err(rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ABORT),
                            Some("a write of this group commit failed mid-transaction; all rolled back".into()),
                        ));
                    }
                }
                if alone && !all_ok {
                    // Dropping the transaction rolls it back.
                    return Ok(());
                }
                tx.commit()
            })();
            if lazy {
                conn.prepare_cached("PRAGMA synchronous=FULL")?
                    .execute([])?;
            }
            result
        })();
        let outcome = match committed {
            Ok(()) if lazy && must_sync => {
                // What FULL would have done at commit: fsync the WAL.
                let wal = wal_path(&self.path);
                std::fs::File::open(&wal)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| {
                        rusqlite::Error::SqliteFailure(
                            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                            Some(format!("fsync {}: {e}", wal.display())),
                        )
                    })
            }
            other => other,
        };
        // Writes that never ran (the batch could not begin, or broke): each reports
        // the error.
        for w in unrun.into_iter().flatten() {
            delivers.push((w.run)(None, true).deliver);
        }
        // Only a commit that wrote something is news (an empty claim is not).
        if outcome.is_ok() && conn.total_changes() != before {
            self.changes.bump();
        }
        match &outcome {
            Ok(()) => delivers.into_iter().for_each(|d| d(Ok(()))),
            Err(e) => delivers.into_iter().for_each(|d| d(Err(e))),
        }
        drop(conn);
        Ok(())
    }
}

/// How a write transaction commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sync {
    /// Fsynced before the call returns.
    Full,
    /// Safe against a process crash, not against a power failure (unless the
    /// transaction asks for it).
    Lazy,
}

impl SqliteQueue {
    /// Runs `f` in an immediate (write) transaction, commits durably
    /// (`synchronous=FULL`: the WAL is fsynced), and wakes local waiters.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> TxResult<T> + Send + 'static,
    ) -> Result<T> {
        self.write_with(Sync::Full, move |tx| Ok((f(tx)?, false)))
            .await
    }

    /// Like [`write`](Self::write), but with `Sync::Lazy` the commit is not fsynced
    /// unless `f` says so: a process crash still loses nothing (the WAL is in the page
    /// cache), but a power failure may roll the transaction back. Claims and
    /// heartbeats use it: losing one only means the instance runs again.
    ///
    /// Group commit: writes that arrive while another is committing wait, then commit
    /// together in one transaction (each in a savepoint of its own, so one that fails
    /// undoes only itself) with one fsync. No call returns before the commit that
    /// holds its write, with its durability, is done.
    pub(super) async fn write_with<T: Send + 'static>(
        &self,
        sync: Sync,
        f: impl FnOnce(&Transaction<'_>) -> TxResult<(T, bool)> + Send + 'static,
    ) -> Result<T> {
        let (send, recv) = tokio::sync::oneshot::channel::<TxResult<T>>();
        let run = Box::new(move |tx: Option<&Transaction<'_>>, alone: bool| {
            let ran = tx.map(|tx| {
                (|| -> rusqlite::Result<TxResult<(T, bool)>> {
                    if alone {
                        // The batch's only write: a failure rolls the whole
                        // transaction back, no savepoint needed.
                        return Ok(f(tx));
                    }
                    tx.prepare_cached("SAVEPOINT batchdb_write")?.execute([])?;
                    let r = f(tx);
                    if r.is_err() {
                        tx.prepare_cached("ROLLBACK TO batchdb_write")?
                            .execute([])?;
                    }
                    tx.prepare_cached("RELEASE batchdb_write")?.execute([])?;
                    Ok(r)
                })()
            });
            let ok = matches!(ran, Some(Ok(Ok(_))));
            let broken = matches!(ran, Some(Err(_)));
            let must_sync = matches!(ran, Some(Ok(Ok((_, true)))));
            let deliver: Deliver = Box::new(move |commit| {
                let out = match (ran, commit) {
                    (Some(Ok(Err(e))), _) => Err(e),
                    (Some(Err(e)), _) => Err(TxError::Db(e)),
                    (_, Err(e)) => Err(TxError::Db(copy_sql_error(e))),
                    (Some(Ok(Ok((t, _)))), Ok(())) => Ok(t),
                    (None, Ok(())) => Err(TxError::Domain(Error::Task(
                        "sqlite write skipped by its group commit".into(),
                    ))),
                };
                let _ = send.send(out);
            });
            Ran {
                ok,
                broken,
                must_sync,
                deliver,
            }
        });
        self.inner
            .queued
            .lock()
            .map_err(|_| Error::Task("sqlite write queue lock poisoned".into()))?
            .push(Queued { sync, run });
        // Commit what is queued until this write is answered: usually the first round
        // (this write, alone or with others), or another thread's batch took it.
        let mut recv = recv;
        let out = loop {
            let inner = self.inner.clone();
            crate::io::blocking(move || inner.commit_queued()).await??;
            match recv.try_recv() {
                Ok(out) => break out,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Err(Error::Task("sqlite write dropped before its commit".into()));
                }
            }
        };
        out.map_err(|e| on(e, &self.inner.path))
    }
}
