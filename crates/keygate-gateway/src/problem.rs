//! The gateway's own refusals and upstream failures, as RFC 9457
//! `application/problem+json` with a stable `code` (like keygate's layers):
//!
//! | status | code | when |
//! |---|---|---|
//! | 400 | `bad_path` | a path with a `.` or `..` segment or an encoded `/` or `\` |
//! | 400 | `bad_body` | a body the gateway must rewrite is not JSON of the expected shape |
//! | 403 | `tenant_unscopable` | a key with a tenant asks for something that cannot be scoped to it |
//! | 404 | `point_not_found` | a tenant key names a point that is not its own |
//! | 409 | `tenant_conflict` | a tenant key writes a point id another owner holds |
//! | 413 | `body_too_large` | a body over the configured cap |
//! | 502 | `upstream_error` | the upstream's connection failed or its answer was unreadable |
//! | 503 | `upstream_unavailable` | the upstream refused the connection or could not be reached |
//! | 504 | `upstream_timeout` | the upstream did not answer in time |
//! | 400 | `bad_message` | a gRPC request whose first message cannot be read for its collection |
//! | 404 | `unknown_route` | a gRPC method the gRPC preset does not list (or gRPC is off) |
//! | 403 | `resource_forbidden` | a later message of a gRPC request names a collection the key may not use |
//! | 408 | `message_timeout` | a gRPC request's first message did not arrive within `upstream.timeout` |
//! | 415 | `not_grpc` | a gRPC method path called without `content-type: application/grpc` |
//!
//! A gRPC client (`content-type: application/grpc...`) gets the same refusals in gRPC form
//! ([`Refusal::grpc_response`]): HTTP 200, trailers-only, `grpc-status` from
//! [`Refusal::grpc_status`] and `grpc-message` `CODE: DETAIL` (as keygate's layers write
//! theirs).

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};

/// A refusal or failure the gateway answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status.
    pub status: u16,
    /// The stable code.
    pub code: &'static str,
    /// What happened, for a person (never a credential or an upstream address).
    pub detail: String,
}

impl Refusal {
    fn new(status: u16, code: &'static str, detail: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            detail: detail.into(),
        }
    }

    /// `400 bad_body`.
    pub fn bad_body(detail: impl Into<String>) -> Self {
        Refusal::new(400, "bad_body", detail)
    }

    /// `400 bad_path`.
    pub fn bad_path() -> Self {
        Refusal::new(
            400,
            "bad_path",
            "The path has a dot segment or an encoded separator, which is not forwarded.",
        )
    }

    /// `403 tenant_unscopable`.
    pub fn tenant_unscopable(detail: impl Into<String>) -> Self {
        Refusal::new(403, "tenant_unscopable", detail)
    }

    /// `404 point_not_found`.
    pub fn point_not_found() -> Self {
        Refusal::new(404, "point_not_found", "No such point.")
    }

    /// `409 tenant_conflict`.
    pub fn tenant_conflict() -> Self {
        Refusal::new(
            409,
            "tenant_conflict",
            "An id in this request is held by another owner; choose other ids.",
        )
    }

    /// `413 body_too_large`.
    pub fn body_too_large(limit: u64) -> Self {
        Refusal::new(
            413,
            "body_too_large",
            format!("The request body is larger than {limit} bytes."),
        )
    }

    /// `502 upstream_error`.
    pub fn upstream_error() -> Self {
        Refusal::new(
            502,
            "upstream_error",
            "The upstream server's answer failed.",
        )
    }

    /// `503 upstream_unavailable`.
    pub fn upstream_unavailable() -> Self {
        Refusal::new(
            503,
            "upstream_unavailable",
            "The upstream server cannot be reached.",
        )
    }

    /// `504 upstream_timeout`.
    pub fn upstream_timeout() -> Self {
        Refusal::new(
            504,
            "upstream_timeout",
            "The upstream server did not answer in time.",
        )
    }

    /// `400 bad_message`: a gRPC request whose first message cannot be scoped.
    pub fn bad_message(detail: impl Into<String>) -> Self {
        Refusal::new(400, "bad_message", detail)
    }

    /// `404 unknown_route` for a gRPC method the gateway does not forward.
    pub fn unknown_method(detail: impl Into<String>) -> Self {
        Refusal::new(404, "unknown_route", detail)
    }

    /// `403 resource_forbidden`: a later gRPC message names a collection the key may not
    /// use (the first one is refused by keygate's own denial).
    pub fn collection_refused(name: &str) -> Self {
        let shown = shown_collection(name, "A collection");
        Refusal::new(
            403,
            "resource_forbidden",
            format!("{shown} named in a later message is refused: the key's collection patterns do not match it."),
        )
    }

    /// `408 message_timeout`: a gRPC request whose first message did not arrive within the
    /// upstream timeout.
    pub fn message_timeout() -> Self {
        Refusal::new(
            408,
            "message_timeout",
            "The request's first message did not arrive in time.",
        )
    }

    /// `415 not_grpc`: a gRPC method path without a gRPC content type.
    pub fn not_grpc() -> Self {
        Refusal::new(
            415,
            "not_grpc",
            "gRPC methods take content-type application/grpc.",
        )
    }

    /// The gRPC status of the refusal: 3 INVALID_ARGUMENT (400, 415), 7 PERMISSION_DENIED
    /// (403), 12 UNIMPLEMENTED (404), 8 RESOURCE_EXHAUSTED (413), 4 DEADLINE_EXCEEDED
    /// (408, 504), 14 UNAVAILABLE (502, 503), else 13 INTERNAL.
    pub fn grpc_status(&self) -> u8 {
        match self.status {
            400 | 415 => 3,
            403 => 7,
            404 => 12,
            409 => 6,
            413 => 8,
            408 | 504 => 4,
            502 | 503 => 14,
            _ => 13,
        }
    }

    /// The refusal in gRPC form: HTTP 200, `content-type: application/grpc`, no body, and
    /// `grpc-status` / `grpc-message` in the head (a trailers-only answer).
    pub fn grpc_response(&self) -> Response<Bytes> {
        let mut res = Response::new(Bytes::new());
        let h = res.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-status",
            HeaderValue::from(u16::from(self.grpc_status())),
        );
        let message = grpc_percent_encode(&format!("{}: {}", self.code, self.detail));
        if let Ok(v) = HeaderValue::from_str(&message) {
            h.insert("grpc-message", v);
        }
        res
    }

    /// The problem document.
    pub fn response(&self) -> Response<Bytes> {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Error"),
            "status": status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        let mut res = Response::new(Bytes::from(body.to_string()));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// Percent-encodes a `grpc-message` (bytes outside 0x20-0x7E, and `%`), as the gRPC
/// HTTP/2 protocol asks.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Longest collection name echoed in a refusal.
const MAX_ECHOED: usize = 64;

/// `The collection "name"` when `name` is short and printable (safe to echo in a refusal),
/// else `fallback`.
pub(crate) fn shown_collection(name: &str, fallback: &str) -> String {
    if !name.is_empty()
        && name.len() <= MAX_ECHOED
        && name
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        format!("The collection \"{name}\"")
    } else {
        fallback.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_document_has_status_code_and_type() {
        let res = Refusal::upstream_timeout().response();
        assert_eq!(res.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/problem+json");
        let v: serde_json::Value = serde_json::from_slice(res.body()).expect("json");
        assert_eq!(v["code"], "upstream_timeout");
        assert_eq!(v["status"], 504);
        let res = Refusal::upstream_unavailable().response();
        assert_eq!(res.headers()[http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn grpc_refusals_are_trailers_only() {
        let res = Refusal::upstream_timeout().grpc_response();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(res.headers()["grpc-status"], "4");
        assert!(res.body().is_empty());
        let res = Refusal::bad_message("caf\u{e9} 100%").grpc_response();
        assert_eq!(res.headers()["grpc-status"], "3");
        assert_eq!(
            res.headers()["grpc-message"],
            "bad_message: caf%C3%A9 100%25"
        );
        assert_eq!(Refusal::tenant_unscopable("x").grpc_status(), 7);
        assert_eq!(Refusal::unknown_method("x").grpc_status(), 12);
        assert_eq!(Refusal::body_too_large(1).grpc_status(), 8);
        assert_eq!(Refusal::upstream_unavailable().grpc_status(), 14);
        assert_eq!(Refusal::upstream_error().grpc_status(), 14);
    }
}
