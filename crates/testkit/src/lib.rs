//! Real servers for batchdb's tests: a throwaway PostgreSQL cluster ([`postgres`]) and
//! a single-node Garage S3 store ([`garage`]), each started once per test binary, on
//! loopback, on a free port, and killed when the test binary exits.
//!
//! Nothing here skips: a missing server binary panics with what to install (the
//! README's test command installs everything first).

pub mod garage;
pub mod postgres;
mod process;

pub use process::free_port;
