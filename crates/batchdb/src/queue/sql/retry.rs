//! `retry`, once for every backend: failed or cancelled instances pushed again with
//! their batch and dependencies, and (when asked) the dependents their failure
//! cancelled, rewired to the new instances.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::deps::{self, Resolved};
use super::write::insert_instance;
use super::{Conn, Sql, Tx, args};
use crate::queue::row::Row;
use crate::queue::{EventKind, Instance, PushOptions, Selector};

type R<T, E> = Result<T, <E as Conn>::Error>;

static RETRYABLE: Sql = Sql::new(
    "SELECT job, priority, timeout_ms, retries, cached, batch FROM instances
     WHERE id = $1 AND state IN ('fail', 'cancelled') AND retried_by IS NULL FOR UPDATE",
);
static RETRIED_BY: Sql = Sql::new("UPDATE instances SET retried_by = $2 WHERE id = $1");
static DEPS_OF: Sql = Sql::new("SELECT dep, after_any FROM deps WHERE instance = $1 ORDER BY dep");
// Dependents a dependency's failure cancelled (only those carry a note), not retried.
static CANCELLED_DEPENDENTS: Sql = Sql::new(
    "SELECT d.instance FROM deps d JOIN instances i ON i.id = d.instance
     WHERE d.dep = $1 AND i.state = 'cancelled' AND i.note IS NOT NULL
       AND i.retried_by IS NULL ORDER BY d.instance",
);

/// Pushes the selected failed or cancelled instances again (see
/// [`Queue::retry`](crate::queue::Queue::retry)), each in its batch and with its
/// dependencies; with `with_dependents`, also every instance cancelled because one of
/// them (or such a dependent, down the graph) failed, waiting for the new instances
/// instead. Dependencies are older than their dependents, so going in id order
/// pushes each replacement before anything that waits for it.
pub(crate) async fn retry<T: Tx>(
    tx: &mut T,
    sel: &Selector,
    with_dependents: bool,
) -> R<Vec<Instance>, T> {
    let mut todo: BTreeSet<i64> = super::read::select(tx, sel).await?.into_iter().collect();
    if with_dependents {
        let mut frontier: Vec<i64> = todo.iter().copied().collect();
        while let Some(id) = frontier.pop() {
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
    let mut replaced: HashMap<i64, i64> = HashMap::new();
    let mut out = Vec::new();
    for id in todo {
        if let Some(inst) = retry_one(tx, id, &replaced).await? {
            replaced.insert(id, inst.id);
            out.push(inst);
        }
    }
    Ok(out)
}

/// Pushes instance `id` again if it failed or was cancelled and was not retried,
/// its dependencies mapped through `replaced` (old id to new).
async fn retry_one<T: Tx>(
    tx: &mut T,
    id: i64,
    replaced: &HashMap<i64, i64>,
) -> R<Option<Instance>, T> {
    let row = tx
        .opt(&RETRYABLE, &args![id], |r| {
            let mut opts = PushOptions {
                priority: r.req_int(1)?,
                timeout: r.unsigned::<u64>(2)?.map(Duration::from_millis),
                retries: r.unsigned(3)?,
                cached: r.flag(4)?,
                ..PushOptions::default()
            };
            opts.run_at = None;
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
        let dep = replaced.get(&dep).copied().unwrap_or(dep);
        deps::add_dep_id(tx, &mut resolved, dep, any).await?;
    }
    let inst = insert_instance(tx, &job, &opts, &resolved).await?;
    tx.execute(&RETRIED_BY, &args![id, inst.id]).await?;
    let data = serde_json::json!({"from": id});
    tx.event(EventKind::Retry, &job, Some((inst.id, inst.created)), data)
        .await?;
    Ok(Some(inst))
}
