//! Live workers and what they declared, once for every backend: a worker announces
//! itself (and renews the entry) while it runs and removes it when it stops, so a
//! pending instance whose needs no live worker could ever meet is shown as such.

use std::time::Duration;

use super::{Conn, Sql, Tx, args};
use crate::queue::context::Resources;
use crate::queue::row::Row;

type R<T, E> = Result<T, <E as Conn>::Error>;

static UPSERT: Sql = Sql::new(
    "INSERT INTO workers(name, resources, seen, until) VALUES ($1, $2, $3, $4)
     ON CONFLICT (name) DO UPDATE SET resources = excluded.resources, seen = excluded.seen,
       until = excluded.until",
);
static REMOVE: Sql = Sql::new("DELETE FROM workers WHERE name = $1 OR until < $2");
static LIVE: Sql = Sql::new("SELECT resources FROM workers WHERE until >= $1");
static PENDING_NEEDS: Sql = Sql::new(
    "SELECT needs, COUNT(*) FROM instances
     WHERE state = 'pending' AND needs IS NOT NULL GROUP BY needs",
);

/// Records that worker `name` is alive with `resources`, for `ttl` from now.
pub(crate) async fn seen<T: Tx>(
    tx: &mut T,
    name: &str,
    resources: &Resources,
    ttl: Duration,
) -> R<(), T> {
    let now = tx.now();
    let text = serde_json::to_string(resources).unwrap_or_else(|_| "{}".into());
    let until = now.saturating_add(super::millis(ttl));
    tx.execute(&UPSERT, &args![name, text.as_str(), now, until])
        .await?;
    Ok(())
}

/// Removes worker `name`'s entry (it stopped), and any entry that lapsed.
pub(crate) async fn gone<T: Tx>(tx: &mut T, name: &str) -> R<(), T> {
    let now = tx.now();
    tx.execute(&REMOVE, &args![name, now]).await?;
    Ok(())
}

/// How many pending instances need what no live worker has in all (they wait until
/// one that has it starts), or, given `worker`, more than that worker has.
pub(crate) async fn unrunnable<C: Conn>(
    c: &mut C,
    now: i64,
    worker: Option<&Resources>,
) -> R<u64, C> {
    let live = match worker {
        Some(w) => vec![w.clone()],
        None => live(c, now).await?,
    };
    let pending = c
        .rows(&PENDING_NEEDS, &[], |r| {
            Ok((r.needs(0)?, r.unsigned::<u64>(1)?.unwrap_or(0)))
        })
        .await?;
    Ok(pending
        .iter()
        .filter(|(needs, _)| !live.iter().any(|w| w.fits(needs)))
        .map(|(_, n)| n)
        .sum())
}

/// What each live worker has.
async fn live<C: Conn>(c: &mut C, now: i64) -> R<Vec<Resources>, C> {
    c.rows(&LIVE, &args![now], |r| {
        let text = r.req_text(0)?;
        serde_json::from_str::<Resources>(&text)
            .map_err(|e| r.invalid(format!("worker resources {text:?}: {e}")))
    })
    .await
}
