//! The SQLite executor of the shared queue SQL ([`crate::queue::sql`]): statements
//! on one connection, and what SQLite does its own way — events numbered by their
//! rowid, `created` from the newest row, claim queries with `INDEXED BY`.

use rusqlite::types::{ToSqlOutput, Value, ValueRef};

use super::*;
use crate::queue::row::{Row, claim_cols};
use crate::queue::sql::{self, Arg, ClaimSql, Conn, NewEvent, Sql, args};
use crate::queue::sql::{sqlite_floor_id, top_priority};

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
    /// Whether this transaction has checked yet that SQLite's own choice of the
    /// next instance and event id gives no id again (see [`sqlite_floor_id!`]);
    /// after its first row of each, it does.
    ids_checked: [bool; 2],
    /// The statements this transaction ran, held until it ends (at most
    /// [`HELD_STATEMENTS`], the longest held given back first): a bulk add runs
    /// each of a few statements thousands of times, and finding one here is a pointer
    /// comparison, where the connection's cache hashes its whole text.
    held: Vec<(sql::SqlId, rusqlite::CachedStatement<'c>)>,
}

/// How many statements one [`Lite`] holds.
const HELD_STATEMENTS: usize = 8;

/// Which ids [`Lite::id_to_give`] gives.
#[derive(Clone, Copy)]
enum Ids {
    Instances = 0,
    Events = 1,
}

impl<'c> Lite<'c> {
    pub(super) fn new(conn: &'c Connection) -> Self {
        Lite {
            conn,
            now: now_ms(),
            newest: None,
            newest_known: false,
            ids_checked: [false; 2],
            held: Vec::new(),
        }
    }

    /// `sql`, prepared: held already, or taken from the connection's cache and held.
    fn statement(&mut self, sql: &Sql) -> TxResult<&mut rusqlite::CachedStatement<'c>> {
        let id = sql.id();
        if let Some(i) = self.held.iter().position(|(held, _)| *held == id) {
            return Ok(&mut self.held[i].1);
        }
        if self.held.len() == HELD_STATEMENTS {
            self.held.remove(0);
        }
        let stmt = self.conn.prepare_cached(sql.sqlite())?;
        self.held.push((id, stmt));
        let last = self.held.len() - 1;
        Ok(&mut self.held[last].1)
    }

    /// The id the next row of `which` must be given, or `None` for SQLite's own
    /// choice (one past the highest): checked at the first row of each in this
    /// transaction, which the write lock keeps ours.
    async fn id_to_give(&mut self, which: Ids) -> TxResult<Option<i64>> {
        if std::mem::replace(&mut self.ids_checked[which as usize], true) {
            return Ok(None);
        }
        let sql = match which {
            Ids::Instances => &FLOOR_INSTANCE_ID,
            Ids::Events => &FLOOR_EVENT_ID,
        };
        sql::Conn::opt(self, sql, &[], |r| r.req_int(0)).await
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
                Some(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b.as_ref())),
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

    /// Borrowed from the row: no allocation (any type but text or NULL is corrupt).
    fn str(&self, i: usize) -> TxResult<Option<&str>> {
        self.get_ref(i)?
            .as_str_or_null()
            .map_err(|e| TxError::Corrupt(format!("column {i}: {e}")))
    }

    fn bytes(&self, i: usize) -> TxResult<Option<Vec<u8>>> {
        Ok(self.get(i)?)
    }

    fn corrupt(what: String) -> TxError {
        TxError::Corrupt(what)
    }
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
        let stmt = self.statement(sql)?;
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        while let Some(r) = rows.next()? {
            f(r)?;
        }
        Ok(())
    }

    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> TxResult<u64> {
        let n = self
            .statement(sql)?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }
}

static EVENT: Sql = Sql::new(
    "INSERT INTO events(id, time, kind, job, created, instance, data)
     VALUES ($7, $1, $2, $3, $4, $5, $6)",
);
static FLOOR_INSTANCE_ID: Sql = Sql::new(sqlite_floor_id!("instances"));
static KEEP_ID_FLOORS: Sql = Sql::new(
    "INSERT INTO id_floors(name, id)
       SELECT name, id FROM (
         SELECT 'instances' AS name, (SELECT max(id) FROM instances) AS id
         UNION ALL SELECT 'events', (SELECT max(id) FROM events))
       WHERE id IS NOT NULL
     ON CONFLICT (name) DO UPDATE SET id = max(id, excluded.id)",
);
static FLOOR_EVENT_ID: Sql = Sql::new(sqlite_floor_id!("events"));
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
    ", priority FROM instances INDEXED BY instances_pending
     WHERE state = 'pending' AND priority <= $5 AND run_at <= $1 AND ($4 OR needs IS NULL)
     ORDER BY priority DESC, created DESC, id DESC LIMIT $2 OFFSET $3"
));
static PENDING_OLDEST: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    ", priority FROM instances INDEXED BY instances_pending
     WHERE state = 'pending' AND priority = (",
    top_priority!("instances INDEXED BY instances_pending", "$1", "$4", "$5"),
    ") AND run_at <= $1 AND ($4 OR needs IS NULL)
     ORDER BY created ASC, id ASC LIMIT $2 OFFSET $3"
));
static TOP_PRIORITY: Sql = Sql::new(top_priority!(
    "instances INDEXED BY instances_pending",
    "$1",
    "$2",
    "$3"
));
static STARVING: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    " FROM instances INDEXED BY instances_needs
     WHERE state = 'pending' AND needs IS NOT NULL AND run_at <= $1
     ORDER BY run_at LIMIT $2"
));

impl sql::Tx for Lite<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    async fn append(&mut self, e: NewEvent) -> TxResult<()> {
        let data = e.data.as_deref();
        let (id, created) = (e.inst.map(|i| i.0), e.inst.map(|i| i.1));
        let event = self.id_to_give(Ids::Events).await?;
        let args = args![e.time, e.kind.as_str(), &e.job, created, id, data, event];
        self.execute(&EVENT, &args).await?;
        Ok(())
    }

    /// Each row given the id it must have as its last argument, or NULL for SQLite's
    /// own choice; each id read back as the rowid (no RETURNING: see the statement).
    /// A row binds only the arguments that differ from the row before it (a statement
    /// keeps its bindings from one run to the next): the rows of one push share all
    /// but their job and `created`.
    async fn insert_ids(&mut self, sql: &Sql, rows: &[&[Arg<'_>]]) -> TxResult<Vec<i64>> {
        let mut ids = Vec::with_capacity(rows.len());
        let mut before: Option<&[Arg<'_>]> = None;
        for row in rows {
            let id = Arg::from(self.id_to_give(Ids::Instances).await?);
            let stmt = self.statement(sql)?;
            for (i, arg) in row.iter().enumerate() {
                if before.is_none_or(|b| b.get(i) != Some(arg)) {
                    stmt.raw_bind_parameter(i + 1, arg)?;
                }
            }
            stmt.raw_bind_parameter(row.len() + 1, &id)?;
            stmt.raw_execute()?;
            before = Some(row);
            ids.push(self.conn.last_insert_rowid());
        }
        Ok(ids)
    }

    /// The write lock makes this race-free across processes.
    async fn next_created(&mut self, now: i64, n: i64) -> TxResult<i64> {
        if !self.newest_known {
            self.newest = self.one(&NEWEST_CREATED, &[], |r| r.int(0)).await?;
            self.newest_known = true;
        }
        let created = self.newest.map_or(now, |l| now.max(l + 1));
        self.newest = Some(created + n.max(1) - 1);
        Ok(created)
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

    /// The write transaction holds the database's one write lock: every key is ours.
    async fn try_lock_key(&mut self, _key: &Hash) -> TxResult<bool> {
        Ok(true)
    }

    /// Both tables' highest ids, raised in `id_floors` (one small row each).
    async fn keep_id_floors(&mut self) -> TxResult<()> {
        self.execute(&KEEP_ID_FLOORS, &[]).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sql::sqlite_plan;

    /// Each row is stored with its own values, whichever of them repeat the row
    /// before (those are not bound again), and its id is the one read back.
    #[test]
    fn insert_ids_stores_each_row_whole_when_only_some_arguments_change() {
        use sql::Tx as _;
        static INSERT: Sql = Sql::new("INSERT INTO t(id, a, b) VALUES ($3, $1, $2)");
        let conn = Connection::open_in_memory().expect("open");
        for step in crate::queue::migrations::STEPS {
            conn.execute_batch(step.sqlite).expect("schema");
        }
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT)")
            .expect("table");
        let rows = [
            args![1i64, "x"],
            args![1i64, "y"],
            args![None::<i64>, "y"],
            args![2i64, None::<&str>],
            args![2i64, "x"],
        ];
        let rows: Vec<&[Arg<'_>]> = rows.iter().map(|r| &r[..]).collect();
        let ids = run(&conn, |mut lite| async move {
            lite.insert_ids(&INSERT, &rows).await
        })
        .ok()
        .expect("insert");
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        let mut st = conn
            .prepare("SELECT id, a, b FROM t ORDER BY id")
            .expect("select");
        let stored: Vec<(i64, Option<i64>, Option<String>)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("read");
        let want = [
            (1, Some(1), Some("x")),
            (2, Some(1), Some("y")),
            (3, None, Some("y")),
            (4, Some(2), None),
            (5, Some(2), Some("x")),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|&(i, a, b)| (i, a, b.map(str::to_owned)))
            .collect();
        assert_eq!(stored, want);
    }

    #[test]
    fn both_pending_reads_walk_the_one_pending_index_in_order_without_sorting() {
        for sql in [&PENDING_NEWEST, &PENDING_OLDEST, &TOP_PRIORITY] {
            let plan = sqlite_plan(sql);
            assert!(plan.contains("INDEX instances_pending"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
        let plan = sqlite_plan(&PENDING_OLDEST);
        assert!(
            plan.contains("priority=?"),
            "one priority at a time: {plan}"
        );
    }
}
