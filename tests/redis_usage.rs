//! `RedisUsageStore` against the real Redis (`KEYGATE_TEST_REDIS_URL`, a key prefix per
//! test): the same answers as the in-memory store for the same calls, atomic check-and-add
//! under concurrent replicas, expiry, saturation, reports, unreadable data, and the quota
//! layer counting strictly in it.

mod common;
mod redis_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use keygate::core::usage::{
    utc, Admission, Increment, Limit, MemoryUsageStore, Usage, UsageError, UsageStore, Window,
};
use keygate::redis::{Redis, RedisUsageStore};
use keygate::{KeyId, QuotaWindow, Refill};
use redis_support::*;

fn key(s: &str) -> KeyId {
    KeyId::parse(s).unwrap()
}

fn u(cost: u64, requests: u64) -> Usage {
    Usage { cost, requests }
}

/// A scripted series of calls; returns what each answered, as text.
async fn scenario(s: &dyn UsageStore) -> Vec<String> {
    let k = key("AAAAAAAAAAAA");
    let other = key("BBBBBBBBBBBB");
    let now = utc(2026, 5, 1, 10, 30, 0);
    let hour = Window::containing(QuotaWindow::Hour, now);
    let day = Window::containing(QuotaWindow::Day, now);
    let month = Window::containing(QuotaWindow::Month, now);
    let credits = Window::containing(QuotaWindow::Credits(Refill::Never), now);
    let monthly15 = Window::containing(QuotaWindow::Credits(Refill::Monthly { day: 15 }), now);
    let limits = [
        Limit {
            window: 0,
            limit: 3,
        },
        Limit {
            window: 1,
            limit: 5,
        },
    ];
    let mut out = vec![];
    let mut log = |what: &str, v: String| out.push(format!("{what}: {v}"));
    for cost in [3, 1, 0, 2] {
        let a = s
            .check_and_add(&k, &[hour, day], &limits, cost)
            .await
            .unwrap();
        log("check hour+day", format!("{a:?}"));
    }
    let next_hour = Window::containing(QuotaWindow::Hour, utc(2026, 5, 1, 11, 0, 0));
    for cost in [2, 1, 6] {
        let a = s
            .check_and_add(&k, &[next_hour, day], &limits, cost)
            .await
            .unwrap();
        log("check next hour", format!("{a:?}"));
    }
    // A window without a limit counts too (the meter); an overflowing sum is refused.
    let a = s
        .check_and_add(
            &k,
            &[month, credits],
            &[Limit {
                window: 1,
                limit: 10,
            }],
            4,
        )
        .await
        .unwrap();
    log("meter", format!("{a:?}"));
    let a = s
        .check_and_add(
            &k,
            &[credits],
            &[Limit {
                window: 0,
                limit: u64::MAX,
            }],
            1 << 50,
        )
        .await
        .unwrap();
    log("huge limit", format!("{a:?}"));
    s.add(&[
        Increment {
            key: k,
            window: monthly15,
            usage: u(10, 2),
        },
        Increment {
            key: other,
            window: day,
            usage: u(4, 4),
        },
        Increment {
            key: other,
            window: day,
            usage: u(1, 1),
        },
    ])
    .await
    .unwrap();
    s.subtract(&[
        Increment {
            key: other,
            window: day,
            usage: u(2, 1),
        },
        Increment {
            key: k,
            window: monthly15,
            usage: u(50, 50),
        },
        Increment {
            key: other,
            window: hour,
            usage: u(1, 1),
        },
    ])
    .await
    .unwrap();
    let loaded = s
        .load(&k, &[hour, next_hour, day, month, credits, monthly15])
        .await
        .unwrap();
    log("load k", format!("{loaded:?}"));
    log(
        "load other",
        format!("{:?}", s.load(&other, &[day, hour]).await.unwrap()),
    );
    for (from, to) in [
        (utc(2026, 5, 1, 0, 0, 0), utc(2026, 5, 2, 0, 0, 0)),
        (utc(2026, 5, 1, 11, 0, 0), utc(2026, 5, 1, 11, 0, 0)),
        (UNIX_EPOCH, utc(2030, 1, 1, 0, 0, 0)),
    ] {
        let rows = s.report(&k, from, to).await.unwrap();
        log("report", format!("{rows:?}"));
    }
    out
}

#[tokio::test]
async fn answers_exactly_as_the_memory_store() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let memory = scenario(&MemoryUsageStore::new()).await;
    let redis = scenario(&RedisUsageStore::new(&t.redis)).await;
    assert_eq!(memory.len(), 14);
    for (m, r) in memory.iter().zip(&redis) {
        assert_eq!(m, r);
    }
    // With a durable copy (re-seeding, write-through, reports from the copy): the same.
    t.redis.delete_all().await.unwrap();
    let copy = MemoryUsageStore::new();
    let durable = scenario(&RedisUsageStore::new(&t.redis).durable(copy.clone())).await;
    for (m, r) in memory.iter().zip(&durable) {
        assert_eq!(m, r);
    }
    // The copy holds what Redis holds.
    let (k, until) = (key("AAAAAAAAAAAA"), utc(2030, 1, 1, 0, 0, 0));
    let in_redis = RedisUsageStore::new(&t.redis)
        .report(&k, UNIX_EPOCH, until)
        .await
        .unwrap();
    assert!(in_redis.len() >= 4, "{in_redis:?}");
    assert_eq!(copy.report(&k, UNIX_EPOCH, until).await.unwrap(), in_redis);
    // The scenario saw admissions, refusals and reports with rows.
    assert!(memory[0].contains("Admitted"));
    assert!(memory[1].contains("Refused"));
    assert!(memory[13].contains("UsageRecord"));
}

#[tokio::test]
async fn windows_expire_after_their_retention_and_credits_never() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let s = RedisUsageStore::new(&t.redis).retention(Duration::from_secs(86_400));
    let k = key("CCCCCCCCCCCC");
    let now = utc(2026, 5, 1, 10, 30, 0);
    let hour = Window::containing(QuotaWindow::Hour, now);
    let credits = Window::containing(QuotaWindow::Credits(Refill::Never), now);
    s.check_and_add(&k, &[hour, credits], &[], 1).await.unwrap();
    let mut c = t
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl = |name: String| {
        let mut c = c.clone();
        async move {
            keygate::redis::redis::cmd("PTTL")
                .arg(name)
                .query_async::<i64>(&mut c)
                .await
                .unwrap()
        }
    };
    let p = &t.prefix;
    // An hour plus a day of retention (ms), relative to the write.
    let hour_ttl = ttl(format!("{p}:q:{{{k}}}:hour:{}", hour.start_secs())).await;
    assert!(
        (3_600_000 + 86_400_000 - 60_000..=3_600_000 + 86_400_000).contains(&hour_ttl),
        "{hour_ttl}"
    );
    assert_eq!(ttl(format!("{p}:q:{{{k}}}:credits:0")).await, -1);
    // The index outlives the longest window.
    let idx_ttl = ttl(format!("{p}:q:{{{k}}}:w")).await;
    assert!(idx_ttl > 31 * 86_400_000, "{idx_ttl}");
    // Unreadable counters are an error, not a zero.
    let _: () = keygate::redis::redis::cmd("HSET")
        .arg(format!("{p}:q:{{{k}}}:hour:{}", hour.start_secs()))
        .arg("c")
        .arg("lots")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(matches!(
        s.load(&k, &[hour]).await,
        Err(UsageError::Corrupt(_))
    ));
    assert!(matches!(
        s.check_and_add(&k, &[hour], &[], 1 << 54).await,
        Err(UsageError::Corrupt(_))
    ));
    // Refused before any write: a readable window of the same call is not counted either,
    // and a refund does not "repair" the unreadable one to zero.
    assert!(matches!(
        s.check_and_add(&k, &[credits, hour], &[], 1).await,
        Err(UsageError::Corrupt(_))
    ));
    assert_eq!(s.load(&k, &[credits]).await.unwrap(), [u(1, 1)]);
    let refund = [credits, hour].map(|window| Increment {
        key: k,
        window,
        usage: u(1, 1),
    });
    assert!(matches!(
        s.subtract(&refund).await,
        Err(UsageError::Corrupt(_))
    ));
    assert_eq!(s.load(&k, &[credits]).await.unwrap(), [u(1, 1)]);
    let raw: String = keygate::redis::redis::cmd("HGET")
        .arg(format!("{p}:q:{{{k}}}:hour:{}", hour.start_secs()))
        .arg("c")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(raw, "lots");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_never_overshoot_a_window_together() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    // Three handles, each with its own connection, as three replicas would have.
    let mut stores = vec![];
    for _ in 0..3 {
        let redis = Redis::open_with(&t.url, t.options()).await.unwrap();
        stores.push(RedisUsageStore::new(&redis));
    }
    let k = key("DDDDDDDDDDDD");
    let day = Window::containing(QuotaWindow::Day, utc(2026, 5, 1, 10, 30, 0));
    let limit = 100;
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for i in 0..300u64 {
        let s = stores[(i % 3) as usize].clone();
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            // Costs 1, 2 or 3: the sum admitted must stay within the limit.
            let cost = 1 + i % 3;
            let a = s
                .check_and_add(&k, &[day], &[Limit { window: 0, limit }], cost)
                .await
                .unwrap();
            if matches!(a, Admission::Admitted(_)) {
                admitted.fetch_add(cost, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let total = admitted.load(Ordering::Relaxed);
    let stored = stores[0].load(&k, &[day]).await.unwrap()[0];
    println!("concurrent check_and_add over 3 connections: {total} of {limit} admitted");
    assert_eq!(stored.cost, total, "what was admitted is what is stored");
    assert!(total <= limit);
    // 300 requests of cost 1 to 3 ask for 600: the window is filled to within one cost.
    assert!(total > limit - 3, "{total}");
}

#[tokio::test]
async fn delete_all_spares_nested_prefixes_and_foreign_keys() {
    use keygate::core::rate::{RateBackend, RateSubject};
    use keygate::redis::{Publisher, RedisOptions, RedisRateLimiter};
    use keygate::RateLimitPolicy;

    let Some(t) = TestRedis::new().await else {
        return;
    };
    // `{p}` and `{p}:staging`, as `keygate` and `keygate:staging` would be.
    let staging = Redis::open_with(
        &t.url,
        RedisOptions::new().prefix(format!("{}:staging", t.prefix)),
    )
    .await
    .unwrap();
    let k = key("EEEEEEEEEEEE");
    let day = Window::containing(QuotaWindow::Day, utc(2026, 5, 1, 10, 30, 0));
    for r in [&t.redis, &staging] {
        RedisUsageStore::new(r)
            .check_and_add(&k, &[day], &[], 1)
            .await
            .unwrap();
        RedisRateLimiter::new(r)
            .check(
                RateSubject::Key(k),
                &[RateLimitPolicy::per_minute("m", 5)],
                1,
            )
            .await
            .unwrap();
        Publisher::new(r).publish(&k).await.unwrap();
    }
    let mut c = t
        .redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let cmd = keygate::redis::redis::cmd;
    // Another program's key that merely starts with the prefix.
    let foreign = format!("{}:sessions:42", t.prefix);
    let _: () = cmd("SET")
        .arg(&foreign)
        .arg("x")
        .query_async(&mut c)
        .await
        .unwrap();
    let keys = |pattern: String| {
        let mut c = c.clone();
        async move {
            let mut v: Vec<String> = cmd("KEYS").arg(pattern).query_async(&mut c).await.unwrap();
            v.sort();
            v
        }
    };
    let staged = keys(format!("{}:staging:*", t.prefix)).await;
    assert!(staged.len() >= 4, "{staged:?}");

    let deleted = t.redis.delete_all().await.unwrap();
    let left = keys(format!("{}:*", t.prefix)).await;
    let mut expected = staged.clone();
    expected.push(foreign.clone());
    expected.sort();
    assert_eq!(left, expected, "only the parent's own keys are gone");
    assert!(deleted >= 4, "{deleted}");

    // The nested prefix deletes its own keys the same way.
    assert_eq!(staging.delete_all().await.unwrap(), staged.len() as u64);
    assert_eq!(keys(format!("{}:*", t.prefix)).await, [foreign.as_str()]);
    let _: () = cmd("DEL").arg(&foreign).query_async(&mut c).await.unwrap();
}

/// A fused stack with a Redis rate limit and a strict Redis quota (the quota's script goes
/// out while the rate limit decides): what the rate limit refused is given back, so the
/// quota counts exactly the requests served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fused_rate_limit_and_strict_quota_count_what_was_served() {
    use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
    use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
    use keygate::redis::{RedisRateLimiter, TimeSource};
    use keygate::{Clock, QuotaPolicy, RateLimitPolicy};
    use tower::{ServiceBuilder, ServiceExt};

    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = common::Fixture::new();
    let api = fx
        .issue_with("both", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)];
            r.quotas = vec![QuotaPolicy::new("daily", 100, QuotaWindow::Day)];
        })
        .await;
    let clock: Arc<dyn Clock> = Arc::new(fx.clock.clone());
    let rate = RateLimitLayer::new(
        RateLimitConfig::new()
            .backend(RedisRateLimiter::new(&t.redis).time_source(TimeSource::Clock(clock))),
    )
    .unwrap();
    let usage = RedisUsageStore::new(&t.redis);
    let quota = QuotaLayer::new(
        QuotaConfig::new(usage.clone())
            .counting(Counting::Strict)
            .clock(fx.clock.clone()),
    )
    .unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.stack().rate(&rate).auth().quota(&quota))
        .service(common::counting_ok::<String>(Arc::default()));
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let req = http::Request::get("/points")
            .header("x-api-key", api.expose_secret())
            .body(String::new())
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        if res.status() == 200 {
            served.fetch_add(1, Ordering::SeqCst);
        }
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    quota.handle().flush().await.unwrap();
    let day = Window::containing(QuotaWindow::Day, fx.clock.now());
    let used = usage.load(&api.id(), &[day]).await.unwrap()[0];
    assert_eq!(
        used,
        u(3, 3),
        "the quota counted the requests served, no more"
    );
    assert_eq!(served.load(Ordering::SeqCst), 3);
    assert_eq!(usage.unsettled(), 0);
}
