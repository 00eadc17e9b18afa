//! `prune`, once for every backend: one bounded step per transaction (see
//! [`crate::queue::PruneStep`]).
//!
//! On PostgreSQL every row is locked (`FOR UPDATE`) by one statement before the next
//! deletes it under a check that runs with a fresh snapshot, so a push that reuses a
//! job, a batch or an inline output at the same moment (it locks the row too: see
//! `write`'s `INSERT_JOB`) either commits first and keeps the row, or waits and
//! stores it anew. Lists of ids and keys travel as one JSON array argument.

use std::collections::BTreeSet;

use super::{Conn, Sql, Tx, args};
use crate::queue::row::Row;
use crate::queue::{PruneCounts, PruneRequest, PruneStep};

type R<T, E> = Result<T, <E as Conn>::Error>;

// $3 cutoff, $4 result, $5 fail, $6 cancelled.
static NEXT_INSTANCE: Sql =
    Sql::new("SELECT id, created FROM instances WHERE id > $1 ORDER BY id LIMIT 1");
static LOCK_INSTANCES: Sql = Sql::new(
    "SELECT id FROM instances
     WHERE id > $1 AND id <= $2 AND COALESCE(ended, created) < $3
       AND ((state = 'result' AND $4) OR (state = 'fail' AND $5) OR (state = 'cancelled' AND $6))
     ORDER BY id FOR UPDATE",
);
static DELETE_INSTANCES: Sql = Sql::new(
    "DELETE FROM instances AS x
     WHERE id > $1 AND id <= $2 AND COALESCE(ended, created) < $3
       AND ((state = 'result' AND $4) OR (state = 'fail' AND $5) OR (state = 'cancelled' AND $6))
       AND NOT EXISTS (SELECT 1 FROM deps d WHERE d.dep = x.id)
     RETURNING id, job, batch",
);
static DELETE_ATTEMPTS: Sql = Sql::new(
    "DELETE FROM attempts
     WHERE instance > $1 AND instance <= $2
       AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = attempts.instance)
     RETURNING stdout, stderr",
);
static DELETE_DEPS: Sql = Sql::new(
    "DELETE FROM deps
     WHERE instance > $1 AND instance <= $2
       AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = deps.instance)",
);
static DELETE_CACHE: Sql = Sql::each(
    "DELETE FROM cache WHERE instance IN (SELECT value FROM json_each($1))",
    "DELETE FROM cache WHERE instance IN (SELECT json_array_elements_text($1::text::json)::bigint)",
);
static LOCK_INLINE: Sql = Sql::each(
    "SELECT key FROM inline_blobs WHERE key IN (SELECT value FROM json_each($1))",
    "SELECT key FROM inline_blobs WHERE key IN (SELECT json_array_elements_text($1::text::json))
     ORDER BY key FOR UPDATE",
);
static DELETE_INLINE: Sql = Sql::each(
    "DELETE FROM inline_blobs WHERE key IN (SELECT value FROM json_each($1))
       AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.stdout = inline_blobs.key)
       AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.stderr = inline_blobs.key)",
    "DELETE FROM inline_blobs WHERE key IN (SELECT json_array_elements_text($1::text::json))
       AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.stdout = inline_blobs.key)
       AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.stderr = inline_blobs.key)",
);
static LOCK_JOBS: Sql = Sql::each(
    "SELECT key FROM jobs WHERE key IN (SELECT value FROM json_each($1))",
    "SELECT key FROM jobs WHERE key IN (SELECT json_array_elements_text($1::text::json))
     ORDER BY key FOR UPDATE",
);
static DELETE_JOBS: Sql = Sql::each(
    "DELETE FROM jobs WHERE key IN (SELECT value FROM json_each($1))
       AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.job = jobs.key)",
    "DELETE FROM jobs WHERE key IN (SELECT json_array_elements_text($1::text::json))
       AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.job = jobs.key)",
);
static LOCK_BATCHES: Sql = Sql::each(
    "SELECT id FROM batches WHERE id IN (SELECT value FROM json_each($1))",
    "SELECT id FROM batches WHERE id IN (SELECT json_array_elements_text($1::text::json)::bigint)
     ORDER BY id FOR UPDATE",
);
static DELETE_BATCHES: Sql = Sql::each(
    "DELETE FROM batches WHERE id IN (SELECT value FROM json_each($1))
       AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.batch = batches.id)",
    "DELETE FROM batches WHERE id IN (SELECT json_array_elements_text($1::text::json)::bigint)
       AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.batch = batches.id)",
);
static NEXT_EVENT: Sql = Sql::new("SELECT id, time FROM events WHERE id > $1 ORDER BY id LIMIT 1");
static DELETE_EVENTS: Sql = Sql::new(
    "DELETE FROM events
     WHERE id > $1 AND id <= $2 AND time < $3
       AND CASE WHEN instance IS NULL
                THEN NOT EXISTS (SELECT 1 FROM jobs j WHERE j.key = events.job)
                ELSE NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = events.instance) END",
);
// A dry run's count: what the first pass would remove.
static COUNT_PRUNABLE: Sql = Sql::new(
    "SELECT COUNT(*) FROM instances AS x
     WHERE COALESCE(ended, created) < $1
       AND ((state = 'result' AND $2) OR (state = 'fail' AND $3) OR (state = 'cancelled' AND $4))
       AND NOT EXISTS (SELECT 1 FROM deps d JOIN instances i ON i.id = d.instance
                       WHERE d.dep = x.id
                         AND NOT (COALESCE(i.ended, i.created) < $1
                                  AND ((i.state = 'result' AND $2) OR (i.state = 'fail' AND $3)
                                       OR (i.state = 'cancelled' AND $4))))",
);

/// A JSON array of ids.
fn json_ids<'a>(ids: impl IntoIterator<Item = &'a i64>) -> String {
    let items: Vec<String> = ids.into_iter().map(i64::to_string).collect();
    format!("[{}]", items.join(","))
}

/// A JSON array of keys (hex hashes: nothing to escape).
fn json_keys<'a>(keys: impl IntoIterator<Item = &'a String>) -> String {
    let items: Vec<String> = keys.into_iter().map(|k| format!("\"{k}\"")).collect();
    format!("[{}]", items.join(","))
}

/// Runs a locking `SELECT` (PostgreSQL: `FOR UPDATE`; SQLite's one writer needs none).
async fn lock<T: Tx>(tx: &mut T, sql: &Sql, list: &str) -> R<(), T> {
    tx.each(sql, &args![list], |_| Ok(())).await
}

/// Runs `step` and returns what it removed and the step after it (`None`: done).
pub(crate) async fn step<T: Tx>(
    tx: &mut T,
    req: &PruneRequest,
    step: PruneStep,
) -> R<(PruneCounts, Option<PruneStep>), T> {
    match step {
        PruneStep::Instances {
            after,
            pass,
            removed,
            kept,
        } => {
            let next = tx
                .opt(&NEXT_INSTANCE, &args![after], |r| {
                    Ok((r.req_int(0)?, r.req_int(1)?))
                })
                .await?;
            // Instances are numbered in push order: none pushed after the cutoff can
            // have ended before it.
            let Some((first, _)) = next.filter(|(_, created)| *created < req.cutoff) else {
                let again = removed && kept;
                let next = if again {
                    PruneStep::Instances {
                        after: 0,
                        pass: pass + 1,
                        removed: false,
                        kept: false,
                    }
                } else {
                    PruneStep::Events { after: 0 }
                };
                return Ok((PruneCounts::default(), Some(next)));
            };
            let (lo, hi) = (first - 1, first - 1 + req.chunk.max(1));
            tx.keep_id_floors().await?;
            let (counts, candidates) = instances(tx, req, (lo, hi)).await?;
            let next = PruneStep::Instances {
                after: hi,
                pass,
                removed: removed || counts.instances > 0,
                kept: kept || candidates > counts.instances,
            };
            Ok((counts, Some(next)))
        }
        PruneStep::Events { after } => {
            let next = tx
                .opt(&NEXT_EVENT, &args![after], |r| {
                    Ok((r.req_int(0)?, r.req_int(1)?))
                })
                .await?;
            let Some((first, _)) = next.filter(|(_, time)| *time < req.cutoff) else {
                return Ok((PruneCounts::default(), None));
            };
            let (lo, hi) = (first - 1, first - 1 + 4 * req.chunk.max(1));
            tx.keep_id_floors().await?;
            let events = tx
                .execute(&DELETE_EVENTS, &args![lo, hi, req.cutoff])
                .await?;
            let counts = PruneCounts {
                events,
                ..PruneCounts::default()
            };
            Ok((counts, Some(PruneStep::Events { after: hi })))
        }
    }
}

/// Removes the prunable instances with ids in `(lo, hi]` and what goes with them;
/// also returns how many were candidates (ended in time) before the dependency check.
async fn instances<T: Tx>(
    tx: &mut T,
    req: &PruneRequest,
    (lo, hi): (i64, i64),
) -> R<(PruneCounts, u64), T> {
    let who = args![lo, hi, req.cutoff, req.result, req.fail, req.cancelled];
    let candidates = tx
        .rows(&LOCK_INSTANCES, &who, |r| r.req_int(0))
        .await?
        .len() as u64;
    let (mut ids, mut jobs, mut batches) = (Vec::new(), BTreeSet::new(), BTreeSet::new());
    tx.each(&DELETE_INSTANCES, &who, |r| {
        ids.push(r.req_int(0)?);
        jobs.insert(r.req_text(1)?);
        if let Some(b) = r.int(2)? {
            batches.insert(b);
        }
        Ok(())
    })
    .await?;
    let mut counts = PruneCounts {
        instances: ids.len() as u64,
        ..PruneCounts::default()
    };
    if ids.is_empty() {
        return Ok((counts, candidates));
    }
    let mut outputs = BTreeSet::new();
    tx.each(&DELETE_ATTEMPTS, &args![lo, hi], |r| {
        counts.attempts += 1;
        outputs.extend(r.text(0)?);
        outputs.extend(r.text(1)?);
        Ok(())
    })
    .await?;
    tx.execute(&DELETE_DEPS, &args![lo, hi]).await?;
    counts.cache_entries = tx.execute(&DELETE_CACHE, &args![json_ids(&ids)]).await?;
    let outputs = json_keys(&outputs);
    lock(tx, &LOCK_INLINE, &outputs).await?;
    counts.inline_outputs = tx.execute(&DELETE_INLINE, &args![outputs.as_str()]).await?;
    let jobs = json_keys(&jobs);
    lock(tx, &LOCK_JOBS, &jobs).await?;
    counts.jobs = tx.execute(&DELETE_JOBS, &args![jobs.as_str()]).await?;
    let batches = json_ids(&batches);
    lock(tx, &LOCK_BATCHES, &batches).await?;
    counts.batches = tx
        .execute(&DELETE_BATCHES, &args![batches.as_str()])
        .await?;
    Ok((counts, candidates))
}

/// How many instances the first pass of `req` would remove (a dry run).
pub(crate) async fn count<C: Conn>(c: &mut C, req: &PruneRequest) -> R<u64, C> {
    let n = c
        .one(
            &COUNT_PRUNABLE,
            &args![req.cutoff, req.result, req.fail, req.cancelled],
            |r| r.req_int(0),
        )
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sql::sqlite_plan;

    #[test]
    fn removing_unused_inline_outputs_looks_them_up_by_index() {
        let plan = sqlite_plan(&DELETE_INLINE);
        assert!(plan.contains("INDEX attempts_stdout"), "{plan}");
        assert!(plan.contains("INDEX attempts_stderr"), "{plan}");
    }
}
