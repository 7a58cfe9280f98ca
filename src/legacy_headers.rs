//! The legacy `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` fields,
//! for clients written before the IETF `RateLimit` fields (GitHub's and many SDKs'
//! spelling), derived from the `RateLimit-Policy` and `RateLimit` fields keygate's rate
//! limits and quotas write. Public at [`keygate::rate_limit`](crate::rate_limit).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::reject::{RATELIMIT, RATELIMIT_POLICY};

/// `X-RateLimit-Limit`.
pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining`.
pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset`.
pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Adds `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until
/// the limit is whole again, as the IETF field's `t`) to every response that carries the
/// IETF `RateLimit` field, describing the policy with the least left (on a tie, the first
/// listed). Put it outside the rate-limit and quota layers (or around a fused stack); the
/// IETF fields stay. Responses without them are left alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct LegacyRateLimitHeadersLayer;

impl LegacyRateLimitHeadersLayer {
    /// The layer.
    pub fn new() -> Self {
        LegacyRateLimitHeadersLayer
    }
}

impl<S> Layer<S> for LegacyRateLimitHeadersLayer {
    type Service = LegacyRateLimitHeaders<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LegacyRateLimitHeaders { inner }
    }
}

/// The service of [`LegacyRateLimitHeadersLayer`].
#[derive(Debug, Clone)]
pub struct LegacyRateLimitHeaders<S> {
    inner: S,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for LegacyRateLimitHeaders<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = LegacyFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        LegacyFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The response future of [`LegacyRateLimitHeaders`].
    pub struct LegacyFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, B, E> Future for LegacyFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut out = ready!(self.project().inner.poll(cx));
        if let Ok(res) = &mut out {
            add_legacy(res.headers_mut());
        }
        Poll::Ready(out)
    }
}

/// One member of a `RateLimit` or `RateLimit-Policy` list: its name and integer parameters.
fn members(h: &HeaderMap, name: &HeaderName) -> Vec<(String, Vec<(String, u64)>)> {
    let mut out = Vec::new();
    for value in h.get_all(name) {
        let Ok(text) = value.to_str() else { continue };
        for item in text.split(',') {
            let mut parts = item.trim().split(';');
            let Some(label) = parts.next() else { continue };
            let label = label.trim().trim_matches('"').to_owned();
            let params = parts
                .filter_map(|p| {
                    let (k, v) = p.trim().split_once('=')?;
                    Some((k.to_owned(), v.parse().ok()?))
                })
                .collect();
            out.push((label, params));
        }
    }
    out
}

fn param(params: &[(String, u64)], key: &str) -> Option<u64> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// Writes the legacy fields from the IETF ones, if there are any.
fn add_legacy(h: &mut HeaderMap) {
    let limits = members(h, &RATELIMIT);
    let Some((name, remaining, reset)) = limits
        .iter()
        .filter_map(|(n, p)| Some((n, param(p, "r")?, param(p, "t").unwrap_or(0))))
        .min_by_key(|(_, r, _)| *r)
    else {
        return;
    };
    let policies = members(h, &RATELIMIT_POLICY);
    let Some(quota) = policies
        .iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, p)| param(p, "q"))
    else {
        return;
    };
    h.insert(X_RATELIMIT_LIMIT.clone(), HeaderValue::from(quota));
    h.insert(X_RATELIMIT_REMAINING.clone(), HeaderValue::from(remaining));
    h.insert(X_RATELIMIT_RESET.clone(), HeaderValue::from(reset));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tightest_member_is_described() {
        let mut h = HeaderMap::new();
        h.append(
            &RATELIMIT_POLICY,
            HeaderValue::from_static("\"burst\";q=20;w=1, \"hourly\";q=1000;w=3600"),
        );
        h.append(
            &RATELIMIT,
            HeaderValue::from_static("\"burst\";r=12;t=1, \"hourly\";r=3;t=1800"),
        );
        // A quota's members on lines of their own.
        h.append(
            &RATELIMIT_POLICY,
            HeaderValue::from_static("\"daily\";q=50"),
        );
        h.append(
            &RATELIMIT,
            HeaderValue::from_static("\"daily\";r=7;t=40000"),
        );
        add_legacy(&mut h);
        assert_eq!(h[&X_RATELIMIT_LIMIT], "1000");
        assert_eq!(h[&X_RATELIMIT_REMAINING], "3");
        assert_eq!(h[&X_RATELIMIT_RESET], "1800");

        let mut none = HeaderMap::new();
        add_legacy(&mut none);
        assert!(none.is_empty());
    }
}
