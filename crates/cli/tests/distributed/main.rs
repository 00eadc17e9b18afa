//! The distributed mode: worker processes sharing one PostgreSQL database and
//! one S3 bucket (real servers: a throwaway PostgreSQL cluster and a Garage node),
//! standing in for many machines; and workers riding out an outage of either server.
//!
//! A test binary of its own: its 16 worker slots and two servers load the machine, so
//! it must not run beside the CLI suite's timing-sensitive tests (cargo runs test
//! binaries one after another).
#![cfg(all(feature = "postgres", feature = "s3"))]

#[allow(dead_code)]
#[path = "../cli/util.rs"]
mod util;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use batchdb_testkit::garage::{Garage, garage};
use batchdb_testkit::postgres::{Postgres, shared};
use serde_json::Value;

use util::*;

/// An `Env` whose commands use `db` and a fresh prefix of Garage server `g`.
fn env_on(db: String, g: &Garage) -> Env {
    let vars = g
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Env::distributed(db, g.url(&Garage::fresh_prefix()), vars)
}

/// `sh -c SCRIPT` in the env's working directory, with `$BATCHDB` naming the binary
/// and the env's backends in `BATCHDB_*`/`AWS_*`, so the script's `"$BATCHDB" add`
/// reaches the same database.
fn shell(env: &Env, script: &str) -> Command {
    let probe = env.command(&[]);
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).current_dir(env.root());
    c.env("BATCHDB", BIN);
    let args: Vec<String> = probe
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    for pair in args.chunks(2) {
        if let [flag, value] = pair {
            let var = match flag.as_str() {
                "--dir" => "BATCHDB_DIR",
                "--db" => "BATCHDB_DB",
                "--blobs" => "BATCHDB_BLOBS",
                _ => continue,
            };
            c.env(var, value);
        }
    }
    for (k, v) in probe.get_envs() {
        if let Some(v) = v {
            c.env(k, v);
        }
    }
    c
}

/// Adds `echo job-I` for I in `from..=to`, one `batchdb add` process each.
fn adder(env: &Env, from: u32, to: u32) -> Proc {
    env.start(
        shell(
            env,
            &format!(
                "for i in $(seq {from} {to}); do \
                   \"$BATCHDB\" add -- \"echo job-$i\" > /dev/null || exit 1; \
                 done"
            ),
        ),
        None,
    )
}

fn counts(env: &Env) -> HashMap<String, u64> {
    let out = env.ok(&["status"]);
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    v.as_object()
        .expect("status --json is an object")
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .collect()
}

/// Waits up to `limit` for `f` to hold (a bound for a broken build, not a speed test).
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "gave up after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to `limit`) until every instance has ended and there are `total`.
fn wait_drained(env: &Env, total: u64, limit: Duration) -> HashMap<String, u64> {
    let deadline = Instant::now() + limit;
    loop {
        let c = counts(env);
        let ended = c.get("result").copied().unwrap_or(0)
            + c.get("fail").copied().unwrap_or(0)
            + c.get("cancelled").copied().unwrap_or(0);
        if ended == total && c.get("pending") == Some(&0) && c.get("running") == Some(&0) {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "not drained after {limit:?}: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Every instance ended in exactly one terminal event and one result row; every blob
/// any row names is readable and intact; and a sample of results, read back as a user
/// would, is what `expect` says the payload prints.
fn assert_each_ran_once(env: &Env, total: usize, expect: impl Fn(&str) -> Vec<u8>) {
    let results = env.list("result");
    assert_eq!(results.len(), total, "one result row per instance");
    assert!(env.list("fail").is_empty(), "no failures");
    let mut terminal: HashMap<i64, usize> = HashMap::new();
    for ev in json_lines(&env.ok(&["events"])) {
        if matches!(ev["event"].as_str(), Some("result" | "fail" | "cancel")) {
            *terminal
                .entry(ev["instance"].as_i64().expect("instance id"))
                .or_default() += 1;
        }
    }
    assert_eq!(terminal.len(), total, "a terminal event for every instance");
    let twice: Vec<_> = terminal.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "instances ended more than once: {twice:?}"
    );
    // `verify` streams every blob any row names and checks its hash.
    let out = env.cmd(&["verify"]);
    assert_success(&out, &["verify"]);
    for r in results.iter().step_by(97) {
        let payload = text(&env.get(r["key"][0].as_str().expect("job key")));
        let got = env.get(r["value"]["hash"].as_str().expect("result id"));
        let want = expect(&payload);
        // Compare digests: outputs may be megabytes.
        assert_eq!(
            (got.len(), sha256(&got)),
            (want.len(), sha256(&want)),
            "the output of {payload:.60}"
        );
    }
}

/// What `echo job-N` (after anything before a `;`) prints.
fn echoed(payload: &str) -> Vec<u8> {
    let word = payload.rsplit("echo ").next().unwrap_or_default();
    format!("{word}\n").into_bytes()
}

#[test]
fn four_workers_on_postgres_and_s3_drain_2000_jobs_while_another_process_adds() {
    let env = env_on(shared().create_database(), garage());
    // The first 1000 jobs, added by four processes at once.
    let mut first: Vec<Proc> = (0..4)
        .map(|k| adder(&env, k * 250 + 1, k * 250 + 250))
        .collect();
    for p in &mut first {
        p.wait_ok_within(Duration::from_secs(300));
    }
    // Four workers ("machines"), four slots each; a fifth process keeps adding.
    let mut workers: Vec<Proc> = (0..4)
        .map(|_| env.spawn(&["run", "-j", "4", "--lease", "3"]))
        .collect();
    let mut more = adder(&env, 1001, 2000);
    // Kill one worker with -9 mid-run: its claimed jobs are taken over.
    wait_for(Duration::from_secs(300), "a few hundred results", || {
        counts(&env).get("result").copied().unwrap_or(0) >= 300
    });
    workers[0].signal("KILL");
    workers[0].wait();
    more.wait_ok_within(Duration::from_secs(300));
    let c = wait_drained(&env, 2000, Duration::from_secs(300));
    assert_eq!(c.get("result"), Some(&2000), "{c:?}");
    for w in &mut workers[1..] {
        assert!(w.running(), "a surviving worker exited: {}", w.stderr());
        w.signal("TERM");
        w.wait_within(Duration::from_secs(30));
    }
    assert_each_ran_once(&env, 2000, echoed);
}

/// Concurrency keys on PostgreSQL + S3, across worker processes racing for claims:
/// the jobs themselves count how many run at once.
#[test]
fn concurrency_keys_hold_across_worker_processes_on_postgres_by_a_count_the_jobs_keep() {
    concurrency_key_holds_by_a_count_the_jobs_keep(&env_on(shared().create_database(), garage()));
}

#[test]
fn a_worker_rides_out_a_postgres_restart_mid_run() {
    let pg = Postgres::start_new(false);
    let env = env_on(pg.url("postgres"), garage());
    for i in 0..30 {
        env.ok(&["add", "--", &format!("sleep 0.2; echo job-{i}")]);
    }
    let mut worker = env.spawn(&["run", "-j", "2", "--lease", "10"]);
    wait_for(Duration::from_secs(120), "the first results", || {
        counts(&env).get("result").copied().unwrap_or(0) >= 4
    });
    // Cut every connection mid-run: jobs are running, claims and finishes in flight.
    pg.stop();
    std::thread::sleep(Duration::from_secs(3));
    pg.start();
    let c = wait_drained(&env, 30, Duration::from_secs(120));
    assert_eq!(c.get("result"), Some(&30), "{c:?}");
    assert!(worker.running(), "the worker exited: {}", worker.stderr());
    worker.signal("TERM");
    worker.wait_within(Duration::from_secs(30));
    let log = worker.stderr();
    assert!(
        log.contains("retrying") || log.contains("reconnecting"),
        "the worker says it lost the database: {log}"
    );
    assert_each_ran_once(&env, 30, echoed);
}

/// The longest backoff `log` says the worker is waiting, in seconds.
fn longest_backoff(log: &str) -> f64 {
    log.lines()
        .filter_map(|l| l.split("retrying in ").nth(1))
        .filter_map(|d| {
            let d = d.trim();
            match d.strip_suffix("ms") {
                Some(ms) => ms.parse::<f64>().ok().map(|v| v / 1000.0),
                None => d.strip_suffix('s')?.parse().ok(),
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn sigterm_stops_an_idle_worker_at_once_while_postgres_is_down() {
    let pg = Postgres::start_new(false);
    let env = env_on(pg.url("postgres"), garage());
    env.ok(&["status"]);
    let mut worker = env.spawn(&["run"]);
    std::thread::sleep(Duration::from_millis(500));
    pg.stop();
    // Until its claims back off for seconds at a time.
    wait_for(Duration::from_secs(120), "a long backoff", || {
        longest_backoff(&worker.stderr()) >= 4.0
    });
    let asked = Instant::now();
    worker.signal("TERM");
    let status = worker.wait_within(Duration::from_secs(30));
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}: {}", worker.stderr());
    // A bound, not a speed: before the fix it slept out the whole backoff.
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} with nothing running: {}",
        worker.stderr()
    );
}

#[test]
fn a_worker_rides_out_an_s3_outage_mid_upload() {
    let g = Garage::start_new();
    let env = env_on(shared().create_database(), &g);
    // Each job streams 24 MiB, slowly, so that the store goes away mid-upload.
    let payload =
        "i=0; while [ $i -lt 24 ]; do head -c 1048576 /dev/zero; sleep 0.1; i=$((i+1)); done";
    for k in 0..3 {
        env.ok(&["add", "--", &format!("echo {k}; {payload}")]);
    }
    let mut worker = env.spawn(&["run", "-j", "3", "--lease", "10"]);
    wait_for(Duration::from_secs(120), "the jobs to be running", || {
        counts(&env).get("running").copied().unwrap_or(0) == 3
    });
    std::thread::sleep(Duration::from_millis(800));
    g.stop();
    std::thread::sleep(Duration::from_secs(3));
    g.start();
    let c = wait_drained(&env, 3, Duration::from_secs(180));
    assert!(worker.running(), "the worker exited: {}", worker.stderr());
    worker.signal("TERM");
    worker.wait_within(Duration::from_secs(30));
    // Each instance ended once; an attempt that could not store its output is not
    // a failure of the job: it ran again, and every instance has its result.
    assert_eq!(c.get("result"), Some(&3), "{c:?}: {}", worker.stderr());
    assert_each_ran_once(&env, 3, |payload| {
        let k = payload
            .split(';')
            .next()
            .unwrap_or_default()
            .trim_start_matches("echo ");
        let mut out = format!("{k}\n").into_bytes();
        out.resize(out.len() + 24 * 1048576, 0);
        out
    });
}

/// `batchdb serve --listen ADDR` on the env's backends; waits for its listening line
/// and returns the process and the address it listens on.
fn serve_on(env: &Env, addr: &str) -> (Proc, String) {
    let mut cmd = env.command(&["serve", "--listen", addr]);
    cmd.env_remove("BATCHDB_TOKEN");
    let mut p = env.start(cmd, None);
    let out = p.wait_stdout("/\n");
    let at = out
        .lines()
        .find_map(|l| l.strip_prefix("listening on http://"))
        .map(|u| u.trim_end_matches('/').to_string())
        .unwrap_or_else(|| panic!("no listening line in {out:?}"));
    (p, at)
}

/// `batchdb run --server http://ADDR ARGS...` with no database, bucket or directory
/// of its own (none of the env's variables reach it).
fn remote_worker(env: &Env, addr: &str, args: &[&str]) -> Proc {
    let mut c = Command::new(BIN);
    for k in [
        "BATCHDB_DIR",
        "BATCHDB_DB",
        "BATCHDB_BLOBS",
        "BATCHDB_TOKEN",
    ] {
        c.env_remove(k);
    }
    for k in [
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ALLOW_HTTP",
    ] {
        c.env_remove(k);
    }
    c.current_dir(env.root())
        .args(["run", "--server", &format!("http://{addr}")])
        .args(args);
    env.start(c, None)
}

#[test]
fn two_servers_on_postgres_and_s3_serve_remote_workers_and_one_comes_back_after_kill_9() {
    let env = env_on(shared().create_database(), garage());
    let lines: String = (1..=300).map(|i| format!("echo job-{i}\n")).collect();
    let out = env.cmd_stdin(&["add", "--lines", "-q"], lines.as_bytes());
    assert_success(&out, &["add", "--lines"]);
    let (mut one, one_at) = serve_on(&env, "127.0.0.1:0");
    let (_two, two_at) = serve_on(&env, "127.0.0.1:0");
    let mut a = remote_worker(&env, &one_at, &["-j", "2", "--lease", "5", "--until-empty"]);
    let mut b = remote_worker(&env, &two_at, &["-j", "2", "--lease", "5", "--until-empty"]);
    wait_for(Duration::from_secs(300), "a hundred results", || {
        counts(&env).get("result").copied().unwrap_or(0) >= 100
    });
    // The first server dies; its worker keeps retrying the URL and carries on once a
    // server answers there again.
    one.signal("KILL");
    one.wait();
    std::thread::sleep(Duration::from_secs(1));
    let (_one_again, _) = serve_on(&env, &one_at);
    let out_a = a.wait_ok_within(Duration::from_secs(300));
    let out_b = b.wait_ok_within(Duration::from_secs(300));
    let (na, nb) = (run_lines(&out_a).len(), run_lines(&out_b).len());
    assert!(na > 0 && nb > 0, "both workers worked: {na}, {nb}");
    let c = wait_drained(&env, 300, Duration::from_secs(60));
    assert_eq!(c.get("result"), Some(&300), "{c:?}");
    assert_each_ran_once(&env, 300, echoed);
}
