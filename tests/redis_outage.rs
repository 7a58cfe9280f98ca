//! Redis outages, made by cutting or stalling a TCP proxy between a replica and the real
//! Redis (`KEYGATE_TEST_REDIS_URL`, a key prefix per test): the rate limit fails closed by
//! default (503 `store_unavailable`) or falls back to in-process limits, quotas fail
//! closed, nothing waits longer than the timeout, and everything reconnects by itself;
//! key changes missed or unpublished during the outage still reach every replica after it.

mod common;
mod redis_support;

use std::time::{Duration, Instant};

use common::{send, with_key};
use http::StatusCode;
use keygate::rate_limit::Fallback;
use keygate::redis::{Publisher, Publishing};
use keygate::{
    KeyStatus, KeyStore, ManualClock, MemoryStore, QuotaPolicy, QuotaWindow, RateLimitPolicy,
};
use redis_support::*;

/// A replica whose Redis traffic goes through `proxy`, with a 100 ms timeout.
fn through(t: &TestRedis, proxy: &Proxy, store: &MemoryStore, clock: &ManualClock) -> ReplicaSpec {
    let mut spec = ReplicaSpec::new(t, store.clone(), clock.clone());
    spec.url = with_addr(&t.url, proxy.addr);
    spec.options = t
        .options()
        .timeout(Duration::from_millis(100))
        .retry_after(Duration::from_millis(200));
    spec.resync_every = Duration::from_millis(100);
    spec
}

async fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_by_default_and_reconnects_by_itself() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let proxy = Proxy::start(t.addr()).await;
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replica = through(&t, &proxy, &store, &clock).spawn().await;
    let (limited, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 5)]
    })
    .await;
    let (metered, _) = issue(&store, &clock, |r| {
        r.quotas = vec![QuotaPolicy::new("daily", 5, QuotaWindow::Day)]
    })
    .await;
    for key in [&limited, &metered] {
        assert_eq!(
            send(replica.addr, "/", with_key(key)).await.0,
            StatusCode::OK
        );
    }

    proxy.set(Mode::Cut);
    for key in [&limited, &metered] {
        let start = Instant::now();
        let (status, headers, body) = send(replica.addr, "/", with_key(key)).await;
        let took = start.elapsed();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&body).await["code"], "store_unavailable");
        if key == &limited {
            assert_eq!(headers["retry-after"], "1");
        }
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    // While the circuit is open requests fail at once, without waiting for Redis.
    let start = Instant::now();
    for _ in 0..20 {
        let (status, _, _) = send(replica.addr, "/", with_key(&limited)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    println!("cut: 20 refusals in {:?}", start.elapsed());

    proxy.set(Mode::On);
    let (_, back) = poll_until(Duration::from_secs(10), "Redis answers again", || async {
        (send(replica.addr, "/", with_key(&limited)).await.0 == StatusCode::OK).then_some(())
    })
    .await;
    println!("reconnected {back:?} after the proxy came back");
    // The outage counted nothing: two of five used now, in Redis.
    let (status, headers, _) = send(replica.addr, "/", with_key(&limited)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["ratelimit"], r#""burst";r=2;t=36"#);
    assert_eq!(
        send(replica.addr, "/", with_key(&metered)).await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_timeout() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let proxy = Proxy::start(t.addr()).await;
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replica = through(&t, &proxy, &store, &clock).spawn().await;
    let (key, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 50)]
    })
    .await;
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );
    proxy.set(Mode::Stall);
    let start = Instant::now();
    let (status, _, _) = send(replica.addr, "/", with_key(&key)).await;
    let first = start.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        first >= Duration::from_millis(90) && first < Duration::from_millis(600),
        "{first:?}"
    );
    let start = Instant::now();
    let (status, _, _) = send(replica.addr, "/", with_key(&key)).await;
    let second = start.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(second < Duration::from_millis(50), "{second:?}");
    println!("stalled: first refusal after {first:?} (timeout 100 ms), then {second:?}");
    proxy.set(Mode::On);
    poll_until(Duration::from_secs(10), "Redis answers again", || async {
        (send(replica.addr, "/", with_key(&key)).await.0 == StatusCode::OK).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_limits_in_process_until_redis_is_back() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let proxy = Proxy::start(t.addr()).await;
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let mut spec = through(&t, &proxy, &store, &clock);
    spec.fallback = Fallback::Local;
    let replica = spec.spawn().await;
    let (key, _) = issue(&store, &clock, |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)]
    })
    .await;
    proxy.set(Mode::Cut);
    // Redis is out of reach: this replica limits by itself, with the same policy.
    for r in ["2", "1", "0"] {
        let (status, headers, _) = send(replica.addr, "/", with_key(&key)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["ratelimit"]
            .to_str()
            .unwrap()
            .contains(&format!("r={r}")));
    }
    let (status, headers, body) = send(replica.addr, "/", with_key(&key)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "20");
    assert_eq!(json(&body).await["code"], "rate_limited");
    assert_eq!(t.key_count().await, 0, "nothing reached Redis");

    proxy.set(Mode::On);
    // Back on Redis, whose state for the key is fresh: three more pass, counted there.
    poll_until(Duration::from_secs(10), "Redis answers again", || async {
        let (status, _, _) = send(replica.addr, "/", with_key(&key)).await;
        (status == StatusCode::OK && replica.limiter.redis().is_available()).then_some(())
    })
    .await;
    let trips = replica.limiter.round_trips();
    let mut ok = 1;
    while send(replica.addr, "/", with_key(&key)).await.0 == StatusCode::OK {
        ok += 1;
        assert!(ok <= 3);
    }
    assert_eq!(ok, 3);
    assert!(replica.limiter.round_trips() > trips);
    assert_eq!(
        t.key_count().await,
        1,
        "the key's state lives in Redis again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_missed_changes_catches_up_from_the_log_when_it_reconnects() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let proxy = Proxy::start(t.addr()).await;
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    let replica = through(&t, &proxy, &store, &clock).spawn().await;
    replica.watcher.subscribed().await;
    let (key, mut record) = issue(&store, &clock, |_| {}).await;
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );

    proxy.set(Mode::Cut);
    poll_until(Duration::from_secs(5), "the watcher notices", || async {
        (!replica.watcher.is_subscribed()).then_some(())
    })
    .await;
    // Another replica revokes the key; its message is published while this one is away.
    let writer = Publishing::new(store.clone(), &t.redis);
    record.status = KeyStatus::Revoked;
    writer.update(&record).await.unwrap();
    assert_eq!(writer.publisher().pending(), 0, "published");
    // The revoked key is still served from the cache (the message was missed).
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );

    let back = Instant::now();
    proxy.set(Mode::On);
    poll_until(
        Duration::from_secs(10),
        "the revocation reaches the replica",
        || async {
            (send(replica.addr, "/", with_key(&key)).await.0 == StatusCode::UNAUTHORIZED)
                .then_some(())
        },
    )
    .await;
    println!(
        "missed revocation applied {:?} after the connection came back",
        back.elapsed()
    );
    // Applied from the change log, key by key: the rest of the cache was kept.
    assert_eq!(replica.watcher.resyncs(), 0);
    assert_eq!(replica.watcher.healed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_written_while_redis_is_down_is_published_when_it_is_back() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let proxy = Proxy::start(t.addr()).await;
    let (store, clock) = (MemoryStore::new(), ManualClock::at_2026());
    // This replica reaches Redis directly; the writer goes through the proxy.
    let replica = ReplicaSpec::new(&t, store.clone(), clock.clone())
        .spawn()
        .await;
    replica.watcher.subscribed().await;
    let (key, mut record) = issue(&store, &clock, |_| {}).await;
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );

    let proxied = t
        .handle(
            &with_addr(&t.url, proxy.addr),
            t.options().timeout(Duration::from_millis(100)),
        )
        .await;
    let writer = Publishing::with_publisher(store.clone(), Publisher::new(&proxied));
    proxy.set(Mode::Cut);
    record.status = KeyStatus::Revoked;
    // The write succeeds even though its announcement cannot go out yet.
    writer.update(&record).await.unwrap();
    assert_eq!(writer.publisher().pending(), 1);
    assert_eq!(
        send(replica.addr, "/", with_key(&key)).await.0,
        StatusCode::OK
    );

    proxy.set(Mode::On);
    poll_until(
        Duration::from_secs(10),
        "the queued change goes out",
        || async { (writer.publisher().pending() == 0).then_some(()) },
    )
    .await;
    poll_until(
        Duration::from_secs(5),
        "the replica refuses the key",
        || async {
            (send(replica.addr, "/", with_key(&key)).await.0 == StatusCode::UNAUTHORIZED)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        replica.watcher.resyncs(),
        0,
        "delivered as a message, not a resync"
    );
}
