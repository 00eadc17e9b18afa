//! Bad input: a one-line `batchdb: ...` error, a non-zero exit, nothing on stdout,
//! no panic and nothing written to the database.

use crate::util::*;

/// Runs a command that must be refused; returns the error line.
fn refused(env: &Env, args: &[&str]) -> String {
    assert_one_line_error(&env.cmd(args), args)
}

#[test]
fn get_refuses_anything_but_64_lowercase_hex() {
    let env = Env::new();
    let (key, _) = env.add("echo x");
    let too_short = &key[..63];
    let too_long = format!("{key}0");
    let upper = key.to_uppercase();
    let traversal = format!("../../../../etc/passwd{}", &key[..42]);
    let non_hex = format!("{}g", &key[..63]);
    for bad in [
        "",
        "../etc/passwd",
        "/etc/passwd",
        too_short,
        &too_long,
        &upper,
        &traversal,
        &non_hex,
    ] {
        let line = refused(&env, &["get", bad]);
        assert!(line.contains("hash"), "the error names the problem: {line}");
    }
    // The valid key still works.
    assert_eq!(env.get(&key), b"echo x");
}

#[test]
fn get_of_a_missing_blob_is_an_error() {
    let env = Env::new();
    env.add("echo x"); // the store exists
    let missing = sha256(b"never stored");
    let line = refused(&env, &["get", &missing]);
    assert!(line.contains(&missing), "the error names the hash: {line}");
}

#[test]
fn list_of_an_unknown_type_is_an_error() {
    let env = Env::new();
    env.add("echo x");
    for bad in ["jobs", "PENDING", "results", ""] {
        refused(&env, &["list", bad]);
    }
}

#[test]
fn push_of_an_unknown_or_invalid_key_is_an_error() {
    let env = Env::new();
    let unknown = sha256(b"never created");
    let line = refused(&env, &["push", &unknown]);
    assert!(line.contains(&unknown), "the error names the key: {line}");
    refused(&env, &["push", "not-a-key"]);
    refused(&env, &["push", &unknown.to_uppercase()]);
    assert!(env.list("pending").is_empty());
    assert!(env.list("job").is_empty());
}

#[test]
fn add_and_create_of_an_unreadable_file_are_errors() {
    let env = Env::new();
    std::fs::create_dir(env.file("a-directory")).unwrap();
    for cmd in ["add", "create"] {
        refused(&env, &[cmd, "-f", "does-not-exist"]);
        refused(&env, &[cmd, "-f", "a-directory"]);
    }
    assert!(env.list("job").is_empty(), "nothing was created");
    assert!(env.list("pending").is_empty(), "nothing was pushed");
}

#[test]
fn selectors_and_options_that_name_nothing_are_errors() {
    let env = Env::new();
    let (key, created) = env.add("echo x");
    refused(&env, &["show", &(created + 1_000_000).to_string()]);
    refused(&env, &["show", "not-a-selector"]);
    refused(&env, &["cancel", &sha256(b"no such job")]);
    refused(&env, &["retry", &created.to_string()]); // pending, not failed
    refused(&env, &["run", "--until-empty", "--order", "sideways"]);
    refused(&env, &["add", "--timeout=-1", "echo y"]);
    // Nothing silently replaced: no zero workers, no lease too short to renew.
    let e = refused(&env, &["run", "--until-empty", "-j", "0"]);
    assert!(e.contains("invalid jobs \"0\""), "{e}");
    let e = refused(&env, &["run", "--until-empty", "--lease", "0"]);
    assert!(e.contains("invalid lease \"0\""), "{e}");
    refused(&env, &["run", "--until-empty", "--lease", "0.05"]);
    // None of that touched the queued instance.
    let pending = env.list("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (
            pending[0]["job"].as_str().unwrap(),
            row_created(&pending[0])
        ),
        (key.as_str(), created)
    );
}

#[test]
fn get_of_a_corrupt_blob_fails() {
    let env = Env::new();
    // Larger than what is kept inline in the database, so it is a blob file.
    let (key, _) = env.add(&format!("echo original #{}", "x".repeat(20_000)));
    let path = env
        .db_dir()
        .join(format!("blobs/{}/{}/{key}", &key[..2], &key[2..4]));
    std::fs::write(&path, b"echo tampered").expect("overwrite blob");
    let out = env.cmd(&["get", &key]);
    assert!(
        !out.status.success(),
        "a blob whose bytes do not match its name is an error"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("batchdb: ") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    let env = Env::new();
    for args in [
        &["--frobnicate"][..],
        &["run", "-j", "x"],
        &[],
        &["add", "--priority"],
        &["wait"],
        &["nonsense"],
    ] {
        let out = env.cmd(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("batchdb: ") && err.trim_end().ends_with("(see --help)"),
            "{err}"
        );
        assert!(out.stdout.is_empty());
    }
    // Asking for help is no error.
    for args in [&["--help"][..], &["--version"], &["map", "--help"]] {
        let out = env.cmd(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty());
    }
}
