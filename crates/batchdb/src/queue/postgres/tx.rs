//! One transaction: the events it appends at commit, and `in_tx!`,
//! which runs a body in a transaction and retries it on a serialization failure.

use super::*;
use crate::queue::sql::NewEvent;

/// The buffered events of a transaction appended at its end: the `event` counter
/// advanced by `$1` (its row lock held until commit), the events numbered after it in
/// order, and the change announced (`$8`, the channel).
const APPEND_EVENTS: &str = "WITH c AS (UPDATE counters SET value = value + $1
                          WHERE name = 'event' RETURNING value),
          note AS (SELECT pg_notify($8, ''))
     INSERT INTO events(id, time, kind, job, created, instance, data)
     SELECT c.value - $1 + u.ord, u.time, u.kind, u.job, u.created, u.instance, u.data
     FROM c, note, UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[],
                          $7::TEXT[]) WITH ORDINALITY AS u(time, kind, job, created, instance,
                                                           data, ord)";

/// A write transaction: statements are prepared once per connection and cached;
/// events are buffered and numbered at commit.
pub(super) struct Tx<'a> {
    pub(super) raw: deadpool_postgres::Transaction<'a>,
    pub(super) events: Vec<NewEvent>,
    pub(super) changed: bool,
    /// The database server's clock at the start of the transaction (epoch ms).
    pub(super) now: i64,
}

impl Tx<'_> {
    /// Makes this transaction's commit return without waiting for the WAL flush
    /// (`synchronous_commit` is read at commit): a crash of the database server may
    /// undo it, and a later durable commit flushes it along with its own.
    pub(super) async fn lazy(&self) -> TxResult<()> {
        self.raw
            .batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        Ok(())
    }

    /// Numbers and appends the buffered events, announces the change, and commits.
    /// Returns whether anything changed.
    pub(super) async fn commit(self) -> TxResult<bool> {
        let Tx {
            raw: tx,
            events,
            changed,
            ..
        } = self;
        if !events.is_empty() {
            let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
            let times: Vec<i64> = events.iter().map(|e| e.time).collect();
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            let jobs: Vec<String> = events.iter().map(|e| e.job.to_hex()).collect();
            let created: Vec<Option<i64>> = events.iter().map(|e| e.inst.map(|i| i.1)).collect();
            let inst: Vec<Option<i64>> = events.iter().map(|e| e.inst.map(|i| i.0)).collect();
            let data: Vec<Option<String>> = events
                .iter()
                .map(|e| (!e.data.is_null()).then(|| e.data.to_string()))
                .collect();
            // One round trip: the counter taken last and held until commit (ids are
            // handed out in commit order), the events numbered after it, the change
            // announced.
            let stmt = tx.prepare_cached(APPEND_EVENTS).await?;
            tx.execute(
                &stmt,
                &[&n, &times, &kinds, &jobs, &created, &inst, &data, &CHANNEL],
            )
            .await?;
        } else if changed {
            let stmt = tx.prepare_cached("SELECT pg_notify($1, '')").await?;
            tx.execute(&stmt, &[&CHANNEL]).await?;
        }
        tx.commit().await?;
        Ok(changed)
    }
}

/// Runs `$body` (a block evaluating to `TxResult<T>`, in which `$tx: &mut Tx` is in
/// scope and `return` leaves the block) in a transaction and commits it; retries the
/// whole transaction on a serialization failure or a deadlock. With `lazy`, the
/// commit does not wait for the WAL flush (a crash of the database server may undo
/// it; used for heartbeats, whose loss only shortens a lease).
macro_rules! in_tx {
    ($self:expr, lazy = $lazy:expr, |$tx:ident| $body:block) => {{
        let this = $self;
        let mut tries = 0u32;
        loop {
            let r: TxResult<_> = async {
                let mut client = this.client().await?;
                let raw = client.transaction().await?;
                if $lazy {
                    raw.batch_execute("SET LOCAL synchronous_commit = off")
                        .await?;
                }
                let now: i64 = raw
                    .query_one(
                        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
                        &[],
                    )
                    .await?
                    .try_get(0)?;
                let mut tx_ = Tx {
                    raw,
                    events: Vec::new(),
                    changed: false,
                    now,
                };
                let out = {
                    let $tx = &mut tx_;
                    typed(async move { $body }).await
                }?;
                let changed = tx_.commit().await?;
                Ok((out, changed))
            }
            .await;
            match r {
                Ok((out, changed)) => {
                    if changed {
                        this.inner.changes.bump();
                    }
                    break Ok(out);
                }
                Err(TxError::Db(e)) if tries < 8 && retryable(&e) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(
                        fastrand::u64(1..=20) * u64::from(tries),
                    ))
                    .await;
                }
                Err(e) => break Err(this.err(e)),
            }
        }
    }};
    ($self:expr, |$tx:ident| $body:block) => {
        in_tx!($self, lazy = false, |$tx| $body)
    };
}

/// Gives a transaction body's async block its output type (so `?` inside it knows
/// what to convert into).
pub(super) fn typed<T>(
    f: impl std::future::Future<Output = TxResult<T>>,
) -> impl std::future::Future<Output = TxResult<T>> {
    f
}

pub(super) fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}
