//! What the dashboard reads: payload previews on the API rows (and never on the
//! JSON-lines routes), the text filter, paging back through recent rows, the chart
//! series counted from the event log, and the vendored chart library.

use batchdb::queue::PushOptions;
use serde_json::{Value, json};

use crate::util::*;

fn previews(page: &Value) -> Vec<String> {
    page["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["preview"].as_str().expect("a preview").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_rows_carry_a_bounded_one_line_preview_and_json_lines_rows_do_not() {
    let s = Server::start().await;
    s.add("echo one\necho two\n").await;
    // A payload kept in the blob store (past the 16 KiB inline bound): only its
    // first 1 KiB is read for the preview.
    let big = format!("\n\t# {}\n{}", "x".repeat(300), "y\n".repeat(20_000));
    let inst = s.add(&big).await;
    s.add("<script>alert(1)</script>\x1b[31m").await;
    let page = s.json("/api/list/pending").await;
    let p = previews(&page);
    assert_eq!(p[0], "echo one…");
    assert!(p[1].starts_with("# xxx") && p[1].ends_with('…'), "{}", p[1]);
    assert!(p[1].len() <= 120 + '…'.len_utf8());
    assert_eq!(p[2], "<script>alert(1)</script>\\u{1b}[31m");
    // the JSON-lines rows keep their shape exactly
    for line in s.lines("/list/pending").await {
        assert!(line.get("preview").is_none(), "{line}");
    }
    let paged = s.lines("/list/pending?limit=2").await;
    assert!(paged.iter().all(|l| l.get("preview").is_none()));
    let one = s.json(&format!("/api/instance/{}", inst.id)).await;
    assert_eq!(one["preview"], json!(p[1]));
    assert_eq!(one["id"], inst.id);
    s.run_until_empty().await;
    // the big one and the script fail in the shell; every ended row has its preview
    let results = s.json("/api/recent/result").await;
    assert_eq!(previews(&results), ["echo one…"]);
    let mut failed = previews(&s.json("/api/recent/fail").await);
    failed.sort();
    assert_eq!(failed, [p[1].clone(), p[2].clone()]);
    let listed = s.json("/api/list/result").await;
    assert_eq!(previews(&listed)[0], "echo one…");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_filter_matches_the_preview_in_any_case_or_a_job_key_prefix() {
    let s = Server::start().await;
    for i in 0..30 {
        s.add(&format!("echo item-{i}")).await;
    }
    let odd = s.add("echo The Odd One").await;
    let page = s.json("/api/list/pending?text=odd%20ONE").await;
    assert_eq!(previews(&page), ["echo The Odd One"]);
    assert_eq!(page["next"], Value::Null);
    let prefix = &odd.job.to_hex()[..10];
    let page = s.json(&format!("/api/list/pending?text={prefix}")).await;
    assert_eq!(previews(&page), ["echo The Odd One"]);
    let page = s.json("/api/list/pending?text=item-2&limit=5").await;
    assert_eq!(
        previews(&page),
        [
            "echo item-2",
            "echo item-20",
            "echo item-21",
            "echo item-22",
            "echo item-23"
        ]
    );
    assert!(page["next"].is_i64());
    s.run_until_empty().await;
    let mut recent = previews(&s.json("/api/recent/result?text=item-1").await);
    recent.sort();
    let mut want: Vec<String> = std::iter::once(1)
        .chain(10..20)
        .map(|i| format!("echo item-{i}"))
        .collect();
    want.sort();
    assert_eq!(recent, want);
    // the seed's JSON-lines route takes no text filter
    assert_error(s.get("/list/pending?text=x").await, 400, "/api/list only").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recent_pages_back_through_older_rows_with_next_as_before() {
    let s = Server::start().await;
    for i in 0..7 {
        s.add(&format!("echo {i}")).await;
        s.run_until_empty().await;
    }
    let mut seen = Vec::new();
    let mut path = "/api/recent/result?limit=3".to_string();
    loop {
        let page = s.json(&path).await;
        seen.extend(previews(&page));
        match page["next"].as_i64() {
            Some(n) => path = format!("/api/recent/result?limit=3&before={n}"),
            None => break,
        }
    }
    let want: Vec<String> = (0..7).rev().map(|i| format!("echo {i}")).collect();
    assert_eq!(seen, want);
    assert_error(s.get("/api/recent/result?before=0").await, 400, "before").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_counts_results_failures_depth_and_run_times_per_minute() {
    let s = Server::start().await;
    for i in 0..3 {
        s.add(&format!("echo {i}")).await;
    }
    s.add("exit 1").await;
    s.add("exit 2").await;
    s.run_until_empty().await;
    let mut delayed = PushOptions::default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    delayed.run_at = Some(i64::try_from(now).unwrap() + 3_600_000);
    for p in ["echo later 1", "echo later 2"] {
        s.db.add(p.as_bytes(), &delayed).await.expect("add");
    }
    let v = wait_for("the series to count every end", || async {
        let v = s.json("/api/series?minutes=60").await;
        let sum = |k: &str| -> u64 {
            v[k].as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .sum()
        };
        (sum("results") == 3 && sum("failures") == 2).then_some(v)
    })
    .await;
    for k in ["time", "results", "failures", "cancelled", "depth"] {
        assert_eq!(v[k].as_array().unwrap().len(), 60, "{k}");
    }
    let depth = v["depth"].as_array().unwrap();
    assert_eq!(depth[59], 2, "two delayed instances are not ended");
    assert_eq!(depth[0], 0, "an hour ago nothing was queued");
    let runtime = &v["runtime"];
    let counts: u64 = runtime["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(counts, 5);
    assert_eq!(
        runtime["counts"].as_array().unwrap().len(),
        runtime["bounds"].as_array().unwrap().len() + 1
    );
    let t = v["time"].as_array().unwrap();
    assert_eq!(t[1].as_i64().unwrap() - t[0].as_i64().unwrap(), 60_000);
    assert_eq!(
        s.json("/api/series").await["time"]
            .as_array()
            .unwrap()
            .len(),
        60
    );
    for bad in ["0", "1441", "x"] {
        let r = s.get(&format!("/api/series?minutes={bad}")).await;
        assert_eq!(r.status(), 400, "minutes={bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_library_is_served_from_the_binary_with_its_license_under_the_same_csp() {
    let s = Server::start().await;
    let page = s.get("/").await;
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self';") && csp.contains("style-src 'self';"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");
    let html = page.text().await.unwrap();
    for (name, kind, needle) in [
        ("uPlot.iife.min.js", "text/javascript", "MIT License"),
        ("uPlot.min.css", "text/css", "MIT License"),
        (
            "uPlot.LICENSE",
            "text/plain",
            "Permission is hereby granted",
        ),
        ("charts.js", "text/javascript", "uPlot"),
        ("panel.js", "text/javascript", "batchdb show"),
        ("rows.js", "text/javascript", "textContent"),
    ] {
        let r = s.get(&format!("/assets/{name}")).await;
        assert_eq!(r.status(), 200, "{name}");
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
        assert!(r.text().await.unwrap().contains(needle), "{name}");
        if name != "uPlot.LICENSE" {
            assert!(
                html.contains(&format!("/assets/{name}")),
                "the page loads {name}"
            );
        }
    }
    assert_error(s.get("/assets/nope.js").await, 404, "asset").await;
    assert_error(s.get("/assets/..%2fapi.rs").await, 404, "").await;
}
