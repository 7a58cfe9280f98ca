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
//! - `auth` (default): `auth::ApiKeyAuthLayer`.
//! - `scope`: `scope::ScopeLayer` (operations and collections).
//! - `ip-allow`: `ip::IpAllowLayer` (client addresses).
//! - `rate-limit`: `rate_limit::RateLimitLayer` (per-key GCRA).
//! - `quota`: `quota::QuotaLayer` (per-key allowances).
//! - `audit`: `audit::AuditLayer` (one event per request).
//! - `axum`: the [`Authenticated`] extractor.
//! - `tonic-tls`: also read tonic's `TlsConnectInfo` (client address and TLS transport behind
//!   tonic's TLS server; see [`transport`]).
//! - `metrics`: [`metrics::Metrics`], Prometheus counters fed from the audit events.
//! - `tokens`: [`token::Tokens`], short-lived signed tokens (JWT, EdDSA) traded for an API
//!   key and accepted by `auth::ApiKeyAuthLayer` in its place.
//! - `full`: everything.
//! - `sql`: `sql::SqlStore`, the SQLite and PostgreSQL key store (crate `keygate-sql`).
//! - `redis`: `redis::RedisRateLimiter`, `redis::RedisUsageStore` and key-change
//!   propagation for replicas (crate `keygate-redis`).
//!
//! ## One path per item
//! Every public item has exactly one path. keygate-core's flat items (keys, records,
//! principals, the verifier, the stores) are at this crate's root ([`Principal`],
//! [`KeyStore`]); keygate-core's modules are under [`core`] (`keygate::core::audit`,
//! `keygate::core::usage`, `keygate::core::rate`, `keygate::core::time`), which holds
//! nothing else. An item of a public module of this crate is reached through its module
//! (`keygate::quota::QuotaLayer`, `keygate::credentials::Credentials`,
//! `keygate::reject::Renderer`); the root re-exports only keygate-core and the hub's
//! private modules ([`KeyGate`], [`RequestContext`], [`RequestId`], [`ServiceBuilderExt`]).
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

/// keygate-core's modules: audit events and sinks, rate-limit backends, time parsing, usage
/// counters. keygate-core's flat items (keys, records, principals, the verifier, the stores)
/// are at this crate's root, and only there.
pub mod core {
    pub use keygate_core::{audit, rate, time, usage};
}
pub use keygate_core::{
    redact_url, validate_name, validate_resource_pattern, ApiKey, Attributes, ChangeHandler, Clock,
    Denial, DenialCode, Expiry, Grant, Identity, IdentityUpdate, InvalidDigest, InvalidKeyId,
    InvalidName, InvalidPolicy, InvalidPrefix, InvalidScope, InvalidSpec, InvalidStatus, IssuedKey,
    KeyDigest, KeyFilter, KeyGenError, KeyHasher, KeyId, KeyIdHashBuilder, KeyIdHasher, KeyInfo,
    KeyListing, KeyManager, KeyManagerBuilder, KeyParseError, KeyParser, KeyRecord, KeySpec,
    KeyStatus, KeyStore, KeyUpdate, KnownScope, LifecycleError, Lookup, ManualClock, MemoryStore,
    ParsedKey, PendingLookup, PepperError, Prefix, Principal, QuotaPolicy, QuotaWindow,
    RateLimitPolicy, Refill, ResourceSet, Role, RoleUpdate, Scope, ScopeSet, ScopeVocabulary,
    SkippedRow, StatusWrite, StoreError, SystemClock, TokenGrant, UnknownScope, Verifier,
    VerifierBuilder, BODY_LEN, CHECKSUM_LEN, KEY_ID_LEN, MAX_ATTRIBUTE_VALUE_LEN, MAX_KEY_LEN,
    MAX_METADATA_BYTES, MAX_NAME_LEN, MAX_OWNER_LEN, MAX_PEPPER_FILE_LEN, MAX_PREFIX_LEN,
    NO_PEPPER_FINGERPRINT, PEPPER_ENV, PEPPER_FILE_ENV, REDACTED, SCANNER_REGEX, SECRET_LEN,
};
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
pub mod deprecation;
pub mod future;
mod gate;
#[cfg(feature = "rate-limit")]
mod legacy_headers;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "notices")]
pub mod notices;
pub mod reject;
pub mod require_tls;
pub mod stack;
mod timing;
#[cfg(any(feature = "rate-limit", feature = "quota"))]
mod traffic;
pub mod transport;

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
#[cfg(feature = "tokens")]
pub mod token;

pub use builder::ServiceBuilderExt;
pub use context::{RequestContext, RequestId};
#[cfg(feature = "axum")]
pub use extract::{Authenticated, MissingPrincipal};
pub use gate::{resolution, KeyGate, KeyGateBuilder};
