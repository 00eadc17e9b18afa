//! Integration tests of the `batchdb` CLI: every test drives the real binary as
//! separate processes on its own temporary directory.
//!
//! - `contract`: the output contract of add / create / push / list / run / get (issue 2)
//! - `defects`: the six defects of the original module (issue 2)
//! - `bad_input`: one-line errors, non-zero exits, nothing written
//! - `worker`: parallelism, several workers, kill -9 takeover, timeouts, signals (issue 3)
//! - `control`: retries, retry, cancel, priorities, delay (issue 3)
//! - `output`: show, logs -f, events, the result cache (issue 3)
//! - `faults`: the bad-input and fault matrix (issue 7)
//! - `serve`: `batchdb serve` as a process: flags, a 1 GiB upload, SSE, the dashboard in Chromium (issue 5)

mod util;

mod bad_input;
mod contract;
mod control;
mod defects;
mod faults;
mod output;
mod serve;
mod worker;
