//! The write path, once for every backend: jobs and instances in, claims, attempts
//! started and ended, cancel and retry. Each function runs inside the caller's write
//! transaction; the rules come from [`policy`].

use std::time::Duration;

use super::deps::{self, Resolved};
use super::{Conn, Sql, Tx, args};
use crate::error::Error;
use crate::hash::Hash;
use crate::queue::policy::{self, AttemptEnd, Transition};
use crate::queue::row::{CLAIM_COLS, Candidate, Row, candidate};
use crate::queue::types::{
    AttemptReport, Claim, ClaimRequest, ClaimToken, EventKind, Finished, Heartbeat, Instance,
    LostAttempt, NewJob, Order, Outcome, PushOptions, Selector, State,
};

type R<T, E> = Result<T, <E as Conn>::Error>;

// On PostgreSQL an existing job's row is locked (DO UPDATE ... WHERE false writes
// nothing but locks), so a concurrent prune cannot remove the job this push reuses.
static INSERT_JOB: Sql = Sql::each(
    "INSERT INTO jobs(key, size, created, payload) VALUES ($1, $2, $3, $4)
     ON CONFLICT (key) DO NOTHING",
    "INSERT INTO jobs(key, size, created, payload) VALUES ($1, $2, $3, $4)
     ON CONFLICT (key) DO UPDATE SET size = jobs.size WHERE false",
);
static REPAIR_PAYLOAD: Sql =
    Sql::new("UPDATE jobs SET payload = $2 WHERE key = $1 AND payload IS NULL");
static JOB_EXISTS: Sql = Sql::each(
    "SELECT 1 FROM jobs WHERE key = $1",
    "SELECT 1 FROM jobs WHERE key = $1 FOR KEY SHARE",
);
// SQLite reads the new id as its rowid: RETURNING would make it keep a statement
// journal for every insert (a temp-file write per row; a bulk add ran at 0.67 of its
// speed with it).
static INSERT_INSTANCE: Sql = Sql::each(
    "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached,
       batch, deps, waiting_on, note, ended, context, needs, conc_key, conc_limit)
     VALUES ($1, $2, $8, $3, $4, $5, $6, $7, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached,
       batch, deps, waiting_on, note, ended, context, needs, conc_key, conc_limit)
     VALUES ($1, $2, $8, $3, $4, $5, $6, $7, $9, $10, $11, $12, $13, $14, $15, $16, $17)
     RETURNING id",
);
static START_ATTEMPT: Sql = Sql::new(
    "UPDATE instances SET state = 'running', attempts = $2, lease_until = $3, cache_key = $4
     WHERE id = $1",
);
static INSERT_ATTEMPT: Sql = Sql::new(
    "INSERT INTO attempts(instance, attempt, worker, start, attempt_id)
     VALUES ($1, $2, $3, $4, $5)",
);
static CACHE_LOOKUP: Sql = Sql::new(
    "SELECT a.exit_code, a.stdout, a.stdout_size, a.stderr, a.stderr_size
     FROM cache c JOIN attempts a ON a.instance = c.instance AND a.attempt = c.attempt
     WHERE c.key = $1 AND a.outcome = 'result'",
);
static RECORD_ATTEMPT: Sql = Sql::new(
    "UPDATE attempts SET \"end\" = $3, outcome = $4, exit_code = $5, signal = $6, stdout = $7,
       stdout_size = $8, stderr = $9, stderr_size = $10, message = $11, cached = $12,
       max_rss = $13, cpu_user_ms = $14, cpu_sys_ms = $15
     WHERE instance = $1 AND attempt = $2",
);
static INSERT_INLINE: Sql = Sql::each(
    "INSERT INTO inline_blobs(key, data) VALUES ($1, $2) ON CONFLICT DO NOTHING",
    "INSERT INTO inline_blobs(key, data) VALUES ($1, $2)
     ON CONFLICT (key) DO UPDATE SET key = inline_blobs.key WHERE false",
);
static END_INSTANCE: Sql = Sql::new(
    "UPDATE instances SET state = $2, ended = COALESCE($3, ended),
       run_at = COALESCE($4, run_at), failures = failures + $5, lease_until = NULL,
       cache_key = CASE WHEN $6 THEN NULL ELSE cache_key END
     WHERE id = $1",
);
static FILL_CACHE: Sql = Sql::new(
    "INSERT INTO cache(key, instance, attempt) VALUES ($1, $2, $3)
     ON CONFLICT (key) DO UPDATE SET instance = excluded.instance, attempt = excluded.attempt",
);
static LOCK_INSTANCE: Sql = Sql::new(
    "SELECT job, created, state, attempts, cancel_requested FROM instances
     WHERE id = $1 FOR UPDATE",
);
static COUNT_LOST: Sql =
    Sql::new("SELECT COUNT(*) FROM attempts WHERE instance = $1 AND outcome = 'lost'");
static LOST_ATTEMPT: Sql =
    Sql::new("SELECT worker, attempt_id FROM attempts WHERE instance = $1 AND attempt = $2");
static KEY_IN_FLIGHT: Sql =
    Sql::new("SELECT 1 FROM instances WHERE state = 'running' AND cache_key = $1");
static HEARTBEAT: Sql = Sql::new(
    "UPDATE instances SET lease_until = $3
     WHERE id = $1 AND state = 'running' AND attempts = $2
     RETURNING cancel_requested",
);
static CANCEL_PENDING: Sql =
    Sql::new("UPDATE instances SET state = 'cancelled', ended = $2 WHERE id = $1");
static CANCEL_RUNNING: Sql = Sql::new("UPDATE instances SET cancel_requested = TRUE WHERE id = $1");
/// Records job `job` (see [`Queue::create_many`](crate::queue::Queue::create_many));
/// true if it is new.
pub(crate) async fn insert_job<T: Tx>(tx: &mut T, job: &NewJob) -> R<bool, T> {
    let now = tx.now();
    let size = i64::try_from(job.info.size).map_err(|_| Error::Config {
        what: "payload size",
        value: job.info.size.to_string(),
        why: "too large".into(),
    })?;
    let inline = job.inline.as_deref();
    let n = tx
        .execute(&INSERT_JOB, &args![&job.info.hash, size, now, inline])
        .await?;
    if n == 0 && inline.is_some() {
        // A job whose payload was in the store gets it inline when added again with
        // one (so a lost blob is repaired, as re-adding it to the store would).
        tx.execute(&REPAIR_PAYLOAD, &args![&job.info.hash, inline])
            .await?;
    }
    if n == 1 {
        let data = serde_json::json!({"size": job.info.size});
        tx.event(EventKind::Create, &job.info.hash, None, data)
            .await?;
    }
    Ok(n == 1)
}

/// Whether job `job` is recorded.
async fn job_exists<C: Conn>(c: &mut C, job: &Hash) -> R<bool, C> {
    Ok(c.opt(&JOB_EXISTS, &args![job], |_| Ok(())).await?.is_some())
}

/// Pushes a new instance of job `job` (which exists), in the batch and with the
/// dependencies `r` resolved.
pub(crate) async fn insert_instance<T: Tx>(
    tx: &mut T,
    job: &Hash,
    opts: &PushOptions,
    r: &Resolved,
) -> R<Instance, T> {
    let now = tx.now();
    let created = tx.next_created(now).await?;
    let timeout = opts.timeout.map(super::millis);
    let run_at = opts.run_at.unwrap_or(now);
    let state = r.state();
    let ended = (state == State::Cancelled).then_some(now);
    let ndeps = i64::try_from(r.deps.len()).unwrap_or(i64::MAX);
    let id = tx
        .insert_id(
            &INSERT_INSTANCE,
            &args![
                job,
                created,
                opts.priority,
                run_at,
                timeout,
                opts.retries.map(i64::from),
                opts.cached,
                state.as_str(),
                r.batch,
                ndeps,
                r.unmet,
                r.broken.as_deref(),
                ended,
                opts.context.to_text(),
                opts.needs.to_text(),
                opts.concurrency.as_ref().map(|c| c.key.as_str()),
                opts.concurrency.as_ref().map(|c| i64::from(c.limit))
            ],
        )
        .await?;
    deps::insert_deps(tx, id, r).await?;
    let mut data = serde_json::json!({});
    if let Some(t) = opts.run_at.filter(|&t| t > now) {
        data["run_at"] = t.into();
    }
    if let Some(b) = &opts.batch {
        data["batch"] = b.as_str().into();
    }
    if state == State::Waiting {
        data["waiting"] = true.into();
    }
    if data.as_object().is_some_and(serde_json::Map::is_empty) {
        data = serde_json::Value::Null;
    }
    let inst = Some((id, created));
    tx.event(EventKind::Push, job, inst, data).await?;
    if let Some(msg) = &r.broken {
        let data = serde_json::json!({"message": msg});
        tx.event(EventKind::Cancel, job, inst, data).await?;
    }
    Ok(Instance {
        id,
        job: *job,
        created,
    })
}

/// Records jobs and pushes an instance of each (see
/// [`Queue::add_many`](crate::queue::Queue::add_many)).
pub(crate) async fn add_many<T: Tx>(
    tx: &mut T,
    jobs: &[NewJob],
    opts: &PushOptions,
) -> R<Vec<Instance>, T> {
    let keys: Vec<&Hash> = jobs.iter().map(|j| &j.info.hash).collect();
    let resolved = deps::resolve(tx, opts, &keys).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        insert_job(tx, j).await?;
        out.push(insert_instance(tx, &j.info.hash, opts, &resolved).await?);
    }
    Ok(out)
}

/// Records jobs (see [`Queue::create_many`](crate::queue::Queue::create_many)).
pub(crate) async fn create_many<T: Tx>(tx: &mut T, jobs: &[NewJob]) -> R<Vec<bool>, T> {
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        out.push(insert_job(tx, j).await?);
    }
    Ok(out)
}

/// Pushes an instance of a job that must exist (see
/// [`Queue::push`](crate::queue::Queue::push)).
pub(crate) async fn push<T: Tx>(tx: &mut T, job: &Hash, opts: &PushOptions) -> R<Instance, T> {
    if !job_exists(tx, job).await? {
        return Err(Error::JobNotFound(*job).into());
    }
    let resolved = deps::resolve(tx, opts, &[job]).await?;
    insert_instance(tx, job, opts, &resolved).await
}

/// Starts a new attempt of candidate `c`: a new fencing token and attempt id.
async fn start_attempt<T: Tx>(
    tx: &mut T,
    c: &Candidate,
    req: &ClaimRequest,
    cache_key: Option<Hash>,
) -> R<(ClaimToken, String), T> {
    let now = tx.now();
    let token = c.attempts + 1;
    let attempt_id = crate::queue::attempt_id::new_attempt_id();
    let until = now.saturating_add(super::millis(req.lease));
    tx.execute(&START_ATTEMPT, &args![c.id, token, until, cache_key])
        .await?;
    tx.execute(
        &INSERT_ATTEMPT,
        &args![c.id, token, req.worker.as_str(), now, attempt_id.as_str()],
    )
    .await?;
    let data = serde_json::json!({"attempt": token, "worker": req.worker});
    tx.event(EventKind::Start, &c.job, Some((c.id, c.created)), data)
        .await?;
    Ok((ClaimToken { id: c.id, token }, attempt_id))
}

/// The cached result under `key`, if there is one.
async fn cache_lookup<T: Tx>(tx: &mut T, key: &Hash) -> R<Option<AttemptReport>, T> {
    tx.opt(&CACHE_LOOKUP, &args![key], |r| {
        Ok(AttemptReport {
            exit_code: r.int32(0)?,
            stdout: r.blob(1, 2)?,
            stderr: r.blob(3, 4)?,
            cached: true,
            ..AttemptReport::default()
        })
    })
    .await
}

/// Records how attempt `t` ended, and keeps its inline outputs.
async fn record_attempt<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    outcome: AttemptEnd,
    r: &AttemptReport,
) -> R<(), T> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let size = |b: Option<crate::blob::BlobInfo>| b.map(|b| n(b.size));
    tx.execute(
        &RECORD_ATTEMPT,
        &args![
            t.id,
            t.token,
            r.end,
            outcome.as_str(),
            r.exit_code,
            r.signal,
            r.stdout.map(|b| b.hash),
            size(r.stdout),
            r.stderr.map(|b| b.hash),
            size(r.stderr),
            r.message.as_deref(),
            r.cached,
            r.usage.map(|u| n(u.max_rss)),
            r.usage.map(|u| n(u.user_ms)),
            r.usage.map(|u| n(u.sys_ms))
        ],
    )
    .await?;
    for data in &r.inline {
        tx.execute(&INSERT_INLINE, &args![&Hash::of(data), data.as_slice()])
            .await?;
    }
    Ok(())
}

/// Carries out transition `tr` of attempt `t` (see [`policy::finish`]); the caller
/// has checked the fencing token.
async fn apply<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    (job, created): (&Hash, i64),
    tr: &Transition<'_>,
) -> R<Finished, T> {
    let now = tx.now();
    record_attempt(tx, t, tr.attempt, tr.report).await?;
    tx.execute(
        &END_INSTANCE,
        &args![
            t.id,
            tr.state.as_str(),
            tr.ends.then_some(now),
            tr.run_at,
            i64::from(tr.counts_failure),
            tr.clears_cache_key
        ],
    )
    .await?;
    if let Some(k) = tr.fills_cache {
        tx.execute(&FILL_CACHE, &args![&k, t.id, t.token]).await?;
    }
    tx.event(tr.event, job, Some((t.id, created)), tr.data.clone())
        .await?;
    if tr.ends {
        deps::ended(tx, t.id, (job, created), tr.state).await?;
    }
    Ok(tr.finished)
}

/// An instance row as finish, cancel and retry see it (locked where rows lock).
struct InstRow {
    job: Hash,
    created: i64,
    state: State,
    attempts: i64,
    cancel_requested: bool,
}

async fn lock_inst<T: Tx>(tx: &mut T, id: i64) -> R<Option<InstRow>, T> {
    tx.opt(&LOCK_INSTANCE, &args![id], |r| {
        Ok(InstRow {
            job: r.hash(0)?,
            created: r.req_int(1)?,
            state: r.state(2)?,
            attempts: r.req_int(3)?,
            cancel_requested: r.flag(4)?,
        })
    })
    .await
}

fn fenced(t: &ClaimToken) -> Error {
    Error::Fenced {
        instance: t.id,
        token: t.token,
    }
}

/// Ends attempt `t` with `outcome` (see [`Queue::finish`](crate::queue::Queue::finish)).
pub(crate) async fn finish<T: Tx>(tx: &mut T, t: &ClaimToken, outcome: &Outcome) -> R<Finished, T> {
    let row = lock_inst(tx, t.id).await?;
    let Some(row) = row.filter(|r| r.state == State::Running && r.attempts == t.token) else {
        return Err(fenced(t).into());
    };
    let tr = policy::finish(t, outcome, row.cancel_requested);
    apply(tx, t, (&row.job, row.created), &tr).await
}

/// Renews attempt `t`'s lease for `lease` (see
/// [`Queue::heartbeat`](crate::queue::Queue::heartbeat)).
pub(crate) async fn heartbeat<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    lease: Duration,
) -> R<Heartbeat, T> {
    let until = tx.now().saturating_add(super::millis(lease));
    let row = tx
        .opt(&HEARTBEAT, &args![t.id, t.token, until], |r| r.flag(0))
        .await?;
    match row {
        Some(cancel_requested) => Ok(Heartbeat { cancel_requested }),
        None => Err(fenced(t).into()),
    }
}

/// Cancels the selected instances (see [`Queue::cancel`](crate::queue::Queue::cancel)).
pub(crate) async fn cancel<T: Tx>(tx: &mut T, sel: &Selector) -> R<Vec<Instance>, T> {
    let mut out = Vec::new();
    for id in super::read::select(tx, sel).await? {
        let Some(row) = lock_inst(tx, id).await? else {
            continue;
        };
        match row.state {
            State::Pending | State::Waiting => {
                let now = tx.now();
                tx.execute(&CANCEL_PENDING, &args![id, now]).await?;
                let null = serde_json::Value::Null;
                tx.event(EventKind::Cancel, &row.job, Some((id, row.created)), null)
                    .await?;
                let inst = (&row.job, row.created);
                deps::ended(tx, id, inst, State::Cancelled).await?;
            }
            State::Running => {
                tx.execute(&CANCEL_RUNNING, &args![id]).await?;
            }
            _ => continue,
        }
        out.push(Instance {
            id,
            job: row.job,
            created: row.created,
        });
    }
    Ok(out)
}

/// One claim (see [`Queue::claim`](crate::queue::Queue::claim)): expired leases taken
/// over (or ended), then due pending instances. Also says whether the claim ended an
/// instance or served one from the cache (either must be durable).
pub(crate) async fn claim<T: Tx>(tx: &mut T, req: &ClaimRequest) -> R<(Vec<Claim>, bool), T> {
    let mut out = Vec::new();
    let terminal = take_over(tx, req, &mut out).await?;
    claim_pending(tx, req, &mut out).await?;
    // A result served from the cache must be as durable as any other.
    let served = out.iter().any(|c| c.cache_hit.is_some());
    Ok((out, served || terminal))
}

/// Takes over attempts whose worker stopped renewing its lease (or ends them, as
/// [`policy::expired`] says). Returns whether it ended an instance.
async fn take_over<T: Tx>(tx: &mut T, req: &ClaimRequest, out: &mut Vec<Claim>) -> R<bool, T> {
    let now = tx.now();
    let limit = i64::try_from(req.limit).unwrap_or(i64::MAX);
    let mut terminal = false;
    let expired = tx
        .rows(T::claim_sql().expired, &args![now, limit], |r| {
            Ok((candidate(r)?, r.flag(CLAIM_COLS)?))
        })
        .await?;
    for (c, cancel) in expired {
        let old = ClaimToken {
            id: c.id,
            token: c.attempts,
        };
        let lost_before = tx.one(&COUNT_LOST, &args![c.id], |r| r.req_int(0)).await?;
        let lost = match policy::expired(now, cancel, lost_before) {
            policy::Expired::TakeOver(lost) => lost,
            policy::Expired::Cancel(end) | policy::Expired::GiveUp(end) => {
                let tr = policy::finish(&old, &end, cancel);
                apply(tx, &old, (&c.job, c.created), &tr).await?;
                terminal = true;
                continue;
            }
        };
        let lost_attempt = tx
            .one(&LOST_ATTEMPT, &args![old.id, old.token], |r| {
                Ok(LostAttempt::new(
                    old.id,
                    old.token,
                    r.req_text(0)?,
                    r.text(1)?,
                ))
            })
            .await?;
        record_attempt(tx, &old, AttemptEnd::Lost, &lost).await?;
        let token = start_attempt(tx, &c, req, None).await?;
        let mut claim = c.claim(token, now, true, None);
        claim.lost = Some(lost_attempt);
        out.push(claim);
    }
    Ok(terminal)
}

/// Claims due pending instances, by priority then order, a window at a time. A cached
/// run is served from the cache, or skipped while an identical run is in flight (it
/// stays pending, so the next window starts past it).
async fn claim_pending<T: Tx>(tx: &mut T, req: &ClaimRequest, out: &mut Vec<Claim>) -> R<(), T> {
    let now = tx.now();
    let remaining = req.limit.saturating_sub(out.len());
    let window = remaining * 4 + 16;
    let mut claimed = 0;
    let mut skipped = 0usize;
    let mut in_batch: Vec<Hash> = Vec::new();
    while claimed < remaining {
        let offset = i64::try_from(skipped).unwrap_or(i64::MAX);
        let win = i64::try_from(window).unwrap_or(i64::MAX);
        let sql = match req.order {
            Order::Newest => T::claim_sql().newest,
            Order::Oldest => T::claim_sql().oldest,
        };
        let candidates = tx
            .rows(sql, &args![now, win, offset], |r| candidate(r))
            .await?;
        let last_window = candidates.len() < window;
        for c in candidates {
            if claimed == remaining {
                break;
            }
            let inputs = if c.deps > 0 && policy::wants_cache(req, c.cached) {
                Some(deps::inputs(tx, c.id).await?)
            } else {
                None
            };
            let key = policy::claim_cache_key(
                req,
                &c.job,
                (c.cached, c.timeout),
                inputs.as_ref(),
                &c.context,
            );
            if let Some(k) = key {
                // One claimer at a time per key, so identical runs start once even
                // when workers claim at the same moment; a key another claimer holds
                // is in flight (never wait: two claimers could deadlock on two keys).
                if !tx.try_lock_key(&k).await? {
                    skipped += 1;
                    continue;
                }
                if let Some(mut hit) = cache_lookup(tx, &k).await? {
                    let token = start_attempt(tx, &c, req, None).await?;
                    hit.start = now;
                    hit.end = now;
                    let served = Outcome::Success(hit.clone());
                    let tr = policy::finish(&token.0, &served, false);
                    apply(tx, &token.0, (&c.job, c.created), &tr).await?;
                    out.push(c.claim(token, now, false, Some(hit)));
                    continue;
                }
                let in_flight = in_batch.contains(&k)
                    || tx
                        .opt(&KEY_IN_FLIGHT, &args![&k], |_| Ok(()))
                        .await?
                        .is_some();
                if in_flight {
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
    Ok(())
}
