//! The statements of a transaction: rows in, attempts started and ended, claims.

use super::*;
use crate::queue::row::{CLAIM_COLS, Candidate, candidate};

/// A value read back that did not parse: the database is corrupt.
pub(super) fn corrupt(e: Error) -> TxError {
    TxError::Corrupt(e.to_string())
}

pub(super) fn parse_hash(s: &str) -> TxResult<Hash> {
    s.parse().map_err(corrupt)
}

pub(super) fn opt_hash(s: Option<String>) -> TxResult<Option<Hash>> {
    s.as_deref().map(parse_hash).transpose()
}

pub(super) fn blob(hash: Option<String>, size: Option<i64>) -> TxResult<Option<BlobInfo>> {
    Ok(opt_hash(hash)?.map(|hash| BlobInfo {
        hash,
        size: size.unwrap_or(0) as u64,
    }))
}

pub(super) async fn insert_job(tx: &mut Tx<'_>, job: &NewJob) -> TxResult<bool> {
    let now = tx.now;
    // A job whose payload was in the store gets it inline when added again with one
    // (so a lost blob is repaired, as re-adding it to the store would).
    let row = tx
        .query_opt(
            "INSERT INTO jobs(key, size, created, payload) VALUES ($1, $2, $3, $4)
             ON CONFLICT (key) DO UPDATE SET payload = EXCLUDED.payload
               WHERE jobs.payload IS NULL AND EXCLUDED.payload IS NOT NULL
             RETURNING (xmax = 0)",
            &[
                &job.info.hash.to_hex(),
                &(job.info.size as i64),
                &now,
                &job.inline,
            ],
        )
        .await?;
    let Some(row) = row else { return Ok(false) };
    tx.changed = true;
    let inserted: bool = row.try_get(0)?;
    if inserted {
        tx.event(
            EventKind::Create,
            &job.info.hash,
            None,
            serde_json::json!({"size": job.info.size}),
        );
    }
    Ok(inserted)
}

pub(super) async fn insert_instance(
    tx: &mut Tx<'_>,
    job: &Hash,
    opts: &PushOptions,
) -> TxResult<Instance> {
    let now = tx.now;
    // `created` is unique across all instances: a push landing in a millisecond
    // already taken gets the next free one (the counter row's lock serializes pushes).
    let created: i64 = tx
        .query_one(
            "UPDATE counters SET value = GREATEST(value + 1, $1) WHERE name = 'created' RETURNING value",
            &[&now],
        )
        .await?
        .try_get(0)?;
    let timeout = opts.timeout.map(|t| t.as_millis() as i64);
    let retries = opts.retries.map(i64::from);
    let run_at = opts.run_at.unwrap_or(now);
    let id: i64 = tx
        .query_one(
            "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached)
             VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7) RETURNING id",
            &[
                &job.to_hex(),
                &created,
                &opts.priority,
                &run_at,
                &timeout,
                &retries,
                &opts.cached,
            ],
        )
        .await?
        .try_get(0)?;
    let data = match opts.run_at {
        Some(t) if t > now => serde_json::json!({"run_at": t}),
        _ => serde_json::Value::Null,
    };
    tx.event(EventKind::Push, job, Some((id, created)), data);
    Ok(Instance {
        id,
        job: *job,
        created,
    })
}

pub(super) async fn start_attempt(
    tx: &mut Tx<'_>,
    c: &Candidate,
    req: &ClaimRequest,
    cache_key: Option<Hash>,
) -> TxResult<(ClaimToken, String)> {
    let now = tx.now;
    let token = c.attempts + 1;
    let attempt_id = crate::queue::attempt_id::new_attempt_id();
    let until = now + req.lease.as_millis() as i64;
    tx.execute(
        "UPDATE instances SET state = 'running', attempts = $2, lease_until = $3, cache_key = $4
         WHERE id = $1",
        &[&c.id, &token, &until, &cache_key.map(|k| k.to_hex())],
    )
    .await?;
    tx.execute(
        "INSERT INTO attempts(instance, attempt, worker, start, attempt_id)
         VALUES ($1, $2, $3, $4, $5)",
        &[&c.id, &token, &req.worker, &now, &attempt_id],
    )
    .await?;
    tx.event(
        EventKind::Start,
        &c.job,
        Some((c.id, c.created)),
        serde_json::json!({"attempt": token, "worker": req.worker}),
    );
    Ok((ClaimToken { id: c.id, token }, attempt_id))
}

pub(super) async fn cache_lookup(tx: &Tx<'_>, key: &Hash) -> TxResult<Option<AttemptReport>> {
    let row = tx
        .query_opt(
            "SELECT a.exit_code, a.stdout, a.stdout_size, a.stderr, a.stderr_size
             FROM cache c JOIN attempts a ON a.instance = c.instance AND a.attempt = c.attempt
             WHERE c.key = $1 AND a.outcome = 'result'",
            &[&key.to_hex()],
        )
        .await?;
    row.map(|r| {
        Ok(AttemptReport {
            exit_code: r.try_get(0)?,
            stdout: blob(r.try_get(1)?, r.try_get(2)?)?,
            stderr: blob(r.try_get(3)?, r.try_get(4)?)?,
            cached: true,
            ..AttemptReport::default()
        })
    })
    .transpose()
}

pub(super) async fn record_attempt(
    tx: &mut Tx<'_>,
    t: &ClaimToken,
    outcome: &str,
    r: &AttemptReport,
) -> TxResult<()> {
    tx.execute(
        "UPDATE attempts SET \"end\" = $3, outcome = $4, exit_code = $5, signal = $6, stdout = $7,
           stdout_size = $8, stderr = $9, stderr_size = $10, message = $11, cached = $12
         WHERE instance = $1 AND attempt = $2",
        &[
            &t.id,
            &t.token,
            &r.end,
            &outcome,
            &r.exit_code,
            &r.signal,
            &r.stdout.map(|b| b.hash.to_hex()),
            &r.stdout.map(|b| b.size as i64),
            &r.stderr.map(|b| b.hash.to_hex()),
            &r.stderr.map(|b| b.size as i64),
            &r.message,
            &r.cached,
        ],
    )
    .await?;
    for data in &r.inline {
        tx.execute(
            "INSERT INTO inline_blobs(key, data) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&Hash::of(data).to_hex(), data],
        )
        .await?;
    }
    Ok(())
}

/// Carries out transition `tr` of attempt `t` (see [`policy::finish`]); the caller
/// has checked the fencing token.
pub(super) async fn finish_tx(
    tx: &mut Tx<'_>,
    t: &ClaimToken,
    (job, created): (&Hash, i64),
    tr: &Transition<'_>,
) -> TxResult<Finished> {
    let now = tx.now;
    record_attempt(tx, t, tr.attempt.as_str(), tr.report).await?;
    tx.execute(
        "UPDATE instances SET state = $2, ended = COALESCE($3, ended),
           run_at = COALESCE($4, run_at), failures = failures + $5, lease_until = NULL,
           cache_key = CASE WHEN $6 THEN NULL ELSE cache_key END
         WHERE id = $1",
        &[
            &t.id,
            &tr.state.as_str(),
            &tr.ends.then_some(now),
            &tr.run_at,
            &i64::from(tr.counts_failure),
            &tr.clears_cache_key,
        ],
    )
    .await?;
    if let Some(k) = tr.fills_cache {
        tx.execute(
            "INSERT INTO cache(key, instance, attempt) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET instance = EXCLUDED.instance,
               attempt = EXCLUDED.attempt",
            &[&k.to_hex(), &t.id, &t.token],
        )
        .await?;
    }
    tx.event(tr.event, job, Some((t.id, created)), tr.data.clone());
    Ok(tr.finished)
}

/// The query naming the instances a selector selects, and its parameters.
pub(super) fn select_query(sel: &Selector) -> (&'static str, Vec<Box<dyn ToSql + Sync + Send>>) {
    match sel {
        Selector::Id(id) => (
            "SELECT id FROM instances WHERE id = $1",
            vec![Box::new(*id)],
        ),
        Selector::Created(c) => (
            "SELECT id FROM instances WHERE created = $1 ORDER BY id",
            vec![Box::new(*c)],
        ),
        Selector::Hash(h) => (
            "SELECT id FROM instances WHERE job = $1
             UNION SELECT instance FROM attempts WHERE stdout = $1 AND outcome = 'result'
             ORDER BY 1",
            vec![Box::new(h.to_hex())],
        ),
        Selector::AllFailed => (
            "SELECT id FROM instances WHERE state = 'fail' AND retried_by IS NULL ORDER BY id",
            vec![],
        ),
    }
}

pub(super) fn params(p: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    p.iter()
        .map(|b| b.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

pub(super) fn ids(rows: &[Row]) -> TxResult<Vec<i64>> {
    rows.iter()
        .map(|r| r.try_get(0).map_err(TxError::Pg))
        .collect()
}

pub(super) struct InstRow {
    pub(super) job: Hash,
    pub(super) created: i64,
    pub(super) state: State,
    pub(super) attempts: i64,
    pub(super) cancel_requested: bool,
}

/// Reads and locks one instance row.
pub(super) async fn lock_inst(tx: &Tx<'_>, id: i64) -> TxResult<Option<InstRow>> {
    let row = tx
        .query_opt(
            "SELECT job, created, state, attempts, cancel_requested FROM instances
             WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    row.map(|r| {
        Ok(InstRow {
            job: parse_hash(r.try_get(0)?)?,
            created: r.try_get(1)?,
            state: r.try_get::<_, &str>(2)?.parse().map_err(corrupt)?,
            attempts: r.try_get(3)?,
            cancel_requested: r.try_get(4)?,
        })
    })
    .transpose()
}

pub(super) fn fenced(t: &ClaimToken) -> TxError {
    TxError::Domain(Error::Fenced {
        instance: t.id,
        token: t.token,
    })
}

/// One claim, in transaction `tx` (see [`Queue::claim`]): expired leases taken over (or
/// ended), then due pending instances.
pub(super) async fn claim_tx(tx: &mut Tx<'_>, req: &ClaimRequest) -> TxResult<Vec<Claim>> {
    let now = tx.now;
    let mut out = Vec::new();
    // 1. Take over attempts whose worker stopped renewing its lease.
    let rows = tx
        .query(
            &format!(
                "SELECT {CLAIM_COLS}, cancel_requested FROM instances
                 WHERE state = 'running' AND lease_until < $1
                 ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
            &[&now, &(req.limit as i64)],
        )
        .await?;
    for r in rows {
        let c = candidate(&r)?;
        let cancel: bool = r.try_get(8)?;
        let old = ClaimToken {
            id: c.id,
            token: c.attempts,
        };
        let lost_before: i64 = tx
            .query_one(
                "SELECT COUNT(*) FROM attempts WHERE instance = $1 AND outcome = 'lost'",
                &[&c.id],
            )
            .await?
            .try_get(0)?;
        let lost = match policy::expired(now, cancel, lost_before) {
            policy::Expired::TakeOver(lost) => lost,
            policy::Expired::Cancel(end) | policy::Expired::GiveUp(end) => {
                let tr = policy::finish(&old, &end, cancel);
                finish_tx(tx, &old, (&c.job, c.created), &tr).await?;
                continue;
            }
        };
        let row = tx
            .query_one(
                "SELECT worker, attempt_id FROM attempts WHERE instance = $1 AND attempt = $2",
                &[&old.id, &old.token],
            )
            .await?;
        let lost_attempt = LostAttempt::new(old.id, old.token, row.try_get(0)?, row.try_get(1)?);
        record_attempt(tx, &old, AttemptEnd::Lost.as_str(), &lost).await?;
        let token = start_attempt(tx, &c, req, None).await?;
        let mut claim = c.claim(token, now, true, None);
        claim.lost = Some(lost_attempt);
        out.push(claim);
    }
    // 2. Due pending instances, by priority then order, skipping rows another
    //    worker is claiming right now.
    let remaining = req.limit.saturating_sub(out.len());
    let order = match req.order {
        Order::Newest => "priority DESC, created DESC, id DESC",
        Order::Oldest => "priority DESC, created ASC, id ASC",
    };
    let window = remaining * 4 + 16;
    let mut claimed = 0;
    let mut skipped = 0usize;
    let mut in_batch: Vec<Hash> = Vec::new();
    while claimed < remaining {
        let rows = tx
            .query(
                &format!(
                    "SELECT {CLAIM_COLS} FROM instances
                     WHERE state = 'pending' AND run_at <= $1
                     ORDER BY {order} LIMIT $2 OFFSET $3 FOR UPDATE SKIP LOCKED"
                ),
                &[&now, &(window as i64), &(skipped as i64)],
            )
            .await?;
        let last_window = rows.len() < window;
        for r in rows {
            if claimed == remaining {
                break;
            }
            let c = candidate(&r)?;
            let key = policy::claim_cache_key(req, &c.job, c.cached, c.timeout);
            if let Some(k) = key {
                // One claimer at a time per cache key, so identical runs are
                // started once even by workers claiming at the same moment. A
                // key another claimer holds is in flight: skip it (never wait,
                // so two claimers cannot deadlock on two keys).
                let mine: bool = tx
                    .query_one(
                        "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))",
                        &[&k.to_hex()],
                    )
                    .await?
                    .try_get(0)?;
                if !mine {
                    skipped += 1;
                    continue;
                }
                if let Some(mut hit) = cache_lookup(tx, &k).await? {
                    let token = start_attempt(tx, &c, req, None).await?;
                    hit.start = now;
                    hit.end = now;
                    let served = Outcome::Success(hit.clone());
                    let tr = policy::finish(&token.0, &served, false);
                    finish_tx(tx, &token.0, (&c.job, c.created), &tr).await?;
                    out.push(c.claim(token, now, false, Some(hit)));
                    continue;
                }
                let in_flight = in_batch.contains(&k)
                    || tx
                        .query_opt(
                            "SELECT 1 FROM instances WHERE state = 'running' AND cache_key = $1",
                            &[&k.to_hex()],
                        )
                        .await?
                        .is_some();
                if in_flight {
                    // An identical run is in flight: wait for its result.
                    skipped += 1;
                    continue;
                }
                in_batch.push(k);
            }
            let token = start_attempt(tx, &c, req, key).await?;
            claimed += 1;
            out.push(c.claim(token, now, false, None));
        }
        if last_window {
            break;
        }
    }
    Ok(out)
}

impl crate::queue::row::Row for Row {
    type Error = TxError;

    fn int(&self, i: usize) -> TxResult<Option<i64>> {
        Ok(self.try_get(i)?)
    }

    fn flag(&self, i: usize) -> TxResult<bool> {
        Ok(self.try_get(i)?)
    }

    fn text(&self, i: usize) -> TxResult<Option<String>> {
        Ok(self.try_get(i)?)
    }

    fn corrupt(what: String) -> TxError {
        TxError::Corrupt(what)
    }
}
