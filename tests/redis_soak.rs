//! A multi-replica soak, bounded in time: three replicas (axum servers on loopback, each
//! with its own hub, verifier, change watcher, connections and layers audit → auth → rate
//! limit → quota → handler) with their keys in PostgreSQL (`KEYGATE_TEST_POSTGRES_URL`, a
//! schema of its own) and their limits and quotas in Redis (`KEYGATE_TEST_REDIS_URL`, a
//! prefix of its own), loaded together with a mix of keys and tenants while the Redis and
//! PostgreSQL connections are cut and restored mid-run (TCP proxies), and a key is revoked.
//!
//! Afterwards, from what the clients saw and what the stores and audit sinks hold:
//! - no request with the revoked key was allowed after the propagation bound;
//! - no key got more than its rate limit or its quota;
//! - every quota's usage in Redis equals the requests served with that key (outcomes lost
//!   in a cut are settled by the store, not double-counted);
//! - every request has exactly one audit event, with the status the client saw;
//! - every allowed request was answered for its own key's tenant.
//!
//! The clock of limits and quota windows stands still (a manual clock), so "at most N"
//! is exact: nothing refills during the run.

mod common;
mod redis_support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use common::{send, with_key};
use http::{HeaderValue, StatusCode};
use keygate::core::audit::{AuditEvent, Auditor, MemorySink};
use keygate::core::usage::{UsageStore, Window};
use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
use keygate::rate_limit::{Fallback, LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::redis::{
    ChangeWatcher, Publishing, Redis, RedisRateLimiter, RedisUsageStore, TimeSource, WatchOptions,
};
use keygate::sql::{SqlOptions, SqlStore};
use keygate::{
    ApiKey, Authenticated, KeyGate, KeyManager, KeyRecord, KeyStore, ManualClock, Prefix,
    QuotaPolicy, QuotaWindow, RateLimitPolicy, Verifier,
};
use keygate_testkit::pg::PgSchema;
use redis_support::*;

/// How long a revocation may take to reach every replica (pub/sub, with the periodic
/// resync as the safety net). Generous: the machine runs other tests at the same time.
const PROPAGATION: Duration = Duration::from_secs(1);

/// The rate limit and the quota of the limited keys (nothing refills: the clock stands).
const RATE: u32 = 40;
const QUOTA: u64 = 60;

struct SoakReplica {
    addr: std::net::SocketAddr,
    sink: MemorySink,
    auditor: Auditor,
    manager: KeyManager,
    usage: RedisUsageStore,
    _watcher: ChangeWatcher,
    _gate: KeyGate,
}

async fn replica(
    pg_url: &str,
    schema: &str,
    redis_url: &str,
    t: &TestRedis,
    clock: &ManualClock,
) -> SoakReplica {
    let store = SqlStore::open_with(pg_url, SqlOptions::new().schema(schema.to_owned()))
        .await
        .expect("open the key database through its proxy");
    // A per-call timeout of 2 s (not 250 ms): a loaded machine's scheduling delays must
    // not turn into 503s outside the cuts.
    let redis = Redis::open_with(redis_url, t.options().timeout(Duration::from_secs(2)))
        .await
        .expect("open Redis through its proxy");
    let verifier = Verifier::builder(Publishing::new(store, &redis))
        .clock(clock.clone())
        .build();
    let watcher = redis
        .watch(
            &verifier,
            WatchOptions::new().resync_every(Duration::from_millis(200)),
        )
        .await;
    watcher.subscribed().await;
    let gate = KeyGate::new(verifier.clone());
    let limiter =
        RedisRateLimiter::new(&redis).time_source(TimeSource::Clock(Arc::new(clock.clone())));
    let rate = RateLimitLayer::new(
        RateLimitConfig::new()
            .default_policies([])
            .clock(LimiterClock::manual(clock.clone()))
            .backend(limiter)
            .fallback(Fallback::Deny),
    )
    .expect("rate-limit layer")
    .with_gate(&gate);
    let usage = RedisUsageStore::new(&redis);
    let quota = QuotaLayer::new(
        QuotaConfig::new(usage.clone())
            .counting(Counting::Strict)
            .clock(clock.clone()),
    )
    .expect("quota layer")
    .with_gate(&gate);
    let sink = MemorySink::new();
    let auditor = Auditor::builder()
        .capacity(100_000)
        .spawn(sink.clone())
        .expect("auditor");
    let app =
        Router::new()
            .route(
                "/",
                get(|Authenticated(p): Authenticated| async move {
                    p.tenant().unwrap_or("-").to_owned()
                }),
            )
            .layer(quota)
            .layer(rate)
            .layer(gate.auth_layer())
            .layer(gate.audit_layer(auditor.clone()));
    let addr = keygate_testkit::serve::spawn_axum_with_peer(app).await;
    let manager = KeyManager::for_verifier(&verifier, Auditor::tracing());
    SoakReplica {
        addr,
        sink,
        auditor,
        manager,
        usage,
        _watcher: watcher,
        _gate: gate,
    }
}

/// One key of the mix.
struct Mixed {
    key: ApiKey,
    tenant: String,
    rate: bool,
    quota: bool,
}

/// What one client request saw.
struct Seen {
    key: usize,
    started: Instant,
    status: StatusCode,
    body: String,
    request_id: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_keep_every_limit_and_record_under_cuts_and_a_revocation() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let Some(pg) = PgSchema::create().await else {
        return;
    };
    let clock = ManualClock::at_2026();
    // The schema is created (migrated) directly; the replicas reach it through a proxy.
    let admin = SqlStore::open_with(&pg.url, SqlOptions::new().schema(pg.schema.clone()))
        .await
        .expect("open the key database");
    let pg_proxy = Proxy::start(url_addr(&pg.url, 5432)).await;
    let redis_proxy = Proxy::start(t.addr()).await;
    let pg_url = with_addr(&pg.url, pg_proxy.addr);
    let redis_url = with_addr(&t.url, redis_proxy.addr);

    // The mix: per tenant, a rate-limited key, a key with a quota, a key with both and an
    // unlimited one; and one more unlimited key that is revoked mid-run.
    let mut keys = Vec::new();
    for tenant in ["acme", "globex", "initech"] {
        for (rate, quota) in [(true, false), (false, true), (true, true), (false, false)] {
            let (key, mut record) = KeyRecord::generate(
                &Prefix::default(),
                &keygate::KeyHasher::new(),
                format!("{tenant}-{rate}-{quota}"),
                keygate::Clock::now(&clock),
            )
            .unwrap();
            record.attributes.insert("tenant".into(), tenant.into());
            if rate {
                record.rate_limits = vec![RateLimitPolicy::per_minute("per-minute", RATE)];
            }
            if quota {
                record.quotas = vec![QuotaPolicy::new("daily", QUOTA, QuotaWindow::Day)];
            }
            admin.insert(&record).await.unwrap();
            keys.push(Mixed {
                key,
                tenant: tenant.into(),
                rate,
                quota,
            });
        }
    }
    let (revoked_key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        &keygate::KeyHasher::new(),
        "to-revoke",
        keygate::Clock::now(&clock),
    )
    .unwrap();
    record.attributes.insert("tenant".into(), "umbrella".into());
    admin.insert(&record).await.unwrap();
    let revoked = keys.len();
    keys.push(Mixed {
        key: revoked_key.clone(),
        tenant: "umbrella".into(),
        rate: false,
        quota: false,
    });
    let keys = Arc::new(keys);

    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&pg_url, &pg.schema, &redis_url, &t, &clock).await);
    }

    // Load: four clients per replica, each cycling through the keys from its own offset.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (r, rep) in replicas.iter().enumerate() {
        for c in 0..4 {
            let (addr, keys, stop) = (rep.addr, keys.clone(), stop.clone());
            clients.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut i = r * 4 + c;
                while !stop.load(Ordering::Relaxed) {
                    let k = i % keys.len();
                    let request_id = format!("soak-{r}-{c}-{i}");
                    let mut headers = with_key(&keys[k].key);
                    headers.insert("x-request-id", HeaderValue::from_str(&request_id).unwrap());
                    let started = Instant::now();
                    let (status, headers, body) = send(addr, "/", headers).await;
                    assert_eq!(
                        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
                        Some(request_id.as_str()),
                        "the request id comes back"
                    );
                    seen.push(Seen {
                        key: k,
                        started,
                        status,
                        body: String::from_utf8_lossy(&body).into_owned(),
                        request_id,
                    });
                    i += 7;
                }
                seen
            }));
        }
    }

    // The run: cuts and restores of each connection, a revocation, both cut at once.
    let phase = |ms| tokio::time::sleep(Duration::from_millis(ms));
    phase(400).await;
    redis_proxy.set_on(false);
    phase(700).await;
    redis_proxy.set_on(true);
    phase(500).await;
    pg_proxy.set_on(false);
    phase(700).await;
    pg_proxy.set_on(true);
    phase(500).await;
    // Revoked through replica 1 (its store write and its announcement), timed from the
    // moment the call returned.
    replicas[1]
        .manager
        .revoke("soak", revoked_key.id())
        .await
        .expect("revoke while both connections are up");
    let revoked_at = Instant::now();
    phase(500).await;
    redis_proxy.set_on(false);
    pg_proxy.set_on(false);
    phase(500).await;
    redis_proxy.set_on(true);
    pg_proxy.set_on(true);
    phase(800).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen: Vec<Seen> = Vec::new();
    for c in clients {
        seen.extend(c.await.expect("client"));
    }

    // What the clients saw.
    let mut by_status: HashMap<StatusCode, usize> = HashMap::new();
    let mut served = vec![0u64; keys.len()];
    for s in &seen {
        *by_status.entry(s.status).or_default() += 1;
        assert!(
            matches!(
                s.status,
                StatusCode::OK
                    | StatusCode::TOO_MANY_REQUESTS
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::UNAUTHORIZED
            ),
            "unexpected status {} for {}",
            s.status,
            s.request_id
        );
        if s.status == StatusCode::OK {
            served[s.key] += 1;
            assert_eq!(
                s.body, keys[s.key].tenant,
                "answered for the key's own tenant"
            );
        } else if s.status == StatusCode::UNAUTHORIZED {
            assert_eq!(s.key, revoked, "only the revoked key is refused as unknown");
        }
    }
    println!(
        "soak: {} requests over 3 replicas: {by_status:?}; served per key {served:?}",
        seen.len()
    );
    assert!(
        by_status.get(&StatusCode::OK).copied().unwrap_or(0) > 100,
        "the replicas served between the cuts"
    );
    assert!(
        by_status
            .get(&StatusCode::SERVICE_UNAVAILABLE)
            .copied()
            .unwrap_or(0)
            > 0,
        "the cuts were felt"
    );

    // The revocation: nothing allowed after the bound.
    let late: Vec<&Seen> = seen
        .iter()
        .filter(|s| {
            s.key == revoked && s.status == StatusCode::OK && s.started > revoked_at + PROPAGATION
        })
        .collect();
    assert!(
        late.is_empty(),
        "{} requests with the revoked key were allowed after {PROPAGATION:?}, the first {}",
        late.len(),
        late[0].request_id
    );
    assert!(
        seen.iter()
            .any(|s| s.key == revoked && s.status == StatusCode::UNAUTHORIZED),
        "the revocation was seen"
    );

    // Limits: at most N per key across the three replicas.
    for (k, m) in keys.iter().enumerate() {
        if m.rate {
            assert!(
                served[k] <= u64::from(RATE),
                "key {k}: {} > {RATE}",
                served[k]
            );
        }
        if m.quota {
            assert!(served[k] <= QUOTA, "key {k}: {} > {QUOTA}", served[k]);
        }
    }

    // Usage: Redis counted exactly what was served, once outcomes lost in the cuts are
    // settled (each replica's store settles its own).
    let day = Window::containing(QuotaWindow::Day, keygate::Clock::now(&clock));
    for rep in &replicas {
        poll_until(Duration::from_secs(10), "lost outcomes settled", || async {
            (rep.usage.unsettled() == 0).then_some(())
        })
        .await;
    }
    let settled: Vec<(u64, u64)> = replicas.iter().map(|r| r.usage.settled()).collect();
    println!("lost quota answers settled per replica (taken back, cancelled): {settled:?}");
    for (k, m) in keys.iter().enumerate() {
        if m.quota {
            let used = replicas[0]
                .usage
                .load(&m.key.id(), &[day])
                .await
                .expect("read usage");
            assert_eq!(
                used[0].requests, served[k],
                "key {k}: the quota counted {} requests, {} were served",
                used[0].requests, served[k]
            );
        }
    }

    // Audit: one event per request, with the status the client saw.
    let mut events: HashMap<String, u16> = HashMap::new();
    for rep in &replicas {
        rep.auditor.flush().await.expect("flush the audit queue");
        for e in rep.sink.events() {
            if let AuditEvent::Request(r) = e {
                let id = r.request_id.to_string();
                assert!(
                    events.insert(id.clone(), r.status.unwrap_or(0)).is_none(),
                    "two audit events for {id}"
                );
            }
        }
    }
    assert_eq!(events.len(), seen.len(), "one audit event per request");
    for s in &seen {
        assert_eq!(
            events.get(&s.request_id).copied(),
            Some(s.status.as_u16()),
            "the audit event of {} has the status the client saw",
            s.request_id
        );
    }
    drop(admin);
}
