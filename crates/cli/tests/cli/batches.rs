//! Batches as real processes: `map` against GNU parallel, `wait`'s exit codes and
//! its wake-up from another process, a map-reduce through `BATCHDB_DEPS`, the batch
//! views and `retry --with-dependents`.

use std::process::Command;
use std::time::Duration;

use crate::util::*;

/// Inputs no shell word survives unquoted. (Names with newlines are compared through
/// `parallel -0`: GNU parallel splits a `:::` word at newlines, batchdb keeps it one
/// input.)
const NASTY: [&str; 13] = [
    "plain",
    "two words",
    "it's",
    "say \"hi\"",
    "$HOME and `id`",
    "back\\slash",
    "tab\there",
    "",
    "*.txt",
    "-n",
    "ünï cödé",
    "dir.d/file.tar.gz",
    ".hidden",
];

/// `parallel --dry-run` over `args` (GNU parallel, a Debian package the test
/// command installs).
fn parallel(env: &Env, args: &[&str], stdin: Option<&[u8]>) -> Vec<u8> {
    let mut c = Command::new("parallel");
    // HOME: parallel keeps state in ~/.parallel; --will-cite: no notice.
    c.env("HOME", env.root())
        .args(["--will-cite", "-k", "-j1", "--dry-run"])
        .args(args)
        .current_dir(env.root());
    let out = env.output_within(c, stdin, DEADLINE);
    assert!(out.status.success(), "parallel {args:?}: {out:?}");
    out.stdout
}

#[test]
fn map_dry_run_prints_what_gnu_parallel_prints() {
    let env = Env::new();
    let templates: [&[&str]; 6] = [
        &["echo", "{}"],
        &["echo {.} {/} {//} {/.} {#}"],
        &["cat", "{}", ">", "out-{#}.txt"],
        &["wc", "-c"],
        &["cp {1} {2.}.bak"],
        &["echo {1/} {2//} {1/.} {}"],
    ];
    for t in templates {
        let two = t.iter().any(|w| w.contains("{2"));
        let mut args: Vec<&str> = t.to_vec();
        args.push(":::");
        args.extend(NASTY);
        if two {
            args.extend([":::", "x/y.z", "a b/c d.e"]);
        }
        let mut ours = vec!["map", "--dry-run"];
        ours.extend(&args);
        let out = env.cmd(&ours);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&parallel(&env, &args, None)),
            "template {t:?}"
        );
    }
    // One input per line of a file (or stdin), as `parallel ... :::: FILE`.
    let lines = "a.txt\nwith space.c\n$x\n\nlast";
    std::fs::write(env.file("inputs"), lines).unwrap();
    let ours = env.ok(&["map", "--dry-run", "-f", "inputs", "gzip -k {} && echo {.}"]);
    let theirs = parallel(&env, &["gzip -k {} && echo {.}", "::::", "inputs"], None);
    assert_eq!(ours, String::from_utf8_lossy(&theirs));
    let piped = env.cmd_stdin(&["map", "--dry-run", "echo"], lines.as_bytes());
    let theirs = parallel(&env, &["echo"], Some(lines.as_bytes()));
    assert_eq!(piped.stdout, theirs);
    // Names with newlines: one input each, quoted as parallel quotes them.
    let names = ["new\nline", "a\nb c", "x'\n$y"];
    std::fs::write(env.file("nul"), names.join("\0")).unwrap();
    let mut ours = vec!["map", "--dry-run", "mv {} {.}.bak", ":::"];
    ours.extend(names);
    let theirs = parallel(&env, &["-0", "mv {} {.}.bak", "::::", "nul"], None);
    assert_eq!(env.ok(&ours), String::from_utf8_lossy(&theirs));
    assert!(env.list("pending").is_empty(), "a dry run adds nothing");
}

#[test]
fn map_adds_one_job_per_input_in_one_batch() {
    let env = Env::new();
    let out = env.ok(&[
        "map",
        "--batch",
        "b1",
        "echo {}-{#}",
        ":::",
        "x",
        "y",
        ":::",
        "1",
        "2",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "batch b1");
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines[1..].iter().all(|l| l.starts_with("pushed ")));
    // Cartesian product, first list slowest.
    let payloads: Vec<String> = lines[1..]
        .iter()
        .map(|l| {
            let key = l.split(' ').nth(1).unwrap();
            String::from_utf8(env.get(key)).unwrap()
        })
        .collect();
    assert_eq!(
        payloads,
        ["echo x 1-1", "echo x 2-2", "echo y 1-3", "echo y 2-4"]
    );
    let quiet = env.ok(&["map", "-q", "echo", ":::", "a", "b"]);
    let name = quiet.trim().strip_prefix("batch ").expect("batch line");
    assert!(
        name.starts_with("b-") && quiet.lines().count() == 1,
        "{quiet}"
    );
    let batches: Vec<serde_json::Value> = env
        .ok(&["batches"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0]["batch"], "b1");
    assert_eq!(batches[0]["total"], 4);
    assert_eq!(batches[0]["pending"], 4);
    for key in [
        "created",
        "waiting",
        "running",
        "result",
        "fail",
        "cancelled",
    ] {
        assert!(batches[0].get(key).is_some(), "{key}: {}", batches[0]);
    }
    let status: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "--batch", "b1"])).unwrap();
    assert_eq!(status["pending"], 4);
    assert!(status.get("batch").is_none(), "the status shape: {status}");
    for bad in [
        &["map", "--batch", "no way", "echo", ":::", "a"][..],
        &["status", "--batch", "nope"],
    ] {
        let out = env.cmd(bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1);
    }
}

#[test]
fn wait_exits_0_1_or_2_and_wakes_on_another_process() {
    let env = Env::new();
    env.add_with(&["--batch", "ok"], "echo fine");
    let mut waiter = env.spawn(&["wait", "--batch", "ok"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(waiter.running(), "nothing has run yet");
    env.run_until_empty(&[]);
    assert_eq!(waiter.wait_within(DEADLINE).code(), Some(0));
    assert_eq!(
        waiter.stderr(),
        "",
        "no progress line when stderr is no terminal"
    );
    let forced = env.cmd(&["wait", "--progress", "--batch", "ok"]);
    assert_eq!(forced.status.code(), Some(0));
    let line = String::from_utf8_lossy(&forced.stderr).into_owned();
    assert!(line.contains("1/1 ended, 0 running, 0 failed"), "{line:?}");
    // A failure: exit 1, one FAIL line per failure, dependents included.
    let (bad, created) = env.add_with(&["--batch", "bad"], "exit 3");
    env.add_with(&["--batch", "bad", "--after", &bad], "echo never");
    env.run_until_empty(&[]);
    let out = env.cmd(&["wait", "batch:bad"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let fails: Vec<&str> = stdout.lines().collect();
    assert_eq!(fails.len(), 2, "{stdout}");
    assert_eq!(fails[0], format!("FAIL {bad} {created} exit code 3"));
    assert!(
        fails[1].ends_with(&format!("dependency {bad} {created} failed")),
        "{stdout}"
    );
    // Nothing runs: exit 2 when the timeout passes.
    env.add_with(&["--batch", "slow"], "echo later");
    let out = env.cmd(&["wait", "--batch", "slow", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = env.cmd(&["wait", "--batch", "none"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no instance matches"));
}

#[test]
fn a_map_reduce_of_1000_inputs_reads_every_result_through_batchdb_deps() {
    let env = Env::new();
    let inputs: String = (1..=1000).map(|n| format!("{n}\n")).collect();
    std::fs::write(env.file("nums"), inputs).unwrap();
    env.ok(&[
        "map",
        "-q",
        "--batch",
        "maps",
        "-f",
        "nums",
        "expr {} \\* 2",
    ]);
    let reduce = format!(
        "test \"$(wc -l < \"$BATCHDB_DEPS\")\" -eq 1000 || exit 9\n\
         while read job res; do {bin} --dir {dir} get $res; done < \"$BATCHDB_DEPS\" \
         | awk '{{s += $1}} END {{print s}}'",
        bin = BIN,
        dir = env.db_dir().display()
    );
    let (rkey, _) = env.add_with(&["--batch", "reduce", "--after", "batch:maps"], &reduce);
    let pending = env.list("pending");
    let waiting = pending.iter().filter(|r| r["waiting"] == true).count();
    assert_eq!(waiting, 1, "the reduce waits");
    env.run_until_empty(&["-j", "2"]);
    assert_eq!(
        env.cmd(&["wait", "--batch", "reduce"]).status.code(),
        Some(0)
    );
    let row = &env
        .list("result")
        .into_iter()
        .find(|r| r["key"][0] == rkey.as_str())
        .unwrap();
    let out = env.get(row["value"]["hash"].as_str().unwrap());
    assert_eq!(String::from_utf8_lossy(&out).trim(), "1001000");
}

#[test]
fn retry_with_dependents_runs_the_graph_again() {
    let env = Env::new();
    std::fs::write(env.file("flaky"), "exit 1").unwrap();
    let (up, _) = env.add_with(&["--batch", "g"], "sh flaky");
    env.add_with(&["--batch", "g", "--after", &up], "echo down");
    env.run_until_empty(&[]);
    let cancelled = env.list("cancelled");
    assert_eq!(cancelled.len(), 1);
    std::fs::write(env.file("flaky"), "echo fixed").unwrap();
    let out = env.ok(&["retry", "--with-dependents", &up]);
    assert_eq!(out.lines().count(), 2, "{out}");
    env.run_until_empty(&[]);
    let out = env.cmd(&["wait", "--batch", "g"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the retries stand for the failures: {out:?}"
    );
    assert_eq!(env.list("result").len(), 2);
}
