//! `QuotaLayer` in process: exact UTC window edges, month boundaries, the leap day, credits
//! with and without refill, several quotas (all or nothing), costs, batching and flushing,
//! strict mode, store outages, usage reports, refunds, bad input and concurrency.

mod common;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use keygate::core::usage::{
    utc, Admission, Increment, Limit, MemoryUsageStore, Usage, UsageError, UsageRecord, UsageStore,
    Window,
};
use keygate::cost::ConfigError;
use keygate::quota::{validate_policy, Counting, QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{
    ApiKey, Denial, DenialCode, KeyId, QuotaPolicy, QuotaWindow, RateLimitPolicy, Refill,
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

async fn json<B>(res: Response<B>) -> serde_json::Value
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    serde_json::from_slice(&body_bytes(res.into_body()).await).unwrap()
}

async fn issue(fx: &Fixture, quotas: Vec<QuotaPolicy>) -> ApiKey {
    fx.issue_with("k", |r| r.quotas = quotas).await
}

/// The response of a quota stack behind authentication.
type Res = Response<keygate::reject::ResponseBody<keygate::reject::ResponseBody<Body>>>;
type Stack = tower::util::BoxCloneService<Request<Body>, Res, std::convert::Infallible>;

/// A quota stack (authentication outside) with `config`, its handle, and a counter of inner
/// calls.
fn stack(
    fx: &Fixture,
    config: QuotaConfig,
) -> (Stack, keygate::quota::QuotaHandle, Arc<AtomicUsize>) {
    let layer = QuotaLayer::new(config).unwrap().with_gate(&fx.gate);
    let handle = layer.handle();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(layer)
        .service(counting_ok::<Body>(calls.clone()));
    (tower::util::BoxCloneService::new(svc), handle, calls)
}

#[tokio::test]
async fn a_day_ends_exactly_at_midnight_utc() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)]).await;
    fx.clock
        .set(utc(2026, 3, 14, 23, 59, 59) + Duration::from_millis(999));
    let (svc, _, calls) = stack(&fx, QuotaConfig::new(MemoryUsageStore::new()));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""daily";q=2;w=86400"#)
    );
    assert_eq!(header(&res, "ratelimit"), Some(r#""daily";r=1;t=1"#));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&res, "retry-after"),
        Some("1"),
        "1 ms until midnight rounds up"
    );
    let denial = res.extensions().get::<Denial>().unwrap().clone();
    assert_eq!(denial.code(), DenialCode::QuotaExceeded);
    assert_eq!(denial.retry_after(), Some(Duration::from_millis(1)));
    let body = json(res).await;
    assert_eq!(
        body["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(body["code"], "quota_exceeded");
    assert_eq!(body["violated-policies"], serde_json::json!(["daily"]));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    fx.clock.advance(Duration::from_millis(1));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200, "00:00:00.000 belongs to the new day");
    assert_eq!(header(&res, "ratelimit"), Some(r#""daily";r=1;t=86400"#));
}

#[tokio::test]
async fn hours_months_and_the_leap_day() {
    let fx = Fixture::new();
    let key = issue(
        &fx,
        vec![
            QuotaPolicy::new("hourly", 1, QuotaWindow::Hour),
            QuotaPolicy::new("monthly", 3, QuotaWindow::Month),
        ],
    )
    .await;
    fx.clock.set(utc(2028, 2, 29, 22, 30, 0));
    let (svc, _, _) = stack(&fx, QuotaConfig::new(MemoryUsageStore::new()));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200);
    // February 2028 has 29 days: the month window is 2,505,600 s.
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""hourly";q=1;w=3600, "monthly";q=3;w=2505600"#)
    );
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""hourly";r=0;t=1800, "monthly";r=2;t=5400"#)
    );
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("1800"));
    fx.clock.set(utc(2028, 2, 29, 23, 0, 0));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    fx.clock.set(utc(2028, 2, 29, 23, 59, 59));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429, "the hour is used");
    fx.clock.set(utc(2028, 3, 1, 0, 0, 0));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 200);
    // March: a fresh month of 31 days.
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""hourly";r=0;t=3600, "monthly";r=2;t=2678400"#)
    );
    // Use the month up, then wait for April.
    fx.clock.set(utc(2028, 3, 1, 1, 0, 0));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    fx.clock.set(utc(2028, 3, 1, 2, 0, 0));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    fx.clock.set(utc(2028, 3, 31, 23, 0, 0));
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("3600"));
    assert_eq!(
        json(res).await["violated-policies"],
        serde_json::json!(["monthly"])
    );
    fx.clock.set(utc(2028, 4, 1, 0, 0, 0));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn credits_refill_monthly_on_their_day_or_never() {
    let fx = Fixture::new();
    let monthly = issue(
        &fx,
        vec![QuotaPolicy::new(
            "credits",
            2,
            QuotaWindow::Credits(Refill::Monthly { day: 31 }),
        )],
    )
    .await;
    let once = issue(
        &fx,
        vec![QuotaPolicy::new(
            "trial",
            1,
            QuotaWindow::Credits(Refill::Never),
        )],
    )
    .await;
    fx.clock.set(utc(2028, 2, 28, 12, 0, 0));
    let (svc, _, _) = stack(&fx, QuotaConfig::new(MemoryUsageStore::new()));
    let res = svc.clone().oneshot(keyed(&monthly)).await.unwrap();
    // The credits refilled on January 31 and refill next on February's last day (the 29th).
    assert_eq!(
        header(&res, "ratelimit-policy"),
        Some(r#""credits";q=2;w=2505600"#)
    );
    assert_eq!(header(&res, "ratelimit"), Some(r#""credits";r=1;t=43200"#));
    assert_eq!(
        svc.clone().oneshot(keyed(&monthly)).await.unwrap().status(),
        200
    );
    let res = svc.clone().oneshot(keyed(&monthly)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("43200"));
    fx.clock.set(utc(2028, 2, 29, 0, 0, 0));
    let res = svc.clone().oneshot(keyed(&monthly)).await.unwrap();
    assert_eq!(res.status(), 200, "refilled on the 29th");
    assert_eq!(
        header(&res, "ratelimit"),
        Some(r#""credits";r=1;t=2678400"#)
    );

    // One-time credits: no window, no reset, no Retry-After.
    let res = svc.clone().oneshot(keyed(&once)).await.unwrap();
    assert_eq!(header(&res, "ratelimit-policy"), Some(r#""trial";q=1"#));
    assert_eq!(header(&res, "ratelimit"), Some(r#""trial";r=0"#));
    fx.clock.set(utc(2040, 1, 1, 0, 0, 0));
    let res = svc.clone().oneshot(keyed(&once)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), None);
}

#[tokio::test]
async fn several_quotas_all_or_nothing() {
    let fx = Fixture::new();
    let key = issue(
        &fx,
        vec![
            QuotaPolicy::new("hourly", 2, QuotaWindow::Hour),
            QuotaPolicy::new("daily", 3, QuotaWindow::Day),
        ],
    )
    .await;
    fx.clock.set(utc(2026, 6, 1, 10, 0, 0));
    let store = MemoryUsageStore::new();
    let (svc, handle, _) = stack(&fx, QuotaConfig::new(store.clone()));
    for _ in 0..2 {
        assert_eq!(
            svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
            200
        );
    }
    for _ in 0..5 {
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(res.status(), 429);
        // The refused requests did not touch the day.
        assert_eq!(
            header(&res, "ratelimit"),
            Some(r#""hourly";r=0;t=3600, "daily";r=1;t=50400"#)
        );
    }
    fx.clock.set(utc(2026, 6, 1, 11, 0, 0));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        header(&res, "retry-after"),
        Some("46800"),
        "until the day ends"
    );
    handle.flush().await.unwrap();
    let id = key.id();
    let day = Window::containing(QuotaWindow::Day, utc(2026, 6, 1, 11, 0, 0));
    assert_eq!(
        store.load(&id, &[day]).await.unwrap()[0],
        Usage {
            cost: 3,
            requests: 3
        }
    );
}

#[tokio::test]
async fn costs_zero_oversized_and_overflowing() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("units", 100, QuotaWindow::Day)]).await;
    let cfg = QuotaConfig::new(MemoryUsageStore::new()).cost(|head| {
        head.headers()
            .get("x-cost")
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(1)
    });
    let (svc, _, calls) = stack(&fx, cfg);
    let with = |n: &str| {
        let mut r = keyed(&key);
        r.headers_mut().insert("x-cost", n.parse().unwrap());
        r
    };
    let res = svc.clone().oneshot(with("60")).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""units";r=40;t=86400"#));
    let res = svc.clone().oneshot(with("0")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        header(&res, "ratelimit"),
        None,
        "free requests are not counted"
    );
    let res = svc.clone().oneshot(with("41")).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(header(&res, "retry-after"), Some("86400"));
    // More than the whole quota can never pass: 413 cost_exceeds_limit, no Retry-After,
    // saying what the request costs and what the quota allows.
    let res = svc.clone().oneshot(with("101")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(header(&res, "retry-after"), None, "it can never pass");
    assert_eq!(header(&res, "ratelimit"), Some(r#""units";r=40;t=86400"#));
    let denial = res.extensions().get::<Denial>().unwrap().clone();
    assert_eq!(denial.code(), DenialCode::CostExceedsLimit);
    let body = json(res).await;
    assert_eq!(body["code"], "cost_exceeds_limit");
    assert_eq!(body["violated-policies"], serde_json::json!(["units"]));
    assert_eq!(
        body["detail"],
        "This request costs 101; the quota \"units\" allows 100 per period. \
         Send smaller requests."
    );
    let res = svc
        .clone()
        .oneshot(with(&u64::MAX.to_string()))
        .await
        .unwrap();
    assert_eq!(
        res.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "a cost above the whole quota"
    );
    let res = svc.clone().oneshot(with("40")).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""units";r=0;t=86400"#));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn requests_without_a_principal_pass_unchanged() {
    let fx = Fixture::new();
    let store = MemoryUsageStore::new();
    let calls = Arc::new(AtomicUsize::new(0));
    // Built from the hub, without an authentication layer: failed resolutions pass through
    // untouched (the auth layer, wherever it is, rejects them) and count nothing.
    let svc = ServiceBuilder::new()
        .layer(
            QuotaLayer::new(QuotaConfig::new(store.clone()).meter(QuotaWindow::Day))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(counting_ok::<Body>(calls.clone()));
    let bad = forge("kg", "AAAAAAAAAAAA", "BBBBBBBBBBBBBBBBBBBBBB");
    for req in [
        Request::get("/").body(Body::default()).unwrap(),
        Request::get("/")
            .header("x-api-key", bad.as_str())
            .body(Body::default())
            .unwrap(),
    ] {
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(res.headers().get("ratelimit").is_none());
        assert!(res.extensions().get::<Denial>().is_none());
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let id = KeyId::parse("AAAAAAAAAAAA").unwrap();
    assert!(store
        .report(&id, UNIX_EPOCH, utc(2100, 1, 1, 0, 0, 0))
        .await
        .unwrap()
        .is_empty());
    // Standalone, with nothing in the extensions: the same.
    let svc = ServiceBuilder::new()
        .layer(QuotaLayer::new(QuotaConfig::new(store)).unwrap())
        .service(counting_ok::<Body>(calls.clone()));
    assert_eq!(
        svc.oneshot(Request::get("/").body(Body::default()).unwrap())
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn handlers_see_the_remaining_allowance() {
    let fx = Fixture::new();
    let key = issue(
        &fx,
        vec![
            QuotaPolicy::new("hourly", 10, QuotaWindow::Hour),
            QuotaPolicy::new("daily", 5, QuotaWindow::Day),
        ],
    )
    .await;
    fx.clock.set(utc(2026, 1, 1, 12, 30, 0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(
            QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service_fn(|req: Request<Body>| async move {
            let status = req
                .extensions()
                .get::<keygate::RequestContext>()
                .and_then(|c| c.quota())
                .expect("status")
                .clone();
            let hourly = status.get("hourly").unwrap();
            let text = format!(
                "{} {} {:?} {:?}",
                status.remaining().unwrap(),
                hourly.remaining,
                hourly.reset_after,
                status.iter().map(|s| s.name).collect::<Vec<_>>()
            );
            Ok::<_, std::convert::Infallible>(Response::new(Body::from(text)))
        });
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    let text = String::from_utf8(body_bytes(res.into_body()).await.to_vec()).unwrap();
    assert_eq!(text, r#"4 9 Some(1800s) ["hourly", "daily"]"#);
}

#[tokio::test]
async fn batched_counts_reach_the_store_on_flush_and_survive_a_restart() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 5, QuotaWindow::Day)]).await;
    let store = MemoryUsageStore::new();
    let cfg = || {
        QuotaConfig::new(store.clone()).counting(Counting::Batched {
            flush_every: Duration::from_secs(3600),
        })
    };
    let (svc, handle, _) = stack(&fx, cfg());
    for _ in 0..3 {
        assert_eq!(
            svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
            200
        );
    }
    let day = Window::containing(QuotaWindow::Day, fx.clock_now());
    assert_eq!(
        store.load(&key.id(), &[day]).await.unwrap()[0].cost,
        0,
        "not flushed yet"
    );
    assert_eq!(handle.flush().await.unwrap(), 1);
    assert_eq!(
        store.load(&key.id(), &[day]).await.unwrap()[0],
        Usage {
            cost: 3,
            requests: 3
        }
    );
    assert_eq!(handle.flush().await.unwrap(), 0, "nothing new");
    // A restarted process (a new layer over the same store) continues from 3.
    let (svc2, handle2, _) = stack(&fx, cfg());
    for _ in 0..2 {
        assert_eq!(
            svc2.clone().oneshot(keyed(&key)).await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        svc2.clone().oneshot(keyed(&key)).await.unwrap().status(),
        429
    );
    handle2.flush().await.unwrap();
    assert_eq!(store.load(&key.id(), &[day]).await.unwrap()[0].cost, 5);
}

#[tokio::test]
async fn a_due_flush_starts_by_itself() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 50, QuotaWindow::Day)]).await;
    let store = MemoryUsageStore::new();
    let cfg = QuotaConfig::new(store.clone()).counting(Counting::Batched {
        flush_every: Duration::from_secs(1),
    });
    let (svc, _, _) = stack(&fx, cfg);
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    fx.clock.advance(Duration::from_secs(2));
    assert_eq!(
        svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
        200
    );
    let day = Window::containing(QuotaWindow::Day, fx.clock_now());
    // The flush was spawned on this runtime; wait for it without sleeping blindly.
    let mut seen = 0;
    for _ in 0..1000 {
        seen = store.load(&key.id(), &[day]).await.unwrap()[0].cost;
        if seen == 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(seen, 2);
}

#[tokio::test]
async fn strict_counting_is_synchronous_and_shared_by_replicas() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 4, QuotaWindow::Day)]).await;
    let store = MemoryUsageStore::new();
    let (a, _, _) = stack(
        &fx,
        QuotaConfig::new(store.clone()).counting(Counting::Strict),
    );
    let (b, _, _) = stack(
        &fx,
        QuotaConfig::new(store.clone()).counting(Counting::Strict),
    );
    let day = Window::containing(QuotaWindow::Day, fx.clock_now());
    let mut passed = 0;
    for i in 0..10 {
        let svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        let res = svc.oneshot(keyed(&key)).await.unwrap();
        if res.status() == 200 {
            passed += 1;
            // Counted before the response: already in the store.
            assert_eq!(store.load(&key.id(), &[day]).await.unwrap()[0].cost, passed);
        } else {
            assert_eq!(res.status(), 429);
        }
    }
    assert_eq!(passed, 4);
}

/// A usage store whose outage can be switched on.
#[derive(Clone, Default)]
struct Flaky {
    inner: MemoryUsageStore,
    down: Arc<AtomicBool>,
}

type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, UsageError>> + Send + 'a>>;

impl Flaky {
    fn check(&self) -> Result<(), UsageError> {
        if self.down.load(Ordering::SeqCst) {
            Err(UsageError::Unavailable("simulated outage".into()))
        } else {
            Ok(())
        }
    }
}

// `UsageStore` is an `async_trait`; these are its desugared signatures.
impl UsageStore for Flaky {
    fn load<'a, 'b, 'c, 't>(
        &'a self,
        key: &'b KeyId,
        windows: &'c [Window],
    ) -> StoreFuture<'t, Vec<Usage>>
    where
        'a: 't,
        'b: 't,
        'c: 't,
        Self: 't,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.load(key, windows).await
        })
    }
    fn check_and_add<'a, 'b, 'c, 'd, 't>(
        &'a self,
        key: &'b KeyId,
        windows: &'c [Window],
        limits: &'d [Limit],
        cost: u64,
    ) -> StoreFuture<'t, Admission>
    where
        'a: 't,
        'b: 't,
        'c: 't,
        'd: 't,
        Self: 't,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.check_and_add(key, windows, limits, cost).await
        })
    }
    fn add<'a, 'b, 't>(&'a self, increments: &'b [Increment]) -> StoreFuture<'t, ()>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.add(increments).await
        })
    }
    fn subtract<'a, 'b, 't>(&'a self, decrements: &'b [Increment]) -> StoreFuture<'t, ()>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.subtract(decrements).await
        })
    }
    fn report<'a, 'b, 't>(
        &'a self,
        key: &'b KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> StoreFuture<'t, Vec<UsageRecord>>
    where
        'a: 't,
        'b: 't,
        Self: 't,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.report(key, from, to).await
        })
    }
}

#[tokio::test]
async fn an_unreachable_store_fails_closed_and_loses_no_count() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 3, QuotaWindow::Day)]).await;
    let store = Flaky::default();
    for counting in [
        Counting::Strict,
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
    ] {
        store.down.store(true, Ordering::SeqCst);
        let (svc, handle, calls) = stack(&fx, QuotaConfig::new(store.clone()).counting(counting));
        let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
        assert_eq!(
            res.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "{counting:?}"
        );
        assert_eq!(
            res.extensions().get::<Denial>().unwrap().code(),
            DenialCode::StoreUnavailable
        );
        assert_eq!(
            res.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "{counting:?}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        store.down.store(false, Ordering::SeqCst);
        assert_eq!(
            svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
            200
        );
        if counting != Counting::Strict {
            // Batched: a failed flush keeps the counts for the next one.
            store.down.store(true, Ordering::SeqCst);
            assert!(handle.flush().await.is_err());
            store.down.store(false, Ordering::SeqCst);
            assert_eq!(handle.flush().await.unwrap(), 1);
        }
    }
    let day = Window::containing(QuotaWindow::Day, fx.clock_now());
    assert_eq!(
        store.inner.load(&key.id(), &[day]).await.unwrap()[0].cost,
        2
    );
}

#[tokio::test]
async fn usage_reports_per_key_and_period() {
    let fx = Fixture::new();
    let metered = fx.issue("no-quota").await;
    let limited = issue(
        &fx,
        vec![QuotaPolicy::new("hourly", 100, QuotaWindow::Hour)],
    )
    .await;
    let cfg = QuotaConfig::new(MemoryUsageStore::new())
        .meter(QuotaWindow::Day)
        .cost(|head| {
            if head.method() == http::Method::POST {
                10
            } else {
                1
            }
        });
    let (svc, handle, _) = stack(&fx, cfg);
    fx.clock.set(utc(2026, 2, 1, 9, 0, 0));
    for (key, post) in [
        (&metered, false),
        (&metered, true),
        (&limited, true),
        (&limited, false),
    ] {
        let mut req = keyed(key);
        if post {
            *req.method_mut() = http::Method::POST;
        }
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    }
    fx.clock.set(utc(2026, 2, 2, 9, 0, 0));
    assert_eq!(
        svc.clone().oneshot(keyed(&metered)).await.unwrap().status(),
        200
    );
    let feb = |d| utc(2026, 2, d, 0, 0, 0);
    let rows = handle.report(&metered.id(), feb(1), feb(3)).await.unwrap();
    let got: Vec<_> = rows
        .iter()
        .map(|r| (r.window.kind, r.window.start, r.usage))
        .collect();
    assert_eq!(
        got,
        [
            (
                QuotaWindow::Day,
                feb(1),
                Usage {
                    cost: 11,
                    requests: 2
                }
            ),
            (
                QuotaWindow::Day,
                feb(2),
                Usage {
                    cost: 1,
                    requests: 1
                }
            ),
        ]
    );
    let rows = handle.report(&limited.id(), feb(1), feb(2)).await.unwrap();
    let got: Vec<_> = rows.iter().map(|r| (r.window.kind, r.usage)).collect();
    assert_eq!(
        got,
        [
            (
                QuotaWindow::Day,
                Usage {
                    cost: 11,
                    requests: 2
                }
            ),
            (
                QuotaWindow::Hour,
                Usage {
                    cost: 11,
                    requests: 2
                }
            ),
        ]
    );
}

#[tokio::test]
async fn a_refusal_by_an_inner_layer_is_refunded() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("k", |r| {
            r.quotas = vec![QuotaPolicy::new("daily", 10, QuotaWindow::Day)];
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 1)];
        })
        .await;
    for counting in [
        Counting::Strict,
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
    ] {
        let store = MemoryUsageStore::new();
        let quota = QuotaLayer::new(QuotaConfig::new(store.clone()).counting(counting))
            .unwrap()
            .with_gate(&fx.gate);
        let handle = quota.handle();
        let rate = RateLimitLayer::new(
            RateLimitConfig::new().clock(LimiterClock::manual(fx.clock.clone())),
        )
        .unwrap()
        .with_gate(&fx.gate);
        let svc = ServiceBuilder::new()
            .layer(quota)
            .layer(rate)
            .service(counting_ok::<Body>(Arc::default()));
        assert_eq!(
            svc.clone().oneshot(keyed(&key)).await.unwrap().status(),
            200
        );
        for _ in 0..3 {
            let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
            assert_eq!(res.status(), 429);
            assert_eq!(
                res.extensions().get::<Denial>().unwrap().code(),
                DenialCode::RateLimited
            );
        }
        handle.flush().await.unwrap();
        // Strict refunds are written by a spawned task: let it run.
        let day = Window::containing(QuotaWindow::Day, fx.clock_now());
        let mut used = 0;
        for _ in 0..1000 {
            used = store.load(&key.id(), &[day]).await.unwrap()[0].cost;
            if used == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            used, 1,
            "{counting:?}: only the request that was served counts"
        );
        fx.clock.advance(Duration::from_secs(60));
    }
}

/// An inner service answering the status in `x-status` (and the gRPC status in
/// `x-grpc-status`, trailers-only), counting its calls.
fn answering(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<Body>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Body>, std::convert::Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<Body>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let status = req
            .headers()
            .get("x-status")
            .map_or(200, |v| v.to_str().unwrap().parse().unwrap());
        let grpc = req.headers().get("x-grpc-status").cloned();
        async move {
            let mut res = Response::new(Body::default());
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            if let Some(g) = grpc {
                res.headers_mut().insert("grpc-status", g);
            }
            Ok::<_, std::convert::Infallible>(res)
        }
    })
}

#[tokio::test]
async fn requests_the_service_refuses_are_not_charged() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 10, QuotaWindow::Day)]).await;
    for counting in [
        Counting::Strict,
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
    ] {
        let store = MemoryUsageStore::new();
        let quota = QuotaLayer::new(
            QuotaConfig::new(store.clone())
                .counting(counting)
                .cost(|h| {
                    h.headers()
                        .get("x-cost")
                        .map_or(1, |v| v.to_str().unwrap().parse().unwrap())
                }),
        )
        .unwrap()
        .with_gate(&fx.gate);
        let handle = quota.handle();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = ServiceBuilder::new()
            .layer(fx.gate.auth_layer())
            .layer(quota)
            .service(answering(calls.clone()));
        let send = |status: &str, grpc: Option<&str>| {
            let mut r = keyed(&key);
            let h = r.headers_mut();
            h.insert("x-cost", "5".parse().unwrap());
            h.insert("x-status", status.parse().unwrap());
            if let Some(g) = grpc {
                h.insert("x-grpc-status", g.parse().unwrap());
            }
            svc.clone().oneshot(r)
        };
        let day = Window::containing(QuotaWindow::Day, fx.clock_now());
        let used = || async {
            handle.flush().await.unwrap();
            // Strict refunds are written by a spawned task: poll with a bounded count.
            let mut last = 0;
            for _ in 0..1000 {
                last = store.load(&key.id(), &[day]).await.unwrap()[0].cost;
                tokio::task::yield_now().await;
            }
            last
        };
        // Two 5-point upserts the service refuses (403, 400), a 404 and a gRPC
        // PERMISSION_DENIED: none is charged, so the whole 10 is still there.
        for (status, grpc) in [
            ("403", None),
            ("400", None),
            ("404", None),
            ("200", Some("7")),
        ] {
            let res = send(status, grpc).await.unwrap();
            assert_eq!(res.status().as_str(), status, "{counting:?}");
            assert_eq!(
                used().await,
                0,
                "{counting:?}: {status} {grpc:?} is not charged"
            );
        }
        // A 429 from the service itself, a 5xx and a gRPC OK are charged.
        assert_eq!(send("429", None).await.unwrap().status(), 429);
        assert_eq!(
            used().await,
            5,
            "{counting:?}: the service's own 429 is charged"
        );
        assert_eq!(send("500", Some("0")).await.unwrap().status(), 500);
        assert_eq!(used().await, 10, "{counting:?}: a 5xx is charged");
        // Used up: keygate's own refusal, with no call.
        let before = calls.load(Ordering::SeqCst);
        let res = send("200", None).await.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(calls.load(Ordering::SeqCst), before);
        assert_eq!(used().await, 10);
        fx.clock.advance(Duration::from_secs(86_400));
    }
}

#[tokio::test]
async fn charge_refused_keeps_charging_refusals() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)]).await;
    let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()).charge_refused(true))
        .unwrap()
        .with_gate(&fx.gate);
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(quota)
        .service(answering(Arc::default()));
    let forbidden = || {
        let mut r = keyed(&key);
        r.headers_mut().insert("x-status", "403".parse().unwrap());
        svc.clone().oneshot(r)
    };
    assert_eq!(forbidden().await.unwrap().status(), 403);
    let res = forbidden().await.unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(header(&res, "ratelimit"), Some(r#""daily";r=0;t=86400"#));
    assert_eq!(forbidden().await.unwrap().status(), 429);
}

#[tokio::test]
async fn a_quota_in_bytes_charges_the_declared_length() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("kib", 10, QuotaWindow::Day)]).await;
    let cfg = QuotaConfig::new(MemoryUsageStore::new())
        .cost_in_bytes(keygate::cost::by_bytes(1024, 8 * 1024));
    let (svc, _, calls) = stack(&fx, cfg);
    let with = |name: &'static str, value: &str| {
        let mut r = keyed(&key);
        *r.method_mut() = http::Method::PUT;
        r.headers_mut().insert(name, value.parse().unwrap());
        r
    };
    let res = svc
        .clone()
        .oneshot(with("content-length", "4097"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(header(&res, "ratelimit"), Some(r#""kib";r=5;t=86400"#));
    // A streamed body is charged as the maximum (8 KiB): more than the 5 left.
    let res = svc
        .clone()
        .oneshot(with("transfer-encoding", "chunked"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(
        res.extensions().get::<Denial>().unwrap().code(),
        DenialCode::QuotaExceeded
    );
    // More bytes than the whole quota: 413.
    let res = svc
        .clone()
        .oneshot(with("content-length", "20000"))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        json(res).await["detail"],
        "This request costs 20; the quota \"kib\" allows 10 per period. Send smaller requests."
    );
    // A bodyless GET costs one unit.
    let res = svc.clone().oneshot(keyed(&key)).await.unwrap();
    assert_eq!(header(&res, "ratelimit"), Some(r#""kib";r=4;t=86400"#));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn grpc_requests_get_resource_exhausted() {
    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("daily", 1, QuotaWindow::Day)]).await;
    let (svc, _, _) = stack(&fx, QuotaConfig::new(MemoryUsageStore::new()));
    let grpc = || {
        let mut r = keyed(&key);
        r.headers_mut()
            .insert("content-type", "application/grpc+proto".parse().unwrap());
        r
    };
    assert_eq!(svc.clone().oneshot(grpc()).await.unwrap().status(), 200);
    let res = svc.clone().oneshot(grpc()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(header(&res, "grpc-status"), Some("8"));
    assert!(header(&res, "grpc-message")
        .unwrap()
        .starts_with("quota_exceeded"));
}

#[tokio::test]
async fn bad_configurations_are_refused_and_bad_records_fail_closed() {
    let zero = QuotaConfig::new(MemoryUsageStore::new()).counting(Counting::Batched {
        flush_every: Duration::ZERO,
    });
    assert_eq!(
        QuotaLayer::new(zero).unwrap_err(),
        ConfigError::Zero("flush_every")
    );
    let bad_meter = QuotaConfig::new(MemoryUsageStore::new())
        .meter(QuotaWindow::Credits(Refill::Monthly { day: 0 }));
    assert!(QuotaLayer::new(bad_meter).is_err());
    let err = |p: QuotaPolicy| validate_policy(&p).unwrap_err().to_string();
    assert!(err(QuotaPolicy::new("z", 0, QuotaWindow::Day)).contains("at least 1"));
    assert!(err(QuotaPolicy::new(
        "m",
        5,
        QuotaWindow::Credits(Refill::Monthly { day: 32 })
    ))
    .contains("1 to 31"));
    assert!(err(QuotaPolicy::new("", 5, QuotaWindow::Day)).contains("[A-Za-z0-9_-]"));
    // The same error type as rate limits, with the same variant for the same fault.
    assert_eq!(
        validate_policy(&QuotaPolicy::new("bad name", 5, QuotaWindow::Day)),
        Err(ConfigError::InvalidName("bad name".into()))
    );
    assert_eq!(
        keygate::rate_limit::validate_policy(&keygate::RateLimitPolicy::per_second("bad name", 5)),
        Err(ConfigError::InvalidName("bad name".into()))
    );
    assert!(validate_policy(&QuotaPolicy::new(
        "ok",
        1,
        QuotaWindow::Credits(Refill::Never)
    ))
    .is_ok());

    let fx = Fixture::new();
    let key = issue(&fx, vec![QuotaPolicy::new("broken", 0, QuotaWindow::Day)]).await;
    let (svc, _, calls) = stack(&fx, QuotaConfig::new(MemoryUsageStore::new()));
    assert_eq!(svc.oneshot(keyed(&key)).await.unwrap().status(), 429);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// Many tasks on a multi-threaded runtime, one key, frozen clock: exactly the limit passes,
/// batched and strict.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_pass_more_than_the_quota() {
    let fx = Fixture::new();
    for counting in [
        Counting::Batched {
            flush_every: Duration::from_secs(3600),
        },
        Counting::Strict,
    ] {
        let key = issue(&fx, vec![QuotaPolicy::new("daily", 77, QuotaWindow::Day)]).await;
        let store = MemoryUsageStore::new();
        let (svc, handle, calls) = stack(&fx, QuotaConfig::new(store.clone()).counting(counting));
        let passed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let svc = svc.clone();
            let secret = key.expose_secret().to_owned();
            let passed = passed.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..10 {
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
        assert_eq!(passed.load(Ordering::SeqCst), 77, "{counting:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 77);
        handle.flush().await.unwrap();
        let day = Window::containing(QuotaWindow::Day, fx.clock_now());
        assert_eq!(
            store.load(&key.id(), &[day]).await.unwrap()[0],
            Usage {
                cost: 77,
                requests: 77
            }
        );
    }
}

#[test]
fn quota_windows_keep_their_serialized_form() {
    let old = r#"{"name":"daily","limit":5,"window":"day"}"#;
    let p: QuotaPolicy = serde_json::from_str(old).unwrap();
    assert_eq!(p, QuotaPolicy::new("daily", 5, QuotaWindow::Day));
    assert_eq!(serde_json::to_string(&p).unwrap(), old);
    for (w, text) in [
        (
            QuotaWindow::Credits(Refill::Never),
            r#"{"credits":"never"}"#,
        ),
        (
            QuotaWindow::Credits(Refill::Daily),
            r#"{"credits":"daily"}"#,
        ),
        (
            QuotaWindow::Credits(Refill::Monthly { day: 15 }),
            r#"{"credits":{"monthly":{"day":15}}}"#,
        ),
    ] {
        assert_eq!(serde_json::to_string(&w).unwrap(), text);
        assert_eq!(serde_json::from_str::<QuotaWindow>(text).unwrap(), w);
    }
}

trait ClockNow {
    fn clock_now(&self) -> SystemTime;
}
impl ClockNow for Fixture {
    fn clock_now(&self) -> SystemTime {
        keygate::Clock::now(&self.clock)
    }
}
