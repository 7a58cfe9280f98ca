//! Rate limiting: [`RateLimitLayer`] enforces per-key GCRA limits (governor) with several
//! named policies per key, weighted costs, and per-address limits for requests without a
//! principal.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
//! use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, RateLimitPolicy, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let (key, mut record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "demo", gate.clock().now()).unwrap();
//! record.rate_limits = vec![RateLimitPolicy::per_minute("burst", 2)];
//! store.insert(&record).await.unwrap();
//!
//! let svc = ServiceBuilder::new()
//!     .layer(gate.auth_layer())
//!     .layer(RateLimitLayer::new(RateLimitConfig::new()).unwrap().with_gate(&gate))
//!     .service_fn(|_: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//! let call = || svc.clone().oneshot(Request::get("/").header("x-api-key", key.expose_secret()).body(String::new()).unwrap());
//!
//! let ok = call().await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! assert_eq!(ok.headers()["ratelimit-policy"], r#""burst";q=2;w=60"#);
//! assert_eq!(ok.headers()["ratelimit"], r#""burst";r=1;t=30"#);
//! assert_eq!(call().await.unwrap().status(), StatusCode::OK);
//!
//! let limited = call().await.unwrap();
//! assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(limited.headers()["retry-after"], "30");
//! assert_eq!(limited.extensions().get::<keygate::Denial>().unwrap().code().as_str(), "rate_limited");
//! # }
//! ```
//!
//! # How it counts
//! - **Per key, by resolved key id**: state is keyed by the [`KeyId`](crate::KeyId) of the
//!   [`Principal`](crate::Principal), never by header bytes. All clones of the layer and its
//!   services share it.
//! - **Policies** come from the key's record ([`Principal::rate_limits`](crate::Principal::rate_limits));
//!   keys without any get [`RateLimitConfig::default_policies`]. A request passes only if
//!   every policy has room for its cost, and then it is counted in every policy; when one
//!   policy refuses, what the others already counted is given back at once (a GCRA refund),
//!   so a refused request costs nothing. Between the count and the refund (nanoseconds) a
//!   concurrent request of the same key may see the others' room reduced and be refused: the
//!   imprecision errs toward refusing, never toward letting more through.
//! - **Units read as written**: `RateLimitPolicy::per_second("burst", 20)` allows 20 per
//!   second, in bursts of up to 20 (GCRA: one unit every 50 ms, with a tolerance of the whole
//!   limit). The period is divided by the limit in whole nanoseconds.
//! - **Weighted costs**: [`RateLimitConfig::cost`] (default 1; in bytes with
//!   [`cost::ByBytes`](crate::cost::ByBytes)). A cost of 0 passes uncounted. A cost above a
//!   policy's limit (its burst) can never pass: it is refused at once with 413
//!   `cost_exceeds_limit` (gRPC RESOURCE_EXHAUSTED), without `Retry-After` (waiting does not
//!   help), a detail naming the cost and the policy's limit, and the `RateLimit-Policy` /
//!   `RateLimit` fields of every policy (`violated-policies` names those it exceeds).
//! - **Without a principal** (no key, or one that failed to resolve) a request is limited by
//!   client address with [`RateLimitConfig::anonymous_policies`], so guessing keys is slow.
//!   The layer never rejects for the authentication failure itself (the auth layer does);
//!   it rejects only for rate. Requests whose address is unknown share one bucket.
//! - **Every request counts**, whatever happens to it afterwards: a request another layer
//!   refuses (a scope or quota layer inside this one: 403, 429) or the service refuses
//!   (4xx) used capacity too, and is not given back. So a key repeating a forbidden request
//!   is slowed down like any other (put this layer outside the layers whose refusals it
//!   should count: a layer inside a refusing layer never sees the request). Only the
//!   all-or-nothing rule among the policies of one check gives anything back.
//! - **Memory is bounded**: subjects whose state is back to fresh are dropped (governor's
//!   `retain_recent`, then `shrink_to_fit`) after every
//!   [`housekeeping_every`](RateLimitConfig::housekeeping_every) new subjects and on
//!   [`RateLimitLayer::housekeeping`]; at most
//!   [`max_tracked_addresses`](RateLimitConfig::max_tracked_addresses) addresses are tracked
//!   per policy shape, and new ones beyond that share one `overflow` bucket.
//!
//! # Shared state for replicas
//! In-process state limits each replica on its own: `n` replicas allow `n` times the limit.
//! [`RateLimitConfig::backend`] keeps the state in a
//! [`RateBackend`](crate::core::rate::RateBackend) instead (feature `redis`:
//! `keygate::redis::RedisRateLimiter`, GCRA in one Lua script per request), so every
//! replica enforces one limit. Policies, costs, all-or-nothing counting, anonymous
//! addresses and fields behave as in-process (the Redis tests compare both answer for
//! answer); the differences:
//! - each request with policies makes one backend round trip (an async step), unless the
//!   backend's local pre-check already knows the caller has no room;
//! - when the backend cannot answer, [`Fallback::Deny`] (the default) refuses with 503
//!   `store_unavailable` and `Retry-After: 1`, and [`Fallback::Local`] limits in-process
//!   (each replica the whole limit) until the backend is back.
//!
//! # Fields
//! Responses carry `RateLimit-Policy` (`"burst";q=20;w=1`) and `RateLimit`
//! (`"burst";r=19;t=1`) as in draft-ietf-httpapi-ratelimit-headers-10: `q` the limit, `w`
//! the period in seconds (left out when not whole seconds), `r` what is left, `t` the
//! seconds (rounded up) until the whole limit is back. They can be turned off for successful
//! responses ([`RateLimitConfig::headers`]). A 429 carries them, `Retry-After` (whole
//! seconds, rounded up, at least 1: when this request's cost would pass), and problem+json
//! code `rate_limited` with `violated-policies`; gRPC requests get RESOURCE_EXHAUSTED. A
//! request costing more than a policy's limit gets 413 `cost_exceeds_limit` instead (see
//! above).

mod config;
mod layer;
mod limiter;
mod service;

pub use crate::legacy_headers::{
    LegacyFuture, LegacyRateLimitHeaders, LegacyRateLimitHeadersLayer, X_RATELIMIT_LIMIT,
    X_RATELIMIT_REMAINING, X_RATELIMIT_RESET,
};
pub use config::{validate_policy, Fallback, RateLimitConfig};
pub use layer::RateLimitLayer;
pub use limiter::{LimiterClock, MAX_PERIOD};
pub use service::{RateCheck, RateLimit, RateLimitNote};
