//! Batches on the facade: their counts, and `wait`, which follows the event log until
//! every instance named has ended.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use futures_util::Stream;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::hash::Hash;
use crate::queue::{BatchCounts, Event, EventKind, Selector, State};
use crate::{BatchDb, PAGE, paged};

/// How far a [`BatchDb::wait`] has got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitProgress {
    /// Instances waited for.
    pub total: u64,
    /// Of those, how many ended (with a result, a failure or cancelled).
    pub ended: u64,
    /// Of those, how many did not end with a result.
    pub failed: u64,
    /// How many are running now.
    pub running: u64,
}

/// An instance that ended without a result, as [`BatchDb::wait`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitFailure {
    /// The instance id.
    pub id: i64,
    /// Its job key.
    pub job: Hash,
    /// Its push time.
    pub created: i64,
    /// How it ended: `fail` or `cancelled`.
    pub state: State,
    /// Why, as recorded.
    pub message: String,
}

/// What [`BatchDb::wait`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WaitOutcome {
    /// The counts when it returned.
    pub progress: WaitProgress,
    /// The instances that ended without a result (failed or cancelled, not retried).
    pub failures: Vec<WaitFailure>,
    /// Whether the timeout passed first.
    pub timed_out: bool,
}

impl BatchDb {
    /// Streams every batch with its counts, in creation order, a page at a time.
    pub fn batches(&self) -> impl Stream<Item = Result<BatchCounts>> + Send + 'static {
        let queue = self.queue.clone();
        paged(move |after| {
            let queue = queue.clone();
            async move {
                let rows = queue.batches_page(after, PAGE, None).await?;
                let next = rows.last().map(|b| b.id);
                Ok((rows, next))
            }
        })
    }

    /// Batch `name`'s counts; [`Error::BatchNotFound`] if there is no such batch.
    pub async fn batch(&self, name: &str) -> Result<BatchCounts> {
        crate::queue::check_batch_name(name)?;
        let mut rows = self.queue.batches_page(0, usize::MAX, Some(name)).await?;
        rows.pop()
            .ok_or_else(|| Error::BatchNotFound(name.to_string()))
    }

    /// Waits until every instance `sels` name has ended — including instances that
    /// wait for dependencies or for a retry, instances pushed into a named batch
    /// while it waits, and the instance `retry` pushes in place of one named — or
    /// `timeout` passes. It reads the named instances once, then follows the event
    /// log (woken by changes from any process); `progress` is called after each
    /// step. A selector naming nothing is [`Error::InstanceNotFound`].
    pub async fn wait(
        &self,
        sels: &[Selector],
        timeout: Option<Duration>,
        mut progress: impl FnMut(&WaitProgress),
    ) -> Result<WaitOutcome> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut after = self.queue.last_event_id().await?;
        let mut w = Waiting::default();
        for sel in sels {
            if let Selector::Batch(b) = sel {
                w.batches.insert(b.clone());
            }
            let found = self.queue.select_states(sel).await?;
            if found.is_empty() {
                return Err(Error::InstanceNotFound(sel.to_string()));
            }
            for s in found {
                w.track(s.id, s.job, s.created, s.state, s.retried_by);
            }
        }
        self.follow_retries(&mut w).await?;
        self.fill_messages(&mut w).await?;
        loop {
            progress(&w.progress());
            if w.open.is_empty() {
                return Ok(w.outcome(false));
            }
            let seen = self.queue.change_seq();
            let events = self.queue.events(after, PAGE).await?;
            if let Some(last) = events.last() {
                after = last.id;
                for ev in &events {
                    w.apply(ev);
                }
                self.follow_retries(&mut w).await?;
                continue;
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(w.outcome(true));
            }
            let nap = left.map_or(Duration::from_secs(1), |l| l.min(Duration::from_secs(1)));
            self.queue.wait_change(seen, nap).await;
        }
    }

    /// Tracks the instances `retry` pushed in place of tracked ones.
    async fn follow_retries(&self, w: &mut Waiting) -> Result<()> {
        while let Some(id) = w.retried.pop() {
            for s in self.queue.select_states(&Selector::Id(id)).await? {
                w.track(s.id, s.job, s.created, s.state, s.retried_by);
            }
        }
        Ok(())
    }

    /// Reads why each instance that had ended without a result when the wait began
    /// ended so.
    async fn fill_messages(&self, w: &mut Waiting) -> Result<()> {
        for (&id, f) in &mut w.failures {
            if f.message.is_empty() {
                f.message = self.queue.instance(id).await?.message();
            }
        }
        Ok(())
    }
}

/// What a wait knows of the instances it waits for. It keeps only what it must:
/// the open instances (id and whether running), the failures (for their `FAIL`
/// lines), and the ids of those it saw ended (so that an end is never counted twice);
/// a wait over a million instances holds a few tens of bytes each.
#[derive(Debug, Default)]
struct Waiting {
    /// Instances not ended: whether each is running.
    open: HashMap<i64, bool>,
    /// How many of `open` are running.
    running: u64,
    /// Instances that ended with a result.
    results: HashSet<i64>,
    /// Instances that ended without one, not retried.
    failures: BTreeMap<i64, WaitFailure>,
    /// Instances retried in place of others (their replacement stands for them).
    superseded: HashSet<i64>,
    /// Batches whose new instances join the wait.
    batches: HashSet<String>,
    /// Replacements to start tracking.
    retried: Vec<i64>,
}

impl Waiting {
    fn known(&self, id: i64) -> bool {
        self.open.contains_key(&id)
            || self.results.contains(&id)
            || self.failures.contains_key(&id)
            || self.superseded.contains(&id)
    }

    /// Starts tracking instance `id` in `state` (retried as `by`, if it was).
    fn track(&mut self, id: i64, job: Hash, created: i64, state: State, by: Option<i64>) {
        if self.known(id) {
            return;
        }
        if let Some(by) = by {
            self.superseded.insert(id);
            self.retried.push(by);
            return;
        }
        match state {
            State::Result => {
                self.results.insert(id);
            }
            State::Fail | State::Cancelled => {
                let message = String::new();
                let f = WaitFailure {
                    id,
                    job,
                    created,
                    state,
                    message,
                };
                self.failures.insert(id, f);
            }
            s => {
                self.open.insert(id, s == State::Running);
                self.running += u64::from(s == State::Running);
            }
        }
    }

    /// Tracked open instance `id` ended in `state` (`message`: why, without a result).
    fn end(&mut self, ev: &Event, id: i64, state: State, message: String) {
        match self.open.remove(&id) {
            None => return,
            Some(running) => self.running -= u64::from(running),
        }
        if state == State::Result {
            self.results.insert(id);
            return;
        }
        let created = ev.created.unwrap_or(0);
        let f = WaitFailure {
            id,
            job: ev.job,
            created,
            state,
            message,
        };
        self.failures.insert(id, f);
    }

    fn apply(&mut self, ev: &Event) {
        let Some(id) = ev.instance else { return };
        let msg = || {
            let m = ev.data.get("message").and_then(|m| m.as_str());
            m.unwrap_or("cancelled").to_string()
        };
        match ev.event {
            EventKind::Push => {
                let batch = ev.data.get("batch").and_then(|b| b.as_str());
                if batch.is_some_and(|b| self.batches.contains(b)) {
                    self.track(id, ev.job, ev.created.unwrap_or(0), State::Pending, None);
                }
            }
            EventKind::Start => {
                if let Some(r) = self.open.get_mut(&id) {
                    self.running += u64::from(!*r);
                    *r = true;
                }
            }
            EventKind::Result => self.end(ev, id, State::Result, String::new()),
            EventKind::Fail => self.end(ev, id, State::Fail, msg()),
            EventKind::Cancel => self.end(ev, id, State::Cancelled, msg()),
            EventKind::Retry => self.retry(id, ev),
            EventKind::Create => {}
        }
    }

    /// A retry event: an attempt goes back to pending, or `retry` pushed `id` in
    /// place of the instance in `data.from`.
    fn retry(&mut self, id: i64, ev: &Event) {
        let from = ev.data.get("from").and_then(serde_json::Value::as_i64);
        let Some(from) = from else {
            if let Some(r) = self.open.get_mut(&id) {
                self.running -= u64::from(*r);
                *r = false;
            }
            return;
        };
        if self.failures.remove(&from).is_some() {
            self.superseded.insert(from);
            self.track(id, ev.job, ev.created.unwrap_or(0), State::Pending, None);
        }
    }

    fn progress(&self) -> WaitProgress {
        let n = |x: usize| x as u64;
        let failed = n(self.failures.len());
        let ended = n(self.results.len()) + failed;
        WaitProgress {
            total: ended + n(self.open.len()),
            ended,
            failed,
            running: self.running,
        }
    }

    fn outcome(&self, timed_out: bool) -> WaitOutcome {
        WaitOutcome {
            progress: self.progress(),
            failures: self.failures.values().cloned().collect(),
            timed_out,
        }
    }
}
