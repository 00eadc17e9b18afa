//! The bad-input and fault matrix: odd payloads, huge streams, read-only
//! stores, a full disk, a newer schema, concurrent migration. Every error path must
//! give a one-line message and a non-zero exit, and leave the database and the blob
//! store consistent (`batchdb verify` passes, no partial blob, no row naming one).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::util::{BIN, DEADLINE, Env, sha256, wait_until};

/// Asserts a failed command: non-zero exit, one `batchdb: ` line on stderr, nothing
/// on stdout; returns the message.
fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("batchdb: "), "{err:?}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

fn assert_consistent(env: &Env) {
    let out = env.cmd(&["verify"]);
    assert!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = env.db_dir().join("blobs").join("tmp");
    let leftovers: Vec<_> = std::fs::read_dir(&tmp)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        leftovers.is_empty(),
        "partial blobs left behind: {leftovers:?}"
    );
}

#[test]
fn empty_payload() {
    let env = Env::new();
    let (key, _) = env.add("");
    assert_eq!(key, sha256(b""));
    let out = env.cmd_stdin(&["add", "-q"], b"");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), sha256(b""));
    let run = env.run_until_empty(&[]);
    assert_eq!(
        run.matches(&format!("RESULT {key} {}", sha256(b"")))
            .count(),
        2,
        "{run}"
    );
    assert!(env.get(&key).is_empty());
    assert_consistent(&env);
}

#[test]
fn binary_payload_with_nul_bytes() {
    let env = Env::new();
    let payload: Vec<u8> = (0..=255u8).chain([0, 0, b'\n', 0xff]).collect();
    std::fs::write(env.file("bin"), &payload).unwrap();
    let key = String::from_utf8_lossy(&env.cmd(&["add", "-q", "-f", "bin"]).stdout)
        .trim()
        .to_string();
    assert_eq!(key, sha256(&payload));
    let again = env.cmd_stdin(&["add", "-q"], &payload);
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), key);
    assert_eq!(env.get(&key), payload);
    assert_consistent(&env);
}

/// Runs `producer | batchdb ARGS` and returns batchdb's peak RSS in KiB.
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4, to read its rusage"
)]
fn peak_rss_of_piped(
    env: &Env,
    producer: &str,
    args: &[&str],
) -> (std::process::ExitStatus, i64, String) {
    let mut src = Command::new("sh")
        .args(["-c", producer])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn producer");
    let child = env
        .command(args)
        .stdin(Stdio::from(src.stdout.take().expect("producer stdout")))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn batchdb");
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let _ = src.wait();
    let mut out = String::new();
    if let Some(mut so) = child.stdout {
        use std::io::Read;
        let _ = so.read_to_string(&mut out);
    }
    (
        std::os::unix::process::ExitStatusExt::from_raw(status),
        usage.ru_maxrss,
        out,
    )
}

#[test]
fn five_gib_payload_from_a_pipe_in_flat_memory() {
    let env = Env::new();
    env.ok(&["status"]);
    let size: u64 = 5 << 30;
    let (status, rss_kib, out) =
        peak_rss_of_piped(&env, &format!("head -c {size} /dev/zero"), &["add", "-q"]);
    assert!(status.success(), "add of 5 GiB failed");
    assert!(
        rss_kib < 64 * 1024,
        "peak RSS {rss_kib} KiB for a 5 GiB payload: not streamed"
    );
    let key = out.trim().to_string();
    let jobs = env.list("job");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["key"], key.as_str());
    assert_eq!(jobs[0]["size"], size);
    let blob = env.blob_path(&key);
    assert_eq!(std::fs::metadata(blob).unwrap().len(), size);
}

#[test]
fn add_lines_streams_long_lines_in_flat_memory() {
    let env = Env::new();
    env.ok(&["status"]);
    // One 64 MiB line, then 200 lines of 1 MB: each is a job, none is held whole.
    let producer = "head -c 67108864 /dev/zero | tr '\\0' x; echo; \
        for i in $(seq 200); do printf '%s ' $i; head -c 1000000 /dev/zero | tr '\\0' y; echo; done";
    let (status, rss_kib, out) = peak_rss_of_piped(&env, producer, &["add", "--lines", "-q"]);
    assert!(status.success(), "add --lines failed");
    assert_eq!(out.lines().count(), 201, "one job per line");
    assert!(
        rss_kib < 64 * 1024,
        "peak RSS {rss_kib} KiB for a 64 MiB line and 200 MB of lines: not streamed"
    );
    let jobs = env.list("job");
    assert_eq!(jobs.len(), 201);
    assert!(jobs.iter().any(|j| j["size"] == 67_108_864u64));
    assert!(
        jobs.iter()
            .filter(|j| j["size"].as_u64() > Some(1_000_000))
            .count()
            == 201
    );
}

#[test]
fn disk_full_during_a_blob_write_leaves_nothing() {
    let env = Env::new();
    env.ok(&["status"]);
    std::fs::write(env.file("big"), vec![b'x'; 4 << 20]).unwrap();
    // A file-size limit of 1 MiB (ulimit counts 512-byte blocks) makes the blob write
    // fail with EFBIG, as a full disk would fail it with ENOSPC.
    let script = format!(
        "ulimit -f 2048; exec '{BIN}' --dir '{}' add -f big",
        env.db_dir().display()
    );
    let out = env.output_within(
        {
            let mut c = Command::new("sh");
            c.args(["-c", &script])
                .current_dir(env.root())
                .stdin(Stdio::null());
            c
        },
        None,
        crate::util::DEADLINE,
    );
    let msg = one_line_error(&out);
    assert!(msg.contains("write"), "{msg}");
    assert!(env.list("job").is_empty(), "no row may name a partial blob");
    assert!(env.list("pending").is_empty());
    assert_consistent(&env);
}

#[test]
fn a_file_size_limit_fails_writes_and_never_kills_the_worker() {
    let env = Env::new();
    env.ok(&["status"]);
    // Writes its own file past the limit: the job gets SIGXFSZ, as it would alone.
    let (own, _) = env.add("exec head -c 3000000 /dev/zero > big.out");
    // Writes 3 MB to stdout: the worker's blob write fails (EFBIG), not the worker.
    let (loud, _) = env.add("head -c 3000000 /dev/zero");
    let script = format!(
        "ulimit -f 2048; exec '{BIN}' --dir '{}' run",
        env.db_dir().display()
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script])
        .current_dir(env.root())
        .stdin(Stdio::null());
    let mut worker = env.start(c, None);
    let fail = wait_until("the job's own SIGXFSZ", || {
        env.list("fail")
            .into_iter()
            .find(|r| r["key"][0] == own.as_str())
    });
    assert_eq!(fail["value"]["signal"], libc::SIGXFSZ, "{fail}");
    wait_until("the stdout blob write to fail", || {
        let d = env.show_json(&loud);
        let msg = d["attempts"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        msg.contains("too large").then_some(())
    });
    assert!(worker.running(), "the worker died: {}", worker.stderr());
    worker.signal("TERM");
    assert!(
        worker.wait_within(DEADLINE).success(),
        "{}",
        worker.stderr()
    );
    assert_consistent(&env);
}

/// A command running as an unprivileged user (root ignores file permissions). The
/// binary is copied into the test's directory first: the checkout it was built in
/// may not be reachable by that user.
fn as_nobody(env: &Env, args: &[&str]) -> std::process::Output {
    let bin = env.file("batchdb-copy");
    std::fs::copy(BIN, &bin).expect("copy the binary");
    chmod(&bin, 0o755);
    let mut c = Command::new(&bin);
    c.arg("--dir").arg(env.db_dir()).args(args);
    c.current_dir(env.root()).stdin(Stdio::null());
    for k in [
        "BATCHDB_DIR",
        "BATCHDB_DB",
        "BATCHDB_BLOBS",
        "BATCHDB_SHELL",
    ] {
        c.env_remove(k);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        c.uid(65534).gid(65534);
    }
    env.output_within(c, None, crate::util::DEADLINE)
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_tree_to_nobody(path: &std::path::Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let st = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A queue holding one job ("echo before"), owned by the user [`as_nobody`] runs as.
fn nobodys_queue() -> Env {
    let env = Env::new();
    env.add("echo before");
    chmod(env.root(), 0o755);
    chown_tree_to_nobody(&env.db_dir());
    env
}

#[test]
fn read_only_blob_directory_is_a_clear_error() {
    let env = nobodys_queue();
    let blobs = env.db_dir().join("blobs");
    chmod(&blobs.join("tmp"), 0o555);
    // Larger than what is kept inline in the database, so it needs a blob file.
    let big = format!("echo after #{}", "x".repeat(20_000));
    let out = as_nobody(&env, &["add", &big]);
    let msg = one_line_error(&out);
    assert!(
        msg.contains("ermission denied") && msg.contains("tmp"),
        "{msg}"
    );
    chmod(&blobs.join("tmp"), 0o755);
    assert_eq!(env.list("job").len(), 1, "the failed add wrote no row");
    assert_consistent(&env);
}

#[test]
fn read_only_database_is_a_clear_error() {
    let env = nobodys_queue();
    let db = env.db_dir().join("batchdb.sqlite");
    chmod(&db, 0o444);
    chmod(&env.db_dir(), 0o555);
    // Larger than what is kept inline in the database, so it needs a blob file.
    let big = format!("echo after #{}", "x".repeat(20_000));
    let out = as_nobody(&env, &["add", &big]);
    let msg = one_line_error(&out);
    assert!(msg.contains("batchdb.sqlite"), "{msg}");
    chmod(&env.db_dir(), 0o755);
    chmod(&db, 0o644);
    assert_eq!(env.list("pending").len(), 1);
    assert_consistent(&env);
}

#[test]
fn newer_schema_is_refused_in_one_line() {
    let env = Env::new();
    env.add("echo hi");
    let db = env.db_dir().join("batchdb.sqlite");
    let st = Command::new("sqlite3")
        .arg(&db)
        .arg("PRAGMA user_version = 1000")
        .status()
        .expect("sqlite3");
    assert!(st.success());
    for args in [&["status"][..], &["add", "echo x"], &["list", "job"]] {
        let msg = one_line_error(&env.cmd(args));
        assert!(
            msg.contains("schema version 1000") && msg.contains("upgrade batchdb"),
            "{msg}"
        );
    }
}

#[test]
fn processes_migrating_a_new_database_at_once() {
    let env = Env::new();
    let procs: Vec<_> = (0..6)
        .map(|i| env.spawn(&["add", &format!("echo {i}")]))
        .collect();
    for mut p in procs {
        assert!(p.wait().success(), "{}", p.stderr());
    }
    assert_eq!(env.list("pending").len(), 6);
    assert_consistent(&env);
}

/// Sets `path`'s modification time two hours back.
fn age(path: &std::path::Path) {
    let st = Command::new("touch")
        .args(["-d", "2 hours ago"])
        .arg(path)
        .status()
        .expect("touch");
    assert!(st.success());
}

#[test]
fn gc_removes_what_killed_processes_left_behind() {
    let env = Env::new();
    let (done, _) = env.add("echo done");
    env.run_until_empty(&[]);
    let id = env.show_json(&done)["id"].as_i64().unwrap();
    let tmp = env.db_dir().join("blobs").join("tmp");
    let live = env.db_dir().join("live");
    // What a killed `add` and a killed worker leave: an unfinished blob, the live
    // output of an attempt that ended; plus young and unrelated files to keep.
    let (old_part, young_part) = (tmp.join("1-2-3.part"), tmp.join("4-5-6.part"));
    let ended_out = live.join(format!("{id}.1.stdout"));
    let other = live.join("notes.txt");
    for (p, bytes) in [
        (&old_part, 10),
        (&young_part, 20),
        (&ended_out, 30),
        (&other, 40),
    ] {
        std::fs::write(p, vec![b'x'; bytes]).unwrap();
    }
    for p in [&old_part, &ended_out, &other] {
        age(p);
    }
    // A running attempt's live output stays, however long since it last wrote.
    let (_, _) = env.add("echo started; touch started; sleep 60");
    let worker = env.spawn(&["run"]);
    env.wait_file("started");
    // Its live file is made once it has run for a moment (50 ms) with output held.
    let running = wait_until("the running attempt's live file", || {
        let files: Vec<_> = std::fs::read_dir(&live)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".stdout") && **p != ended_out)
            .collect();
        (!files.is_empty()).then_some(files)
    });
    assert_eq!(running.len(), 1, "{running:?}");
    age(&running[0]);
    let dry = env.ok(&["gc", "--dry-run", "--grace", "60"]);
    assert!(
        dry.contains(&format!("would remove leftover {} 10", old_part.display())),
        "{dry}"
    );
    assert!(old_part.exists(), "a dry run removes nothing");
    let out = env.ok(&["gc", "--grace", "60"]);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("leftover")).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(!old_part.exists() && !ended_out.exists(), "{out}");
    assert!(
        young_part.exists() && other.exists() && running[0].exists(),
        "{out}"
    );
    worker.signal("KILL");
}

#[test]
fn a_read_only_shm_left_by_a_reader_does_not_block_writers_once_the_database_is_writable() {
    let env = nobodys_queue();
    let db = env.db_dir().join("batchdb.sqlite");
    // A reader of a read-only database: SQLite creates -shm with the database's mode.
    chmod(&db, 0o444);
    let out = as_nobody(&env, &["status"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    let shm = std::path::PathBuf::from(shm);
    let mode = std::fs::metadata(&shm)
        .expect("the reader left -shm")
        .permissions()
        .mode();
    assert_eq!(mode & 0o200, 0, "the -shm file is read-only: {mode:o}");
    // The database is writable again: so is the queue.
    chmod(&db, 0o644);
    let out = as_nobody(&env, &["add", "echo after"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.list("pending").len(), 2);
    assert_consistent(&env);
}

/// A tmpfs of `size` mounted at `path` for as long as it lives.
struct Mounted(std::path::PathBuf);

impl Mounted {
    fn tmpfs(path: std::path::PathBuf, size: &str) -> Mounted {
        std::fs::create_dir_all(&path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .expect("mount");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (the test suite runs as root)"
        );
        Mounted(path)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn reads_on_a_full_disk_say_the_disk_is_full() {
    let env = Env::new();
    let small = Mounted::tmpfs(env.file("small"), "4m");
    let dir = small.0.join("db");
    let bdb = |args: &[&str]| {
        let mut c = Command::new(BIN);
        c.arg("--dir").arg(&dir).args(args).stdin(Stdio::null());
        env.output_within(c, None, DEADLINE)
    };
    assert!(bdb(&["add", "echo hi"]).status.success());
    // Fill the file system (the -wal and -shm files are gone with the last process).
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 8388608 /dev/zero > '{}' 2>/dev/null",
            small.0.join("filler").display()
        ))
        .status();
    for args in [&["status"][..], &["list", "pending"], &["verify"]] {
        let msg = one_line_error(&bdb(args));
        assert!(msg.contains("is full"), "{args:?}: {msg}");
    }
    std::fs::remove_file(small.0.join("filler")).unwrap();
    assert!(bdb(&["status"]).status.success());
}
