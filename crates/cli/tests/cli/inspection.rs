//! Inspecting work: `show`, `logs -f`, `events` (`-f`), and the result cache.

use std::collections::HashSet;

use serde_json::Value;

use crate::util::*;

#[test]
fn show_prints_stdout_and_stderr_and_exits_with_the_job_code() {
    let env = Env::new();
    let (bad, bad_created) = env.add("echo out; echo err >&2; exit 3");
    let (good, good_created) = env.add("printf ok; echo warn >&2");
    let (pending_key, pending_created) = env.add("echo later");
    env.ok(&["cancel", &pending_created.to_string()]);
    env.ok(&["push", &pending_key]); // one pending instance, never run
    let lines = run_lines(&env.run_until_empty(&["--order", "oldest"]));
    let result_id = results_for(&lines, &good).pop().expect("RESULT line");
    assert_eq!(result_id, sha256(b"ok"));

    let show = |sel: &str| env.cmd(&["show", sel]);
    let out = show(&bad_created.to_string());
    assert_eq!(
        (text(&out.stdout), text(&out.stderr)),
        ("out\n".into(), "err\n".into())
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        show(&bad).status.code(),
        Some(3),
        "a job key selects its instance"
    );
    for sel in [good_created.to_string(), good.clone(), result_id] {
        let out = show(&sel);
        assert_eq!(
            (text(&out.stdout), text(&out.stderr)),
            ("ok".into(), "warn\n".into()),
            "show {sel}"
        );
        assert_eq!(out.status.code(), Some(0), "show {sel}");
    }
    // An instance cancelled before it ran has no output to show.
    assert_one_line_error(&show(&pending_created.to_string()), &["show"]);
}

#[test]
fn show_of_a_running_instance_is_an_error_that_points_to_logs() {
    let env = Env::new();
    let (_, created) = env.add(&format!("touch started; {}", wait_file_sh("go")));
    let mut run = env.spawn(&["run", "--until-empty"]);
    env.wait_file("started");
    let line = assert_one_line_error(&env.cmd(&["show", &created.to_string()]), &["show"]);
    assert!(line.contains("logs"), "{line}");
    env.touch("go");
    run.wait_ok();
}

#[test]
fn logs_follow_streams_a_running_job_live_and_ends_with_it() {
    let env = Env::new();
    let (_, created) = env.add(&format!(
        "echo first-line; echo err-line >&2; {}; echo second-line",
        wait_file_sh("go")
    ));
    let mut run = env.spawn(&["run", "--until-empty"]);
    wait_until("the job to run", || {
        (env.row("pending", created)["running"] == true).then_some(())
    });

    let mut logs = env.spawn(&["logs", "-f", &created.to_string()]);
    // The first line arrives while the job still waits for `go`.
    logs.wait_stdout("first-line\n");
    assert!(logs.running(), "logs -f follows until the job ends");
    assert!(!env.exists("go"));
    env.touch("go");
    let out = logs.wait_ok();
    assert_eq!(out, "first-line\nsecond-line\n", "each byte exactly once");
    assert_eq!(logs.stderr(), "err-line\n");
    run.wait_ok();

    // Without -f on a finished instance: the stored output.
    assert_eq!(
        env.ok(&["logs", &created.to_string()]),
        "first-line\nsecond-line\n"
    );
}

fn events(env: &Env) -> Vec<Value> {
    json_lines(&env.ok(&["events"]))
}

#[test]
fn events_are_json_lines_with_every_kind() {
    let env = Env::new();
    let (ok, ok_created) = env.add("echo ok");
    let (bad, bad_created) = env.add("exit 2");
    env.run_until_empty(&[]);
    let evs = events(&env);
    let ids: Vec<i64> = evs.iter().map(|e| e["id"].as_i64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let find = |kind: &str, job: &str| {
        evs.iter()
            .filter(|e| e["event"] == kind && e["job"] == job)
            .cloned()
            .collect::<Vec<_>>()
    };
    for (job, created) in [(&ok, ok_created), (&bad, bad_created)] {
        assert_eq!(find("create", job).len(), 1, "{evs:#?}");
        for kind in ["push", "start"] {
            let e = find(kind, job);
            assert_eq!(e.len(), 1, "one {kind} event: {evs:#?}");
            assert_eq!(e[0]["created"], created);
            assert!(e[0]["time"].is_i64());
        }
    }
    assert_eq!(find("result", &ok).len(), 1, "{evs:#?}");
    assert_eq!(find("result", &ok)[0]["created"], ok_created);
    assert_eq!(find("fail", &bad).len(), 1, "{evs:#?}");
    assert_eq!(find("fail", &bad)[0]["created"], bad_created);
    assert!(find("result", &bad).is_empty() && find("fail", &ok).is_empty());
    // --after skips what was seen.
    let last = *ids.last().unwrap();
    assert!(env.ok(&["events", "--after", &last.to_string()]).is_empty());
    assert_eq!(
        json_lines(&env.ok(&["events", "--after", &ids[1].to_string()])).len(),
        ids.len() - 2
    );
}

#[test]
fn events_follow_sees_an_add_from_another_process() {
    let env = Env::new();
    let (first, _) = env.add("echo first");
    let mut follow = env.spawn(&["events", "-f"]);
    follow.wait_stdout(&first);
    let (second, created) = env.add("echo second");
    let seen = |follow: &Proc| {
        json_lines(&follow.stdout())
            .into_iter()
            .any(|e| e["event"] == "push" && e["job"] == second && e["created"] == created)
    };
    wait_until("events -f to print the push of the new job", || {
        seen(&follow).then_some(())
    });
    assert!(follow.running(), "events -f keeps following");
    let kinds: HashSet<String> = json_lines(&follow.stdout())
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        HashSet::from(["create".to_string(), "push".to_string()])
    );
}

#[test]
fn cached_add_reuses_a_successful_result_without_running_again() {
    let env = Env::new();
    let payload = "echo c; echo x >> runs";
    let (key, c1) = env.add_with(&["--cached"], payload);
    let (_, c2) = env.add_with(&["--cached"], payload);
    // Two identical instances queued together, two slots: still one run.
    let out = env.run_until_empty(&["-j", "2"]);
    assert_eq!(results_for(&run_lines(&out), &key).len(), 2, "{out}");
    assert_eq!(env.read("runs"), "x\n", "ran once");
    let (_, c3) = env.add_with(&["--cached"], payload);
    env.run_until_empty(&[]);
    assert_eq!(env.read("runs"), "x\n", "served from the cache later too");

    let rows: Vec<Value> = [c1, c2, c3].iter().map(|&c| env.row("result", c)).collect();
    let cached: Vec<bool> = rows
        .iter()
        .map(|r| r["value"]["cached"].as_bool().expect("cached"))
        .collect();
    assert_eq!(
        cached.iter().filter(|&&c| !c).count(),
        1,
        "exactly one real run: {rows:#?}"
    );
    for r in &rows {
        assert_eq!(r["value"]["hash"], sha256(b"c\n"), "same result: {r}");
    }
    assert_eq!(env.get(&sha256(b"c\n")), b"c\n");
    // Not cached without --cached.
    env.add(payload);
    env.run_until_empty(&[]);
    assert_eq!(env.read("runs"), "x\nx\n");
}

#[test]
fn a_failed_cached_job_is_never_served_from_the_cache() {
    let env = Env::new();
    let payload = "echo y >> runs; exit 1";
    let (key, _) = env.add_with(&["--cached"], payload);
    env.add_with(&["--cached"], payload);
    let out = env.run_until_empty(&["-j", "2"]);
    let lines = run_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| matches!(l, RunLine::Fail { job, .. } if *job == key)),
        "{out}"
    );
    env.add_with(&["--cached"], payload);
    env.run_until_empty(&[]);
    assert_eq!(env.read("runs"), "y\ny\ny\n", "every failing instance ran");
    assert!(env.list("result").is_empty());
    assert_eq!(env.list("fail").len(), 3);
}

#[test]
fn verify_counts_the_payloads_and_outputs_it_rehashed_inline() {
    let env = Env::new();
    env.add("echo hi");
    env.run_until_empty(&[]);
    let out = env.cmd(&["verify"]);
    assert_success(&out, &["verify"]);
    let said = text(&out.stderr);
    let number = |after: &str| -> u64 {
        let (_, rest) = said.split_once(after).unwrap_or_else(|| panic!("{said}"));
        rest.split(|c: char| !c.is_ascii_digit())
            .find(|w| !w.is_empty())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{said}"))
    };
    assert!(
        said.starts_with("batchdb: verified 0 blobs (0 bytes), "),
        "{said}"
    );
    // The payload (7 bytes) and its stdout (3 bytes) at least.
    assert!(number("bytes), ") >= 2, "{said}");
    assert!(number("inline blobs (") >= 10, "{said}");
    assert!(said.trim_end().ends_with(": 0 problems"), "{said}");
}
