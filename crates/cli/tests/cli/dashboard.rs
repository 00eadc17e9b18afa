//! The dashboard driven in headless Chromium through chromedriver's WebDriver API,
//! against a real `batchdb serve` process.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::serve::{http, serve};
use crate::util::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver session in headless Chromium, through chromedriver.
struct Browser {
    driver: SocketAddr,
    session: String,
    _chromedriver: Proc,
}

impl Browser {
    fn start(env: &Env) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: the dashboard test needs Debian's chromium and \
                 chromium-driver (apt-get install -y chromium chromium-driver)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cmd = std::process::Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .current_dir(env.root())
            .stdin(std::process::Stdio::null());
        let proc = env.start(cmd, None);
        let driver: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        wait_until("chromedriver to be ready", || {
            TcpStream::connect(driver).ok()?;
            let (status, _, body) = http(driver, "GET", "/status", &[], b"");
            let v: Value = serde_json::from_slice(&body).ok()?;
            (status == 200 && v["value"]["ready"] == true).then_some(())
        });
        let profile = env.file("chrome-profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-quic", "--window-size=1400,1200",
                    format!("--user-data-dir={}", profile.display()),
                ],
            },
        }}});
        let mut b = Browser {
            driver,
            session: String::new(),
            _chromedriver: proc,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session in {v}"))
            .to_string();
        b
    }

    /// A WebDriver command; returns its `value`, failing the test on an error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, _, out) = http(
            self.driver,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        let v: Value = serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}: {}", text(&out)));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Waits until `script` returns something other than null or false.
    fn wait_js(&self, what: &str, script: &str) -> Value {
        wait_until(what, || {
            let v = self.js(script);
            (!v.is_null() && v != false).then_some(v)
        })
    }

    fn find(&self, css: &str) -> String {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(|id| id.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn click(&self, css: &str) {
        let el = self.find(css);
        self.cmd("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn screenshot(&self, path: &std::path::Path) {
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("artifact dir");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http(
                self.driver,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                b"",
            );
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Where test artifacts go: `target/test-artifacts/` of the workspace.
fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("test-artifacts").join(name)
}

/// The instance id of the one row of `table` (pending, running, results, failures)
/// for `job`, once the page shows it.
fn row_id(b: &Browser, table: &str, job: &str) -> i64 {
    let script = format!(
        "for (const tr of document.querySelectorAll('#{table} tbody tr')) {{
           if (tr.children[1].title === '{job}') return Number(tr.dataset.id); }}
         return null;"
    );
    b.wait_js(&format!("a {table} row of {job}"), &script)
        .as_i64()
        .expect("id")
}

fn text_of(b: &Browser, css: &str) -> String {
    b.js(&format!(
        "return document.querySelector('{css}').textContent;"
    ))
    .as_str()
    .unwrap_or("")
    .to_string()
}

#[test]
fn dashboard_in_headless_chromium() {
    let env = Env::new();
    let s = serve(&env, &[], &[]);
    let b = Browser::start(&env);
    b.cmd(
        "POST",
        "/url",
        Some(json!({ "url": format!("http://{}/", s.addr) })),
    );
    b.wait_js(
        "the page to follow the event stream",
        "return document.getElementById('live').textContent === 'live';",
    );

    // Add a job from the page's text box. It prints a line, waits for `go`, then
    // prints another.
    let payload =
        "echo first part; while [ ! -e go ]; do sleep 0.05; done; echo hello from the browser";
    let key = sha256(payload.as_bytes());
    b.type_into("#payload", payload);
    b.click("#add");
    let id = row_id(&b, "pending", &key);
    assert_eq!(env.list("pending")[0]["job"], key.as_str());
    b.wait_js(
        "the pending count",
        "return document.getElementById('count-pending').textContent === '1';",
    );

    // A worker in another process takes it: the row moves to running, live.
    let _worker = env.spawn(&["run"]);
    assert_eq!(row_id(&b, "running", &key), id);
    // Its output follows live while it runs.
    b.click(&format!("#running tr[data-id=\"{id}\"] button.output"));
    b.wait_js(
        "live output of the running job",
        "return document.getElementById('stdout').textContent.includes('first part');",
    );
    assert!(!text_of(&b, "#stdout").contains("hello from the browser"));
    env.touch("go");
    assert_eq!(row_id(&b, "results", &key), id);
    b.wait_js(
        "the rest of the output",
        "return document.getElementById('stdout').textContent === 'first part\\nhello from the browser\\n';",
    );

    // A job added by the CLI shows up live; cancel it from the page.
    let (later, _) = env.add_with(&["--delay", "3600"], "echo never runs");
    let later_id = row_id(&b, "pending", &later);
    b.click(&format!(
        "#pending tr[data-id=\"{later_id}\"] button.cancel"
    ));
    assert_eq!(row_id(&b, "failures", &later), later_id);
    b.wait_js(
        "the cancelled row",
        &format!(
            "const tr = document.querySelector('#failures tr[data-id=\"{later_id}\"]');
             return tr && tr.dataset.state === 'cancelled';"
        ),
    );
    assert_eq!(env.list("cancelled").len(), 1);

    // A failing job lands in failures; retry it from the page.
    let (bad, _) = env.add("echo something broke >&2; exit 3");
    let bad_id = row_id(&b, "failures", &bad);
    b.click(&format!("#failures tr[data-id=\"{bad_id}\"] button.retry"));
    b.wait_js(
        "the retried instance",
        &format!(
            "return document.querySelector('tr[data-id=\"{}\"]') !== null;",
            bad_id + 1
        ),
    );
    let retried = env.show_json(&format!("id:{}", bad_id + 1));
    assert_eq!(retried["job"], bad.as_str());
    b.wait_js(
        "the retry to fail again",
        &format!(
            "const tr = document.querySelector('#failures tr[data-id=\"{}\"]');
             return tr && tr.dataset.state === 'fail';",
            bad_id + 1
        ),
    );

    // Open the result's output for the picture.
    b.click(&format!("#results tr[data-id=\"{id}\"] button.output"));
    b.wait_js(
        "the result's output",
        "return document.getElementById('stdout').textContent.includes('hello from the browser')
           && document.getElementById('output-meta').textContent.includes('state result');",
    );
    b.wait_js(
        "the counts",
        "return document.getElementById('count-result').textContent === '1'
           && document.getElementById('count-fail').textContent === '2'
           && document.getElementById('count-cancelled').textContent === '1';",
    );
    let errors = text_of(&b, "#message");
    assert!(
        b.js("return document.getElementById('message').hidden;") == true
            || errors.contains("pushed")
            || errors.contains("cancel requested"),
        "the page reported an error: {errors}"
    );
    let png = artifact("dashboard.png");
    b.screenshot(&png);
    println!("dashboard screenshot: {}", png.display());
}

#[test]
fn dashboard_batch_view_in_headless_chromium() {
    let env = Env::new();
    env.ok(&[
        "map", "-q", "--batch", "maps", "echo {}", ":::", "a", "b", "c",
    ]);
    let (reduce, _) = env.add_with(&["--batch", "red", "--after", "batch:maps"], "echo reduced");
    env.add("echo in no batch");
    let s = serve(&env, &[], &[]);
    let b = Browser::start(&env);
    b.cmd(
        "POST",
        "/url",
        Some(json!({ "url": format!("http://{}/", s.addr) })),
    );
    let row = |name: &str, col: usize| {
        format!(
            "const tr = document.querySelector('#batches tr[data-batch=\"{name}\"]');
             return tr && tr.children[{col}].textContent;"
        )
    };
    b.wait_js(
        "the maps batch",
        &format!("{} === '0/3';", row("maps", 2).trim_end_matches(';')),
    );
    b.wait_js(
        "red waits",
        &format!("{} === '1';", row("red", 4).trim_end_matches(';')),
    );
    b.wait_js(
        "the waiting count",
        "return document.getElementById('count-waiting').textContent === '1';",
    );
    // A click on a batch shows only its instances: the waiting reduce.
    b.click("#batches tr[data-batch=\"red\"] a.batch");
    b.wait_js(
        "the filter",
        "return !document.getElementById('filter').hidden
           && document.querySelectorAll('#pending tbody tr').length === 1
           && document.querySelector('#pending tbody tr').dataset.state === 'waiting';",
    );
    assert_eq!(row_id(&b, "pending", &reduce), 4);
    // A worker in another process runs everything; the bars fill live, and the
    // filtered tables follow only the batch.
    env.run_until_empty(&[]);
    b.wait_js(
        "red done",
        &format!("{} === '1/1';", row("red", 2).trim_end_matches(';')),
    );
    b.wait_js(
        "maps done, bar full",
        "const tr = document.querySelector('#batches tr[data-batch=\"maps\"]');
         return tr && tr.children[2].textContent === '3/3'
           && tr.querySelector('.bar .result').style.width === '100%';",
    );
    assert_eq!(row_id(&b, "results", &reduce), 4);
    b.wait_js(
        "only the batch's result",
        "return document.querySelectorAll('#results tbody tr').length === 1;",
    );
    b.click("#filter-clear");
    b.wait_js(
        "every result again",
        "return document.getElementById('filter').hidden
           && document.querySelectorAll('#results tbody tr').length === 5;",
    );
    // Cancel and retry a whole batch from its row.
    env.ok(&[
        "map", "-q", "--batch", "later", "--delay", "3600", "echo {}", ":::", "x", "y",
    ]);
    b.wait_js(
        "the later batch",
        &format!("{} === '0/2';", row("later", 2).trim_end_matches(';')),
    );
    b.click("#batches tr[data-batch=\"later\"] button.cancel");
    b.wait_js(
        "cancelled",
        &format!("{} === '2';", row("later", 5).trim_end_matches(';')),
    );
    assert_eq!(env.list("cancelled").len(), 2);
    b.click("#batches tr[data-batch=\"later\"] button.retry");
    b.wait_js(
        "retried",
        &format!("{} === '2/4';", row("later", 2).trim_end_matches(';')),
    );
    assert_eq!(env.list("pending").len(), 2);
    let png = artifact("dashboard-batches.png");
    b.screenshot(&png);
    println!("dashboard screenshot: {}", png.display());
}
