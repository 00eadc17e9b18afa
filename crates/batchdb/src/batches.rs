//! Batches on the facade: their counts, and `wait`, which follows the event log until
//! every instance named has ended.

use std::collections::{HashMap, HashSet};
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
            if w.open == 0 {
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
        for (&id, t) in &mut w.tracked {
            if matches!(t.state, State::Fail | State::Cancelled) && t.message.is_none() {
                let d = self.queue.instance(id).await?;
                t.message = Some(d.message());
            }
        }
        Ok(())
    }
}

/// One tracked instance.
#[derive(Debug)]
struct Tracked {
    job: Hash,
    created: i64,
    state: State,
    message: Option<String>,
    /// Retried: its replacement stands for it.
    superseded: bool,
}

/// What a wait knows of the instances it waits for.
#[derive(Debug, Default)]
struct Waiting {
    tracked: HashMap<i64, Tracked>,
    batches: HashSet<String>,
    /// Instances not ended (and not superseded).
    open: u64,
    /// Replacements to start tracking.
    retried: Vec<i64>,
}

fn is_open(s: State) -> bool {
    matches!(s, State::Waiting | State::Pending | State::Running)
}

impl Waiting {
    fn track(&mut self, id: i64, job: Hash, created: i64, state: State, by: Option<i64>) {
        if self.tracked.contains_key(&id) {
            return;
        }
        let superseded = by.is_some();
        if let Some(by) = by {
            self.retried.push(by);
        }
        if is_open(state) && !superseded {
            self.open += 1;
        }
        let message = None;
        let t = Tracked {
            job,
            created,
            state,
            message,
            superseded,
        };
        self.tracked.insert(id, t);
    }

    /// Moves tracked instance `id` to `state` (`message`: why, for an end without a
    /// result).
    fn set(&mut self, id: i64, state: State, message: Option<String>) {
        let Some(t) = self.tracked.get_mut(&id) else {
            return;
        };
        if !is_open(t.state) {
            return;
        }
        if !is_open(state) && !t.superseded {
            self.open -= 1;
        }
        t.state = state;
        t.message = message;
    }

    fn apply(&mut self, ev: &Event) {
        let Some(id) = ev.instance else { return };
        let msg = || {
            let m = ev.data.get("message").and_then(|m| m.as_str());
            Some(m.unwrap_or("cancelled").to_string())
        };
        match ev.event {
            EventKind::Push => {
                let batch = ev.data.get("batch").and_then(|b| b.as_str());
                if batch.is_some_and(|b| self.batches.contains(b)) {
                    let state = if ev.data.get("waiting").is_some() {
                        State::Waiting
                    } else {
                        State::Pending
                    };
                    self.track(id, ev.job, ev.created.unwrap_or(0), state, None);
                }
            }
            EventKind::Start => self.set(id, State::Running, None),
            EventKind::Result => self.set(id, State::Result, None),
            EventKind::Fail => self.set(id, State::Fail, msg()),
            EventKind::Cancel => self.set(id, State::Cancelled, msg()),
            EventKind::Retry => self.retry(id, ev),
            EventKind::Create => {}
        }
    }

    /// A retry event: an attempt goes back to pending, or `retry` pushed `id` in
    /// place of the instance in `data.from`.
    fn retry(&mut self, id: i64, ev: &Event) {
        let from = ev.data.get("from").and_then(serde_json::Value::as_i64);
        let Some(from) = from else {
            if let Some(t) = self.tracked.get_mut(&id) {
                if is_open(t.state) {
                    t.state = State::Pending;
                }
            }
            return;
        };
        if let Some(t) = self.tracked.get_mut(&from) {
            if !t.superseded {
                t.superseded = true;
                if is_open(t.state) {
                    self.open -= 1;
                }
            }
            self.track(id, ev.job, ev.created.unwrap_or(0), State::Pending, None);
        }
    }

    fn progress(&self) -> WaitProgress {
        let mut p = WaitProgress::default();
        for t in self.tracked.values().filter(|t| !t.superseded) {
            p.total += 1;
            match t.state {
                State::Running => p.running += 1,
                State::Result => p.ended += 1,
                State::Fail | State::Cancelled => {
                    p.ended += 1;
                    p.failed += 1;
                }
                State::Waiting | State::Pending => {}
            }
        }
        p
    }

    fn outcome(&self, timed_out: bool) -> WaitOutcome {
        let mut failures: Vec<WaitFailure> = self
            .tracked
            .iter()
            .filter(|(_, t)| !t.superseded && matches!(t.state, State::Fail | State::Cancelled))
            .map(|(&id, t)| WaitFailure {
                id,
                job: t.job,
                created: t.created,
                state: t.state,
                message: t.message.clone().unwrap_or_default(),
            })
            .collect();
        failures.sort_by_key(|f| f.id);
        WaitOutcome {
            progress: self.progress(),
            failures,
            timed_out,
        }
    }
}
