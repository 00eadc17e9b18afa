//! `prune` and `--prune-after`: ended instances older than a cutoff go, with what
//! only they used; `gc` then reclaims their blobs; nothing else is touched.

use serde_json::Value;

use crate::util::*;

fn prune(env: &Env, args: &[&str]) -> Value {
    let mut all = vec!["prune"];
    all.extend_from_slice(args);
    let out = env.ok(&all);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    serde_json::from_str(lines[0]).expect("one JSON line")
}

#[test]
fn prune_removes_old_ended_instances_and_gc_then_reclaims_their_blobs() {
    let env = Env::new();
    // A large payload and a large output: both blobs in the store, not inline.
    let big_payload = format!("head -c 100000 /dev/zero # {}", "x".repeat(20_000));
    let (big, _) = env.add(&big_payload);
    let (bad, _) = env.add("echo no; exit 3");
    env.add("echo small");
    env.run_until_empty(&[]);
    let (kept, _) = env.add("echo still pending");
    assert_eq!(env.list("result").len(), 2);
    let big_out = env.show_json(&big)["attempts"][0]["stdout"]["hash"]
        .as_str()
        .expect("a stdout blob")
        .to_string();

    // Nothing ended an hour ago.
    assert_eq!(prune(&env, &["--older-than", "1h"])["instances"], 0);
    // A dry run counts and removes nothing.
    let dry = prune(&env, &["--older-than", "0s", "--dry-run"]);
    assert_eq!(
        (dry["dry_run"].as_bool(), dry["instances"].as_u64()),
        (Some(true), Some(3))
    );
    assert_eq!(env.list("result").len(), 2);
    // Failures only.
    let c = prune(&env, &["--older-than", "0s", "--state", "fail"]);
    assert_eq!(
        (c["instances"].as_u64(), c["jobs"].as_u64()),
        (Some(1), Some(1)),
        "{c}"
    );
    assert!(env.list("fail").is_empty());
    assert!(
        !env.cmd(&["show", &bad]).status.success(),
        "its job is gone"
    );
    // The rest.
    let c = prune(&env, &["--older-than", "0s"]);
    assert_eq!(c["instances"], 2, "{c}");
    assert!(env.list("result").is_empty());
    assert_eq!(env.list("pending").len(), 1, "the pending instance stays");
    assert_eq!(env.list("job").len(), 1);
    assert_eq!(env.list("job")[0]["key"], kept.as_str());
    // gc now reclaims the payload and output blobs nothing names any more.
    let gc = env.ok(&["gc", "--grace", "0"]);
    assert!(gc.contains(&big_out), "{gc}");
    assert!(gc.contains(&big), "{gc}");
    let out = env.cmd(&["verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What the log says about them is gone too.
    let events = env.ok(&["events"]);
    assert!(!events.contains(&big) && !events.contains(&bad), "{events}");
    assert!(events.contains(&kept));
}

#[test]
fn prune_rejects_bad_durations_and_states_in_one_line() {
    let env = Env::new();
    env.add("echo hi");
    for args in [
        &["prune", "--older-than", "soon"][..],
        &["prune", "--older-than", "1d", "--state", "running"],
        &["run", "--prune-after=-5m"],
        &["serve", "--prune-after", "x"],
    ] {
        let out = env.cmd(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(env.list("pending").len(), 1);
}

#[test]
fn serve_with_prune_after_removes_what_ended_long_enough_ago() {
    let env = Env::new();
    env.add("echo old");
    env.run_until_empty(&[]);
    let (young, _) = env.add("echo young");
    let mut cmd = env.command(&["serve", "--listen", "127.0.0.1:0", "--prune-after", "2s"]);
    cmd.env_remove("BATCHDB_TOKEN");
    let mut server = env.start(cmd, None);
    server.wait_stdout("/\n");
    wait_until("the old result to be pruned", || {
        env.list("result").is_empty().then_some(())
    });
    assert_eq!(env.list("pending").len(), 1, "the young instance stays");
    assert_eq!(env.show_json(&young)["state"], "pending");
    server.signal("TERM");
    assert!(server.wait().success());
}
