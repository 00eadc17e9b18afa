//! The write path, once for every backend: jobs and instances in, claims, attempts
//! started and ended, cancel and retry. Each function runs inside the caller's write
//! transaction; the rules come from [`policy`].

use std::time::Duration;

use super::deps::{self, Resolved};
use super::{Arg, Conn, Sql, Tx, args};
use crate::error::Error;
use crate::hash::Hash;
use crate::queue::policy::{self, AttemptEnd, Transition};
use crate::queue::row::Row;
use crate::queue::types::{
    AttemptReport, ClaimToken, EventKind, Finished, Heartbeat, Instance, NewJob, Outcome,
    PushOptions, Selector, State,
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
// SQLite's text takes the new id as `$18`, which its `insert_ids` appends (NULL but
// just after a prune emptied the table's top: see `sqlite_floor_id!`) and reads back
// as the rowid: no RETURNING, which would make it keep a statement journal for every
// insert (a temp-file write per row; a bulk add ran at 0.67 of its speed with it).
static INSERT_INSTANCE: Sql = Sql::each(
    "INSERT INTO instances(id, job, created, state, priority, run_at, timeout_ms, retries,
       cached, batch, deps, waiting_on, note, ended, context, needs, conc_key, conc_limit)
     VALUES ($18, $1, $2, $8, $3, $4, $5, $6, $7, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    "INSERT INTO instances(job, created, state, priority, run_at, timeout_ms, retries, cached,
       batch, deps, waiting_on, note, ended, context, needs, conc_key, conc_limit)
     VALUES ($1, $2, $8, $3, $4, $5, $6, $7, $9, $10, $11, $12, $13, $14, $15, $16, $17)
     RETURNING id",
);
static RECORD_ATTEMPT: Sql = Sql::new(
    "UPDATE attempts SET \"end\" = $3, outcome = $4, exit_code = $5, signal = $6, stdout = $7,
       stdout_size = $8, stderr = $9, stderr_size = $10, message = $11, cached = $12,
       max_rss = $13, cpu_user_ms = $14, cpu_sys_ms = $15
     WHERE instance = $1 AND attempt = $2",
);
static INSERT_INLINE: Sql =
    Sql::new("INSERT INTO inline_blobs(key, data) VALUES ($1, $2) ON CONFLICT DO NOTHING");
/// An inline output another transaction stored, kept to this one's commit: on
/// PostgreSQL a share lock, which a prune's `FOR UPDATE` waits for (and then sees the
/// attempt naming it), while any number of finishes naming the same output (the empty
/// one, most of all) hold it at once. SQLite's one writer needs no lock.
static HOLD_INLINE: Sql = Sql::each(
    "SELECT 1 FROM inline_blobs WHERE key = $1",
    "SELECT 1 FROM inline_blobs WHERE key = $1 FOR KEY SHARE",
);
/// The last resort of [`store_inline`]: the row stored or locked for update.
static UPSERT_INLINE: Sql = Sql::each(
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
/// A result-cache entry, unless the key has one already: the first good result of a
/// key stays until a prune removes it. Not `DO UPDATE`: on PostgreSQL that locks the
/// entry's row to the commit, and every finish of the same payload (they all fill the
/// one entry) would queue for it through the previous one's WAL flush.
static FILL_CACHE: Sql = Sql::new(
    "INSERT INTO cache(key, instance, attempt) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING",
);
static LOCK_INSTANCE: Sql = Sql::new(
    "SELECT job, created, state, attempts, cancel_requested FROM instances
     WHERE id = $1 FOR UPDATE",
);
static HEARTBEAT: Sql = Sql::new(
    "UPDATE instances SET lease_until = $3
     WHERE id = $1 AND state = 'running' AND attempts = $2
     RETURNING cancel_requested",
);
static CANCEL_PENDING: Sql =
    Sql::new("UPDATE instances SET state = 'cancelled', ended = $2 WHERE id = $1");
static CANCEL_RUNNING: Sql = Sql::new("UPDATE instances SET cancel_requested = TRUE WHERE id = $1");
/// Records `jobs` (see [`Queue::create_many`](crate::queue::Queue::create_many)),
/// all their rows sent at once (one round trip on PostgreSQL); for each, its size
/// if it is new. Their `create` events are the caller's to append ([`job_created`]).
async fn store_jobs<T: Tx>(tx: &mut T, jobs: &[NewJob]) -> R<Vec<Option<u64>>, T> {
    let mut out = Vec::with_capacity(jobs.len());
    for window in jobs.chunks(STEP_ROWS) {
        out.extend(store_window(tx, window).await?);
    }
    Ok(out)
}

/// The rows of one bulk write built and sent at a time: the arguments held are a
/// window's, not the whole add's.
const STEP_ROWS: usize = 1024;

/// [`store_jobs`] of one window.
async fn store_window<T: Tx>(tx: &mut T, jobs: &[NewJob]) -> R<Vec<Option<u64>>, T> {
    let now = tx.now();
    let mut rows = Vec::with_capacity(jobs.len());
    for j in jobs {
        let size = i64::try_from(j.info.size).map_err(|_| Error::Config {
            what: "payload size",
            value: j.info.size.to_string(),
            why: "too large".into(),
        })?;
        rows.push(args![&j.info.hash, size, now, j.inline.as_deref()]);
    }
    let stmts: Vec<(&Sql, &[Arg<'_>])> = rows.iter().map(|a| (&INSERT_JOB, &a[..])).collect();
    let counts = tx.execute_all(&stmts).await?;
    // A job whose payload was in the store gets it inline when added again with one
    // (so a lost blob is repaired, as re-adding it to the store would).
    let repairs: Vec<[Arg<'_>; 2]> = jobs
        .iter()
        .zip(&counts)
        .filter(|(j, n)| **n == 0 && j.inline.is_some())
        .map(|(j, _)| args![&j.info.hash, j.inline.as_deref()])
        .collect();
    if !repairs.is_empty() {
        let stmts: Vec<(&Sql, &[Arg<'_>])> =
            repairs.iter().map(|a| (&REPAIR_PAYLOAD, &a[..])).collect();
        tx.execute_all(&stmts).await?;
    }
    Ok(jobs
        .iter()
        .zip(&counts)
        .map(|(j, &n)| (n == 1).then_some(j.info.size))
        .collect())
}

/// Appends the `create` event of new job `job` of `size` bytes.
async fn job_created<T: Tx>(tx: &mut T, job: &Hash, size: u64) -> R<(), T> {
    // Written as text: a bulk add makes one per job, and building a JSON value for it
    // cost more than the insert's binding.
    let data = format!("{{\"size\":{size}}}");
    tx.event_json(EventKind::Create, job, None, Some(data))
        .await
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
    let mut one = insert_instances(tx, &[(job, None)], opts, r).await?;
    one.pop()
        .ok_or_else(|| Error::Task("a push of one instance pushed none".into()).into())
}

/// Pushes a new instance of each of `jobs` (which exist), in order, with
/// consecutive `created` times, in the batch and with the dependencies `r` resolved;
/// all their rows are sent at once (one round trip on PostgreSQL). A job given with
/// its size is new: its `create` event comes just before its instance's `push`.
async fn insert_instances<T: Tx>(
    tx: &mut T,
    jobs: &[(&Hash, Option<u64>)],
    opts: &PushOptions,
    r: &Resolved,
) -> R<Vec<Instance>, T> {
    let now = tx.now();
    let mut created = tx
        .next_created(now, i64::try_from(jobs.len()).unwrap_or(i64::MAX))
        .await?;
    let mut out = Vec::with_capacity(jobs.len());
    for window in jobs.chunks(STEP_ROWS) {
        insert_window(tx, window, (now, created), opts, r, &mut out).await?;
        created += i64::try_from(window.len()).unwrap_or(i64::MAX);
    }
    Ok(out)
}

/// [`insert_instances`] of one window, whose first `created` time is `first`, at
/// transaction time `now`; the instances are appended to `out`.
async fn insert_window<T: Tx>(
    tx: &mut T,
    jobs: &[(&Hash, Option<u64>)],
    (now, first): (i64, i64),
    opts: &PushOptions,
    r: &Resolved,
    out: &mut Vec<Instance>,
) -> R<(), T> {
    let timeout = opts.timeout.map(super::millis);
    let run_at = opts.run_at.unwrap_or(now);
    let state = r.state();
    let ended = (state == State::Cancelled).then_some(now);
    let ndeps = i64::try_from(r.deps.len()).unwrap_or(i64::MAX);
    let (context, needs) = (opts.context.to_text(), opts.needs.to_text());
    let conc = opts.concurrency.as_ref();
    let rows: Vec<[Arg<'_>; 17]> = jobs
        .iter()
        .zip(first..)
        .map(|((job, _), created)| {
            args![
                *job,
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
                context.as_deref(),
                needs.as_deref(),
                conc.map(|c| c.key.as_str()),
                conc.map(|c| i64::from(c.limit))
            ]
        })
        .collect();
    let rows: Vec<&[Arg<'_>]> = rows.iter().map(|a| &a[..]).collect();
    let ids = tx.insert_ids(&INSERT_INSTANCE, &rows).await?;
    let data = push_data(opts, now, state);
    for ((&(job, new), created), id) in jobs.iter().zip(first..).zip(ids) {
        deps::insert_deps(tx, id, r).await?;
        if let Some(size) = new {
            job_created(tx, job, size).await?;
        }
        let inst = Some((id, created));
        tx.event(EventKind::Push, job, inst, data.clone()).await?;
        if let Some(msg) = &r.broken {
            let data = serde_json::json!({"message": msg});
            tx.event(EventKind::Cancel, job, inst, data).await?;
        }
        out.push(Instance {
            id,
            job: *job,
            created,
        });
    }
    Ok(())
}

/// The details of a `push` event: when it is due if not now, its batch, whether it
/// waits for dependencies (`null`: none of these).
fn push_data(opts: &PushOptions, now: i64, state: State) -> serde_json::Value {
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
    data
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
    let new = store_jobs(tx, jobs).await?;
    let jobs: Vec<(&Hash, Option<u64>)> = keys.into_iter().zip(new).collect();
    insert_instances(tx, &jobs, opts, &resolved).await
}

/// Records jobs (see [`Queue::create_many`](crate::queue::Queue::create_many)).
pub(crate) async fn create_many<T: Tx>(tx: &mut T, jobs: &[NewJob]) -> R<Vec<bool>, T> {
    let new = store_jobs(tx, jobs).await?;
    for (j, size) in jobs.iter().zip(&new) {
        if let Some(size) = size {
            job_created(tx, &j.info.hash, *size).await?;
        }
    }
    Ok(new.iter().map(Option::is_some).collect())
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

/// Records how attempt `t` ended, and keeps its inline outputs.
pub(super) async fn record_attempt<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    outcome: AttemptEnd,
    r: &AttemptReport,
) -> R<(), T> {
    record_with(tx, t, (outcome, r), &[]).await
}

/// [`record_attempt`], with statements `more` sent along in the same pipeline (see
/// [`Conn::execute_all`](super::Conn::execute_all)): the attempt's row, its inline
/// outputs' rows and `more`, in one round trip on PostgreSQL.
async fn record_with<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    (outcome, r): (AttemptEnd, &AttemptReport),
    more: &[(&Sql, &[Arg<'_>])],
) -> R<(), T> {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let size = |b: Option<crate::blob::BlobInfo>| b.map(|b| n(b.size));
    let attempt = args![
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
    ];
    // The empty output is known without a row (see `Hash::EMPTY`): most jobs write
    // nothing to stderr, and storing it cost two statements per finish.
    let inline: Vec<(&[u8], Hash)> = r
        .inline
        .iter()
        .filter(|d| !d.is_empty())
        .map(|d| (d.as_slice(), Hash::of(d)))
        .collect();
    let inserts: Vec<[Arg<'_>; 2]> = inline.iter().map(|(d, k)| args![k, *d]).collect();
    let mut stmts: Vec<(&Sql, &[Arg<'_>])> = vec![(&RECORD_ATTEMPT, &attempt)];
    stmts.extend(inserts.iter().map(|a| (&INSERT_INLINE, &a[..])));
    stmts.extend_from_slice(more);
    let counts = tx.execute_all(&stmts).await?;
    // An output another transaction stored already: held to this one's commit.
    for ((data, key), stored) in inline.iter().zip(&counts[1..]) {
        if *stored == 0 {
            hold_inline(tx, key, data).await?;
        }
    }
    Ok(())
}

/// Keeps the row holding inline output `data` (under `key`), which another
/// transaction stored, until this transaction commits (see [`HOLD_INLINE`]). A prune
/// that removed the row in the meantime makes it store the row again; after a few
/// such rounds it takes the row's exclusive lock instead.
async fn hold_inline<T: Tx>(tx: &mut T, key: &Hash, data: &[u8]) -> R<(), T> {
    for _ in 0..4 {
        if tx
            .opt(&HOLD_INLINE, &args![key], |_| Ok(()))
            .await?
            .is_some()
            || tx.execute(&INSERT_INLINE, &args![key, data]).await? > 0
        {
            return Ok(());
        }
    }
    tx.execute(&UPSERT_INLINE, &args![key, data]).await?;
    Ok(())
}

/// Carries out transition `tr` of attempt `t` (see [`policy::finish`]); the caller
/// has checked the fencing token, and may have read the instances waiting for it
/// (`waiting`, see [`deps::ended`]).
pub(super) async fn apply<T: Tx>(
    tx: &mut T,
    t: &ClaimToken,
    (job, created): (&Hash, i64),
    tr: &Transition<'_>,
    waiting: Option<Vec<deps::Waiting>>,
) -> R<Finished, T> {
    let now = tx.now();
    let end = args![
        t.id,
        tr.state.as_str(),
        tr.ends.then_some(now),
        tr.run_at,
        i64::from(tr.counts_failure),
        tr.clears_cache_key
    ];
    let fill = tr.fills_cache.as_ref().map(|k| args![k, t.id, t.token]);
    let mut more: Vec<(&Sql, &[Arg<'_>])> = vec![(&END_INSTANCE, &end)];
    if let Some(f) = &fill {
        more.push((&FILL_CACHE, f));
    }
    record_with(tx, t, (tr.attempt, tr.report), &more).await?;
    tx.event(tr.event, job, Some((t.id, created)), tr.data.clone())
        .await?;
    if tr.ends {
        deps::ended(tx, t.id, (job, created), tr.state, waiting).await?;
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
    tx.opt(&LOCK_INSTANCE, &args![id], |r| inst_row(r)).await
}

/// Decodes a row of [`LOCK_INSTANCE`].
fn inst_row<R: Row>(r: &R) -> Result<InstRow, R::Error> {
    Ok(InstRow {
        job: r.hash(0)?,
        created: r.req_int(1)?,
        state: r.state(2)?,
        attempts: r.req_int(3)?,
        cancel_requested: r.flag(4)?,
    })
}

fn fenced(t: &ClaimToken) -> Error {
    Error::Fenced {
        instance: t.id,
        token: t.token,
    }
}

/// Ends attempt `t` with `outcome` (see [`Queue::finish`](crate::queue::Queue::finish)).
/// The instances waiting for it are read with its locked row, in the same round
/// trip, in case the finish ends it.
pub(crate) async fn finish<T: Tx>(tx: &mut T, t: &ClaimToken, outcome: &Outcome) -> R<Finished, T> {
    let id = args![t.id];
    let (rows, waiting) = tx
        .rows_both(
            (&LOCK_INSTANCE, &id),
            |r| inst_row(r),
            (&deps::DEPENDENTS, &id),
            |r| deps::waiting_row(r),
        )
        .await?;
    let row = rows.into_iter().next();
    let Some(row) = row.filter(|r| r.state == State::Running && r.attempts == t.token) else {
        return Err(fenced(t).into());
    };
    let tr = policy::finish(t, outcome, row.cancel_requested);
    apply(tx, t, (&row.job, row.created), &tr, Some(waiting)).await
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
                deps::ended(tx, id, inst, State::Cancelled, None).await?;
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
