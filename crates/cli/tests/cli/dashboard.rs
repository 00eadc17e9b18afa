//! The dashboard driven in headless Chromium through chromedriver's WebDriver API,
//! against a real `batchdb serve` process.

use serde_json::json;

use crate::browser::*;
use crate::serve::serve;
use crate::util::*;

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
    b.screenshot("dashboard.png");
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
    b.screenshot("dashboard-batches.png");
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
    let context = [
        "--cwd",
        ".",
        "--env",
        "GREETING=hi",
        "--memory",
        "512M",
        "--needs",
        "gpu=1",
        "--concurrency",
        "api=2",
    ];
    env.add_with(&context, SCRIPT_PAYLOAD);
    let mut args = vec!["map", "-q", "echo broken item-{} >&2; exit {}", ":::"];
    args.extend(items[..8].iter().map(String::as_str));
    env.ok(&args);
    env.add(IMG_PAYLOAD);
    env.run_until_empty(&["-j", "2", "--resource", "gpu=0"]);
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

/// True when no payload text ran or became an element.
const SAFE: &str = "return window.__xss === undefined
    && document.querySelectorAll('main img, main script').length === 0;";

/// No console error and no report of the page's policy refusing something.
fn assert_clean_console(b: &Browser) {
    let console = b.console();
    assert!(
        !console
            .iter()
            .any(|m| m.contains("SEVERE") || m.contains("Content Security Policy")),
        "{console:?}"
    );
}

/// The id of the row of `table` whose preview is `text`.
fn row_of(b: &Browser, table: &str, text: &str) -> i64 {
    b.js(&format!(
        "for (const tr of document.querySelectorAll('#{table} tbody tr'))
           if (tr.querySelector('.preview').textContent === {}) return Number(tr.dataset.id);
         return null;",
        serde_json::to_string(text).expect("json")
    ))
    .as_i64()
    .unwrap_or_else(|| panic!("no {table} row shows {text:?}"))
}

fn assert_previews_in_every_table(b: &Browser) {
    // Every table shows each row's payload's first line, its job key in the tooltip.
    b.wait_js(
        "both running rows",
        "return document.querySelectorAll('#running tbody tr').length === 2;",
    );
    let running = previews(b, "running");
    assert!(
        running.iter().all(|p| p.starts_with("echo running item-")),
        "{running:?}"
    );
    let mut pending = previews(b, "pending");
    pending.sort();
    assert_eq!(
        pending,
        [
            "echo pending item-1",
            "echo pending item-2",
            "echo pending item-3"
        ]
    );
    let results = previews(b, "results");
    assert_eq!(results.len(), 31);
    assert!(results.contains(&"echo result item-7; sleep 0.$(( 7 % 5 ))".to_string()));
    assert!(results.contains(&SCRIPT_PAYLOAD.to_string()), "{results:?}");
    let failures = previews(b, "failures");
    assert_eq!(failures.len(), 13);
    assert!(failures.contains(&IMG_PAYLOAD.to_string()), "{failures:?}");
    assert!(failures.contains(&"echo cancelled item-4".to_string()));
    let batches = previews(b, "batches");
    assert!(
        batches.is_empty(),
        "the batch table lists batches, not instances"
    );

    // Payload text is only text: nothing ran, no element was made from it.
    assert_eq!(b.js(SAFE), true);
}

fn assert_charts_count_the_jobs(b: &Browser) {
    // Charts: drawn from the series the server counted from the event log.
    b.wait_js(
        "the charts' data",
        "const c = window.__batchdbCharts;
         return c.throughput && c.depth && c.runtime
           && document.getElementById('chart-throughput').dataset.points > 0;",
    );
    // (Counted by the server's follower of the log; the page reads them again
    // every 30 s at most if its first read came before the follower was done.)
    wait_until("31 results per minute", || {
        (chart_sum(b, "throughput", 1) == 31).then_some(())
    });
    assert_eq!(chart_sum(b, "throughput", 2), 9, "failures per minute");
    assert_eq!(chart_sum(b, "throughput", 3), 4, "cancelled per minute");
    assert_eq!(
        chart_sum(b, "runtime", 1),
        40,
        "run times of results and failures"
    );
    let depth_now = b.js("const d = window.__batchdbCharts.depth.data[1]; return d[d.length - 1];");
    assert_eq!(depth_now, 5, "3 pending and 2 running are not ended");
    let canvases = b.js("return document.querySelectorAll('#charts-section canvas').length;");
    assert_eq!(canvases, 3);
}

fn assert_panel_shows_payload_attempts_output_and_command(b: &Browser) {
    // The instance panel of the script payload: payload, attempts, output, command.
    let xss_id = row_of(b, "results", SCRIPT_PAYLOAD);
    click_now(
        b,
        &format!("#results tr[data-id=\"{xss_id}\"] button.output"),
    );
    b.wait_js(
        "the panel's payload, attempts and output",
        "return document.getElementById('payload-text').textContent.length > 0
           && document.querySelectorAll('#attempts tbody tr').length === 1
           && document.getElementById('stdout').textContent.length > 0;",
    );
    assert_eq!(text_of(b, "#payload-text"), SCRIPT_PAYLOAD);
    assert_eq!(text_of(b, "#stdout"), "<script>window.__xss = 1</script>\n");
    assert_eq!(text_of(b, "#show-cmd"), format!("batchdb show id:{xss_id}"));
    // Copied, or (where the page may not write the clipboard) selected for Ctrl+C.
    click_now(b, "#copy-show");
    let copied = b.wait_js(
        "the copy button's answer",
        "const m = document.getElementById('message').textContent;
         return (m.startsWith('copied: batchdb show id:') || m.startsWith('selected')) && m;",
    );
    if copied.as_str().is_some_and(|m| m.starts_with("selected")) {
        let sel = b.js("return String(window.getSelection());");
        assert_eq!(sel, format!("batchdb show id:{xss_id}").as_str());
    }
    let attempt = b.js(
        "return [...document.querySelectorAll('#attempts tbody tr td')].map((td) => td.textContent);",
    );
    assert_eq!(attempt[0], "1");
    assert_eq!(attempt[1], "result");
    assert_eq!(attempt[2], "0", "exit code");
    // What the attempt used: its peak memory and CPU.
    let used = attempt[5].as_str().expect("text");
    // (From the attempt's memory cgroup, as it has a limit: what was charged to it.)
    let size = used.split(" · ").next().unwrap_or("");
    assert!(
        (size.ends_with(" KiB") || size.ends_with(" MiB")) && used.ends_with(" s CPU"),
        "{used}"
    );
    // What it ran with: directory, environment, limits, needs, concurrency key.
    let context = text_of(b, "#output-context");
    for part in [
        "cwd /",
        "env GREETING=hi",
        "limits memory 512.0 MiB",
        "needs gpu=1",
        "concurrency api=2",
    ] {
        assert!(context.contains(part), "{part:?} in {context:?}");
    }
    // The failure with an attribute-breaking payload, in the panel: its exit code.
    let img_id = row_of(b, "failures", IMG_PAYLOAD);
    click_now(b, &format!("#failures tr[data-id=\"{img_id}\"] td.job"));
    b.wait_js(
        "the failure's panel",
        "const a = document.querySelectorAll('#attempts tbody tr td');
         return a.length > 2 && a[1].textContent === 'fail' && a[2].textContent === '9';",
    );
    // The payload comes by its own request, after or before the attempts.
    b.wait_js(
        "the failure's payload",
        &format!(
            "return document.querySelector('#payload-text').textContent === {};",
            serde_json::to_string(IMG_PAYLOAD).expect("JSON string")
        ),
    );
    assert_eq!(text_of(b, "#payload-text"), IMG_PAYLOAD);
    assert_eq!(b.js(SAFE), true);
}

fn assert_filter_by_text_and_state(b: &Browser) {
    // The filter: text in the preview (on the server), then a state.
    b.type_into("#q", "item-1");
    b.wait_js(
        "only rows whose preview has item-1",
        "const p = [...document.querySelectorAll('#results tbody tr .preview')];
         return p.length === 11 && p.every((e) => e.textContent.includes('item-1'));",
    );
    let mut failed = previews(b, "failures");
    failed.sort();
    assert_eq!(
        failed,
        ["echo broken item-1 >&2; exit 1", "echo cancelled item-1"]
    );
    assert_eq!(previews(b, "pending"), ["echo pending item-1"]);
    assert_eq!(
        previews(b, "running"),
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
    assert_eq!(b.js(SAFE), true);
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
}

/// `target/test-artifacts/dashboard-50.png`: every table, a running instance's panel.
fn screenshot_of_every_table(b: &Browser) {
    b.click("#output-close");
    b.js("window.scrollTo(0, 0);");
    // Tall enough for every table, for a person to look at.
    b.cmd(
        "POST",
        "/window/rect",
        Some(json!({"width": 1400, "height": 3000})),
    );
    click_now(b, "#running tbody tr td.job");
    b.wait_js(
        "the running instance's panel",
        "return document.querySelectorAll('#attempts tbody tr').length === 1
           && document.getElementById('stdout').textContent.includes('running item');",
    );
    b.js("document.getElementById('message').hidden = true;");
    b.screenshot("dashboard-50.png");
}

#[test]
fn dashboard_with_50_mixed_jobs_shows_previews_filters_charts_and_payload_text_safely() {
    let env = Env::new();
    let _worker = fifty_mixed_jobs(&env);
    let s = serve(&env, &[], &[]);
    let b = Browser::start(&env);
    let ms = open_dashboard(&b, &s);
    println!("dashboard with 50 jobs filled in {ms:.0} ms");
    assert_clean_console(&b);
    assert_previews_in_every_table(&b);
    assert_charts_count_the_jobs(&b);
    assert_panel_shows_payload_attempts_output_and_command(&b);
    assert_filter_by_text_and_state(&b);
    screenshot_of_every_table(&b);

    // Live: the running two end; their rows move and the charts count them.
    env.touch("go");
    b.wait_js(
        "the two results, live",
        "return document.querySelectorAll('#results tbody tr').length === 33
           && document.querySelectorAll('#running tbody tr').length === 0;",
    );
    wait_until("the charts to count them", || {
        (chart_sum(&b, "throughput", 1) == 33).then_some(())
    });
    assert_eq!(chart_sum(&b, "runtime", 1), 42);
    assert_clean_console(&b);
}
