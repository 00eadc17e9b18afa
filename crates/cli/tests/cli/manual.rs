//! Shell completions, manual pages and `--help`, all generated from the one clap
//! definition of the command line: they list exactly the commands and options that
//! parse, and none of them needs a database.

use std::process::Command;

use crate::util::*;

/// What bash offers for `WORDS...` (the last word being completed) with the
/// completion script `batchdb completions bash` prints.
fn bash_completes(env: &Env, words: &[&str]) -> Vec<String> {
    let script = env.ok(&["completions", "bash"]);
    std::fs::write(env.file("batchdb.bash"), script).expect("write the script");
    let words = words.join(" ");
    let probe = format!(
        "source ./batchdb.bash; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
         COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; _batchdb batchdb \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\""
    );
    let mut bash = Command::new("bash");
    bash.args(["--noprofile", "--norc", "-c", &probe])
        .current_dir(env.root());
    let out = env.output_within(bash, None, DEADLINE);
    assert!(out.status.success(), "bash: {}", text(&out.stderr));
    text(&out.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn bash_completion_offers_the_commands_and_each_commands_options() {
    let env = Env::new();
    let commands = bash_completes(&env, &["batchdb", "ma"]);
    assert!(commands.contains(&"map".to_owned()), "{commands:?}");
    assert!(commands.contains(&"man".to_owned()), "{commands:?}");
    let options = bash_completes(&env, &["batchdb", "run", "--until"]);
    assert_eq!(options, ["--until-empty"]);
    let shells = bash_completes(&env, &["batchdb", "completions", "fi"]);
    assert_eq!(shells, ["fish"]);
    assert!(!env.exists("db"), "completions opened a database");
}

#[test]
fn completions_exist_for_every_shell_clap_supports() {
    let env = Env::new();
    let expect = [
        ("zsh", "#compdef batchdb"),
        ("fish", "complete -c batchdb"),
        ("powershell", "Register-ArgumentCompleter"),
        ("elvish", "edit:completion:arg-completer[batchdb]"),
    ];
    for (shell, marker) in expect {
        let script = env.ok(&["completions", shell]);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(
            script.contains("until-empty"),
            "{shell} misses run's options"
        );
    }
    let out = env.cmd(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn man_writes_one_page_per_command_that_man_renders() {
    let env = Env::new();
    let dir = env.file("man1");
    let written = env.ok(&["man", &dir.to_string_lossy()]);
    let help = env.ok(&["--help"]);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() > 20, "{help}");
    for c in &commands {
        let page = dir.join(format!("batchdb-{c}.1"));
        assert!(page.is_file(), "no page for {c}; wrote:\n{written}");
        assert!(written.contains(&format!("wrote {}", page.display())));
    }
    let mut man = Command::new("man");
    man.arg("-l")
        .arg(dir.join("batchdb-run.1"))
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat");
    let out = env.output_within(man, None, DEADLINE);
    let page = text(&out.stdout);
    assert!(out.status.success(), "man: {}", text(&out.stderr));
    assert!(page.contains("batchdb-run"), "{page}");
    for option in ["--until-empty", "--lease", "--progress", "--dir"] {
        assert!(
            page.contains(option),
            "{option} missing from run's page:\n{page}"
        );
    }
    let top = env.ok(&["man"]);
    assert!(top.contains(".TH batchdb 1"), "{top}");
    assert!(!env.exists("db"), "man opened a database");
}

#[test]
fn help_lists_the_global_options_under_their_own_heading() {
    let env = Env::new();
    let help = env.ok(&["add", "--help"]);
    let (own, global) = help
        .split_once("Global options:")
        .unwrap_or_else(|| panic!("no global heading:\n{help}"));
    for g in ["--dir", "--db", "--blobs", "--verbose"] {
        assert!(global.contains(g), "{g} not under Global options:\n{help}");
        assert!(!own.contains(g), "{g} among add's own options:\n{help}");
    }
    assert!(own.contains("--lines") && own.contains("--batch"), "{help}");
}
