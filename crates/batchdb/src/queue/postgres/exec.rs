//! The PostgreSQL executor of the shared queue SQL ([`crate::queue::sql`]): statements
//! on a pooled connection or in a transaction, and what PostgreSQL does its own way —
//! claims with `FOR UPDATE SKIP LOCKED`, advisory locks on cache keys, `created` from a
//! counter row, events numbered at commit.

use bytes::BytesMut;
use futures_util::TryStreamExt;
use tokio_postgres::types::{IsNull, Type};

use super::*;
use crate::queue::row::{Row as _, claim_cols};
use crate::queue::sql::{self, Arg, Claiming, Conn, Sql, args};

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl ToSql for Arg<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> std::result::Result<IsNull, BoxError> {
        match self {
            Arg::Int(v) => v.to_sql(ty, out),
            Arg::Int32(v) => v.to_sql(ty, out),
            Arg::Bool(v) => v.to_sql(ty, out),
            Arg::Text(v) => v.as_deref().to_sql(ty, out),
            Arg::Bytes(v) => v.to_sql(ty, out),
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
            Arg::Bytes(v) => v.to_sql_checked(ty, out),
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

    fn text(&self, i: usize) -> TxResult<Option<String>> {
        Ok(self.try_get(i)?)
    }

    fn bytes(&self, i: usize) -> TxResult<Option<Vec<u8>>> {
        Ok(self.try_get(i)?)
    }

    fn corrupt(what: String) -> TxError {
        TxError::Corrupt(what)
    }

    /// Parsed in place, without allocating.
    fn hash(&self, i: usize) -> TxResult<Hash> {
        parse_str(self.try_get(i)?)
    }

    fn opt_hash(&self, i: usize) -> TxResult<Option<Hash>> {
        self.try_get::<_, Option<&str>>(i)?
            .map(parse_str)
            .transpose()
    }

    fn state(&self, i: usize) -> TxResult<State> {
        parse_str(self.try_get(i)?)
    }
}

/// A text column's value parsed (a value that does not parse is corrupt).
fn parse_str<T: std::str::FromStr<Err = Error>>(s: &str) -> TxResult<T> {
    s.parse()
        .map_err(|e: Error| TxError::Corrupt(e.to_string()))
}

/// Runs `sql` on `client` (a connection or a transaction), row by row.
macro_rules! each_row {
    ($client:expr, $sql:expr, $args:expr, $f:expr) => {{
        let stmt = $client.prepare_cached($sql.postgres()).await?;
        let params = $args.iter().map(|a| a as &(dyn ToSql + Sync));
        let rows = $client.query_raw(&stmt, params).await?;
        futures_util::pin_mut!(rows);
        while let Some(r) = rows.try_next().await? {
            $f(&r)?;
        }
        Ok(())
    }};
}

/// A pooled connection running the shared read SQL.
pub(super) struct PgRead<'a>(pub(super) &'a deadpool_postgres::ClientWrapper);

impl Conn for PgRead<'_> {
    type Error = TxError;
    type Row<'r> = Row;

    async fn each(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Row) -> TxResult<()>,
    ) -> TxResult<()> {
        each_row!(self.0, sql, args, f)
    }

    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> TxResult<u64> {
        let stmt = self.0.prepare_cached(sql.postgres()).await?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        Ok(self.0.execute(&stmt, &params).await?)
    }
}

impl Conn for Tx<'_> {
    type Error = TxError;
    type Row<'r> = Row;

    async fn each(
        &mut self,
        sql: &Sql,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Row) -> TxResult<()>,
    ) -> TxResult<()> {
        each_row!(self.raw, sql, args, f)
    }

    /// A statement that changed rows marks the transaction as a change.
    async fn execute(&mut self, sql: &Sql, args: &[Arg<'_>]) -> TxResult<u64> {
        let stmt = self.raw.prepare_cached(sql.postgres()).await?;
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        let n = self.raw.execute(&stmt, &params).await?;
        if n > 0 {
            self.changed = true;
        }
        Ok(n)
    }
}

static NEXT_CREATED: Sql = Sql::new(
    "UPDATE counters SET value = GREATEST(value + 1, $1) WHERE name = 'created' RETURNING value",
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
    " FROM instances WHERE state = 'pending' AND run_at <= $1
     ORDER BY priority DESC, created DESC, id DESC LIMIT $2 OFFSET $3 FOR UPDATE SKIP LOCKED"
));
static PENDING_OLDEST: Sql = Sql::new(concat!(
    "SELECT ",
    claim_cols!(),
    " FROM instances WHERE state = 'pending' AND run_at <= $1
     ORDER BY priority DESC, created ASC, id ASC LIMIT $2 OFFSET $3 FOR UPDATE SKIP LOCKED"
));
static LOCK_KEY: Sql = Sql::new("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))");

impl sql::Tx for Tx<'_> {
    fn now(&self) -> i64 {
        self.now
    }

    /// Buffered, and numbered at commit (see [`Tx::commit`]).
    async fn event(
        &mut self,
        kind: EventKind,
        job: &Hash,
        inst: Option<(i64, i64)>,
        data: serde_json::Value,
    ) -> TxResult<()> {
        self.events.push(NewEvent {
            time: self.now,
            kind,
            job: *job,
            inst,
            data,
        });
        self.changed = true;
        Ok(())
    }

    /// The counter row's lock serializes pushes.
    async fn next_created(&mut self, now: i64) -> TxResult<i64> {
        self.one(&NEXT_CREATED, &args![now], |r| r.req_int(0)).await
    }

    fn claim_sql(which: Claiming) -> &'static Sql {
        match which {
            Claiming::Expired => &EXPIRED,
            Claiming::Pending(Order::Newest) => &PENDING_NEWEST,
            Claiming::Pending(Order::Oldest) => &PENDING_OLDEST,
        }
    }

    async fn try_lock_key(&mut self, key: &Hash) -> TxResult<bool> {
        self.one(&LOCK_KEY, &args![key], |r| r.flag(0)).await
    }
}
