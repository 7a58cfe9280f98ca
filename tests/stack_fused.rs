//! A fused stack (`KeyGate::stack`) answers every request as the separate layers stacked in
//! the same order do: the same status, the same exact `Denial` code, the same rate-limit
//! fields, the same audit record, and the service is reached for the same requests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    ApiKey, Clock, Denial, KeyGate, KeyRecord, KeyStatus, KeyStore, ManualClock, MemoryStore,
    Prefix, QuotaPolicy, QuotaWindow, RateLimitPolicy, RequestContext, Verifier,
};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<Request<String>, Response<String>, Infallible>;

struct World {
    gate: KeyGate,
    clock: ManualClock,
    good: ApiKey,
    revoked: ApiKey,
    fenced: ApiKey,
    rules: RouteScopes,
}

async fn world() -> World {
    let clock = ManualClock::at_2026();
    let store = MemoryStore::new();
    let gate = KeyGate::new(
        Verifier::builder(store.clone())
            .clock(clock.clone())
            .build(),
    );
    let now = clock.now();
    let mut issue = Vec::new();
    for edit in [
        &(|_: &mut KeyRecord| {}) as &dyn Fn(&mut KeyRecord),
        &|r: &mut KeyRecord| r.status = KeyStatus::Revoked,
        &|r: &mut KeyRecord| r.allowed_ips = vec!["192.0.2.0/24".parse().unwrap()],
    ] {
        let (key, mut record) =
            KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "k", now).unwrap();
        record.scopes = vec!["points:read".into()];
        record.resources = vec!["tenant-*".into()];
        record.rate_limits = vec![RateLimitPolicy::per_minute("burst", 8)];
        record.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)];
        edit(&mut record);
        store.insert(&record).await.unwrap();
        issue.push(key);
    }
    let mut keys = issue.into_iter();
    World {
        gate,
        clock,
        good: keys.next().unwrap(),
        revoked: keys.next().unwrap(),
        fenced: keys.next().unwrap(),
        rules: RouteScopes::builder()
            .route(
                "POST",
                "/collections/{collection}/points/search",
                "points:read",
            )
            .route("PUT", "/collections/{collection}/points", "points:write")
            .public("GET", "/healthz")
            .build()
            .unwrap(),
    }
}

fn inner(
    calls: Arc<AtomicUsize>,
) -> impl tower::Service<
    Request<String>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl std::future::Future<Output = Result<Response<String>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Request<String>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let tenant = RequestContext::of(req.extensions())
            .and_then(|c| c.principal())
            .map_or("anonymous".to_owned(), |p| p.name().to_owned());
        async move { Ok::<_, Infallible>(Response::new(tenant)) }
    })
}

/// The same six policies, separate (`fused == false`) or fused, with fresh counters.
fn stack(w: &World, fused: bool, sink: &MemorySink, calls: Arc<AtomicUsize>) -> Svc {
    let g = &w.gate;
    let rate =
        RateLimitLayer::new(RateLimitConfig::new().clock(LimiterClock::manual(w.clock.clone())))
            .unwrap()
            .with_gate(g);
    let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()).clock(w.clock.clone()))
        .unwrap()
        .with_gate(g);
    let ip = IpAllowLayer::new(IpPolicy::new().deny(["203.0.113.0/24"]).unwrap());
    let scope = ScopeLayer::table(w.rules.clone());
    let auditor = Auditor::direct(sink.clone());
    if fused {
        let svc = ServiceBuilder::new()
            .layer(
                g.stack()
                    .rate(&rate)
                    .auth()
                    .ip(&ip)
                    .scope(&scope)
                    .quota(&quota)
                    .audit(auditor),
            )
            .service(inner(calls));
        BoxCloneService::new(svc.map_response(drop_body))
    } else {
        let svc = ServiceBuilder::new()
            .layer(g.audit_layer(auditor))
            .layer(rate)
            .layer(g.auth_layer())
            .layer(ip.with_gate(g))
            .layer(scope.with_gate(g))
            .layer(quota)
            .service(inner(calls));
        BoxCloneService::new(svc.map_response(drop_body))
    }
}

/// The decisions are compared through status, denial and fields; bodies are dropped.
fn drop_body<B>(r: Response<B>) -> Response<String> {
    r.map(|_| String::new())
}

fn request(method: &str, path: &str, key: Option<&ApiKey>, peer: [u8; 4]) -> Request<String> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(k) = key {
        b = b.header("x-api-key", k.expose_secret());
    }
    let mut req = b.body(String::new()).unwrap();
    req.extensions_mut().insert(SocketAddr::from((peer, 4000)));
    req
}

/// What a stack answered to a request, as far as the client and the audit log can tell.
type Seen = (StatusCode, Option<String>, Vec<String>);

async fn run(svc: &Svc, req: Request<String>) -> Seen {
    let res = svc.clone().oneshot(req).await.unwrap();
    let code = res
        .extensions()
        .get::<Denial>()
        .map(|d| d.code().as_str().to_owned());
    (res.status(), code, members(&res))
}

/// The list members of the rate-limit fields, in order: one field line per layer (separate
/// layers) and one line holding every layer's members (fused) mean the same (RFC 9110
/// section 5.3).
fn members<B>(res: &Response<B>) -> Vec<String> {
    ["ratelimit-policy", "ratelimit", "retry-after"]
        .iter()
        .flat_map(|h| res.headers().get_all(*h).iter())
        .flat_map(|v| v.to_str().unwrap().split(", "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn fused_and_separate_stacks_answer_alike() {
    let w = world().await;
    let ok = [198, 51, 100, 7];
    let search = "/collections/tenant-a/points/search";
    let plan: Vec<(&str, &str, Option<&ApiKey>, [u8; 4])> = vec![
        ("POST", search, Some(&w.good), ok),
        ("POST", search, None, ok),
        ("POST", search, Some(&w.revoked), ok),
        ("POST", search, Some(&w.fenced), ok),
        ("POST", search, Some(&w.good), [203, 0, 113, 9]),
        ("PUT", "/collections/tenant-a/points", Some(&w.good), ok),
        (
            "POST",
            "/collections/other/points/search",
            Some(&w.good),
            ok,
        ),
        ("GET", "/nowhere", Some(&w.good), ok),
        ("GET", "/healthz", None, ok),
        // The quota (2 a day) and then the rate limit (8 a minute, every request counted)
        // run out.
        ("POST", search, Some(&w.good), ok),
        ("POST", search, Some(&w.good), ok),
        ("POST", search, Some(&w.good), ok),
        ("POST", search, Some(&w.good), ok),
    ];
    let mut seen = Vec::new();
    let mut events = Vec::new();
    let mut reached = Vec::new();
    for fused in [false, true] {
        let sink = MemorySink::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let svc = stack(&w, fused, &sink, calls.clone());
        let mut out = Vec::new();
        for (method, path, key, peer) in &plan {
            out.push(run(&svc, request(method, path, *key, *peer)).await);
        }
        seen.push(out);
        events.push(
            sink.events()
                .iter()
                .filter_map(|e| e.as_request())
                .map(|e| (e.status, e.denial, e.key_name.clone(), e.client_ip))
                .collect::<Vec<_>>(),
        );
        reached.push(calls.load(Ordering::SeqCst));
        w.clock.advance(Duration::from_secs(86_400));
    }
    for (i, (a, b)) in seen[0].iter().zip(&seen[1]).enumerate() {
        assert_eq!(a, b, "request {i}: {:?}", plan[i].1);
    }
    assert_eq!(events[0], events[1]);
    assert_eq!(reached[0], reached[1]);
    // The matrix exercises what it means to: a pass, each refusal, and the limits.
    let codes: Vec<_> = seen[0].iter().map(|s| s.1.as_deref()).collect();
    assert_eq!(
        codes,
        [
            None,
            Some("missing_key"),
            Some("revoked_key"),
            Some("ip_not_allowed"),
            Some("ip_not_allowed"),
            Some("insufficient_scope"),
            Some("resource_forbidden"),
            Some("unknown_route"),
            // A public route still needs a key when the stack authenticates.
            Some("missing_key"),
            None,
            Some("quota_exceeded"),
            Some("quota_exceeded"),
            Some("rate_limited"),
        ]
    );
}

#[tokio::test]
async fn fused_checks_write_one_line_per_rate_limit_field() {
    let w = world().await;
    let search = "/collections/tenant-a/points/search";
    let mut lines = Vec::new();
    for fused in [false, true] {
        let svc = stack(&w, fused, &MemorySink::new(), Arc::new(AtomicUsize::new(0)));
        let res = svc
            .oneshot(request("POST", search, Some(&w.good), [198, 51, 100, 7]))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let count = |h: &str| res.headers().get_all(h).iter().count();
        lines.push((count("ratelimit-policy"), count("ratelimit"), members(&res)));
        w.clock.advance(Duration::from_secs(86_400));
    }
    // Separate layers: a line per layer; fused: one line each, the same members in the
    // same order (the quota, inner, first).
    assert_eq!((lines[0].0, lines[0].1), (2, 2));
    assert_eq!((lines[1].0, lines[1].1), (1, 1));
    assert_eq!(lines[0].2, lines[1].2);
    assert_eq!(
        lines[1].2,
        [
            r#""daily";q=2;w=86400"#,
            r#""burst";q=8;w=60"#,
            r#""daily";r=1;t=86400"#,
            r#""burst";r=7;t=8"#,
        ]
    );
}

/// A layer built without the hub (`QuotaLayer::new`, no configured clock) added to a fused
/// stack counts on the hub's clock; `with_gate` on a clone shares the clone's counters.
#[tokio::test]
async fn a_layer_added_to_a_stack_takes_the_hubs_clock_and_shares_its_counters() {
    let w = world().await;
    let search = "/collections/tenant-a/points/search";
    let ok = [198, 51, 100, 7];
    let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new())).unwrap();
    let fused: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(w.gate.stack().auth().quota(&quota))
            .service(inner(Arc::default()))
            .map_response(drop_body),
    );
    let separate: Svc = BoxCloneService::new(
        ServiceBuilder::new()
            .layer(w.gate.auth_layer())
            .layer(quota.clone().with_gate(&w.gate))
            .service(inner(Arc::default()))
            .map_response(drop_body),
    );
    let code = |seen: Seen| seen.1;
    let call = |svc: &Svc| {
        let svc = svc.clone();
        let req = request("POST", search, Some(&w.good), ok);
        async move { run(&svc, req).await }
    };
    // The daily quota of 2: used up through the fused stack...
    assert_eq!(code(call(&fused).await), None);
    assert_eq!(code(call(&fused).await), None);
    assert_eq!(code(call(&fused).await).as_deref(), Some("quota_exceeded"));
    // ...and so through the separate layer too (the same counters, the same day).
    assert_eq!(
        code(call(&separate).await).as_deref(),
        Some("quota_exceeded")
    );
    // A day later on the hub's clock, both count afresh: the windows follow the hub's
    // clock, not the system clock the layer would read alone.
    w.clock.advance(Duration::from_secs(86_400));
    assert_eq!(code(call(&fused).await), None);
    assert_eq!(code(call(&separate).await), None);
    assert_eq!(code(call(&fused).await).as_deref(), Some("quota_exceeded"));
}
