//! # keygate
//!
//! API-key authentication and access control for Rust services, as composable tower layers.
//!
//! Build one [`KeyGate`] (the hub: verifier, clock, credential sources, renderer) and stack
//! its layers in front of an axum, tonic or plain hyper service. Everything keygate learns
//! about a request (the resolved [`Principal`], the client address, the request id, the
//! quota standing) travels in one request extension, the [`RequestContext`]; a rejection is an `Ok` response
//! (problem+json for HTTP, trailers-only for gRPC) carrying a typed [`Denial`] in its
//! extensions.
//!
//! ```
//! use axum::{routing::get, Router};
//! use keygate::{Authenticated, KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryStore::new();
//! let gate = KeyGate::new(Verifier::new(store.clone()));
//! let (key, record) = KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "demo", gate.clock().now()).unwrap();
//! store.insert(&record).await.unwrap();
//!
//! let app = Router::new()
//!     .route("/whoami", get(|Authenticated(p): Authenticated| async move { p.name().to_owned() }))
//!     .layer(gate.auth_layer());
//!
//! let res = app
//!     .oneshot(http::Request::get("/whoami").header("authorization", format!("Bearer {}", key.expose_secret())).body(axum::body::Body::empty()).unwrap())
//!     .await
//!     .unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```
//!
//! ## Features
//! - `auth` (default): [`ApiKeyAuthLayer`].
//! - `scope`: `ScopeLayer` (operations and collections).
//! - `ip-allow`: `IpAllowLayer` (client addresses).
//! - `rate-limit`: `RateLimitLayer` (per-key GCRA).
//! - `quota`: `QuotaLayer` (per-key allowances).
//! - `audit`: `AuditLayer` (one event per request).
//! - `axum`: the [`Authenticated`] extractor.
//! - `full`: everything.
//! - `sql`: `sql::SqlStore`, the SQLite and PostgreSQL key store (crate `keygate-sql`).
//! - `redis`: `redis::RedisRateLimiter`, `redis::RedisUsageStore` and key-change
//!   propagation for replicas (crate `keygate-redis`).
#![deny(unsafe_code, unreachable_pub)]
#![warn(missing_docs)]
// Without any layer feature only the shared parts are built, and some of them go unused.
#![cfg_attr(
    not(any(
        feature = "auth",
        feature = "scope",
        feature = "ip-allow",
        feature = "rate-limit",
        feature = "quota",
        feature = "audit"
    )),
    allow(dead_code, unused_imports)
)]
#![cfg_attr(docsrs, feature(doc_auto_cfg))]

#[cfg(all(doctest, feature = "axum"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use keygate_core as core;
pub use keygate_core::{
    ApiKey, Attributes, Clock, Denial, DenialCode, KeyDigest, KeyFilter, KeyHasher, KeyId, KeyInfo,
    KeyParseError, KeyParser, KeyRecord, KeyStatus, KeyStore, Lookup, ManualClock, MemoryStore,
    PendingLookup, Prefix, Principal, QuotaPolicy, QuotaWindow, RateLimitPolicy, Refill,
    StoreError, SystemClock, Verifier, VerifierBuilder, SCANNER_REGEX,
};
pub use keygate_core::{KeyManager, KeySpec, KeyUpdate};
/// Redis-backed rate limits, quota counters and key-change propagation (crate `keygate-redis`).
#[cfg(feature = "redis")]
pub use keygate_redis as redis;
/// The SQLite and PostgreSQL key store (crate `keygate-sql`).
#[cfg(feature = "sql")]
pub use keygate_sql as sql;

mod builder;
pub mod check;
mod chunk;
pub mod client_ip;
mod context;
#[cfg(any(feature = "rate-limit", feature = "quota"))]
pub mod cost;
pub mod credentials;
pub mod future;
mod gate;
pub mod reject;
pub mod stack;
#[cfg(any(feature = "rate-limit", feature = "quota"))]
mod traffic;

#[cfg(feature = "audit")]
pub mod audit;
#[cfg(feature = "auth")]
pub mod auth;
#[cfg(feature = "axum")]
mod extract;
#[cfg(feature = "ip-allow")]
pub mod ip;
#[cfg(feature = "quota")]
pub mod quota;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(feature = "scope")]
pub mod scope;

#[cfg(feature = "audit")]
pub use audit::AuditLayer;
#[cfg(feature = "auth")]
pub use auth::ApiKeyAuthLayer;
pub use builder::ServiceBuilderExt;
pub use check::{Check, CheckLayer};
pub use context::{RequestContext, RequestId};
pub use credentials::{CredentialSource, Credentials};
#[cfg(feature = "axum")]
pub use extract::{Authenticated, MissingPrincipal};
pub use gate::{resolution, KeyGate, KeyGateBuilder};
#[cfg(feature = "quota")]
pub use quota::QuotaLayer;
#[cfg(feature = "rate-limit")]
pub use rate_limit::RateLimitLayer;
pub use reject::{DefaultRenderer, RenderContext, Renderer, ResponseBody};
