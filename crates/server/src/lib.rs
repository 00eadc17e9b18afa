//! The batchdb HTTP API and live dashboard, as `batchdb serve` runs them.
//!
//! [`router`] builds an [`axum::Router`] over a [`BatchDb`]; [`serve`] runs it on a
//! listener until a shutdown signal. Every route is listed in the crate's README
//! section "HTTP API and dashboard":
//!
//! - the old batchdb-web-api routes: `POST /create`, `GET /list/{type}`,
//!   `GET /blob/{id}` (with `Range`, `ETag` and immutable caching);
//! - a JSON API under `/api/` (push, cancel, retry, instance, counts, paged lists
//!   and recent results with payload previews, chart series, live output);
//! - `GET /events`, the persisted event log as Server-Sent Events;
//! - `GET /metrics` (Prometheus text) and `GET /healthz`;
//! - the dashboard at `/`.
//!
//! Every route is mounted under [`ServeOptions::prefix`].

#![warn(missing_docs)]

mod api;
mod auth;
mod bare;
mod blob;
mod conn;
mod dashboard;
mod error;
mod events;
mod handoff;
mod metrics;
mod recent;
mod rows;
mod series;
mod tls;
mod worker;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use batchdb::{BatchDb, Error};

pub use conn::Limits;
pub use error::ApiError;
pub use tls::TlsConfig;

/// How the server behaves; everything but the database.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Mount every route under this path (`/batch`); empty for the root. Only
    /// `[A-Za-z0-9._~-]` segments separated by `/` are accepted.
    pub prefix: String,
    /// With a token, every mutating request (and the dashboard's actions) needs
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Require the token on reads too (lists, blobs, events, metrics). `GET` requests
    /// may also pass it as `?access_token=` (a browser's `EventSource` cannot set
    /// headers).
    pub auth_reads: bool,
    /// Refuse requests whose `Host` is not a loopback name (`localhost`, `127.x.y.z`,
    /// `[::1]`): set it when listening on a loopback address, so that a web page in
    /// the user's browser cannot reach the server through DNS rebinding.
    pub local_hosts_only: bool,
    /// Caps on connections and event streams, and the timeouts of stalled clients.
    pub limits: Limits,
    /// With a worker token, the worker endpoints (`/worker/...`, what `batchdb run
    /// --server` calls) need `Authorization: Bearer <worker token>`, and the worker
    /// token authorises nothing else. Without one, they need [`token`](Self::token)
    /// if that is set.
    pub worker_token: Option<String>,
    /// Serve HTTPS with this certificate and key; `None` for plain HTTP. The TLS
    /// handshake must end within [`Limits::header_timeout`].
    pub tls: Option<TlsConfig>,
}

impl ServeOptions {
    /// The prefix in its canonical form: empty, or `/a/b` without a trailing slash.
    pub fn normalized_prefix(&self) -> Result<String, Error> {
        let p = self.prefix.trim_end_matches('/');
        if p.is_empty() {
            return Ok(String::new());
        }
        let bad = |why: &str| Error::Config {
            what: "prefix",
            value: self.prefix.clone(),
            why: why.into(),
        };
        let Some(rest) = p.strip_prefix('/') else {
            return Err(bad("it must start with /"));
        };
        for seg in rest.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(bad("empty, . or .. path segment"));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
            {
                return Err(bad("only letters, digits and ._~- are allowed in segments"));
            }
        }
        Ok(p.to_string())
    }
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct App {
    pub db: BatchDb,
    pub opts: ServeOptions,
    pub prefix: String,
    pub metrics: metrics::Metrics,
    /// One permit per open event stream ([`Limits::max_streams`]).
    pub streams: Arc<tokio::sync::Semaphore>,
}

/// The shared state handlers receive.
pub(crate) type AppState = Arc<App>;

/// Builds the router serving the HTTP API and the dashboard over `db`.
///
/// Inside a tokio runtime this also starts the task that follows the event log
/// (from its first event) for `/metrics`; it ends when the router is dropped.
/// Outside one, the task starts with the first `/metrics` request.
pub fn router(db: BatchDb, opts: ServeOptions) -> Result<Router, Error> {
    let prefix = opts.normalized_prefix()?;
    let app = Arc::new(App {
        metrics: metrics::Metrics::new(db.clone()),
        streams: Arc::new(tokio::sync::Semaphore::new(opts.limits.max_streams)),
        db,
        opts,
        prefix: prefix.clone(),
    });
    app.metrics.start();
    let p = |path: &str| format!("{prefix}{path}");
    let mut r = Router::new()
        .route(&p("/"), get(dashboard::index))
        .route(&p("/assets/app.js"), get(dashboard::script))
        .route(&p("/assets/app.css"), get(dashboard::style))
        .route(&p("/assets/{name}"), get(dashboard::asset_named))
        .route(&p("/create"), post(api::create))
        .route(&p("/list/{kind}"), get(api::list_lines))
        .route(&p("/blob/{id}"), get(blob::get_blob))
        .route(&p("/events"), get(events::sse))
        .route(&p("/metrics"), get(metrics::scrape))
        .route(&p("/healthz"), get(api::healthz))
        .route(&p("/api/counts"), get(api::counts))
        .route(&p("/api/batches"), get(api::batches))
        .route(&p("/api/batch/{name}"), get(api::batch))
        .route(&p("/api/last-event"), get(api::last_event))
        .route(&p("/api/list/{kind}"), get(api::list_json))
        .route(&p("/api/recent/{kind}"), get(recent::recent))
        .route(&p("/api/series"), get(series::series))
        .route(&p("/api/instance/{id}"), get(api::instance))
        .route(&p("/api/output/{id}"), get(events::output))
        .route(&p("/api/push"), post(api::push))
        .route(&p("/api/cancel/{selector}"), post(api::cancel))
        .route(&p("/api/retry/{selector}"), post(api::retry))
        .merge(worker_routes(&prefix));
    if !prefix.is_empty() {
        r = r.route(&prefix, get(dashboard::to_index));
    }
    Ok(r.fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::guard,
        ))
        .layer(axum::middleware::from_fn(error::request_limits))
        .with_state(app))
}

/// The worker endpoints (`worker.rs`), behind the protocol check.
fn worker_routes(prefix: &str) -> Router<AppState> {
    let p = |path: &str| format!("{prefix}/worker{path}");
    Router::new()
        .route(&p("/hello"), get(worker::hello))
        .route(&p("/claim"), post(worker::claim))
        .route(&p("/wait"), post(worker::wait))
        .route(&p("/heartbeat"), post(worker::heartbeat))
        .route(&p("/status"), post(worker::status))
        .route(&p("/finish"), post(worker::finish))
        .route(&p("/finish-claim"), post(worker::finish_claim))
        .route(&p("/recorded"), post(worker::recorded))
        .route(&p("/blob/{hash}"), get(worker::blob))
        .route(&p("/output/{id}/{attempt}"), post(worker::output))
        .route(&p("/live/{id}/{attempt}/{stream}"), post(worker::live))
        .route(&p("/deps"), post(worker::deps))
        .route(&p("/idle"), post(worker::idle))
        .route(&p("/counts"), get(worker::counts))
        .route(&p("/seen"), post(worker::seen))
        .route(&p("/gone"), post(worker::gone))
        .layer(axum::middleware::from_fn(worker::protocol))
}

/// Serves `router(db, opts)` on `listener`, within `opts.limits` (see [`Limits`]),
/// over TLS when `opts.tls` is set, until `shutdown` completes; then stops
/// accepting, gives open requests a moment (2 s) to end, and returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    db: BatchDb,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let limits = opts.limits;
    let tls = opts.tls.as_ref().map(TlsConfig::acceptor);
    let app = router(db, opts)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Event streams never end by themselves: once asked to stop, other requests get
    // a short grace period.
    let accepting = conn::accept_loop(
        listener,
        (app, tls),
        limits,
        stop_rx,
        Duration::from_secs(2),
    );
    let stopping = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    tokio::join!(accepting, stopping);
    Ok(())
}
