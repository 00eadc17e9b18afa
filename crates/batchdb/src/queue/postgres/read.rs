//! Reading pages of rows and one instance's detail.

use super::*;

pub(super) async fn list_page(
    c: &deadpool_postgres::Object,
    kind: ListKind,
    after: i64,
    limit: i64,
) -> TxResult<Vec<ListRow>> {
    match kind {
        ListKind::Job => {
            let rows = c
                .query(
                    "SELECT j.id, j.key, j.size, j.created,
                       ARRAY(SELECT i.created FROM instances i
                             WHERE i.job = j.key AND i.state = 'running' ORDER BY i.created)
                     FROM jobs j WHERE j.id > $1 ORDER BY j.id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ListRow::Job(JobRow {
                        cursor: r.try_get(0)?,
                        key: parse_hash(r.try_get(1)?)?,
                        size: r.try_get::<_, i64>(2)? as u64,
                        created: r.try_get(3)?,
                        running: r.try_get(4)?,
                    }))
                })
                .collect()
        }
        ListKind::Pending => {
            let rows = c
                .query(
                    "SELECT id, job, created, state, priority, run_at, attempts FROM instances
                     WHERE id > $1 AND state IN ('pending', 'running') ORDER BY id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(ListRow::Pending(PendingRow {
                        id: r.try_get(0)?,
                        job: parse_hash(r.try_get(1)?)?,
                        created: r.try_get(2)?,
                        running: r.try_get::<_, &str>(3)? == "running",
                        priority: r.try_get(4)?,
                        run_at: r.try_get(5)?,
                        attempts: r.try_get(6)?,
                    }))
                })
                .collect()
        }
        ListKind::Result => {
            let rows = c
                .query(
                    "SELECT i.id, i.job, i.created, a.start, a.\"end\", a.stdout, a.stdout_size,
                       a.stderr, a.exit_code, i.attempts, a.cached
                     FROM instances i JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                     WHERE i.state = 'result' AND i.id > $1 ORDER BY i.id LIMIT $2",
                    &[&after, &limit],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let job = parse_hash(r.try_get(1)?)?;
                    let created = r.try_get(2)?;
                    Ok(ListRow::Result(ResultRow {
                        key: (job, created),
                        value: ResultValue {
                            id: r.try_get(0)?,
                            created,
                            start: r.try_get(3)?,
                            end: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0),
                            hash: parse_hash(r.try_get::<_, Option<&str>>(5)?.unwrap_or_default())?,
                            size: r.try_get::<_, Option<i64>>(6)?.unwrap_or(0) as u64,
                            stderr: opt_hash(r.try_get(7)?)?,
                            exit_code: r.try_get(8)?,
                            attempts: r.try_get(9)?,
                            cached: r.try_get(10)?,
                        },
                    }))
                })
                .collect()
        }
        ListKind::Fail | ListKind::Cancelled => {
            let state = if kind == ListKind::Fail {
                "fail"
            } else {
                "cancelled"
            };
            let rows = c
                .query(
                    "SELECT i.id, i.job, i.created, a.start, a.\"end\", a.stdout, a.stderr,
                       a.exit_code, a.signal, a.message, i.attempts
                     FROM instances i
                     LEFT JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
                     WHERE i.state = $3 AND i.id > $1 ORDER BY i.id LIMIT $2",
                    &[&after, &limit, &state],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    let job = parse_hash(r.try_get(1)?)?;
                    let created = r.try_get(2)?;
                    Ok(ListRow::Fail(FailRow {
                        key: (job, created),
                        value: FailValue {
                            id: r.try_get(0)?,
                            created,
                            start: r.try_get(3)?,
                            end: r.try_get(4)?,
                            stdout: opt_hash(r.try_get(5)?)?,
                            stderr: opt_hash(r.try_get(6)?)?,
                            exit_code: r.try_get(7)?,
                            signal: r.try_get(8)?,
                            message: r
                                .try_get::<_, Option<String>>(9)?
                                .unwrap_or_else(|| "cancelled before it ran".into()),
                            attempts: r.try_get(10)?,
                        },
                    }))
                })
                .collect()
        }
    }
}

pub(super) async fn instance_detail(
    c: &deadpool_postgres::Object,
    id: i64,
) -> TxResult<Option<InstanceDetail>> {
    let head = c
        .query_opt(
            "SELECT job, created, state, priority, run_at, timeout_ms, retries, cached
             FROM instances WHERE id = $1",
            &[&id],
        )
        .await?;
    let Some(r) = head else { return Ok(None) };
    let state: String = r.try_get(2)?;
    let mut detail = InstanceDetail {
        id,
        job: parse_hash(r.try_get(0)?)?,
        created: r.try_get(1)?,
        state: state.parse().map_err(corrupt)?,
        priority: r.try_get(3)?,
        run_at: r.try_get(4)?,
        timeout_ms: r.try_get::<_, Option<i64>>(5)?.map(|t| t as u64),
        retries: r.try_get::<_, Option<i64>>(6)?.map(|n| n as u32),
        cached: r.try_get(7)?,
        attempts: Vec::new(),
    };
    for r in c
        .query(
            "SELECT attempt, worker, outcome, start, \"end\", exit_code, signal, stdout,
               stdout_size, stderr, stderr_size, message, cached
             FROM attempts WHERE instance = $1 ORDER BY attempt",
            &[&id],
        )
        .await?
    {
        detail.attempts.push(AttemptRow {
            attempt: r.try_get(0)?,
            worker: r.try_get(1)?,
            outcome: r.try_get(2)?,
            report: AttemptReport {
                start: r.try_get(3)?,
                end: r.try_get::<_, Option<i64>>(4)?.unwrap_or(0),
                exit_code: r.try_get(5)?,
                signal: r.try_get(6)?,
                stdout: blob(r.try_get(7)?, r.try_get(8)?)?,
                stderr: blob(r.try_get(9)?, r.try_get(10)?)?,
                message: r.try_get(11)?,
                cached: r.try_get(12)?,
                cache_key: None,
                inline: Vec::new(),
            },
        });
    }
    Ok(Some(detail))
}
