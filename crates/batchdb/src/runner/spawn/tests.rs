//! The spawn path's tests: pipes, environment, process group, signals, exec and
//! setup failures, as real child processes.

use super::super::leader::Leader;
use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sh(script: &str, env: &[(&str, &str)]) -> io::Result<Spawned> {
    let env: Vec<(OsString, OsString)> = env.iter().map(|(k, v)| (k.into(), v.into())).collect();
    spawn(
        Path::new("/bin/sh"),
        OsStr::new("sh"),
        &["-c".into(), script.into()],
        &env,
    )
}

async fn read_all(fd: OwnedFd) -> String {
    let mut text = String::new();
    tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
        .unwrap()
        .read_to_string(&mut text)
        .await
        .unwrap();
    text
}

/// Waits for `child`, given no input, to print `out` and exit 0.
async fn ends_with(child: Spawned, out: &str) {
    let wait = Leader::new(child.pid, Some(child.pidfd));
    drop(child.stdin);
    assert_eq!(read_all(child.stdout).await, out);
    assert_eq!(wait.wait().await.unwrap(), (Some(0), None));
}

#[tokio::test]
async fn runs_with_pipes_env_exit_code_and_its_own_process_group() {
    assert!(supported(), "this kernel has pidfds");
    let child = sh(
        "read line; echo \"$line $BATCHDB_X\"; echo err >&2; echo $$ $(ps -o pgid= $$ 2>/dev/null || cut -d' ' -f5 /proc/$$/stat) >&2; exit 3",
        &[("BATCHDB_X", "env ok")],
    )
    .unwrap();
    let pid = child.pid;
    // SAFETY: getpgid has no preconditions.
    assert_eq!(unsafe { libc::getpgid(pid) }, pid, "a group of its own");
    let wait = Leader::new(child.pid, Some(child.pidfd));
    let mut stdin = tokio::net::unix::pipe::Sender::from_owned_fd(child.stdin).unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    drop(stdin);
    let out = read_all(child.stdout).await;
    let err = read_all(child.stderr).await;
    assert_eq!(out, "hello env ok\n");
    assert!(err.starts_with("err\n"), "{err}");
    assert_eq!(wait.wait().await.unwrap(), (Some(3), None));
}

#[tokio::test]
async fn a_job_outlives_the_thread_that_asked_for_it() {
    // PR_SET_PDEATHSIG follows the creating thread: jobs are created on the
    // spawner thread, so a caller's thread ending must not kill them.
    let child = std::thread::spawn(|| {
        on_spawner_thread(|| sh("sleep 0.3; echo alive", &[]))
            .unwrap()
            .unwrap()
    })
    .join()
    .unwrap();
    ends_with(child, "alive\n").await;
}

/// Whether process `pid` is gone: not running and reaped (no zombie left either).
fn gone(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

#[tokio::test]
async fn an_awaited_start_gives_the_same_job_as_a_blocking_one() {
    let child = on_spawner_thread_async(|| sh("echo awaited", &[]))
        .await
        .unwrap()
        .unwrap();
    ends_with(child, "awaited\n").await;
}

#[tokio::test]
async fn a_job_handed_over_to_no_one_is_killed_and_reaped() {
    let child = on_spawner_thread(|| sh("sleep 30", &[])).unwrap().unwrap();
    let pid = child.pid;
    assert!(!gone(pid));
    drop(Handover::new((Ok(child), ())));
    assert!(gone(pid), "the job still runs, or is a zombie");
}

/// Asserts, when dropped, that process `.0` is gone.
struct DroppedAfter(i32);

impl Drop for DroppedAfter {
    fn drop(&mut self) {
        assert!(gone(self.0), "dropped while its job still ran");
    }
}

#[tokio::test]
async fn what_a_handover_keeps_is_dropped_only_once_its_job_is_reaped() {
    let child = on_spawner_thread(|| sh("sleep 30", &[])).unwrap().unwrap();
    let pid = child.pid;
    drop(Handover::new((Ok(child), DroppedAfter(pid))));
    assert!(gone(pid));
}

#[tokio::test]
async fn a_job_started_for_a_task_that_stopped_waiting_is_killed_and_reaped() {
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let start = on_spawner_thread_async(move || {
        // Starts only once the task below has stopped waiting.
        let _ = go_rx.recv();
        let child = sh("sleep 30", &[])?;
        let _ = pid_tx.send(child.pid);
        Ok::<_, io::Error>(Handover::new((Ok(child), ())))
    });
    // Sent to the spawner thread at the first poll; the task then stops waiting.
    let mut start = Box::pin(start);
    std::future::poll_fn(|cx| {
        assert!(start.as_mut().poll(cx).is_pending());
        std::task::Poll::Ready(())
    })
    .await;
    drop(start);
    go_tx.send(()).unwrap();
    // The spawner thread runs calls in order: once this one ran, so did the start.
    on_spawner_thread(|| ()).unwrap();
    let pid = pid_rx.recv().unwrap();
    assert!(gone(pid), "the job still runs, or is a zombie");
}

#[tokio::test]
async fn a_signal_that_ends_it_is_reported() {
    let child = sh("kill -9 $$", &[]).unwrap();
    let wait = Leader::new(child.pid, Some(child.pidfd));
    assert_eq!(wait.wait().await.unwrap(), (None, Some(libc::SIGKILL)));
}

#[tokio::test]
async fn an_exec_failure_is_the_spawns_error() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("bad");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Another test's spawn may briefly hold the script's write descriptor
    // (ETXTBSY, a well-known race of writing then executing a file): try again.
    let err = loop {
        let err = spawn(&script, OsStr::new("bad"), &[], &[])
            .err()
            .expect("exec fails");
        if err.kind() != io::ErrorKind::ExecutableFileBusy {
            break err;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    let err = spawn(dir.path(), OsStr::new("dir"), &[], &[])
        .err()
        .expect("a directory cannot run");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
}

#[tokio::test]
async fn the_setup_runs_in_the_child_and_a_failed_step_is_named() {
    let sh_with = |script: &str, setup: &Setup| {
        spawn_with(
            Path::new("/bin/sh"),
            OsStr::new("sh"),
            &["-c".into(), script.into()],
            &[],
            setup,
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        cwd: Some(dir.path().to_path_buf()),
        rlimits: vec![(libc::RLIMIT_DATA, 1 << 30)],
        ..Setup::default()
    };
    let child = sh_with("pwd; ulimit -d", &setup).unwrap();
    let wait = Leader::new(child.pid, Some(child.pidfd));
    drop(child.stdin);
    let want = format!("{}\n{}\n", dir.path().display(), 1 << 20);
    assert_eq!(
        read_all(child.stdout).await,
        want,
        "cwd, and RLIMIT_DATA in KiB"
    );
    assert_eq!(wait.wait().await.unwrap(), (Some(0), None));
    let missing = Setup {
        cwd: Some("/nonexistent/batchdb".into()),
        ..Setup::default()
    };
    let failed = sh_with("true", &missing).err().expect("no such directory");
    assert_eq!(failed.stage, Stage::Cwd);
    assert_eq!(failed.error.raw_os_error(), Some(libc::ENOENT));
    let no_group = Setup {
        cgroup_procs: vec!["/nonexistent/cgroup.procs".into()],
        ..Setup::default()
    };
    let failed = sh_with("true", &no_group).err().expect("no such cgroup");
    assert_eq!(failed.stage, Stage::Cgroup);
}

#[tokio::test]
async fn sigpipe_is_default_in_the_child() {
    // Rust ignores SIGPIPE; a job must not inherit that (`yes | head` must end).
    let child = sh("yes | head -c 10 >/dev/null; echo done", &[]).unwrap();
    let wait = Leader::new(child.pid, Some(child.pidfd));
    drop(child.stdin);
    assert_eq!(read_all(child.stdout).await, "done\n");
    assert_eq!(wait.wait().await.unwrap(), (Some(0), None));
}

#[test]
fn one_thread_keeps_one_child_stack_across_spawns_and_failed_execs() {
    use std::io::Read;
    std::thread::spawn(|| {
        assert_eq!(kept_stack(), None, "a new thread has no stack yet");
        let mut bases = Vec::new();
        for i in 0..3 {
            let child = sh(&format!("echo {i}"), &[]).unwrap();
            let mut out = String::new();
            std::fs::File::from(child.stdout)
                .read_to_string(&mut out)
                .unwrap();
            assert_eq!(out, format!("{i}\n"));
            reap(child.pid);
            bases.push(kept_stack().expect("the stack is kept"));
            let failed = spawn(Path::new("/nonexistent/x"), OsStr::new("x"), &[], &[]);
            assert!(failed.is_err(), "exec of a missing file fails");
            bases.push(kept_stack().expect("the stack is kept after a failed exec"));
        }
        assert!(bases.windows(2).all(|w| w[0] == w[1]), "{bases:?}");
    })
    .join()
    .unwrap();
}
