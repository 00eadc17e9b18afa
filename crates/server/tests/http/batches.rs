//! Batches over HTTP: `batch` and `after` on both push routes, the batch routes, the
//! `batch` filter, `retry?with_dependents=true`.

use serde_json::json;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_dependencies_over_http() {
    let s = Server::start().await;
    let up = s.post("/create?batch=maps", "exit 4").await;
    assert_eq!(up.status(), 200);
    let up_id: i64 = up.headers()["x-batchdb-instance"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let key = up.text().await.unwrap().trim().to_string();
    let down = s
        .post("/create?batch=red&after=batch:maps,id:1", "echo reduced")
        .await;
    assert_eq!(down.status(), 200);
    // /api/push takes the selectors as a JSON array.
    let body = json!({"job": key, "batch": "again", "after_any": [format!("id:{up_id}")]});
    let r = s
        .client
        .post(s.url("/api/push"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let pending = s.lines("/list/pending?batch=red").await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["waiting"], true);
    let batches = s.json("/api/batches").await;
    let names: Vec<&str> = batches
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["batch"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["maps", "red", "again"]);
    assert_eq!(s.json("/api/batch/red").await["waiting"], 1);
    s.run_until_empty().await;
    let red = s.json("/api/batch/red").await;
    assert_eq!(
        (red["cancelled"].as_u64(), red["total"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        s.json("/api/batch/again").await["result"],
        0,
        "exit 4 again"
    );
    let cancelled = s.lines("/list/cancelled?batch=red").await;
    let msg = cancelled[0]["value"]["message"].as_str().unwrap();
    assert!(msg.starts_with(&format!("dependency {key} ")), "{msg}");
    let again = s
        .post(&format!("/api/retry/id:{up_id}?with_dependents=true"), "")
        .await;
    assert_eq!(again.status(), 200);
    let pushed: serde_json::Value = again.json().await.unwrap();
    assert_eq!(pushed.as_array().unwrap().len(), 2, "{pushed}");
    // Errors: a bad name, a selector naming nothing, an unknown batch.
    assert_error(
        s.post("/create?batch=no%20way", "x").await,
        400,
        "batch name",
    )
    .await;
    assert_error(
        s.post("/create?after=batch:none", "x").await,
        400,
        "names no instance",
    )
    .await;
    assert_error(s.get("/api/batch/none").await, 404, "batch none not found").await;
}
