//! A throwaway PostgreSQL cluster for tests: `initdb` into a temporary directory, then
//! `postgres` on a free loopback port. PostgreSQL refuses to run as root, so as root
//! the cluster runs as the unprivileged user `nobody`.
//!
//! [`shared`] is one cluster per test binary (each test takes its own database from
//! it with [`Postgres::create_database`]); [`Postgres::start_new`] makes a private one
//! that a test may stop and start again (to cut every connection mid-run).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{free_port, spawn_tied};

/// A running (or stopped) throwaway cluster.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    fsync: bool,
    child: Mutex<Option<Child>>,
    _dir: tempfile::TempDir,
}

/// The cluster shared by every test of this test binary (started on first use).
pub fn shared() -> &'static Postgres {
    SHARED.get_or_init(|| {
        crate::process::at_exit(stop_shared);
        Postgres::start_new(false)
    })
}

static SHARED: OnceLock<Postgres> = OnceLock::new();

/// At exit: stops the shared cluster and removes its directory.
extern "C" fn stop_shared() {
    if let Some(pg) = SHARED.get() {
        let mut child = pg.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            crate::process::stop_within(&mut c, libc::SIGINT);
        }
        let _ = std::fs::remove_dir_all(pg._dir.path());
    }
}

/// The directory holding `initdb` and `postgres`: `$BATCHDB_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else wherever `postgres` is on `PATH`.
fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("BATCHDB_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("postgres").exists() && d.join("initdb").exists() {
                return d;
            }
        }
    }
    panic!(
        "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin or \
         on PATH: install Debian's `postgresql` package (the README's test command does)"
    );
}

/// The user to run PostgreSQL as: ourselves, or `nobody` when we are root.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } == 0).then_some((65534, 65534))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
            let e = e.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            chown_tree(&e.path(), uid, gid);
        }
    }
}

impl Postgres {
    /// Initializes and starts a new private cluster on a free port. With `fsync`
    /// false, the server skips fsyncs (fine for tests; benchmarks want it true).
    pub fn start_new(fsync: bool) -> Postgres {
        let bin = bin_dir();
        crate::process::sweep_stale("batchdb-pg-");
        let dir = tempfile::Builder::new()
            .prefix(&format!("batchdb-pg-{}-", std::process::id()))
            .tempdir()
            .expect("create a temporary directory for PostgreSQL");
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        if let Some((uid, gid)) = run_as() {
            chown_tree(dir.path(), uid, gid);
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .arg("-D")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some((uid, gid)) = run_as() {
            use std::os::unix::process::CommandExt;
            initdb.uid(uid).gid(gid);
        }
        let out = initdb
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.join("initdb").display()));
        assert!(
            out.status.success(),
            "initdb failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Postgres {
            bin,
            data,
            log,
            port: free_port(),
            fsync,
            child: Mutex::new(None),
            _dir: dir,
        };
        pg.start();
        pg
    }

    /// The process id of the running server (the postmaster), if it is running.
    pub fn pid(&self) -> Option<u32> {
        let child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        child.as_ref().map(Child::id)
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connection URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the server (again) on its port and data, and waits until it accepts
    /// connections.
    pub fn start(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if child.is_some() {
            return;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log.display()));
        let log2 = log.try_clone().expect("clone log handle");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self._dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "max_connections=400"])
            .args(["-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if !self.fsync {
            cmd.args(["-c", "fsync=off", "-c", "full_page_writes=off"]);
        }
        if let Some((uid, gid)) = run_as() {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        let c = spawn_tied(cmd)
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.join("postgres").display()));
        *child = Some(c);
        drop(child);
        self.wait_ready();
    }

    /// Stops the server at once (fast shutdown: every connection is cut).
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }

    fn psql(&self, db: &str, sql: &str) -> std::io::Result<std::process::Output> {
        // Through this cluster's own socket directory: never another server that may
        // have taken the port while this one was stopped.
        Command::new(self.bin.join("psql"))
            .env("PGCONNECT_TIMEOUT", "5")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self._dir.path())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let exited = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "PostgreSQL on port {} exited at start ({status}); log:\n{}",
                    self.port,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            match self.psql("postgres", "SELECT 1") {
                Ok(o) if o.status.success() => return,
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                r => panic!(
                    "PostgreSQL on port {} did not come up ({r:?}); log:\n{}",
                    self.port,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                ),
            }
        }
    }

    /// Creates a new empty database and returns its URL.
    pub fn create_database(&self) -> String {
        let name = format!("t_{:016x}", fastrand_u64());
        let out = self
            .psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("run psql: {e}"));
        assert!(
            out.status.success(),
            "CREATE DATABASE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Runs one SQL statement with `psql` on database `db`, returning its output.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = self
            .psql(db, sql)
            .unwrap_or_else(|e| panic!("run psql: {e}"));
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The one integer `sql` (a `count(*)`, say) selects on database `db`.
    pub fn count(&self, db: &str, sql: &str) -> i64 {
        let out = self.sql(db, sql);
        out.lines()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("no integer in {out:?}"))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A random u64 (no dependency needed for names).
fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
