//! The dashboard: one HTML page, its stylesheets and scripts (uPlot, MIT-licensed,
//! vendored beside them with its license), all embedded in the binary.

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::AppState;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every other file under `/assets/`: name, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    ("rows.js", JS, include_str!("assets/rows.js")),
    ("charts.js", JS, include_str!("assets/charts.js")),
    ("panel.js", JS, include_str!("assets/panel.js")),
    (
        "uPlot.iife.min.js",
        JS,
        include_str!("assets/uPlot.iife.min.js"),
    ),
    ("uPlot.min.css", CSS, include_str!("assets/uPlot.min.css")),
    (
        "uPlot.LICENSE",
        "text/plain; charset=utf-8",
        include_str!("assets/uPlot.LICENSE"),
    ),
];

/// Nothing but this server's own script and style may run or load on the page.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the dashboard page. The prefix it is mounted under is written into it
/// (it holds only `[A-Za-z0-9._~/-]`), so its requests go to the right place.
pub(crate) async fn index(State(app): State<AppState>) -> Response {
    let page = INDEX.replace("__BASE__", &app.prefix);
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// `GET /prefix`: redirects to `/prefix/`, where the dashboard is.
pub(crate) async fn to_index(State(app): State<AppState>) -> Redirect {
    Redirect::permanent(&format!("{}/", app.prefix))
}

/// `GET /assets/app.js`.
pub(crate) async fn script() -> Response {
    asset(JS, SCRIPT)
}

/// `GET /assets/app.css`.
pub(crate) async fn style() -> Response {
    asset(CSS, STYLE)
}

/// `GET /assets/{name}`: one of [`ASSETS`]; 404 for any other name.
pub(crate) async fn asset_named(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => asset(kind, body),
        None => crate::error::ApiError::not_found("no such asset").into_response(),
    }
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
