//! Integration tests of the batchdb HTTP API over real HTTP: each test starts the
//! server in-process on an ephemeral loopback port, over its own temporary database,
//! and talks to it with an HTTP client (or raw TCP, for what clients will not send).
//!
//! The tests that need the `batchdb` binary itself (a 1 GiB upload measured on a real
//! `batchdb serve` process, an event made by a separate CLI process, the headless
//! Chromium dashboard test) live in `crates/cli/tests/cli/serve.rs` and `dashboard.rs`.
//!
//! - `routes`: the old routes, the JSON API, paging, filters, prefix, dashboard files
//! - `batches`: batch and after on push, the batch routes and filter
//! - `bad_input`: 400 / 404 / 405 and the error body
//! - `blobs`: Range, ETag, If-None-Match, HEAD
//! - `dashboard`: what the dashboard reads: payload previews, the text filter, paging
//!   back through recent rows, the chart series, the vendored chart library
//! - `events`: SSE from the event log, Last-Event-ID, live output
//! - `auth`: token, reads with a token, cross-origin and Host checks
//! - `upload`: streamed bodies, clients that go away mid-upload
//! - `metrics`: Prometheus text derived from the event log
//! - `limits`: header and body timeouts, the connection and event-stream caps
//! - `tls`: HTTPS with a certificate from a private CA, handshake timeout, bad PEM files
//! - `worker`: the worker endpoints through the library's remote port: fencing (409),
//!   a retried finish, the protocol check, oversized bodies, the worker token, a whole
//!   worker over HTTP

mod util;

mod auth;
mod bad_input;
mod batches;
mod blobs;
mod context;
mod dashboard;
mod events;
mod limits;
mod metrics;
mod routes;
mod tls;
mod upload;
mod worker;
