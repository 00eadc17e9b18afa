//! The statements of a transaction: rows in, attempts started and ended, events.

use super::*;
use crate::queue::row::{CLAIM_COLS, Candidate, candidate};

pub(super) fn event(
    tx: &Transaction<'_>,
    now: i64,
    kind: EventKind,
    job: &Hash,
    inst: Option<(i64, i64)>,
    data: serde_json::Value,
) -> rusqlite::Result<()> {
    let data = if data.is_null() {
        None
    } else {
        Some(data.to_string())
    };
    tx.prepare_cached(
        "INSERT INTO events(time, kind, job, created, instance, data) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        now,
        kind.as_str(),
        job.to_hex(),
        inst.map(|i| i.1),
        inst.map(|i| i.0),
        data
    ])?;
    Ok(())
}

pub(super) fn insert_job(tx: &Transaction<'_>, job: &NewJob, now: i64) -> rusqlite::Result<bool> {
    let n = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO jobs(key, size, created, payload) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![
            job.info.hash.to_hex(),
            job.info.size as i64,
            now,
            job.inline
        ])?;
    if n == 0 && job.inline.is_some() {
        // A job whose payload was in the store gets it inline when added again with
        // one (so a lost blob is repaired, as re-adding it to the store would).
        tx.prepare_cached("UPDATE jobs SET payload = ?2 WHERE key = ?1 AND payload IS NULL")?
            .execute(params![job.info.hash.to_hex(), job.inline])?;
    }
    if n == 1 {
        event(
            tx,
            now,
            EventKind::Create,
            &job.info.hash,
            None,
            serde_json::json!({"size": job.info.size}),
        )?;
    }
    Ok(n == 1)
}

/// The newest `created` in the transaction: read once, then kept by the pushes of the
/// same transaction (a bulk add does not look it up again for every row).
#[derive(Default)]
pub(super) struct LastCreated(Option<Option<i64>>);

pub(super) fn insert_instance(
    tx: &Transaction<'_>,
    job: &Hash,
    opts: &PushOptions,
    now: i64,
    last: &mut LastCreated,
) -> rusqlite::Result<Instance> {
    let key = job.to_hex();
    // `created` is unique across all instances: a push landing in a millisecond
    // already taken gets the next free one (the write lock makes this race-free
    // across processes).
    let newest = match last.0 {
        Some(v) => v,
        None => tx
            .prepare_cached("SELECT MAX(created) FROM instances")?
            .query_row([], |r| r.get(0))?,
    };
    let created = newest.map_or(now, |l| now.max(l + 1));
    last.0 = Some(Some(created));
    tx.prepare_cached(
        "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached)
         VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        key,
        created,
        opts.priority,
        opts.run_at.unwrap_or(now),
        opts.timeout.map(|t| t.as_millis() as i64),
        opts.retries,
        opts.cached
    ])?;
    let id = tx.last_insert_rowid();
    let data = match opts.run_at {
        Some(t) if t > now => serde_json::json!({"run_at": t}),
        _ => serde_json::Value::Null,
    };
    event(tx, now, EventKind::Push, job, Some((id, created)), data)?;
    Ok(Instance {
        id,
        job: *job,
        created,
    })
}

pub(super) fn job_exists(tx: &Connection, job: &Hash) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT 1 FROM jobs WHERE key = ?1")?
        .query_row([job.to_hex()], |_| Ok(()))
        .optional()
        .map(|r| r.is_some())
}

/// Reads a hash column without allocating (and validates it, as every parse does).
impl rusqlite::types::FromSql for Hash {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        v.as_str()?
            .parse()
            .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
}

/// Reads a state column (an unknown state is a conversion failure: corrupt).
impl rusqlite::types::FromSql for State {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        v.as_str()?
            .parse()
            .map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e)))
    }
}

pub(super) fn parse_hash(s: String) -> rusqlite::Result<Hash> {
    s.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

pub(super) fn opt_hash(s: Option<String>) -> rusqlite::Result<Option<Hash>> {
    s.map(parse_hash).transpose()
}

pub(super) fn blob(hash: Option<String>, size: Option<i64>) -> rusqlite::Result<Option<BlobInfo>> {
    Ok(opt_hash(hash)?.map(|hash| BlobInfo {
        hash,
        size: size.unwrap_or(0) as u64,
    }))
}

pub(super) fn start_attempt(
    tx: &Transaction<'_>,
    c: &Candidate,
    req: &ClaimRequest,
    now: i64,
    cache_key: Option<Hash>,
) -> rusqlite::Result<(ClaimToken, String)> {
    let token = c.attempts + 1;
    let attempt_id = crate::queue::attempt_id::new_attempt_id();
    tx.prepare_cached(
        "UPDATE instances SET state = 'running', attempts = ?2, lease_until = ?3, cache_key = ?4
         WHERE id = ?1",
    )?
    .execute(params![
        c.id,
        token,
        now + req.lease.as_millis() as i64,
        cache_key.map(|k| k.to_hex())
    ])?;
    tx.prepare_cached(
        "INSERT INTO attempts(instance, attempt, worker, start, attempt_id)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![c.id, token, req.worker, now, attempt_id])?;
    event(
        tx,
        now,
        EventKind::Start,
        &c.job,
        Some((c.id, c.created)),
        serde_json::json!({"attempt": token, "worker": req.worker}),
    )?;
    Ok((ClaimToken { id: c.id, token }, attempt_id))
}

pub(super) fn cache_lookup(
    tx: &Transaction<'_>,
    key: &Hash,
) -> rusqlite::Result<Option<AttemptReport>> {
    tx.prepare_cached(
        "SELECT a.exit_code, a.stdout, a.stdout_size, a.stderr, a.stderr_size
         FROM cache c JOIN attempts a ON a.instance = c.instance AND a.attempt = c.attempt
         WHERE c.key = ?1 AND a.outcome = 'result'",
    )?
    .query_row([key.to_hex()], |r| {
        Ok(AttemptReport {
            exit_code: r.get(0)?,
            stdout: blob(r.get(1)?, r.get(2)?)?,
            stderr: blob(r.get(3)?, r.get(4)?)?,
            cached: true,
            ..AttemptReport::default()
        })
    })
    .optional()
}

pub(super) fn record_attempt(
    tx: &Transaction<'_>,
    t: &ClaimToken,
    outcome: &str,
    r: &AttemptReport,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE attempts SET end = ?3, outcome = ?4, exit_code = ?5, signal = ?6, stdout = ?7,
           stdout_size = ?8, stderr = ?9, stderr_size = ?10, message = ?11, cached = ?12
         WHERE instance = ?1 AND attempt = ?2",
    )?
    .execute(params![
        t.id,
        t.token,
        r.end,
        outcome,
        r.exit_code,
        r.signal,
        r.stdout.map(|b| b.hash.to_hex()),
        r.stdout.map(|b| b.size as i64),
        r.stderr.map(|b| b.hash.to_hex()),
        r.stderr.map(|b| b.size as i64),
        r.message,
        r.cached
    ])?;
    for data in &r.inline {
        tx.prepare_cached("INSERT OR IGNORE INTO inline_blobs(key, data) VALUES (?1, ?2)")?
            .execute(params![Hash::of(data).to_hex(), data])?;
    }
    Ok(())
}

/// Carries out transition `tr` of attempt `t` (see [`policy::finish`]); the caller
/// has checked the fencing token.
pub(super) fn finish_tx(
    tx: &Transaction<'_>,
    t: &ClaimToken,
    (job, created): (&Hash, i64),
    tr: &Transition<'_>,
    now: i64,
) -> rusqlite::Result<Finished> {
    record_attempt(tx, t, tr.attempt.as_str(), tr.report)?;
    tx.prepare_cached(
        "UPDATE instances SET state = ?2, ended = COALESCE(?3, ended),
           run_at = COALESCE(?4, run_at), failures = failures + ?5, lease_until = NULL,
           cache_key = CASE WHEN ?6 THEN NULL ELSE cache_key END
         WHERE id = ?1",
    )?
    .execute(params![
        t.id,
        tr.state.as_str(),
        tr.ends.then_some(now),
        tr.run_at,
        i64::from(tr.counts_failure),
        tr.clears_cache_key,
    ])?;
    if let Some(k) = tr.fills_cache {
        tx.prepare_cached(
            "INSERT OR REPLACE INTO cache(key, instance, attempt) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![k.to_hex(), t.id, t.token])?;
    }
    event(
        tx,
        now,
        tr.event,
        job,
        Some((t.id, created)),
        tr.data.clone(),
    )?;
    Ok(tr.finished)
}

pub(super) fn select_ids(conn: &Connection, sel: &Selector) -> rusqlite::Result<Vec<i64>> {
    let (sql, arg): (&str, rusqlite::types::Value) = match sel {
        Selector::Id(id) => ("SELECT id FROM instances WHERE id = ?1", (*id).into()),
        Selector::Created(c) => (
            "SELECT id FROM instances WHERE created = ?1 ORDER BY id",
            (*c).into(),
        ),
        Selector::Hash(h) => (
            "SELECT id FROM instances WHERE job = ?1
             UNION SELECT instance FROM attempts WHERE stdout = ?1 AND outcome = 'result'
             ORDER BY 1",
            h.to_hex().into(),
        ),
        Selector::AllFailed => (
            "SELECT id FROM instances WHERE state = 'fail' AND retried_by IS NULL AND ?1 ORDER BY id",
            1i64.into(),
        ),
    };
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map([arg], |r| r.get(0))?;
    rows.collect()
}

pub(super) struct InstRow {
    pub(super) job: Hash,
    pub(super) created: i64,
    pub(super) state: State,
    pub(super) attempts: i64,
    pub(super) cancel_requested: bool,
}

pub(super) fn inst_row(conn: &Connection, id: i64) -> rusqlite::Result<Option<InstRow>> {
    conn.prepare_cached(
        "SELECT job, created, state, attempts, cancel_requested FROM instances WHERE id = ?1",
    )?
    .query_row([id], |r| {
        Ok(InstRow {
            job: r.get(0)?,
            created: r.get(1)?,
            state: r.get(2)?,
            attempts: r.get(3)?,
            cancel_requested: r.get(4)?,
        })
    })
    .optional()
}

/// One claim, in transaction `tx` (see [`Queue::claim`]): expired leases taken over (or
/// ended), then due pending instances; also whether it ended an instance or served
/// one from the cache (which must be durable).
pub(super) fn claim_tx(tx: &Transaction<'_>, req: &ClaimRequest) -> TxResult<(Vec<Claim>, bool)> {
    let now = now_ms();
    let mut out = Vec::new();
    // Whether this claim ended an instance (which must be durable).
    let mut terminal = false;
    // 1. Take over attempts whose worker stopped renewing its lease.
    let expired: Vec<(Candidate, bool)> = {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {CLAIM_COLS}, cancel_requested FROM instances
             WHERE state = 'running' AND lease_until < ?1 ORDER BY lease_until LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![now, req.limit as i64], |r| {
            Ok((candidate(r)?, r.get::<_, bool>(8)?))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for (c, cancel) in expired {
        let old = ClaimToken {
            id: c.id,
            token: c.attempts,
        };
        let lost_before: i64 = tx
            .prepare_cached(
                "SELECT COUNT(*) FROM attempts WHERE instance = ?1 AND outcome = 'lost'",
            )?
            .query_row([c.id], |r| r.get(0))?;
        let lost = match policy::expired(now, cancel, lost_before) {
            policy::Expired::TakeOver(lost) => lost,
            policy::Expired::Cancel(end) | policy::Expired::GiveUp(end) => {
                let tr = policy::finish(&old, &end, cancel);
                finish_tx(tx, &old, (&c.job, c.created), &tr, now)?;
                terminal = true;
                continue;
            }
        };
        let lost_attempt = tx
            .prepare_cached(
                "SELECT worker, attempt_id FROM attempts WHERE instance = ?1 AND attempt = ?2",
            )?
            .query_row(params![old.id, old.token], |r| {
                Ok(LostAttempt::new(old.id, old.token, r.get(0)?, r.get(1)?))
            })?;
        record_attempt(tx, &old, AttemptEnd::Lost.as_str(), &lost)?;
        let token = start_attempt(tx, &c, req, now, None)?;
        let mut claim = c.claim(token, now, true, None);
        claim.lost = Some(lost_attempt);
        out.push(claim);
    }
    // 2. Due pending instances, by priority then order.
    let remaining = req.limit.saturating_sub(out.len());
    if remaining == 0 {
        return Ok((out, terminal));
    }
    // INDEXED BY: without statistics SQLite would rather filter on the state
    // index and sort every pending row; the partial index reads only the
    // first rows in order, whatever the queue's length.
    let (index, order) = match req.order {
        Order::Newest => (
            "instances_pending_newest",
            "priority DESC, created DESC, id DESC",
        ),
        Order::Oldest => (
            "instances_pending_oldest",
            "priority DESC, created ASC, id ASC",
        ),
    };
    // Candidates come a window at a time; identical cached runs in flight are
    // skipped (they stay pending, so the next window starts past them).
    let window = remaining * 4 + 16;
    let mut claimed = 0;
    let mut skipped = 0usize;
    let mut in_batch: Vec<Hash> = Vec::new();
    loop {
        let candidates: Vec<Candidate> = {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {CLAIM_COLS} FROM instances INDEXED BY {index}
                 WHERE state = 'pending' AND run_at <= ?1 ORDER BY {order} LIMIT ?2 OFFSET ?3"
            ))?;
            let rows = stmt.query_map(params![now, window as i64, skipped as i64], |r| {
                candidate(r)
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let last_window = candidates.len() < window;
        for c in candidates {
            if claimed == remaining {
                break;
            }
            let key = policy::claim_cache_key(req, &c.job, c.cached, c.timeout);
            if let Some(k) = key {
                if let Some(mut hit) = cache_lookup(tx, &k)? {
                    let token = start_attempt(tx, &c, req, now, None)?;
                    hit.start = now;
                    hit.end = now;
                    let served = Outcome::Success(hit.clone());
                    let tr = policy::finish(&token.0, &served, false);
                    finish_tx(tx, &token.0, (&c.job, c.created), &tr, now)?;
                    out.push(c.claim(token, now, false, Some(hit)));
                    continue;
                }
                let in_flight = in_batch.contains(&k)
                    || tx
                        .prepare_cached(
                            "SELECT 1 FROM instances WHERE state = 'running' AND cache_key = ?1",
                        )?
                        .query_row([k.to_hex()], |_| Ok(()))
                        .optional()?
                        .is_some();
                if in_flight {
                    // An identical run is in flight: wait for its result.
                    skipped += 1;
                    continue;
                }
                in_batch.push(k);
            }
            let token = start_attempt(tx, &c, req, now, key)?;
            claimed += 1;
            out.push(c.claim(token, now, false, None));
        }
        if claimed == remaining || last_window {
            break;
        }
    }
    // A result served from the cache must be as durable as any other.
    let served = out.iter().any(|c| c.cache_hit.is_some());
    Ok((out, served || terminal))
}

impl crate::queue::row::Row for rusqlite::Row<'_> {
    type Error = rusqlite::Error;

    fn int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }

    fn flag(&self, i: usize) -> rusqlite::Result<bool> {
        self.get(i)
    }

    fn text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }

    fn corrupt(what: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, what.into())
    }
}
