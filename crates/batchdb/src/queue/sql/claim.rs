//! Claims, once for every backend: expired leases taken over, instances that waited
//! long for resources reserved for, then due pending instances by priority — each
//! only where its needs fit what the worker has free and its concurrency key has a
//! slot, or served from the result cache. Runs inside the caller's write transaction;
//! the rules come from [`policy`].

use std::collections::BTreeSet;

use super::deps;
use super::write::{apply, record_attempt};
use super::{Sql, Tx, args};
use crate::hash::Hash;
use crate::queue::context::Resources;
use crate::queue::policy::{self, AttemptEnd, Fit};
use crate::queue::row::{CLAIM_COLS, Candidate, Row, candidate};
use crate::queue::types::{
    AttemptReport, Claim, ClaimRequest, ClaimToken, EventKind, Finished, LostAttempt, Order,
    Outcome,
};

type R<T, E> = Result<T, <E as super::Conn>::Error>;

static START_ATTEMPT: Sql = Sql::new(
    "UPDATE instances SET state = 'running', attempts = $2, lease_until = $3, cache_key = $4
     WHERE id = $1",
);
static INSERT_ATTEMPT: Sql = Sql::new(
    "INSERT INTO attempts(instance, attempt, worker, start, attempt_id, resources)
     VALUES ($1, $2, $3, $4, $5, $6)",
);
static CACHE_LOOKUP: Sql = Sql::new(
    "SELECT a.exit_code, a.stdout, a.stdout_size, a.stderr, a.stderr_size
     FROM cache c JOIN attempts a ON a.instance = c.instance AND a.attempt = c.attempt
     WHERE c.key = $1 AND a.outcome = 'result'",
);
static COUNT_LOST: Sql =
    Sql::new("SELECT COUNT(*) FROM attempts WHERE instance = $1 AND outcome = 'lost'");
static LOST_ATTEMPT: Sql =
    Sql::new("SELECT worker, attempt_id FROM attempts WHERE instance = $1 AND attempt = $2");
static KEY_IN_FLIGHT: Sql =
    Sql::new("SELECT 1 FROM instances WHERE state = 'running' AND cache_key = $1");
static RUNNING_WITH_KEY: Sql =
    Sql::new("SELECT COUNT(*) FROM instances WHERE state = 'running' AND conc_key = $1");

/// How many instances whose needs do not fit one claim looks past before it gives
/// up for this round (the next claim looks again).
pub(crate) const SCAN_MAX: usize = 10_000;

/// The longest window of candidates one statement of a claim reads.
const WINDOW_MAX: usize = 1024;

/// How many starving instances one claim considers reserving for.
const STARVING_WINDOW: i64 = 8;

/// One claim's running state: what the worker has free, what is reserved, the cache
/// keys started in it.
struct Round<'r> {
    req: &'r ClaimRequest,
    now: i64,
    free: Resources,
    reserved: BTreeSet<String>,
    in_batch: Vec<Hash>,
}

/// What [`consider`] did with a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// Claimed: it runs on this worker.
    Run,
    /// Finished from the result cache inside the claim: nothing runs.
    Served,
    /// Left pending.
    Skipped,
    /// Left pending, and what it needs is now reserved for it.
    Reserved,
}

/// One claim (see [`Queue::claim`](crate::queue::Queue::claim)): expired leases taken
/// over (or ended), then due pending instances. Also says whether the claim ended an
/// instance or served one from the cache (either must be durable).
pub(crate) async fn claim<T: Tx>(tx: &mut T, req: &ClaimRequest) -> R<(Vec<Claim>, bool), T> {
    let mut out = Vec::new();
    let mut round = Round {
        req,
        now: tx.now(),
        free: req.free.clone(),
        reserved: BTreeSet::new(),
        in_batch: Vec::new(),
    };
    let expired_args = args![round.now, i64::try_from(req.limit).unwrap_or(i64::MAX)];
    let expired = (T::claim_sql().expired, &expired_args[..]);
    let (terminal, first) = if req.resources.is_empty() {
        // Nothing comes between the two reads for a worker without resources: both
        // in one round trip. A takeover may release dependents, which the pending
        // read made before it cannot see: after one, that read is made again.
        let pending_args = pending_args(&round, req.limit, &Cursor::START);
        let pending = (pending_sql::<T>(req.order), &pending_args[..]);
        let (expired, pending) = tx
            .candidates_both(expired, |r| expired_row(r), pending, |r| pending_row(r))
            .await?;
        let took_over = !expired.is_empty();
        let terminal = take_over(tx, &mut round, &mut out, expired).await?;
        (terminal, (!took_over).then_some(pending))
    } else {
        let expired = tx
            .candidates(expired.0, expired.1, |r| expired_row(r))
            .await?;
        let terminal = take_over(tx, &mut round, &mut out, expired).await?;
        claim_starving(tx, &mut round, &mut out).await?;
        (terminal, None)
    };
    claim_pending(tx, &mut round, &mut out, first).await?;
    // A result served from the cache must be as durable as any other.
    let served = out.iter().any(|c| c.cache_hit.is_some());
    Ok((out, served || terminal))
}

/// Ends attempt `t` with `outcome`, then claims with `next` in the same transaction
/// (see [`Queue::finish_and_claim`](crate::queue::Queue::finish_and_claim)).
pub(crate) async fn finish_and_claim<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    outcome: &Outcome,
    next: &ClaimRequest,
) -> R<(Finished, Vec<Claim>), T> {
    let finished = super::write::finish(tx, t, outcome).await?;
    if next.limit == 0 {
        return Ok((finished, Vec::new()));
    }
    let (claims, _) = claim(tx, next).await?;
    Ok((finished, claims))
}

/// Starts a new attempt of candidate `c`, given `assigned` out of the worker's free
/// resources: a new fencing token and attempt id.
async fn start_attempt<T: Tx>(
    tx: &mut T,
    c: &Candidate,
    req: &ClaimRequest,
    (cache_key, assigned): (Option<Hash>, &Resources),
) -> R<(ClaimToken, String), T> {
    let now = tx.now();
    let token = c.attempts + 1;
    let attempt_id = crate::queue::attempt_id::new_attempt_id();
    let until = now.saturating_add(super::millis(req.lease));
    let resources = (!assigned.is_empty()).then(|| serde_json::to_string(assigned).ok());
    let start = args![c.id, token, until, cache_key];
    let attempt = args![
        c.id,
        token,
        req.worker.as_str(),
        now,
        attempt_id.as_str(),
        resources.flatten()
    ];
    // Nothing below reads their answers: on PostgreSQL they ride with the next
    // statement or the commit.
    tx.execute_later(&[(&START_ATTEMPT, &start), (&INSERT_ATTEMPT, &attempt)])
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

/// Decodes a row of [`ClaimSql::expired`](super::ClaimSql::expired): the candidate
/// and whether its cancel was requested.
fn expired_row<R: Row>(r: &R) -> Result<(Candidate, bool), R::Error> {
    Ok((candidate(r)?, r.flag(CLAIM_COLS)?))
}

/// The pending read in the claim's order.
fn pending_sql<T: Tx>(order: Order) -> &'static Sql {
    match order {
        Order::Newest => T::claim_sql().newest,
        Order::Oldest => T::claim_sql().oldest,
    }
}

/// Decodes a row of a pending read: the candidate and its priority.
fn pending_row<R: Row>(r: &R) -> Result<(Candidate, i64), R::Error> {
    Ok((candidate(r)?, r.req_int(CLAIM_COLS)?))
}

/// Where one claim's pending reads stand: the priorities left are those at or below
/// `cap`; an oldest-first read takes one priority at a time, `at` (known once a row
/// of it was read), from `offset` rows in (those skipped there so far).
struct Cursor {
    cap: i64,
    offset: usize,
    at: Option<i64>,
}

impl Cursor {
    /// Every priority left, nothing skipped.
    const START: Cursor = Cursor {
        cap: i64::MAX,
        offset: 0,
        at: None,
    };
}

/// The arguments of a pending read of `window` rows from `cur`.
fn pending_args(round: &Round<'_>, window: usize, cur: &Cursor) -> [super::Arg<'static>; 5] {
    let offset = i64::try_from(cur.offset).unwrap_or(i64::MAX);
    let win = i64::try_from(window).unwrap_or(i64::MAX);
    args![
        round.now,
        win,
        offset,
        !round.req.resources.is_empty(),
        cur.cap
    ]
}

/// After an oldest-first read came back short, the cursor at the next priority
/// down, or `None` when no due instance is left at any. A read with no rows at all
/// leaves its priority unknown (every row of it locked by other claimers, or none
/// due): the top due priority is read then.
async fn next_priority<T: Tx>(tx: &mut T, round: &Round<'_>, cur: &Cursor) -> R<Option<Cursor>, T> {
    let at = if cur.at.is_some() {
        cur.at
    } else {
        // As a claim read (on PostgreSQL: under the same plan settings).
        let a = args![round.now, !round.req.resources.is_empty(), cur.cap];
        let sql = T::claim_sql().top_priority;
        let top = tx.candidates(sql, &a, |r| r.req_int(0)).await?;
        top.first().copied()
    };
    Ok(at.and_then(|p| p.checked_sub(1)).map(|cap| Cursor {
        cap,
        offset: 0,
        at: None,
    }))
}

/// Takes over attempts whose worker stopped renewing its lease (or ends them, as
/// [`policy::expired`] says), each only where its needs fit what is free. Returns
/// whether it ended an instance.
async fn take_over<T: Tx>(
    tx: &mut T,
    round: &mut Round<'_>,
    out: &mut Vec<Claim>,
    expired: Vec<(Candidate, bool)>,
) -> R<bool, T> {
    let (req, now) = (round.req, round.now);
    let mut terminal = false;
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
                apply(tx, &old, (&c.job, c.created), &tr, None).await?;
                terminal = true;
                continue;
            }
        };
        // Taken over only by a worker with room for it (its slot of a concurrency
        // key passes to the new attempt: it stays running).
        let fits = (&req.resources, &round.free);
        if policy::fit(&c.needs, fits, &BTreeSet::new(), false) != Fit::Run {
            continue;
        }
        let lost_attempt = tx
            .one(&LOST_ATTEMPT, &args![old.id, old.token], |r| {
                let (worker, id) = (r.req_text(0)?, r.text(1)?);
                Ok(LostAttempt::new(old.id, old.token, worker, id))
            })
            .await?;
        record_attempt(tx, &old, AttemptEnd::Lost, &lost).await?;
        let assigned = round.free.take(&c.needs);
        let token = start_attempt(tx, &c, req, (None, &assigned)).await?;
        let mut claim = c.claim(token, now, true, None);
        claim.lost = Some(lost_attempt);
        claim.assigned = assigned;
        out.push(claim);
    }
    Ok(terminal)
}

/// Looks at the instances with needs that have waited longest past the claim's
/// `reserve_after`: the first this worker could ever run is claimed if it fits now,
/// else what it needs is reserved for it for the rest of this claim.
async fn claim_starving<T: Tx>(
    tx: &mut T,
    round: &mut Round<'_>,
    out: &mut Vec<Claim>,
) -> R<(), T> {
    let since = round
        .now
        .saturating_sub(super::millis(round.req.reserve_after));
    let starving = tx
        .candidates(
            T::claim_sql().starving,
            &args![since, STARVING_WINDOW],
            |r| candidate(r),
        )
        .await?;
    for c in starving {
        if out.len() >= round.req.limit {
            break;
        }
        match consider(tx, round, &c, out).await? {
            Taken::Run | Taken::Reserved => break,
            Taken::Served | Taken::Skipped => {}
        }
    }
    Ok(())
}

/// Claims due pending instances, by priority then order, a window at a time. A cached
/// run is served from the cache, or skipped while an identical run is in flight (it
/// stays pending, so the next window starts past it); one whose needs do not fit or
/// whose concurrency key is full is skipped the same way. Newest first is one read
/// across priorities (the pending index backwards); oldest first reads one priority
/// at a time, highest first, so one index serves both. `first`: the first window,
/// read already (of `limit` rows from [`Cursor::START`]; only with nothing claimed
/// yet).
async fn claim_pending<T: Tx>(
    tx: &mut T,
    round: &mut Round<'_>,
    out: &mut Vec<Claim>,
    mut first: Option<Vec<(Candidate, i64)>>,
) -> R<(), T> {
    let req = round.req;
    let remaining = req.limit.saturating_sub(out.len());
    // The first window is the free slots (PostgreSQL locks every row it reads; every
    // row read costs its payload's lookup), for a worker with resources too, though
    // it skips what does not fit. Each window after a full one is twice as long:
    // instances that must be skipped (in flight, not fitting) cost a few statements,
    // not one per window's worth.
    let mut window = remaining;
    let mut claimed = 0;
    let mut skipped = 0usize;
    let mut cur = Cursor::START;
    while claimed < remaining && skipped < SCAN_MAX {
        let candidates = if let Some(read) = first.take() {
            read
        } else {
            let args = pending_args(round, window, &cur);
            tx.candidates(pending_sql::<T>(req.order), &args, |r| pending_row(r))
                .await?
        };
        let last_window = candidates.len() < window;
        for (c, priority) in candidates {
            if claimed == remaining {
                break;
            }
            cur.at = Some(priority);
            match consider(tx, round, &c, out).await? {
                Taken::Run => claimed += 1,
                Taken::Served => {}
                Taken::Skipped | Taken::Reserved => {
                    skipped += 1;
                    cur.offset += 1;
                }
            }
        }
        if last_window {
            match req.order {
                Order::Newest => break,
                Order::Oldest => match next_priority(tx, round, &cur).await? {
                    Some(next) => cur = next,
                    None => break,
                },
            }
        } else {
            window = (window * 2).min(WINDOW_MAX);
        }
    }
    Ok(())
}

/// Claims candidate `c` if it may run here now: served from the cache when it can
/// be; else only if its needs fit ([`policy::fit`]), its concurrency key has a slot
/// and no identical cached run is in flight.
async fn consider<T: Tx>(
    tx: &mut T,
    round: &mut Round<'_>,
    c: &Candidate,
    out: &mut Vec<Claim>,
) -> R<Taken, T> {
    let (req, now) = (round.req, round.now);
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
        // One claimer at a time per key, so identical runs start once even when
        // workers claim at the same moment; a key another claimer holds is in flight
        // (never wait: two claimers could deadlock on two keys).
        if !tx.try_lock_key(&k).await? {
            return Ok(Taken::Skipped);
        }
        if let Some(mut hit) = cache_lookup(tx, &k).await? {
            let token = start_attempt(tx, c, req, (None, &Resources::default())).await?;
            hit.start = now;
            hit.end = now;
            let served = Outcome::Success(hit.clone());
            let tr = policy::finish(&token.0, &served, false);
            apply(tx, &token.0, (&c.job, c.created), &tr, None).await?;
            out.push(c.claim(token, now, false, Some(hit)));
            return Ok(Taken::Served);
        }
        let in_flight = round.in_batch.contains(&k)
            || tx
                .opt(&KEY_IN_FLIGHT, &args![&k], |_| Ok(()))
                .await?
                .is_some();
        if in_flight {
            return Ok(Taken::Skipped);
        }
    }
    let starving = c.run_at <= now.saturating_sub(super::millis(req.reserve_after));
    match policy::fit(
        &c.needs,
        (&req.resources, &round.free),
        &round.reserved,
        starving,
    ) {
        Fit::Run => {}
        Fit::Skip => return Ok(Taken::Skipped),
        Fit::Reserve => {
            round.reserved.extend(c.needs.0.keys().cloned());
            return Ok(Taken::Reserved);
        }
    }
    if !concurrency_slot(tx, c).await? {
        return Ok(Taken::Skipped);
    }
    round.in_batch.extend(key);
    let assigned = round.free.take(&c.needs);
    let token = start_attempt(tx, c, req, (key, &assigned)).await?;
    let mut claim = c.claim(token, now, false, None);
    claim.assigned = assigned;
    out.push(claim);
    Ok(Taken::Run)
}

/// Whether candidate `c` may start under its concurrency key: fewer instances with
/// that key are running (counting those this transaction started) than the
/// candidate's limit. The key's claim lock is taken first, so two claimers never
/// both see the last slot free (PostgreSQL: an advisory lock to the end of the
/// transaction; a key another claimer holds counts as full for now).
async fn concurrency_slot<T: Tx>(tx: &mut T, c: &Candidate) -> R<bool, T> {
    let Some(conc) = &c.conc else {
        return Ok(true);
    };
    let key = conc.key.as_str();
    let lock = Hash::of(format!("batchdb-concurrency\0{key}").as_bytes());
    if !tx.try_lock_key(&lock).await? {
        return Ok(false);
    }
    let running = tx
        .one(&RUNNING_WITH_KEY, &args![key], |r| r.req_int(0))
        .await?;
    Ok(running < i64::from(conc.limit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::sql::sqlite_plan;

    #[test]
    fn the_running_key_lookups_use_their_partial_indexes() {
        let plan = sqlite_plan(&KEY_IN_FLIGHT);
        assert!(plan.contains("INDEX instances_cache"), "{plan}");
        let plan = sqlite_plan(&RUNNING_WITH_KEY);
        assert!(plan.contains("INDEX instances_conc"), "{plan}");
    }
}
