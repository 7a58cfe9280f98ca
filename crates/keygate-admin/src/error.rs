//! Admin API errors: problem+json with a stable `code`.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::StatusCode;
use serde::Serialize;

use keygate::core::usage::UsageError;
use keygate::LifecycleError;
use keygate::StoreError;

/// A refused admin call: status, stable code and a detail that never holds a key.
#[derive(Debug)]
pub(crate) struct AdminError {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl AdminError {
    pub(crate) fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        AdminError {
            status,
            code,
            detail: detail.into(),
        }
    }

    /// 400 `invalid_request`.
    pub(crate) fn invalid(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", detail)
    }

    /// 400 `invalid_json`. An unknown field is named with the full list of allowed ones;
    /// other messages are serde's, which quote at most a short piece of input (a field
    /// name, a value's type), clipped and with anything shaped like an API key hidden.
    pub(crate) fn json(e: &serde_json::Error) -> Self {
        let what = match e.classify() {
            serde_json::error::Category::Data => "the body does not have the expected fields",
            _ => "the body is not valid JSON",
        };
        let text = e.to_string();
        let detail = match unknown_field(&text) {
            Some(message) => message,
            None => {
                let msg: String = hide_keys(&text).chars().take(300).collect();
                format!("{what}: {msg}")
            }
        };
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", detail)
    }
    /// 404 `key_not_found`.
    pub(crate) fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no key with id {id}"),
        )
    }

    /// 403 `privilege_escalation`.
    pub(crate) fn escalation(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "privilege_escalation", detail)
    }

    /// The detail text.
    #[cfg(test)]
    pub(crate) fn detail(&self) -> &str {
        &self.detail
    }

    /// The detail text, owned (a refusal handed back through the key manager).
    pub(crate) fn detail_text(self) -> String {
        self.detail
    }

    pub(crate) fn store(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the key store could not be reached; nothing was changed",
            ),
            StoreError::NotFound(id) => Self::not_found(id.as_str()),
            StoreError::AlreadyExists(_) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "a key with this id already exists",
            ),
            StoreError::Conflict { kind, .. } => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "the {kind} was changed by another request since it was read; nothing was \
                     written: read it again and retry"
                ),
            ),
            StoreError::NameTaken { kind, name } => Self::new(
                StatusCode::CONFLICT,
                "name_taken",
                format!(
                    "a {kind} named {:?} already exists",
                    crate::input::clip(name)
                ),
            ),
            StoreError::NoSuchName { kind, name } => Self::new(
                StatusCode::NOT_FOUND,
                if *kind == "role" {
                    "role_not_found"
                } else {
                    "identity_not_found"
                },
                format!("no {kind} named {:?}", crate::input::clip(name)),
            ),
            StoreError::InUse {
                kind,
                name,
                holders,
            } => Self::new(
                StatusCode::CONFLICT,
                if *kind == "identity" {
                    "identity_in_use"
                } else {
                    "in_use"
                },
                format!(
                    "the {kind} {:?} still owns {holders} key(s) that are not revoked; move \
                     them to another identity or revoke them first",
                    crate::input::clip(name)
                ),
            ),
            StoreError::Unsupported(what) => Self::new(
                StatusCode::NOT_IMPLEMENTED,
                "unsupported",
                format!("this key store does not keep {what}"),
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_corrupt",
                "a stored key record could not be read",
            ),
        }
    }

    pub(crate) fn usage(e: &UsageError) -> Self {
        match e {
            UsageError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the usage store could not be reached",
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store_corrupt",
                "stored usage could not be read",
            ),
        }
    }
}

impl From<LifecycleError> for AdminError {
    fn from(e: LifecycleError) -> Self {
        match e {
            LifecycleError::Invalid(spec) => Self::invalid(spec.to_string()),
            LifecycleError::NotFound(id) => Self::not_found(id.as_str()),
            e @ LifecycleError::WrongStatus { .. } => {
                Self::new(StatusCode::CONFLICT, "wrong_status", e.to_string())
            }
            e @ LifecycleError::Expired(_) => {
                Self::new(StatusCode::CONFLICT, "wrong_status", e.to_string())
            }
            LifecycleError::Store(e) => Self::store(&e),
            LifecycleError::Refused(detail) => Self::escalation(detail),
            LifecycleError::AuditClosed => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "the audit log is shut down; nothing was changed",
            ),
            LifecycleError::KeyGen(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "key_generation_failed",
                "the operating system's random number generator failed; nothing was changed",
            ),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the operation failed",
            ),
        }
    }
}

/// serde's "unknown field `x`, expected one of `a`, `b` at line 1 column 9" as
/// `unknown field "x"; the allowed fields are: a, b` (the field name clipped to 64
/// characters).
fn unknown_field(text: &str) -> Option<String> {
    let rest = text.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let field: String = hide_keys(field).chars().take(64).collect();
    let allowed: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    Some(if allowed.is_empty() {
        format!("unknown field {field:?}: this body takes no fields")
    } else {
        format!(
            "unknown field {field:?}; the allowed fields are: {}",
            allowed.join(", ")
        )
    })
}

/// `text` with every run of 20 or more letters and digits (the secret part of an API key,
/// never a field name) replaced by `[hidden]`.
fn hide_keys(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.chars().count() >= 20 {
            out.push_str("[hidden]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: "about:blank",
            title: self.status.canonical_reason().unwrap_or("Error"),
            status: self.status.as_u16(),
            detail: &self.detail,
            code: self.code,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = self.status;
        let h = res.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res
    }
}
