//! The live progress line of `add --lines`, `map`, `run` and `wait`: drawn on stderr
//! when it is a terminal (a real pseudo-terminal, through util-linux's `script`),
//! never otherwise, and `--progress` / `--no-progress` override the detection. What
//! goes to stdout is the same either way.

use crate::util::*;

/// Forty `echo` jobs, one per line of `in.txt`.
fn forty_lines(env: &Env) {
    let lines: String = (1..=40).map(|i| format!("echo {i}\n")).collect();
    std::fs::write(env.file("in.txt"), lines).expect("write in.txt");
}

#[test]
fn the_progress_line_is_drawn_on_a_terminal_and_stdout_is_unchanged() {
    let env = Env::new();
    forty_lines(&env);
    let shown = env.on_terminal("add --lines -q -f in.txt", Some("add.out"));
    assert!(
        shown.contains("40 added"),
        "add --lines on a terminal showed: {shown:?}"
    );
    let size = std::fs::metadata(env.file("in.txt")).expect("in.txt").len();
    assert!(
        shown.contains(&format!("{size} B/{size} B read")),
        "{shown:?}"
    );
    assert_eq!(env.read("add.out").lines().count(), 40);

    let shown = env.on_terminal("map -q --batch b 'echo {}' ::: x y z", Some("map.out"));
    assert!(
        shown.contains("3/3 added"),
        "map on a terminal showed: {shown:?}"
    );
    assert_eq!(env.read("map.out"), "batch b\n");

    let shown = env.on_terminal("run -j 2 --until-empty", Some("run.out"));
    assert!(
        shown.contains("43/43 done, 0 running, 0 failed"),
        "run showed: {shown:?}"
    );
    let results = env.read("run.out");
    assert_eq!(results.lines().count(), 43, "{results}");
    assert!(
        results.lines().all(|l| l.starts_with("RESULT ")),
        "{results}"
    );

    let shown = env.on_terminal("wait --batch b", Some("wait.out"));
    assert!(
        shown.contains("3/3 ended, 0 running, 0 failed"),
        "wait showed: {shown:?}"
    );
    assert_eq!(env.read("wait.out"), "");
}

#[test]
fn the_progress_line_shares_a_terminal_with_stdout_without_losing_a_line() {
    let env = Env::new();
    forty_lines(&env);
    env.ok(&["add", "--lines", "-q", "-f", "in.txt"]);
    let shown = env.on_terminal("run -j 2 --until-empty", None);
    assert!(shown.contains("40/40 done"), "{shown:?}");
    let results = shown.matches("RESULT ").count();
    assert_eq!(
        results, 40,
        "every RESULT line reaches the terminal: {shown:?}"
    );
}

#[test]
fn the_progress_line_is_never_drawn_when_stderr_is_not_a_terminal() {
    let env = Env::new();
    forty_lines(&env);
    let quiet = |args: &[&str]| {
        let out = env.cmd(args);
        assert_success(&out, args);
        assert_eq!(text(&out.stderr), "", "batchdb {args:?} wrote to stderr");
        text(&out.stdout)
    };
    assert_eq!(
        quiet(&["add", "--lines", "-q", "-f", "in.txt"])
            .lines()
            .count(),
        40
    );
    assert_eq!(
        quiet(&["map", "-q", "--batch", "b", "echo {}", ":::", "x"]),
        "batch b\n"
    );
    assert_eq!(quiet(&["run", "--until-empty"]).lines().count(), 41);
    assert_eq!(quiet(&["wait", "--batch", "b"]), "");

    // --no-progress wins over a terminal.
    env.ok(&["add", "--lines", "-q", "-f", "in.txt", "--priority", "1"]);
    let shown = env.on_terminal("run --until-empty --no-progress", Some("run.out"));
    assert_eq!(shown, "", "run --no-progress on a terminal drew: {shown:?}");
}

#[test]
fn the_progress_flag_draws_the_line_where_stderr_is_not_a_terminal() {
    let env = Env::new();
    forty_lines(&env);
    let out = env.cmd(&["add", "--lines", "-q", "-f", "in.txt", "--progress"]);
    assert_success(&out, &["add"]);
    assert!(
        text(&out.stderr).contains("40 added"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).lines().count(), 40);
    let out = env.cmd(&["run", "--until-empty", "--progress"]);
    assert!(
        text(&out.stderr).contains("40/40 done"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout).lines().count(), 40);
}
