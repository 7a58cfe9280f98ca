//! The request context: everything keygate learns about a request, in one request
//! extension ([`RequestContext`]).

use std::net::IpAddr;

use http::header::HeaderValue;
use http::Extensions;

use crate::{Denial, Principal};

/// Everything keygate learned about one request (a request extension).
///
/// The first keygate layer that runs on a request inserts one [`RequestContext`] into its
/// extensions; every other layer fills in its own fields. Handlers and outer layers read it
/// through accessors:
///
/// | field | filled by | accessor |
/// |---|---|---|
/// | the verdict on the caller's key (principal, or the exact denial) | whichever layer resolves first | [`principal`](RequestContext::principal), [`resolution`](RequestContext::resolution) |
/// | the client address | the first layer that needs it (IP lists, anonymous rate limits, audit) | [`client_ip`](RequestContext::client_ip) |
/// | the request id | `AuditLayer` | [`request_id`](RequestContext::request_id) |
/// | the quota standing | `QuotaLayer` | `quota` (feature `quota`) |
///
/// One extension means one allocation per request for all of keygate's request state,
/// whatever the number of layers.
///
/// ```
/// use http::Request;
/// use keygate::RequestContext;
///
/// fn tenant_of<B>(req: &Request<B>) -> Option<&str> {
///     RequestContext::of(req.extensions())?.principal()?.tenant()
/// }
/// # assert_eq!(tenant_of(&Request::new(())), None);
/// ```
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    resolution: Option<Result<Principal, Denial>>,
    client_ip: Option<IpAddr>,
    request_id: Option<RequestId>,
    #[cfg(feature = "quota")]
    quota: Option<crate::quota::QuotaStatus>,
}

impl RequestContext {
    /// The context of a request, if a keygate layer has seen it.
    pub fn of(ext: &Extensions) -> Option<&RequestContext> {
        ext.get::<RequestContext>()
    }

    /// The context of a request, inserted (empty) when no keygate layer has seen it yet.
    pub fn of_mut(ext: &mut Extensions) -> &mut RequestContext {
        ext.get_or_insert_default::<RequestContext>()
    }

    /// A context whose caller is already resolved to `principal`: for tests and for
    /// services that authenticate callers themselves, inserted with
    /// `req.extensions_mut().insert(RequestContext::authenticated(p))`.
    pub fn authenticated(principal: Principal) -> Self {
        RequestContext {
            resolution: Some(Ok(principal)),
            ..RequestContext::default()
        }
    }

    /// The resolved caller, if the key was verified and accepted.
    pub fn principal(&self) -> Option<&Principal> {
        match &self.resolution {
            Some(Ok(p)) => Some(p),
            _ => None,
        }
    }

    /// The verdict on the caller's key, if a layer reached one: the [`Principal`], or the
    /// exact [`Denial`] (`revoked_key`, even when the client was shown `invalid_key`).
    pub fn resolution(&self) -> Option<Result<&Principal, &Denial>> {
        self.resolution.as_ref().map(Result::as_ref)
    }

    /// The client address a layer settled on (the peer, or through trusted proxies the
    /// forwarded address); `None` when no layer needed it or it is unknown.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }

    /// The request id the audit layer settled on.
    pub fn request_id(&self) -> Option<&RequestId> {
        self.request_id.as_ref()
    }

    /// The caller's remaining quota allowance, set by the quota layer when the key has
    /// quotas and the request passed.
    #[cfg(feature = "quota")]
    pub fn quota(&self) -> Option<&crate::quota::QuotaStatus> {
        self.quota.as_ref()
    }

    pub(crate) fn set_resolution(&mut self, result: Result<Principal, Denial>) {
        self.resolution = Some(result);
    }

    pub(crate) fn set_client_ip(&mut self, ip: IpAddr) {
        self.client_ip = Some(ip);
    }

    #[cfg_attr(not(feature = "audit"), allow(dead_code))]
    pub(crate) fn set_request_id(&mut self, id: HeaderValue) {
        self.request_id = Some(RequestId(id));
    }

    #[cfg(feature = "quota")]
    pub(crate) fn set_quota(&mut self, status: crate::quota::QuotaStatus) {
        self.quota = Some(status);
    }
}

/// The request id the audit layer settled on ([`RequestContext::request_id`]), for
/// handlers to log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// The id as text (visible ASCII).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(self.0.as_bytes()).unwrap_or_default()
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
