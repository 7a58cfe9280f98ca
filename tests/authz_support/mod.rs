//! Test support for the authorization tests (`ScopeLayer`, `IpAllowLayer`, client
//! addresses): requests, a probe service that reports what it saw, response decoding and
//! assertions, and loopback servers that record the peer address.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use keygate::client_ip::ClientIp;
use keygate::{Denial, DenialCode, Principal};
use keygate_testkit::http::CountingService;

/// Rows a handler may return; the `tenant` attribute of the caller filters them.
pub const ROWS: [(&str, &str); 5] = [
    ("acme", "a1"),
    ("globex", "g1"),
    ("acme", "a2"),
    ("initech", "i1"),
    ("acme", "a3"),
];

/// The rows of `tenant`, comma-separated (what the probe and the axum handlers return).
pub fn rows_of(tenant: Option<&str>) -> String {
    ROWS.iter()
        .filter(|(t, _)| Some(*t) == tenant)
        .map(|(_, r)| *r)
        .collect::<Vec<_>>()
        .join(",")
}

/// An in-process request; `key` goes in `x-api-key`.
pub fn request(method: &str, path: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .body(Full::default())
        .expect("request");
    if let Some(key) = key {
        req.headers_mut()
            .insert("x-api-key", HeaderValue::from_str(key).expect("ASCII key"));
    }
    req
}

/// An in-process gRPC request (POST, `content-type: application/grpc`).
pub fn grpc_request(path: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = request("POST", path, key);
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    req
}

/// `req` with the connection's peer recorded as a plain [`SocketAddr`] extension (what a
/// plain hyper server does per connection).
pub fn from_peer<B>(mut req: Request<B>, peer: &str) -> Request<B> {
    let addr: SocketAddr = peer.parse().expect("socket address");
    req.extensions_mut().insert(addr);
    req
}

/// `req` with an extra header line (appended, bytes as given).
pub fn with_header<B>(mut req: Request<B>, name: &'static str, value: &[u8]) -> Request<B> {
    req.headers_mut().append(
        HeaderName::from_static(name),
        HeaderValue::from_bytes(value).expect("a header value http accepts"),
    );
    req
}

/// What the probe's handler saw, reported in response headers.
pub const SEEN_TENANT: &str = "x-seen-tenant";
/// The client address the handler saw (`ClientIp`), or `none`.
pub const SEEN_IP: &str = "x-seen-client-ip";
/// The key name of the principal the handler saw, or `none`.
pub const SEEN_KEY: &str = "x-seen-key";

/// A counting inner service: answers 200 with the rows of the caller's tenant as body, and
/// reports the principal's name and tenant and the `ClientIp` it saw in headers.
pub fn probe<B>(
    calls: Arc<AtomicUsize>,
) -> CountingService<impl Fn(&Request<B>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static>
{
    keygate_testkit::http::counting(calls, |req: &Request<B>| {
        let context = keygate::RequestContext::of(req.extensions());
        let principal = context.and_then(|c| c.principal());
        let ip = context.and_then(|c| c.client_ip()).map(ClientIp);
        probe_response(principal, ip)
    })
}

/// The probe's answer for `principal` and `ip`.
pub fn probe_response(
    principal: Option<&Principal>,
    ip: Option<ClientIp>,
) -> Response<Full<Bytes>> {
    let tenant = principal.and_then(Principal::tenant);
    let mut res = Response::new(Full::new(Bytes::from(rows_of(tenant))));
    let h = res.headers_mut();
    h.insert(
        SEEN_TENANT,
        HeaderValue::from_str(tenant.unwrap_or("none")).expect("ASCII tenant"),
    );
    h.insert(
        SEEN_KEY,
        HeaderValue::from_str(principal.map_or("none", Principal::name)).expect("ASCII name"),
    );
    h.insert(
        SEEN_IP,
        HeaderValue::from_str(&ip.map_or("none".to_owned(), |ClientIp(ip)| ip.to_string()))
            .expect("ASCII address"),
    );
    res
}

/// The number of calls so far.
pub fn count(calls: &AtomicUsize) -> usize {
    calls.load(Ordering::SeqCst)
}

/// A response, collected.
#[derive(Debug)]
pub struct Outcome {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The exact code of the `Denial` extension (in-process only; the wire drops it).
    pub denial: Option<DenialCode>,
    /// The required scope the `Denial` names.
    pub required_scope: Option<String>,
}

impl Outcome {
    /// The body as JSON (panics with the body when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header as text (`None` when absent).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The client address the probe saw.
    pub fn seen_ip(&self) -> Option<IpAddr> {
        match self.header(SEEN_IP) {
            None | Some("none") => None,
            Some(ip) => Some(ip.parse().expect("address")),
        }
    }
}

/// Collects `res`.
pub async fn outcome<B>(res: Response<B>) -> Outcome
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    let denial = parts.extensions.get::<Denial>();
    Outcome {
        status: parts.status,
        denial: denial.map(Denial::code),
        required_scope: denial.and_then(|d| d.required_scope().map(str::to_owned)),
        headers: parts.headers,
        body: keygate_testkit::http::body_bytes(body).await,
    }
}

/// Asserts an HTTP denial: `status`, problem+json with `code`, and (in-process) the same
/// code in the `Denial` extension. `what` labels the failure.
#[track_caller]
pub fn assert_denied(out: &Outcome, status: StatusCode, code: DenialCode, what: &str) {
    assert_eq!(out.status, status, "{what}: {}", out.text());
    assert_eq!(
        out.header("content-type"),
        Some("application/problem+json"),
        "{what}"
    );
    let json = out.json();
    assert_eq!(json["code"], code.as_str(), "{what}: {json}");
    assert_eq!(json["status"], status.as_u16(), "{what}: {json}");
    if let Some(exact) = out.denial {
        assert_eq!(exact, code, "{what}: Denial extension");
    }
}

/// Asserts a 200 answer from the probe.
#[track_caller]
pub fn assert_allowed(out: &Outcome, what: &str) {
    assert_eq!(out.status, StatusCode::OK, "{what}: {}", out.text());
    assert!(
        out.denial.is_none(),
        "{what}: a Denial on an allowed request"
    );
    assert!(
        out.header(SEEN_KEY).is_some(),
        "{what}: not the probe's answer"
    );
}

/// Asserts a trailers-only gRPC denial: HTTP 200, `grpc-status` `grpc`, a `grpc-message`
/// starting with `code`, an empty body.
#[track_caller]
pub fn assert_grpc_denied(out: &Outcome, grpc: u8, code: DenialCode, what: &str) {
    assert_eq!(out.status, StatusCode::OK, "{what}");
    assert_eq!(
        out.header("content-type"),
        Some("application/grpc"),
        "{what}"
    );
    assert_eq!(
        out.header("grpc-status"),
        Some(grpc.to_string().as_str()),
        "{what}"
    );
    let message = out.header("grpc-message").expect("grpc-message");
    assert!(message.starts_with(code.as_str()), "{what}: {message:?}");
    assert!(out.body.is_empty(), "{what}: trailers-only has no body");
    if let Some(exact) = out.denial {
        assert_eq!(exact, code, "{what}: Denial extension");
    }
}

/// The exact `WWW-Authenticate` of an `insufficient_scope` denial naming `scope`.
pub fn scope_challenge(scope: &str) -> String {
    format!(r#"Bearer realm="keygate", error="insufficient_scope", scope="{scope}""#)
}

/// Asserts the `WWW-Authenticate` header equals `expected`.
#[track_caller]
pub fn assert_challenge(out: &Outcome, expected: &str, what: &str) {
    assert_eq!(
        out.header(WWW_AUTHENTICATE.as_str()),
        Some(expected),
        "{what}"
    );
}

// ---------------------------------------------------------------------------------------
// Loopback servers and a client
// ---------------------------------------------------------------------------------------

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use keygate_testkit::serve::{spawn_axum_with_peer, spawn_hyper_peer as spawn_hyper};

/// Sends one HTTP/1.1 request to `addr` with hyper's client (`key` in `x-api-key`, extra
/// header lines as given) and collects the answer.
pub async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    extra: &[(&'static str, &str)],
) -> Outcome {
    let mut req = request(method, path, key);
    req.headers_mut().insert(
        "host",
        HeaderValue::from_str(&addr.to_string()).expect("host"),
    );
    for (name, value) in extra {
        req.headers_mut().append(
            HeaderName::from_static(name),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    outcome(keygate_testkit::http::send(addr, req).await).await
}

/// One in-process call through a clone of `svc`; also says whether the inner service was
/// reached (`calls` grew).
pub async fn call<S, RB>(svc: &S, calls: &AtomicUsize, req: Request<Full<Bytes>>) -> (Outcome, bool)
where
    S: tower::Service<Request<Full<Bytes>>, Response = Response<RB>> + Clone,
    S::Error: std::fmt::Debug,
    RB: http_body::Body,
    RB::Error: std::fmt::Debug,
{
    use tower::ServiceExt;
    let before = count(calls);
    let res = svc.clone().oneshot(req).await.expect("infallible");
    let out = outcome(res).await;
    (out, count(calls) > before)
}
