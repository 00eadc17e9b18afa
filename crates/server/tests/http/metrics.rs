//! `GET /metrics`: gauges from counts, counters and histograms from the event log.

use std::collections::HashMap;

use batchdb_server::ServeOptions;

use crate::util::*;

fn parse(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l:?}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|e| panic!("{l:?}: {e}")),
            )
        })
        .collect()
}

async fn scrape(url: &str) -> HashMap<String, f64> {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    parse(&r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_whole_event_log() {
    let s = Server::start().await;
    s.add("echo fine").await;
    s.add("exit 2").await;
    s.add("echo later").await;
    s.db.cancel(&"id:3".parse().unwrap()).await.unwrap();
    s.run_until_empty().await;
    s.add("echo waiting").await;

    let m = scrape(&s.url("/metrics")).await;
    assert_eq!(m["batchdb_instances{state=\"pending\"}"], 1.0);
    assert_eq!(m["batchdb_instances{state=\"result\"}"], 1.0);
    assert_eq!(m["batchdb_instances{state=\"fail\"}"], 1.0);
    assert_eq!(m["batchdb_instances{state=\"cancelled\"}"], 1.0);
    assert_eq!(m["batchdb_instances{state=\"running\"}"], 0.0);
    assert_eq!(m["batchdb_instances{state=\"waiting\"}"], 0.0);
    assert_eq!(m["batchdb_runs_total"], 2.0);
    assert_eq!(m["batchdb_results_total"], 1.0);
    assert_eq!(m["batchdb_failures_total"], 1.0);
    assert_eq!(m["batchdb_cancelled_total"], 1.0);
    assert_eq!(m["batchdb_pushes_total"], 4.0);
    assert_eq!(m["batchdb_jobs_created_total"], 4.0);
    assert_eq!(m["batchdb_run_duration_seconds_count"], 2.0);
    assert_eq!(m["batchdb_run_duration_seconds_bucket{le=\"+Inf\"}"], 2.0);
    assert_eq!(m["batchdb_queue_wait_seconds_count"], 2.0);
    assert!(m["batchdb_run_duration_seconds_sum"] >= 0.0);
    // What the two attempts that ran used, from their end events.
    assert_eq!(m["batchdb_job_cpu_seconds_count"], 2.0);
    assert_eq!(m["batchdb_job_max_rss_bytes_count"], 2.0);
    assert_eq!(m["batchdb_job_max_rss_bytes_bucket{le=\"+Inf\"}"], 2.0);
    assert!(
        m["batchdb_job_max_rss_bytes_sum"] > 0.0,
        "a shell's peak memory"
    );
    assert!(m["batchdb_job_cpu_seconds_sum"] >= 0.0);
    // buckets are cumulative
    let mut last = 0.0;
    for b in ["0.005", "0.1", "1", "60", "3600", "+Inf"] {
        let v = m[&format!("batchdb_queue_wait_seconds_bucket{{le=\"{b}\"}}")];
        assert!(v >= last, "bucket {b}");
        last = v;
    }

    // A server started later counts the same history: it reads the log from its start.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let db = s.db.clone();
    let late = tokio::spawn(batchdb_server::serve(
        listener,
        db,
        ServeOptions::default(),
        std::future::pending(),
    ));
    let m2 = scrape(&format!("http://{addr}/metrics")).await;
    for k in [
        "batchdb_runs_total",
        "batchdb_failures_total",
        "batchdb_run_duration_seconds_count",
        "batchdb_queue_wait_seconds_count",
        "batchdb_job_cpu_seconds_count",
        "batchdb_job_max_rss_bytes_sum",
        "batchdb_events_seen",
    ] {
        assert_eq!(m2[k], m[k], "{k}");
    }
    late.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_and_fail_rows_carry_what_the_attempt_used() {
    let s = Server::start().await;
    s.add("echo fine").await;
    s.add("exit 2").await;
    s.run_until_empty().await;
    for kind in ["result", "fail"] {
        let rows = s.lines(&format!("/list/{kind}")).await;
        assert_eq!(rows.len(), 1, "{rows:?}");
        let v = &rows[0]["value"];
        assert!(v["max_rss"].as_u64().is_some_and(|b| b > 0), "{v}");
        assert!(v["cpu_ms"].as_u64().is_some(), "{v}");
    }
}
