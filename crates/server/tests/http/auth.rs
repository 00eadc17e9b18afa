//! The token, reads behind the token, cross-origin and Host checks.

use batchdb_server::ServeOptions;

use crate::util::*;

fn with_token(auth_reads: bool) -> ServeOptions {
    ServeOptions {
        token: Some("s3cret-token".into()),
        auth_reads,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutating_routes_need_the_token() {
    let s = Server::with(with_token(false)).await;
    let key = batchdb::Hash::of(b"x").to_hex();
    for path in [
        "/create",
        "/api/push",
        "/api/cancel/id:1",
        "/api/retry/failed",
    ] {
        let r = s.post(path, "echo x").await;
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        assert_error(r, 401, "token").await;
        let r = s
            .client
            .post(s.url(path))
            .bearer_auth("wrong")
            .body("echo x")
            .send()
            .await
            .unwrap();
        assert_error(r, 401, "wrong token").await;
    }
    // a token in the query string does not count for a mutation
    let r = s.post("/create?access_token=s3cret-token", "echo x").await;
    assert_eq!(r.status(), 401);
    assert_eq!(s.db.counts().await.unwrap().pending, 0);
    let r = s
        .client
        .post(s.url("/create"))
        .bearer_auth("s3cret-token")
        .body("echo x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // reads stay open
    for path in ["/list/job", "/api/counts", "/metrics", "/healthz", "/"] {
        assert_eq!(s.get(path).await.status(), 200, "{path}");
    }
    assert_eq!(s.get(&format!("/blob/{key}")).await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_can_need_the_token_too() {
    let s = Server::with(with_token(true)).await;
    let inst = s.add("echo private").await;
    let key = inst.job.to_hex();
    let blob = format!("/blob/{key}");
    for path in [
        "/list/job",
        "/api/list/pending",
        "/api/counts",
        "/api/instance/1",
        "/api/recent/result",
        "/api/series",
        "/events",
        "/metrics",
        blob.as_str(),
    ] {
        assert_error(s.get(path).await, 401, "token").await;
        let r = s
            .client
            .get(s.url(path))
            .bearer_auth("s3cret-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    // EventSource cannot send headers: ?access_token= works for reads.
    let sep = |p: &str| if p.contains('?') { '&' } else { '?' };
    for path in ["/events", "/list/job", blob.as_str()] {
        let r = s
            .get(&format!("{path}{}access_token=s3cret-token", sep(path)))
            .await;
        assert_eq!(r.status(), 200, "{path}");
    }
    // the page and its files hold no data; health checks need no token
    for path in [
        "/",
        "/assets/app.js",
        "/assets/app.css",
        "/assets/charts.js",
        "/assets/uPlot.iife.min.js",
        "/healthz",
    ] {
        assert_eq!(s.get(path).await.status(), 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_origins_cannot_mutate() {
    let s = Server::start().await;
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = s
            .client
            .post(s.url("/create"))
            .header(name, value)
            .body("echo pwned")
            .send()
            .await
            .unwrap();
        assert_error(r, 403, "cross-origin").await;
    }
    assert_eq!(s.db.counts().await.unwrap().pending, 0);
    // the page's own origin is fine
    let r = s
        .client
        .post(s.url("/create"))
        .header("origin", format!("http://{}", s.addr))
        .header("sec-fetch-site", "same-origin")
        .body("echo mine")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_only_refuses_other_hosts() {
    let s = Server::with(ServeOptions {
        local_hosts_only: true,
        ..Default::default()
    })
    .await;
    for host in ["evil.example", "evil.example:5000", "10.0.0.1"] {
        let req = format!("GET /api/counts HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (status, _, body) = raw(s.addr, req.as_bytes()).await;
        assert_eq!(status, 403, "{host}");
        assert!(String::from_utf8_lossy(&body).contains("loopback"));
    }
    for host in ["localhost:5000", "127.0.0.1", "[::1]:80", "LOCALHOST"] {
        let req = format!("GET /api/counts HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        assert_eq!(raw(s.addr, req.as_bytes()).await.0, 200, "{host}");
    }
}
