//! An identity's rate limits and quotas are one bucket for all its keys: two keys of one
//! identity use it up together, a key of another identity is not touched, and a key under
//! both its own limit and its identity's is charged to both (the tightest decides). In
//! process (manual clock), with batched and strict quota counting, and on Redis.

mod common;
#[cfg(feature = "redis")]
mod redis_support;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::core::usage::{MemoryUsageStore, Usage, UsageStore, Window};
use keygate::quota::{Counting, QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{
    ApiKey, Clock, Denial, DenialCode, Identity, KeyStore, QuotaPolicy, QuotaWindow,
    RateLimitPolicy,
};
use tower::{ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

fn keyed(key: &ApiKey) -> Request<Body> {
    Request::get("/points")
        .header("x-api-key", key.expose_secret())
        .body(Body::default())
        .unwrap()
}

fn header<'a>(res: &'a Response<impl Sized>, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

fn denial(res: &Response<impl Sized>) -> Option<DenialCode> {
    res.extensions().get::<Denial>().map(Denial::code)
}

/// Stores identity `name` with `edit` applied.
async fn identity(fx: &Fixture, name: &str, edit: impl FnOnce(&mut Identity)) {
    let mut id = Identity::new(name, fx.gate.clock().now());
    edit(&mut id);
    fx.store.memory().insert_identity(&id).await.unwrap();
}

/// A key of identity `of` (with `edit` applied to its record).
async fn key_of(fx: &Fixture, of: &str, edit: impl FnOnce(&mut keygate::KeyRecord)) -> ApiKey {
    fx.issue_with("k", |r| {
        r.identity = Some(of.into());
        edit(r);
    })
    .await
}

#[test]
fn usage_ids_are_stable_and_distinct() {
    let a = Identity::usage_id("etl-pipeline");
    assert_eq!(a, Identity::usage_id("etl-pipeline"));
    assert_ne!(a, Identity::usage_id("etl-pipelinf"));
    assert_eq!(a.as_str().len(), 12);
    // The same in every process (a fixed derivation, not a per-process hash).
    assert_eq!(a.as_str(), Identity::usage_id("etl-pipeline").to_string());
}

#[tokio::test]
async fn two_keys_of_one_identity_exhaust_one_rate_bucket() {
    let fx = Fixture::new();
    identity(&fx, "etl", |i| {
        i.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 4)]
    })
    .await;
    identity(&fx, "other", |i| {
        i.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 4)]
    })
    .await;
    let a = key_of(&fx, "etl", |_| {}).await;
    let b = key_of(&fx, "etl", |_| {}).await;
    let c = key_of(&fx, "other", |_| {}).await;
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(
                RateLimitConfig::new().clock(LimiterClock::manual(fx.clock.clone())),
            )
            .unwrap()
            .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))));
    let mut remaining = Vec::new();
    for k in [&a, &b, &a, &b] {
        let res = svc.clone().oneshot(keyed(k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        remaining.push(header(&res, "ratelimit").unwrap().to_owned());
    }
    // One bucket: each request, whichever key sent it, takes from the same four.
    assert_eq!(
        remaining,
        [3, 2, 1, 0].map(|r| format!(r#""etl-burst";r={r};t={}"#, 1))
    );
    for k in [&a, &b] {
        let res = svc.clone().oneshot(keyed(k)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(denial(&res), Some(DenialCode::RateLimited));
    }
    // Another identity's keys have a bucket of their own.
    for _ in 0..4 {
        assert_eq!(svc.clone().oneshot(keyed(&c)).await.unwrap().status(), 200);
    }
    assert_eq!(svc.clone().oneshot(keyed(&c)).await.unwrap().status(), 429);
    // One interval later (250 ms), one request of either key passes, then none.
    fx.clock.advance(Duration::from_millis(250));
    assert_eq!(svc.clone().oneshot(keyed(&b)).await.unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(keyed(&a)).await.unwrap().status(), 429);
}

#[tokio::test]
async fn a_key_under_its_own_and_its_identitys_limit_is_charged_to_both() {
    let fx = Fixture::new();
    // The same name on both sides: the identity's never replaces the key's.
    identity(&fx, "etl", |i| {
        i.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)]
    })
    .await;
    let roomy = key_of(&fx, "etl", |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 100)]
    })
    .await;
    let tight = key_of(&fx, "etl", |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 1)]
    })
    .await;
    let p = fx
        .gate
        .verifier()
        .verify(roomy.expose_secret())
        .await
        .unwrap();
    assert_eq!(p.rate_limits().len(), 2);
    assert!(!p.rate_limit_is_shared(0) && p.rate_limit_is_shared(1));
    assert_eq!(p.identity_usage_id(), Some(Identity::usage_id("etl")));

    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(
                RateLimitConfig::new().clock(LimiterClock::manual(fx.clock.clone())),
            )
            .unwrap()
            .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))));
    // The tight key's own limit (1 per minute) refuses its second request, the identity
    // still having room; that refusal counts nowhere.
    assert_eq!(
        svc.clone().oneshot(keyed(&tight)).await.unwrap().status(),
        200
    );
    let res = svc.clone().oneshot(keyed(&tight)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""burst";r=0;t=60, "burst";r=2;t=20"#)
    );
    // The roomy key has 100 of its own, but the identity only 2 left of 3.
    for _ in 0..2 {
        assert_eq!(
            svc.clone().oneshot(keyed(&roomy)).await.unwrap().status(),
            200
        );
    }
    let res = svc.clone().oneshot(keyed(&roomy)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""burst";r=98;t=2, "burst";r=0;t=60"#)
    );
}

type Res = Response<keygate::reject::ResponseBody<keygate::reject::ResponseBody<Body>>>;
type Stack = tower::util::BoxCloneService<Request<Body>, Res, std::convert::Infallible>;

fn quota_stack(fx: &Fixture, config: QuotaConfig) -> (Stack, keygate::quota::QuotaHandle) {
    let layer = QuotaLayer::new(config).unwrap().with_gate(&fx.gate);
    let handle = layer.handle();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(layer)
        .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))));
    (tower::util::BoxCloneService::new(svc), handle)
}

#[tokio::test]
async fn two_keys_of_one_identity_use_up_one_quota() {
    for counting in [
        Counting::Strict,
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
    ] {
        let fx = Fixture::new();
        identity(&fx, "etl", |i| {
            i.quotas = vec![QuotaPolicy::new("etl-daily", 5, QuotaWindow::Day)]
        })
        .await;
        identity(&fx, "other", |i| {
            i.quotas = vec![QuotaPolicy::new("etl-daily", 5, QuotaWindow::Day)]
        })
        .await;
        // Key a also has a monthly quota of its own, counted per key.
        let a = key_of(&fx, "etl", |r| {
            r.quotas = vec![QuotaPolicy::new("own", 100, QuotaWindow::Month)]
        })
        .await;
        let b = key_of(&fx, "etl", |_| {}).await;
        let c = key_of(&fx, "other", |_| {}).await;
        let store = MemoryUsageStore::new();
        let (svc, handle) = quota_stack(&fx, QuotaConfig::new(store.clone()).counting(counting));
        for k in [&a, &b, &a, &b, &a] {
            assert_eq!(
                svc.clone().oneshot(keyed(k)).await.unwrap().status(),
                200,
                "{counting:?}"
            );
        }
        for k in [&a, &b] {
            let res = svc.clone().oneshot(keyed(k)).await.unwrap();
            assert_eq!(res.status(), 429, "{counting:?}");
            assert_eq!(denial(&res), Some(DenialCode::QuotaExceeded));
        }
        // The other identity's quota is its own.
        for _ in 0..5 {
            assert_eq!(svc.clone().oneshot(keyed(&c)).await.unwrap().status(), 200);
        }
        assert_eq!(svc.clone().oneshot(keyed(&c)).await.unwrap().status(), 429);
        if counting != Counting::Strict {
            handle.flush().await.unwrap();
        }
        // Stored: the identity's day under its usage id; key a's month under its own id,
        // with the refused request given back (3 counted, not 4).
        let now = fx.gate.clock().now();
        let day = Window::containing(QuotaWindow::Day, now);
        let month = Window::containing(QuotaWindow::Month, now);
        assert_eq!(
            store
                .load(&Identity::usage_id("etl"), &[day])
                .await
                .unwrap()[0],
            Usage {
                cost: 5,
                requests: 5
            },
            "{counting:?}"
        );
        assert_eq!(
            store
                .load(&Identity::usage_id("other"), &[day])
                .await
                .unwrap()[0]
                .cost,
            5
        );
        assert_eq!(
            store.load(&a.id(), &[month]).await.unwrap()[0].cost,
            3,
            "{counting:?}"
        );
        assert_eq!(store.load(&b.id(), &[day]).await.unwrap()[0].cost, 0);
    }
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;

    use crate::redis_support::TestRedis;
    use keygate::core::rate::{RateBackend, RateSubject};
    use keygate::rate_limit::Fallback;
    use keygate::redis::{RedisRateLimiter, RedisUsageStore, TimeSource};

    #[tokio::test]
    async fn two_keys_of_one_identity_share_one_redis_bucket_across_replicas() {
        let Some(t) = TestRedis::new().await else {
            return;
        };
        let fx = Fixture::new();
        identity(&fx, "etl", |i| {
            i.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 4)];
            i.quotas = vec![QuotaPolicy::new("etl-daily", 6, QuotaWindow::Day)];
        })
        .await;
        identity(&fx, "other", |i| {
            i.rate_limits = vec![RateLimitPolicy::per_second("etl-burst", 4)]
        })
        .await;
        let a = key_of(&fx, "etl", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_second("own", 3)]
        })
        .await;
        let b = key_of(&fx, "etl", |_| {}).await;
        let c = key_of(&fx, "other", |_| {}).await;
        // Two "replicas": layers of their own over one Redis.
        let replica = || {
            let limiter = RedisRateLimiter::new(&t.redis)
                .time_source(TimeSource::Clock(Arc::new(fx.clock.clone())));
            let rate = RateLimitLayer::new(
                RateLimitConfig::new()
                    .backend(limiter)
                    .fallback(Fallback::Deny),
            )
            .unwrap()
            .with_gate(&fx.gate);
            let quota = QuotaLayer::new(
                QuotaConfig::new(RedisUsageStore::new(&t.redis)).counting(Counting::Strict),
            )
            .unwrap()
            .with_gate(&fx.gate);
            ServiceBuilder::new()
                .layer(fx.gate.auth_layer())
                .layer(rate)
                .layer(quota)
                .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))))
        };
        let (one, two) = (replica(), replica());
        assert_eq!(one.clone().oneshot(keyed(&a)).await.unwrap().status(), 200);
        assert_eq!(two.clone().oneshot(keyed(&b)).await.unwrap().status(), 200);
        assert_eq!(one.clone().oneshot(keyed(&b)).await.unwrap().status(), 200);
        let res = two.clone().oneshot(keyed(&a)).await.unwrap();
        assert_eq!(res.status(), 200);
        let lines: Vec<&str> = res
            .headers()
            .get_all("ratelimit")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert!(
            lines.contains(&r#""own";r=1;t=1, "etl-burst";r=0;t=1"#),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.starts_with(r#""etl-daily";r=2;"#)),
            "the shared quota: {lines:?}"
        );
        for (svc, k) in [(&one, &a), (&two, &b)] {
            let res = svc.clone().oneshot(keyed(k)).await.unwrap();
            assert_eq!(res.status(), 429);
            assert_eq!(denial(&res), Some(DenialCode::RateLimited));
        }
        // Another identity: untouched.
        assert_eq!(one.clone().oneshot(keyed(&c)).await.unwrap().status(), 200);

        // Stored under the identity's usage id: the shared bucket in the rate state, the
        // shared quota in the usage store (4 admitted; the refused ones never reached it).
        let id = RateSubject::Key(Identity::usage_id("etl"));
        let check = RedisRateLimiter::new(&t.redis)
            .time_source(TimeSource::Clock(Arc::new(fx.clock.clone())));
        let d = check
            .check(id, &[RateLimitPolicy::per_second("etl-burst", 4)], 1)
            .await
            .unwrap();
        assert!(!d.allowed, "the identity's bucket is empty");
        let day = Window::containing(QuotaWindow::Day, fx.gate.clock().now());
        let usage = RedisUsageStore::new(&t.redis);
        assert_eq!(
            usage
                .load(&Identity::usage_id("etl"), &[day])
                .await
                .unwrap()[0]
                .cost,
            4
        );

        // One script for both subjects: check_each refuses all or nothing.
        fx.clock.advance(Duration::from_secs(1));
        let k = RateSubject::Key(a.id());
        let policies = [
            RateLimitPolicy::per_second("own", 3),
            RateLimitPolicy::per_second("etl-burst", 4),
        ];
        let rounds = check.round_trips();
        let d = check.check_each(&[k, id], &policies, 4).await.unwrap();
        assert!(!d.allowed, "4 is over the key's 3");
        assert_eq!(check.round_trips(), rounds + 1);
        let d = check.check_each(&[k, id], &policies, 3).await.unwrap();
        assert!(d.allowed);
        assert_eq!(d.standings[0].remaining, 0);
        assert_eq!(
            d.standings[1].remaining, 1,
            "the refused call counted nothing"
        );
    }

    /// A key whose identity shares only a quota, under the layer's default rate limit:
    /// the default is the key's own (counted per key), never the identity's.
    #[tokio::test]
    async fn a_default_rate_limit_is_never_the_identitys() {
        let Some(t) = TestRedis::new().await else {
            return;
        };
        let fx = Fixture::new();
        identity(&fx, "quota-only", |i| {
            i.quotas = vec![QuotaPolicy::new("etl-daily", 100, QuotaWindow::Day)]
        })
        .await;
        let a = key_of(&fx, "quota-only", |_| {}).await;
        let b = key_of(&fx, "quota-only", |_| {}).await;
        let p = fx.gate.verifier().verify(a.expose_secret()).await.unwrap();
        assert!(p.rate_limits().is_empty());
        assert!(p.quota_is_shared(0));
        assert!(
            !p.rate_limit_is_shared(0),
            "no rate limit of the key at all"
        );
        let limiter = RedisRateLimiter::new(&t.redis)
            .time_source(TimeSource::Clock(Arc::new(fx.clock.clone())));
        let svc = ServiceBuilder::new()
            .layer(fx.gate.auth_layer())
            .layer(
                RateLimitLayer::new(
                    RateLimitConfig::new()
                        .default_policies([RateLimitPolicy::per_second("burst", 2)])
                        .backend(limiter),
                )
                .unwrap()
                .with_gate(&fx.gate),
            )
            .service(counting_ok::<Body>(Arc::new(AtomicUsize::new(0))));
        for _ in 0..2 {
            assert_eq!(svc.clone().oneshot(keyed(&a)).await.unwrap().status(), 200);
        }
        assert_eq!(svc.clone().oneshot(keyed(&a)).await.unwrap().status(), 429);
        // b has a bucket of its own.
        assert_eq!(svc.clone().oneshot(keyed(&b)).await.unwrap().status(), 200);
    }
}

/// The SQL usage store holds an identity's shared quota as the rows of its usage id.
#[cfg(feature = "sql")]
#[tokio::test]
async fn two_keys_of_one_identity_use_up_one_quota_in_sqlite() {
    use keygate::sql::SqlStore;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("usage.db").display());
    let sql = SqlStore::open(&url).await.unwrap();
    for counting in [
        Counting::Strict,
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
    ] {
        let fx = Fixture::new();
        identity(&fx, "etl", |i| {
            i.quotas = vec![QuotaPolicy::new("etl-hourly", 3, QuotaWindow::Hour)]
        })
        .await;
        let a = key_of(&fx, "etl", |_| {}).await;
        let b = key_of(&fx, "etl", |_| {}).await;
        let usage = sql.usage_store();
        let (svc, handle) = quota_stack(&fx, QuotaConfig::new(usage.clone()).counting(counting));
        for k in [&a, &b, &a] {
            assert_eq!(svc.clone().oneshot(keyed(k)).await.unwrap().status(), 200);
        }
        for k in [&b, &a] {
            assert_eq!(svc.clone().oneshot(keyed(k)).await.unwrap().status(), 429);
        }
        if counting != Counting::Strict {
            handle.flush().await.unwrap();
        }
        let hour = Window::containing(QuotaWindow::Hour, fx.gate.clock().now());
        let id = Identity::usage_id("etl");
        assert_eq!(
            usage.load(&id, &[hour]).await.unwrap()[0],
            Usage {
                cost: 3,
                requests: 3
            },
            "{counting:?}"
        );
        // Nothing per key: the quota is the identity's only.
        assert_eq!(usage.load(&a.id(), &[hour]).await.unwrap()[0].cost, 0);
        // Start the next round from zero.
        usage
            .subtract(&[keygate::core::usage::Increment {
                key: id,
                window: hour,
                usage: Usage {
                    cost: 3,
                    requests: 3,
                },
            }])
            .await
            .unwrap();
    }
}
