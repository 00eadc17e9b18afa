//! The PostgreSQL executor of the shared queue SQL ([`crate::queue::sql`]): statements
//! on a pooled connection or in a transaction, and what PostgreSQL does its own way —
//! claims with `FOR UPDATE SKIP LOCKED`, advisory locks on cache keys, `created` from a
//! counter row, events numbered at commit.

use bytes::BytesMut;
use deadpool_postgres::GenericClient;
use futures_util::TryStreamExt;
use tokio_postgres::Statement;
use tokio_postgres::types::{IsNull, Type};

use super::*;
use crate::queue::row::{Row as _, claim_cols};
use crate::queue::sql::{self, Arg, ClaimSql, Conn, NewEvent, Sql, args, top_priority};

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Arg<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        match self {
            Arg::Int(v) => v.to_sql(ty, out),
            Arg::Int32(v) => v.to_sql(ty, out),
            Arg::Bool(v) => v.to_sql(ty, out),
            Arg::Text(v) => v.as_deref().to_sql(ty, out),
            Arg::Bytes(v) => v.as_deref().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value, by the variant's own type (see `to_sql_checked`).
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> std::result::Result<IsNull, BoxError> {
        match self {
            Arg::Int(v) => v.to_sql_checked(ty, out),
            Arg::Int32(v) => v.to_sql_checked(ty, out),
            Arg::Bool(v) => v.to_sql_checked(ty, out),
            Arg::Text(v) => v.as_deref().to_sql_checked(ty, out),
            Arg::Bytes(v) => v.as_deref().to_sql_checked(ty, out),
        }
    }
}

impl crate::queue::row::Row for Row {
    type Error = TxError;

    fn int(&self, i: usize) -> TxResult<Option<i64>> {
        let ty = self
            .columns()
            .get(i)
            .map(|c| c.type_().clone())
            .ok_or_else(|| TxError::Corrupt(format!("no column {i}")))?;
        Ok(match ty {
            Type::INT4 => self.try_get::<_, Option<i32>>(i)?.map(i64::from),
            Type::INT2 => self.try_get::<_, Option<i16>>(i)?.map(i64::from),
            _ => self.try_get(i)?,
        })
    }

    fn flag(&self, i: usize) -> TxResult<bool> {
        Ok(self.try_get(i)?)
    }

    fn str(&self, i: usize) -> TxResult<Option<&str>> {
        Ok(self.try_get(i)?)
    }

    fn bytes(&self, i: usize) -> TxResult<Option<Vec<u8>>> {
        Ok(self.try_get(i)?)
    }

    fn corrupt(what: String) -> TxError {
        TxError::Corrupt(what)
    }
}

/// A pooled connection or a transaction running the shared SQL.
pub(super) struct Pg<'a, C>(pub(super) &'a C);

impl<C: GenericClient> Conn for Pg<'_, C> {
    type Error = TxError;
    type Row<'r> = Row;

    /// Row by row, as they arrive (`query_raw`): nothing is collected.
    async fn each(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Row) -> TxResult<()>,
    ) -> TxResult<()> {
        let stmt = self.0.prepare_cached(sql.postgres()).await?;
        let params = args.iter().map(|a| a as &(dyn ToSql + Sync));
        let rows = self.0.query_raw(&stmt, params).await?;
        futures_util::pin_mut!(rows);
        while let Some(r) = rows.try_next().await? {
            f(&r)?;
        }
        Ok(())
    }

    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> TxResult<u64> {
        let stmt = self.0.prepare_cached(sql.postgres()).await?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        Ok(self.0.execute(&stmt, &params).await?)
    }

    /// Pipelined: every statement is sent before the first answer is read (each
    /// request goes out when its future is first polled, and `try_join_all` polls
    /// them in order), so the batch costs one round trip once its statements are
    /// prepared on this connection.
    ///
    /// At most [`PIPELINE_MAX`] statements are in flight: a bulk add's hundred
    /// thousand rows cost a round trip per thousand, and memory for a thousand.
    async fn execute_all(&mut self, stmts: &[(&Sql, &[Arg<'_>])]) -> TxResult<Vec<u64>> {
        let mut counts = Vec::with_capacity(stmts.len());
        for window in stmts.chunks(PIPELINE_MAX) {
            let mut prepared = Vec::with_capacity(window.len());
            for (sql, args) in window {
                let stmt = self.0.prepare_cached(sql.postgres()).await?;
                let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
                prepared.push((stmt, params));
            }
            let client = self.0;
            let runs = prepared
                .iter()
                .map(|(stmt, params)| client.execute(stmt, params));
            counts.extend(futures_util::future::try_join_all(runs).await?);
        }
        Ok(counts)
    }
}

/// The most statements one pipeline sends before it reads their answers.
const PIPELINE_MAX: usize = 1024;

/// Every statement of a transaction first sends the statements held for later
/// ([`Conn::execute_later`]), so all run in the order they were given.
impl Conn for Tx {
    type Error = TxError;
    type Row<'r> = Row;

    async fn each(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        f: impl FnMut(&Row) -> TxResult<()>,
    ) -> TxResult<()> {
        self.send_held().await?;
        Pg(self.conn()).each(sql, args, f).await
    }

    /// A statement that changed rows marks the transaction as a change.
    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> TxResult<u64> {
        self.send_held().await?;
        let n = Pg(self.conn()).execute(sql, args).await?;
        if n > 0 {
            self.changed = true;
        }
        Ok(n)
    }

    /// Pipelined (see [`Pg`]'s), after the held statements in the same round trip;
    /// a statement that changed rows marks a change.
    async fn execute_all(&mut self, stmts: &[(&Sql, &[Arg<'_>])]) -> TxResult<Vec<u64>> {
        self.begun().await?;
        let held = std::mem::take(&mut self.held);
        let mut all: Vec<(&Sql, &[Arg<'_>])> = held.iter().map(|(s, a)| (*s, &a[..])).collect();
        all.extend_from_slice(stmts);
        let mut counts = Pg(self.conn()).execute_all(&all).await?;
        let counts = counts.split_off(held.len());
        if counts.iter().any(|&n| n > 0) {
            self.changed = true;
        }
        Ok(counts)
    }

    /// Both sent before either answer is read: one round trip (with `BEGIN` and the
    /// clock's read, for a deferred transaction's first statement).
    async fn rows_both<A, B>(
        &mut self,
        first: (&Sql, &[Arg<'_>]),
        fa: impl FnMut(&Row) -> TxResult<A>,
        second: (&Sql, &[Arg<'_>]),
        fb: impl FnMut(&Row) -> TxResult<B>,
    ) -> TxResult<(Vec<A>, Vec<B>)> {
        if self.held.is_empty()
            && let Some(clock) = self.deferred.take()
        {
            let c = self.conn();
            let (s1, s2) = prepare_two(c, first.0, second.0).await?;
            // Each request goes out when its future is first polled, in this order.
            let (now, out) = tokio::try_join!(
                super::tx::begin_on(c, &clock),
                read_two(c, (&s1, first.1, fa), (&s2, second.1, fb))
            )?;
            self.now = now;
            return Ok(out);
        }
        self.send_held().await?;
        let c = self.conn();
        let (s1, s2) = prepare_two(c, first.0, second.0).await?;
        read_two(c, (&s1, first.1, fa), (&s2, second.1, fb)).await
    }

    /// Held, and sent ahead of the transaction's next statement or its commit.
    async fn execute_later(&mut self, stmts: &[(&'static Sql, &[Arg<'_>])]) -> TxResult<()> {
        for (sql, args) in stmts {
            let args = args.iter().cloned().map(Arg::into_owned).collect();
            self.held.push((*sql, args));
        }
        self.changed = true;
        Ok(())
    }
}

/// What a claim statement runs under (see [`Tx::candidates`]), set for the
/// transaction and undone right after it.
const PIN_PLANS: &str =
    "SET LOCAL enable_sort = off; SET LOCAL plan_cache_mode = force_generic_plan";
/// Undoes [`PIN_PLANS`].
const UNPIN_PLANS: &str = "SET LOCAL enable_sort TO DEFAULT; SET LOCAL plan_cache_mode TO DEFAULT";

/// Runs settings `sql` (simple protocol). The request goes out when the future is
/// first polled.
async fn set(c: &deadpool_postgres::Object, sql: &str) -> TxResult<()> {
    Ok(c.batch_execute(sql).await?)
}

/// Two statements prepared on `c` (cached per connection).
async fn prepare_two(
    c: &deadpool_postgres::Object,
    first: &Sql,
    second: &Sql,
) -> TxResult<(Statement, Statement)> {
    Ok((
        c.prepare_cached(first.postgres()).await?,
        c.prepare_cached(second.postgres()).await?,
    ))
}

/// `reads` between [`PIN_PLANS`] and [`UNPIN_PLANS`], all in one round trip: every
/// request of `reads` must go out when it is first polled (its statements prepared
/// before), or the settings would be undone before it is sent.
async fn pinned<T>(
    c: &deadpool_postgres::Object,
    reads: impl Future<Output = TxResult<T>>,
) -> TxResult<T> {
    // Each request goes out when its future is first polled, in this order.
    let ((), out, ()) = tokio::try_join!(set(c, PIN_PLANS), reads, set(c, UNPIN_PLANS))?;
    Ok(out)
}

/// The rows of two prepared statements, each decoded by its own function; both
/// requests go out when the future is first polled, before either answer is read.
async fn read_two<A, B>(
    c: &deadpool_postgres::Object,
    (first, first_args, fa): (&Statement, &[Arg<'_>], impl FnMut(&Row) -> TxResult<A>),
    (second, second_args, fb): (&Statement, &[Arg<'_>], impl FnMut(&Row) -> TxResult<B>),
) -> TxResult<(Vec<A>, Vec<B>)> {
    tokio::try_join!(
        read_rows(c, first, first_args, fa),
        read_rows(c, second, second_args, fb)
    )
}

/// The rows of prepared statement `stmt` with `args`, each decoded by `f`. The
/// request goes out when the future is first polled.
async fn read_rows<U>(
    c: &deadpool_postgres::Object,
    stmt: &Statement,
    args: &[Arg<'_>],
    mut f: impl FnMut(&Row) -> TxResult<U>,
) -> TxResult<Vec<U>> {
    let params = args.iter().map(|a| a as &(dyn ToSql + Sync));
    let rows = c.query_raw(stmt, params).await?;
    futures_util::pin_mut!(rows);
    let mut out = Vec::new();
    while let Some(r) = rows.try_next().await? {
        out.push(f(&r)?);
    }
    Ok(out)
}

static NEXT_CREATED: Sql = Sql::new(
    "UPDATE counters SET value = GREATEST(value + $2, $1 + $2 - 1) WHERE name = 'created'
     RETURNING value - $2 + 1",
);
static EXPIRED: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    ", cancel_requested FROM instances
     WHERE state = 'running' AND lease_until < $1
     ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED"
));
static PENDING_NEWEST: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    ", priority FROM instances
     WHERE state = 'pending' AND priority <= $5 AND run_at <= $1 AND ($4 OR needs IS NULL)
     ORDER BY priority DESC, created DESC, id DESC LIMIT $2 OFFSET $3 FOR UPDATE SKIP LOCKED"
));
static PENDING_OLDEST: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    ", priority FROM instances WHERE state = 'pending' AND priority = (",
    top_priority!("instances", "$1", "$4", "$5"),
    ") AND run_at <= $1 AND ($4 OR needs IS NULL)
     ORDER BY created ASC, id ASC LIMIT $2 OFFSET $3 FOR UPDATE SKIP LOCKED"
));
static TOP_PRIORITY: Sql = Sql::new(top_priority!("instances", "$1", "$2", "$3"));
static STARVING: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    " FROM instances WHERE state = 'pending' AND needs IS NOT NULL AND run_at <= $1
     ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED"
));
static LOCK_KEY: Sql = Sql::new("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))");

impl sql::Tx for Tx {
    fn now(&self) -> i64 {
        if self.deferred.is_some() {
            unreachable!("a deferred transaction reads its clock with its first statement");
        }
        self.now
    }

    /// Buffered, and numbered at commit (see [`Tx::commit`]).
    async fn append(&mut self, e: NewEvent) -> TxResult<()> {
        self.events.push(e);
        self.changed = true;
        Ok(())
    }

    /// Pipelined (see [`Pg::execute_all`]): one round trip per thousand rows.
    async fn insert_ids(&mut self, sql: &Sql, rows: &[&[Arg<'_>]]) -> TxResult<Vec<i64>> {
        self.send_held().await?;
        let c = self.conn();
        let stmt = c.prepare_cached(sql.postgres()).await?;
        let mut ids = Vec::with_capacity(rows.len());
        for window in rows.chunks(PIPELINE_MAX) {
            let params: Vec<Vec<&(dyn ToSql + Sync)>> = window
                .iter()
                .map(|args| args.iter().map(|a| a as _).collect())
                .collect();
            let runs = params.iter().map(|p| c.query_one(&stmt, p));
            for r in futures_util::future::try_join_all(runs).await? {
                ids.push(r.req_int(0)?);
            }
        }
        if !ids.is_empty() {
            self.changed = true;
        }
        Ok(ids)
    }

    /// One statement for all `n`; the counter row's lock serializes pushes.
    async fn next_created(&mut self, now: i64, n: i64) -> TxResult<i64> {
        let n = n.max(1);
        self.one(&NEXT_CREATED, &args![now, n], |r| r.req_int(0))
            .await
    }

    fn claim_sql() -> ClaimSql {
        ClaimSql {
            expired: &EXPIRED,
            newest: &PENDING_NEWEST,
            oldest: &PENDING_OLDEST,
            top_priority: &TOP_PRIORITY,
            starving: &STARVING,
        }
    }

    /// Sent between `SET LOCAL enable_sort = off, plan_cache_mode =
    /// force_generic_plan` and their undoing, all three pipelined (one round trip).
    /// Each claim statement orders its rows as one partial index does
    /// (`instances_pending` either way, `instances_lease`, `instances_needs`),
    /// so with sorting priced out that index is the plan: the first rows in order,
    /// then the `LIMIT`. Left to its statistics the planner can do far worse: on a
    /// table not yet analyzed, or last analyzed while few instances were pending (a
    /// bulk add, then workers at once), it estimates one pending row and reads and
    /// sorts every pending row at every claim (20 ms a claim at 50,000 pending, and
    /// growing with the queue). That plan no longer depends on the values bound, so
    /// it is planned once per connection, not at every claim (a custom plan cost
    /// about 75 µs of the server's time, its `LIMIT` being a parameter).
    async fn candidates<U>(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        f: impl FnMut(&Row) -> TxResult<U>,
    ) -> TxResult<Vec<U>> {
        self.send_held().await?;
        let c = self.conn();
        let stmt = c.prepare_cached(sql.postgres()).await?;
        pinned(c, read_rows(c, &stmt, args, f)).await
    }

    /// Both between the same two settings (see [`Tx::candidates`]): one round trip.
    async fn candidates_both<A, B>(
        &mut self,
        first: (&Sql, &[Arg<'_>]),
        fa: impl FnMut(&Row) -> TxResult<A>,
        second: (&Sql, &[Arg<'_>]),
        fb: impl FnMut(&Row) -> TxResult<B>,
    ) -> TxResult<(Vec<A>, Vec<B>)> {
        self.send_held().await?;
        let c = self.conn();
        // Prepared first: nothing may go out between the settings and the reads.
        let (s1, s2) = prepare_two(c, first.0, second.0).await?;
        pinned(c, read_two(c, (&s1, first.1, fa), (&s2, second.1, fb))).await
    }

    async fn try_lock_key(&mut self, key: &Hash) -> TxResult<bool> {
        self.one(&LOCK_KEY, &args![key], |r| r.flag(0)).await
    }
}
