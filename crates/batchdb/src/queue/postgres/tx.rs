//! One transaction: the events it appends at commit, and `in_tx!`,
//! which runs a body in a transaction and retries it on a serialization failure.

use super::*;
use crate::queue::sql::{Arg, Conn, NewEvent, Sql};
use tokio_postgres::Statement;

/// The buffered events of a transaction appended at its end: the `event` counter
/// advanced by `$1` (its row lock held until commit), the events numbered after it in
/// order, and the change announced (`$8`, the channel); with `$9`, the commit made
/// lazy ([`LAZY`]).
const APPEND_EVENTS: &str = "WITH c AS (UPDATE counters SET value = value + $1
                          WHERE name = 'event' RETURNING value),
          note AS (SELECT pg_notify($8, '')),
          lazy AS (SELECT set_config('synchronous_commit',
                     CASE WHEN $9 THEN 'off' ELSE current_setting('synchronous_commit') END,
                     true))
     INSERT INTO events(id, time, kind, job, created, instance, data)
     SELECT c.value - $1 + u.ord, u.time, u.kind, u.job, u.created, u.instance, u.data
     FROM c, note, lazy, UNNEST($2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[],
                          $7::TEXT[]) WITH ORDINALITY AS u(time, kind, job, created, instance,
                                                           data, ord)";

/// The end of a transaction that appends no events: the change announced on channel
/// `$1` if `$2`, the commit made lazy ([`LAZY`]) if `$3`.
const END_MARKS: &str = "SELECT CASE WHEN $2 THEN pg_notify($1, '') END,
       set_config('synchronous_commit',
                  CASE WHEN $3 THEN 'off' ELSE current_setting('synchronous_commit') END,
                  true)";

/// Makes the commit of the transaction it runs in return without waiting for the WAL
/// flush: `SET LOCAL synchronous_commit = off` as an expression, so that it rides
/// along with a statement the transaction sends anyway.
const LAZY: &str = "set_config('synchronous_commit', 'off', true)";

/// The database server's clock (epoch ms), read at the start of a transaction.
const NOW: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";

/// A write transaction on a pooled connection it owns: statements are prepared once
/// per connection and cached; events are buffered and numbered at commit.
///
/// It is begun and ended by hand so that `BEGIN` rides with the first statement and
/// `COMMIT` with the last, pipelined: one round trip each instead of two. A
/// transaction dropped before it ended (its future cancelled) takes its connection
/// out of the pool and closes it, so the server rolls it back and no later user of
/// the pool ever finds a transaction open.
pub(super) struct Tx {
    client: Option<deadpool_postgres::Object>,
    pub(super) events: Vec<NewEvent>,
    pub(super) changed: bool,
    /// The database server's clock at the start of the transaction (epoch ms).
    pub(super) now: i64,
    /// Whether the commit is to be lazy and is not yet (see [`Tx::lazy`]).
    lazy: bool,
    /// Statements held to be sent ahead of the next one, or of the commit
    /// ([`Conn::execute_later`]).
    pub(super) held: Vec<(&'static Sql, Vec<Arg<'static>>)>,
    /// For a transaction begun by [`begin_deferred`]: the read of the server's clock,
    /// sent with `BEGIN` ahead of the first statement.
    pub(super) deferred: Option<Statement>,
}

/// Starts a transaction on `client`, reading the server's clock in the same round
/// trip; with `lazy`, its commit will not wait for the WAL flush (see [`Tx::lazy`]),
/// set with that read.
pub(super) async fn begin(client: deadpool_postgres::Object, lazy: bool) -> TxResult<Tx> {
    let mut tx = begin_deferred(client, lazy).await?;
    tx.begun().await?;
    Ok(tx)
}

/// A transaction on `client` that sends nothing yet: `BEGIN` and the read of the
/// server's clock (with `lazy`, also the setting that makes its commit lazy) go out
/// with its first statement, in that statement's round trip (the first must be a
/// statement, not [`sql::Tx::now`]).
pub(super) async fn begin_deferred(client: deadpool_postgres::Object, lazy: bool) -> TxResult<Tx> {
    let sql = if lazy {
        format!("SELECT {NOW}, {LAZY}")
    } else {
        format!("SELECT {NOW}")
    };
    // Prepared outside the transaction (once per connection): a prepared statement
    // outlives transactions.
    let clock = client.prepare_cached(&sql).await?;
    Ok(Tx {
        client: Some(client),
        events: Vec::new(),
        changed: false,
        now: 0,
        lazy: false,
        held: Vec::new(),
        deferred: Some(clock),
    })
}

/// `BEGIN` and the read of the server's clock on `c`; both requests go out when the
/// future is first polled, in this order, before either answer is read.
pub(super) async fn begin_on(c: &deadpool_postgres::Object, clock: &Statement) -> TxResult<i64> {
    let ((), row) = tokio::try_join!(c.batch_execute("BEGIN"), c.query_one(clock, &[]))?;
    Ok(row.try_get(0)?)
}

impl Tx {
    /// Sends `BEGIN` and reads the server's clock, if a deferred begin has not yet.
    pub(super) async fn begun(&mut self) -> TxResult<()> {
        if let Some(clock) = self.deferred.take() {
            self.now = begin_on(self.conn(), &clock).await?;
        }
        Ok(())
    }

    /// The connection the transaction runs on.
    pub(super) fn conn(&self) -> &deadpool_postgres::Object {
        // Present from `begin` until `commit` or `rollback` consume the transaction.
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("a transaction's connection is held until it ends"))
    }

    /// Begins (see [`begin_deferred`]) and sends the held statements (see
    /// [`Conn::execute_later`]), if any.
    pub(super) async fn send_held(&mut self) -> TxResult<()> {
        self.begun().await?;
        if !self.held.is_empty() {
            self.execute_all(&[]).await?;
        }
        Ok(())
    }

    /// Makes this transaction's commit return without waiting for the WAL flush
    /// (`synchronous_commit` is read at commit): a crash of the database server may
    /// undo it, and a later durable commit flushes it along with its own. Sent with
    /// the statement that ends the transaction, not in a round trip of its own.
    pub(super) fn lazy(&mut self) {
        self.lazy = true;
    }

    /// Sends the held statements, numbers and appends the buffered events, announces
    /// the change, and commits, in one round trip. Returns whether anything changed.
    pub(super) async fn commit(mut self) -> TxResult<bool> {
        if self.deferred.is_some() && self.held.is_empty() && self.events.is_empty() {
            // Never begun: nothing to commit.
            self.client.take();
            return Ok(false);
        }
        self.begun().await?;
        let events = std::mem::take(&mut self.events);
        let held = std::mem::take(&mut self.held);
        let (changed, lazy) = (self.changed, self.lazy);
        let c = self.conn();
        // Prepared before anything is sent: each request goes out when its future is
        // first polled, and the held statements must go out first.
        let mut prepared = Vec::with_capacity(held.len());
        for (sql, args) in &held {
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
            prepared.push((c.prepare_cached(sql.postgres()).await?, params));
        }
        let held = futures_util::future::try_join_all(
            prepared
                .iter()
                .map(|(stmt, params)| c.execute(stmt, params)),
        );
        // A statement that fails aborts the transaction, and the COMMIT after it then
        // rolls back: either way the connection leaves the transaction.
        if !events.is_empty() {
            let n = i64::try_from(events.len()).unwrap_or(i64::MAX);
            let times: Vec<i64> = events.iter().map(|e| e.time).collect();
            let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
            let jobs: Vec<String> = events.iter().map(|e| e.job.to_hex()).collect();
            let created: Vec<Option<i64>> = events.iter().map(|e| e.inst.map(|i| i.1)).collect();
            let inst: Vec<Option<i64>> = events.iter().map(|e| e.inst.map(|i| i.0)).collect();
            let data: Vec<Option<&str>> = events.iter().map(|e| e.data.as_deref()).collect();
            // The counter taken last and held until commit (ids are handed out in
            // commit order), the events numbered after it, the change announced.
            let stmt = c.prepare_cached(APPEND_EVENTS).await?;
            let args: [&(dyn ToSql + Sync); 9] = [
                &n, &times, &kinds, &jobs, &created, &inst, &data, &CHANNEL, &lazy,
            ];
            tokio::try_join!(held, c.execute(&stmt, &args), c.batch_execute("COMMIT"))?;
        } else if changed || lazy {
            let stmt = c.prepare_cached(END_MARKS).await?;
            let args: [&(dyn ToSql + Sync); 3] = [&CHANNEL, &changed, &lazy];
            tokio::try_join!(held, c.execute(&stmt, &args), c.batch_execute("COMMIT"))?;
        } else {
            tokio::try_join!(held, c.batch_execute("COMMIT"))?;
        }
        self.client.take();
        Ok(changed)
    }

    /// Rolls the transaction back (after an error in its body); a connection that
    /// cannot even do that is closed instead of going back to the pool.
    pub(super) async fn rollback(mut self) {
        if self.deferred.is_some() {
            // Never begun: nothing to roll back.
            self.client.take();
            return;
        }
        if self.conn().batch_execute("ROLLBACK").await.is_ok() {
            self.client.take();
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if self.deferred.is_some() {
            // Never begun: the connection goes back to the pool as it came.
            return;
        }
        if let Some(c) = self.client.take() {
            // Not ended: out of the pool, and closed (the server rolls it back).
            drop(deadpool_postgres::Object::take(c));
        }
    }
}

/// Runs `$body` (a block evaluating to `TxResult<T>`, in which `$tx: &mut Tx` is in
/// scope and `return` leaves the block) in a transaction and commits it; retries the
/// whole transaction on a serialization failure or a deadlock. With `lazy`, the
/// commit does not wait for the WAL flush (a crash of the database server may undo
/// it; used for heartbeats, whose loss only shortens a lease). With `deferred`, the
/// transaction is begun by [`begin_deferred`]: its `BEGIN` rides with its first
/// statement, which must come before any use of its clock.
macro_rules! in_tx {
    ($self:expr, lazy = $lazy:expr, |$tx:ident| $body:block) => {
        in_tx!(@run $self, |c| begin(c, $lazy), |$tx| $body)
    };
    (@run $self:expr, $begin:expr, |$tx:ident| $body:block) => {{
        let this = $self;
        let mut tries = 0u32;
        loop {
            let r: TxResult<_> = async {
                let client = this.client().await?;
                let mut tx_ = ($begin)(client).await?;
                let out = {
                    let $tx = &mut tx_;
                    typed(async move { $body }).await
                };
                match out {
                    Ok(out) => Ok((out, tx_.commit().await?)),
                    Err(e) => {
                        tx_.rollback().await;
                        Err(e)
                    }
                }
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
    ($self:expr, deferred, |$tx:ident| $body:block) => {
        in_tx!(@run $self, |c| begin_deferred(c, false), |$tx| $body)
    };
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
