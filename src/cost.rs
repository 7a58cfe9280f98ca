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
//! let cost = |head: &RequestHead<'_>| -> u32 {
//!     head.headers()
//!         .get("x-batch-size")
//!         .and_then(|v| v.to_str().ok()?.parse().ok())
//!         .unwrap_or(1)
//! };
//! let req = http::Request::post("/collections/c/points").header("x-batch-size", "100").body(()).unwrap();
//! assert_eq!(cost(&RequestHead::of(&req, None)), 100);
//! ```

use http::{Extensions, HeaderMap, Method, Request, Uri};

use crate::Principal;

/// What a cost function sees of a request: its head and the resolved principal.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
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
}

/// A stack buffer for the `RateLimit-Policy` / `RateLimit` field values the rate-limit and
/// quota layers write on every response: formatted without a heap allocation (up to 256
/// bytes), then copied once into the [`HeaderValue`](http::HeaderValue).
pub(crate) struct FieldBuf(smallvec::SmallVec<[u8; 256]>);

impl FieldBuf {
    pub(crate) fn new() -> Self {
        FieldBuf(smallvec::SmallVec::new())
    }

    pub(crate) fn push_str(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// Appends `s` as a structured-field String (see
    /// [`write_sf_string`](crate::core::usage::write_sf_string)).
    pub(crate) fn push_sf_string(&mut self, s: &str) {
        if s.bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.0.push(b'"');
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(b'"');
        } else {
            let mut out = String::new();
            crate::core::usage::write_sf_string(s, &mut out);
            self.push_str(&out);
        }
    }

    /// Appends `n` in decimal.
    pub(crate) fn push_u64(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.0.extend_from_slice(&digits[i..]);
    }

    pub(crate) fn to_header(&self) -> Option<http::HeaderValue> {
        http::HeaderValue::from_bytes(&self.0).ok()
    }
}
