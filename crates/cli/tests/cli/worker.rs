//! Execution: parallelism, several workers on one queue, crash takeover by
//! lease, timeouts, and graceful / forced shutdown.

use std::collections::HashSet;
use std::time::Duration;

use crate::util::*;

#[test]
fn run_j4_runs_four_jobs_at_once() {
    let env = Env::new();
    // Each job waits until all four have started: only possible if all run at once.
    let wait_all: Vec<String> = (1..=4)
        .map(|i| wait_file_sh(&format!("started.{i}")))
        .collect();
    let keys: Vec<String> = (1..=4)
        .map(|i| {
            env.add(&format!(
                "touch started.{i}; {}; echo {i}",
                wait_all.join("; ")
            ))
            .0
        })
        .collect();
    let out = env.run_until_empty(&["-j", "4"]);
    let lines = run_lines(&out);
    assert_eq!(lines.len(), 4, "{out}");
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(
            results_for(&lines, key),
            [sha256(format!("{}\n", i + 1).as_bytes())],
            "{out}"
        );
    }
}

/// The bound for the 2000-job test's steps (each takes seconds when all is well).
const SLOW: Duration = Duration::from_secs(300);

#[test]
fn two_runs_with_j4_drain_2000_jobs_each_ending_exactly_once() {
    const N: usize = 2000;
    let env = Env::new();
    // One bulk add of N payloads, `echo 0` .. `echo N-1`.
    let lines: String = (0..N).map(|i| format!("echo {i}\n")).collect();
    let added = env.cmd_stdin(&["add", "--lines", "-q"], lines.as_bytes());
    assert_success(&added, &["add", "--lines"]);
    assert_eq!(env.list("pending").len(), N);

    let args = ["run", "-j", "4", "--order", "oldest", "--until-empty"];
    let mut a = env.spawn(&args);
    let mut b = env.spawn(&args);
    let (out_a, out_b) = (a.wait_ok_within(SLOW), b.wait_ok_within(SLOW));

    // Every instance ends in exactly one terminal row.
    let results = env.list("result");
    assert_eq!(results.len(), N);
    let ids: HashSet<i64> = results
        .iter()
        .map(|r| r["value"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), N, "no instance has two result rows");
    let keys: HashSet<(String, i64)> = results
        .iter()
        .map(|r| (r["key"][0].as_str().unwrap().to_string(), row_created(r)))
        .collect();
    assert_eq!(keys.len(), N);
    assert!(env.list("pending").is_empty());
    assert!(env.list("fail").is_empty());
    assert!(env.list("cancelled").is_empty());
    let hashes: HashSet<&str> = results
        .iter()
        .map(|r| r["value"]["hash"].as_str().unwrap())
        .collect();
    assert_eq!(hashes.len(), N, "every job printed its own number");

    // The two workers together reported each job exactly once.
    let mut reported = Vec::new();
    for line in run_lines(&out_a).into_iter().chain(run_lines(&out_b)) {
        match line {
            RunLine::Result { job, .. } => reported.push(job),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(reported.len(), N);
    assert_eq!(reported.iter().collect::<HashSet<_>>().len(), N);

    // Spot checks: the result of `echo i` is `i\n`.
    for r in results.iter().step_by(397) {
        let payload = text(&env.get(r["key"][0].as_str().unwrap()));
        let n = payload.strip_prefix("echo ").expect("payload");
        assert_eq!(
            text(&env.get(r["value"]["hash"].as_str().unwrap())),
            format!("{n}\n")
        );
    }
}

#[test]
fn kill_9_of_a_worker_mid_job_is_taken_over_after_the_lease() {
    let env = Env::new();
    let (key, created) = env.add(&format!(
        "echo $$ > pid.$BATCHDB_ATTEMPT; {}; echo finished",
        wait_file_sh("go")
    ));
    let mut first = env.spawn(&["run", "--lease", "1"]);
    let pgid = env.wait_pid("pid.1");
    let _orphan = GroupGuard(pgid);
    first.signal("KILL");
    first.wait();
    // The dead worker's job dies with it: it never runs beside the takeover.
    wait_until("the dead worker's job to die with it", || {
        live_in_group(pgid).is_empty().then_some(())
    });
    env.touch("go");

    let out = env
        .spawn(&["run", "--lease", "1", "--until-empty"])
        .wait_ok();
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: key.clone(),
            hash: sha256(b"finished\n")
        }]
    );
    let results = env.list("result");
    assert_eq!(results.len(), 1, "exactly one result row: {results:#?}");
    assert_eq!(row_created(&results[0]), created);
    assert_eq!(results[0]["value"]["attempts"], 2);
    assert!(env.list("fail").is_empty() && env.list("pending").is_empty());

    let detail = env.show_json(&created.to_string());
    assert_eq!(detail["state"], "result");
    assert_eq!(outcomes(&detail), ["lost", "result"], "{detail}");
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert_ne!(attempts[0]["worker"], attempts[1]["worker"], "{detail}");
}

#[test]
fn on_the_fork_path_a_dead_workers_job_still_dies_with_it() {
    // Jobs normally start without a fork of the worker (vfork-style, pidfd); the
    // fallback (old kernels, or BATCHDB_SPAWN=fork) sets the signal between fork and
    // exec instead, and must keep the same guarantee.
    let env = Env::new();
    let (key, _) = env.add(&format!(
        "echo $$ > pid.1; {}; echo finished",
        wait_file_sh("go")
    ));
    let mut cmd = env.command(&["run", "--lease", "1"]);
    cmd.env("BATCHDB_SPAWN", "fork");
    let mut worker = env.start(cmd, None);
    let pgid = env.wait_pid("pid.1");
    let _orphan = GroupGuard(pgid);
    worker.signal("KILL");
    worker.wait();
    wait_until("the dead worker's job to die with it", || {
        live_in_group(pgid).is_empty().then_some(())
    });
    env.touch("go");
    let mut cmd = env.command(&["run", "--lease", "1", "--until-empty"]);
    cmd.env("BATCHDB_SPAWN", "fork");
    let out = env.start(cmd, None).wait_ok();
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: key,
            hash: sha256(b"finished\n")
        }]
    );
}

#[test]
fn a_long_job_of_a_live_worker_is_never_taken_over() {
    let env = Env::new();
    let (key, created) = env.add(&format!("touch started; {}; echo done", wait_file_sh("go")));
    let mut a = env.spawn(&["run", "--lease", "1"]);
    env.wait_file("started");
    let mut b = env.spawn(&["run", "--lease", "1"]);
    // Three lease lengths: the heartbeat must keep the claim (not a speed check).
    std::thread::sleep(Duration::from_secs(3));
    env.touch("go");
    a.wait_stdout(&format!("RESULT {key} {}", sha256(b"done\n")));
    let detail = env.show_json(&created.to_string());
    assert_eq!(
        outcomes(&detail),
        ["result"],
        "one attempt, never taken over: {detail}"
    );
    assert_eq!(b.stdout(), "", "the second worker ran nothing");
    for p in [&mut a, &mut b] {
        p.signal("TERM");
        assert!(p.wait().success());
    }
}

#[test]
fn a_worker_whose_lease_was_taken_over_records_nothing() {
    let env = Env::new();
    // Each attempt waits for its own marker, so the test decides which ends first.
    let (key, created) = env.add(&format!(
        "echo $$ > pid.$BATCHDB_ATTEMPT; {}; echo attempt $BATCHDB_ATTEMPT",
        wait_file_sh("go.$BATCHDB_ATTEMPT")
    ));
    let stale = env.spawn(&["run", "--lease", "1"]);
    env.wait_file("pid.1");
    // A worker that stops renewing its lease without dying (a long pause, a
    // suspended VM): its claim is taken over by another worker...
    stale.signal("STOP");
    let mut fresh = env.spawn(&["run", "--lease", "1", "--until-empty"]);
    env.wait_file("pid.2");
    // ...and when the old worker wakes up with its attempt finished while the new
    // attempt still runs, it is fenced off: it records nothing.
    env.touch("go.1");
    stale.signal("CONT");
    wait_until("the stale worker to report its attempt", || {
        (!stale.stdout().is_empty() || !stale.stderr().is_empty()).then_some(())
    });
    assert_eq!(stale.stdout(), "", "the stale worker reports no result");
    let row = env.row("pending", created);
    assert_eq!(
        row["running"], true,
        "the new attempt still owns the instance: {row}"
    );
    assert_eq!(row["attempts"], 2, "{row}");
    assert!(env.list("result").is_empty() && env.list("fail").is_empty());

    env.touch("go.2");
    let out = fresh.wait_ok();
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: key,
            hash: sha256(b"attempt 2\n")
        }]
    );
    let results = env.list("result");
    assert_eq!(results.len(), 1, "{results:#?}");
    assert_eq!(results[0]["value"]["hash"], sha256(b"attempt 2\n"));
    assert!(env.list("fail").is_empty() && env.list("pending").is_empty());
    assert_eq!(
        outcomes(&env.show_json(&created.to_string())),
        ["lost", "result"]
    );
    let finished = json_lines(&env.ok(&["events"]))
        .into_iter()
        .filter(|e| e["event"] == "result" || e["event"] == "fail")
        .count();
    assert_eq!(finished, 1, "one terminal event");
}

/// A takeover stops what the lost attempt left running, but only that: the jobs of
/// another database on the same machine (whose instance and attempt numbers are the
/// same small integers) must be left alone.
#[test]
fn a_takeover_never_touches_the_jobs_of_another_database() {
    let other = Env::new();
    // Instance 1, attempt 1 of the other database: a job running under a live worker.
    let (other_key, _) = other.add(&format!(
        "echo $$ > pid; {}; echo survived",
        wait_file_sh("go")
    ));
    let mut other_run = other.spawn(&["run", "--until-empty"]);
    let other_pid = other.wait_pid("pid");

    // Instance 1, attempt 1 of this database: its worker dies, a new one takes over.
    let env = Env::new();
    env.add(&format!(
        "echo $BATCHDB_ATTEMPT > attempt.$BATCHDB_ATTEMPT; {}",
        wait_file_sh("never")
    ));
    let mut first = env.spawn(&["run", "--lease", "1"]);
    env.wait_file("attempt.1");
    first.signal("KILL");
    first.wait();
    let _takeover = env.spawn(&["run", "--lease", "1"]);
    env.wait_file("attempt.2");

    assert!(
        !live_in_group(other_pid).is_empty(),
        "the takeover in {} killed the job of the other database {}",
        env.db_dir().display(),
        other.db_dir().display()
    );
    other.touch("go");
    let out = other_run.wait_ok();
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: other_key,
            hash: sha256(b"survived\n")
        }]
    );
}

#[test]
fn timeout_kills_the_whole_process_group_and_keeps_the_output() {
    let env = Env::new();
    // A grandchild that would outlive its shell, named uniquely to find it in /proc.
    let own = format!("sleep 300.{}", unique());
    let dflt = format!("sleep 300.{}", unique());
    let (key, created) = env.add_with(&["--timeout", "1"], &format!("{own} & echo started; {own}"));
    // A job without its own timeout gets the worker's default.
    let (key2, created2) = env.add(&format!("{dflt} & echo default; {dflt}"));
    let out = env.run_until_empty(&["-j", "2", "--timeout", "1", "--kill-grace", "1"]);

    let lines = run_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    for (k, c, printed) in [(&key, created, "started\n"), (&key2, created2, "default\n")] {
        let failed = lines.iter().any(|l| {
            matches!(l, RunLine::Fail { job, created, message }
                if job == k && *created == c && message.contains("timed out"))
        });
        assert!(failed, "FAIL line saying it timed out for {c}:\n{out}");
        let row = env.row("fail", c);
        assert!(
            row["value"]["message"]
                .as_str()
                .unwrap()
                .contains("timed out"),
            "{row}"
        );
        let stdout = row["value"]["stdout"].as_str().expect("the output is kept");
        assert_eq!(text(&env.get(stdout)), printed);
    }
    for marker in [&own, &dflt] {
        wait_until(&format!("no `{marker}` process left"), || {
            live_with_cmdline(marker).is_empty().then_some(())
        });
    }
}

#[test]
fn sigterm_lets_the_running_job_finish_and_claims_nothing_new() {
    let env = Env::new();
    let (_, other) = env.add("touch other-ran; echo other");
    let (key, _) = env.add(&format!("touch started; {}; echo done", wait_file_sh("go")));
    let mut run = env.spawn(&["run", "-j", "1"]);
    env.wait_file("started");

    run.signal("TERM");
    // Give the signal time to arrive before the job can end (not a speed check).
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        run.running(),
        "run waits for its running job\nstderr:\n{}",
        run.stderr()
    );
    env.touch("go");
    let out = run.wait_ok();
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: key,
            hash: sha256(b"done\n")
        }]
    );

    // The other instance was never claimed.
    assert!(!env.exists("other-ran"));
    let pending = env.list("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(row_created(&pending[0]), other);
    assert_eq!(pending[0]["running"], false);
    assert_eq!(pending[0]["attempts"], 0);
    assert_eq!(env.list("result").len(), 1);
}

#[test]
fn second_sigterm_kills_the_job_and_returns_it_to_pending() {
    let env = Env::new();
    let (key, created) = env.add(&format!("echo $$ > pid; {}; echo done", wait_file_sh("go")));
    let mut run = env.spawn(&["run", "-j", "1"]);
    let pgid = env.wait_pid("pid");
    // SIGINT and SIGTERM both count: the second signal forces.
    run.signal("INT");
    // Signals that arrive together may be seen as one: repeat the second one (as a
    // user pressing Ctrl-C again would) until run stops.
    let status = wait_until("run to stop after a second signal", || {
        std::thread::sleep(Duration::from_millis(500));
        let status = run.try_status();
        if status.is_none() {
            run.signal("TERM");
        }
        status
    });
    assert!(
        status.code().is_some(),
        "run exits on its own, not killed by the signal: {status}"
    );
    wait_until("the job's processes to be gone", || {
        live_in_group(pgid).is_empty().then_some(())
    });

    let pending = env.list("pending");
    assert_eq!(
        pending.len(),
        1,
        "the job is back on the queue: {pending:#?}"
    );
    assert_eq!(row_created(&pending[0]), created);
    assert_eq!(pending[0]["running"], false);
    assert!(env.list("result").is_empty() && env.list("fail").is_empty());
    let detail = env.show_json(&created.to_string());
    assert_eq!(detail["state"], "pending");
    assert_eq!(detail["attempts"][0]["outcome"], "released", "{detail}");

    // Nothing lost: the next worker runs it to the end.
    env.touch("go");
    let out = env.run_until_empty(&[]);
    assert_eq!(
        run_lines(&out),
        [RunLine::Result {
            job: key,
            hash: sha256(b"done\n")
        }]
    );
    assert_eq!(env.list("result").len(), 1);
}

/// Field `n` (1-based, after the command name) of `/proc/<pid>/stat`; `None` once
/// the process is gone.
fn stat_field(pid: i64, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(n - 3).map(String::from)
}

/// `run` adopts what its jobs leave running (it is a child subreaper): a leftover in
/// a session of its own hangs from the worker rather than from init, is killed after
/// the kill grace as before, and is reaped by the worker at the next job's end, so it
/// does not linger as a zombie.
#[test]
fn a_leftover_is_adopted_by_the_worker_killed_after_the_grace_and_reaped() {
    let env = Env::new();
    let n = unique();
    env.add(&format!(
        "setsid sleep 300.{n} </dev/null >/dev/null 2>&1 & p=$!; \
         until [ \"$(cut -d' ' -f6 /proc/$p/stat)\" = \"$p\" ]; do sleep 0.01; done; \
         echo $p > leftover"
    ));
    let mut worker = env.spawn(&["run", "--kill-grace", "1"]);
    let pid = env.wait_pid("leftover");
    let parent = wait_until("the leftover's parent to be the worker", || {
        stat_field(pid, 4).filter(|p| *p == worker.pid().to_string())
    });
    assert_eq!(parent, worker.pid().to_string());
    wait_until("the leftover killed after the grace", || {
        (stat_field(pid, 3).is_none_or(|s| s == "Z")).then_some(())
    });
    env.add("touch next.done");
    env.wait_file("next.done");
    wait_until("the killed leftover reaped", || {
        stat_field(pid, 3).is_none().then_some(())
    });
    worker.signal("TERM");
    assert!(worker.wait().success());
}
