//! keygate-redis: what several replicas of a keygate-protected service share through Redis.
//!
//! - [`RedisRateLimiter`]: a [`RateBackend`](keygate_core::rate::RateBackend) running GCRA in
//!   one Lua script per request (one round trip), every named policy of the request at once
//!   (all or nothing), weighted costs, with an optional local pre-check so a caller far over
//!   its limit costs no round trip. Give it to `keygate::rate_limit::RateLimitConfig::backend`.
//! - [`RedisUsageStore`]: a [`UsageStore`](keygate_core::usage::UsageStore) for quotas:
//!   per-window counters with expiry, and an atomic check-and-add (a Lua script), so
//!   replicas counting strictly cannot overshoot together.
//! - Change propagation: [`Publishing`] wraps a [`KeyStore`](keygate_core::KeyStore) and
//!   publishes the id of every key it writes; [`Redis::watch`] makes a replica's
//!   [`Verifier`](keygate_core::Verifier) evict that key, and resyncs (forgets its whole
//!   cache) when a sequence number shows that it missed a message.
//!
//! Everything goes through one [`Redis`] handle: a connection that reconnects by itself,
//! a key prefix (so services and tests can share a server), a timeout per call and a
//! circuit breaker. When Redis cannot be reached, calls fail with
//! [`Error::Unavailable`] within the timeout (at once while the circuit is open); the
//! rate limiter then follows the layer's failure policy (deny with 503
//! `store_unavailable` by default, or limit in-process), the quota layer denies with
//! `store_unavailable`, and verifiers keep their caches (their own `max_stale` rules apply).
//!
//! ```no_run
//! use std::time::Duration;
//! use keygate_core::{MemoryStore, Verifier};
//! use keygate_redis::{Publishing, Redis, RedisOptions, RedisRateLimiter, RedisUsageStore, WatchOptions};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let redis = Redis::open_with("redis://127.0.0.1:6379", RedisOptions::new().prefix("myapi")).await.unwrap();
//! // Key writes through this store are announced to every replica.
//! let store = Publishing::new(MemoryStore::new(), &redis);
//! let verifier = Verifier::new(store);
//! let watcher = redis.watch(&verifier, WatchOptions::new().resync_every(Duration::from_secs(1))).await;
//! let limits = RedisRateLimiter::new(&redis);
//! let quotas = RedisUsageStore::new(&redis);
//! # drop((watcher, limits, quotas));
//! # }
//! ```
//!
//! Requires Redis 5 or later (Lua scripts that read `TIME` before writing) on a single
//! server or a primary; Redis Cluster is not supported (keys carry hash tags, but one call
//! may touch several keys). Tested against Redis 7.0.
#![deny(unsafe_code, unreachable_pub)]
#![warn(missing_docs)]

mod changes;
mod conn;
pub mod epoch;
mod rate;
mod usage;

pub use changes::{
    ChangeHandler, ChangeKey, ChangeWatcher, InvalidChangeKey, Publisher, Publishing, WatchOptions,
    LOG_LENGTH,
};
pub use conn::{Error, OpenError, Redis, RedisOptions};
pub use epoch::RestartMonitor;
pub use rate::{RedisRateLimiter, TimeSource};
pub use usage::RedisUsageStore;

/// The redis crate this one is built on (for commands of one's own on [`Redis::client`]).
pub use redis;
