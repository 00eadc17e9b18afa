//! The old routes, the JSON API, paging and filters, the prefix, the dashboard files.

use batchdb::Hash;
use batchdb::queue::ListKind;
use batchdb_server::ServeOptions;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::util::*;

/// What `batchdb list KIND` prints: the library's rows, serialized the same way.
async fn cli_shape(s: &Server, kind: ListKind) -> Vec<Value> {
    s.db.list(kind, None)
        .map(|r| serde_json::to_value(r.expect("row")).expect("json"))
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_the_key_and_queues_the_job() {
    let s = Server::start().await;
    let (key, id) = s.create("echo hello from http").await;
    assert_eq!(key, Hash::of(b"echo hello from http").to_hex());
    let pending = s.lines("/list/pending").await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["job"], key.as_str());
    assert_eq!(pending[0]["id"], id);
    assert_eq!(pending[0]["running"], false);
    let jobs = s.lines("/list/job").await;
    assert_eq!(jobs, cli_shape(&s, ListKind::Job).await);
    assert_eq!(jobs[0]["key"], key.as_str());
    let blob = s.get(&format!("/blob/{key}")).await;
    assert_eq!(blob.status(), 200);
    assert_eq!(blob.text().await.unwrap(), "echo hello from http");
    // The same payload again is another instance of the same job.
    let (key2, id2) = s.create("echo hello from http").await;
    assert_eq!(key2, key);
    assert!(id2 > id);
    assert_eq!(s.lines("/list/pending").await.len(), 2);
    assert_eq!(s.lines("/list/job").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_takes_queue_options() {
    let s = Server::start().await;
    let r = s
        .post(
            "/create?priority=5&delay=3600&timeout=2.5&retries=2&cached=true",
            "true",
        )
        .await;
    assert_eq!(r.status(), 200);
    let id: i64 = r.headers()["x-batchdb-instance"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let d = s.json(&format!("/api/instance/{id}")).await;
    assert_eq!(d["priority"], 5);
    assert_eq!(d["timeout_ms"], 2500);
    assert_eq!(d["retries"], 2);
    assert_eq!(d["cached"], true);
    assert!(d["run_at"].as_i64().unwrap() > d["created"].as_i64().unwrap() + 3_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_have_the_cli_shapes() {
    let s = Server::start().await;
    s.create("echo ok").await;
    s.create("echo bad >&2; exit 3").await;
    let cancelled = s.add("echo never").await;
    s.db.cancel(&batchdb::queue::Selector::Id(cancelled.id))
        .await
        .unwrap();
    s.run_until_empty().await;
    for (kind, lk) in [
        ("job", ListKind::Job),
        ("pending", ListKind::Pending),
        ("result", ListKind::Result),
        ("fail", ListKind::Fail),
        ("cancelled", ListKind::Cancelled),
    ] {
        let r = s.get(&format!("/list/{kind}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/x-ndjson");
        let rows = json_lines(&r.text().await.unwrap());
        assert_eq!(rows, cli_shape(&s, lk).await, "{kind}");
    }
    let results = s.lines("/list/result").await;
    assert_eq!(results.len(), 1);
    let result_id = results[0]["value"]["hash"].as_str().unwrap();
    assert_eq!(result_id, Hash::of(b"ok\n").to_hex());
    let out = s
        .get(&format!("/blob/{result_id}"))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(out, "ok\n");
    let fails = s.lines("/list/fail").await;
    assert_eq!(fails.len(), 1);
    assert_eq!(fails[0]["value"]["exit_code"], 3);
    let err = fails[0]["value"]["stderr"].as_str().unwrap();
    assert_eq!(
        s.get(&format!("/blob/{err}")).await.text().await.unwrap(),
        "bad\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_the_cursor_without_gaps_or_repeats() {
    let s = Server::start().await;
    let a = s.add("echo a").await;
    let mut ids = vec![a.id];
    for i in 0..24 {
        let p = if i % 2 == 0 { "echo b" } else { "echo a" };
        ids.push(s.add(p).await.id);
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = s
            .json(&format!("/api/list/pending?limit=10&after={after}"))
            .await;
        let rows = page["rows"].as_array().unwrap();
        assert!(rows.len() <= 10);
        seen.extend(rows.iter().map(|r| r["id"].as_i64().unwrap()));
        match page["next"].as_i64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(seen, ids);

    // The JSON-lines route pages the same way, with the cursor in headers.
    let r = s.get("/list/pending?limit=10").await;
    assert_eq!(r.status(), 200);
    let next = r.headers()["x-next-after"].to_str().unwrap().to_string();
    assert_eq!(next, ids[9].to_string());
    let link = r.headers()["link"].to_str().unwrap().to_string();
    assert_eq!(
        link,
        format!("</list/pending?after={next}&limit=10>; rel=\"next\"")
    );
    assert_eq!(json_lines(&r.text().await.unwrap()).len(), 10);
    let last = s
        .get(&format!("/list/pending?limit=10&after={}", ids[19]))
        .await;
    assert!(last.headers().get("x-next-after").is_none());
    assert_eq!(json_lines(&last.text().await.unwrap()).len(), 5);

    // Filters: one job's rows, and running or not.
    let key_a = a.job.to_hex();
    let only_a = s
        .json(&format!("/api/list/pending?job={key_a}&limit=100"))
        .await;
    let rows = only_a["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 13);
    assert!(rows.iter().all(|r| r["job"] == key_a.as_str()));
    assert_eq!(only_a["next"], Value::Null);
    let lines = s.lines(&format!("/list/pending?job={key_a}")).await;
    assert_eq!(lines.len(), 13);
    let running = s.json("/api/list/pending?running=true").await;
    assert_eq!(running["rows"], json!([]));
    let waiting = s.json("/api/list/pending?running=false&limit=3").await;
    assert_eq!(waiting["rows"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_cancel_retry_instance_counts() {
    let s = Server::start().await;
    let (key, first) = s.create("exit 7").await;
    // push another instance of the stored job
    let r = s
        .client
        .post(s.url("/api/push"))
        .json(&json!({"job": key, "priority": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pushed: Value = r.json().await.unwrap();
    assert_eq!(pushed["job"], key.as_str());
    let second = pushed["id"].as_i64().unwrap();
    assert_eq!(
        s.json(&format!("/api/instance/{second}")).await["priority"],
        3
    );
    // cancel the second, run the first (it fails)
    let r = s.post(&format!("/api/cancel/id:{second}"), "").await;
    assert_eq!(r.status(), 200);
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled[0]["id"], second);
    s.run_until_empty().await;
    let counts = s.json("/api/counts").await;
    assert_eq!(
        counts,
        json!({"pending": 0, "waiting": 0, "running": 0, "result": 0, "fail": 1, "cancelled": 1})
    );
    let d = s.json(&format!("/api/instance/{first}")).await;
    assert_eq!(d["state"], "fail");
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0]["exit_code"], 7);
    assert_eq!(attempts[0]["outcome"], "fail");
    assert!(attempts[0]["stderr"]["hash"].is_string());
    assert_eq!(
        s.json(&format!("/api/instance/id:{second}")).await["state"],
        "cancelled"
    );
    // cancelling again matches nothing pending or running
    assert_error(
        s.post(&format!("/api/cancel/id:{second}"), "").await,
        404,
        "no pending or running instance",
    )
    .await;
    // retry both (all failed: the failure; by id: the cancelled one)
    let r = s.post("/api/retry/failed", "").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap().as_array().unwrap().len(),
        1
    );
    let r = s.post(&format!("/api/retry/{second}"), "").await;
    assert_eq!(
        r.status(),
        404,
        "a number alone is a created time, not an id"
    );
    let r = s.post(&format!("/api/retry/id:{second}"), "").await;
    assert_eq!(r.status(), 200);
    // each at most once
    assert_error(
        s.post(&format!("/api/retry/id:{second}"), "").await,
        404,
        "no failed or cancelled",
    )
    .await;
    assert_eq!(s.json("/api/counts").await["pending"], 2);
    let last = s.json("/api/last-event").await["id"].as_i64().unwrap();
    assert_eq!(last, s.db.queue().last_event_id().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_lists_newest_terminal_rows_first() {
    let s = Server::start().await;
    for i in 0..5 {
        s.add(&format!("echo {i}")).await;
        s.run_until_empty().await;
    }
    s.add("exit 1").await;
    s.run_until_empty().await;
    let recent = s.json("/api/recent/result?limit=3").await;
    let rows = recent["rows"].as_array().unwrap();
    let ids: Vec<i64> = rows
        .iter()
        .map(|r| r["value"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![5, 4, 3]);
    let all = cli_shape(&s, ListKind::Result).await;
    let mut newest = rows[0].clone();
    assert_eq!(newest["preview"], "echo 4");
    newest.as_object_mut().unwrap().remove("preview");
    assert_eq!(newest, all[4]);
    let fails = s.json("/api/recent/fail").await;
    assert_eq!(fails["rows"].as_array().unwrap().len(), 1);
    assert_eq!(s.json("/api/recent/cancelled").await["rows"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_mounts_every_route() {
    let s = Server::with(ServeOptions {
        prefix: "/batch/".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(s.prefix, "/batch");
    let (key, _) = s.create("echo prefixed").await; // POST /batch/create
    assert_eq!(s.lines("/list/job").await.len(), 1);
    assert_eq!(s.get(&format!("/blob/{key}")).await.status(), 200);
    assert_eq!(s.get("/healthz").await.status(), 200);
    let page = s.get("/").await.text().await.unwrap();
    assert!(page.contains("/batch/assets/app.js"), "{page}");
    assert!(page.contains("/batch/assets/uPlot.iife.min.js"), "{page}");
    for path in ["/assets/charts.js", "/assets/uPlot.min.css", "/api/series"] {
        assert_eq!(s.get(path).await.status(), 200, "{path}");
    }
    // nothing outside the prefix
    let root = format!("http://{}", s.addr);
    for path in ["/list/job", "/create", "/", "/healthz", "/assets/charts.js"] {
        let r = s.client.get(format!("{root}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    // /batch leads to the dashboard at /batch/
    let r = raw(
        s.addr,
        b"GET /batch HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.0, 308);
    assert!(
        r.1.to_ascii_lowercase().contains("location: /batch/"),
        "{}",
        r.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_files_and_healthz() {
    let s = Server::start().await;
    let r = s.get("/").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
    let page = r.text().await.unwrap();
    assert!(page.contains("<textarea id=\"payload\""));
    assert!(!page.contains("__BASE__"));
    let js = s.get("/assets/app.js").await;
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.text().await.unwrap().contains("EventSource"));
    let css = s.get("/assets/app.css").await;
    assert!(
        css.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
    let h = s.get("/healthz").await;
    assert_eq!(h.status(), 200);
    assert_eq!(h.text().await.unwrap(), "ok\n");
}
