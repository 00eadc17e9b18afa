//! The read path, once for every backend: selectors, pages of rows, one instance's
//! detail, the event log, counts and blob references.

use super::{Conn, Sql, args};
use crate::error::Error;
use crate::hash::Hash;
use crate::queue::row::Row;
use crate::queue::{
    AttemptReport, AttemptRow, BatchCounts, BlobReference, Check, ClaimToken, Counts, Event,
    FailRow, FailValue, Heartbeat, InstanceDetail, JobRow, ListKind, ListRow, PendingRow,
    ResultRow, ResultValue, Selected, Selector, State, Usage,
};

type R<T, C> = Result<T, <C as Conn>::Error>;

// The selectors: each names instances with the columns of a `Selected`.
static BY_ID: Sql =
    Sql::new("SELECT id, job, created, state, retried_by FROM instances WHERE id = $1");
static BY_CREATED: Sql = Sql::new(
    "SELECT id, job, created, state, retried_by FROM instances WHERE created = $1 ORDER BY id",
);
static BY_HASH: Sql = Sql::new(
    "SELECT id, job, created, state, retried_by FROM instances
     WHERE job = $1 OR id IN (SELECT instance FROM attempts WHERE stdout = $1 AND outcome = 'result')
     ORDER BY id",
);
static BY_BATCH: Sql = Sql::new(
    "SELECT id, job, created, state, retried_by FROM instances
     WHERE batch = (SELECT id FROM batches WHERE name = $1) ORDER BY id",
);
// `state <> 'pending'`, said with one other state: SQLite's state index leaves pending
// instances out, and is used only where the statement says so too.
static ALL_FAILED: Sql = Sql::new(
    "SELECT id, job, created, state, retried_by FROM instances
     WHERE state = 'fail' AND state <> 'pending' AND retried_by IS NULL ORDER BY id",
);
static JOBS_PAGE: Sql = Sql::new(
    "SELECT j.id, j.key, j.size, j.created,
       (SELECT string_agg(CAST(i.created AS TEXT), ',') FROM instances i
        WHERE i.job = j.key AND i.state = 'running')
     FROM jobs j WHERE j.id > $1
       AND (CAST($3 AS TEXT) IS NULL OR EXISTS(SELECT 1 FROM instances b WHERE b.job = j.key
         AND b.batch = (SELECT id FROM batches WHERE name = $3)))
     ORDER BY j.id LIMIT $2",
);
static PENDING_PAGE: Sql = Sql::each(
    // NOT INDEXED: walk the rowid from the cursor (one pass over the table in all),
    // instead of gathering and sorting both states' rows per page.
    "SELECT id, job, created, state, priority, run_at, attempts FROM instances NOT INDEXED
     WHERE id > $1 AND state IN ('waiting', 'pending', 'running')
       AND (CAST($3 AS TEXT) IS NULL OR batch = (SELECT id FROM batches WHERE name = $3))
     ORDER BY id LIMIT $2",
    "SELECT id, job, created, state, priority, run_at, attempts FROM instances
     WHERE id > $1 AND state IN ('waiting', 'pending', 'running')
       AND (CAST($3 AS TEXT) IS NULL OR batch = (SELECT id FROM batches WHERE name = $3))
     ORDER BY id LIMIT $2",
);
static RESULTS_PAGE: Sql = Sql::new(
    "SELECT i.id, i.job, i.created, a.start, a.\"end\", a.stdout, a.stdout_size, a.stderr,
       a.exit_code, i.attempts, a.cached, a.max_rss, a.cpu_user_ms + a.cpu_sys_ms
     FROM instances i JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
     WHERE i.state = 'result' AND i.state <> 'pending' AND i.id > $1
       AND (CAST($3 AS TEXT) IS NULL OR i.batch = (SELECT id FROM batches WHERE name = $3))
     ORDER BY i.id LIMIT $2",
);
static FAILS_PAGE: Sql = Sql::new(
    "SELECT i.id, i.job, i.created, a.start, a.\"end\", a.stdout, a.stderr, a.exit_code,
       a.signal, COALESCE(i.note, a.message), i.attempts, a.max_rss,
       a.cpu_user_ms + a.cpu_sys_ms
     FROM instances i LEFT JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
     WHERE i.state = $3 AND i.state <> 'pending' AND i.id > $1
       AND (CAST($4 AS TEXT) IS NULL OR i.batch = (SELECT id FROM batches WHERE name = $4))
     ORDER BY i.id LIMIT $2",
);
static INSTANCE: Sql = Sql::new(
    "SELECT i.job, i.created, i.state, i.priority, i.run_at, i.timeout_ms, i.retries, i.cached,
       b.name, i.deps, i.waiting_on, i.note, i.context, i.needs, i.conc_key, i.conc_limit
     FROM instances i LEFT JOIN batches b ON b.id = i.batch WHERE i.id = $1",
);
static ATTEMPTS: Sql = Sql::new(
    "SELECT attempt, worker, outcome, start, \"end\", exit_code, signal, stdout, stdout_size,
       stderr, stderr_size, message, cached, max_rss, cpu_user_ms, cpu_sys_ms
     FROM attempts WHERE instance = $1 ORDER BY attempt",
);
static EVENTS: Sql = Sql::new(
    "SELECT id, time, kind, job, created, instance, data FROM events
     WHERE id > $1 ORDER BY id LIMIT $2",
);
static LAST_EVENT: Sql = Sql::new("SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) FROM events");
static COUNTS: Sql = Sql::each(
    // Each count read from an index: pending instances are in the pending index only.
    "SELECT state, COUNT(*) FROM instances WHERE state <> 'pending' GROUP BY state
     UNION ALL SELECT 'pending', COUNT(*) FROM instances INDEXED BY instances_pending
     WHERE state = 'pending'",
    "SELECT state, COUNT(*) FROM instances GROUP BY state",
);
static BATCHES_PAGE: Sql = Sql::new(
    "SELECT b.id, b.name, b.created, i.state, COUNT(i.id)
     FROM batches b LEFT JOIN instances i ON i.batch = b.id
     WHERE b.id IN (SELECT id FROM batches WHERE id > $1 ORDER BY id LIMIT $2)
       AND (CAST($3 AS TEXT) IS NULL OR b.name = $3)
     GROUP BY b.id, b.name, b.created, i.state ORDER BY b.id",
);
static STATUS: Sql = Sql::new(
    "SELECT cancel_requested FROM instances WHERE id = $1 AND state = 'running' AND attempts = $2",
);
static INLINE_BLOB: Sql = Sql::new(
    "SELECT payload FROM jobs WHERE key = $1 AND payload IS NOT NULL
     UNION ALL SELECT data FROM inline_blobs WHERE key = $1 LIMIT 1",
);
static IS_REFERENCED: Sql = Sql::new(
    "SELECT EXISTS(SELECT 1 FROM jobs WHERE key = $1 AND payload IS NULL)
        OR (NOT EXISTS(SELECT 1 FROM inline_blobs WHERE key = $1)
            AND (EXISTS(SELECT 1 FROM attempts WHERE stdout = $1)
                 OR EXISTS(SELECT 1 FROM attempts WHERE stderr = $1)))",
);
static JOB_REFS: Sql =
    Sql::new("SELECT key FROM jobs WHERE id > $1 AND id <= $2 AND payload IS NULL ORDER BY id");
// Outputs kept inline name no blob in the store.
static OUTPUT_REFS: Sql = Sql::new(
    "SELECT instance, attempt,
       CASE WHEN EXISTS(SELECT 1 FROM inline_blobs b WHERE b.key = a.stdout) THEN NULL ELSE a.stdout END,
       CASE WHEN EXISTS(SELECT 1 FROM inline_blobs b WHERE b.key = a.stderr) THEN NULL ELSE a.stderr END
     FROM attempts a
     WHERE instance > $1 AND instance <= $2 ORDER BY instance, attempt",
);
static MORE_REFS: Sql = Sql::new(
    "SELECT EXISTS(SELECT 1 FROM jobs WHERE id > $1) OR EXISTS(SELECT 1 FROM instances WHERE id > $1)",
);
static INLINE_PAYLOADS: Sql = Sql::new("SELECT key, payload FROM jobs WHERE payload IS NOT NULL");
static INLINE_OUTPUTS: Sql = Sql::new("SELECT key, data FROM inline_blobs");

/// The ids of the instances `sel` selects, in order.
pub(crate) async fn select<C: Conn>(c: &mut C, sel: &Selector) -> R<Vec<i64>, C> {
    Ok(select_states(c, sel)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect())
}

/// The instances `sel` selects, in id order, with their states.
pub(crate) async fn select_states<C: Conn>(c: &mut C, sel: &Selector) -> R<Vec<Selected>, C> {
    let row = |r: &C::Row<'_>| {
        Ok(Selected {
            id: r.req_int(0)?,
            job: r.hash(1)?,
            created: r.req_int(2)?,
            state: r.state(3)?,
            retried_by: r.int(4)?,
        })
    };
    match sel {
        Selector::Id(i) => c.rows(&BY_ID, &args![*i], row).await,
        Selector::Created(t) => c.rows(&BY_CREATED, &args![*t], row).await,
        Selector::Hash(h) => c.rows(&BY_HASH, &args![h], row).await,
        Selector::AllFailed => c.rows(&ALL_FAILED, &[], row).await,
        Selector::Batch(b) => c.rows(&BY_BATCH, &args![b.as_str()], row).await,
    }
}

/// One page of `kind`'s rows after cursor `after` (see
/// [`Queue::list_page`](crate::queue::Queue::list_page)).
pub(crate) async fn list_page<C: Conn>(
    c: &mut C,
    kind: ListKind,
    (after, limit): (i64, i64),
    batch: Option<&str>,
) -> R<Vec<ListRow>, C> {
    match kind {
        ListKind::Job => {
            c.rows(&JOBS_PAGE, &args![after, limit, batch], |r| job_row(r))
                .await
        }
        ListKind::Pending => {
            c.rows(&PENDING_PAGE, &args![after, limit, batch], |r| {
                let state = r.state(3)?;
                Ok(ListRow::Pending(PendingRow {
                    id: r.req_int(0)?,
                    job: r.hash(1)?,
                    created: r.req_int(2)?,
                    running: state == State::Running,
                    waiting: state == State::Waiting,
                    priority: r.req_int(4)?,
                    run_at: r.req_int(5)?,
                    attempts: r.req_int(6)?,
                }))
            })
            .await
        }
        ListKind::Result => {
            c.rows(&RESULTS_PAGE, &args![after, limit, batch], |r| {
                result_row(r)
            })
            .await
        }
        ListKind::Fail | ListKind::Cancelled => {
            let state = if kind == ListKind::Fail {
                "fail"
            } else {
                "cancelled"
            };
            let a = args![after, limit, state, batch];
            c.rows(&FAILS_PAGE, &a, |r| fail_row(r)).await
        }
    }
}

fn job_row<R: Row>(r: &R) -> Result<ListRow, R::Error> {
    let mut running: Vec<i64> = r
        .text(4)?
        .unwrap_or_default()
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    running.sort_unstable();
    Ok(ListRow::Job(JobRow {
        cursor: r.req_int(0)?,
        key: r.hash(1)?,
        size: r.unsigned(2)?.unwrap_or(0),
        created: r.req_int(3)?,
        running,
    }))
}

fn result_row<R: Row>(r: &R) -> Result<ListRow, R::Error> {
    let job = r.hash(1)?;
    let created = r.req_int(2)?;
    Ok(ListRow::Result(ResultRow {
        key: (job, created),
        value: ResultValue {
            id: r.req_int(0)?,
            created,
            start: r.req_int(3)?,
            end: r.int(4)?.unwrap_or(0),
            hash: r.hash(5)?,
            size: r.unsigned(6)?.unwrap_or(0),
            stderr: r.opt_hash(7)?,
            exit_code: r.int32(8)?,
            attempts: r.req_int(9)?,
            cached: r.flag(10)?,
            max_rss: r.unsigned(11)?,
            cpu_ms: r.unsigned(12)?,
        },
    }))
}

fn fail_row<R: Row>(r: &R) -> Result<ListRow, R::Error> {
    let job = r.hash(1)?;
    let created = r.req_int(2)?;
    Ok(ListRow::Fail(FailRow {
        key: (job, created),
        value: FailValue {
            id: r.req_int(0)?,
            created,
            start: r.int(3)?,
            end: r.int(4)?,
            stdout: r.opt_hash(5)?,
            stderr: r.opt_hash(6)?,
            exit_code: r.int32(7)?,
            signal: r.int32(8)?,
            message: r
                .text(9)?
                .unwrap_or_else(|| "cancelled before it ran".into()),
            attempts: r.req_int(10)?,
            max_rss: r.unsigned(11)?,
            cpu_ms: r.unsigned(12)?,
        },
    }))
}

/// Instance `id` with all its attempts, if it exists.
pub(crate) async fn instance_detail<C: Conn>(c: &mut C, id: i64) -> R<Option<InstanceDetail>, C> {
    let head = c
        .opt(&INSTANCE, &args![id], |r| {
            Ok(InstanceDetail {
                id,
                job: r.hash(0)?,
                created: r.req_int(1)?,
                state: r.state(2)?,
                priority: r.req_int(3)?,
                run_at: r.req_int(4)?,
                timeout_ms: r.unsigned(5)?,
                retries: r.unsigned(6)?,
                cached: r.flag(7)?,
                batch: r.text(8)?,
                deps: r.unsigned(9)?.unwrap_or(0),
                waiting_on: r.unsigned(10)?.unwrap_or(0),
                note: r.text(11)?,
                context: r.exec_context(12)?,
                needs: r.needs(13)?,
                concurrency: r.concurrency(14)?,
                attempts: Vec::new(),
            })
        })
        .await?;
    let Some(mut detail) = head else {
        return Ok(None);
    };
    detail.attempts = c
        .rows(&ATTEMPTS, &args![id], |r| {
            Ok(AttemptRow {
                attempt: r.req_int(0)?,
                worker: r.req_text(1)?,
                outcome: r.text(2)?,
                report: AttemptReport {
                    start: r.req_int(3)?,
                    end: r.int(4)?.unwrap_or(0),
                    exit_code: r.int32(5)?,
                    signal: r.int32(6)?,
                    stdout: r.blob(7, 8)?,
                    stderr: r.blob(9, 10)?,
                    message: r.text(11)?,
                    cached: r.flag(12)?,
                    usage: match (r.unsigned(13)?, r.unsigned(14)?, r.unsigned(15)?) {
                        (Some(rss), Some(user), Some(sys)) => Some(Usage::new(rss, user, sys)),
                        _ => None,
                    },
                    ..AttemptReport::default()
                },
            })
        })
        .await?;
    Ok(Some(detail))
}

/// Up to `limit` events after id `after`, in order.
pub(crate) async fn events<C: Conn>(c: &mut C, after: i64, limit: i64) -> R<Vec<Event>, C> {
    c.rows(&EVENTS, &args![after, limit], |r| {
        let kind = r.req_text(2)?;
        Ok(Event {
            id: r.req_int(0)?,
            time: r.req_int(1)?,
            event: kind
                .parse()
                .map_err(|e: Error| <C::Row<'_> as Row>::corrupt(e.to_string()))?,
            job: r.hash(3)?,
            created: r.int(4)?,
            instance: r.int(5)?,
            data: r
                .text(6)?
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or(serde_json::Value::Null),
        })
    })
    .await
}

/// The newest event's id (0 when there is none).
pub(crate) async fn last_event_id<C: Conn>(c: &mut C) -> R<i64, C> {
    c.one(&LAST_EVENT, &[], |r| r.req_int(0)).await
}

/// How many instances are in each state.
pub(crate) async fn counts<C: Conn>(c: &mut C) -> R<Counts, C> {
    let mut counts = Counts::default();
    c.each(&COUNTS, &[], |r| {
        *counts.slot(r.state(0)?) = r.unsigned(1)?.unwrap_or(0);
        Ok(())
    })
    .await?;
    Ok(counts)
}

/// Up to `limit` batches with ids above `after` (only the one named `name`, if
/// given), in id order, with their counts.
pub(crate) async fn batches_page<C: Conn>(
    c: &mut C,
    (after, limit): (i64, i64),
    name: Option<&str>,
) -> R<Vec<BatchCounts>, C> {
    let mut out: Vec<BatchCounts> = Vec::new();
    c.each(&BATCHES_PAGE, &args![after, limit, name], |r| {
        let id = r.req_int(0)?;
        if out.last().is_none_or(|b| b.id != id) {
            out.push(BatchCounts {
                id,
                batch: r.req_text(1)?,
                created: r.req_int(2)?,
                total: 0,
                counts: Counts::default(),
            });
        }
        if let (Some(b), Some(_)) = (out.last_mut(), r.str(3)?) {
            let n = r.unsigned(4)?.unwrap_or(0);
            *b.counts.slot(r.state(3)?) = n;
            b.total += n;
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// Whether attempt `t` still holds its lease, and whether a cancel was requested.
pub(crate) async fn status<C: Conn>(c: &mut C, t: &ClaimToken) -> R<Heartbeat, C> {
    let row = c.opt(&STATUS, &args![t.id, t.token], |r| r.flag(0)).await?;
    match row {
        Some(cancel_requested) => Ok(Heartbeat { cancel_requested }),
        None => Err(Error::Fenced {
            instance: t.id,
            token: t.token,
        }
        .into()),
    }
}

/// The bytes of a payload or an output kept inline in the queue. The empty output is
/// never stored (see [`Hash::EMPTY`]): its bytes are known.
pub(crate) async fn inline_blob<C: Conn>(c: &mut C, hash: &Hash) -> R<Option<Vec<u8>>, C> {
    if *hash == Hash::EMPTY {
        return Ok(Some(Vec::new()));
    }
    let row = c.opt(&INLINE_BLOB, &args![hash], |r| r.bytes(0)).await?;
    Ok(row.flatten())
}

/// Whether a row names blob `hash` in the store.
pub(crate) async fn is_referenced<C: Conn>(c: &mut C, hash: &Hash) -> R<bool, C> {
    c.one(&IS_REFERENCED, &args![hash], |r| r.flag(0)).await
}

/// The blobs named by jobs and attempts with ids in `(after, after + span]` (see
/// [`Queue::references_page`](crate::queue::Queue::references_page)).
pub(crate) async fn references_page<C: Conn>(
    c: &mut C,
    after: i64,
    span: i64,
) -> R<(Vec<BlobReference>, Option<i64>), C> {
    let end = after.saturating_add(span.max(1));
    let mut out = Vec::new();
    c.each(&JOB_REFS, &args![after, end], |r| {
        let hash = r.hash(0)?;
        out.push(BlobReference {
            hash,
            owner: format!("job {hash}"),
        });
        Ok(())
    })
    .await?;
    c.each(&OUTPUT_REFS, &args![after, end], |r| {
        let (id, n) = (r.req_int(0)?, r.req_int(1)?);
        for (i, which) in [(2, "stdout"), (3, "stderr")] {
            // An empty output names no blob anywhere (it is known without one).
            if let Some(hash) = r.opt_hash(i)?.filter(|h| *h != Hash::EMPTY) {
                let owner = format!("instance {id} attempt {n} {which}");
                out.push(BlobReference { hash, owner });
            }
        }
        Ok(())
    })
    .await?;
    let more = c.one(&MORE_REFS, &args![end], |r| r.flag(0)).await?;
    Ok((out, more.then_some(end)))
}

/// Re-hashes the bytes kept inline into `check`: each payload and output must hash to
/// its key. Streams every row (there may be millions).
pub(crate) async fn check_inline<C: Conn>(c: &mut C, check: &mut Check) -> R<(), C> {
    for (sql, what) in [
        (&INLINE_PAYLOADS, "job {key}: its inline payload"),
        (&INLINE_OUTPUTS, "inline blob {key}"),
    ] {
        c.each(sql, &[], |r| {
            let key = r.req_text(0)?;
            let bytes = r.bytes(1)?.unwrap_or_default();
            check.inline += 1;
            check.inline_bytes += bytes.len() as u64;
            let actual = Hash::of(&bytes);
            if actual.to_hex() != key {
                let owner = what.replace("{key}", &key);
                check.problems.push(format!("{owner} hashes to {actual}"));
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sql::sqlite_plan;

    #[test]
    fn the_lookups_of_an_output_use_its_partial_indexes() {
        let plan = sqlite_plan(&IS_REFERENCED);
        assert!(
            plan.contains("USING COVERING INDEX attempts_stdout"),
            "{plan}"
        );
        assert!(
            plan.contains("USING COVERING INDEX attempts_stderr"),
            "{plan}"
        );
        let plan = sqlite_plan(&BY_HASH);
        assert!(plan.contains("INDEX attempts_stdout"), "{plan}");
    }

    #[test]
    fn the_lookups_by_one_state_and_the_counts_read_an_index() {
        for sql in [&ALL_FAILED, &RESULTS_PAGE, &FAILS_PAGE] {
            let plan = sqlite_plan(sql);
            assert!(plan.contains("INDEX instances_state (state=?"), "{plan}");
        }
        let plan = sqlite_plan(&COUNTS);
        assert!(plan.contains("COVERING INDEX instances_state"), "{plan}");
        assert!(plan.contains("INDEX instances_pending"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}
