//! Reading pages of rows and one instance's detail.

use super::*;

/// Runs `stmt` and maps every row into a presized Vec with a plain loop (a million rows
/// are a million moves of the large [`ListRow`] fewer than through `query_map`'s adapters).
pub(super) fn rows_into<T>(
    stmt: &mut rusqlite::Statement<'_>,
    params: impl rusqlite::Params,
    limit: i64,
    mut f: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<Vec<T>> {
    let mut out = Vec::with_capacity(limit.clamp(0, 1 << 16) as usize);
    let mut rows = stmt.query(params)?;
    while let Some(r) = rows.next()? {
        out.push(f(r)?);
    }
    Ok(out)
}

pub(super) fn list_page(
    conn: &Connection,
    kind: ListKind,
    after: i64,
    limit: i64,
) -> rusqlite::Result<Vec<ListRow>> {
    match kind {
        ListKind::Job => {
            let mut stmt = conn.prepare_cached(
                "SELECT j.id, j.key, j.size, j.created,
                   (SELECT group_concat(i.created) FROM instances i
                    WHERE i.job = j.key AND i.state = 'running')
                 FROM jobs j WHERE j.id > ?1 ORDER BY j.id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit], limit, |r| {
                let running: Option<String> = r.get(4)?;
                let mut running: Vec<i64> = running
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.parse().ok())
                    .collect();
                running.sort_unstable();
                Ok(ListRow::Job(JobRow {
                    cursor: r.get(0)?,
                    key: r.get(1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    created: r.get(3)?,
                    running,
                }))
            })
        }
        ListKind::Pending => {
            let mut stmt = conn.prepare_cached(
                // NOT INDEXED: walk the rowid from the cursor (one pass over the table in
                // all), instead of gathering and sorting both states' rows per page.
                "SELECT id, job, created, state, priority, run_at, attempts FROM instances NOT INDEXED
                 WHERE id > ?1 AND state IN ('pending', 'running') ORDER BY id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit], limit, |r| {
                Ok(ListRow::Pending(PendingRow {
                    id: r.get(0)?,
                    job: r.get(1)?,
                    created: r.get(2)?,
                    running: r.get_ref(3)?.as_str()? == "running",
                    priority: r.get(4)?,
                    run_at: r.get(5)?,
                    attempts: r.get(6)?,
                }))
            })
        }
        ListKind::Result => {
            let mut stmt = conn.prepare_cached(
                "SELECT i.id, i.job, i.created, a.start, a.end, a.stdout, a.stdout_size, a.stderr,
                   a.exit_code, i.attempts, a.cached
                 FROM instances i JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                 WHERE i.state = 'result' AND i.id > ?1 ORDER BY i.id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit], limit, |r| {
                let job = r.get(1)?;
                let created = r.get(2)?;
                Ok(ListRow::Result(ResultRow {
                    key: (job, created),
                    value: ResultValue {
                        id: r.get(0)?,
                        created,
                        start: r.get(3)?,
                        end: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        hash: parse_hash(r.get::<_, Option<String>>(5)?.unwrap_or_default())?,
                        size: r.get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                        stderr: r.get(7)?,
                        exit_code: r.get(8)?,
                        attempts: r.get(9)?,
                        cached: r.get(10)?,
                    },
                }))
            })
        }
        ListKind::Fail | ListKind::Cancelled => {
            let state = if kind == ListKind::Fail {
                "fail"
            } else {
                "cancelled"
            };
            let mut stmt = conn.prepare_cached(
                "SELECT i.id, i.job, i.created, a.start, a.end, a.stdout, a.stderr, a.exit_code,
                   a.signal, a.message, i.attempts
                 FROM instances i LEFT JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                 WHERE i.state = ?3 AND i.id > ?1 ORDER BY i.id LIMIT ?2",
            )?;
            rows_into(&mut stmt, params![after, limit, state], limit, |r| {
                let job = r.get(1)?;
                let created = r.get(2)?;
                Ok(ListRow::Fail(FailRow {
                    key: (job, created),
                    value: FailValue {
                        id: r.get(0)?,
                        created,
                        start: r.get(3)?,
                        end: r.get(4)?,
                        stdout: r.get(5)?,
                        stderr: r.get(6)?,
                        exit_code: r.get(7)?,
                        signal: r.get(8)?,
                        message: r
                            .get::<_, Option<String>>(9)?
                            .unwrap_or_else(|| "cancelled before it ran".into()),
                        attempts: r.get(10)?,
                    },
                }))
            })
        }
    }
}

pub(super) fn instance_detail(
    conn: &Connection,
    id: i64,
) -> rusqlite::Result<Option<InstanceDetail>> {
    let head = conn
        .prepare_cached(
            "SELECT job, created, state, priority, run_at, timeout_ms, retries, cached
             FROM instances WHERE id = ?1",
        )?
        .query_row([id], |r| {
            let state: String = r.get(2)?;
            Ok(InstanceDetail {
                id,
                job: r.get(0)?,
                created: r.get(1)?,
                state: state.parse().map_err(|e| {
                    rusqlite::Error::FromSqlConversionFailure(
                        2,
                        rusqlite::types::Type::Text,
                        Box::new(e),
                    )
                })?,
                priority: r.get(3)?,
                run_at: r.get(4)?,
                timeout_ms: r.get::<_, Option<i64>>(5)?.map(|t| t as u64),
                retries: r.get(6)?,
                cached: r.get(7)?,
                attempts: Vec::new(),
            })
        })
        .optional()?;
    let Some(mut detail) = head else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT attempt, worker, outcome, start, end, exit_code, signal, stdout, stdout_size,
           stderr, stderr_size, message, cached
         FROM attempts WHERE instance = ?1 ORDER BY attempt",
    )?;
    let rows = stmt.query_map([id], |r| {
        Ok(AttemptRow {
            attempt: r.get(0)?,
            worker: r.get(1)?,
            outcome: r.get(2)?,
            report: AttemptReport {
                start: r.get(3)?,
                end: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                exit_code: r.get(5)?,
                signal: r.get(6)?,
                stdout: blob(r.get(7)?, r.get(8)?)?,
                stderr: blob(r.get(9)?, r.get(10)?)?,
                message: r.get(11)?,
                cached: r.get(12)?,
                cache_key: None,
                inline: Vec::new(),
            },
        })
    })?;
    detail.attempts = rows.collect::<rusqlite::Result<_>>()?;
    Ok(Some(detail))
}
