//! Shared fixtures of the Redis tests (`tests/redis_*.rs`): a key prefix per test on the
//! real Redis (`KEYGATE_TEST_REDIS_URL`, everything under it deleted at the end), a TCP
//! proxy that can cut or stall the connection, replicas (an axum server each, with its own
//! hub, verifier, change watcher and layers, all over one Redis), polling, and percentiles.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use keygate::core::audit::Auditor;
use keygate::core::usage::UsageStore;
use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
use keygate::rate_limit::{Fallback, LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::redis::{
    ChangeKey, ChangeWatcher, LeaseOptions, Publisher, Publishing, Redis, RedisOptions,
    RedisRateLimiter, RedisUsageStore, RestartMonitor, TimeSource, WatchOptions,
};
use keygate::{
    ApiKey, KeyGate, KeyId, KeyManager, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix,
    RateLimitPolicy, Verifier,
};

/// The variable naming the test Redis server.
pub const REDIS_ENV: &str = "KEYGATE_TEST_REDIS_URL";

/// A key prefix of its own on the test Redis, for one test. Every key under it is deleted
/// when this value is dropped (even if the test panicked).
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
    pub redis: Redis,
}

impl TestRedis {
    /// A new prefix, or `None` (after printing the skip line) when `KEYGATE_TEST_REDIS_URL`
    /// is unset.
    pub async fn new() -> Option<TestRedis> {
        let url = keygate_testkit::server_url(REDIS_ENV)?;
        let prefix = format!("kgtest:{}", KeyId::generate().expect("random"));
        let redis = Redis::open_with(&url, RedisOptions::new().prefix(prefix.clone()))
            .await
            .expect("open KEYGATE_TEST_REDIS_URL");
        redis.ping().await.expect("the test Redis answers PING");
        Some(TestRedis { url, prefix, redis })
    }

    /// Options with this test's prefix.
    pub fn options(&self) -> RedisOptions {
        RedisOptions::new().prefix(self.prefix.clone())
    }

    /// Another handle on the same prefix (its own connection), at `url` (a proxy, say).
    pub async fn handle(&self, url: &str, options: RedisOptions) -> Redis {
        Redis::open_with(url, options).await.expect("open")
    }

    /// The server's address (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        redis_addr(&self.url)
    }

    /// How many keys exist under the prefix, not counting the epoch markers
    /// (`{prefix}:epoch...`), which live as long as the prefix is used.
    pub async fn key_count(&self) -> usize {
        let mut c = self
            .redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let keys: Vec<String> = keygate::redis::redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut c)
            .await
            .expect("KEYS");
        let epoch = format!("{}:epoch", self.prefix);
        keys.iter().filter(|k| !k.starts_with(&epoch)).count()
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let url = self.url.clone();
        let prefix = self.prefix.clone();
        // Drop runs inside the test's runtime: clean up on a thread of its own.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let redis = Redis::open_with(
                    &url,
                    RedisOptions::new()
                        .prefix(prefix)
                        .timeout(Duration::from_secs(5)),
                )
                .await
                .ok()?;
                redis.delete_all().await.ok()
            })
        })
        .join();
        if !matches!(done, Ok(Some(_))) {
            eprintln!("warning: could not delete the keys under {}", self.prefix);
        }
    }
}

pub use keygate_testkit::net::*;

/// The host and port of a `redis://` URL.
pub fn redis_addr(url: &str) -> SocketAddr {
    url_addr(url, 6379)
}

/// One replica: an axum server on loopback with its own hub, verifier (over the shared
/// store, through [`Publishing`]), change watcher, Redis connection, and the layers auth →
/// rate limit (Redis backend) → quota (Redis usage store, strict) → handler.
pub struct Replica {
    pub addr: SocketAddr,
    pub gate: KeyGate,
    pub watcher: ChangeWatcher,
    pub limiter: RedisRateLimiter,
    pub usage: RedisUsageStore,
    pub manager: KeyManager,
    pub monitor: Option<RestartMonitor>,
}

/// How replicas are built.
#[derive(Clone)]
pub struct ReplicaSpec {
    pub store: MemoryStore,
    pub clock: ManualClock,
    pub url: String,
    pub options: RedisOptions,
    pub fallback: Fallback,
    pub resync_every: Duration,
    pub precheck: bool,
    /// Rate limits read Redis's clock instead of the manual one.
    pub server_time: bool,
    /// The durable copy of quota usage, if any.
    pub durable: Option<Arc<dyn UsageStore>>,
    /// The rate limiter's hold after Redis lost its state (its default when `None`).
    pub hold: Option<Duration>,
    /// Runs a restart monitor with this period.
    pub restart_every: Option<Duration>,
    /// The watcher's least time between two cache drops.
    pub resync_interval: Duration,
    /// Signs published changes and accepts only signed ones.
    pub signing_key: Option<ChangeKey>,
    /// Leased rate limits (`None`: precise, one script per request).
    pub rate_leases: Option<LeaseOptions>,
    /// Leased quotas (`None`: precise).
    pub quota_leases: Option<LeaseOptions>,
}

impl ReplicaSpec {
    pub fn new(t: &TestRedis, store: MemoryStore, clock: ManualClock) -> Self {
        ReplicaSpec {
            store,
            clock,
            url: t.url.clone(),
            options: t.options(),
            fallback: Fallback::Deny,
            resync_every: Duration::from_secs(1),
            precheck: false,
            server_time: false,
            durable: None,
            hold: None,
            restart_every: None,
            resync_interval: Duration::from_secs(1),
            signing_key: None,
            rate_leases: None,
            quota_leases: None,
        }
    }

    pub async fn spawn(&self) -> Replica {
        let redis = Redis::open_with(&self.url, self.options.clone())
            .await
            .expect("open");
        let mut publisher = Publisher::new(&redis);
        let mut watch = WatchOptions::new()
            .resync_every(self.resync_every)
            .resync_interval(self.resync_interval);
        if let Some(key) = &self.signing_key {
            publisher = publisher.signing_key(key.clone());
            watch = watch.signing_key(key.clone());
        }
        let verifier = Verifier::builder(Publishing::with_publisher(self.store.clone(), publisher))
            .clock(self.clock.clone())
            .build();
        let watcher = redis.watch(&verifier, watch).await;
        let gate = KeyGate::new(verifier.clone());
        let mut limiter = RedisRateLimiter::new(&redis);
        if !self.server_time {
            limiter = limiter.time_source(TimeSource::Clock(Arc::new(self.clock.clone())));
        }
        if self.precheck {
            limiter = limiter.local_precheck(std::num::NonZeroUsize::new(10_000).unwrap());
        }
        if let Some(hold) = self.hold {
            limiter = limiter.hold_after_loss(hold);
        }
        if let Some(options) = &self.rate_leases {
            limiter = limiter.leased(options.clone());
        }
        let rate = RateLimitLayer::new(
            RateLimitConfig::new()
                .default_policies([])
                .anonymous_policies([RateLimitPolicy::per_minute("anonymous", 1000)])
                .clock(LimiterClock::manual(self.clock.clone()))
                .backend(limiter.clone())
                .fallback(self.fallback),
        )
        .expect("rate-limit layer")
        .with_gate(&gate);
        let mut usage = RedisUsageStore::new(&redis);
        if let Some(durable) = &self.durable {
            usage = usage.durable(durable.clone());
        }
        if !self.server_time {
            usage = usage.time_source(TimeSource::Clock(Arc::new(self.clock.clone())));
        }
        if let Some(options) = &self.quota_leases {
            usage = usage.leased(options.clone());
        }
        let quota = QuotaLayer::new(QuotaConfig::new(usage.clone()).counting(Counting::Strict))
            .expect("quota layer")
            .with_gate(&gate);
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .layer(quota)
            .layer(rate)
            .layer(gate.auth_layer());
        let addr = keygate_testkit::serve::spawn_axum_with_peer(app).await;
        let manager = KeyManager::for_verifier(&verifier, Auditor::tracing());
        let monitor = self.restart_every.map(|every| redis.detect_restarts(every));
        Replica {
            addr,
            gate,
            watcher,
            limiter,
            usage,
            manager,
            monitor,
        }
    }
}

/// Three replicas of `spec`, each subscribed to key changes.
pub async fn three(spec: &ReplicaSpec) -> Vec<Replica> {
    let mut replicas = vec![];
    for _ in 0..3 {
        let r = spec.spawn().await;
        r.watcher.subscribed().await;
        replicas.push(r);
    }
    replicas
}

/// Sends `per_replica` requests with `key` to every replica at once; returns the statuses.
pub async fn load(replicas: &[Replica], key: &ApiKey, per_replica: usize) -> Vec<http::StatusCode> {
    let mut tasks = vec![];
    for r in replicas {
        for _ in 0..per_replica {
            let (addr, headers) = (r.addr, crate::common::with_key(key));
            tasks.push(tokio::spawn(async move {
                crate::common::send(addr, "/", headers).await.0
            }));
        }
    }
    let mut statuses = vec![];
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    statuses
}

/// How many of `statuses` are `s`.
pub fn count(statuses: &[http::StatusCode], s: http::StatusCode) -> usize {
    statuses.iter().filter(|x| **x == s).count()
}

/// The median and 99th percentile of `samples` (sorted in place).
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Generates a key (named `redis-test`), lets `edit` shape its record, and stores it.
pub async fn issue(
    store: &MemoryStore,
    clock: &ManualClock,
    edit: impl FnOnce(&mut KeyRecord),
) -> (ApiKey, KeyRecord) {
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        &keygate::KeyHasher::new(),
        "redis-test",
        keygate::Clock::now(clock),
    )
    .unwrap();
    edit(&mut record);
    store.insert(&record).await.unwrap();
    (key, record)
}
