//! Request costs: how much of a rate limit or quota one request uses.
//!
//! [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) and
//! [`QuotaLayer`](crate::quota::QuotaLayer) charge each request a cost, 1 unless a cost
//! function says otherwise. A cost function sees the request's head ([`RequestHead`]: method,
//! URI, headers, extensions and the resolved principal), not its body, because the body has
//! not been read when the layers decide; put a batch size in a header or an extension (set by
//! an earlier layer) to charge by it.
//!
//! ```
//! use keygate::cost::RequestHead;
//!
//! // A batch upsert of N points costs N (at least 1), read from a header.
//! let cost = |head: &RequestHead<'_>| -> u64 {
//!     head.headers()
//!         .get("x-batch-size")
//!         .and_then(|v| v.to_str().ok()?.parse().ok())
//!         .unwrap_or(1)
//! };
//! let req = http::Request::post("/collections/c/points").header("x-batch-size", "100").body(()).unwrap();
//! assert_eq!(cost(&RequestHead::of(&req, None)), 100);
//! ```
//!
//! # Charging by bytes
//!
//! [`ByBytes`] charges a request by the size of its body, in units of `unit` bytes (rounded
//! up), read from `Content-Length` ([`RequestHead::content_length`]):
//!
//! ```
//! use keygate::cost::{by_bytes, RequestHead};
//!
//! // 1 unit per started KiB; a body without a declared length counts as 1 MiB, the most
//! // the server accepts (pair it with a body limit of that size).
//! let bytes = by_bytes(1024, 1 << 20);
//! let post = |len: &str| http::Request::post("/upload").header("content-length", len).body(()).unwrap();
//! assert_eq!(bytes.cost(&RequestHead::of(&post("1"), None)), 1);
//! assert_eq!(bytes.cost(&RequestHead::of(&post("4097"), None)), 5);
//! let chunked = http::Request::post("/upload").header("transfer-encoding", "chunked").body(()).unwrap();
//! assert_eq!(bytes.cost(&RequestHead::of(&chunked, None)), 1024);
//! let get = http::Request::get("/points").body(()).unwrap();
//! assert_eq!(bytes.cost(&RequestHead::of(&get, None)), 1);
//! ```
//!
//! The rules, in order:
//! - a valid `Content-Length` of `n` bytes: `ceil(n / unit)` units, at least 1 (an empty
//!   body is still a request);
//! - a request that declares no body (no `Content-Length`, no `Transfer-Encoding`, and either
//!   HTTP/1.x, where that means "no body", or a method that carries none: `GET`, `HEAD`,
//!   `DELETE`, `OPTIONS`, `TRACE`): 1 unit;
//! - anything else (a streamed body: `Transfer-Encoding: chunked`, or HTTP/2 without
//!   `Content-Length`; or a `Content-Length` that is not one decimal number) is charged as
//!   if it were `max_body` bytes long. Set `max_body` to the body limit the server enforces
//!   (axum's `DefaultBodyLimit`, tower-http's `RequestBodyLimitLayer`): the charge is then
//!   never below what the request can really send. A `max_body` larger than a policy's
//!   limit refuses streamed bodies outright (413 `cost_exceeds_limit`: send a
//!   `Content-Length`).
//!
//! Use it with [`RateLimitConfig::cost_in_bytes`](crate::rate_limit::RateLimitConfig::cost_in_bytes)
//! and [`QuotaConfig::cost_in_bytes`](crate::quota::QuotaConfig::cost_in_bytes); every
//! policy of that layer is then counted in those units (a layer has one cost function: to
//! limit requests and bytes at once, stack two layers, one counting each).

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Extensions, HeaderMap, Method, Request, Uri, Version};

use crate::Principal;

/// How many units of a rate limit or quota one request uses: one type for both, `u64`.
///
/// Why `u64`: costs measured in bytes or tokens come as `u64` (`Content-Length`,
/// [`ByBytes::cost`]), and a quota counts a month of them. Rate limits' own limits are
/// `u32`: a cost above one can never pass and is refused as `cost_exceeds_limit` (413),
/// naming the real cost, so the wider type loses nothing there.
pub type Cost = u64;

/// Why a rate-limit or quota configuration (or a key's policy) was refused: one error for
/// both layers ([`RateLimitLayer::new`](crate::rate_limit::RateLimitLayer::new),
/// [`QuotaLayer::new`](crate::quota::QuotaLayer::new) and their `validate_policy`), each
/// variant meaning the same in both.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A policy cannot be enforced: a limit of 0; for a rate limit a period of 0 or over 366
    /// days, or more than one unit per nanosecond; for a quota a monthly refill day outside
    /// 1 to 31.
    #[error("policy {name:?}: {reason}")]
    InvalidPolicy {
        /// The policy's name (at most 64 characters of it).
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A policy name is empty, too long, or not `[A-Za-z0-9_-]` (at most 64 characters of
    /// it are kept).
    #[error("policy name {0:?}: must be 1 to 64 characters of [A-Za-z0-9_-]")]
    InvalidName(String),
    /// Two policies of one set share a name.
    #[error("policy {0:?} appears twice")]
    DuplicateName(String),
    /// The IPv6 prefix length is outside 1 to 64.
    #[error("IPv6 prefix length {0}: must be 1 to 64")]
    InvalidIpv6Prefix(u8),
    /// A setting that must not be zero is (a count or an interval; names the setting:
    /// `max_tracked_addresses`, `housekeeping_every`, `flush_every`).
    #[error("{0} must not be zero")]
    Zero(&'static str),
}

/// A cost function, as the layers store it.
pub(crate) type CostFn = std::sync::Arc<dyn Fn(&RequestHead<'_>) -> Cost + Send + Sync>;

/// What a cost function sees of a request: its head and the resolved principal.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
    version: Version,
    principal: Option<&'a Principal>,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`, called by `principal` (`None` when unauthenticated).
    pub fn of<B>(req: &'a Request<B>, principal: Option<&'a Principal>) -> Self {
        RequestHead {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
            version: req.version(),
            principal,
        }
    }

    /// The method.
    pub fn method(&self) -> &'a Method {
        self.method
    }
    /// The URI.
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }
    /// The path (no query string).
    pub fn path(&self) -> &'a str {
        self.uri.path()
    }
    /// The headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }
    /// The extensions (what earlier layers and the server put there).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }
    /// The caller, when the request is authenticated.
    pub fn principal(&self) -> Option<&'a Principal> {
        self.principal
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The body size the request declares in `Content-Length`: `None` without one, or when
    /// it is not exactly one decimal number (several differing values, a sign, spaces
    /// inside, more than `u64::MAX`).
    pub fn content_length(&self) -> Option<u64> {
        let mut values = self.headers.get_all(CONTENT_LENGTH).iter();
        let first = values.next()?;
        if values.any(|v| v != first) {
            return None;
        }
        let text = first.to_str().ok()?.trim_matches([' ', '\t']);
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }

    /// Whether the request declares that it has no body: no `Content-Length` and no
    /// `Transfer-Encoding`, and either HTTP/1.x (where that means no body) or a method that
    /// carries none (`GET`, `HEAD`, `DELETE`, `OPTIONS`, `TRACE`).
    pub fn declares_no_body(&self) -> bool {
        if self.headers.contains_key(CONTENT_LENGTH) || self.headers.contains_key(TRANSFER_ENCODING)
        {
            return false;
        }
        matches!(
            self.version,
            Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
        ) || matches!(
            *self.method,
            Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
        )
    }
}

/// A cost in bytes: `ceil(body bytes / unit)` units per request, streamed bodies charged as
/// `max_body` bytes. See [the module docs](self#charging-by-bytes) for the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByBytes {
    unit: u64,
    max_body: u64,
}

/// Charges by body size: one unit per started `unit` bytes (a `unit` of 0 counts as 1),
/// streamed bodies without a declared length as `max_body` bytes.
pub fn by_bytes(unit: u64, max_body: u64) -> ByBytes {
    ByBytes {
        unit: unit.max(1),
        max_body,
    }
}

impl ByBytes {
    /// The bytes of one unit.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// What a streamed body without a declared length is charged as, in bytes.
    pub fn max_body(&self) -> u64 {
        self.max_body
    }

    /// The units `head` costs (at least 1).
    pub fn cost(&self, head: &RequestHead<'_>) -> u64 {
        let bytes = match head.content_length() {
            Some(n) => n,
            None if head.declares_no_body() => 0,
            None => self.max_body,
        };
        bytes.div_ceil(self.unit).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::{by_bytes, RequestHead};

    fn req(method: &str, version: http::Version, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut b = http::Request::builder()
            .method(method)
            .uri("/x")
            .version(version);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn bytes_from_content_length_and_streamed_bodies() {
        use http::Version as V;
        let b = by_bytes(100, 10_000);
        let cost = |r: &http::Request<()>| b.cost(&RequestHead::of(r, None));
        let one = |m, v, h: &[(&str, &str)]| cost(&req(m, v, h));
        assert_eq!(one("POST", V::HTTP_11, &[("content-length", "0")]), 1);
        assert_eq!(one("POST", V::HTTP_11, &[("content-length", "100")]), 1);
        assert_eq!(one("POST", V::HTTP_11, &[("content-length", "101")]), 2);
        assert_eq!(
            one(
                "POST",
                V::HTTP_11,
                &[("content-length", "18446744073709551615")]
            ),
            184_467_440_737_095_517
        );
        // No body declared: HTTP/1.1 without length headers, or a bodyless method on HTTP/2.
        assert_eq!(one("POST", V::HTTP_11, &[]), 1);
        assert_eq!(one("GET", V::HTTP_2, &[]), 1);
        // Streamed or unreadable lengths are charged as the maximum body.
        assert_eq!(one("POST", V::HTTP_2, &[]), 100);
        assert_eq!(
            one("PUT", V::HTTP_11, &[("transfer-encoding", "chunked")]),
            100
        );
        for bad in ["-1", "+5", "1 2", "", "0x10", "99999999999999999999"] {
            assert_eq!(
                one("POST", V::HTTP_11, &[("content-length", bad)]),
                100,
                "{bad:?}"
            );
        }
        let two = http::Request::post("/x")
            .header("content-length", "5")
            .header("content-length", "6")
            .body(())
            .unwrap();
        assert_eq!(cost(&two), 100, "differing lengths");
        // A unit of 0 counts as 1.
        let per_byte = by_bytes(0, u64::MAX);
        let big = req("POST", V::HTTP_2, &[]);
        assert_eq!(per_byte.cost(&RequestHead::of(&big, None)), u64::MAX);
    }
}
