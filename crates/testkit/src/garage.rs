//! A single-node Garage S3 server for tests.
//!
//! [`garage()`] starts one server per test binary (on first use) and shares it: tests
//! keep apart by using their own key prefix ([`Garage::url`]). A test that stops and
//! starts the server (an outage) takes a private one from [`Garage::start_new`].
//!
//! Each server runs `garage server` on 127.0.0.1 with free ports, its data and
//! metadata (SQLite) in a fresh temporary directory `batchdb-garage-<pid>-*`, and dies
//! with the test binary however that exits (`spawn_tied`). Its log
//! is `garage.log` in that directory. Directories left by test binaries that are gone
//! are removed when the next server starts.
//!
//! Setup, as an operator would do it: write `garage.toml` (replication factor 1, one
//! node, `s3_region = "garage"`), start the server, wait for `garage status`, assign the
//! node a layout role (`layout assign -z dc1 -c 1G`) and apply it (`layout apply
//! --version 1`), import an access key (`key import`), create the bucket and allow the
//! key to read and write it (`bucket create`, `bucket allow --read --write --owner`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::process::{free_port, spawn_tied};

/// The region the test servers answer to.
pub const REGION: &str = "garage";

/// The bucket the test servers hold.
pub const BUCKET: &str = "batchdb-test";

/// A running single-node Garage server with one bucket and one key that may read and
/// write it. Killed when dropped, and in any case when the test binary exits.
#[derive(Debug)]
pub struct Garage {
    /// The S3 endpoint, `http://127.0.0.1:<port>` (plain HTTP on loopback).
    pub endpoint: String,
    /// The region to sign requests for ([`REGION`]).
    pub region: String,
    /// The access key id allowed to read and write [`Garage::bucket`].
    pub access_key_id: String,
    /// Its secret access key.
    pub secret_access_key: String,
    /// The bucket ([`BUCKET`]).
    pub bucket: String,
    binary: PathBuf,
    dir: PathBuf,
    s3_addr: SocketAddr,
    child: Mutex<Option<Child>>,
}

/// The Garage server shared by every test of this test binary, started on first use.
/// Panics (never skips) if the `garage` binary is missing or the server fails to start.
pub fn garage() -> &'static Garage {
    SHARED.get_or_init(|| {
        crate::process::at_exit(stop_shared);
        Garage::start_new()
    })
}

static SHARED: OnceLock<Garage> = OnceLock::new();

/// At exit: stops the shared server and removes its directory.
extern "C" fn stop_shared() {
    if let Some(g) = SHARED.get() {
        let mut child = g.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            crate::process::stop_within(&mut c, libc::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&g.dir);
    }
}

/// The `garage` binary: `$BATCHDB_GARAGE_BIN`, else `garage` on `PATH`, else
/// `~/.cargo/bin/garage`. Panics with what to install if there is none.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BATCHDB_GARAGE_BIN") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").join("bin"));
    for dir in on_path.into_iter().chain(home) {
        let candidate = dir.join("garage");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the `garage` binary (an S3-compatible server) is needed by the S3 tests and was \
         found neither on PATH nor in ~/.cargo/bin: install it with \
         `cargo install garage@2.5.0 --locked` (about 15 minutes), as the README's test \
         command does, or set BATCHDB_GARAGE_BIN"
    );
}

impl Garage {
    /// Starts a new, private server (for a test that stops and starts it), with its
    /// bucket and key ready. Panics with the server's log if it fails to come up.
    pub fn start_new() -> Garage {
        let binary = binary();
        crate::process::sweep_stale("batchdb-garage-");
        let dir = tempfile::Builder::new()
            .prefix(&format!("batchdb-garage-{}-", std::process::id()))
            .tempdir()
            .expect("create a temporary directory for garage")
            .keep();
        let s3_port = free_port();
        let rpc_port = free_port();
        let config = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
            dir = dir.display(),
            secret = random_hex(32),
        );
        std::fs::write(dir.join("garage.toml"), config).expect("write garage.toml");
        let garage = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: REGION.into(),
            access_key_id: format!("GK{}", random_hex(12)),
            secret_access_key: random_hex(32),
            bucket: BUCKET.into(),
            binary,
            dir,
            s3_addr: SocketAddr::from(([127, 0, 0, 1], s3_port)),
            child: Mutex::new(None),
        };
        garage.start();
        garage.setup();
        garage
    }

    /// The `AWS_*` variables that point an S3 client (e.g. `batchdb --blobs s3://...`
    /// in a child process) at this server with its key.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// The `s3://bucket/prefix` URL of `prefix` in this server's bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix.trim_matches('/'))
    }

    /// A fresh random key prefix (`test-<hex>`), so that tests sharing the server do
    /// not see each other's objects.
    pub fn fresh_prefix() -> String {
        format!("test-{}", random_hex(8))
    }

    /// The directory holding the server's configuration, data and `garage.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit. Its data stay;
    /// [`Garage::start`] brings it back on the same port.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server (again) on its port and data, and waits until its S3 port
    /// accepts connections. Does nothing if it is running.
    pub fn start(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if child.is_some() {
            return;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("garage.log"))
            .expect("open garage.log");
        let log2 = log.try_clone().expect("clone garage.log handle");
        let mut cmd = self.command();
        cmd.arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let spawned = spawn_tied(cmd).unwrap_or_else(|e| {
            panic!("start {} server: {e}", self.binary.display());
        });
        *child = Some(spawned);
        drop(child);
        self.wait_until("its S3 port accepts connections", || {
            TcpStream::connect_timeout(&self.s3_addr, Duration::from_millis(200)).is_ok()
        });
    }

    /// `garage -c <dir>/garage.toml`, ready for a subcommand.
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c").arg(self.dir.join("garage.toml"));
        cmd
    }

    /// Runs a `garage` admin subcommand; panics with its output and the log on failure.
    fn admin(&self, args: &[&str]) -> String {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run garage {args:?}: {e}"));
        if !out.status.success() {
            panic!(
                "garage {args:?} failed ({}):\n{}{}\n--- garage.log ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_tail()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn setup(&self) {
        self.wait_until("`garage status` answers", || {
            self.command()
                .arg("status")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        });
        let id = self.admin(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().unwrap_or_default().to_string();
        self.admin(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        self.admin(&["layout", "apply", "--version", "1"]);
        self.admin(&[
            "key",
            "import",
            "--yes",
            "-n",
            "batchdb-test",
            &self.access_key_id,
            &self.secret_access_key,
        ]);
        self.admin(&["bucket", "create", &self.bucket]);
        self.admin(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &self.bucket,
            "--key",
            &self.access_key_id,
        ]);
    }

    fn wait_until(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        while !ready() {
            if start.elapsed() > Duration::from_secs(60) {
                panic!(
                    "garage in {} not ready after 60 s ({what}):\n{}",
                    self.dir.display(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Garage {
    /// Kills the server and removes its directory.
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` random bytes as lowercase hex.
fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut bytes = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
