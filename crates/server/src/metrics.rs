//! `GET /metrics`: Prometheus text, from instance counts and from following the
//! event log in this process from its first event.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use batchdb::BatchDb;
use batchdb::queue::{Event, EventKind};
use futures_util::StreamExt;
use tokio_util::task::AbortOnDropHandle;

use crate::AppState;
use crate::error::ApiError;
use crate::series::{Change, Series};

/// Histogram bucket bounds, in seconds.
pub(crate) const BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Instances remembered between their push (or start) and their start (or end);
/// beyond this many the oldest observations are skipped rather than grow memory.
const MAX_TRACKED: usize = 1_000_000;

/// How long a scrape waits for the follower to reach the log's end.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Peak-memory histogram bucket bounds, in bytes: 1 MiB to 64 GiB, by fours.
pub(crate) const BYTE_BUCKETS: [f64; 9] = [
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
    4_294_967_296.0,
    17_179_869_184.0,
    68_719_476_736.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Default for Histogram {
    /// Bounded by [`BUCKETS`] (seconds).
    fn default() -> Self {
        Histogram::with(&BUCKETS)
    }
}

/// A histogram bounded by [`BYTE_BUCKETS`].
#[derive(Debug, Clone)]
struct Bytes(Histogram);

impl Default for Bytes {
    fn default() -> Self {
        Bytes(Histogram::with(&BYTE_BUCKETS))
    }
}

impl Histogram {
    fn with(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            count: 0,
            sum: 0.0,
        }
    }

    fn observe(&mut self, value: f64) {
        let value = value.max(0.0);
        for (i, b) in self.bounds.iter().enumerate() {
            if value <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += value;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in self.bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What the event log has shown so far.
#[derive(Debug, Default)]
struct Tally {
    last: i64,
    creates: u64,
    pushes: u64,
    runs: u64,
    results: u64,
    cached: u64,
    failures: u64,
    attempt_failures: u64,
    retries: u64,
    cancels: u64,
    run_duration: Histogram,
    queue_wait: Histogram,
    /// CPU seconds (user plus system) of each attempt whose end carries its usage.
    job_cpu: Histogram,
    /// Peak memory of each attempt whose end carries its usage.
    job_rss: Bytes,
    /// instance -> when it became due (epoch ms), until it starts.
    due: HashMap<i64, i64>,
    /// instance -> when its current attempt started (epoch ms), until it ends.
    started: HashMap<i64, i64>,
    /// The charts' per-minute buckets.
    series: Series,
}

fn ms_to_secs(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

impl Tally {
    fn apply(&mut self, ev: &Event) {
        self.last = ev.id;
        let Some(inst) = ev.instance else {
            if ev.event == EventKind::Create {
                self.creates += 1;
            }
            return;
        };
        let num = |k: &str| ev.data.get(k).and_then(|v| v.as_i64());
        // An attempt's end (result, failure, retry, release) with what it used.
        if let (Some(cpu), Some(rss)) = (num("cpu_ms"), num("max_rss")) {
            self.job_cpu.observe(ms_to_secs(cpu));
            self.job_rss.0.observe(rss as f64);
        }
        match ev.event {
            EventKind::Create => self.creates += 1,
            EventKind::Push => {
                self.pushes += 1;
                self.series.record(ev.time, Change::Push);
                let due = num("run_at").or(ev.created).unwrap_or(ev.time);
                if self.due.len() < MAX_TRACKED {
                    self.due.insert(inst, due);
                }
            }
            EventKind::Start => {
                self.runs += 1;
                if let Some(due) = self.due.remove(&inst) {
                    self.queue_wait.observe(ms_to_secs(ev.time - due));
                }
                if self.started.len() < MAX_TRACKED {
                    self.started.insert(inst, ev.time);
                }
            }
            EventKind::Result => {
                self.results += 1;
                if ev.data.get("cached").and_then(|v| v.as_bool()) == Some(true) {
                    self.cached += 1;
                }
                let ran = self.ended(inst, ev.time, true);
                self.series.record(ev.time, Change::Result(ran));
            }
            EventKind::Fail => {
                self.failures += 1;
                self.attempt_failures += 1;
                let ran = self.ended(inst, ev.time, true);
                self.series.record(ev.time, Change::Fail(ran));
            }
            EventKind::Cancel => {
                self.cancels += 1;
                self.ended(inst, ev.time, false);
                self.series.record(ev.time, Change::Cancel);
            }
            EventKind::Retry => {
                if ev.data.get("from").is_some() {
                    // A failed instance pushed again: its push event came first.
                    self.retries += 1;
                    return;
                }
                let released = ev.data.get("released").is_some();
                if !released {
                    self.retries += 1;
                    self.attempt_failures += 1;
                }
                self.ended(inst, ev.time, !released);
                let due = num("run_at").unwrap_or(ev.time);
                if self.due.len() < MAX_TRACKED {
                    self.due.insert(inst, due);
                }
            }
        }
    }

    /// Forgets `inst`'s due and start times; returns how long its attempt ran (ms),
    /// if its start was seen.
    fn ended(&mut self, inst: i64, time: i64, observe: bool) -> Option<i64> {
        self.due.remove(&inst);
        let start = self.started.remove(&inst)?;
        if observe {
            self.run_duration.observe(ms_to_secs(time - start));
        }
        Some(time - start)
    }
}

/// The server's one follower of the event log: it keeps the metrics tally and fans
/// each event out to every `/events` stream (so an idle stream costs no query).
#[derive(Debug)]
pub(crate) struct Metrics {
    db: BatchDb,
    tally: std::sync::Arc<Mutex<Tally>>,
    progress: tokio::sync::watch::Sender<i64>,
    fanout: tokio::sync::broadcast::Sender<Arc<Published>>,
    task: OnceLock<AbortOnDropHandle<()>>,
}

/// An event as the follower read it: its id and its JSON line.
#[derive(Debug)]
pub(crate) struct Published {
    /// The event's id in the log.
    pub id: i64,
    /// The event as `batchdb events` prints it.
    pub json: String,
}

/// How many events a stream may fall behind the follower before it reads the log
/// itself to catch up.
const FANOUT: usize = 1024;

impl Metrics {
    pub(crate) fn new(db: BatchDb) -> Metrics {
        Metrics {
            db,
            tally: Default::default(),
            progress: tokio::sync::watch::channel(0).0,
            fanout: tokio::sync::broadcast::channel(FANOUT).0,
            task: OnceLock::new(),
        }
    }

    /// Starts following the event log, if a runtime is there to run it and it has
    /// not started yet.
    pub(crate) fn start(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.task.get_or_init(|| {
            let db = self.db.clone();
            let tally = self.tally.clone();
            let progress = self.progress.clone();
            let fanout = self.fanout.clone();
            AbortOnDropHandle::new(rt.spawn(follow(db, tally, progress, fanout)))
        });
    }

    /// Waits (up to `limit`) until the follower has read the log up to event `last`.
    pub(crate) async fn caught_up(&self, last: i64, limit: Duration) {
        self.start();
        let mut rx = self.progress.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|seen| *seen >= last)).await;
    }

    /// `f` applied to the charts' buckets as the follower has counted them.
    pub(crate) fn with_series<T>(&self, f: impl FnOnce(&Series) -> T) -> Result<T, ApiError> {
        let t = self.tally.lock().map_err(|_| {
            ApiError::new(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "metrics lock poisoned",
            )
        })?;
        Ok(f(&t.series))
    }

    /// Every event the follower reads from now on (ids only increase; a receiver
    /// that falls [`FANOUT`] events behind gets `Lagged`).
    pub(crate) fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<Published>> {
        self.start();
        self.fanout.subscribe()
    }
}

async fn follow(
    db: BatchDb,
    tally: std::sync::Arc<Mutex<Tally>>,
    progress: tokio::sync::watch::Sender<i64>,
    fanout: tokio::sync::broadcast::Sender<Arc<Published>>,
) {
    let mut after = 0;
    loop {
        let events = db.events(after, true);
        futures_util::pin_mut!(events);
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    after = ev.id;
                    if let Ok(mut t) = tally.lock() {
                        t.apply(&ev);
                    }
                    if fanout.receiver_count() > 0 {
                        if let Ok(json) = serde_json::to_string(&ev) {
                            let _ = fanout.send(Arc::new(Published { id: ev.id, json }));
                        }
                    }
                    progress.send_replace(ev.id);
                }
                Err(e) => {
                    tracing::warn!("metrics: reading the event log: {e}");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `GET /metrics`: Prometheus text format (0.0.4).
///
/// - `batchdb_instances{state}`: instances by state now (gauge);
/// - `batchdb_runs_total`, `batchdb_results_total`, `batchdb_failures_total`
///   (instances that ended as failures), `batchdb_attempt_failures_total`,
///   `batchdb_retries_total`, `batchdb_cancelled_total`, `batchdb_cache_hits_total`,
///   `batchdb_jobs_created_total`, `batchdb_pushes_total`: counters over the whole
///   event log;
/// - `batchdb_run_duration_seconds` (start to result or failure of an attempt) and
///   `batchdb_queue_wait_seconds` (due to start): histograms;
/// - `batchdb_job_cpu_seconds` and `batchdb_job_max_rss_bytes`: histograms of what
///   each attempt that ran used (from its end event's `cpu_ms` and `max_rss`);
/// - `batchdb_events_seen`: the newest event id counted.
///
/// A scrape first waits (up to 5 s) until the follower has read the log as far as it
/// reached when the scrape began, so the counters include every event before it.
pub(crate) async fn scrape(State(app): State<AppState>) -> Result<Response, ApiError> {
    let m = &app.metrics;
    m.start();
    let last = app.db.last_event_id().await?;
    let mut rx = m.progress.subscribe();
    let _ = tokio::time::timeout(CATCH_UP, rx.wait_for(|seen| *seen >= last)).await;
    let counts = app.db.counts().await?;
    let mut out = String::new();
    out.push_str("# HELP batchdb_instances Instances by state.\n# TYPE batchdb_instances gauge\n");
    for (state, n) in [
        ("pending", counts.pending),
        ("waiting", counts.waiting),
        ("running", counts.running),
        ("result", counts.result),
        ("fail", counts.fail),
        ("cancelled", counts.cancelled),
    ] {
        let _ = writeln!(out, "batchdb_instances{{state=\"{state}\"}} {n}");
    }
    let t = m.tally.lock().map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "metrics lock poisoned",
        )
    })?;
    let counters = [
        ("batchdb_runs_total", "Attempts started.", t.runs),
        (
            "batchdb_results_total",
            "Instances that ended with a result.",
            t.results,
        ),
        (
            "batchdb_failures_total",
            "Instances that ended as failures.",
            t.failures,
        ),
        (
            "batchdb_attempt_failures_total",
            "Failed attempts, retried or not.",
            t.attempt_failures,
        ),
        (
            "batchdb_retries_total",
            "Instances sent back to pending after a failure, or pushed again.",
            t.retries,
        ),
        ("batchdb_cancelled_total", "Instances cancelled.", t.cancels),
        (
            "batchdb_cache_hits_total",
            "Results served from the result cache.",
            t.cached,
        ),
        ("batchdb_jobs_created_total", "Jobs stored.", t.creates),
        ("batchdb_pushes_total", "Instances pushed.", t.pushes),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    t.run_duration.render(
        &mut out,
        "batchdb_run_duration_seconds",
        "Attempt run time, from its start to its result or failure.",
    );
    t.queue_wait.render(
        &mut out,
        "batchdb_queue_wait_seconds",
        "Time from an instance being due (pushed, or its retry time) to its attempt starting.",
    );
    t.job_cpu.render(
        &mut out,
        "batchdb_job_cpu_seconds",
        "CPU time (user plus system) of each attempt that ran, as its worker measured it.",
    );
    t.job_rss.0.render(
        &mut out,
        "batchdb_job_max_rss_bytes",
        "Peak memory of each attempt that ran, as its worker measured it.",
    );
    let _ = writeln!(
        out,
        "# HELP batchdb_events_seen The newest event-log id counted.\n# TYPE batchdb_events_seen gauge\nbatchdb_events_seen {}",
        t.last
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}
