//! Typed HTTP errors: a status and one clear message, sent as `{"error": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use batchdb::Error;

/// An error response: an HTTP status and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The status sent.
    pub status: StatusCode,
    /// The message sent in the body as `{"error": message}`.
    pub message: String,
}

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 Not Found.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<Error> for ApiError {
    /// Client mistakes (a bad hash, selector or option, a broken upload) are 4xx;
    /// what is missing is 404; anything else is a 500, logged here.
    fn from(e: Error) -> ApiError {
        let status = match &e {
            Error::InvalidHash { .. } | Error::Config { .. } | Error::Stream { .. } => {
                StatusCode::BAD_REQUEST
            }
            Error::BlobNotFound(_)
            | Error::JobNotFound(_)
            | Error::InstanceNotFound(_)
            | Error::BatchNotFound(_) => StatusCode::NOT_FOUND,
            Error::Fenced { .. } => StatusCode::CONFLICT,
            _ => {
                tracing::error!("{e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, e.to_string().replace('\n', " "))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The fallback for paths no route serves.
pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}

/// The fallback for a known path asked with a method it does not take (axum adds
/// the `Allow` header).
pub(crate) async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} is not allowed here"),
    )
}

/// Gives every error response the JSON body `{"error": "one line"}`, whoever made it:
/// an extractor's rejection (a path segment that is not UTF-8, say) answers in plain
/// text, and that must not break the contract.
pub(crate) async fn json_errors(r: Response) -> Response {
    let (status, ctype) = (r.status(), r.headers().get(header::CONTENT_TYPE).cloned());
    let is_json = ctype
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return r;
    }
    let (mut parts, body) = r.into_parts();
    // A rejection's text is a line or two; anything longer is cut.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut msg = String::from_utf8_lossy(&text)
        .replace('\n', " ")
        .trim()
        .to_string();
    if msg.is_empty() {
        msg = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let json = Json(serde_json::json!({ "error": msg })).into_response();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, json.into_body())
}

/// The longest request target (path and query) answered; longer is 414.
pub(crate) const MAX_URI: usize = 8 * 1024;
/// The most request header fields answered; more is 431.
pub(crate) const MAX_HEADERS: usize = 100;
/// The most bytes of request header fields (names and values) answered; more is 431.
pub(crate) const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Answers requests past the size limits with 414 or 431 and the JSON error body.
/// The connection layer lets larger heads through to here, up to the HTTP parser's
/// own hard limits (64 KiB of target, 256 fields, about 400 KiB in all); past those
/// the parser answers by itself, and `bare` gives that answer the JSON body too.
pub(crate) async fn request_limits(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("request target of {target} bytes: at most {MAX_URI} are accepted"),
        )
        .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "{} header fields of {bytes} bytes: at most {MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes are accepted",
                headers.len()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_corrupt_database_is_a_server_error_on_every_backend() {
        let e = ApiError::from(Error::Corrupt {
            location: "postgres://h/db".into(),
            what: "invalid hash \"x\"".into(),
        });
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(e.message.contains("postgres://h/db"), "{}", e.message);
    }
}
