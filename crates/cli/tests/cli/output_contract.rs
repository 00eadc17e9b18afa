//! The output contract: exact output of add / create / push, the JSON shapes of
//! `list`, the lines of `run`, `get`, and the queue order.

use crate::util::*;

/// `printf 'sleep 5; date' | sha256sum`: the seed's job key.
const SEED_KEY: &str = "ce6cc4e7fcb4a902f7c836cb93a32ae02cb47679c86e3d99c811233bf6f258c0";

#[test]
fn add_prints_created_then_pushed_with_the_seed_key() {
    let env = Env::new();
    let before = now_ms();
    // Words are joined by single spaces: these three make the seed's payload.
    let out = env.cmd(&["add", "sleep", "5;", "date"]);
    let after = now_ms();
    assert_success(&out, &["add"]);
    assert!(
        out.stderr.is_empty(),
        "add writes nothing on stderr: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let (key, created) = parse_add_output(&stdout);
    assert_eq!(key, SEED_KEY);
    assert_eq!(
        stdout,
        format!("created {SEED_KEY}\npushed {SEED_KEY} {created}\n")
    );
    assert!(
        (before..=after).contains(&created),
        "created is the push time in epoch ms: {before} <= {created} <= {after}"
    );
    // The payload is stored as a blob under its key.
    assert_eq!(env.get(SEED_KEY), b"sleep 5; date");
}

#[test]
fn add_reads_the_payload_from_a_file_and_from_stdin() {
    let env = Env::new();
    std::fs::write(env.file("seed.sh"), b"sleep 5; date").unwrap();
    let from_file = env.ok(&["add", "-f", "seed.sh"]);
    assert_eq!(parse_add_output(&from_file).0, SEED_KEY);
    let from_stdin = env.cmd_stdin(&["add"], b"sleep 5; date");
    assert_success(&from_stdin, &["add"]);
    assert_eq!(parse_add_output(&text(&from_stdin.stdout)).0, SEED_KEY);

    // Any bytes, not only text; the key is their sha256 and `get` returns them intact.
    let binary: Vec<u8> = (0..=255u8).chain(b"\n\0\r\n".iter().copied()).collect();
    std::fs::write(env.file("binary.bin"), &binary).unwrap();
    let (key, _) = parse_add_output(&env.ok(&["add", "--file", "binary.bin"]));
    assert_eq!(key, sha256(&binary));
    assert_eq!(env.get(&key), binary);

    // Same payload three times: one job, three pending instances.
    assert_eq!(
        env.list("job")
            .iter()
            .filter(|j| j["key"] == SEED_KEY)
            .count(),
        1
    );
    assert_eq!(
        env.list("pending")
            .iter()
            .filter(|p| p["job"] == SEED_KEY)
            .count(),
        2
    );
}

#[test]
fn add_quiet_prints_only_the_key() {
    let env = Env::new();
    assert_eq!(
        env.ok(&["add", "-q", "sleep 5; date"]),
        format!("{SEED_KEY}\n")
    );
    assert_eq!(
        env.ok(&["add", "--quiet", "echo", "hi"]),
        format!("{}\n", sha256(b"echo hi"))
    );
    assert_eq!(env.list("pending").len(), 2, "-q still pushes");
}

#[test]
fn create_stores_a_job_and_push_queues_it() {
    let env = Env::new();
    assert_eq!(
        env.ok(&["create", "sleep 5; date"]),
        format!("created {SEED_KEY}\n")
    );
    assert!(env.list("pending").is_empty(), "create does not push");
    let jobs = env.list("job");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["key"], SEED_KEY);
    assert_eq!(jobs[0]["running"], serde_json::json!([]));

    let created = env.push(SEED_KEY);
    let pending = env.list("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["job"], SEED_KEY);
    assert_eq!(pending[0]["created"], created);
}

#[test]
fn create_reads_a_file_and_stdin_too() {
    let env = Env::new();
    std::fs::write(env.file("p"), b"sleep 5; date").unwrap();
    assert_eq!(
        env.ok(&["create", "-f", "p"]),
        format!("created {SEED_KEY}\n")
    );
    let out = env.cmd_stdin(&["create"], b"echo from stdin");
    assert_success(&out, &["create"]);
    assert_eq!(
        text(&out.stdout),
        format!("created {}\n", sha256(b"echo from stdin"))
    );
    assert_eq!(env.list("job").len(), 2);
}

#[test]
fn list_rows_have_the_seed_shapes() {
    let env = Env::new();
    let (ok_key, ok_created) = env.add("echo ok");
    let (bad_key, bad_created) = env.add("echo partial; exit 4");
    let (wait_key, wait_created) = env.add("true");

    // pending: {"job","created","running"}
    let pending = env.list("pending");
    assert_eq!(pending.len(), 3);
    for (row, (key, created)) in pending.iter().zip([
        (&ok_key, ok_created),
        (&bad_key, bad_created),
        (&wait_key, wait_created),
    ]) {
        assert_eq!(row["job"], **key, "{row}");
        assert_eq!(row["created"], created, "{row}");
        assert_eq!(row["running"], false, "{row}");
    }
    // job: {"key","running":[...]}
    let jobs = env.list("job");
    assert_eq!(jobs.len(), 3);
    for j in &jobs {
        assert_hash(j["key"].as_str().expect("key is a string"));
        assert_eq!(j["running"], serde_json::json!([]), "{j}");
    }

    env.run_until_empty(&[]);
    assert!(env.list("pending").is_empty());

    // result: {"key":[job,created],"value":{"hash","start","end","created",...}}
    let results = env.list("result");
    assert_eq!(results.len(), 2);
    let r = env.row("result", ok_created);
    assert_eq!(r["key"], serde_json::json!([ok_key, ok_created]));
    let v = &r["value"];
    assert_eq!(v["hash"], sha256(b"ok\n"));
    assert_eq!(v["created"], ok_created);
    let (start, end) = (v["start"].as_i64().unwrap(), v["end"].as_i64().unwrap());
    assert!(
        ok_created <= start && start <= end,
        "created <= start <= end: {r}"
    );

    // fail: {"key":[job,created],"value":{"message",...}}
    let fails = env.list("fail");
    assert_eq!(fails.len(), 1);
    let f = &fails[0];
    assert_eq!(f["key"], serde_json::json!([bad_key, bad_created]));
    let msg = f["value"]["message"].as_str().expect("message is a string");
    assert!(!msg.is_empty(), "{f}");
    // The output produced before the failure is kept.
    let stdout = f["value"]["stdout"]
        .as_str()
        .expect("fail row keeps stdout");
    assert_eq!(env.get(stdout), b"partial\n");
    assert_eq!(f["value"]["exit_code"], 4, "{f}");
}

#[test]
fn run_prints_result_and_fail_lines() {
    let env = Env::new();
    let (ok_key, _) = env.add("echo hello");
    let (bad_key, bad_created) = env.add("exit 3");
    let out = env.run_until_empty(&["--order", "oldest"]);
    let lines = run_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(
        lines[0],
        RunLine::Result {
            job: ok_key,
            hash: sha256(b"hello\n")
        },
        "the result id is the sha256 of stdout"
    );
    match &lines[1] {
        RunLine::Fail {
            job,
            created,
            message,
        } => {
            assert_eq!((job, *created), (&bad_key, bad_created));
            assert!(!message.is_empty() && !message.contains('\n'), "{out}");
        }
        other => panic!("expected a FAIL line, got {other:?}"),
    }
}

#[test]
fn run_print_writes_each_result_after_its_line() {
    let env = Env::new();
    let (k1, _) = env.add("echo one");
    let (k2, _) = env.add("printf 'two\\nlines\\n'");
    let out = env.run_until_empty(&["--print", "--order", "oldest"]);
    assert_eq!(
        out,
        format!(
            "RESULT {k1} {}\none\nRESULT {k2} {}\ntwo\nlines\n",
            sha256(b"one\n"),
            sha256(b"two\nlines\n")
        )
    );
}

#[test]
fn get_writes_result_bytes_exactly() {
    let env = Env::new();
    // Binary output, no trailing newline.
    let (key, _) = env.add("printf '\\000\\001\\377bin'");
    let lines = run_lines(&env.run_until_empty(&[]));
    let hash = results_for(&lines, &key).pop().expect("a RESULT line");
    let bytes = env.get(&hash);
    assert_eq!(bytes, b"\x00\x01\xffbin");
    assert_eq!(sha256(&bytes), hash);
    // Empty output is a blob too.
    let (empty, _) = env.add("true");
    let lines = run_lines(&env.run_until_empty(&[]));
    let hash = results_for(&lines, &empty).pop().expect("a RESULT line");
    assert_eq!(hash, sha256(b""));
    assert_eq!(env.get(&hash), b"");
}

/// The RESULT lines' jobs, in order, mapped back to the payload labels.
fn result_order(out: &str, jobs: &[(&str, String)]) -> Vec<String> {
    run_lines(out)
        .into_iter()
        .map(|l| match l {
            RunLine::Result { job, .. } => jobs
                .iter()
                .find(|(_, k)| *k == job)
                .map(|(label, _)| label.to_string())
                .expect("a known job"),
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[test]
fn run_order_is_newest_first_by_default_and_oldest_on_request() {
    for (order, expected) in [
        (None, ["3", "2", "1"]),
        (Some("newest"), ["3", "2", "1"]),
        (Some("oldest"), ["1", "2", "3"]),
    ] {
        let env = Env::new();
        let jobs: Vec<(&str, String)> = ["1", "2", "3"]
            .into_iter()
            .map(|n| (n, env.add(&format!("echo {n}")).0))
            .collect();
        let mut args = vec!["-j", "1"];
        if let Some(o) = order {
            args.extend_from_slice(&["--order", o]);
        }
        let out = env.run_until_empty(&args);
        assert_eq!(result_order(&out, &jobs), expected, "order {order:?}");
    }
}

#[test]
fn db_and_blobs_options_and_batchdb_dir_env() {
    let env = Env::new();
    // BATCHDB_DIR stands in for --dir.
    let out = env
        .bare_command()
        .env("BATCHDB_DIR", env.file("from-env"))
        .args(["add", "-q", "echo env"])
        .output()
        .unwrap();
    assert_success(&out, &["add (BATCHDB_DIR)"]);
    assert!(env.file("from-env/batchdb.sqlite").exists());
    // --db and --blobs override the two stores inside --dir separately.
    let split = ["--db", "meta/q.sqlite", "--blobs", "store"];
    // Larger than what is kept inline in the database, so it is a blob file.
    std::fs::write(
        env.file("big"),
        format!("echo split #{}", "x".repeat(20_000)),
    )
    .unwrap();
    let key = env.ok(&[&split[..], &["add", "-q", "-f", "big"]].concat());
    let key = key.trim();
    assert!(env.file("meta/q.sqlite").exists());
    assert!(
        env.file(&format!("store/{}/{}/{key}", &key[..2], &key[2..4]))
            .exists()
    );
    assert!(!env.db_dir().join("batchdb.sqlite").exists());
    let listed = env.ok(&[&split[..], &["list", "pending"]].concat());
    assert_eq!(json_lines(&listed)[0]["job"], key);
}

#[test]
fn add_lines_adds_one_job_per_line_in_bulk() {
    let env = Env::new();
    let input: String = (0..2500).map(|i| format!("echo line {i}\n")).collect();
    // Blank lines are skipped; a last line without a newline still counts.
    let input = format!("{input}\n\necho last");
    let out = env.cmd_stdin(&["add", "--lines"], input.as_bytes());
    assert_success(&out, &["add", "--lines"]);
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2 * 2501, "created + pushed per job");
    for (pair, i) in lines.chunks(2).zip(0..) {
        let payload = if i < 2500 {
            format!("echo line {i}")
        } else {
            "echo last".to_string()
        };
        let key = sha256(payload.as_bytes());
        assert_eq!(pair[0], format!("created {key}"));
        parse_pushed(pair[1], &key);
    }
    assert_eq!(env.list("pending").len(), 2501);
    let out = env.run_until_empty(&["-j", "2"]);
    assert_eq!(run_lines(&out).len(), 2501);
    let key = sha256(b"echo line 1234");
    assert_eq!(
        text(&env.get(&key)),
        "echo line 1234",
        "the payload reads back"
    );
    let results = env.list("result");
    let r = results
        .iter()
        .find(|r| r["key"][0] == key.as_str())
        .expect("a result for line 1234");
    assert_eq!(
        text(&env.get(r["value"]["hash"].as_str().unwrap())),
        "line 1234\n"
    );
}
