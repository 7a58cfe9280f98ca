//! Figures, not a pass/fail check (ignored by default): the latency of a request through
//! the rate-limit layer with the Redis backend against the in-process governor limiter, in
//! the same run, what the local pre-check saves on a key over its limit, and throughput
//! with leased allowances. Run with
//!
//! ```text
//! KEYGATE_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test --release \
//!   --features redis,quota,axum --test redis_perf -- --ignored --nocapture
//! ```

mod common;
mod redis_support;

use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::core::rate::{RateBackend, RateSubject};
use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
use keygate::redis::{LeaseOptions, RedisRateLimiter};
use keygate::{ApiKey, RateLimitPolicy};
use redis_support::*;
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;
/// The stacks differ in their body types; the figures only need the status.
type Svc = BoxCloneService<Request<Body>, StatusCode, Infallible>;

fn request(key: &ApiKey) -> Request<Body> {
    Request::get("/points")
        .header("x-api-key", key.expose_secret())
        .body(Body::default())
        .unwrap()
}

async fn time(svc: &Svc, key: &ApiKey, expect: StatusCode, out: &mut Vec<Duration>) {
    let start = Instant::now();
    let status = svc.clone().oneshot(request(key)).await.unwrap();
    out.push(start.elapsed());
    assert_eq!(status, expect);
}

/// Prints the median and p99 of each variant's samples; answers the medians.
fn report(title: &str, names: &[&str], samples: &mut [Vec<Duration>]) -> Vec<Duration> {
    println!("{title}, {} samples each:", samples[0].len());
    let mut medians = vec![];
    for (name, s) in names.iter().zip(samples) {
        let (median, p99) = percentiles(s);
        medians.push(median);
        println!("  {name:<30} median {median:>10.1?}  p99 {p99:>10.1?}");
    }
    medians
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "prints latency figures; run with --release --ignored --nocapture"]
async fn redis_backed_check_latency_against_local_governor() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    // Room for every request of the run (100 M per hour: one unit every 36 us).
    let roomy = fx
        .issue_with("roomy", |r| {
            r.rate_limits = vec![
                RateLimitPolicy::per_second("burst", 1_000_000),
                RateLimitPolicy::per_hour("hourly", 100_000_000),
            ]
        })
        .await;
    let hot = fx
        .issue_with("hot", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_hour("hourly", 1)]
        })
        .await;
    let plain = RedisRateLimiter::new(&t.redis);
    let checked = RedisRateLimiter::new(&t.redis).local_precheck(NonZeroUsize::new(1000).unwrap());
    let build = |backend: Option<RedisRateLimiter>| -> Svc {
        let mut cfg = RateLimitConfig::new();
        if let Some(b) = backend {
            cfg = cfg.backend(b);
        }
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(fx.gate.auth_layer())
                .layer(RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate))
                .service(counting_ok::<Body>(Arc::default()))
                .map_response(|r: Response<_>| r.status()),
        )
    };
    let bare: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(fx.gate.auth_layer())
            .service(counting_ok::<Body>(Arc::default()))
            .map_response(|r: Response<_>| r.status()),
    );
    let local = build(None);
    let redis = build(Some(plain.clone()));
    let redis_checked = build(Some(checked.clone()));
    // Use up the hot key's hour in Redis (both limiters share the state).
    assert_eq!(redis.clone().oneshot(request(&hot)).await.unwrap(), 200);

    let names = [
        "bare (auth only)",
        "local governor",
        "redis backend",
        "redis, over limit",
        "redis + precheck, over limit",
        "PING round trip",
    ];
    let mut samples: Vec<Vec<Duration>> = vec![vec![]; names.len()];
    // Warm up, then interleave rounds so every variant sees the same conditions.
    for round in 0..26 {
        for _ in 0..200 {
            time(&bare, &roomy, StatusCode::OK, &mut samples[0]).await;
            time(&local, &roomy, StatusCode::OK, &mut samples[1]).await;
            time(&redis, &roomy, StatusCode::OK, &mut samples[2]).await;
            time(&redis, &hot, StatusCode::TOO_MANY_REQUESTS, &mut samples[3]).await;
            time(
                &redis_checked,
                &hot,
                StatusCode::TOO_MANY_REQUESTS,
                &mut samples[4],
            )
            .await;
            let start = Instant::now();
            t.redis.ping().await.unwrap();
            samples[5].push(start.elapsed());
        }
        if round == 0 {
            for s in &mut samples {
                s.clear();
            }
        }
    }
    let medians = report("per request, in process", &names, &mut samples);
    println!(
        "  rate limit added over bare: local {:?}, redis {:?}",
        medians[1].saturating_sub(medians[0]),
        medians[2].saturating_sub(medians[0])
    );
    println!(
        "  precheck on an over-limit key: {:?} instead of {:?}; round trips {} (precheck) vs {} (none)",
        medians[4],
        medians[3],
        checked.round_trips(),
        plain.round_trips()
    );
    // The backend alone: one script per call.
    let subject = RateSubject::Key(roomy.id());
    let policies = [RateLimitPolicy::per_hour("hourly", 100_000_000)];
    let mut alone = vec![];
    for _ in 0..2000 {
        let start = Instant::now();
        assert!(plain.check(subject, &policies, 1).await.unwrap().allowed);
        alone.push(start.elapsed());
    }
    let (median, p99) = percentiles(&mut alone);
    println!("  RedisRateLimiter::check alone         median {median:>10.1?}  p99 {p99:>10.1?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "prints throughput figures; run with --release --ignored --nocapture"]
async fn requests_per_second_with_redis_against_local() {
    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    let mut keys = vec![];
    for i in 0..32 {
        keys.push(
            fx.issue_with(&format!("k{i}"), |r| {
                r.rate_limits = vec![RateLimitPolicy::per_hour("hourly", 100_000_000)]
            })
            .await,
        );
    }
    let build = |backend: Option<RedisRateLimiter>| -> Svc {
        let mut cfg = RateLimitConfig::new();
        if let Some(b) = backend {
            cfg = cfg.backend(b);
        }
        BoxCloneService::new(
            ServiceBuilder::new()
                .layer(fx.gate.auth_layer())
                .layer(RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate))
                .service(counting_ok::<Body>(Arc::default()))
                .map_response(|r: Response<_>| r.status()),
        )
    };
    let variants = [
        ("local governor", build(None)),
        (
            "redis backend",
            build(Some(RedisRateLimiter::new(&t.redis))),
        ),
        (
            "redis, leased",
            build(Some(
                RedisRateLimiter::new(&t.redis).leased(LeaseOptions::new()),
            )),
        ),
    ];
    for (name, svc) in variants {
        for round in 0..2 {
            let start = Instant::now();
            let mut tasks = vec![];
            // 32 concurrent clients, one key each, 2,000 requests each.
            for key in keys.clone() {
                let svc = svc.clone();
                tasks.push(tokio::spawn(async move {
                    for _ in 0..2000 {
                        let status = svc.clone().oneshot(request(&key)).await.unwrap();
                        assert_eq!(status, StatusCode::OK);
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            let took = start.elapsed();
            if round == 1 {
                println!(
                    "  {name:<16} 64,000 requests by 32 clients in {took:?}: {:.0} requests/s",
                    64_000.0 / took.as_secs_f64()
                );
            }
        }
    }
}

/// A rate limit and a strict quota, both on Redis: as separate layers (two round trips,
/// one after the other) and fused (the quota is speculative: both scripts go out at once).
#[tokio::test(flavor = "current_thread")]
#[ignore = "prints latency figures; run with --release --ignored --nocapture"]
async fn redis_rate_and_quota_separate_against_fused() {
    use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
    use keygate::redis::RedisUsageStore;
    use keygate::{QuotaPolicy, QuotaWindow};

    let Some(t) = TestRedis::new().await else {
        return;
    };
    let fx = Fixture::new();
    let key = fx
        .issue_with("both", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_second("burst", 1_000_000)];
            r.quotas = vec![QuotaPolicy::new("daily", 100_000_000, QuotaWindow::Day)];
        })
        .await;
    let rate = RateLimitLayer::new(RateLimitConfig::new().backend(RedisRateLimiter::new(&t.redis)))
        .unwrap()
        .with_gate(&fx.gate);
    let quota = QuotaLayer::new(
        QuotaConfig::new(RedisUsageStore::new(&t.redis)).counting(Counting::Strict),
    )
    .unwrap()
    .with_gate(&fx.gate);
    let separate: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(rate.clone())
            .layer(fx.gate.auth_layer())
            .layer(quota.clone())
            .service(counting_ok::<Body>(Arc::default()))
            .map_response(|r: Response<_>| r.status()),
    );
    let fused: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(fx.gate.stack().rate(&rate).auth().quota(&quota))
            .service(counting_ok::<Body>(Arc::default()))
            .map_response(|r: Response<_>| r.status()),
    );
    let names = ["separate layers", "fused (overlapped)", "PING round trip"];
    let mut samples: Vec<Vec<Duration>> = vec![vec![]; names.len()];
    for round in 0..21 {
        for _ in 0..200 {
            time(&separate, &key, StatusCode::OK, &mut samples[0]).await;
            time(&fused, &key, StatusCode::OK, &mut samples[1]).await;
            let start = Instant::now();
            t.redis.ping().await.unwrap();
            samples[2].push(start.elapsed());
        }
        if round == 0 {
            for s in &mut samples {
                s.clear();
            }
        }
    }
    let medians = report("rate limit + strict quota on Redis", &names, &mut samples);
    println!(
        "  fused / separate: {:.2}; in PING round trips: separate {:.2}, fused {:.2}",
        medians[1].as_secs_f64() / medians[0].as_secs_f64(),
        medians[0].as_secs_f64() / medians[2].as_secs_f64(),
        medians[1].as_secs_f64() / medians[2].as_secs_f64(),
    );
}
