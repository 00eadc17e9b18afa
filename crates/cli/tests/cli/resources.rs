//! What a job runs with and what running it takes, as processes: the context options
//! stored and shown, counted resources handed out unit by unit, concurrency keys held
//! across worker processes (by a count the jobs keep), and what no worker could run.

use std::collections::HashSet;

use crate::util::*;

#[test]
fn context_options_are_stored_with_the_instance_and_shown() {
    let env = Env::new();
    std::fs::write(
        env.file("vars"),
        "# settings\nFROM_FILE=1\n\nexport A=file\n",
    )
    .unwrap();
    let mut cmd = env.command(&[
        "add",
        "--cwd",
        ".",
        "--env",
        "A=1",
        "--env",
        "FROM_SHELL",
        "--env-file",
        "vars",
        "--memory",
        "512M",
        "--cpus",
        "1.5",
        "--pids",
        "20",
        "--needs",
        "gpu=1",
        "--needs",
        "mem=2G",
        "--concurrency",
        "api=2",
        "--",
        "true",
    ]);
    cmd.env("FROM_SHELL", "shell value");
    let out = env.output_within(cmd, None, std::time::Duration::from_secs(30));
    assert_success(&out, &["add"]);
    let (_, created) = parse_add_output(&text(&out.stdout));
    let show = env.show_json(&created.to_string());
    let root = env.root().canonicalize().unwrap();
    assert_eq!(show["cwd"], root.to_str().unwrap(), "{show}");
    assert_eq!(
        show["env"],
        serde_json::json!({"A": "1", "FROM_FILE": "1", "FROM_SHELL": "shell value"}),
        "--env wins over the file"
    );
    assert_eq!(
        show["limits"],
        serde_json::json!({"memory": 512 << 20, "millicpus": 1500, "pids": 20})
    );
    assert_eq!(
        show["needs"],
        serde_json::json!({"gpu": 1, "mem": 2u64 << 30})
    );
    assert_eq!(
        show["concurrency"],
        serde_json::json!({"key": "api", "limit": 2})
    );
    // An instance without any of them shows none of them.
    let (_, plain) = env.add("true");
    let show = env.show_json(&plain.to_string());
    for field in ["cwd", "env", "limits", "needs", "concurrency"] {
        assert!(show.get(field).is_none(), "{field} in {show}");
    }
}

#[test]
fn bad_context_options_are_one_line_errors_and_add_nothing() {
    let env = Env::new();
    std::fs::write(env.file("bad.env"), "NOEQUALS\n").unwrap();
    let bad: &[&[&str]] = &[
        &["--memory", "0"],
        &["--memory", "lots"],
        &["--cpus", "0"],
        &["--cpus", "-1"],
        &["--pids", "0"],
        &["--needs", "gpu=0"],
        &["--needs", "gpu"],
        &["--needs", "g/pu=1"],
        &["--needs", "gpu=1", "--needs", "gpu=2"],
        &["--concurrency", "api=0"],
        &["--concurrency", "api"],
        &["--env", "=x"],
        &["--env", "UNSET_IN_THIS_SHELL_X"],
        &["--env-file", "bad.env"],
        &["--env-file", "missing.env"],
    ];
    for opts in bad {
        let mut args = vec!["add"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&["--", "true"]);
        let out = env.cmd(&args);
        assert_one_line_error(&out, &args);
    }
    let bad_run: &[&[&str]] = &[
        &["--resource", "gpu=0,,1"],
        &["--resource", "gpu"],
        &["--resource", "gpu=0", "--resource", "gpu=1"],
        &["--reserve-after", "-1"],
    ];
    for opts in bad_run {
        let mut args = vec!["run", "--until-empty"];
        args.extend_from_slice(opts);
        assert_one_line_error(&env.cmd(&args), &args);
    }
    assert!(env.list("pending").is_empty());
}

#[test]
fn a_worker_gives_each_job_its_own_units_and_the_gpu_variables() {
    let env = Env::new();
    // A unit handed to two jobs at once would make the second mkdir fail.
    let job = "u=$BATCHDB_RESOURCE_GPU; echo \"$u $CUDA_VISIBLE_DEVICES $HIP_VISIBLE_DEVICES\"; \
               for x in $(echo $u | tr , ' '); do mkdir held.$x || exit 9; done; sleep 0.3; \
               for x in $(echo $u | tr , ' '); do rmdir held.$x; done";
    for n in 0..6 {
        env.add_with(&["--needs", "gpu=1"], &format!("{job} # {n}"));
    }
    env.add_with(&["--needs", "gpu=2"], job);
    env.run_until_empty(&["-j", "3", "--resource", "gpu=0,1,2"]);
    let results = env.list("result");
    assert_eq!(results.len(), 7, "{:?}", env.list("fail"));
    let mut pairs = 0;
    for r in &results {
        let out = text(&env.get(r["value"]["hash"].as_str().unwrap()));
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.len(), 3, "{out}");
        assert!(words.iter().all(|w| *w == words[0]), "{out}");
        let units: HashSet<&str> = words[0].split(',').collect();
        assert!(units.iter().all(|u| ["0", "1", "2"].contains(u)), "{out}");
        if units.len() == 2 {
            pairs += 1;
        }
    }
    assert_eq!(pairs, 1, "the job needing two got two units");
}

#[test]
fn concurrency_keys_hold_across_worker_processes_by_a_count_the_jobs_keep() {
    concurrency_key_holds_by_a_count_the_jobs_keep(&Env::new());
}

#[test]
fn status_counts_what_no_live_worker_could_run_and_until_empty_leaves_it() {
    let env = Env::new();
    env.add_with(&["--needs", "gpu=2"], "echo big");
    env.add("echo plain");
    let status: serde_json::Value =
        serde_json::from_str(env.ok(&["status", "--json"]).trim()).unwrap();
    assert_eq!(status["unrunnable"], 1, "{status}");
    // A one-GPU worker runs what it can and exits, leaving the big one pending.
    env.run_until_empty(&["--resource", "gpu=0"]);
    assert_eq!(env.list("result").len(), 1);
    assert_eq!(env.list("pending").len(), 1);
    let line = env.on_terminal("status", None);
    assert!(
        line.contains("1 unrunnable for now"),
        "status on a terminal: {line}"
    );
    env.run_until_empty(&["--resource", "gpu=0,1"]);
    assert_eq!(env.list("result").len(), 2);
    let status: serde_json::Value =
        serde_json::from_str(env.ok(&["status", "--json"]).trim()).unwrap();
    assert!(status.get("unrunnable").is_none(), "{status}");
}

#[test]
fn a_concurrency_slot_of_a_worker_killed_with_sigkill_passes_to_the_takeover() {
    let env = Env::new();
    let (_, first) = env.add_with(
        &["--concurrency", "db=1"],
        &format!(
            "touch started.$BATCHDB_ATTEMPT; {}; echo first",
            wait_file_sh("go")
        ),
    );
    let (_, second) = env.add_with(&["--concurrency", "db=1"], "echo second");
    let mut worker = env.spawn(&["run", "-j", "2", "--lease", "1", "--order", "oldest"]);
    env.wait_file("started.1");
    // The second instance waits for the slot, although the worker has a free one.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let status: serde_json::Value =
        serde_json::from_str(env.ok(&["status", "--json"]).trim()).unwrap();
    assert_eq!(
        (status["running"].as_u64(), status["pending"].as_u64()),
        (Some(1), Some(1)),
        "held to db=1"
    );
    worker.signal("KILL");
    worker.wait();
    env.touch("go");
    env.run_until_empty(&["-j", "2", "--lease", "1", "--order", "oldest"]);
    let a = env.show_json(&first.to_string());
    let b = env.show_json(&second.to_string());
    let outcomes: Vec<&str> = a["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["lost", "result"], "{a}");
    assert_eq!(
        (a["state"].as_str(), b["state"].as_str()),
        (Some("result"), Some("result"))
    );
    // The takeover held the slot: the second started only once the first ended.
    let first_end = a["attempts"][1]["end"].as_i64().unwrap();
    let second_start = b["attempts"][0]["start"].as_i64().unwrap();
    assert!(second_start >= first_end, "{first_end} > {second_start}");
}

#[test]
fn the_working_directory_and_environment_are_part_of_the_cache_key() {
    let env = Env::new();
    std::fs::create_dir(env.file("a")).unwrap();
    std::fs::create_dir(env.file("b")).unwrap();
    let job = "pwd; echo \"$GREETING\"";
    let run = |opts: &[&str]| {
        let mut args = vec!["--cached"];
        args.extend_from_slice(opts);
        env.add_with(&args, job);
        env.run_until_empty(&[]);
    };
    run(&["--cwd", "a", "--env", "GREETING=hi"]);
    run(&["--cwd", "b", "--env", "GREETING=hi"]);
    run(&["--cwd", "a", "--env", "GREETING=hello"]);
    run(&["--cwd", "a", "--env", "GREETING=hi", "--memory", "1G"]);
    let results = env.list("result");
    let cached: Vec<bool> = results
        .iter()
        .map(|r| r["value"]["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(
        cached,
        [false, false, false, true],
        "limits are not in the key"
    );
    let out = |i: usize| text(&env.get(results[i]["value"]["hash"].as_str().unwrap()));
    let root = env.root().canonicalize().unwrap();
    let root = root.to_str().unwrap();
    assert_eq!(out(0), format!("{root}/a\nhi\n"));
    assert_eq!(out(1), format!("{root}/b\nhi\n"));
    assert_eq!(out(2), format!("{root}/a\nhello\n"));
    assert_eq!(out(3), out(0));
}
