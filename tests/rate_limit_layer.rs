//! `RateLimitLayer` in process: units as written, several policies (all or nothing),
//! weighted costs, defaults, per-address limits for requests without a principal, fields,
//! gRPC, refunds, bad input, concurrency and memory under sprays.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use keygate::core::usage::MemoryUsageStore;
use keygate::cost::ConfigError;
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{validate_policy, LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{
    ApiKey, Clock, Denial, DenialCode, KeyId, KeyRecord, ManualClock, Prefix, Principal,
    QuotaPolicy, QuotaWindow, RateLimitPolicy,
};
use tower::{ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

fn keyed(key: &ApiKey) -> Request<Body> {
    Request::get("/points")
        .header("x-api-key", key.expose_secret())
        .body(Body::default())
        .unwrap()
}

fn config(clock: &ManualClock) -> RateLimitConfig {
    RateLimitConfig::new().clock(LimiterClock::manual(clock.clone()))
}

fn header<'a>(res: &'a http::Response<impl Sized>, name: &str) -> Option<&'a str> {
    res.headers().get(name).map(|v| v.to_str().unwrap())
}

fn all(res: &http::Response<impl Sized>, name: &str) -> Vec<String> {
    res.headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

async fn json<B>(res: http::Response<B>) -> serde_json::Value
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    serde_json::from_slice(&body_bytes(res.into_body()).await).unwrap()
}

#[tokio::test]
async fn twenty_per_second_means_twenty_per_second() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| r.rate_limits = vec!["burst=20/s".parse().unwrap()])
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(calls.clone()));
    for i in 0..20u32 {
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "request {i}");
        assert_eq!(
            header(&res, "ratelimit-policy"),
            Some(r#""burst";q=20;w=1"#)
        );
        // Each request adds 50 ms to the time until the bucket is whole again.
        let t = (u64::from(i + 1) * 50).div_ceil(1000);
        assert_eq!(
            header(&res, "ratelimit"),
            Some(format!(r#""burst";r={};t={t}"#, 19 - i).as_str())
        );
    }
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&res, "retry-after"),
        Some("1"),
        "50 ms rounds up to 1 s"
    );
    assert_eq!(
        header(&res, "content-type"),
        Some("application/problem+json")
    );
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""burst";q=20;w=1"#)
    );
    assert_eq!(header(&res, "ratelimit"), Some(r#""burst";r=0;t=1"#));
    let denial = res.extensions().get::<Denial>().unwrap().clone();
    assert_eq!(denial.code(), DenialCode::RateLimited);
    assert_eq!(denial.retry_after(), Some(Duration::from_millis(50)));
    let body = json(res).await;
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["status"], 429);
    assert_eq!(body["violated-policies"], serde_json::json!(["burst"]));
    assert_eq!(calls.load(Ordering::SeqCst), 20);

    fx.clock.advance(Duration::from_millis(49));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        429
    );
    fx.clock.advance(Duration::from_millis(1));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    // After a whole second the bucket is full again: 20 more in a burst.
    fx.clock.advance(Duration::from_secs(1));
    for _ in 0..20 {
        assert_eq!(
            svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        429
    );
}

#[tokio::test]
async fn every_policy_must_pass_and_a_refused_request_costs_nothing() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![
                RateLimitPolicy::per_second("burst", 5),
                RateLimitPolicy::per_minute("minute", 3),
            ]
        })
        .await;
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::default()));
    for _ in 0..3 {
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""burst";q=5;w=1, "minute";q=3;w=60"#)
    );
    // `burst` had room: its count was given back (2 of 5 left, not 1).
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""burst";r=2;t=1, "minute";r=0;t=60"#)
    );
    assert_eq!(header(&res, "retry-after"), Some("20"));
    assert_eq!(
        json(res).await["violated-policies"],
        serde_json::json!(["minute"])
    );

    // Many refused requests later, `burst` is untouched.
    for _ in 0..50 {
        assert_eq!(
            svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
            429
        );
    }
    fx.clock.advance(Duration::from_secs(20));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""burst";r=4;t=1, "minute";r=0;t=60"#)
    );
}

#[tokio::test]
async fn two_policies_of_one_shape_count_once() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![
                RateLimitPolicy::per_second("a", 2),
                RateLimitPolicy::per_second("b", 2),
            ]
        })
        .await;
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::default()));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""a";r=1;t=1, "b";r=1;t=1"#)
    );
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        json(res).await["violated-policies"],
        serde_json::json!(["a", "b"])
    );
}

#[tokio::test]
async fn weighted_costs_zero_and_oversized() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("points", 100)]
        })
        .await;
    let cfg = config(&fx.clock).cost(|head| {
        head.headers()
            .get("x-batch-size")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(1)
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate))
        .service(counting_ok::<Body>(calls.clone()));
    let batch = |n: &str| {
        let mut r = keyed(&key);
        r.headers_mut().insert("x-batch-size", n.parse().unwrap());
        r
    };
    let res = svc.clone().oneshot(batch("60")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit"), Some(r#""points";r=40;t=36"#));
    // A free request passes uncounted.
    let res = svc.clone().oneshot(batch("0")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit"), Some(r#""points";r=40;t=36"#));
    // 41 does not fit (40 left): refused, wait until 1 more unit is back (600 ms).
    let res = svc.clone().oneshot(batch("41")).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("1"));
    // More than the limit can never pass: 413 cost_exceeds_limit at once, no Retry-After,
    // the fields still naming the policy.
    let res = svc.clone().oneshot(batch("101")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(header(&res, "retry-after"), None);
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""points";q=100;w=60"#)
    );
    assert_eq!(header(&res, "ratelimit"), Some(r#""points";r=40;t=36"#));
    let denial = res.extensions().get::<Denial>().unwrap().clone();
    assert_eq!(denial.code(), DenialCode::CostExceedsLimit);
    assert_eq!(denial.retry_after(), None);
    let body = json(res).await;
    assert_eq!(body["code"], "cost_exceeds_limit");
    assert_eq!(body["status"], 413);
    assert_eq!(body["violated-policies"], serde_json::json!(["points"]));
    assert_eq!(
        body["detail"],
        "This request costs 101; the rate limit \"points\" allows at most 100 at once. \
         Send smaller requests."
    );
    // A cost beyond u32 (costs are u64, as for quotas) is refused the same way, naming
    // the real cost, not a truncated or saturated one.
    let res = svc.clone().oneshot(batch("4294967297")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = json(res).await;
    assert_eq!(body["code"], "cost_exceeds_limit");
    assert_eq!(
        body["detail"],
        "This request costs 4294967297; the rate limit \"points\" allows at most 100 at once. \
         Send smaller requests."
    );
    // No refusal was counted: 40 still fit.
    assert_eq!(
        svc.clone().oneshot(batch("40")).await.unwrap().status(),
        200
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn keys_without_policies_get_the_default() {
    let fx = Fixture::new();
    let key = fx.issue("plain").await;
    let cfg = config(&fx.clock).default_policies([RateLimitPolicy::per_hour("default", 2)]);
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate))
        .service(counting_ok::<Body>(Arc::default()));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""default";q=2;w=3600"#)
    );
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        429
    );
    // Another key has its own bucket.
    let other = fx.issue("other").await;
    assert_eq!(
        svc.clone().oneshot(keyed(&other)).await.unwrap().status(),
        200
    );
    // No default: keys without policies are not limited (and get no fields).
    let unlimited = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock).default_policies([]))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::default()));
    for _ in 0..500 {
        let res = unlimited.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("ratelimit").is_none());
    }
}

fn from(addr: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::get("/");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    let mut r = b.body(Body::default()).unwrap();
    r.extensions_mut()
        .insert(addr.parse::<SocketAddr>().unwrap());
    r
}

#[tokio::test]
async fn guessing_keys_is_limited_by_address_and_never_touches_a_key() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("victim", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 2)]
        })
        .await;
    let unknown = forge("kg", "AAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBBBB");
    let cfg = config(&fx.clock).anonymous_policies([RateLimitPolicy::per_minute("anonymous", 3)]);
    let calls = Arc::new(AtomicUsize::new(0));
    // Rate limit outside authentication: failed authentications are counted per address.
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate))
        .layer(fx.gate.auth_layer())
        .service(counting_ok::<Body>(calls.clone()));
    for _ in 0..3 {
        let res = svc
            .clone()
            .oneshot(from("203.0.113.7:4000", Some(&unknown)))
            .await
            .unwrap();
        assert_eq!(
            res.status(),
            StatusCode::UNAUTHORIZED,
            "the auth layer rejects, not this one"
        );
        assert_eq!(
            header(&res, "ratelimit-policy"),
            Some(r#""anonymous";q=3;w=60"#)
        );
    }
    let res = svc
        .clone()
        .oneshot(from("203.0.113.7:4001", Some(&unknown)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&res, "retry-after"), Some("20"));
    let res = svc
        .clone()
        .oneshot(from("203.0.113.7:4002", None))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "no key: same address bucket"
    );
    // Another address has its own bucket; the key's bucket is untouched.
    let res = svc
        .clone()
        .oneshot(from("198.51.100.1:1", Some(&unknown)))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    for _ in 0..2 {
        let res = svc
            .clone()
            .oneshot(from("203.0.113.7:4003", Some(key.expose_secret())))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // IPv6 clients share their /64.
    for _ in 0..3 {
        svc.clone()
            .oneshot(from("[2001:db8:1:2::1]:1", None))
            .await
            .unwrap();
    }
    let res = svc
        .clone()
        .oneshot(from("[2001:db8:1:2:ffff::9]:1", None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let res = svc
        .clone()
        .oneshot(from("[2001:db8:1:3::1]:1", None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn without_an_auth_layer_anonymous_requests_pass_until_the_address_limit() {
    let clock = ManualClock::at_2026();
    let cfg = config(&clock).anonymous_policies([RateLimitPolicy::per_minute("anonymous", 2)]);
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(RateLimitLayer::new(cfg).unwrap())
        .service(counting_ok::<Body>(calls.clone()));
    for _ in 0..2 {
        assert_eq!(
            svc.clone()
                .oneshot(from("192.0.2.1:1", None))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    assert_eq!(
        svc.clone()
            .oneshot(from("192.0.2.1:1", None))
            .await
            .unwrap()
            .status(),
        429
    );
    // Unknown addresses (no peer recorded) share one bucket, documented as `unknown`.
    let bare = || Request::get("/").body(Body::default()).unwrap();
    assert_eq!(svc.clone().oneshot(bare()).await.unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(bare()).await.unwrap().status(), 200);
    assert_eq!(svc.clone().oneshot(bare()).await.unwrap().status(), 429);
    // A `ClientIp` extension (set by an earlier layer) wins over the peer.
    let mut r = from("192.0.2.1:1", None);
    r.extensions_mut()
        .insert(keygate::client_ip::ClientIp("192.0.2.99".parse().unwrap()));
    assert_eq!(svc.clone().oneshot(r).await.unwrap().status(), 200);
    assert_eq!(calls.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 1)]
        })
        .await;
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::default()));
    let grpc = || {
        let mut r = keyed(&key);
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    };
    assert_eq!(svc.clone().oneshot(grpc()).await.unwrap().status(), 200);
    let res = svc.clone().oneshot(grpc()).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "never a bare 429 to a gRPC client"
    );
    assert_eq!(header(&res, "grpc-status"), Some("8"));
    assert!(header(&res, "grpc-message")
        .unwrap()
        .starts_with("rate_limited"));
    // The same hints as over HTTP, as metadata of the status.
    assert_eq!(header(&res, "retry-after"), Some("60"));
    assert_eq!(header(&res, "ratelimit"), Some(r#""burst";r=0;t=60"#));
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""burst";q=1;w=60"#)
    );
    assert!(body_bytes(res.into_body()).await.is_empty());
}

#[tokio::test]
async fn fields_can_be_turned_off_for_successes() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 1)]
        })
        .await;
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock).headers(false))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(Arc::default()));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("ratelimit").is_none());
    assert!(res.headers().get("ratelimit-policy").is_none());
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""burst";r=0;t=60"#),
        "rejections keep them"
    );
}

#[tokio::test]
async fn a_refusal_by_an_inner_layer_still_counts() {
    // Rate limits protect capacity: a request another layer refuses used it too.
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)];
            r.quotas = vec![QuotaPolicy::new("daily", 1, QuotaWindow::Day)];
        })
        .await;
    let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))
        .unwrap()
        .with_gate(&fx.gate);
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .layer(quota)
        .service(counting_ok::<Body>(Arc::default()));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200);
    // Both layers' fields, as two field lines.
    assert_eq!(
        all(&res, "ratelimit-policy"),
        [r#""daily";q=1;w=86400"#, r#""burst";q=3;w=60"#]
    );
    for (left, t) in [(1, 40), (0, 60)] {
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            DenialCode::QuotaExceeded
        );
        // The quota's refusal was counted by the rate limit.
        assert_eq!(
            all(&res, "ratelimit")[1],
            format!(r#""burst";r={left};t={t}"#)
        );
    }
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        DenialCode::RateLimited,
        "the fourth request of the minute is rate limited"
    );
    assert_eq!(header(&res, "retry-after"), Some("20"));
}

#[tokio::test]
async fn hammering_a_forbidden_route_is_rate_limited() {
    // A valid key repeating a request the scope layer refuses: every 403 counts, so the
    // key is slowed down like any other caller (it used to be refunded forever).
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.scopes = vec!["points:read".into()];
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 5)];
        })
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .layer(keygate::scope::ScopeLayer::require("points:write").unwrap())
        .service(counting_ok::<Body>(calls.clone()));
    for i in 0..5 {
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), StatusCode::FORBIDDEN, "request {i}");
        assert_eq!(
            header(&res, "ratelimit"),
            Some(format!(r#""burst";r={};t={}"#, 4 - i, 12 * (i + 1)).as_str())
        );
    }
    for _ in 0..100 {
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&res, "retry-after"), Some("12"));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn bad_configurations_are_refused_when_built() {
    let build =
        |p: RateLimitPolicy| RateLimitLayer::new(RateLimitConfig::new().default_policies([p]));
    let err = |p| build(p).unwrap_err().to_string();
    assert!(err(RateLimitPolicy::per_second("zero", 0)).contains("at least 1"));
    assert!(err(RateLimitPolicy::new("p", 5, Duration::ZERO)).contains("period must not be zero"));
    assert!(err(RateLimitPolicy::new(
        "p",
        u32::MAX,
        Duration::from_millis(1)
    ))
    .contains("too large"));
    assert!(err(RateLimitPolicy::new(
        "p",
        1,
        Duration::from_secs(400 * 86_400)
    ))
    .contains("366 days"));
    assert!(err(RateLimitPolicy::per_second("bad name", 1)).contains("[A-Za-z0-9_-]"));
    let dup = RateLimitConfig::new().anonymous_policies([
        RateLimitPolicy::per_second("x", 1),
        RateLimitPolicy::per_minute("x", 5),
    ]);
    assert_eq!(
        RateLimitLayer::new(dup).unwrap_err(),
        ConfigError::DuplicateName("x".into())
    );
    for n in [0u8, 65] {
        let e = RateLimitLayer::new(RateLimitConfig::new().ipv6_prefix(n)).unwrap_err();
        assert_eq!(e, ConfigError::InvalidIpv6Prefix(n));
    }
    assert!(RateLimitLayer::new(RateLimitConfig::new().max_tracked_addresses(0)).is_err());
    assert!(RateLimitLayer::new(RateLimitConfig::new().housekeeping_every(0)).is_err());
    assert!(validate_policy(&RateLimitPolicy::per_second("ok", 20)).is_ok());
    assert!("burst=0/s".parse::<RateLimitPolicy>().is_err());
}

#[tokio::test]
async fn an_invalid_policy_on_a_record_fails_closed() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_second("broken", 0)]
        })
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(calls.clone()));
    let res = svc.oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// Many tasks on a multi-threaded runtime hammer one key while the clock is frozen: exactly
/// the limit passes (GCRA's burst is the limit itself), and the refunds of the two-policy
/// key leave the looser policy with exactly what passed counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_pass_more_than_the_limit() {
    let fx = Fixture::new();
    let one = fx
        .issue_with("one", |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("m", 50)]
        })
        .await;
    let two = fx
        .issue_with("two", |r| {
            // `loose` first: every refused request is counted there, then given back.
            r.rate_limits = vec![
                RateLimitPolicy::per_hour("loose", 1000),
                RateLimitPolicy::per_minute("tight", 30),
            ]
        })
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            RateLimitLayer::new(config(&fx.clock))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(calls.clone()));
    for (key, limit) in [(&one, 50), (&two, 30)] {
        let before = calls.load(Ordering::SeqCst);
        let passed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let svc = svc.clone();
            let secret = key.expose_secret().to_owned();
            let passed = passed.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..40 {
                    let req = Request::get("/")
                        .header("x-api-key", &secret)
                        .body(Body::default())
                        .unwrap();
                    if svc.clone().oneshot(req).await.unwrap().status() == 200 {
                        passed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(passed.load(Ordering::SeqCst), limit);
        assert_eq!(calls.load(Ordering::SeqCst) - before, limit);
    }
    let res = svc.clone().oneshot(keyed(&two)).await.unwrap();
    assert_eq!(res.status(), 429);
    let denial = res.extensions().get::<Denial>().unwrap();
    let loose = denial.limits().iter().find(|l| l.name == "loose").unwrap();
    assert_eq!(
        loose.remaining,
        1000 - 30,
        "refused requests were all given back"
    );
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// A million random client addresses, then a million random key ids (principals put in the
/// extensions, as an earlier auth layer would), at 10,000 requests per second of manual
/// clock: the tracked states stay bounded, and housekeeping empties them once idle.
#[tokio::test]
async fn a_spray_of_a_million_addresses_or_key_ids_leaves_memory_bounded() {
    const N: usize = 1_000_000;
    let clock = ManualClock::at_2026();
    let layer = RateLimitLayer::new(
        config(&clock)
            .headers(false)
            .default_policies([RateLimitPolicy::per_second("default", 100)])
            .anonymous_policies([RateLimitPolicy::per_second("anonymous", 10)]),
    )
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(counting_ok::<Body>(Arc::default()));
    let base = rss_kib();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut peak = 0;
    for i in 0..N {
        let ip = std::net::Ipv4Addr::from(rng.next() as u32);
        let mut req = Request::get("/").body(Body::default()).unwrap();
        req.extensions_mut().insert(SocketAddr::from((ip, 1)));
        let res = svc.clone().oneshot(req).await.unwrap();
        assert!(res.status() == 200 || res.status() == 429);
        clock.advance(Duration::from_micros(100));
        if i % 4096 == 0 {
            peak = peak.max(layer.tracked());
        }
    }
    let addr_peak = peak.max(layer.tracked());
    let addr_rss = rss_kib();
    clock.advance(Duration::from_secs(1));
    layer.housekeeping();
    assert_eq!(layer.tracked(), 0, "idle addresses are dropped");

    let (_, template) = KeyRecord::generate(
        &Prefix::default(),
        &keygate::KeyHasher::new(),
        "spray",
        clock.now(),
    )
    .unwrap();
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    peak = 0;
    for i in 0..N {
        let mut id = [0u8; 12];
        let mut r = rng.next();
        for b in &mut id {
            *b = ALPHABET[(r % 62) as usize];
            r /= 62;
            if r == 0 {
                r = rng.next();
            }
        }
        let mut record = template.clone();
        record.id = KeyId::parse(std::str::from_utf8(&id).unwrap()).unwrap();
        let mut req = Request::get("/").body(Body::default()).unwrap();
        req.extensions_mut()
            .insert(keygate::RequestContext::authenticated(
                Principal::from_record(&record),
            ));
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
        clock.advance(Duration::from_micros(100));
        if i % 4096 == 0 {
            peak = peak.max(layer.tracked());
        }
    }
    let key_peak = peak.max(layer.tracked());
    let key_rss = rss_kib();
    clock.advance(Duration::from_secs(1));
    layer.housekeeping();
    let after = layer.tracked();
    println!(
        "spray: {N} addresses -> peak {addr_peak} tracked states; {N} key ids -> peak {key_peak}; \
         after housekeeping {after}; RSS KiB: start {base:?}, after addresses {addr_rss:?}, after keys {key_rss:?}, end {:?}",
        rss_kib()
    );
    // At 10,000 requests/s with 100 ms (addresses) and 10 ms (keys) until a state is fresh
    // again, housekeeping every 65,536 new subjects keeps well under this bound.
    assert!(addr_peak <= 70_000 + 1_000, "address peak {addr_peak}");
    assert!(key_peak <= 70_000 + 1_000, "key peak {key_peak}");
    assert_eq!(after, 0);
}

/// Addresses beyond `max_tracked_addresses` (with a frozen clock: nothing goes back to fresh)
/// share the `overflow` bucket: memory stays bounded even against a spray faster than
/// housekeeping can drop anything.
#[tokio::test]
async fn addresses_beyond_the_cap_share_the_overflow_bucket() {
    let clock = ManualClock::at_2026();
    let layer = RateLimitLayer::new(
        config(&clock)
            .anonymous_policies([RateLimitPolicy::per_minute("anonymous", 2)])
            .max_tracked_addresses(1000),
    )
    .unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(counting_ok::<Body>(Arc::default()));
    let mut statuses = Vec::new();
    for i in 0..5000u32 {
        let mut req = Request::get("/").body(Body::default()).unwrap();
        req.extensions_mut().insert(SocketAddr::from((
            std::net::Ipv4Addr::from(0x0a00_0000 + i),
            1,
        )));
        statuses.push(svc.clone().oneshot(req).await.unwrap().status());
    }
    assert!(layer.tracked() <= 1001, "{}", layer.tracked());
    assert!(statuses[..1000].iter().all(|s| *s == 200));
    // The overflow bucket lets 2 through, then refuses the rest of the spray.
    assert_eq!(statuses[1000..].iter().filter(|s| **s == 200).count(), 2);
    clock.advance(Duration::from_secs(120));
    layer.housekeeping();
    assert_eq!(layer.tracked(), 0);
}

/// On the real (monotonic) clock, the time between the layer's clock reading and
/// governor's own must not read as a spent unit: one request of ten per second leaves nine.
#[tokio::test]
async fn the_first_request_on_the_real_clock_leaves_limit_minus_one() {
    let layer = RateLimitLayer::new(
        RateLimitConfig::new()
            .anonymous_policies([RateLimitPolicy::per_second("anonymous", 10)])
            .headers(true),
    )
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(counting_ok::<Body>(calls.clone()));
    let mut req = Request::get("/").body(Body::default()).unwrap();
    req.extensions_mut()
        .insert(SocketAddr::from(([198, 51, 100, 9], 4000)));
    let res = svc.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "ratelimit"), Some(r#""anonymous";r=9;t=1"#));
}
