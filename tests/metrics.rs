//! The metrics endpoint scraped before and after a known mix of requests through the fused
//! stack: every counter moves by exactly what was sent (decisions and codes, rate-limit and
//! quota refusals by policy, verifier lookups, audit events, the stack-time histogram,
//! tokens issued), and per-key series stay within their bound however many keys a client
//! sprays.

use std::collections::HashSet;
use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use keygate::core::audit::{Auditor, Overflow};
use keygate::core::usage::MemoryUsageStore;
use keygate::metrics::{Metrics, PerKey, MAX_POLICY_LABELS};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{
    ApiKey, Clock, KeyGate, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix, QuotaPolicy,
    QuotaWindow, RateLimitPolicy, Verifier,
};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<Request<String>, Response<String>, Infallible>;

struct World {
    gate: KeyGate,
    clock: ManualClock,
    store: MemoryStore,
}

fn world() -> World {
    let clock = ManualClock::at_2026();
    let store = MemoryStore::new();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(clock.clone())
            .build(),
    );
    World { gate, clock, store }
}

impl World {
    async fn key(&self, edit: impl FnOnce(&mut KeyRecord)) -> ApiKey {
        let (key, mut record) = KeyRecord::generate(
            &Prefix::default(),
            self.gate.verifier().hasher(),
            "k",
            self.clock.now(),
        )
        .unwrap();
        edit(&mut record);
        self.store.insert(&record).await.unwrap();
        key
    }

    fn stack(&self, auditor: Auditor) -> Svc {
        let g = &self.gate;
        let rate = RateLimitLayer::new(
            RateLimitConfig::new().clock(LimiterClock::manual(self.clock.clone())),
        )
        .unwrap()
        .with_gate(g);
        let quota =
            QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()).clock(self.clock.clone()))
                .unwrap()
                .with_gate(g);
        let svc = ServiceBuilder::new()
            .layer(g.stack().auth().rate(&rate).quota(&quota).audit(auditor))
            .service(tower::service_fn(|_req: Request<String>| async {
                Ok::<_, Infallible>(Response::new(String::from("ok")))
            }));
        BoxCloneService::new(svc.map_response(|r| r.map(|_| String::new())))
    }
}

async fn send(svc: &Svc, key: Option<&str>) -> StatusCode {
    let mut b = Request::builder().uri("/data");
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    svc.clone()
        .oneshot(b.body(String::new()).unwrap())
        .await
        .unwrap()
        .status()
}

/// Scrapes `GET /metrics` of the metrics router.
async fn scrape(metrics: &Metrics) -> String {
    let res = metrics
        .router::<()>()
        .oneshot(
            Request::get("/metrics")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()["content-type"],
        keygate::metrics::CONTENT_TYPE
    );
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// The value of one series (`name{labels}` exactly as exposed); 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.split(' ').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn a_scrape_sees_exactly_what_was_sent() {
    let w = world();
    let metrics = Metrics::new();
    let auditor = Auditor::builder()
        .overflow(Overflow::Block)
        .spawn(metrics.clone())
        .unwrap();
    metrics.observe_verifier(w.gate.verifier());
    metrics.observe_auditor(&auditor);
    let svc = w.stack(auditor.clone());
    let limited = w
        .key(|r| r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)])
        .await;
    let metered = w
        .key(|r| r.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)])
        .await;
    let unknown = ApiKey::generate(&Prefix::default()).unwrap();

    let before = scrape(&metrics).await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(send(&svc, Some(limited.expose_secret())).await);
    }
    for _ in 0..3 {
        statuses.push(send(&svc, Some(metered.expose_secret())).await);
    }
    for _ in 0..4 {
        statuses.push(send(&svc, None).await);
    }
    for _ in 0..2 {
        statuses.push(send(&svc, Some(unknown.expose_secret())).await);
    }
    metrics.token_issued();
    metrics.token_issued();
    auditor.flush().await.unwrap();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 5, "{statuses:?}");

    let after = scrape(&metrics).await;
    let delta = |series: &str| value(&after, series) - value(&before, series);
    for (series, want) in [
        (
            r#"keygate_requests_total{decision="allowed",code="none"}"#,
            5.0,
        ),
        (
            r#"keygate_requests_total{decision="denied",code="rate_limited"}"#,
            2.0,
        ),
        (
            r#"keygate_requests_total{decision="denied",code="quota_exceeded"}"#,
            1.0,
        ),
        (
            r#"keygate_requests_total{decision="denied",code="missing_key"}"#,
            4.0,
        ),
        (
            r#"keygate_requests_total{decision="denied",code="invalid_key"}"#,
            2.0,
        ),
        (r#"keygate_denials_total{layer="auth"}"#, 6.0),
        (r#"keygate_denials_total{layer="rate_limit"}"#, 2.0),
        (r#"keygate_denials_total{layer="quota"}"#, 1.0),
        (r#"keygate_denials_total{layer="scope"}"#, 0.0),
        (
            r#"keygate_limit_refusals_total{code="rate_limited",policy="burst"}"#,
            2.0,
        ),
        (
            r#"keygate_limit_refusals_total{code="quota_exceeded",policy="daily"}"#,
            1.0,
        ),
        // Each key's first request reads the store, the rest are cache hits; the unknown
        // key's second request is answered from the memory of unknown ids.
        (r#"keygate_verifier_lookups_total{result="hit"}"#, 6.0),
        (r#"keygate_verifier_lookups_total{result="miss"}"#, 3.0),
        (
            r#"keygate_verifier_lookups_total{result="negative_hit"}"#,
            1.0,
        ),
        ("keygate_verifier_store_errors_total", 0.0),
        (r#"keygate_audit_events_total{outcome="written"}"#, 14.0),
        (r#"keygate_audit_events_total{outcome="dropped"}"#, 0.0),
        (
            r#"keygate_stack_duration_seconds_count{protocol="http"}"#,
            14.0,
        ),
        (
            r#"keygate_request_duration_seconds_count{protocol="http"}"#,
            14.0,
        ),
        ("keygate_tokens_issued_total", 2.0),
    ] {
        assert_eq!(delta(series), want, "{series}\n{after}");
    }
    assert_eq!(value(&after, "keygate_audit_queue_depth"), 0.0, "{after}");
    assert!(
        after.contains("# TYPE keygate_audit_queue_depth gauge"),
        "{after}"
    );
    // keygate adds microseconds, not the service's time: every stack time is under the
    // request's own.
    assert!(
        value(
            &after,
            r#"keygate_stack_duration_seconds_sum{protocol="http"}"#
        ) <= value(
            &after,
            r#"keygate_request_duration_seconds_sum{protocol="http"}"#
        )
    );
    // No key id, address or path is a label.
    assert!(!after.contains(limited.id().as_str()));
    assert!(!after.contains("/data"));
    auditor.shutdown().await;
}

/// Per-key series: opt-in, only for accepted keys, and bounded. A client spraying
/// well-formed random keys adds no series at all.
#[tokio::test]
async fn per_key_series_stay_bounded_under_a_key_spray() {
    let w = world();
    let metrics = Metrics::per_key(PerKey::First(2));
    let auditor = Auditor::direct(metrics.clone());
    let svc = w.stack(auditor);
    let mut keys = Vec::new();
    for _ in 0..5 {
        keys.push(w.key(|_| {}).await);
    }
    for k in &keys {
        assert_eq!(send(&svc, Some(k.expose_secret())).await, StatusCode::OK);
    }
    let text = metrics.render();
    let series = |t: &str| {
        t.lines()
            .filter(|l| l.starts_with("keygate_key_requests_total{"))
            .count()
    };
    assert_eq!(series(&text), 3, "two keys and other:\n{text}");
    for k in &keys[..2] {
        let line = format!(
            r#"keygate_key_requests_total{{key_id="{}",decision="allowed"}}"#,
            k.id()
        );
        assert_eq!(value(&text, &line), 1.0, "{text}");
    }
    assert_eq!(
        value(
            &text,
            r#"keygate_key_requests_total{key_id="other",decision="allowed"}"#
        ),
        3.0
    );
    let lines = text.lines().count();

    for _ in 0..500 {
        let k = ApiKey::generate(&Prefix::default()).unwrap();
        assert_eq!(
            send(&svc, Some(k.expose_secret())).await,
            StatusCode::UNAUTHORIZED
        );
    }
    let sprayed = metrics.render();
    assert_eq!(series(&sprayed), 3, "{sprayed}");
    // Two more series in the whole registry, once each: the invalid_key decision and the
    // auth layer's denials.
    assert_eq!(sprayed.lines().count(), lines + 2, "{sprayed}");
    assert_eq!(
        value(&sprayed, r#"keygate_denials_total{layer="auth"}"#),
        500.0
    );
    assert_eq!(
        value(
            &sprayed,
            r#"keygate_requests_total{decision="denied",code="invalid_key"}"#
        ),
        500.0
    );

    // An allowlist names exactly its keys.
    let only: HashSet<_> = [keys[4].id()].into_iter().collect();
    let metrics = Metrics::per_key(PerKey::Allowlist(only));
    let svc = w.stack(Auditor::direct(metrics.clone()));
    for k in &keys {
        send(&svc, Some(k.expose_secret())).await;
    }
    let text = metrics.render();
    assert_eq!(series(&text), 1, "{text}");
    assert!(text.contains(keys[4].id().as_str()));
}

/// Policy names are labels only up to a bound: keys with ever new policy names cannot grow
/// the registry past it.
#[tokio::test]
async fn policy_labels_are_bounded() {
    let w = world();
    let metrics = Metrics::new();
    let svc = w.stack(Auditor::direct(metrics.clone()));
    let extra = 3;
    for i in 0..MAX_POLICY_LABELS + extra {
        let key = w
            .key(|r| r.rate_limits = vec![RateLimitPolicy::per_minute(format!("p{i}"), 1)])
            .await;
        assert_eq!(send(&svc, Some(key.expose_secret())).await, StatusCode::OK);
        assert_eq!(
            send(&svc, Some(key.expose_secret())).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    w.clock.advance(Duration::from_secs(1));
    let text = metrics.render();
    let series = text
        .lines()
        .filter(|l| l.starts_with("keygate_limit_refusals_total{"))
        .count();
    assert_eq!(series, MAX_POLICY_LABELS + 1, "{text}");
    assert_eq!(
        value(
            &text,
            r#"keygate_limit_refusals_total{code="rate_limited",policy="other"}"#
        ),
        extra as f64
    );
}

/// The stack time stops when the protected service is called: a service that takes 30 ms
/// does not count in it, while a refusal's whole time does.
#[tokio::test]
async fn stack_time_leaves_the_service_out() {
    use keygate::core::audit::MemorySink;
    let w = world();
    let sink = MemorySink::new();
    let key = w.key(|_| {}).await;
    let svc = ServiceBuilder::new()
        .layer(w.gate.stack().auth().audit(Auditor::direct(sink.clone())))
        .service(tower::service_fn(|_req: Request<String>| async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let call = |k: Option<&str>| {
        let mut b = Request::builder().uri("/data");
        if let Some(k) = k {
            b = b.header("x-api-key", k);
        }
        svc.clone().oneshot(b.body(String::new()).unwrap())
    };
    // A miss (store read inside the stack), a hit, a refusal.
    call(Some(key.expose_secret())).await.unwrap();
    call(Some(key.expose_secret())).await.unwrap();
    call(None).await.unwrap();
    let events: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|e| e.as_request().cloned())
        .collect();
    assert_eq!(events.len(), 3);
    for e in &events[..2] {
        let stack = e.stack_time.unwrap();
        assert!(e.latency >= Duration::from_millis(30), "{e:?}");
        assert!(stack < Duration::from_millis(30), "{stack:?} of {e:?}");
    }
    assert_eq!(events[2].stack_time, Some(events[2].latency));
}
