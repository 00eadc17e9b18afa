//! The WebDriver harness the dashboard tests drive headless Chromium with (through
//! chromedriver), and helpers that read the dashboard's page.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::serve::{Served, http};
use crate::util::*;

pub(crate) const CHROMIUM: &str = "/usr/bin/chromium";
pub(crate) const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver session in headless Chromium, through chromedriver.
pub(crate) struct Browser {
    driver: SocketAddr,
    session: String,
    _chromedriver: Proc,
}

impl Browser {
    pub(crate) fn start(env: &Env) -> Browser {
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
            "goog:loggingPrefs": {"browser": "ALL"},
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
    pub(crate) fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.try_call(method, path, body);
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    /// A WebDriver command's status and whole answer.
    fn try_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
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
        (status, v)
    }

    pub(crate) fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub(crate) fn js(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Waits until `script` returns something other than null or false.
    pub(crate) fn wait_js(&self, what: &str, script: &str) -> Value {
        wait_until(what, || {
            let v = self.js(script);
            (!v.is_null() && v != false).then_some(v)
        })
    }

    pub(crate) fn find(&self, css: &str) -> String {
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

    /// Clicks `css` as a mouse would; when the page redrew the element between
    /// finding and clicking it (rows are redrawn as events arrive), finds it again.
    pub(crate) fn click(&self, css: &str) {
        for _ in 0..5 {
            let el = self.find(css);
            let path = format!("/session/{}/element/{el}/click", self.session);
            let (status, v) = self.try_call("POST", &path, Some(json!({})));
            if status == 200 {
                return;
            }
            assert_eq!(
                v["value"]["error"], "stale element reference",
                "click {css}: {v}"
            );
        }
        panic!("{css} was redrawn under every click");
    }

    pub(crate) fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.cmd(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// The browser console's messages since the last call (errors, CSP reports).
    pub(crate) fn console(&self) -> Vec<String> {
        let v = self.cmd("POST", "/se/log", Some(json!({"type": "browser"})));
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|e| format!("{} {}", e["level"], e["message"]))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn screenshot(&self, name: &str) {
        let path = artifact(name);
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("artifact dir");
        std::fs::write(&path, png).expect("write screenshot");
        println!("dashboard screenshot: {}", path.display());
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

pub(crate) fn base64_decode(s: &str) -> Vec<u8> {
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
pub(crate) fn artifact(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("test-artifacts").join(name)
}

pub(crate) fn text_of(b: &Browser, css: &str) -> String {
    b.js(&format!(
        "return document.querySelector('{css}').textContent;"
    ))
    .as_str()
    .unwrap_or("")
    .to_string()
}

/// Opens the dashboard of `s` and waits until its tables, counts and charts are
/// filled; returns the milliseconds from navigation start to then, as the page
/// measured it (`performance.now()`).
pub(crate) fn open_dashboard(b: &Browser, s: &Served) -> f64 {
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
pub(crate) fn click_now(b: &Browser, css: &str) {
    let found = b.js(&format!(
        "const e = document.querySelector({}); if (e) e.click(); return !!e;",
        serde_json::to_string(css).expect("json")
    ));
    assert_eq!(found, true, "no element {css}");
}

/// The texts of the preview cells of `table`'s rows.
pub(crate) fn previews(b: &Browser, table: &str) -> Vec<String> {
    let v = b.js(&format!(
        "return [...document.querySelectorAll('#{table} tbody tr td.job')].map((td) => {{
           if (!/^[0-9a-f]{{64}}$/.test(td.title)) return 'no hash in the tooltip';
           return td.querySelector('.preview').textContent; }});"
    ));
    serde_json::from_value(v).expect("strings")
}

/// The sum of series `i` of chart `name`, from the uPlot instance's own data.
pub(crate) fn chart_sum(b: &Browser, name: &str, i: usize) -> i64 {
    b.js(&format!(
        "const c = window.__batchdbCharts['{name}'];
         return c ? c.data[{i}].reduce((a, v) => a + (v || 0), 0) : -1;"
    ))
    .as_i64()
    .expect("a number")
}
