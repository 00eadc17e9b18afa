//! `GET /blob/{id}`: a blob, streamed, with `ETag`, immutable caching and `Range`.

use std::ops::Range;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use batchdb::Hash;
use futures_util::StreamExt;
use tokio_util::io::ReaderStream;

use crate::AppState;
use crate::error::ApiError;

/// Read size when streaming a blob out.
const CHUNK: usize = 64 * 1024;

/// A blob's name never changes what it holds: cache it for a year.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// `GET /blob/{id}` (and `HEAD`): the blob's bytes as `application/octet-stream`.
///
/// The id must be 64 lowercase hex characters (400 otherwise, before anything
/// touches the store). The `ETag` is the quoted hash; `If-None-Match` naming it gets
/// 304. A full read is verified against the hash as it streams: a corrupt blob's
/// response breaks off instead of ending cleanly. With the blob's size known (a
/// directory store), the response has `Content-Length` and a single `Range`
/// (`bytes=a-b`, `bytes=a-`, `bytes=-n`) gets 206 with `Content-Range`, or 416 when
/// it lies past the end; several ranges, or an `If-Range` that does not match, get
/// the whole blob.
pub(crate) async fn get_blob(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hash: Hash = id.parse()?;
    let size = blob_size(&app, &hash).await?;
    let etag = format!("\"{hash}\"");
    let mut common = HeaderMap::new();
    common.insert(header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        common.insert(header::ETAG, v);
    }
    common.insert(
        header::ACCEPT_RANGES,
        HeaderValue::from_static(if size.is_some() { "bytes" } else { "none" }),
    );
    if if_none_match(&headers, &hash) {
        return Ok((StatusCode::NOT_MODIFIED, common).into_response());
    }
    common.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    common.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Job output is untrusted: a browser opening it must never run it as a page.
    common.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    let Some(size) = size else {
        let body = verified_body(app.db.get(&hash).await?);
        return Ok((common, body).into_response());
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_ok(&headers, &hash));
    match range.map(|r| parse_range(r, size)) {
        None | Some(RangeSpec::Ignore) => {
            let body = verified_body(app.db.get(&hash).await?);
            common.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            Ok((common, body).into_response())
        }
        Some(RangeSpec::Unsatisfiable) => {
            common.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{size}"))?,
            );
            let mut r = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable: the blob has {size} bytes"),
            )
            .into_response();
            r.headers_mut().extend(common);
            Ok(r)
        }
        Some(RangeSpec::Bytes(r)) => {
            let reader = app.db.get_range(&hash, r.clone()).await?;
            common.insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes {}-{}/{size}", r.start, r.end - 1))?,
            );
            common.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            let body = Body::from_stream(ReaderStream::with_capacity(reader, CHUNK));
            Ok((StatusCode::PARTIAL_CONTENT, common, body).into_response())
        }
    }
}

/// A verified blob's bytes as a body that never ends cleanly on a corrupt blob.
///
/// The store's reader finds corruption only at the end of the blob, after every
/// byte has passed; with a `Content-Length`, a client would already hold a
/// complete-looking response. So the last chunk is held back until the reader has
/// ended well: on an error it is never sent and the response breaks off short.
fn verified_body(reader: batchdb::blob::BlobReader) -> Body {
    let chunks = ReaderStream::with_capacity(reader, CHUNK);
    let held = futures_util::stream::unfold(
        (chunks, None::<axum::body::Bytes>, false),
        |(mut chunks, mut held, done)| async move {
            if done {
                return None;
            }
            loop {
                match chunks.next().await {
                    Some(Ok(b)) => {
                        if let Some(prev) = held.replace(b) {
                            return Some((Ok(prev), (chunks, held, false)));
                        }
                    }
                    Some(Err(e)) => {
                        tracing::error!("sending a blob: {e}");
                        return Some((Err(e), (chunks, None, true)));
                    }
                    None => return held.take().map(|b| (Ok(b), (chunks, None, true))),
                }
            }
        },
    );
    Body::from_stream(held)
}

fn header_value(s: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(s)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The blob's size (inline in the queue or in the blob store);
/// [`batchdb::Error::BlobNotFound`] if it is absent.
async fn blob_size(app: &AppState, hash: &Hash) -> Result<Option<u64>, ApiError> {
    Ok(Some(app.db.blob_size(hash).await?))
}

/// Whether an `If-None-Match` header names this blob (or is `*`).
fn if_none_match(headers: &HeaderMap, hash: &Hash) -> bool {
    let hex = hash.to_hex();
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim())
        .any(|t| t == "*" || t.trim_start_matches("W/").trim_matches('"') == hex)
}

/// Whether a `Range` may be honoured: no `If-Range`, or one naming this blob's
/// (strong) ETag.
fn if_range_ok(headers: &HeaderMap, hash: &Hash) -> bool {
    match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(v) => v.trim() == format!("\"{hash}\""),
    }
}

/// What a `Range` header asks for.
#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// One satisfiable range, clamped to the blob.
    Bytes(Range<u64>),
    /// A well-formed range past the end.
    Unsatisfiable,
    /// Malformed, not `bytes`, or several ranges: answer with the whole blob.
    Ignore,
}

fn parse_range(v: &str, size: u64) -> RangeSpec {
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.trim(), b.trim()) {
        ("", n) => match num(n) {
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if size == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Bytes(size.saturating_sub(n)..size),
            None => RangeSpec::Ignore,
        },
        (a, "") => match num(a) {
            Some(a) if a >= size => RangeSpec::Unsatisfiable,
            Some(a) => RangeSpec::Bytes(a..size),
            None => RangeSpec::Ignore,
        },
        (a, b) => match (num(a), num(b)) {
            (Some(a), Some(b)) if a > b => RangeSpec::Ignore,
            (Some(a), Some(_)) if a >= size => RangeSpec::Unsatisfiable,
            (Some(a), Some(b)) => RangeSpec::Bytes(a..b.saturating_add(1).min(size)),
            _ => RangeSpec::Ignore,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeSpec::*;
        assert_eq!(parse_range("bytes=0-9", 100), Bytes(0..10));
        assert_eq!(parse_range("bytes=90-", 100), Bytes(90..100));
        assert_eq!(parse_range("bytes=-10", 100), Bytes(90..100));
        assert_eq!(parse_range("bytes=-1000", 100), Bytes(0..100));
        assert_eq!(parse_range("bytes=50-1000", 100), Bytes(50..100));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 100), Ignore);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ignore);
        assert_eq!(parse_range("items=0-1", 100), Ignore);
        assert_eq!(parse_range("bytes=x-1", 100), Ignore);
        assert_eq!(parse_range("bytes=+1-2", 100), Ignore);
    }
}
