//! Consistency under concurrent processes: every push is its own instance (even in
//! one millisecond), a failing job never stalls the queue, running instances list as
//! running, and every listed result is readable and hashes right. (The original
//! module got each of these wrong.)

use std::collections::HashSet;

use crate::util::*;

/// Defect 1: `push` of an existing job works, and every push is its own instance.
#[test]
fn push_of_an_existing_job_works() {
    let env = Env::new();
    let (key, first) = env.add("echo again");
    let second = env.push(&key);
    let third = env.push(&key);
    let created: HashSet<i64> = [first, second, third].into();
    assert_eq!(created.len(), 3, "three distinct instances");
    assert_eq!(env.list("pending").len(), 3);
    let out = env.run_until_empty(&[]);
    assert_eq!(
        results_for(&run_lines(&out), &key).len(),
        3,
        "the job ran three times:\n{out}"
    );
    let done: HashSet<i64> = env.list("result").iter().map(row_created).collect();
    assert_eq!(done, created);
}

/// Defect 2: a failing job becomes a fail row and the queue goes on.
#[test]
fn a_failing_job_does_not_stall_the_queue() {
    let env = Env::new();
    let (first, _) = env.add("echo first");
    let (bad, bad_created) = env.add("echo oops >&2; exit 7");
    let (last, _) = env.add("echo last");
    let out = env.run_until_empty(&["-j", "1", "--order", "oldest"]);
    let lines = run_lines(&out);
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        matches!(&lines[1], RunLine::Fail { job, created, .. } if *job == bad && *created == bad_created),
        "{out}"
    );
    assert_eq!(results_for(&lines, &first), [sha256(b"first\n")]);
    assert_eq!(results_for(&lines, &last), [sha256(b"last\n")]);
    let fail = env.row("fail", bad_created);
    assert_eq!(fail["value"]["exit_code"], 7, "{fail}");
    let stderr = fail["value"]["stderr"]
        .as_str()
        .expect("fail row keeps stderr");
    assert_eq!(env.get(stderr), b"oops\n");
    assert!(env.list("pending").is_empty());
}

/// Defect 3: `list pending` (and `list job`) shows a running instance as running.
#[test]
fn list_pending_shows_a_running_instance_as_running() {
    let env = Env::new();
    let (waiting_key, waiting) = env.add("echo waiting");
    let (busy_key, busy) = env.add(&format!("touch started; {}; echo busy", wait_file_sh("go")));
    // -j 1 and newest first: the busy job runs, the other one waits behind it.
    let mut run = env.spawn(&["run", "-j", "1", "--until-empty"]);
    env.wait_file("started");

    let pending = env.list("pending");
    assert_eq!(pending.len(), 2, "{pending:#?}");
    let row = |c: i64| pending.iter().find(|r| row_created(r) == c).expect("row");
    assert_eq!(row(busy)["running"], true, "{pending:#?}");
    assert_eq!(row(busy)["job"], busy_key);
    assert_eq!(row(waiting)["running"], false, "{pending:#?}");
    let jobs = env.list("job");
    let job = |k: &str| {
        jobs.iter()
            .find(|j| j["key"] == k)
            .expect("job row")
            .clone()
    };
    assert_eq!(job(&busy_key)["running"], serde_json::json!([busy]));
    assert_eq!(job(&waiting_key)["running"], serde_json::json!([]));

    env.touch("go");
    let out = run.wait_ok();
    assert_eq!(run_lines(&out).len(), 2, "{out}");
    assert!(env.list("pending").is_empty());
    assert_eq!(
        env.list("job")
            .iter()
            .filter(|j| j["running"] != serde_json::json!([]))
            .count(),
        0
    );
}

/// Defect 4: pushes of the same job that land together (from several processes at
/// once) stay distinct instances with distinct `created` and id.
#[test]
fn concurrent_pushes_of_one_job_stay_distinct_instances() {
    const N: usize = 8;
    let env = Env::new();
    let key = env
        .ok(&["create", "echo same"])
        .trim()
        .strip_prefix("created ")
        .expect("created line")
        .to_string();
    // N pushes and N adds of the same payload, all started before any is waited for.
    let children: Vec<_> = (0..N)
        .flat_map(|_| [vec!["push", key.as_str()], vec!["add", "echo same"]])
        .map(|args| {
            env.command(&args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut created = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert_success(&out, &["push/add"]);
        let last = text(&out.stdout)
            .lines()
            .last()
            .expect("output")
            .to_string();
        created.push(parse_pushed(&last, &key));
    }
    let unique: HashSet<i64> = created.iter().copied().collect();
    assert_eq!(
        unique.len(),
        2 * N,
        "every push got its own created: {created:?}"
    );

    let pending = env.list("pending");
    assert_eq!(pending.len(), 2 * N);
    let ids: HashSet<i64> = pending
        .iter()
        .map(|r| r["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 2 * N, "distinct instance ids");
    let listed: HashSet<i64> = pending.iter().map(row_created).collect();
    assert_eq!(listed, unique);

    let out = env.run_until_empty(&["-j", "4"]);
    assert_eq!(results_for(&run_lines(&out), &key).len(), 2 * N, "{out}");
    let results = env.list("result");
    let done: HashSet<i64> = results.iter().map(row_created).collect();
    assert_eq!(done, unique, "one result per instance");
    let ids: HashSet<i64> = results
        .iter()
        .map(|r| r["value"]["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 2 * N);
}

/// Defect 4, same millisecond: `retry <jobkey>` pushes every failed instance of the
/// job in one transaction, so the new instances are pushed in the same millisecond.
#[test]
fn pushes_of_one_job_in_the_same_millisecond_stay_distinct() {
    let env = Env::new();
    let (key, c1) = env.add("exit 1");
    let c2 = env.push(&key);
    env.run_until_empty(&[]);
    assert_eq!(env.list("fail").len(), 2);
    let out = env.ok(&["retry", &key]);
    let pushed: Vec<i64> = out.lines().map(|l| parse_pushed(l, &key)).collect();
    assert_eq!(pushed.len(), 2, "{out}");
    let created: HashSet<i64> = [c1, c2, pushed[0], pushed[1]].into();
    assert_eq!(created.len(), 4, "distinct created: {c1} {c2} {pushed:?}");
    let pending = env.list("pending");
    assert_eq!(pending.len(), 2);
    let ids: HashSet<i64> = pending
        .iter()
        .map(|r| r["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids.len(), 2, "distinct ids: {pending:#?}");
}

/// Defect 5: a result row appears only once its blob is readable: every row listed
/// while a worker is busy can be fetched at once and hashes to its name.
#[test]
fn every_listed_result_is_readable_and_hashes_right() {
    const JOBS: usize = 10;
    let env = Env::new();
    env.add("true"); // empty output
    for i in 1..JOBS {
        // A few hundred KB each, so that writing the blob takes a while.
        env.add(&format!("echo job {i}; seq 1 {}", 30000 + i));
    }
    let mut run = env.spawn(&["run", "-j", "2", "--until-empty"]);
    let mut checked: HashSet<i64> = HashSet::new();
    wait_until("every result row to be checked", || {
        for row in env.list("result") {
            let id = row["value"]["id"].as_i64().expect("id");
            if checked.insert(id) {
                let hash = row["value"]["hash"].as_str().expect("hash");
                let bytes = env.get(hash); // asserts `get` succeeds
                assert_eq!(
                    sha256(&bytes),
                    hash,
                    "blob content hashes to its name: {row}"
                );
                assert_eq!(row["value"]["size"], bytes.len(), "{row}");
            }
        }
        (checked.len() == JOBS).then_some(())
    });
    let out = run.wait_ok();
    for line in run_lines(&out) {
        match line {
            RunLine::Result { hash, .. } => assert_eq!(sha256(&env.get(&hash)), hash),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Defect 6: another process adds while `run` works on the same database, and the
/// running worker picks the new job up.
#[test]
fn add_from_another_process_while_run_works() {
    let env = Env::new();
    let (busy, _) = env.add(&format!("touch started; {}; echo busy", wait_file_sh("go")));
    let mut run = env.spawn(&["run", "-j", "2"]);
    env.wait_file("started");

    // The worker is busy with a job: adding still works and the job runs.
    let (late, _) = env.add("echo late");
    run.wait_stdout(&format!("RESULT {late} {}", sha256(b"late\n")));
    // And again once the worker is idle-waiting with a free slot.
    env.touch("go");
    run.wait_stdout(&format!("RESULT {busy} {}", sha256(b"busy\n")));
    let (later, _) = env.add("echo later");
    run.wait_stdout(&format!("RESULT {later} {}", sha256(b"later\n")));

    assert!(
        run.running(),
        "run without --until-empty keeps waiting for work"
    );
    run.signal("TERM");
    assert!(run.wait().success(), "stderr:\n{}", run.stderr());
    assert_eq!(env.list("result").len(), 3);
}
