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
}
