//! Blobs: Content-Length, Range (206, 416), ETag, If-None-Match (304), HEAD.

use crate::util::*;

async fn blob_server() -> (Server, String, Vec<u8>) {
    let s = Server::start().await;
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let r = s.post("/create", payload.clone()).await;
    assert_eq!(r.status(), 200);
    let key = r.text().await.unwrap().trim().to_string();
    (s, key, payload)
}

/// Where the server's directory store keeps blob `key`.
fn blob_path(s: &Server, key: &str) -> std::path::PathBuf {
    s.dir
        .path()
        .join("blobs")
        .join(&key[0..2])
        .join(&key[2..4])
        .join(key)
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_blob_headers() {
    let (s, key, payload) = blob_server().await;
    let r = s.get(&format!("/blob/{key}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), "100000");
    assert_eq!(header(&r, "etag"), format!("\"{key}\""));
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(header(&r, "content-type"), "application/octet-stream");
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    assert_eq!(header(&r, "content-security-policy"), "sandbox");
    let cc = header(&r, "cache-control");
    assert!(
        cc.contains("immutable") && cc.contains("max-age=31536000"),
        "{cc}"
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), payload);

    let head = s
        .client
        .head(s.url(&format!("/blob/{key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), "100000");
    assert!(head.bytes().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges() {
    let (s, key, payload) = blob_server().await;
    let url = s.url(&format!("/blob/{key}"));
    let range = |r: &str| s.client.get(&url).header("range", r.to_string()).send();
    for (spec, start, end) in [
        ("bytes=0-99", 0usize, 100usize),
        ("bytes=99990-", 99_990, 100_000),
        ("bytes=-10", 99_990, 100_000),
        ("bytes=50000-200000", 50_000, 100_000),
        ("bytes=7-7", 7, 8),
    ] {
        let r = range(spec).await.unwrap();
        assert_eq!(r.status(), 206, "{spec}");
        assert_eq!(
            header(&r, "content-range"),
            format!("bytes {start}-{}/100000", end - 1),
            "{spec}"
        );
        assert_eq!(header(&r, "content-length"), (end - start).to_string());
        assert_eq!(header(&r, "etag"), format!("\"{key}\""));
        assert_eq!(
            r.bytes().await.unwrap().to_vec(),
            payload[start..end].to_vec()
        );
    }
    for spec in ["bytes=100000-", "bytes=200000-300000", "bytes=-0"] {
        let r = range(spec).await.unwrap();
        assert_eq!(header(&r, "content-range"), "bytes */100000", "{spec}");
        assert_error(r, 416, "not satisfiable").await;
    }
    // Several ranges, a malformed one, or an If-Range that does not match: the whole blob.
    for spec in ["bytes=0-1,5-6", "bytes=5-2", "lines=1-2"] {
        let r = range(spec).await.unwrap();
        assert_eq!(r.status(), 200, "{spec}");
        assert_eq!(r.bytes().await.unwrap().len(), 100_000);
    }
    let r = s
        .client
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(&url)
        .header("range", "bytes=0-9")
        .header("if-range", format!("\"{key}\""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_is_304() {
    let (s, key, _) = blob_server().await;
    let url = s.url(&format!("/blob/{key}"));
    for inm in [
        format!("\"{key}\""),
        format!("W/\"{key}\""),
        format!("\"other\", \"{key}\""),
        "*".to_string(),
    ] {
        let r = s
            .client
            .get(&url)
            .header("if-none-match", &inm)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{inm}");
        assert_eq!(header(&r, "etag"), format!("\"{key}\""));
        assert!(header(&r, "cache-control").contains("immutable"));
        assert!(r.bytes().await.unwrap().is_empty());
    }
    let r = s
        .client
        .get(&url)
        .header("if-none-match", "\"other\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A blob that does not exist is a 404 whatever the client has cached.
    let missing = batchdb::Hash::of(b"missing").to_hex();
    let r = s
        .client
        .get(s.url(&format!("/blob/{missing}")))
        .header("if-none-match", "*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_blob_never_ends_cleanly() {
    let (s, key, _) = blob_server().await;
    let path = blob_path(&s, &key);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[50_000] ^= 0xff;
    // the store's files are read-only; replace it
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    // The error is found while streaming, after the headers were written; whether the
    // client sees the 200 before the connection breaks depends on how much hyper had
    // flushed. Either way the response must never end cleanly.
    match s.client.get(s.url(&format!("/blob/{key}"))).send().await {
        Ok(r) => {
            assert_eq!(r.status(), 200, "the error is found while streaming");
            assert!(r.bytes().await.is_err(), "the body must break off");
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_at_a_blob_path_serves_nothing() {
    let (s, key, _) = blob_server().await;
    let path = blob_path(&s, &key);
    let secret = s.dir.path().join("secret");
    std::fs::write(&secret, b"the target's bytes, never to be served").unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    let r = s
        .client
        .get(s.url(&format!("/blob/{key}")))
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_ne!(r.status(), 206);
    let body = r.text().await.unwrap_or_default();
    assert!(!body.contains("target"), "{body}");
    assert!(body.contains("refused"), "{body}");
    let whole = s.get(&format!("/blob/{key}")).await;
    assert_ne!(whole.status(), 200);
}
