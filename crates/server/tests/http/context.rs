//! The execution-context options over HTTP: `cwd`, `env`, the limits, `needs` and
//! `concurrency` on both push routes, shown by the instance route, and refused with
//! a JSON error when bad.

use serde_json::json;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_options_over_http_are_stored_shown_and_checked() {
    let s = Server::start().await;
    let env = "A%3D1%0AB%3Dtwo%20words";
    let up = s
        .post(
            &format!(
                "/create?cwd=/tmp&env={env}&memory=64M&cpus=0.5&pids=10&needs=gpu=1,mem=1G\
                 &concurrency=api=3"
            ),
            "echo hi",
        )
        .await;
    assert_eq!(up.status(), 200);
    let id = up.headers()["x-batchdb-instance"]
        .to_str()
        .unwrap()
        .to_string();
    let key = up.text().await.unwrap().trim().to_string();
    let shown = s.json(&format!("/api/instance/{id}")).await;
    assert_eq!(shown["cwd"], "/tmp", "{shown}");
    assert_eq!(shown["env"], json!({"A": "1", "B": "two words"}));
    assert_eq!(
        shown["limits"],
        json!({"memory": 64 << 20, "millicpus": 500, "pids": 10})
    );
    assert_eq!(shown["needs"], json!({"gpu": 1, "mem": 1 << 30}));
    assert_eq!(shown["concurrency"], json!({"key": "api", "limit": 3}));
    // /api/push takes the environment as an object and the needs as an array.
    let body = json!({"job": key, "env": {"X": "y"}, "needs": ["licences=2"]});
    let r = s
        .client
        .post(s.url("/api/push"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let pushed: serde_json::Value = r.json().await.unwrap();
    let shown = s.json(&format!("/api/instance/{}", pushed["id"])).await;
    assert_eq!(shown["env"], json!({"X": "y"}));
    assert_eq!(shown["needs"], json!({"licences": 2}));
    assert!(shown.get("cwd").is_none());
    // Bad values: a relative directory, a zero limit, an unknown field.
    assert_error(s.post("/create?cwd=rel", "x").await, 400, "absolute path").await;
    assert_error(s.post("/create?memory=0", "x").await, 400, "memory limit").await;
    assert_error(s.post("/create?needs=gpu=0", "x").await, 400, "at least 1").await;
    let r = s
        .client
        .post(s.url("/api/push"))
        .json(&json!({"job": key, "nope": 1}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "unknown field").await;
    let r = s
        .client
        .post(s.url("/api/push"))
        .json(&json!({"priority": 1}))
        .send()
        .await
        .unwrap();
    assert_error(r, 400, "job").await;
    assert_eq!(
        s.lines("/list/pending").await.len(),
        2,
        "nothing else queued"
    );
}
