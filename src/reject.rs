//! Rejections: how a [`Denial`] becomes a response, and the response body every keygate layer
//! returns.
//!
//! HTTP clients get RFC 9457 `application/problem+json`:
//!
//! ```json
//! {"type":"about:blank","title":"Unauthorized","status":401,
//!  "detail":"The API key is not valid.","code":"invalid_key"}
//! ```
//!
//! with `WWW-Authenticate` on 401 (RFC 6750) and on `insufficient_scope`, and `Retry-After`
//! (whole seconds, rounded up, at least 1) when the denial says how long to wait. Requests
//! whose `content-type` starts with `application/grpc` get a trailers-only gRPC answer: HTTP
//! 200, `grpc-status` (16 UNAUTHENTICATED, 7 PERMISSION_DENIED, 8 RESOURCE_EXHAUSTED,
//! 14 UNAVAILABLE) and `grpc-message`, never a bare HTTP error status.
//!
//! Rate and quota denials carry the state of their policies ([`Denial::limits`]): the
//! default renderer writes them as the `RateLimit-Policy` and `RateLimit` fields of
//! draft-ietf-httpapi-ratelimit-headers-10 ([`append_ratelimit_fields`]), lists the broken
//! ones as `violated-policies`, and gives `quota_exceeded` the problem type
//! [`QUOTA_EXCEEDED_TYPE`].
//!
//! The layer puts the exact [`Denial`] in the response's extensions after rendering, so
//! outer layers (audit) see it whatever the renderer did.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::{Denial, DenialCode};

// The wire protocol of a request (HTTP or gRPC) is keygate-core's `audit::Transport`, the one
// name for it in both crates (audit events record it; rejections are rendered by it).
use crate::core::audit::Transport;

/// The transport of `req`, from its `content-type` (`application/grpc...` is gRPC).
pub fn transport_of<B>(req: &Request<B>) -> Transport {
    match req.headers().get(CONTENT_TYPE) {
        Some(ct) if ct.as_bytes().starts_with(b"application/grpc") => Transport::Grpc,
        _ => Transport::Http,
    }
}

/// What a renderer knows about the rejected request.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RenderContext<'a> {
    /// The transport of the request (HTTP or gRPC).
    pub protocol: Transport,
    /// The request method.
    pub method: &'a Method,
    /// The request path (no query string).
    pub path: &'a str,
}

impl<'a> RenderContext<'a> {
    /// The context of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        RenderContext {
            protocol: transport_of(req),
            method: req.method(),
            path: req.uri().path(),
        }
    }
}

/// Turns a denial into a response. Implement it for your own error shape; the layers add the
/// [`Denial`] to the response's extensions afterwards.
///
/// A custom renderer that only wants its own JSON can delegate gRPC requests to
/// [`DefaultRenderer`].
pub trait Renderer: Send + Sync + 'static {
    /// The response for `denial`. It must not contain the presented credential (it is not
    /// given one).
    fn render(&self, denial: &Denial, cx: &RenderContext<'_>) -> Response<Bytes>;
}

/// The HTTP status of a denial code: 401 for credential problems, 403 for authorization,
/// 404 for a route no rule knows, 413 for a request costing more than a limit ever allows,
/// 429 for rate and quota, 503 for an unreachable store.
pub fn http_status(code: DenialCode) -> StatusCode {
    match code {
        DenialCode::InsufficientScope
        | DenialCode::ResourceForbidden
        | DenialCode::IpNotAllowed
        | DenialCode::InsecureTransport => StatusCode::FORBIDDEN,
        DenialCode::RateLimited | DenialCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        DenialCode::CostExceedsLimit => StatusCode::PAYLOAD_TOO_LARGE,
        DenialCode::UnknownRoute => StatusCode::NOT_FOUND,
        DenialCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// The gRPC status code of a denial code: 16 UNAUTHENTICATED, 7 PERMISSION_DENIED,
/// 8 RESOURCE_EXHAUSTED (rate, quota, and a request costing more than a limit allows),
/// 12 UNIMPLEMENTED (unknown route), 14 UNAVAILABLE.
pub fn grpc_status(code: DenialCode) -> u8 {
    match http_status(code) {
        StatusCode::FORBIDDEN => 7,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => 8,
        StatusCode::NOT_FOUND => 12,
        StatusCode::SERVICE_UNAVAILABLE => 14,
        _ => 16,
    }
}

/// Whole seconds to wait, rounded up, at least 1 (a 0.3 s wait is `1`, never `0`).
pub fn retry_after_secs(wait: Duration) -> u64 {
    crate::core::usage::ceil_secs(wait).max(1)
}

/// The default renderer: problem+json for HTTP, trailers-only for gRPC.
#[derive(Debug, Clone)]
pub struct DefaultRenderer {
    realm: String,
    exact_codes: bool,
}

impl Default for DefaultRenderer {
    fn default() -> Self {
        DefaultRenderer {
            realm: "keygate".to_owned(),
            exact_codes: false,
        }
    }
}

impl DefaultRenderer {
    /// The default renderer (realm `keygate`, public codes).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the realm of `WWW-Authenticate` challenges. Quotes and backslashes are dropped.
    pub fn realm(mut self, realm: &str) -> Self {
        self.realm = realm
            .chars()
            .filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c))
            .collect();
        self
    }

    /// Shows clients the exact code (`revoked_key`, `disabled_key`) instead of the public one
    /// (`invalid_key`; see [`DenialCode::public`]). Off by default.
    pub fn expose_exact_codes(mut self, yes: bool) -> Self {
        self.exact_codes = yes;
        self
    }

    fn shown(&self, denial: &Denial) -> (DenialCode, &'static str) {
        if self.exact_codes || denial.code().public() == denial.code() {
            (denial.code(), "")
        } else {
            let public = denial.code().public();
            (public, public.description())
        }
    }
}

impl Renderer for DefaultRenderer {
    fn render(&self, denial: &Denial, cx: &RenderContext<'_>) -> Response<Bytes> {
        let (code, replaced_detail) = self.shown(denial);
        let detail = if replaced_detail.is_empty() {
            denial.detail()
        } else {
            replaced_detail
        };
        match cx.protocol {
            Transport::Grpc => grpc_response(denial, code, detail),
            Transport::Http => self.http_response(denial, code, detail),
        }
    }
}

impl DefaultRenderer {
    fn http_response(&self, denial: &Denial, code: DenialCode, detail: &str) -> Response<Bytes> {
        let status = http_status(code);
        let problem = Problem {
            kind: if code == DenialCode::QuotaExceeded {
                QUOTA_EXCEEDED_TYPE
            } else {
                "about:blank"
            },
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            code: code.as_str(),
            required_scope: denial.required_scope(),
            violated_policies: denial.violated_policies().collect(),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut res = Response::new(Bytes::from(body));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(challenge) = self.challenge(denial, code, detail) {
            h.insert(WWW_AUTHENTICATE, challenge);
        }
        if let Some(wait) = denial.retry_after() {
            h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
        }
        append_ratelimit_fields(h, denial.limits());
        res
    }

    fn challenge(&self, denial: &Denial, code: DenialCode, detail: &str) -> Option<HeaderValue> {
        let realm = &self.realm;
        let text = match code {
            DenialCode::MissingKey => format!("Bearer realm=\"{realm}\""),
            DenialCode::InsufficientScope => match denial.required_scope() {
                Some(scope) => format!(
                    "Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{}\"",
                    quoted_safe(scope)
                ),
                None => format!("Bearer realm=\"{realm}\", error=\"insufficient_scope\""),
            },
            c if c.is_authentication() => format!(
                "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{}\"",
                quoted_safe(detail)
            ),
            _ => return None,
        };
        HeaderValue::from_str(&text).ok()
    }
}

/// The problem type of `quota_exceeded` rejections (draft-ietf-httpapi-ratelimit-headers-10,
/// section 4.1), with the `violated-policies` member.
pub const QUOTA_EXCEEDED_TYPE: &str =
    "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// Appends the IETF `RateLimit-Policy` and `RateLimit` fields
/// (draft-ietf-httpapi-ratelimit-headers-10) describing `states`; nothing when empty. Fields
/// already present (another layer's policies) are kept: a structured-field list may be split
/// over several field lines.
pub fn append_ratelimit_fields(h: &mut http::HeaderMap, states: &[crate::core::usage::LimitState]) {
    if states.is_empty() {
        return;
    }
    let policy = crate::core::usage::LimitState::policy_field(states);
    let limit = crate::core::usage::LimitState::limit_field(states);
    if let (Ok(p), Ok(l)) = (
        HeaderValue::from_str(&policy),
        HeaderValue::from_str(&limit),
    ) {
        h.append(&RATELIMIT_POLICY, p);
        h.append(&RATELIMIT, l);
    }
}

/// The `RateLimit-Policy` field name.
pub static RATELIMIT_POLICY: http::header::HeaderName =
    http::header::HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` field name.
pub static RATELIMIT: http::header::HeaderName = http::header::HeaderName::from_static("ratelimit");

/// The RFC 9457 problem document, its members in the RFC's order.
#[derive(serde::Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    title: &'a str,
    status: u16,
    detail: &'a str,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    required_scope: Option<&'a str>,
    #[serde(rename = "violated-policies", skip_serializing_if = "Vec::is_empty")]
    violated_policies: Vec<&'a str>,
}

/// Keeps the characters RFC 6750 allows in `error_description` and `scope` values.
fn quoted_safe(s: &str) -> String {
    s.chars()
        .filter(|c| matches!(c, ' '..='~') && *c != '"' && *c != '\\')
        .collect()
}

/// A trailers-only gRPC answer. Besides `grpc-status` and `grpc-message`, a rate-limit or
/// quota refusal carries the same hints as over HTTP, as ASCII metadata a client can read
/// from the status: `retry-after` (whole seconds, rounded up) and the `ratelimit-policy` /
/// `ratelimit` fields.
fn grpc_response(denial: &Denial, code: DenialCode, detail: &str) -> Response<Bytes> {
    let mut res = Response::new(Bytes::new());
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(
        "grpc-status",
        HeaderValue::from(u16::from(grpc_status(code))),
    );
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&format!("{code}: {detail}"))) {
        h.insert("grpc-message", v);
    }
    if let Some(wait) = denial.retry_after() {
        h.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(wait)));
    }
    append_ratelimit_fields(h, denial.limits());
    res
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks (bytes outside 0x20–0x7E
/// and `%`).
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds the rejection response of `denial` for `req` with `renderer`, and puts the denial
/// in its extensions.
pub(crate) fn rejection<B, ReqB>(
    renderer: &dyn Renderer,
    denial: Denial,
    req: &Request<ReqB>,
) -> Response<ResponseBody<B>> {
    tracing::debug!(
        code = denial.code().as_str(),
        method = %req.method(),
        path = req.uri().path(),
        "request denied"
    );
    let res = renderer.render(&denial, &RenderContext::of(req));
    let mut res = res.map(ResponseBody::rejected);
    res.extensions_mut().insert(denial);
    res
}

pin_project! {
    /// Response body of every keygate layer: the inner service's body, or the bytes of a
    /// rejection.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        Rejected { data: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        ResponseBody {
            kind: Kind::Inner { body },
        }
    }

    /// A rejection body of these bytes.
    pub fn rejected(data: Bytes) -> Self {
        ResponseBody {
            kind: Kind::Rejected {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// Whether this is a rejection body.
    pub fn is_rejection(&self) -> bool {
        matches!(self.kind, Kind::Rejected { .. })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Rejected { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Rejected { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Rejected { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B: Default> Default for ResponseBody<B> {
    fn default() -> Self {
        ResponseBody::inner(B::default())
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { .. } => f.write_str("ResponseBody::Inner"),
            Kind::Rejected { data } => f
                .debug_struct("ResponseBody::Rejected")
                .field("len", &data.as_ref().map_or(0, Bytes::len))
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_at_least_one() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(300)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(59)), 59);
    }

    #[test]
    fn every_code_has_a_status_and_a_grpc_code() {
        for code in DenialCode::ALL {
            let s = http_status(code);
            let g = grpc_status(code);
            assert!(
                matches!(s.as_u16(), 401 | 403 | 404 | 413 | 429 | 503),
                "{code}"
            );
            assert!(matches!(g, 16 | 7 | 8 | 12 | 14), "{code}");
        }
        assert_eq!(grpc_status(DenialCode::InvalidKey), 16);
        assert_eq!(grpc_status(DenialCode::RateLimited), 8);
        assert_eq!(
            http_status(DenialCode::CostExceedsLimit),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(grpc_status(DenialCode::CostExceedsLimit), 8);
        assert_eq!(http_status(DenialCode::UnknownRoute), StatusCode::NOT_FOUND);
        assert_eq!(grpc_status(DenialCode::UnknownRoute), 12);
        assert_eq!(
            http_status(DenialCode::CorruptKey),
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a b%é"), "a b%25%C3%A9");
    }

    #[test]
    fn realm_drops_quotes() {
        let r = DefaultRenderer::new().realm("my \"realm\"");
        assert_eq!(r.realm, "my realm");
    }
}
