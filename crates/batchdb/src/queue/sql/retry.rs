//! `retry`, once for every backend: failed or cancelled instances pushed again with
//! their batch and dependencies, and (when asked) the dependents their failure
//! cancelled, rewired to the new instances.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use super::deps::{self, Resolved};
use super::write::insert_instance;
use super::{Conn, Sql, Tx, args};
use crate::queue::row::Row;
use crate::queue::{EventKind, Instance, PushOptions, Selector};

type R<T, E> = Result<T, <E as Conn>::Error>;

static RETRYABLE: Sql = Sql::new(
    "SELECT job, priority, timeout_ms, retries, cached, batch, context, needs, conc_key,
       conc_limit FROM instances
     WHERE id = $1 AND state IN ('fail', 'cancelled') AND retried_by IS NULL FOR UPDATE",
);
static RETRIED_BY: Sql = Sql::new("UPDATE instances SET retried_by = $2 WHERE id = $1");
static DEPS_OF: Sql = Sql::new("SELECT dep, after_any FROM deps WHERE instance = $1 ORDER BY dep");
// Dependents a dependency's failure cancelled (only those carry a note), not retried:
// of the instance, or of any instance it was retried in place of.
static CANCELLED_DEPENDENTS: Sql = Sql::new(
    "SELECT d.instance FROM deps d JOIN instances i ON i.id = d.instance
     WHERE (d.dep = $1 OR d.dep IN (SELECT id FROM instances WHERE retried_by = $1))
       AND i.state = 'cancelled' AND i.note IS NOT NULL AND i.retried_by IS NULL
     ORDER BY d.instance",
);
static PREDECESSOR: Sql = Sql::new("SELECT id FROM instances WHERE retried_by = $1");
// Only a retry still there (a pruned one is no instance to wait for).
static RETRIED_AS: Sql = Sql::new(
    "SELECT i.retried_by FROM instances i JOIN instances n ON n.id = i.retried_by WHERE i.id = $1",
);

/// Pushes the selected failed or cancelled instances again (see
/// [`Queue::retry`](crate::queue::Queue::retry)), each in its batch and with its
/// dependencies; with `with_dependents`, also every instance cancelled because one of
/// them — or an instance they were retried in place of — failed (and such dependents'
/// dependents, down the graph), waiting for the new instances instead. Dependencies
/// are older than their dependents, so going in id order pushes each replacement
/// before anything that waits for it.
pub(crate) async fn retry<T: Tx>(
    tx: &mut T,
    sel: &Selector,
    with_dependents: bool,
) -> R<Vec<Instance>, T> {
    let mut todo: BTreeSet<i64> = super::read::select(tx, sel).await?.into_iter().collect();
    if with_dependents {
        let mut frontier: Vec<i64> = todo.iter().copied().collect();
        while let Some(id) = frontier.pop() {
            // Through the instances it was retried in place of, too.
            let mut ids = vec![id];
            let mut at = id;
            while let Some(p) = tx.opt(&PREDECESSOR, &args![at], |r| r.req_int(0)).await? {
                ids.push(p);
                at = p;
            }
            for id in ids {
                for d in tx
                    .rows(&CANCELLED_DEPENDENTS, &args![id], |r| r.req_int(0))
                    .await?
                {
                    if todo.insert(d) {
                        frontier.push(d);
                    }
                }
            }
        }
    }
    // Each instance after those it waits for (a retried instance is newer than what
    // was pushed after the one it replaced, so id order alone is not enough).
    let mut left: Vec<i64> = todo.into_iter().collect();
    let mut out = Vec::new();
    while !left.is_empty() {
        let mut later = Vec::new();
        for &id in &left {
            if waits_for_any(tx, id, &left, &later).await? {
                later.push(id);
            } else if let Some(inst) = retry_one(tx, id).await? {
                out.push(inst);
            }
        }
        if later.len() == left.len() {
            // Unreachable for a graph built by pushes; never loop forever.
            for id in later.drain(..) {
                out.extend(retry_one(tx, id).await?);
            }
        }
        left = later;
    }
    Ok(out)
}

/// Whether instance `id` waits for one of `left` (sorted) not retried yet: one after
/// `id` (this pass has not reached it) or one deferred to `later`.
async fn waits_for_any<T: Tx>(tx: &mut T, id: i64, left: &[i64], later: &[i64]) -> R<bool, T> {
    let deps = tx.rows(&DEPS_OF, &args![id], |r| r.req_int(0)).await?;
    for dep in deps {
        let d = newest(tx, dep).await?;
        let not_yet = left
            .binary_search(&d)
            .is_ok_and(|_| d > id || later.contains(&d));
        if not_yet {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The newest instance retried in place of instance `id` (`id` itself if it was
/// not retried): what a dependency on `id` now waits for.
async fn newest<T: Tx>(tx: &mut T, mut id: i64) -> R<i64, T> {
    let mut seen: HashSet<i64> = HashSet::new();
    while seen.insert(id) {
        match tx.opt(&RETRIED_AS, &args![id], |r| r.int(0)).await? {
            Some(Some(next)) => id = next,
            _ => break,
        }
    }
    Ok(id)
}

/// Pushes instance `id` again if it failed or was cancelled and was not retried,
/// each dependency replaced by the newest instance retried in its place.
async fn retry_one<T: Tx>(tx: &mut T, id: i64) -> R<Option<Instance>, T> {
    let row = tx
        .opt(&RETRYABLE, &args![id], |r| {
            let opts = PushOptions {
                priority: r.req_int(1)?,
                timeout: r.unsigned::<u64>(2)?.map(Duration::from_millis),
                retries: r.unsigned(3)?,
                cached: r.flag(4)?,
                context: r.exec_context(6)?,
                needs: r.needs(7)?,
                concurrency: r.concurrency(8)?,
                ..PushOptions::default()
            };
            Ok((r.hash(0)?, opts, r.int(5)?))
        })
        .await?;
    let Some((job, opts, batch)) = row else {
        return Ok(None);
    };
    let old = tx
        .rows(&DEPS_OF, &args![id], |r| Ok((r.req_int(0)?, r.flag(1)?)))
        .await?;
    let mut resolved = Resolved {
        batch,
        ..Resolved::default()
    };
    for (dep, any) in old {
        let dep = newest(tx, dep).await?;
        deps::add_dep_id(tx, &mut resolved, dep, any).await?;
    }
    let inst = insert_instance(tx, &job, &opts, &resolved).await?;
    tx.execute(&RETRIED_BY, &args![id, inst.id]).await?;
    let data = serde_json::json!({"from": id});
    tx.event(EventKind::Retry, &job, Some((inst.id, inst.created)), data)
        .await?;
    Ok(Some(inst))
}
