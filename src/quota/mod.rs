//! Quotas: [`QuotaLayer`] enforces per-key allowances per UTC calendar window (hour, day,
//! month) and credits that refill on a schedule or never (Unkey's model), counted in a
//! [`UsageStore`](crate::core::usage::UsageStore).
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::core::usage::MemoryUsageStore;
//! use keygate::quota::{QuotaConfig, QuotaLayer};
//! use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, QuotaPolicy, QuotaWindow, RequestContext, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let (key, mut record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "demo", gate.clock().now()).unwrap();
//! record.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)];
//! store.insert(&record).await.unwrap();
//!
//! let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new())).unwrap().with_gate(&gate);
//! let handle = quota.handle();
//! let svc = ServiceBuilder::new()
//!     .layer(gate.auth_layer())
//!     .layer(quota)
//!     .service_fn(|req: Request<String>| async move {
//!         // Handlers see what is left.
//!         let left = RequestContext::of(req.extensions()).unwrap().quota().unwrap().remaining().unwrap();
//!         Ok::<_, std::convert::Infallible>(Response::new(left.to_string()))
//!     });
//! let call = || svc.clone().oneshot(Request::get("/").header("x-api-key", key.expose_secret()).body(String::new()).unwrap());
//!
//! let ok = call().await.unwrap();
//! assert_eq!(ok.status(), StatusCode::OK);
//! assert_eq!(ok.headers()["ratelimit-policy"], r#""daily";q=2;w=86400"#);
//! assert_eq!(call().await.unwrap().status(), StatusCode::OK);
//!
//! let over = call().await.unwrap();
//! assert_eq!(over.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert!(over.headers().contains_key("retry-after"));
//! assert_eq!(over.extensions().get::<keygate::Denial>().unwrap().code().as_str(), "quota_exceeded");
//!
//! handle.flush().await.unwrap(); // at shutdown: nothing counted is lost
//! # }
//! ```
//!
//! # How it counts
//! - **Per key**: quotas come from the key's record
//!   ([`Principal::quotas`](crate::Principal::quotas)); several per key; a request passes
//!   only if every quota has room for its cost, and is then counted in all of them.
//!   Requests **without a principal pass unchanged** (quotas are per key; a failed
//!   authentication never consumes a key's quota, and the auth layer rejects it).
//! - **Windows** are UTC calendar hours, days and months (half-open: an instant exactly at
//!   the end belongs to the next window), or credits: spent down and refilled to the limit
//!   daily, monthly on a day (clamped to the month's last day), or never. Quotas with the
//!   same window share one counter.
//! - **Cost** per request through [`QuotaConfig::cost`] (default 1; in bytes with
//!   [`cost::ByBytes`](crate::cost::ByBytes)). A cost of 0 passes uncounted (no fields, no
//!   status). A cost above a quota's whole limit never passes: 413 `cost_exceeds_limit`
//!   (gRPC RESOURCE_EXHAUSTED), no `Retry-After`, the detail saying what the request costs
//!   and what the quota allows per period (`This request costs 12; the quota "daily"
//!   allows 10 per period.`), with the quotas' fields.
//! - **Counting** ([`Counting`]): batched in memory and flushed to the store (default; a
//!   crash loses what was counted since the last flush, a graceful shutdown that calls
//!   [`QuotaHandle::flush`] loses nothing), or strict (one atomic
//!   [`check_and_add`](crate::core::usage::UsageStore::check_and_add) per request, before
//!   the inner service runs). A store that cannot be reached when it must be asked gives
//!   503 `store_unavailable` (fail closed).
//! - **Refused requests are not charged** (quotas are for billing): what a request was
//!   counted is given back when it is refused after the count, which is
//!   - a keygate layer's refusal (a [`Denial`](crate::Denial) on the response: 401, 403,
//!     404, 413, 429, 503), so the order of layers does not change the counts;
//!   - a 4xx answer from the service (400, 403, 404, 409, 413, 422, ...), **except 429**:
//!     the service's own "too many requests" is charged;
//!   - a trailers-only gRPC answer whose `grpc-status` (in the response head) is a client
//!     error: 3, 5, 6, 7, 9, 11, 12 or 16. A `grpc-status` sent in trailers after a body is
//!     not seen, and the call is charged.
//!
//!   5xx answers are charged (the service may have done the work before failing).
//!   Batched counting gives the units back in memory (or, when already flushed, subtracts
//!   them at the next flush); strict counting subtracts them from the store in the
//!   background ([`UsageStore::subtract`](crate::core::usage::UsageStore::subtract)).
//!   [`QuotaConfig::charge_refused`] turns these refunds off. A request a check *before*
//!   the quota refuses is never charged, whatever that setting: in a fused stack the quota
//!   may count while an earlier check's store round trip is in flight
//!   ([`Check::speculative`](crate::check::Check::speculative)), and gives the count back
//!   when that check refuses or when the request's future is dropped before it is decided.
//! - **Over quota**: 429 problem+json, type
//!   `https://iana.org/assignments/http-problem-types#quota-exceeded`, code
//!   `quota_exceeded`, `violated-policies`, `Retry-After` until the (latest) violated window
//!   resets; gRPC requests get RESOURCE_EXHAUSTED.
//! - **Remaining allowance**: a [`QuotaStatus`] request extension for handlers, and the
//!   `RateLimit-Policy` (`"daily";q=1000;w=86400`) and `RateLimit` (`"daily";r=998;t=3600`)
//!   fields (draft-ietf-httpapi-ratelimit-headers-10; `w` is the current window's length, so
//!   a month reads 28 to 31 days; credits that never refill have no `w` and no `t`).
//! - **Usage reports** per key and period: [`QuotaHandle::report`] (requests and cost per
//!   window; add [`QuotaConfig::meter`] to count keys without quotas too).

mod config;
mod layer;
mod meter;
mod service;

pub use config::{validate_policy, Counting, QuotaConfig};
pub use layer::{QuotaHandle, QuotaLayer};
pub use service::{Quota, QuotaCheck, QuotaNote, QuotaState, QuotaStatus};
