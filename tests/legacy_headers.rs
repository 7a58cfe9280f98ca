//! `LegacyRateLimitHeadersLayer` around a fused stack: allowed and refused answers carry
//! `X-RateLimit-Limit/Remaining/Reset` describing the tightest policy, beside the IETF
//! fields; without the layer, only the IETF fields.

use std::convert::Infallible;

use http::{Request, Response, StatusCode};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{
    LegacyRateLimitHeadersLayer, LimiterClock, RateLimitConfig, RateLimitLayer,
};
use keygate::{
    Clock, KeyGate, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix, QuotaPolicy,
    QuotaWindow, RateLimitPolicy, Verifier,
};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::test]
async fn legacy_fields_follow_the_tightest_policy() {
    let clock = ManualClock::at_2026();
    let store = MemoryStore::new();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(clock.clone())
            .build(),
    );
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "k",
        clock.now(),
    )
    .unwrap();
    record.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)];
    record.quotas = vec![QuotaPolicy::new("daily", 100, QuotaWindow::Day)];
    store.insert(&record).await.unwrap();
    let rate =
        RateLimitLayer::new(RateLimitConfig::new().clock(LimiterClock::manual(clock.clone())))
            .unwrap();
    let quota =
        QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()).clock(clock.clone())).unwrap();
    let inner = tower::service_fn(|_: Request<()>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let stack = gate.stack().auth().rate(&rate).quota(&quota);
    let legacy = ServiceBuilder::new()
        .layer(LegacyRateLimitHeadersLayer::new())
        .layer(stack.clone())
        .service(inner);
    let plain = ServiceBuilder::new().layer(stack).service(inner);
    let req = || {
        Request::get("/")
            .header("x-api-key", key.expose_secret())
            .body(())
            .unwrap()
    };
    let field = |res: &Response<_>, name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let res = legacy.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers().contains_key("ratelimit"),
        "the IETF fields stay"
    );
    assert_eq!(field(&res, "x-ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(field(&res, "x-ratelimit-remaining").as_deref(), Some("2"));
    assert!(field(&res, "x-ratelimit-reset").is_some());
    legacy.clone().oneshot(req()).await.unwrap();
    let res = legacy.clone().oneshot(req()).await.unwrap();
    assert_eq!(field(&res, "x-ratelimit-remaining").as_deref(), Some("0"));
    // Refused: still described, with the wait.
    let res = legacy.clone().oneshot(req()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(field(&res, "x-ratelimit-limit").as_deref(), Some("3"));
    assert_eq!(field(&res, "x-ratelimit-remaining").as_deref(), Some("0"));
    let reset: u64 = field(&res, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!((1..=60).contains(&reset), "{reset}");

    // Without the layer: none of them.
    let res = plain.oneshot(req()).await.unwrap();
    assert!(res.headers().contains_key("ratelimit"));
    assert!(res.headers().get("x-ratelimit-limit").is_none());
}
