//! Newest-first pages of instances, once for every backend: what `ps` and the
//! dashboard show.

use super::{Conn, Sql, args};
use crate::queue::row::Row;
use crate::queue::{InstanceSummary, RecentQuery, State};

type R<T, C> = Result<T, <C as Conn>::Error>;

/// The page's statement, narrowed by `$where` (besides the batch, `$3`).
macro_rules! recent_sql {
    ($where:literal) => {
        concat!(
            "SELECT i.id, i.job, i.created, i.state, i.attempts, b.name, a.start, a.\"end\",
               a.exit_code, a.signal
             FROM instances i
             LEFT JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
             LEFT JOIN batches b ON b.id = i.batch
             WHERE ",
            $where,
            " AND (CAST($3 AS TEXT) IS NULL OR i.batch = (SELECT id FROM batches WHERE name = $3))
             ORDER BY i.id DESC LIMIT $2"
        )
    };
}

/// Walks the primary key backwards from the cursor.
static RECENT: Sql = Sql::new(recent_sql!("i.id < $1"));
/// One state other than pending: walks the (state, id) index backwards from the
/// cursor (SQLite's leaves pending instances out: the statement says so too).
static RECENT_IN_STATE: Sql = Sql::new(recent_sql!(
    "i.state = $4 AND i.state <> 'pending' AND i.id < $1"
));
/// Pending instances: walks the primary key backwards from the cursor (on SQLite no
/// index orders them by id; a queue's pending instances are mostly its newest).
static RECENT_PENDING: Sql = Sql::new(recent_sql!("i.state = 'pending' AND i.id < $1"));

/// Up to `q.limit` instances, newest (highest id) first (see
/// [`Queue::recent_page`](crate::queue::Queue::recent_page)). Several states are read
/// one index range each and merged.
pub(crate) async fn recent_page<C: Conn>(c: &mut C, q: &RecentQuery) -> R<Vec<InstanceSummary>, C> {
    let before = q.before.unwrap_or(i64::MAX);
    let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
    let batch = q.batch.as_deref();
    if q.states.is_empty() {
        return c
            .rows(&RECENT, &args![before, limit, batch], |r| summary(r))
            .await;
    }
    let mut rows = Vec::new();
    let mut states = q.states.clone();
    states.sort_by_key(|s| s.as_str());
    states.dedup();
    for state in states {
        let a = args![before, limit, batch, state.as_str()];
        let (sql, a) = if state == State::Pending {
            (&RECENT_PENDING, &a[..3])
        } else {
            (&RECENT_IN_STATE, &a[..])
        };
        rows.extend(c.rows(sql, a, |r| summary(r)).await?);
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.id));
    rows.truncate(q.limit);
    Ok(rows)
}

fn summary<R: Row>(r: &R) -> Result<InstanceSummary, R::Error> {
    Ok(InstanceSummary {
        id: r.req_int(0)?,
        job: r.hash(1)?,
        created: r.req_int(2)?,
        state: r.state(3)?,
        attempts: r.req_int(4)?,
        batch: r.text(5)?,
        start: r.int(6)?,
        end: r.int(7)?,
        exit_code: r.int32(8)?,
        signal: r.int32(9)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sql::sqlite_plan;

    #[test]
    fn recent_pages_walk_an_index_backwards_from_the_cursor_without_sorting() {
        let plan = sqlite_plan(&RECENT_IN_STATE);
        assert!(
            plan.contains("INDEX instances_state (state=? AND id<?)"),
            "{plan}"
        );
        for sql in [&RECENT, &RECENT_PENDING] {
            let plan = sqlite_plan(sql);
            assert!(plan.contains("INTEGER PRIMARY KEY (rowid<?)"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }
}
