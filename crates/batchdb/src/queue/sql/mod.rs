//! The queue's SQL, written once for every backend.
//!
//! A backend is a thin executor (River's driver model): it runs a [`Sql`] statement
//! with [`Arg`]s on a connection ([`Conn`]) or in a write transaction ([`Tx`]), and
//! hands rows to a decoder through the [`Row`](super::row::Row) trait. Everything
//! above that — which statements run, in which order, what their rows mean, and the
//! queue's rules from [`policy`](super::policy) — lives here once: [`write`] (claims,
//! finishes, pushes, cancel, retry) and [`read`] (pages, details, events, references).
//!
//! Statements are written in PostgreSQL's text with `$n` placeholders. The SQLite
//! rendering turns `$n` into `?n` and drops `FOR UPDATE` (SQLite's write transaction
//! already holds the database's one write lock). Both dialects share the rest of the
//! text — `RETURNING`, `ON CONFLICT ... DO NOTHING/UPDATE`, `string_agg`, quoted
//! `"end"`. A statement that truly differs is written as [`Sql::each`], both texts side
//! by side; what has no common text at all (claim queries with `SKIP LOCKED` or
//! `INDEXED BY`, advisory locks, event numbering, `created` counters) is a method of
//! [`Tx`] that each backend implements.
//!
//! The executor methods are `async`: PostgreSQL's really wait, SQLite's complete at
//! once (they run on a blocking thread), and the SQLite backend drives the shared code
//! with [`ready`].

use std::borrow::Cow;
use std::future::Future;
use std::pin::pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};

use super::row::Row;
use super::types::EventKind;
pub(crate) use super::types::millis;
use crate::error::Error;
use crate::hash::Hash;

pub(crate) mod claim;
pub(crate) mod deps;
pub(crate) mod prune;
pub(crate) mod read;
pub(crate) mod recent;
pub(crate) mod retry;
pub(crate) mod workers;
pub(crate) mod write;

/// A statement's identity (see [`Sql::id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SqlId(usize, usize);

/// One statement, written once. See the module documentation for the rendering rules.
pub(crate) struct Sql {
    /// PostgreSQL's text (and the source of SQLite's, unless `sqlite_text` is set).
    text: &'static str,
    /// SQLite's own text, for a statement whose dialects differ.
    sqlite_text: Option<&'static str>,
    /// The SQLite rendering, made on first use.
    rendered: OnceLock<Box<str>>,
}

impl Sql {
    /// A statement whose text both dialects share.
    pub(crate) const fn new(text: &'static str) -> Sql {
        Sql {
            text,
            sqlite_text: None,
            rendered: OnceLock::new(),
        }
    }

    /// A statement whose text differs between the dialects (both with `$n`
    /// placeholders; the SQLite text is rendered by the same rules).
    pub(crate) const fn each(sqlite: &'static str, postgres: &'static str) -> Sql {
        Sql {
            text: postgres,
            sqlite_text: Some(sqlite),
            rendered: OnceLock::new(),
        }
    }

    /// What tells this statement from every other: where its texts are (each a
    /// `'static` string, so one address is always the same text).
    pub(crate) fn id(&self) -> SqlId {
        SqlId(
            self.text.as_ptr() as usize,
            self.sqlite_text.map_or(0, |t| t.as_ptr() as usize),
        )
    }

    /// The PostgreSQL text.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn postgres(&self) -> &'static str {
        self.text
    }

    /// The SQLite text: `$n` becomes `?n` (`CAST(?n AS INTEGER)` right after `LIMIT`
    /// or `OFFSET`), `FOR UPDATE` is dropped.
    ///
    /// Why the cast: SQLite reads a bare bound `LIMIT` or `OFFSET` while it plans the
    /// statement, and then re-prepares the statement every time a new value is bound
    /// to it — with a new value on every run (a claim, a list page), every run.
    pub(crate) fn sqlite(&self) -> &str {
        self.rendered
            .get_or_init(|| render_sqlite(self.sqlite_text.unwrap_or(self.text)).into())
    }
}

/// See [`Sql::sqlite`].
fn render_sqlite(text: &str) -> String {
    let text = text.replace(" FOR UPDATE", "");
    let mut out = String::with_capacity(text.len() + 32);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) {
            let mut n = String::new();
            while let Some(d) = chars.next_if(char::is_ascii_digit) {
                n.push(d);
            }
            if out.ends_with("LIMIT ") || out.ends_with("OFFSET ") {
                out.push_str("CAST(?");
                out.push_str(&n);
                out.push_str(" AS INTEGER)");
            } else {
                out.push('?');
                out.push_str(&n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One value bound to a statement's parameter. Each variant is the column type it is
/// bound to (PostgreSQL checks it: `Int` is `BIGINT`, `Int32` is `INTEGER`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Arg<'a> {
    /// A `BIGINT` (SQLite `INTEGER`).
    Int(Option<i64>),
    /// An `INTEGER` (exit codes, signals).
    Int32(Option<i32>),
    /// A `BOOLEAN` (SQLite stores 0 or 1).
    Bool(bool),
    /// A `TEXT`.
    Text(Option<Cow<'a, str>>),
    /// A `BYTEA` (SQLite `BLOB`).
    Bytes(Option<Cow<'a, [u8]>>),
}

impl Arg<'_> {
    /// The same value, owning what it borrowed (for a statement sent later).
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn into_owned(self) -> Arg<'static> {
        match self {
            Arg::Int(v) => Arg::Int(v),
            Arg::Int32(v) => Arg::Int32(v),
            Arg::Bool(v) => Arg::Bool(v),
            Arg::Text(v) => Arg::Text(v.map(|t| Cow::Owned(t.into_owned()))),
            Arg::Bytes(v) => Arg::Bytes(v.map(|b| Cow::Owned(b.into_owned()))),
        }
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(v: Option<i64>) -> Self {
        Arg::Int(v)
    }
}

impl From<Option<i32>> for Arg<'_> {
    fn from(v: Option<i32>) -> Self {
        Arg::Int32(v)
    }
}

impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Bool(v)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(Some(Cow::Borrowed(v)))
    }
}

impl From<String> for Arg<'_> {
    fn from(v: String) -> Self {
        Arg::Text(Some(Cow::Owned(v)))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Arg::Text(v.map(Cow::Borrowed))
    }
}

impl From<Option<String>> for Arg<'_> {
    fn from(v: Option<String>) -> Self {
        Arg::Text(v.map(Cow::Owned))
    }
}

impl From<&Hash> for Arg<'_> {
    fn from(v: &Hash) -> Self {
        Arg::Text(Some(Cow::Owned(v.to_hex())))
    }
}

impl From<Option<Hash>> for Arg<'_> {
    fn from(v: Option<Hash>) -> Self {
        Arg::Text(v.map(|h| Cow::Owned(h.to_hex())))
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Bytes(Some(Cow::Borrowed(v)))
    }
}

impl<'a> From<Option<&'a [u8]>> for Arg<'a> {
    fn from(v: Option<&'a [u8]>) -> Self {
        Arg::Bytes(v.map(Cow::Borrowed))
    }
}

/// A statement's arguments: `args![a, b]` is `[Arg::from(a), Arg::from(b)]`.
/// The id SQLite must give the next row of `$table` (`instances` or `events`) itself,
/// if any: one past the highest a prune ever removed from the table's top
/// (`id_floors`, see [`Tx::keep_id_floors`]) while that is above the table's highest id — then
/// its own choice (one past the highest) would give an id again. No row otherwise.
macro_rules! sqlite_floor_id {
    ($table:literal) => {
        concat!(
            "SELECT id + 1 FROM id_floors WHERE name = '",
            $table,
            "' AND id > coalesce((SELECT max(id) FROM ",
            $table,
            "), 0)"
        )
    };
}
pub(crate) use sqlite_floor_id;

/// The claim statements' read of the highest priority at or below `$cap` with a due
/// instance (`$now`, `$resources` as in [`ClaimSql::newest`]), from `$from` (the
/// dialect names the pending index or not): the pending index backwards, to the
/// first. Not locked: a priority whose rows other claimers hold is still the top one.
macro_rules! top_priority {
    ($from:literal, $now:literal, $resources:literal, $cap:literal) => {
        concat!(
            "SELECT priority FROM ",
            $from,
            " WHERE state = 'pending' AND priority <= ",
            $cap,
            " AND run_at <= ",
            $now,
            " AND (",
            $resources,
            " OR needs IS NULL) ORDER BY priority DESC LIMIT 1"
        )
    };
}
pub(crate) use top_priority;

macro_rules! args {
    ($($a:expr),* $(,)?) => { [$($crate::queue::sql::Arg::from($a)),*] };
}
pub(crate) use args;

/// A connection that runs statements: reads anywhere, writes inside a [`Tx`].
pub(crate) trait Conn {
    /// The backend's error (a domain [`Error`] passes through it).
    type Error: From<Error>;
    /// The backend's row type.
    type Row<'r>: Row<Error = Self::Error>;

    /// Runs `sql` and hands its rows to `f` in order, as they arrive (nothing is
    /// collected: a scan of millions of rows holds one at a time).
    async fn each(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        f: impl FnMut(&Self::Row<'_>) -> Result<(), Self::Error>,
    ) -> Result<(), Self::Error>;

    /// Runs a statement that returns no rows; returns how many rows it changed.
    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> Result<u64, Self::Error>;

    /// Runs statements that return no rows, in order; returns how many rows each
    /// changed. A backend may send them all before it reads the first answer
    /// (PostgreSQL pipelines them: one round trip), so no statement's arguments may
    /// depend on another's answer — only on its effects, which apply in order. The
    /// first error is returned; in a transaction it aborts the rest.
    async fn execute_all(&mut self, stmts: &[(&Sql, &[Arg<'_>])]) -> Result<Vec<u64>, Self::Error> {
        let mut out = Vec::with_capacity(stmts.len());
        for (sql, args) in stmts {
            out.push(self.execute(sql, args).await?);
        }
        Ok(out)
    }

    /// Runs statements that return no rows and whose counts nobody reads, in order,
    /// after every statement run before them. A backend may hold them and send them
    /// ahead of the next statement, or of the commit (PostgreSQL: in that round
    /// trip, not one of their own); their errors then surface there.
    async fn execute_later(
        &mut self,
        stmts: &[(&'static Sql, &[Arg<'_>])],
    ) -> Result<(), Self::Error> {
        self.execute_all(stmts).await.map(drop)
    }

    /// The rows of `sql`, each decoded by `f`.
    async fn rows<T>(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Self::Row<'_>) -> Result<T, Self::Error>,
    ) -> Result<Vec<T>, Self::Error> {
        let mut out = Vec::new();
        self.each(sql, args, |r| {
            out.push(f(r)?);
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// The rows of two statements, each decoded by its own function, the second run
    /// after the first (holding its locks). A backend may send both before it reads
    /// the first answer (PostgreSQL: one round trip), so the second's arguments may
    /// not depend on the first's rows.
    async fn rows_both<A, B>(
        &mut self,
        (first, first_args): (&Sql, &[Arg<'_>]),
        fa: impl FnMut(&Self::Row<'_>) -> Result<A, Self::Error>,
        (second, second_args): (&Sql, &[Arg<'_>]),
        fb: impl FnMut(&Self::Row<'_>) -> Result<B, Self::Error>,
    ) -> Result<(Vec<A>, Vec<B>), Self::Error> {
        let a = self.rows(first, first_args, fa).await?;
        let b = self.rows(second, second_args, fb).await?;
        Ok((a, b))
    }

    /// The first row of `sql`, decoded by `f`, if there is one.
    async fn opt<T>(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        f: impl FnOnce(&Self::Row<'_>) -> Result<T, Self::Error>,
    ) -> Result<Option<T>, Self::Error> {
        let mut f = Some(f);
        let mut out = None;
        self.each(sql, args, |r| {
            if let Some(f) = f.take() {
                out = Some(f(r)?);
            }
            Ok(())
        })
        .await?;
        Ok(out)
    }

    /// The first row of `sql`, decoded by `f`; no row at all is corrupt.
    async fn one<T>(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        f: impl FnOnce(&Self::Row<'_>) -> Result<T, Self::Error>,
    ) -> Result<T, Self::Error> {
        self.opt(sql, args, f).await?.ok_or_else(|| {
            <Self::Row<'_> as Row>::corrupt(format!("no row from: {}", sql.postgres()))
        })
    }
}

/// A write transaction: what the shared write path needs beyond statements, where the
/// dialects have no common text.
pub(crate) trait Tx: Conn {
    /// The time of this transaction (epoch ms): the database's clock where there is a
    /// server, the local clock for an embedded file.
    fn now(&self) -> i64;

    /// Appends an event to the log (numbered in commit order).
    async fn append(&mut self, event: NewEvent) -> Result<(), Self::Error>;

    /// Appends a `kind` event of job `job` (and instance `(id, created)`) at this
    /// transaction's time.
    async fn event(
        &mut self,
        kind: EventKind,
        job: &Hash,
        inst: Option<(i64, i64)>,
        data: serde_json::Value,
    ) -> Result<(), Self::Error> {
        let data = (!data.is_null()).then(|| data.to_string());
        self.event_json(kind, job, inst, data).await
    }

    /// [`Tx::event`] with its details rendered as JSON already (`None`: none).
    async fn event_json(
        &mut self,
        kind: EventKind,
        job: &Hash,
        inst: Option<(i64, i64)>,
        data: Option<String>,
    ) -> Result<(), Self::Error> {
        let (time, job) = (self.now(), *job);
        self.append(NewEvent {
            time,
            kind,
            job,
            inst,
            data,
        })
        .await
    }

    /// Runs `INSERT` `sql` (into `instances`) once with each of `rows` and returns the
    /// new ids, in order: each row's `RETURNING id` where the dialect's text has one;
    /// SQLite's text takes one more argument after the caller's, the id to give (NULL:
    /// SQLite's own choice, read back as the rowid). A backend may send them all
    /// before it reads the first answer (see [`Conn::execute_all`]).
    async fn insert_ids(&mut self, sql: &Sql, rows: &[&[Arg<'_>]])
    -> Result<Vec<i64>, Self::Error>;

    /// The first of `n` consecutive `created` times for new instances: `now`, or the
    /// next free one when `now` is taken (`created` is unique across all instances).
    async fn next_created(&mut self, now: i64, n: i64) -> Result<i64, Self::Error>;

    /// The statements selecting claim candidates.
    fn claim_sql() -> ClaimSql;

    /// [`Tx::candidates`] of two claim statements, the second run after the first; a
    /// backend may send both before it reads the first answer (PostgreSQL: one round
    /// trip), so the second's arguments may not depend on the first's rows.
    async fn candidates_both<A, B>(
        &mut self,
        (first, first_args): (&Sql, &[Arg<'_>]),
        fa: impl FnMut(&Self::Row<'_>) -> Result<A, Self::Error>,
        (second, second_args): (&Sql, &[Arg<'_>]),
        fb: impl FnMut(&Self::Row<'_>) -> Result<B, Self::Error>,
    ) -> Result<(Vec<A>, Vec<B>), Self::Error> {
        let a = self.candidates(first, first_args, fa).await?;
        let b = self.candidates(second, second_args, fb).await?;
        Ok((a, b))
    }

    /// The rows of claim statement `sql` (one of [`Tx::claim_sql`]'s), each decoded by
    /// `f`: read in order through the index the statement's order is written for,
    /// whatever the database's statistics say, so a claim reads the first rows of a
    /// long queue, never the whole of it (SQLite's texts say `INDEXED BY`; PostgreSQL
    /// has no such clause and is told how to plan them).
    async fn candidates<U>(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        f: impl FnMut(&Self::Row<'_>) -> Result<U, Self::Error>,
    ) -> Result<Vec<U>, Self::Error> {
        self.rows(sql, args, f).await
    }

    /// Takes the claim lock of cache key `key` for this transaction, without waiting;
    /// false when another claimer holds it.
    async fn try_lock_key(&mut self, key: &Hash) -> Result<bool, Self::Error>;

    /// Called by each prune step before it deletes instances or events: where the
    /// dialect would give the ids of deleted rows again (SQLite gives one past the
    /// highest left), records the highest of each now, never to be given again.
    /// PostgreSQL's sequence and event counter never go back: nothing to do.
    async fn keep_id_floors(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A failure inside a transaction, on a backend whose own error type is `E`.
pub(crate) enum DbError<E> {
    /// The database's own error.
    Db(E),
    /// A domain error passing through (fenced, not found, ...).
    Domain(Error),
    /// A value read back that batchdb never writes: the store is corrupt.
    Corrupt(String),
}

impl<E> From<Error> for DbError<E> {
    fn from(e: Error) -> Self {
        DbError::Domain(e)
    }
}

impl<E> DbError<E> {
    /// The library error: a corrupt value is [`Error::Corrupt`] at `location` on
    /// every backend; the database's own error is mapped by `db`.
    pub(crate) fn into_error(
        self,
        location: impl FnOnce() -> String,
        db: impl FnOnce(E) -> Error,
    ) -> Error {
        match self {
            DbError::Db(e) => db(e),
            DbError::Domain(e) => e,
            DbError::Corrupt(what) => Error::Corrupt {
                location: location(),
                what,
            },
        }
    }
}

/// An event to append to the log.
#[derive(Debug)]
pub(crate) struct NewEvent {
    /// When (epoch ms).
    pub(crate) time: i64,
    pub(crate) kind: EventKind,
    pub(crate) job: Hash,
    /// The instance's id and `created`, for an instance's event.
    pub(crate) inst: Option<(i64, i64)>,
    /// Details, as JSON text (`None`: none).
    pub(crate) data: Option<String>,
}

/// A backend's statements selecting claim candidates ([`claim_cols!`](crate::queue::row::claim_cols)
/// first); each row they return is locked for the transaction, and rows another
/// claimer holds are skipped.
pub(crate) struct ClaimSql {
    /// Running instances whose lease ended before `$1`, oldest lease first, at most
    /// `$2`; `cancel_requested` follows the claim columns.
    pub(crate) expired: &'static Sql,
    /// Due pending instances (`run_at <= $1`) at priority `$5` or below, by
    /// priority, newest first within one; a window of `$2` rows after skipping `$3`;
    /// only those without needs unless `$4` (the worker has resources). The
    /// instance's `priority` follows the claim columns.
    pub(crate) newest: &'static Sql,
    /// The same, oldest first, from one priority only: the highest at or below `$5`
    /// that has a due instance.
    pub(crate) oldest: &'static Sql,
    /// That priority alone (`$1` the time, `$2` whether the worker has resources,
    /// `$3` the highest priority wanted); no row when nothing is due.
    pub(crate) top_priority: &'static Sql,
    /// Pending instances with needs, due since `$1` or longer, longest due first, at
    /// most `$2` (through the `instances_needs` index, which ends the scan at the
    /// first one due later).
    pub(crate) starving: &'static Sql,
}

/// Runs a future that completes without waiting (the SQLite executor's), on this
/// thread; `None` if it would have waited.
pub(crate) fn ready<T>(f: impl Future<Output = T>) -> Option<T> {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// The plan SQLite makes for `sql` on an empty database (in memory) with the whole
/// schema, one line per step: what tests of a statement's index read.
#[cfg(test)]
pub(crate) fn sqlite_plan(sql: &Sql) -> String {
    let c = rusqlite::Connection::open_in_memory().expect("open");
    for step in super::migrations::STEPS {
        c.execute_batch(step.sqlite).expect("schema");
    }
    let mut st = c
        .prepare(&format!("EXPLAIN QUERY PLAN {}", sql.sqlite()))
        .expect("plan");
    let mut rows = st.raw_query();
    let mut plan = String::new();
    while let Some(r) = rows.next().expect("plan row") {
        plan.push_str(&r.get::<_, String>(3).expect("detail"));
        plan.push('\n');
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_rendering_numbers_placeholders_and_drops_row_locks() {
        let s = Sql::new("SELECT a FROM t WHERE id = $1 AND b = $12 FOR UPDATE");
        assert_eq!(s.sqlite(), "SELECT a FROM t WHERE id = ?1 AND b = ?12");
        assert_eq!(
            s.postgres(),
            "SELECT a FROM t WHERE id = $1 AND b = $12 FOR UPDATE"
        );
    }

    #[test]
    fn sqlite_rendering_casts_a_bound_limit_and_offset() {
        let s = Sql::new("SELECT a FROM t WHERE id > $1 ORDER BY id LIMIT $2 OFFSET $13");
        assert_eq!(
            s.sqlite(),
            "SELECT a FROM t WHERE id > ?1 ORDER BY id LIMIT CAST(?2 AS INTEGER) OFFSET CAST(?13 AS INTEGER)"
        );
        assert_eq!(
            Sql::new("SELECT a FROM t LIMIT 1").sqlite(),
            "SELECT a FROM t LIMIT 1"
        );
    }

    /// How often a statement was re-prepared over runs with limits 1..=5.
    fn reprepares(sql: &str) -> i32 {
        let c = rusqlite::Connection::open_in_memory().expect("open");
        c.execute_batch("CREATE TABLE t(a INTEGER); INSERT INTO t VALUES (1), (2), (3);")
            .expect("schema");
        let mut st = c.prepare(sql).expect("prepare");
        for limit in 1..=5_i64 {
            st.query_map([limit], |r| r.get::<_, i64>(0))
                .expect("query")
                .for_each(drop);
        }
        st.get_status(rusqlite::StatementStatus::RePrepare)
    }

    #[test]
    fn a_rendered_limit_does_not_make_sqlite_re_prepare_on_every_run() {
        let s = Sql::new("SELECT a FROM t ORDER BY a LIMIT $1");
        assert_eq!(reprepares(s.sqlite()), 0);
        // What the cast avoids: the bare placeholder is re-prepared at each new value.
        assert!(reprepares("SELECT a FROM t ORDER BY a LIMIT ?1") > 0);
    }

    #[test]
    fn a_statement_written_per_dialect_renders_its_own_sqlite_text() {
        let s = Sql::each(
            "SELECT 1 FROM t NOT INDEXED WHERE a = $1",
            "SELECT 1 FROM t WHERE a = $1",
        );
        assert_eq!(s.sqlite(), "SELECT 1 FROM t NOT INDEXED WHERE a = ?1");
        assert_eq!(s.postgres(), "SELECT 1 FROM t WHERE a = $1");
    }
}
