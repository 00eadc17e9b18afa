//! The SQLite executor of the shared queue SQL ([`crate::queue::sql`]): statements
//! on one connection, and what SQLite does its own way — events numbered by their
//! rowid, `created` from the newest row, claim queries with `INDEXED BY`.

use rusqlite::types::{ToSqlOutput, Value, ValueRef};

use super::*;
use crate::queue::row::{Row, claim_cols};
use crate::queue::sql::{self, Arg, Claiming, Conn, Sql, args};

/// A connection (or the transaction it is in) running the shared SQL. Every future
/// it returns is ready at once: drive them with [`run`].
pub(super) struct Lite<'c> {
    conn: &'c Connection,
    now: i64,
    /// The newest `created` (`None`: no instance yet), once read in this transaction
    /// (a bulk add does not look it up again for every row).
    newest: Option<i64>,
    /// Whether `newest` has been read.
    newest_known: bool,
}

impl<'c> Lite<'c> {
    pub(super) fn new(conn: &'c Connection) -> Self {
        Lite {
            conn,
            now: now_ms(),
            newest: None,
            newest_known: false,
        }
    }
}

/// Runs shared SQL `f` on `conn` (a connection, or a transaction through its deref).
pub(super) fn run<'c, T, F>(conn: &'c Connection, f: impl FnOnce(Lite<'c>) -> F) -> TxResult<T>
where
    F: std::future::Future<Output = TxResult<T>>,
{
    sql::ready(f(Lite::new(conn))).unwrap_or_else(|| {
        Err(TxError::Domain(Error::Task(
            "a SQLite statement did not complete at once".into(),
        )))
    })
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Arg::Int(v) => v.map_or(ToSqlOutput::Owned(Value::Null), std::convert::Into::into),
            Arg::Int32(v) => v.map_or(ToSqlOutput::Owned(Value::Null), std::convert::Into::into),
            Arg::Bool(v) => (*v).into(),
            Arg::Text(v) => match v {
                Some(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
                None => ToSqlOutput::Owned(Value::Null),
            },
            Arg::Bytes(v) => match v {
                Some(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
                None => ToSqlOutput::Owned(Value::Null),
            },
        })
    }
}

impl Row for rusqlite::Row<'_> {
    type Error = TxError;

    fn int(&self, i: usize) -> TxResult<Option<i64>> {
        Ok(self.get(i)?)
    }

    fn flag(&self, i: usize) -> TxResult<bool> {
        Ok(self.get(i)?)
    }

    fn text(&self, i: usize) -> TxResult<Option<String>> {
        Ok(self.get(i)?)
    }

    fn bytes(&self, i: usize) -> TxResult<Option<Vec<u8>>> {
        Ok(self.get(i)?)
    }

    fn corrupt(what: String) -> TxError {
        TxError::Corrupt(what)
    }

    /// Parsed in place, without allocating (a page of a million rows reads millions).
    fn hash(&self, i: usize) -> TxResult<Hash> {
        parse_str(str_at(self, i)?.unwrap_or_default())
    }

    fn opt_hash(&self, i: usize) -> TxResult<Option<Hash>> {
        str_at(self, i)?.map(parse_str).transpose()
    }

    fn state(&self, i: usize) -> TxResult<State> {
        parse_str(str_at(self, i)?.unwrap_or_default())
    }
}

/// Text column `i` of `r`, borrowed (NULL is `None`; any other type is corrupt).
fn str_at<'r>(r: &'r rusqlite::Row<'_>, i: usize) -> TxResult<Option<&'r str>> {
    r.get_ref(i)?
        .as_str_or_null()
        .map_err(|e| TxError::Corrupt(format!("column {i}: {e}")))
}

/// A text column's value parsed (a value that does not parse is corrupt).
fn parse_str<T: std::str::FromStr<Err = Error>>(s: &str) -> TxResult<T> {
    s.parse()
        .map_err(|e: Error| TxError::Corrupt(e.to_string()))
}

impl Conn for Lite<'_> {
    type Error = TxError;
    type Row<'r> = rusqlite::Row<'r>;

    async fn each(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        mut f: impl FnMut(&rusqlite::Row<'_>) -> TxResult<()>,
    ) -> TxResult<()> {
        let mut stmt = self.conn.prepare_cached(sql.sqlite())?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        while let Some(r) = rows.next()? {
            f(r)?;
        }
        Ok(())
    }

    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> TxResult<u64> {
        let n = self
            .conn
            .prepare_cached(sql.sqlite())?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }
}

static EVENT: Sql = Sql::new(
    "INSERT INTO events(time, kind, job, created, instance, data) VALUES ($1, $2, $3, $4, $5, $6)",
);
static NEWEST_CREATED: Sql = Sql::new("SELECT MAX(created) FROM instances");
static EXPIRED: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    ", cancel_requested FROM instances
     WHERE state = 'running' AND lease_until < $1 ORDER BY lease_until LIMIT $2"
));
// INDEXED BY: without statistics SQLite would rather filter on the state index and
// sort every pending row; the partial index reads only the first rows in order,
// whatever the queue's length.
static PENDING_NEWEST: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    " FROM instances INDEXED BY instances_pending_newest
     WHERE state = 'pending' AND run_at <= $1
     ORDER BY priority DESC, created DESC, id DESC LIMIT $2 OFFSET $3"
));
static PENDING_OLDEST: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    " FROM instances INDEXED BY instances_pending_oldest
     WHERE state = 'pending' AND run_at <= $1
     ORDER BY priority DESC, created ASC, id ASC LIMIT $2 OFFSET $3"
));

impl sql::Tx for Lite<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    async fn event(
        &mut self,
        kind: EventKind,
        job: &Hash,
        inst: Option<(i64, i64)>,
        data: serde_json::Value,
    ) -> TxResult<()> {
        let data = (!data.is_null()).then(|| data.to_string());
        let (id, created) = (inst.map(|i| i.0), inst.map(|i| i.1));
        let now = self.now;
        self.execute(&EVENT, &args![now, kind.as_str(), job, created, id, data])
            .await?;
        Ok(())
    }

    /// The write lock makes this race-free across processes.
    async fn next_created(&mut self, now: i64) -> TxResult<i64> {
        if !self.newest_known {
            self.newest = self.one(&NEWEST_CREATED, &[], |r| r.int(0)).await?;
            self.newest_known = true;
        }
        let created = self.newest.map_or(now, |l| now.max(l + 1));
        self.newest = Some(created);
        Ok(created)
    }

    fn claim_sql(which: Claiming) -> &'static Sql {
        match which {
            Claiming::Expired => &EXPIRED,
            Claiming::Pending(Order::Newest) => &PENDING_NEWEST,
            Claiming::Pending(Order::Oldest) => &PENDING_OLDEST,
        }
    }

    /// The write transaction holds the database's one write lock: every key is ours.
    async fn try_lock_key(&mut self, _key: &Hash) -> TxResult<bool> {
        Ok(true)
    }
}
