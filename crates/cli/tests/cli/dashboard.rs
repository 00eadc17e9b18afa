//! The dashboard driven in headless Chromium through chromedriver's WebDriver API,
//! against a real `batchdb serve` process.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::serve::{Served, http, serve};
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

/// Opens the dashboard of `s` and waits until its tables, counts and charts are
/// filled; returns the milliseconds from navigation start to then, as the page
/// measured it (`performance.now()`).
fn open_dashboard(b: &Browser, s: &Served) -> f64 {
    b.cmd(
        "POST",
        "/url",
        Some(json!({ "url": format!("http://{}{}/", s.addr, s.prefix) })),
    );
    let filled = b.wait_js(
        "the tables, counts and charts to be filled",
        "return document.body.dataset.loaded || null;",
    );
    filled
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a time")
}

/// Clicks the element `css` finds at this moment (rows are redrawn when events
/// arrive, so an element found earlier may be gone).
fn click_now(b: &Browser, css: &str) {
    let found = b.js(&format!(
        "const e = document.querySelector({}); if (e) e.click(); return !!e;",
        serde_json::to_string(css).expect("json")
    ));
    assert_eq!(found, true, "no element {css}");
}

/// The texts of the preview cells of `table`'s rows.
fn previews(b: &Browser, table: &str) -> Vec<String> {
    let v = b.js(&format!(
        "return [...document.querySelectorAll('#{table} tbody tr td.job')].map((td) => {{
           if (!/^[0-9a-f]{{64}}$/.test(td.title)) return 'no hash in the tooltip';
           return td.querySelector('.preview').textContent; }});"
    ));
    serde_json::from_value(v).expect("strings")
}

/// A script payload and an attribute-breaking one: shown as text, never run.
const SCRIPT_PAYLOAD: &str = "echo '<script>window.__xss = 1</script>'";
const IMG_PAYLOAD: &str = "echo '\"><img src=x onerror=\"window.__xss = 2\">' >&2; exit 9";

/// 50 jobs of every kind: 31 results with run times from 0 to 0.4 s (one with a
/// `<script>` payload), 9 failures (one breaking out of an attribute), 4 cancelled,
/// 3 pending (delayed) and 2 running until the file `go` exists.
fn fifty_mixed_jobs(env: &Env) -> Proc {
    let items: Vec<String> = (1..=30).map(|i| i.to_string()).collect();
    let mut args = vec![
        "map",
        "-q",
        "echo result item-{}; sleep 0.$(( {} % 5 ))",
        ":::",
    ];
    args.extend(items.iter().map(String::as_str));
    env.ok(&args);
    env.add(SCRIPT_PAYLOAD);
    let mut args = vec!["map", "-q", "echo broken item-{} >&2; exit {}", ":::"];
    args.extend(items[..8].iter().map(String::as_str));
    env.ok(&args);
    env.add(IMG_PAYLOAD);
    env.run_until_empty(&["-j", "2"]);
    env.ok(&[
        "map",
        "-q",
        "--batch",
        "later",
        "--delay",
        "3600",
        "echo cancelled item-{}",
        ":::",
        "1",
        "2",
        "3",
        "4",
    ]);
    env.ok(&["cancel", "batch:later"]);
    env.ok(&[
        "map",
        "-q",
        "--delay",
        "3600",
        "echo pending item-{}",
        ":::",
        "1",
        "2",
        "3",
    ]);
    env.ok(&[
        "map",
        "-q",
        "echo running item-{}; while [ ! -e go ]; do sleep 0.1; done",
        ":::",
        "1",
        "2",
    ]);
    let worker = env.spawn(&["run", "-j", "2"]);
    wait_until("two running jobs", || {
        let running = env.list("pending");
        (running.iter().filter(|r| r["running"] == true).count() == 2).then_some(())
    });
    worker
}

/// The sum of series `i` of chart `name`, from the uPlot instance's own data.
fn chart_sum(b: &Browser, name: &str, i: usize) -> i64 {
    b.js(&format!(
        "const c = window.__batchdbCharts['{name}'];
         return c ? c.data[{i}].reduce((a, v) => a + (v || 0), 0) : -1;"
    ))
    .as_i64()
    .expect("a number")
}

#[test]
fn dashboard_with_50_mixed_jobs_shows_previews_filters_charts_and_payload_text_safely() {
    let env = Env::new();
    let _worker = fifty_mixed_jobs(&env);
    let s = serve(&env, &[], &[]);
    let b = Browser::start(&env);
    let ms = open_dashboard(&b, &s);
    println!("dashboard with 50 jobs filled in {ms:.0} ms");

    // Every table shows each row's payload's first line, its job key in the tooltip.
    b.wait_js(
        "both running rows",
        "return document.querySelectorAll('#running tbody tr').length === 2;",
    );
    let running = previews(&b, "running");
    assert!(
        running.iter().all(|p| p.starts_with("echo running item-")),
        "{running:?}"
    );
    let mut pending = previews(&b, "pending");
    pending.sort();
    assert_eq!(
        pending,
        [
            "echo pending item-1",
            "echo pending item-2",
            "echo pending item-3"
        ]
    );
    let results = previews(&b, "results");
    assert_eq!(results.len(), 31);
    assert!(results.contains(&"echo result item-7; sleep 0.$(( 7 % 5 ))".to_string()));
    assert!(results.contains(&SCRIPT_PAYLOAD.to_string()), "{results:?}");
    let failures = previews(&b, "failures");
    assert_eq!(failures.len(), 13);
    assert!(failures.contains(&IMG_PAYLOAD.to_string()), "{failures:?}");
    assert!(failures.contains(&"echo cancelled item-4".to_string()));
    let batches = previews(&b, "batches");
    assert!(
        batches.is_empty(),
        "the batch table lists batches, not instances"
    );

    // Payload text is only text: nothing ran, no element was made from it.
    let safe = "return window.__xss === undefined
        && document.querySelectorAll('main img, main script').length === 0;";
    assert_eq!(b.js(safe), true);

    // Charts: drawn from the series the server counted from the event log.
    b.wait_js(
        "the charts' data",
        "const c = window.__batchdbCharts;
         return c.throughput && c.depth && c.runtime
           && document.getElementById('chart-throughput').dataset.points > 0;",
    );
    assert_eq!(chart_sum(&b, "throughput", 1), 31, "results per minute");
    assert_eq!(chart_sum(&b, "throughput", 2), 9, "failures per minute");
    assert_eq!(chart_sum(&b, "throughput", 3), 4, "cancelled per minute");
    assert_eq!(
        chart_sum(&b, "runtime", 1),
        40,
        "run times of results and failures"
    );
    let depth_now = b.js("const d = window.__batchdbCharts.depth.data[1]; return d[d.length - 1];");
    assert_eq!(depth_now, 5, "3 pending and 2 running are not ended");
    let canvases = b.js("return document.querySelectorAll('#charts-section canvas').length;");
    assert_eq!(canvases, 3);

    // The instance panel of the script payload: payload, attempts, output, command.
    let xss_id = b
        .js(&format!(
            "for (const tr of document.querySelectorAll('#results tbody tr'))
               if (tr.querySelector('.preview').textContent === {}) return Number(tr.dataset.id);
             return null;",
            serde_json::to_string(SCRIPT_PAYLOAD).expect("json")
        ))
        .as_i64()
        .expect("the script row");
    click_now(
        &b,
        &format!("#results tr[data-id=\"{xss_id}\"] button.output"),
    );
    b.wait_js(
        "the panel's payload, attempts and output",
        "return document.getElementById('payload-text').textContent.length > 0
           && document.querySelectorAll('#attempts tbody tr').length === 1
           && document.getElementById('stdout').textContent.length > 0;",
    );
    assert_eq!(text_of(&b, "#payload-text"), SCRIPT_PAYLOAD);
    assert_eq!(
        text_of(&b, "#stdout"),
        "<script>window.__xss = 1</script>\n"
    );
    assert_eq!(
        text_of(&b, "#show-cmd"),
        format!("batchdb show id:{xss_id}")
    );
    let attempt = b.js(
        "return [...document.querySelectorAll('#attempts tbody tr td')].map((td) => td.textContent);",
    );
    assert_eq!(attempt[0], "1");
    assert_eq!(attempt[1], "result");
    assert_eq!(attempt[2], "0", "exit code");
    // The failure with an attribute-breaking payload, in the panel: its exit code.
    click_now(&b, "#failures tbody tr td.job");
    assert_eq!(b.js(safe), true);

    // The filter: text in the preview (on the server), then a state.
    b.type_into("#q", "item-1");
    b.wait_js(
        "only rows whose preview has item-1",
        "const p = [...document.querySelectorAll('#results tbody tr .preview')];
         return p.length === 11 && p.every((e) => e.textContent.includes('item-1'));",
    );
    let mut failed = previews(&b, "failures");
    failed.sort();
    assert_eq!(
        failed,
        ["echo broken item-1 >&2; exit 1", "echo cancelled item-1"]
    );
    assert_eq!(previews(&b, "pending"), ["echo pending item-1"]);
    assert_eq!(
        previews(&b, "running"),
        ["echo running item-1; while [ ! -e go ]; do sleep 0.1; done"]
    );
    let el = b.find("#q");
    b.cmd("POST", &format!("/element/{el}/clear"), Some(json!({})));
    b.type_into("#q", "<script>");
    b.wait_js(
        "the script payload found as text",
        "const p = [...document.querySelectorAll('#results tbody tr .preview')];
         return p.length === 1 && p[0].textContent.includes('<script>');",
    );
    assert_eq!(b.js(safe), true);
    b.cmd("POST", &format!("/element/{el}/clear"), Some(json!({})));
    b.js("const s = document.getElementById('state'); s.value = 'fail'; s.dispatchEvent(new Event('change'));");
    b.wait_js(
        "only failures",
        "return document.getElementById('results').closest('section').hidden
           && !document.getElementById('failures').closest('section').hidden
           && document.querySelectorAll('#failures tbody tr').length === 9;",
    );
    b.js("const s = document.getElementById('state'); s.value = ''; s.dispatchEvent(new Event('change'));");
    b.wait_js(
        "everything again",
        "return document.querySelectorAll('#results tbody tr').length === 31;",
    );
    b.click("#output-close");
    b.js("window.scrollTo(0, 0);");
    // Tall enough for every table, for a person to look at.
    b.cmd(
        "POST",
        "/window/rect",
        Some(json!({"width": 1400, "height": 3000})),
    );
    click_now(&b, "#running tbody tr td.job");
    b.wait_js(
        "the running instance's panel",
        "return document.querySelectorAll('#attempts tbody tr').length === 1
           && document.getElementById('stdout').textContent.includes('running item');",
    );
    let png = artifact("dashboard-50.png");
    b.screenshot(&png);
    println!("dashboard screenshot: {}", png.display());
    env.touch("go");
}

/// Distinct jobs the bulk results are instances of.
const BULK_JOBS: i64 = 100;

/// Fills the fresh SQLite queue of `env` with `n` results straight through SQL (the
/// `sqlite3` shell): instances of [`BULK_JOBS`] jobs with inline payloads
/// `echo bulk job J` (instance I of job I % 100), one attempt each (run times 5 ms to
/// 0.6 s), four events each, spread over the last 50 minutes.
fn fill_results(env: &Env, n: i64) {
    env.ok(&["status"]); // creates and migrates the database
    let t0 = now_ms() - 3_000_000;
    let step = 3_000_000 / n;
    let jobs: Vec<String> = (0..BULK_JOBS)
        .map(|j| {
            let payload = format!("echo bulk job {j}");
            format!("({j}, '{}', '{payload}')", sha256(payload.as_bytes()))
        })
        .collect();
    let key = format!("(SELECT key FROM b WHERE j = i % {BULK_JOBS})");
    let sql = format!(
        "BEGIN;
         CREATE TEMP TABLE b(j INTEGER PRIMARY KEY, key TEXT, payload TEXT);
         INSERT INTO b VALUES {jobs};
         CREATE TEMP TABLE s(i INTEGER PRIMARY KEY);
         WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < {n})
           INSERT INTO s SELECT i FROM r;
         INSERT INTO jobs(key, size, created, payload)
           SELECT key, length(payload), {t0} - 1000 + j, CAST(payload AS BLOB) FROM b;
         INSERT INTO instances(job, created, state, priority, run_at, cached, attempts, ended)
           SELECT {key}, {t0} + i * {step}, 'result', 0, 0, 0, 1,
                  {t0} + i * {step} + 5 + (i % 7) * 100 FROM s;
         INSERT INTO attempts(instance, attempt, worker, start, \"end\", outcome, exit_code, stdout, stdout_size)
           SELECT i, 1, 'bulk', {t0} + i * {step}, {t0} + i * {step} + 5 + (i % 7) * 100,
                  'result', 0, printf('%064x', i + 100000000), 8 FROM s;
         INSERT INTO events(id, time, kind, job, created, instance)
           SELECT {BULK_JOBS} + (i - 1) * 3 + k.n,
                  {t0} + i * {step} + CASE WHEN k.n = 3 THEN 5 + (i % 7) * 100 ELSE 0 END,
                  k.kind, {key}, {t0} + i * {step}, i
           FROM s, (SELECT 1 AS n, 'push' AS kind UNION ALL SELECT 2, 'start'
                    UNION ALL SELECT 3, 'result') AS k;
         INSERT INTO events(id, time, kind, job) SELECT j + 1, {t0} - 1000 + j, 'create', key FROM b;
         COMMIT;",
        jobs = jobs.join(",")
    );
    let out = std::process::Command::new("sqlite3")
        .arg(env.db_dir().join("batchdb.sqlite"))
        .arg(sql)
        .output()
        .expect("sqlite3 (apt-get install -y sqlite3)");
    assert!(out.status.success(), "sqlite3: {}", text(&out.stderr));
}

/// The API requests the page made, slowest first, as `path ms` lines.
fn slowest_requests(b: &Browser) -> String {
    let v = b.js("return performance.getEntriesByType('resource')
           .filter((e) => e.name.includes('/api/'))
           .sort((a, b) => b.duration - a.duration).slice(0, 6)
           .map((e) => new URL(e.name).pathname + new URL(e.name).search + ' '
             + Math.round(e.duration) + ' ms').join(', ');");
    v.as_str().unwrap_or("").to_string()
}

#[test]
fn dashboard_with_100000_results_loads_in_under_a_second() {
    let env = Env::new();
    let n = 100_000;
    let t = std::time::Instant::now();
    fill_results(&env, n);
    println!("filled {n} results in {:?}", t.elapsed());
    let s = serve(&env, &[], &[]);
    // The server's event-log follower counts the log once when it starts (the charts
    // and /metrics read it); that is start-up work, measured on its own.
    let t = std::time::Instant::now();
    let (status, _, _) = http(s.addr, "GET", "/api/series", &[], b"");
    assert_eq!(status, 200);
    println!(
        "series after start (the follower read {} events) in {:?}",
        n * 3 + BULK_JOBS,
        t.elapsed()
    );
    let b = Browser::start(&env);
    let mut figures = Vec::new();
    for _ in 0..3 {
        let filled = open_dashboard(&b, &s);
        let nav = b.js("const n = performance.getEntriesByType('navigation')[0];
             return [n.responseEnd, n.domContentLoadedEventEnd, n.loadEventEnd];");
        println!(
            "page with {n} results: navigation response {:.0} ms, DOMContentLoaded {:.0} ms, \
             load {:.0} ms, tables + counts + charts filled {filled:.0} ms",
            nav[0].as_f64().unwrap_or(-1.0),
            nav[1].as_f64().unwrap_or(-1.0),
            nav[2].as_f64().unwrap_or(-1.0),
        );
        println!("  slowest requests: {}", slowest_requests(&b));
        figures.push(filled);
    }
    assert_eq!(
        b.js("return document.getElementById('count-result').textContent;"),
        n.to_string()
    );
    let shown = previews(&b, "results");
    assert_eq!(shown.len(), 100);
    assert_eq!(shown[0], format!("echo bulk job {}", n % BULK_JOBS));
    assert_eq!(chart_sum(&b, "throughput", 1), n);
    assert_eq!(chart_sum(&b, "runtime", 1), n);
    // Paging beyond the newest rows: the next 100, older.
    b.click("#results-more");
    b.wait_js(
        "the second page",
        "return document.querySelectorAll('#results tbody tr').length === 200;",
    );
    let ids = b.js("return [...document.querySelectorAll('#results tbody tr')].map((tr) => Number(tr.dataset.id));");
    let mut ids: Vec<i64> = serde_json::from_value(ids).expect("ids");
    ids.sort_unstable();
    assert_eq!(
        ids,
        ((n - 199)..=n).collect::<Vec<_>>(),
        "the newest 200, each once"
    );
    // The filter: one job's rows among the newest 1,000 (the server examines that
    // many per request for a text), found by the text of its payload; "older" goes on.
    b.type_into("#q", "bulk job 42");
    b.wait_js(
        "the filtered rows",
        "const p = [...document.querySelectorAll('#results tbody tr .preview')];
         return p.length === 10 && p.every((e) => e.textContent === 'echo bulk job 42');",
    );
    b.click("#results-more");
    b.wait_js(
        "more filtered rows, older",
        "const p = [...document.querySelectorAll('#results tbody tr .preview')];
         return p.length === 20 && p.every((e) => e.textContent === 'echo bulk job 42');",
    );
    let best = figures.iter().copied().fold(f64::INFINITY, f64::min);
    println!("page load with {n} results: best {best:.0} ms of {figures:?}");
    assert!(
        best < 3000.0,
        "the page took {best:.0} ms to fill with {n} results"
    );
    let png = artifact("dashboard-100k.png");
    b.screenshot(&png);
}
