//! Server processes that die with the test binary.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::thread;

/// Removes every `<prefix><pid>-*` entry of the temporary directory whose process
/// `<pid>` is gone: what the servers of earlier test binaries left behind (a shared
/// server lives in a static, so it is killed with its binary, never dropped).
pub fn sweep_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Runs `cleanup` when the test binary exits (libtest ends through `exit`, which runs
/// `atexit` handlers, whether the tests passed or not): how the shared servers, which
/// live in statics and are never dropped, stop and remove their directories at the
/// end of the run instead of at the next one. `cleanup` must not panic.
pub fn at_exit(cleanup: extern "C" fn()) {
    // SAFETY: atexit only records the function pointer; the handler is a plain
    // `extern "C" fn` that catches nothing and is documented not to panic.
    unsafe {
        libc::atexit(cleanup);
    }
}

/// Asks `child` to stop with `signal`, waits up to 5 s, then kills it: at exit, a
/// server that hangs must not hang the test binary.
pub fn stop_within(child: &mut Child, signal: i32) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(pid, signal) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// A spawn request: the command, and where to send the spawned child.
type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the test binary, with
/// `PR_SET_PDEATHSIG` = SIGKILL set after any credential change, so the server dies
/// with the test binary however that ends. (The parent-death signal is tied to the
/// spawning *thread*; test threads end early, this one never does.)
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<mpsc::Sender<SpawnRequest>>> =
        std::sync::OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
                // Keep the thread (the children's parent) alive for the whole run.
                loop {
                    thread::park();
                }
            })
            .expect("spawn testkit spawner thread");
        std::sync::Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?
        .send((std::mem::replace(&mut cmd, Command::new("true")), reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread gone"))?
}
