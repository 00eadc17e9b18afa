//! The guard in front of every route: loopback `Host` check, cross-site refusal for
//! mutating requests, and the bearer token.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::AppState;
use crate::error::ApiError;

/// Checks a request before any handler sees it.
///
/// - With [`crate::ServeOptions::local_hosts_only`], a `Host` that is not a loopback
///   name is refused (403): DNS rebinding cannot reach a server bound to 127.0.0.1.
/// - A mutating request (not `GET`/`HEAD`) sent by a page of another origin is
///   refused (403), token or not: no web site can queue a shell script here.
/// - With a token, mutating requests (and, with `auth_reads`, reads) need
///   `Authorization: Bearer <token>` (401 otherwise). `/healthz` and the dashboard's
///   static page and assets, which hold no data, never need it.
pub(crate) async fn guard(State(app): State<AppState>, req: Request, next: Next) -> Response {
    match check(&app, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check(app: &AppState, req: &Request) -> Result<(), ApiError> {
    let headers = req.headers();
    if app.opts.local_hosts_only && !loopback_host(headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Host is not a loopback name; this server only answers requests for localhost",
        ));
    }
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if !read && cross_site(headers) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "cross-origin request refused",
        ));
    }
    let path = req.uri().path();
    let rel = path.strip_prefix(app.prefix.as_str()).unwrap_or(path);
    if crate::worker::is_worker_path(rel) {
        return worker_check(app, headers);
    }
    let Some(token) = app.opts.token.as_deref() else {
        return Ok(());
    };
    let public = matches!(rel, "" | "/" | "/healthz") || rel.starts_with("/assets/");
    if read && (public || !app.opts.auth_reads) {
        return Ok(());
    }
    let given = bearer(headers).or_else(|| {
        if read {
            query_token(req.uri().query().unwrap_or(""))
        } else {
            None
        }
    });
    match given {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "wrong token")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this request needs the server's token: Authorization: Bearer <token>",
        )),
    }
}

/// The worker endpoints: the worker token where one is set (and only it), else the
/// client token where one is set, else open. Reads need it too (a payload is data).
fn worker_check(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(token) = app
        .opts
        .worker_token
        .as_deref()
        .or(app.opts.token.as_deref())
    else {
        return Ok(());
    };
    match bearer(headers) {
        Some(g) if same(g.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong worker token",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the worker endpoints need the server's worker token: Authorization: Bearer <token>",
        )),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim().to_string())
}

fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let v = kv.strip_prefix("access_token=")?;
        Some(percent_decode(v))
    })
}

/// Decodes `%XX` escapes and `+` (a token is usually plain, but a browser may encode).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return true;
        }
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .split_once("://")
        .map_or(origin, |(_, rest)| rest)
        .trim_end_matches('/');
    !origin_host.eq_ignore_ascii_case(host)
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        // HTTP/1.0 without Host: not from a browser.
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(n, _)| n)
    } else {
        host.rsplit_once(':').map_or(host, |(n, _)| n)
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
