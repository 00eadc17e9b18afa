//! Scheduling and control: retries, `retry`, `cancel`, priorities, `--delay` and `--at`.

use crate::util::*;

#[test]
fn retries_count_attempts_and_end_in_one_fail_row() {
    let env = Env::new();
    let (key, created) = env.add_with(&["--retries", "2"], "echo try $BATCHDB_ATTEMPT; exit 1");
    let out = env.run_until_empty(&["--backoff", "0.05"]);
    let lines = run_lines(&out);
    assert_eq!(
        lines.len(),
        1,
        "only the final failure is a FAIL line:\n{out}"
    );
    assert!(
        matches!(&lines[0], RunLine::Fail { job, created: c, .. } if *job == key && *c == created)
    );

    let detail = env.show_json(&created.to_string());
    assert_eq!(detail["state"], "fail");
    assert_eq!(outcomes(&detail), ["retry", "retry", "fail"]);
    for (i, a) in detail["attempts"].as_array().unwrap().iter().enumerate() {
        assert_eq!(a["exit_code"], 1, "{a}");
        // Every attempt's output stays visible.
        let stdout = a["stdout"]["hash"].as_str().expect("attempt stdout");
        assert_eq!(text(&env.get(stdout)), format!("try {}\n", i + 1));
    }
    let fail = env.row("fail", created);
    assert_eq!(fail["value"]["attempts"], 3);
    assert_eq!(env.list("fail").len(), 1);
    assert!(env.list("pending").is_empty());
}

#[test]
fn a_job_failing_once_then_succeeding_ends_as_a_result() {
    let env = Env::new();
    let (key, created) = env.add_with(
        &["--retries", "2"],
        "if [ -e failed-once ]; then echo ok; else touch failed-once; exit 1; fi",
    );
    // No --retries of its own: the worker's default (1) applies.
    let (_, dflt) = env.add("exit 5");
    let out = env.run_until_empty(&["--backoff", "0.05", "--retries", "1", "--order", "oldest"]);
    let lines = run_lines(&out);
    assert_eq!(results_for(&lines, &key), [sha256(b"ok\n")], "{out}");
    assert_eq!(lines.len(), 2, "{out}");

    let result = env.row("result", created);
    assert_eq!(result["value"]["attempts"], 2);
    assert_eq!(
        outcomes(&env.show_json(&created.to_string())),
        ["retry", "result"]
    );
    assert_eq!(
        outcomes(&env.show_json(&dflt.to_string())),
        ["retry", "fail"]
    );
    assert_eq!(env.list("result").len(), 1);
}

#[test]
fn retry_pushes_a_failed_instance_again_by_created_or_jobkey() {
    let env = Env::new();
    let (k1, c1) = env.add("exit 3");
    let (k2, c2) = env.add("exit 4");
    let (ok, _) = env.add("echo fine");
    env.run_until_empty(&[]);
    assert_eq!(env.list("fail").len(), 2);

    let n1 = parse_pushed(env.ok(&["retry", &c1.to_string()]).trim_end(), &k1);
    let n2 = parse_pushed(env.ok(&["retry", &k2]).trim_end(), &k2);
    assert!(n1 != c1 && n2 != c2, "retries are new instances");
    let pending: Vec<i64> = env.list("pending").iter().map(row_created).collect();
    assert_eq!(pending, [n1, n2]);
    // A job without failures has nothing to retry.
    assert_one_line_error(&env.cmd(&["retry", &ok]), &["retry", &ok]);

    let lines = run_lines(&env.run_until_empty(&[]));
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| matches!(l, RunLine::Fail { .. })));
    assert_eq!(env.list("fail").len(), 4);
    assert!(env.list("pending").is_empty());
}

#[test]
fn retry_all_failed_pushes_every_failed_instance() {
    let env = Env::new();
    let (k1, _) = env.add("exit 3");
    let (k2, _) = env.add("exit 4");
    env.add("echo fine");
    env.run_until_empty(&[]);
    let out = env.ok(&["retry", "--all-failed"]);
    let mut pushed: Vec<String> = out
        .lines()
        .map(|l| {
            l.split(' ')
                .nth(1)
                .expect("pushed <key> <created>")
                .to_string()
        })
        .collect();
    pushed.sort();
    let mut expected = vec![k1, k2];
    expected.sort();
    assert_eq!(pushed, expected, "{out}");
    assert_eq!(env.list("pending").len(), 2);
}

#[test]
fn cancel_of_pending_instances_by_created_and_by_jobkey() {
    let env = Env::new();
    let (k1, c1) = env.add("touch ran; echo cancelled");
    let (k2, c2) = env.add("echo kept");
    assert_eq!(
        env.ok(&["cancel", &c1.to_string()]),
        format!("cancel {k1} {c1}\n")
    );
    // A job key cancels all its pending instances.
    let (k3, c3) = env.add("touch ran; echo twice");
    let c3b = env.push(&k3);
    assert_eq!(
        env.ok(&["cancel", &k3]),
        format!("cancel {k3} {c3}\ncancel {k3} {c3b}\n")
    );

    let cancelled: Vec<i64> = env.list("cancelled").iter().map(row_created).collect();
    assert_eq!(cancelled, [c1, c3, c3b]);
    let pending: Vec<i64> = env.list("pending").iter().map(row_created).collect();
    assert_eq!(pending, [c2]);

    let out = env.run_until_empty(&[]);
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: k2,
            hash: sha256(b"kept\n")
        }]
    );
    assert!(!env.exists("ran"), "a cancelled instance never runs");
    let detail = env.show_json(&c1.to_string());
    assert_eq!(detail["state"], "cancelled");
    assert_eq!(detail["attempts"], serde_json::json!([]));
    // Nothing is left to cancel.
    assert_one_line_error(&env.cmd(&["cancel", &c1.to_string()]), &["cancel"]);
}

#[test]
fn cancel_of_a_running_instance_kills_its_process_group() {
    let env = Env::new();
    // The job starts a grandchild too: the whole group must go.
    let (key, created) = env.add(&format!(
        "echo $$ > pid; ({}) & {}",
        wait_file_sh("never"),
        wait_file_sh("never")
    ));
    let mut run = env.spawn(&["run", "--until-empty"]);
    let pgid = env.wait_pid("pid");
    assert!(!live_in_group(pgid).is_empty());

    assert_eq!(
        env.ok(&["cancel", &created.to_string()]),
        format!("cancel {key} {created}\n")
    );
    let out = run.wait_ok();
    assert!(
        run_lines(&out).is_empty(),
        "no RESULT or FAIL for a cancelled job:\n{out}"
    );
    wait_until("the job's process group to be gone", || {
        live_in_group(pgid).is_empty().then_some(())
    });

    let cancelled = env.list("cancelled");
    assert_eq!(cancelled.len(), 1);
    assert_eq!(row_created(&cancelled[0]), created);
    assert!(
        env.list("pending").is_empty()
            && env.list("fail").is_empty()
            && env.list("result").is_empty()
    );
    let detail = env.show_json(&created.to_string());
    assert_eq!(detail["state"], "cancelled");
    assert_eq!(outcomes(&detail), ["cancelled"]);
}

#[test]
fn higher_priority_runs_first_and_order_applies_within_a_priority() {
    for (order, expected) in [
        ("oldest", ["high", "high2", "mid", "low", "neg"]),
        ("newest", ["high2", "high", "mid", "low", "neg"]),
    ] {
        let env = Env::new();
        let jobs: Vec<(&str, String)> = [
            ("low", None),
            ("high", Some("5")),
            ("neg", Some("-1")),
            ("mid", Some("1")),
            ("high2", Some("5")),
        ]
        .into_iter()
        .map(|(name, prio)| {
            let opts = prio.map(|p| vec!["--priority", p]).unwrap_or_default();
            (name, env.add_with(&opts, &format!("echo {name}")).0)
        })
        .collect();
        let out = env.run_until_empty(&["-j", "1", "--order", order]);
        let ran: Vec<&str> = run_lines(&out)
            .iter()
            .map(|l| match l {
                RunLine::Result { job, .. } => {
                    jobs.iter().find(|(_, k)| k == job).expect("known").0
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ran, expected, "--order {order}");
    }
}

#[test]
fn a_delayed_job_does_not_run_before_its_time() {
    let env = Env::new();
    let (now_key, _) = env.add("echo now");
    let (key, created) = env.add_with(&["--delay", "2"], "echo delayed");
    let row = env.row("pending", created);
    let run_at = row["run_at"].as_i64().expect("run_at");
    assert!(
        run_at >= created + 1000,
        "run_at is about 2 s after the push: {row}"
    );

    // --until-empty waits for the delayed job instead of exiting.
    let out = env.run_until_empty(&[]);
    let lines = run_lines(&out);
    assert_eq!(results_for(&lines, &now_key).len(), 1, "{out}");
    assert_eq!(results_for(&lines, &key), [sha256(b"delayed\n")], "{out}");
    let result = env.row("result", created);
    let start = result["value"]["start"].as_i64().unwrap();
    assert!(
        start >= run_at,
        "started at {start}, before its time {run_at}"
    );
}

#[test]
fn at_sets_the_run_time_in_utc() {
    let env = Env::new();
    let (_, iso) = env.add_with(&["--at", "2100-01-01T00:00:00Z"], "echo future");
    let (_, epoch) = env.add_with(&["--at", "4102444800"], "echo future too");
    let (past, _) = env.add_with(&["--at", "1970-01-02"], "echo past");
    for c in [iso, epoch] {
        assert_eq!(env.row("pending", c)["run_at"], 4_102_444_800_000i64);
    }
    env.ok(&["cancel", &iso.to_string(), &epoch.to_string()]);
    let out = env.run_until_empty(&[]);
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: past,
            hash: sha256(b"past\n")
        }]
    );
}

/// `<created>` is how users name an instance (`show`, `logs`, `cancel`, `retry`), so
/// it must name one: cancelling one instance may never cancel another job's.
/// `retry --all-failed` pushes several jobs in one transaction, i.e. in the same
/// millisecond, which makes the collision deterministic.
#[test]
fn cancel_by_created_never_hits_an_instance_of_another_job() {
    let env = Env::new();
    env.add("exit 1");
    env.add("exit 2");
    env.run_until_empty(&[]);
    let out = env.ok(&["retry", "--all-failed"]);
    let pushed: Vec<(String, i64)> = out
        .lines()
        .map(|l| {
            let key = l.split(' ').nth(1).expect("pushed <key> <created>");
            (key.to_string(), parse_pushed(l, key))
        })
        .collect();
    assert_eq!(pushed.len(), 2, "{out}");
    let (key, created) = &pushed[0];
    let cancel = env.cmd(&["cancel", &created.to_string()]);
    let cancelled = env.list("cancelled");
    assert!(
        cancelled.len() <= 1,
        "`cancel {created}` (pushed as `{key} {created}`) cancelled {} instances: {}\n\
         retry --all-failed printed:\n{out}",
        cancelled.len(),
        text(&cancel.stdout)
    );
}
