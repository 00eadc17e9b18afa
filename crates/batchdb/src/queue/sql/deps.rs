//! Batches and dependencies, once for every backend: a push's batch and dependencies
//! resolved, a new instance's dependency rows, the release (or cancellation) of what
//! waits for an instance when it ends — in the transaction that ends it, so there is
//! nothing to poll — and the dependency results a dependent reads.

use std::collections::BTreeMap;

use super::{Conn, Sql, Tx, args};
use crate::error::Error;
use crate::hash::{Hash, Hasher};
use crate::queue::policy::{self, DepState};
use crate::queue::row::Row;
use crate::queue::{DependencyResult, EventKind, PushOptions, Selector, State};

type R<T, E> = Result<T, <E as Conn>::Error>;

// PostgreSQL locks an existing batch's row (as `write`'s INSERT_JOB does a job's), so a
// concurrent prune cannot remove a batch this push joins.
static INSERT_BATCH: Sql = Sql::each(
    "INSERT INTO batches(name, created) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
    "INSERT INTO batches(name, created) VALUES ($1, $2)
     ON CONFLICT (name) DO UPDATE SET name = batches.name WHERE false",
);
static BATCH_ID: Sql = Sql::each(
    "SELECT id FROM batches WHERE name = $1",
    "SELECT id FROM batches WHERE name = $1 FOR KEY SHARE",
);
// The instances a dependency names, locked: an instance that ends while this push
// commits either ends first (and is seen ended here) or sees the new dependency rows.
static DEP_BY_ID: Sql =
    Sql::new("SELECT id, job, created, state FROM instances WHERE id = $1 FOR UPDATE");
static DEP_BY_CREATED: Sql =
    Sql::new("SELECT id, job, created, state FROM instances WHERE created = $1 FOR UPDATE");
static DEP_BY_HASH: Sql = Sql::new(
    "SELECT id, job, created, state FROM instances
     WHERE job = $1 OR id IN (SELECT instance FROM attempts WHERE stdout = $1 AND outcome = 'result')
     ORDER BY id FOR UPDATE",
);
static DEP_BY_BATCH: Sql = Sql::new(
    "SELECT id, job, created, state FROM instances
     WHERE batch = (SELECT id FROM batches WHERE name = $1) ORDER BY id FOR UPDATE",
);
static INSERT_DEP: Sql = Sql::new("INSERT INTO deps(instance, dep, after_any) VALUES ($1, $2, $3)");
/// The instances waiting for instance `$1`: each one's id, whether any end of it
/// will do, and its job and `created` (see [`waiting_row`]).
pub(crate) static DEPENDENTS: Sql = Sql::new(
    "SELECT d.instance, d.after_any, i.job, i.created
     FROM deps d JOIN instances i ON i.id = d.instance
     WHERE d.dep = $1 AND i.state = 'waiting' ORDER BY d.instance",
);
static MET: Sql = Sql::new(
    "UPDATE instances SET waiting_on = waiting_on - 1,
       state = CASE WHEN waiting_on <= 1 THEN 'pending' ELSE state END
     WHERE id = $1 AND state = 'waiting'",
);
static BROKEN: Sql = Sql::new(
    "UPDATE instances SET state = 'cancelled', ended = $2, note = $3, waiting_on = 0
     WHERE id = $1 AND state = 'waiting'",
);
static DEP_RESULTS: Sql = Sql::new(
    "SELECT i.id, i.job, a.stdout
     FROM deps d JOIN instances i ON i.id = d.dep
       JOIN attempts a ON a.instance = i.id AND a.attempt = i.attempts
     WHERE d.instance = $1 AND d.dep > $2 AND i.state = 'result'
     ORDER BY d.dep LIMIT $3",
);

/// A push's batch and dependencies, resolved once for all the instances it adds.
#[derive(Debug, Default)]
pub(crate) struct Resolved {
    /// The batch's id.
    pub batch: Option<i64>,
    /// Each instance depended on (by id, in id order): whether any end meets it.
    pub deps: BTreeMap<i64, bool>,
    /// How many of them are not met yet.
    pub unmet: i64,
    /// Why the new instances are cancelled at once (a dependency is broken already).
    pub broken: Option<String>,
}

impl Resolved {
    /// The state the new instances start in.
    pub(crate) fn state(&self) -> State {
        policy::initial_state(self.broken.is_some(), self.unmet)
    }
}

/// A dependency's instance, locked.
struct DepRow {
    id: i64,
    job: Hash,
    created: i64,
    state: State,
}

fn dep_row<R: Row>(r: &R) -> Result<DepRow, R::Error> {
    Ok(DepRow {
        id: r.req_int(0)?,
        job: r.hash(1)?,
        created: r.req_int(2)?,
        state: r.state(3)?,
    })
}

fn bad_dependency(sel: &Selector, why: &str) -> Error {
    Error::Config {
        what: "dependency",
        value: sel.to_string(),
        why: why.into(),
    }
}

/// Resolves `opts`' batch (creating it on first use) and dependencies for a push of
/// `jobs`. A dependency that names nothing, names every failed instance, or would name
/// the new instances themselves (a cycle: their own batch or job) is an error.
pub(crate) async fn resolve<T: Tx>(
    tx: &mut T,
    opts: &PushOptions,
    jobs: &[&Hash],
) -> R<Resolved, T> {
    let mut out = Resolved::default();
    if let Some(name) = &opts.batch {
        crate::queue::check_batch_name(name)?;
        let now = tx.now();
        tx.execute(&INSERT_BATCH, &args![name.as_str(), now])
            .await?;
        out.batch = Some(
            tx.one(&BATCH_ID, &args![name.as_str()], |r| r.req_int(0))
                .await?,
        );
    }
    for dep in &opts.after {
        let sel = &dep.selector;
        let cycle = match sel {
            Selector::Batch(b) => opts.batch.as_ref() == Some(b),
            Selector::Hash(h) => jobs.contains(&h),
            _ => false,
        };
        if cycle {
            let why = "it names the instances being added (a cycle)";
            return Err(bad_dependency(sel, why).into());
        }
        let rows = match sel {
            Selector::Id(i) => tx.rows(&DEP_BY_ID, &args![*i], |r| dep_row(r)).await?,
            Selector::Created(c) => tx.rows(&DEP_BY_CREATED, &args![*c], |r| dep_row(r)).await?,
            Selector::Hash(h) => tx.rows(&DEP_BY_HASH, &args![h], |r| dep_row(r)).await?,
            Selector::Batch(b) => {
                tx.rows(&DEP_BY_BATCH, &args![b.as_str()], |r| dep_row(r))
                    .await?
            }
            Selector::AllFailed => {
                return Err(bad_dependency(sel, "not a dependency: name instances").into());
            }
        };
        if rows.is_empty() {
            return Err(bad_dependency(sel, "it names no instance").into());
        }
        for row in rows {
            add_dep(&mut out, &row, dep.any);
        }
    }
    Ok(out)
}

/// Counts instance `id` (locked) into `out` as a dependency (a retried instance's,
/// whose dependencies are ids already).
pub(crate) async fn add_dep_id<T: Tx>(
    tx: &mut T,
    out: &mut Resolved,
    id: i64,
    any: bool,
) -> R<(), T> {
    if let Some(row) = tx.opt(&DEP_BY_ID, &args![id], |r| dep_row(r)).await? {
        add_dep(out, &row, any);
    }
    Ok(())
}

/// Counts dependency `row` into `out` (an instance named twice counts once, and
/// waits for its result if either naming asks for that).
fn add_dep(out: &mut Resolved, row: &DepRow, any: bool) {
    let any = match out.deps.get(&row.id) {
        Some(&before) => {
            if policy::dependency(row.state, before) == DepState::Unmet {
                out.unmet -= 1;
            }
            before && any
        }
        None => any,
    };
    out.deps.insert(row.id, any);
    match policy::dependency(row.state, any) {
        DepState::Met => {}
        DepState::Unmet => out.unmet += 1,
        DepState::Broken => {
            let msg = policy::broken_message(&row.job, row.created, row.state);
            out.broken.get_or_insert(msg);
        }
    }
}

/// Records new instance `id`'s dependency rows.
pub(crate) async fn insert_deps<T: Tx>(tx: &mut T, id: i64, r: &Resolved) -> R<(), T> {
    for (&dep, &any) in &r.deps {
        tx.execute(&INSERT_DEP, &args![id, dep, any]).await?;
    }
    Ok(())
}

/// One row of [`DEPENDENTS`]: an instance waiting for another.
pub(crate) type Waiting = (i64, bool, Hash, i64);

/// Decodes a row of [`DEPENDENTS`].
pub(crate) fn waiting_row<R: Row>(r: &R) -> Result<Waiting, R::Error> {
    Ok((r.req_int(0)?, r.flag(1)?, r.hash(2)?, r.req_int(3)?))
}

/// Instance `id` (of `job`, pushed at `created`) has just ended in `state`: each
/// instance waiting for it is met (and pending once nothing else is unmet) or, if
/// the end breaks its dependency, cancelled — and so on down the whole graph. Runs in
/// the transaction that ended `id`, which may have read `id`'s [`DEPENDENTS`]
/// already (`known`: read after `id`'s row was locked, so no dependency was added
/// since).
pub(crate) async fn ended<T: Tx>(
    tx: &mut T,
    id: i64,
    (job, created): (&Hash, i64),
    state: State,
    mut known: Option<Vec<Waiting>>,
) -> R<(), T> {
    let mut stack = vec![(id, *job, created, state)];
    while let Some((id, job, created, state)) = stack.pop() {
        let waiting = match known.take() {
            Some(w) => w,
            None => tx.rows(&DEPENDENTS, &args![id], |r| waiting_row(r)).await?,
        };
        for (dependent, any, djob, dcreated) in waiting {
            match policy::dependency(state, any) {
                DepState::Met => {
                    tx.execute(&MET, &args![dependent]).await?;
                }
                DepState::Broken => {
                    let msg = policy::broken_message(&job, created, state);
                    let now = tx.now();
                    let n = tx
                        .execute(&BROKEN, &args![dependent, now, msg.as_str()])
                        .await?;
                    if n == 1 {
                        let data = serde_json::json!({"message": msg});
                        let inst = Some((dependent, dcreated));
                        tx.event(EventKind::Cancel, &djob, inst, data).await?;
                        stack.push((dependent, djob, dcreated, State::Cancelled));
                    }
                }
                DepState::Unmet => {}
            }
        }
    }
    Ok(())
}

/// Up to `limit` results of instance `id`'s dependencies with ids above `after`, in
/// id order (see [`Queue::dependency_results`](crate::queue::Queue::dependency_results)).
pub(crate) async fn results<C: Conn>(
    c: &mut C,
    id: i64,
    after: i64,
    limit: i64,
) -> R<Vec<DependencyResult>, C> {
    c.rows(&DEP_RESULTS, &args![id, after, limit], |r| {
        Ok(DependencyResult {
            instance: r.req_int(0)?,
            job: r.hash(1)?,
            result: r.opt_hash(2)?.unwrap_or_else(|| Hash::of(b"")),
        })
    })
    .await
}

/// The digest of instance `id`'s dependency results, in order: the sha256 of the
/// `BATCHDB_DEPS` file its runner gets, part of its result-cache key.
pub(crate) async fn inputs<C: Conn>(c: &mut C, id: i64) -> R<Hash, C> {
    let mut h = Hasher::new();
    c.each(&DEP_RESULTS, &args![id, 0i64, i64::MAX], |r| {
        let d = DependencyResult {
            instance: 0,
            job: r.hash(1)?,
            result: r.opt_hash(2)?.unwrap_or_else(|| Hash::of(b"")),
        };
        h.update(d.line().as_bytes());
        Ok(())
    })
    .await?;
    Ok(h.finish())
}
