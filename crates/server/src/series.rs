//! `GET /api/series`: what the dashboard's charts draw, per minute: results,
//! failures, cancellations and queue depth, and a run-time distribution.
//!
//! Kept in memory by the server's one follower of the event log (`metrics.rs`), in
//! at most [`KEEP_MINUTES`] per-minute buckets, so a request costs the same however
//! many events the log holds and the browser never reads the log itself.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::api::query;
use crate::error::ApiError;
use crate::metrics::BUCKETS;

/// Minutes of buckets kept (a day); older ones are dropped as new ones come.
pub(crate) const KEEP_MINUTES: i64 = 1440;

const MINUTE_MS: i64 = 60_000;

/// How long a request waits for the follower to reach the log's end.
const CATCH_UP: Duration = Duration::from_secs(2);

/// What ended or was pushed in one minute.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Minute {
    results: u64,
    failures: u64,
    cancels: u64,
    pushes: u64,
    /// Run times of results and failures, by [`BUCKETS`] (the last: longer).
    runtimes: [u64; BUCKETS.len() + 1],
}

/// How an event changes a minute.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Change {
    /// An instance was pushed.
    Push,
    /// An instance ended with a result; its last attempt ran this long (ms), if known.
    Result(Option<i64>),
    /// An instance failed for good; likewise.
    Fail(Option<i64>),
    /// An instance was cancelled.
    Cancel,
}

/// Per-minute buckets, keyed by minute since the epoch.
#[derive(Debug, Default)]
pub(crate) struct Series {
    minutes: BTreeMap<i64, Minute>,
}

fn bucket(ms: i64) -> usize {
    // Run times are far below 2^52 ms: the conversion is exact.
    #[allow(clippy::cast_precision_loss)]
    let secs = ms.max(0) as f64 / 1000.0;
    BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(BUCKETS.len())
}

impl Series {
    /// Counts `change` in the minute of `time` (epoch ms).
    pub(crate) fn record(&mut self, time: i64, change: Change) {
        let at = time.div_euclid(MINUTE_MS);
        let newest = self
            .minutes
            .last_key_value()
            .map_or(at, |(k, _)| *k.max(&at));
        if at <= newest - KEEP_MINUTES {
            return;
        }
        let m = self.minutes.entry(at).or_default();
        let ran = match change {
            Change::Push => {
                m.pushes += 1;
                None
            }
            Change::Result(ran) => {
                m.results += 1;
                ran
            }
            Change::Fail(ran) => {
                m.failures += 1;
                ran
            }
            Change::Cancel => {
                m.cancels += 1;
                None
            }
        };
        if let Some(ms) = ran {
            m.runtimes[bucket(ms)] += 1;
        }
        while let Some((&k, _)) = self.minutes.first_key_value() {
            if k > newest - KEEP_MINUTES {
                break;
            }
            self.minutes.remove(&k);
        }
    }

    /// The last `minutes` minutes up to `now` (epoch ms), with `open` instances not
    /// ended now (queue depth is walked back from it).
    pub(crate) fn window(&self, now: i64, minutes: i64, open: u64) -> SeriesBody {
        let last = now.div_euclid(MINUTE_MS);
        let first = last - minutes + 1;
        let len = usize::try_from(minutes).unwrap_or(0);
        let mut body = SeriesBody {
            time: (first..=last).map(|m| m * MINUTE_MS).collect(),
            results: vec![0; len],
            failures: vec![0; len],
            cancelled: vec![0; len],
            depth: vec![0; len],
            runtime: Runtime {
                bounds: BUCKETS.to_vec(),
                counts: vec![0; BUCKETS.len() + 1],
            },
        };
        for (&k, m) in self.minutes.range(first..=last) {
            let Some(i) = usize::try_from(k - first).ok().filter(|i| *i < len) else {
                continue;
            };
            body.results[i] = m.results;
            body.failures[i] = m.failures;
            body.cancelled[i] = m.cancels;
            for (c, n) in body.runtime.counts.iter_mut().zip(m.runtimes) {
                *c += n;
            }
        }
        // Depth at the end of a minute: open now, minus what was pushed after it,
        // plus what ended after it.
        let net =
            |m: &Minute| i128::from(m.results + m.failures + m.cancels) - i128::from(m.pushes);
        let mut depth = i128::from(open);
        for m in self.minutes.range(last + 1..).map(|(_, m)| m) {
            depth += net(m);
        }
        for (i, k) in (first..=last)
            .rev()
            .zip((0..len).rev())
            .map(|(k, i)| (i, k))
        {
            body.depth[i] = u64::try_from(depth.max(0)).unwrap_or(0);
            if let Some(m) = self.minutes.get(&k) {
                depth += net(m);
            }
        }
        body
    }
}

/// The run-time distribution: `counts[i]` runs took at most `bounds[i]` seconds (and
/// more than the bound before); the last count is longer than every bound.
#[derive(Debug, Serialize)]
pub(crate) struct Runtime {
    bounds: Vec<f64>,
    counts: Vec<u64>,
}

/// The body of `GET /api/series`.
#[derive(Debug, Serialize)]
pub(crate) struct SeriesBody {
    /// Each minute's start (epoch ms), oldest first.
    time: Vec<i64>,
    /// Instances that ended with a result in each minute.
    results: Vec<u64>,
    /// Instances that failed for good in each minute.
    failures: Vec<u64>,
    /// Instances cancelled in each minute.
    cancelled: Vec<u64>,
    /// Instances not ended (pending, waiting or running) at each minute's end.
    depth: Vec<u64>,
    /// Run times of the results and failures in the window.
    runtime: Runtime,
}

/// Parameters of `GET /api/series`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SeriesParams {
    /// How many minutes, up to now (1..=1440, default 60).
    minutes: Option<i64>,
    #[serde(rename = "access_token")]
    _access_token: Option<IgnoredAny>,
}

/// `GET /api/series[?minutes=60]`: per-minute results, failures, cancellations and
/// queue depth over the last `minutes` minutes (1 to 1440), and the distribution of
/// their run times, as `{"time", "results", "failures", "cancelled", "depth",
/// "runtime": {"bounds", "counts"}}`. Counted from the event log by the server's
/// follower (it waits up to 2 s for it to reach the log's end); costs the same
/// however long the log is.
pub(crate) async fn series(
    State(app): State<AppState>,
    p: Result<Query<SeriesParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let minutes = query(p)?.minutes.unwrap_or(60);
    if !(1..=KEEP_MINUTES).contains(&minutes) {
        return Err(ApiError::bad_request(format!(
            "invalid minutes {minutes}: expected 1 to {KEEP_MINUTES}"
        )));
    }
    let last = app.db.last_event_id().await?;
    app.metrics.caught_up(last, CATCH_UP).await;
    let c = app.db.counts().await?;
    let open = c.pending + c.waiting + c.running;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let body = app.metrics.with_series(|s| s.window(now, minutes, open))?;
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = MINUTE_MS;

    #[test]
    fn window_counts_each_minute_and_walks_depth_back_from_now() {
        let mut s = Series::default();
        let t = 1_000 * M;
        // minute 997: 3 pushed; 998: one result (2 s), one failure; 1000: one cancel
        for _ in 0..3 {
            s.record(t - 3 * M, Change::Push);
        }
        s.record(t - 2 * M + 5, Change::Result(Some(2_000)));
        s.record(t - 2 * M + 9, Change::Fail(None));
        s.record(t + 10, Change::Cancel);
        let w = s.window(t + 30_000, 5, 0);
        assert_eq!(w.time, [996, 997, 998, 999, 1000].map(|m| m * M));
        assert_eq!(w.results, [0, 0, 1, 0, 0]);
        assert_eq!(w.failures, [0, 0, 1, 0, 0]);
        assert_eq!(w.cancelled, [0, 0, 0, 0, 1]);
        assert_eq!(w.depth, [0, 3, 1, 1, 0]);
        assert_eq!(w.runtime.counts.iter().sum::<u64>(), 1);
        assert_eq!(w.runtime.counts[bucket(2_000)], 1);
        assert_eq!(w.runtime.bounds[bucket(2_000)], 2.5);
    }

    #[test]
    fn buckets_older_than_a_day_are_dropped_and_never_grow_back() {
        let mut s = Series::default();
        s.record(0, Change::Push);
        s.record(KEEP_MINUTES * M, Change::Push);
        assert_eq!(s.minutes.len(), 1, "the oldest minute left the window");
        s.record(30_000, Change::Push);
        assert_eq!(
            s.minutes.len(),
            1,
            "a late event past the window is not kept"
        );
        s.record(M, Change::Push);
        assert_eq!(
            s.minutes.len(),
            2,
            "the window holds the day's 1440 minutes"
        );
        let w = s.window(KEEP_MINUTES * M, 2, 2);
        assert_eq!(w.depth, [1, 2]);
    }

    #[test]
    fn run_times_past_every_bound_land_in_the_last_bucket() {
        assert_eq!(bucket(-5), 0);
        assert_eq!(bucket(5), 0);
        assert_eq!(bucket(3_600_000), BUCKETS.len() - 1);
        assert_eq!(bucket(3_600_001), BUCKETS.len());
    }
}
