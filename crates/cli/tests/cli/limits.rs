//! The execution context and its limits, as whole processes: `--cwd`, `--env` and
//! `--env-file` reach the job; `--memory`, `--pids` and `--cpus` enforced through a
//! cgroup per attempt (this machine: cgroup v1 writable, as root) or rlimits
//! (`run --limits rlimit`); the attempt's cgroup removed afterwards; accounting
//! compared with `/usr/bin/time -v`.

use std::path::PathBuf;

use serde_json::Value;

use crate::util::*;

/// Allocates and touches 200 MiB, then burns CPU for a fixed amount of work
/// (about a second).
const HOG: &str = "python3 -c 'b = bytearray(200 << 20)
for i in range(0, len(b), 4096): b[i] = 1
n = 0
for i in range(25_000_000): n += i
print(n)'";

/// `batchdb -v run --until-empty ARGS...`, which must succeed: (stdout, stderr).
fn run_verbose(env: &Env, args: &[&str]) -> (String, String) {
    let mut all = vec!["-v", "run", "--until-empty", "--kill-grace", "1"];
    all.extend_from_slice(args);
    let out = env.cmd(&all);
    assert_success(&out, &all);
    (text(&out.stdout), text(&out.stderr))
}

/// The `batchdb` directories of the cgroup hierarchies the worker's startup line
/// names (`limits: cgroup v1 (DIR, DIR, DIR)`); fails the test if it names none.
fn cgroup_dirs(stderr: &str) -> Vec<PathBuf> {
    let line = stderr
        .lines()
        .find(|l| l.contains("limits: cgroup"))
        .unwrap_or_else(|| panic!("the worker says it uses a cgroup: {stderr}"));
    let inner = line
        .split_once('(')
        .and_then(|(_, r)| r.rsplit_once(')'))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("directories in {line:?}"));
    inner.split(", ").map(PathBuf::from).collect()
}

/// The newest attempt of the instance pushed at `created`.
fn last_attempt(env: &Env, created: i64) -> Value {
    let detail = env.show_json(&created.to_string());
    detail["attempts"]
        .as_array()
        .and_then(|a| a.last())
        .cloned()
        .unwrap_or_else(|| panic!("an attempt: {detail}"))
}

#[test]
fn a_job_past_its_memory_limit_fails_out_of_memory_with_its_output_kept_and_its_cgroup_removed() {
    let env = Env::new();
    // The job shows the groups it runs in (it joined them before its exec) and its
    // attempt id, then allocates past its limit.
    let (_, created) = env.add_with(
        &["--memory", "64M"],
        &format!("echo before; echo $BATCHDB_ATTEMPT_ID; cat /proc/self/cgroup; {HOG}; echo after"),
    );
    let (_, err) = run_verbose(&env, &[]);
    let dirs = cgroup_dirs(&err);
    let fail = env.row("fail", created);
    assert_eq!(
        fail["value"]["message"], "out of memory (limit 64 MiB)",
        "{fail}"
    );
    let out = String::from_utf8(env.get(fail["value"]["stdout"].as_str().expect("stdout kept")))
        .expect("text");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("before"), "{out}");
    let id = lines.next().expect("attempt id").to_string();
    // In each hierarchy, the job ran in <dir>/<attempt id>, and that is gone now.
    for dir in &dirs {
        let controller = if dir.to_string_lossy().contains("/memory") {
            "memory"
        } else if dir.to_string_lossy().contains("/pids") {
            "pids"
        } else {
            "cpu"
        };
        let own = out
            .lines()
            .find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|c| c.split(',').any(|c| c == controller))
            })
            .unwrap_or_else(|| panic!("the job's {controller} group: {out}"));
        assert!(
            own.ends_with(&format!("/batchdb/{id}")),
            "{own} in {}",
            dir.display()
        );
        assert!(
            !dir.join(&id).exists(),
            "{} removed",
            dir.join(&id).display()
        );
    }
    // Its usage reached the limit, and no further.
    let a = last_attempt(&env, created);
    let rss = a["max_rss"].as_u64().expect("max_rss");
    assert!(rss <= 64 << 20, "{a}");
    assert!(rss > 32 << 20, "{a}");
}

#[test]
fn under_rlimit_a_job_past_its_memory_limit_fails_and_cpus_cannot_be_enforced() {
    let env = Env::new();
    let (_, mem) = env.add_with(&["--memory", "64M"], &format!("echo before; {HOG}"));
    let (_, cpus) = env.add_with(&["--cpus", "0.5"], "echo never");
    let (_, fits) = env.add_with(&["--memory", "64M"], "echo fits");
    let (_, err) = run_verbose(&env, &["--limits", "rlimit"]);
    assert!(err.contains("limits: rlimit"), "{err}");
    let fail = env.row("fail", mem);
    let msg = fail["value"]["message"].as_str().expect("message");
    assert_eq!(
        msg,
        "exit code 1; memory limited to 64 MiB (RLIMIT_DATA): an allocation past it fails inside the job",
        "{fail}"
    );
    let out = env.get(fail["value"]["stdout"].as_str().expect("stdout kept"));
    assert_eq!(out, b"before\n");
    let fail = env.row("fail", cpus);
    assert_eq!(
        fail["value"]["message"],
        "limits --cpus 0.5 not enforced: --cpus needs a cgroup and this worker runs with --limits rlimit",
        "{fail}"
    );
    assert_eq!(env.row("result", fits)["value"]["exit_code"], 0);
}

#[test]
fn a_job_with_limits_fails_where_the_worker_enforces_none() {
    let env = Env::new();
    let (_, created) = env.add_with(&["--pids", "20"], "echo never");
    let (_, err) = run_verbose(&env, &["--limits", "none"]);
    assert!(err.contains("limits: none"), "{err}");
    assert_eq!(
        env.row("fail", created)["value"]["message"],
        "limits --pids 20 not enforced: this worker runs with --limits none"
    );
}

#[test]
fn a_fork_bomb_stops_at_its_pids_limit_and_the_worker_runs_the_next_job() {
    let env = Env::new();
    // The job's own shell forks only before the bomb exists (once the bomb holds
    // every pid, a fork of it would fail and end the job with "Cannot fork"): its
    // `sleep`, then one subshell in which the bomb starts. It lets the bomb fork for
    // a second, then reads its own group's peak with builtins only.
    let bomb = "g=$(grep ':pids:' /proc/self/cgroup | cut -d: -f3); \
                sleep 1 & s=$!; f() { f | f & }; (f) & wait $s; \
                read peak < /sys/fs/cgroup/pids$g/pids.peak; echo $peak";
    let (_, created) = env.add_with(&["--pids", "20"], bomb);
    let (_, next) = env.add("echo next");
    let mut worker = env.spawn(&[
        "run",
        "--until-empty",
        "--order",
        "oldest",
        "--kill-grace",
        "1",
    ]);
    let out = worker.wait_ok_within(std::time::Duration::from_secs(120));
    let lines = run_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    let row = env
        .list("result")
        .into_iter()
        .chain(env.list("fail"))
        .find(|r| row_created(r) == created)
        .expect("the bomb ended");
    let hash = row["value"]["hash"]
        .as_str()
        .or(row["value"]["stdout"].as_str())
        .expect("its output");
    let peak: u64 = String::from_utf8(env.get(hash))
        .expect("text")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| {
            // What the job said, to tell a failed fork from a failed read.
            let stderr = row["value"]["stderr"]
                .as_str()
                .map(|h| String::from_utf8_lossy(&env.get(h)).into_owned());
            panic!("pids.peak in {row}; stderr {stderr:?}")
        });
    assert!((2..=20).contains(&peak), "peak {peak}");
    assert_eq!(
        env.get(env.row("result", next)["value"]["hash"].as_str().unwrap()),
        b"next\n"
    );
}

#[test]
fn cwd_env_and_env_file_reach_the_job_and_batchdb_variables_win() {
    let env = Env::new();
    let dir = env.file("work dir");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        env.file("vars"),
        "# a comment\nFROM_FILE=file value\nBOTH=from file\n",
    )
    .unwrap();
    let dir_s = dir.to_str().unwrap();
    let vars = env.file("vars");
    let (_, created) = env.add_with(
        &[
            "--cwd",
            dir_s,
            "--env",
            "GREETING=hello world",
            "--env",
            "BOTH=from option",
            "--env-file",
            vars.to_str().unwrap(),
            "--env",
            "BATCHDB_INSTANCE=forged",
        ],
        "pwd; echo \"$GREETING|$FROM_FILE|$BOTH\"; [ \"$BATCHDB_INSTANCE\" != forged ] && echo real",
    );
    env.run_until_empty(&[]);
    let r = env.row("result", created);
    let out = String::from_utf8(env.get(r["value"]["hash"].as_str().unwrap())).unwrap();
    assert_eq!(
        out,
        format!("{dir_s}\nhello world|file value|from option\nreal\n")
    );
}

#[test]
fn a_missing_cwd_fails_that_attempt_and_the_worker_carries_on() {
    let env = Env::new();
    let (_, missing) = env.add_with(&["--cwd", "/nonexistent/batchdb-test"], "echo never");
    let (_, next) = env.add("echo next");
    let out = env.run_until_empty(&["--order", "oldest"]);
    assert_eq!(run_lines(&out).len(), 2, "{out}");
    assert_eq!(
        env.row("fail", missing)["value"]["message"],
        "cannot enter working directory /nonexistent/batchdb-test: No such file or directory (os error 2)"
    );
    assert_eq!(env.row("result", next)["value"]["exit_code"], 0);
}

/// `(max_rss bytes, cpu ms)` from a `/usr/bin/time -v` report.
fn time_v(report: &str) -> (u64, u64) {
    let field = |name: &str| -> f64 {
        report
            .lines()
            .find_map(|l| l.trim().strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {report}"))
    };
    let kib = field("Maximum resident set size (kbytes):");
    let cpu = field("User time (seconds):") + field("System time (seconds):");
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    ((kib * 1024.0) as u64, (cpu * 1000.0) as u64)
}

fn within_ten_percent(what: &str, got: u64, want: u64) {
    #[allow(clippy::cast_precision_loss)]
    let off = (got as f64 - want as f64).abs() / want as f64;
    assert!(
        off <= 0.10,
        "{what}: {got} vs /usr/bin/time's {want} ({:.1} % off)",
        off * 100.0
    );
}

#[test]
fn accounting_is_within_ten_percent_of_time_v_from_rusage_and_from_the_cgroup() {
    let env = Env::new();
    // The job runs its work under `/usr/bin/time -v` (Debian `time`; scripts/test
    // installs it), whose report goes to the job's stderr: the same run, measured
    // both ways. Without limits the figures come from the main process's rusage;
    // with one, from the attempt's cgroup.
    let job = format!("/usr/bin/time -v {HOG}");
    let (_, plain) = env.add(&job);
    let (_, limited) = env.add_with(&["--memory", "1G"], &job);
    let (_, err) = run_verbose(&env, &[]);
    cgroup_dirs(&err);
    for (path, created) in [("rusage", plain), ("cgroup", limited)] {
        let row = env.row("result", created);
        let v = &row["value"];
        let report = text(&env.get(v["stderr"].as_str().expect("stderr")));
        let (want_rss, want_cpu) = time_v(&report);
        let (rss, cpu) = (
            v["max_rss"].as_u64().expect("max_rss"),
            v["cpu_ms"].as_u64().expect("cpu_ms"),
        );
        within_ten_percent(&format!("{path} max_rss"), rss, want_rss);
        within_ten_percent(&format!("{path} cpu_ms"), cpu, want_cpu);
        let a = last_attempt(&env, created);
        assert_eq!(a["max_rss"], rss, "{a}");
        assert_eq!(a["cpu_ms"], cpu, "{a}");
        let (user, sys) = (
            a["user_ms"].as_u64().unwrap(),
            a["sys_ms"].as_u64().unwrap(),
        );
        assert_eq!(user + sys, cpu, "{a}");
    }
}

#[test]
fn a_process_that_escaped_the_group_and_the_attempt_id_dies_with_the_attempts_cgroup() {
    let env = Env::new();
    // It leaves the process group (setsid) and drops the attempt id (env -i): only
    // the attempt's cgroup still holds it.
    let (_, created) = env.add_with(
        &["--memory", "1G"],
        "echo $BATCHDB_ATTEMPT_ID; setsid env -i sleep 3017.25 </dev/null >/dev/null 2>&1 & sleep 0.2",
    );
    let (_, err) = run_verbose(&env, &[]);
    let dirs = cgroup_dirs(&err);
    let r = env.row("result", created);
    let id = text(&env.get(r["value"]["hash"].as_str().unwrap()))
        .trim()
        .to_string();
    assert_eq!(live_with_cmdline("sleep 3017.25"), Vec::<u32>::new());
    for dir in &dirs {
        assert!(
            !dir.join(&id).exists(),
            "{} removed",
            dir.join(&id).display()
        );
    }
}

#[test]
fn a_job_with_cpus_is_throttled_to_its_share() {
    let env = Env::new();
    // Two seconds of a busy loop: unlimited it takes about two CPU seconds (or
    // whatever a loaded machine gives it); at --cpus 0.2, at most 0.2 s per second.
    let burn = "timeout 2 sh -c 'while :; do :; done'; true";
    let (_, created) = env.add_with(&["--cpus", "0.2"], burn);
    let (_, err) = run_verbose(&env, &[]);
    cgroup_dirs(&err);
    let v = env.row("result", created)["value"].clone();
    let (cpu, wall) = (
        v["cpu_ms"].as_u64().expect("cpu_ms"),
        v["end"].as_i64().unwrap() - v["start"].as_i64().unwrap(),
    );
    assert!(wall >= 2000, "{v}");
    // 0.2 of the wall time, plus one period's slack.
    #[allow(clippy::cast_sign_loss)]
    let most = (wall as u64) / 5 + 100;
    assert!(cpu <= most, "cpu {cpu} ms over {wall} ms of wall time: {v}");
    assert!(cpu >= 200, "it ran: {v}");
}
