//! `RateLimitLayer` with the Redis backend, against the real Redis
//! (`KEYGATE_TEST_REDIS_URL`, a key prefix per test): the backend's GCRA arithmetic, the
//! same answers as the in-process limiter for a scripted mix of requests (several policies,
//! weighted and oversized costs, defaults, anonymous addresses, refunds), and the local
//! pre-check.

mod common;
mod redis_support;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use keygate::core::rate::{RateBackend, RateSubject};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::redis::{RedisRateLimiter, TimeSource};
use keygate::{ApiKey, Denial, KeyId, QuotaPolicy, QuotaWindow, RateLimitPolicy};
use redis_support::*;
use tower::{ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

fn limiter(t: &TestRedis, fx: &Fixture) -> RedisRateLimiter {
    RedisRateLimiter::new(&t.redis).time_source(TimeSource::Clock(Arc::new(fx.clock.clone())))
}

fn key_subject(s: &str) -> RateSubject {
    RateSubject::Key(KeyId::parse(s).unwrap())
}

#[tokio::test]
async fn gcra_in_one_script_counts_all_or_nothing() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    let l = limiter(&t, &fx);
    let k = key_subject("AAAAAAAAAAAA");
    let burst = [RateLimitPolicy::per_second("burst", 20)];
    // Twenty per second means twenty per second; the 21st waits one interval (50 ms).
    for i in 0..20u64 {
        let d = l.check(k, &burst, 1).await.unwrap();
        assert!(d.allowed, "request {i}");
        assert_eq!(d.standings[0].remaining, 19 - i);
        assert_eq!(
            d.standings[0].reset_after,
            Duration::from_millis(50 * (i + 1))
        );
    }
    let d = l.check(k, &burst, 1).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.standings[0].wait, Some(Duration::from_millis(50)));
    assert_eq!(d.retry_after(), Some(Duration::from_millis(50)));
    fx.clock.advance(Duration::from_millis(50));
    assert!(l.check(k, &burst, 1).await.unwrap().allowed);
    assert!(!l.check(k, &burst, 1).await.unwrap().allowed);
    assert_eq!(l.round_trips(), 23, "one round trip per check");

    // Several policies: the hourly one refuses, so the burst one is not counted either.
    let k2 = key_subject("BBBBBBBBBBBB");
    let both = [
        RateLimitPolicy::per_second("burst", 5),
        RateLimitPolicy::per_hour("hourly", 7),
    ];
    for _ in 0..5 {
        assert!(l.check(k2, &both, 1).await.unwrap().allowed);
    }
    fx.clock.advance(Duration::from_secs(1));
    let d = l.check(k2, &both, 2).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.standings[0].remaining, 3);
    assert_eq!(d.standings[1].remaining, 0);
    let d = l.check(k2, &both, 1).await.unwrap();
    assert!(!d.allowed);
    assert!(!d.standings[0].violated());
    assert!(d.standings[1].violated());
    assert_eq!(
        d.standings[0].remaining, 3,
        "burst untouched by the refusal"
    );
    // One hourly unit comes back every 3600/7 s (514.285714 s) after the seven counted,
    // the last two of them 1 s ago; a cost above a limit never fits.
    assert_eq!(d.retry_after(), Some(Duration::from_micros(513_285_715)));
    let d = l.check(k2, &both, 6).await.unwrap();
    assert!(!d.allowed);
    assert_eq!(d.standings[0].wait, None);
    assert_eq!(d.retry_after(), None);
    // A cost of 0 counts nothing and reports.
    let d = l.check(k2, &both, 0).await.unwrap();
    assert!(d.allowed);
    assert_eq!(d.standings[0].remaining, 3);

    // Refunds give units back (in the background).
    l.refund(k2, &both, 2);
    poll_until(Duration::from_secs(5), "the refund lands", || async {
        (l.refunds_in_flight() == 0).then_some(())
    })
    .await;
    let d = l.check(k2, &both, 0).await.unwrap();
    assert_eq!((d.standings[0].remaining, d.standings[1].remaining), (5, 2));

    // Two policies of one shape share state and count once.
    let k3 = key_subject("CCCCCCCCCCCC");
    let twins = [
        RateLimitPolicy::per_minute("a", 3),
        RateLimitPolicy::per_minute("b", 3),
    ];
    for _ in 0..3 {
        assert!(l.check(k3, &twins, 1).await.unwrap().allowed);
    }
    assert!(!l.check(k3, &twins, 1).await.unwrap().allowed);

    // Finer than a microsecond per unit: refused by this backend.
    let fine = RateLimitPolicy::new("fine", 2_000_000, Duration::from_secs(1));
    assert!(l.check(k3, &[fine], 1).await.is_err());
}

#[tokio::test]
async fn state_keys_expire_when_fresh_and_the_prefix_is_cleaned() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let l = RedisRateLimiter::new(&t.redis);
    let k = key_subject("DDDDDDDDDDDD");
    let p = [RateLimitPolicy::new("fast", 10, Duration::from_millis(200))];
    assert!(l.check(k, &p, 1).await.unwrap().allowed);
    assert_eq!(t.key_count().await, 1);
    // The key lives as long as the state differs from fresh (20 ms here, plus 1 ms).
    poll_until(Duration::from_secs(5), "the state key expires", || async {
        (t.key_count().await == 0).then_some(())
    })
    .await;
}

/// One step of the scripted comparison.
#[derive(Clone, Copy)]
enum Step {
    /// A request by key `n` (or anonymous from 10.0.0.`addr`) costing `cost`.
    Req {
        key: Option<usize>,
        addr: u8,
        cost: u32,
    },
    Wait(u64),
}

fn req(key: usize, cost: u32) -> Step {
    Step::Req {
        key: Some(key),
        addr: 1,
        cost,
    }
}

fn anon(addr: u8) -> Step {
    Step::Req {
        key: None,
        addr,
        cost: 1,
    }
}

fn request(keys: &[ApiKey], step: Step) -> Request<Body> {
    let Step::Req { key, addr, cost } = step else {
        unreachable!()
    };
    let mut b = Request::get("/points").header("x-cost", cost.to_string());
    if let Some(k) = key {
        b = b.header("x-api-key", keys[k].expose_secret());
    }
    let mut r = b.body(Body::default()).unwrap();
    r.extensions_mut()
        .insert(format!("10.0.0.{addr}:5000").parse::<SocketAddr>().unwrap());
    r
}

/// What the comparison looks at in a response.
fn observed(res: &http::Response<impl Sized>) -> String {
    let h = |n: &str| {
        res.headers()
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    let denial = res
        .extensions()
        .get::<Denial>()
        .map(|d| {
            format!(
                "{} {:?}",
                d.code().as_str(),
                d.violated_policies().collect::<Vec<_>>()
            )
        })
        .unwrap_or_default();
    format!(
        "{} policy=[{}] limit=[{}] retry=[{}] {denial}",
        res.status().as_u16(),
        h("ratelimit-policy"),
        h("ratelimit"),
        h("retry-after")
    )
}

#[tokio::test]
async fn answers_exactly_as_the_in_process_limiter() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    let keys = vec![
        fx.issue_with("two-policies", |r| {
            r.rate_limits = vec![
                RateLimitPolicy::per_second("burst", 5),
                RateLimitPolicy::per_hour("hourly", 8),
            ]
        })
        .await,
        fx.issue("defaults").await,
        fx.issue_with("quota", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 4)];
            r.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)];
        })
        .await,
    ];
    let redis_limiter = limiter(&t, &fx);
    let stack = |backend: Option<RedisRateLimiter>| {
        let mut cfg = RateLimitConfig::new()
            .clock(LimiterClock::manual(fx.clock.clone()))
            .default_policies([RateLimitPolicy::per_second("default", 3)])
            .anonymous_policies([RateLimitPolicy::per_minute("anonymous", 2)])
            .cost(|h| {
                h.headers()
                    .get("x-cost")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1)
            });
        if let Some(b) = backend {
            cfg = cfg.backend(b);
        }
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate))
            .layer(fx.gate.auth_layer())
            .layer(
                QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))
                    .unwrap()
                    .with_gate(&fx.gate),
            )
            .service(counting_ok::<Body>(Arc::default()))
    };
    let local = stack(None);
    let shared = stack(Some(redis_limiter.clone()));
    let mut script = vec![];
    // Key 0: burst 5/s and hourly 8/h, weighted costs.
    script.extend([req(0, 1); 6]);
    script.extend([Step::Wait(200), req(0, 1), req(0, 1), Step::Wait(1000)]);
    script.extend([req(0, 3), req(0, 1), req(0, 0), req(0, 6), req(0, 9)]);
    script.extend([Step::Wait(3_600_000 / 8 + 1), req(0, 1), req(0, 1)]);
    // Key 1: the default policy.
    script.extend([req(1, 1); 4]);
    script.extend([Step::Wait(334), req(1, 1), req(1, 2)]);
    // Key 2: the quota layer inside refuses the third and fourth requests; the rate limit
    // counts them (no refund), so the fifth is rate limited.
    script.extend([req(2, 1); 5]);
    // Anonymous requests (401 from the auth layer inside) are limited per address.
    script.extend([
        anon(1),
        anon(1),
        anon(1),
        anon(2),
        Step::Wait(30_000),
        anon(1),
    ]);
    let mut seen = vec![];
    for (i, step) in script.into_iter().enumerate() {
        if let Step::Wait(ms) = step {
            fx.clock.advance(Duration::from_millis(ms));
            continue;
        }
        let a = local.clone().oneshot(request(&keys, step)).await.unwrap();
        let b = shared.clone().oneshot(request(&keys, step)).await.unwrap();
        assert_eq!(observed(&a), observed(&b), "step {i}");
        seen.push(observed(&b));
        // Let a refund reach Redis before the next request reads the state.
        poll_until(Duration::from_secs(5), "refunds land", || async {
            (redis_limiter.refunds_in_flight() == 0).then_some(())
        })
        .await;
    }
    assert_eq!(seen.len(), 31);
    // The script exercised every kind of answer.
    let count = |needle: &str| seen.iter().filter(|s| s.contains(needle)).count();
    assert_eq!(count("200 "), 16);
    assert_eq!(count(r#"rate_limited ["burst"]"#), 3);
    assert_eq!(count(r#"rate_limited ["hourly"]"#), 1);
    assert_eq!(count(r#"cost_exceeds_limit ["burst"]"#), 1);
    assert_eq!(count(r#"cost_exceeds_limit ["burst", "hourly"]"#), 1);
    assert_eq!(count(r#"rate_limited ["default"]"#), 2);
    assert_eq!(count(r#"rate_limited ["anonymous"]"#), 1);
    assert_eq!(
        count("413 "),
        2,
        "the oversized costs: cost_exceeds_limit, no retry"
    );
    assert_eq!(count("retry=[] cost_exceeds_limit"), 2);
    assert_eq!(count("quota_exceeded"), 2);
    assert_eq!(count("401 "), 4);
}

#[tokio::test]
async fn an_invalid_policy_on_a_record_fails_closed() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    let key = fx
        .issue_with("bad", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_second("burst", 0)]
        })
        .await;
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(RateLimitConfig::new().backend(limiter(&t, &fx)))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::default()));
    let res = svc
        .oneshot(
            Request::get("/")
                .header("x-api-key", key.expose_secret())
                .body(Body::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(t.key_count().await, 0, "nothing reached Redis");
}

#[tokio::test]
async fn the_local_precheck_saves_round_trips_for_keys_over_their_limit() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    let key = fx
        .issue_with("hot", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 10)]
        })
        .await;
    let run = |precheck: bool| {
        let mut l = limiter(&t, &fx);
        if precheck {
            l = l.local_precheck(NonZeroUsize::new(1000).unwrap());
        }
        let svc = ServiceBuilder::new()
            .layer(fx.gate.auth_layer())
            .layer(
                RateLimitLayer::new(RateLimitConfig::new().backend(l.clone()))
                    .unwrap()
                    .with_gate(&fx.gate),
            )
            .service(counting_ok::<Body>(Arc::default()));
        (l, svc)
    };
    let call = |svc: &_| {
        let svc: &_ = svc;
        tower::ServiceExt::oneshot(
            Clone::clone(svc),
            Request::get("/")
                .header("x-api-key", key.expose_secret())
                .body(Body::default())
                .unwrap(),
        )
    };
    let mut figures = vec![];
    for precheck in [false, true] {
        // A fresh minute for each run (both share the key's state in Redis).
        fx.clock.advance(Duration::from_secs(61));
        let (l, svc) = run(precheck);
        let mut statuses = vec![];
        for _ in 0..10 {
            statuses.push(call(&svc).await.unwrap().status());
        }
        assert!(statuses.iter().all(|s| *s == StatusCode::OK));
        let before = l.round_trips();
        let start = std::time::Instant::now();
        for _ in 0..200 {
            let res = call(&svc).await.unwrap();
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(res.headers()["retry-after"], "6");
            assert_eq!(res.headers()["ratelimit"], r#""burst";r=0;t=60"#);
        }
        let took = start.elapsed() / 200;
        let trips = l.round_trips() - before;
        figures.push((precheck, trips, took));
        if precheck {
            // The tenth answer already showed no room left: every refusal was decided
            // locally.
            assert_eq!(trips, 0);
            assert_eq!(l.prechecked(), 200);
            // Six seconds later one unit is back: the pre-check lets it through to Redis.
            fx.clock.advance(Duration::from_secs(6));
            assert_eq!(call(&svc).await.unwrap().status(), StatusCode::OK);
            assert_eq!(l.round_trips() - before, 1);
        } else {
            assert_eq!(trips, 200);
        }
    }
    for (precheck, trips, took) in figures {
        println!(
            "over-limit key, 200 refused requests, precheck {precheck}: {trips} round trips, {took:?} per request"
        );
    }
}
