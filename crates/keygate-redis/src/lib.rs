//! keygate-redis: what several replicas of a keygate-protected service share through Redis.
//!
//! - [`RedisRateLimiter`]: a [`RateBackend`](keygate_core::rate::RateBackend) running GCRA in
//!   one Lua script per request (one round trip), every named policy of the request at once
//!   (all or nothing), weighted costs, with an optional local pre-check so a caller far over
//!   its limit costs no round trip. Give it to `keygate::rate_limit::RateLimitConfig::backend`.
//! - [`RedisUsageStore`]: a [`UsageStore`](keygate_core::usage::UsageStore) for quotas:
//!   per-window counters with expiry, and an atomic check-and-add (a Lua script), so
//!   replicas counting strictly cannot overshoot together; with a durable copy
//!   ([`RedisUsageStore::durable`], the SQL usage store) losing Redis resets no quota.
//! - Leases ([`LeaseOptions`], [`RedisRateLimiter::leased`], [`RedisUsageStore::leased`]):
//!   a replica reserves a slice of a busy key's allowance in Redis (debited there, so
//!   the shared limit is never exceeded) and spends it locally without a round trip;
//!   small limits stay precise (one script per request).
//! - Change propagation: [`Publishing`] wraps a [`KeyStore`](keygate_core::KeyStore),
//!   logs and publishes the id of every key it writes; [`Redis::watch`] makes a replica's
//!   [`Verifier`](keygate_core::Verifier) evict that key, heals lost messages from the log,
//!   and trusts no message for more than an eviction (optionally signed: [`ChangeKey`]).
//! - Losing state: an [epoch](RestartMonitor) marks what Redis holds, so a flush, an eviction or a
//!   restart ([`Redis::detect_restarts`]) is noticed instead of silently resetting limits.
//!
//! # What the Redis server needs
//! - **Persistence** (`appendonly yes`, `appendfsync everysec`, and RDB snapshots as a
//!   backup), so a restart keeps the state: without it every restart is a loss (quotas are
//!   re-seeded from their durable copy, rate limits hold for
//!   [`RedisRateLimiter::hold_after_loss`]). `maxmemory-policy noeviction` (or a `volatile-*`
//!   policy): evicting keygate's keys is a loss too.
//! - **Who may publish**: only the writers of keys (the replicas, the admin tooling) need
//!   `PUBLISH` on `{prefix}:changes`; watchers need `SUBSCRIBE`. Anyone who can publish can
//!   evict keys from caches (not drop them whole) unless messages are signed.
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

mod acks;
mod changes;
mod conn;
mod epoch;
mod lease;
mod quota_lease;
mod rate;
mod rate_lease;
mod usage;

pub use changes::{
    ChangeKey, ChangeWatcher, InvalidChangeKey, Publisher, Publishing, WatchOptions, LOG_LENGTH,
};
pub use conn::{Error, OpenError, Redis, RedisOptions};
pub use epoch::RestartMonitor;
pub use lease::LeaseOptions;
pub use quota_lease::LeaseCounts;
pub use rate::{RedisRateLimiter, TimeSource};
pub use usage::RedisUsageStore;

/// The redis crate this one is built on (for commands of one's own on [`Redis::client`]).
pub use redis;
