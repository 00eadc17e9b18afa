//! Integration tests of the `batchdb` CLI: every test drives the real binary as
//! separate processes on its own temporary directory.
//!
//! - `batches`: `map` against GNU parallel, `wait`, a map-reduce through `BATCHDB_DEPS`
//! - `output_contract`: the exact output of add / create / push / list / run / get
//! - `consistency`: no lost or merged instances under concurrent processes, a failing
//!   job never stalls the queue, every listed result is readable and hashes right
//! - `bad_input`: one-line errors, non-zero exits, nothing written
//! - `worker`: parallelism, several workers, kill -9 takeover, timeouts, signals
//! - `limits`: `--cwd`, `--env`, `--memory`, `--pids`, `--cpus` under a cgroup and
//!   rlimits; accounting against `/usr/bin/time -v`
//! - `scheduling`: retries, retry, cancel, priorities, delay
//! - `inspection`: show, logs -f, events, the result cache
//! - `manual`: completions, man pages and `--help`, from the clap definitions
//! - `faults`: the bad-input and fault matrix: full disk, read-only stores, huge streams
//! - `progress`: the live progress line, on a pseudo-terminal and never elsewhere
//! - `ps`: the `ps` table and `status` line for people
//! - `resources`: context options stored and shown, resource units handed out, concurrency
//!   keys across worker processes, what no worker could run
//! - `retention`: `prune` and `--prune-after`, then `gc`
//! - `serve`: `batchdb serve` as a process: flags, a 1 GiB upload, SSE
//! - `dashboard`: the dashboard in headless Chromium: previews, filter, charts, the
//!   instance panel, safety of payload text (`browser`: the WebDriver harness)
//! - `dashboard_scale`: the dashboard over 100,000 results: load time, paging, live updates

mod tty;
mod util;

mod bad_input;
mod batches;
mod browser;
mod consistency;
mod dashboard;
mod dashboard_scale;
mod faults;
mod inspection;
mod limits;
mod manual;
mod output_contract;
mod progress;
mod ps;
mod remote;
mod resources;
mod retention;
mod scheduling;
mod serve;
mod worker;
