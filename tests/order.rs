//! Order-independence of keygate's layers (docs/ARCHITECTURE.md, "Order independence"): for every request
//! of a matrix that breaks at most one policy, every permutation of the layers gives the same
//! status, the same client-facing code and the same exact `Denial` code (a request costing
//! more than a rate limit or a quota allows at all included). Also: each layer
//! alone, built from the hub, reaches the same verdicts for what it checks; built without
//! the hub and without the auth layer, it fails closed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use keygate::audit::AuditLayer;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::cost::RequestHead;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    ApiKey, Clock, Denial, KeyGate, KeyRecord, KeyStatus, KeyStore, ManualClock, MemoryStore,
    Prefix, QuotaPolicy, QuotaWindow, RateLimitPolicy, Verifier,
};
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

type Body = BoxBody<Bytes, Infallible>;
type Svc = BoxCloneService<Request<()>, Response<Body>, Infallible>;

/// The layers under test. Each variant wraps a service; all are built from one hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Auth,
    Scope,
    Ip,
    Rate,
    Quota,
    Audit,
}

const ALL: [Kind; 6] = [
    Kind::Auth,
    Kind::Scope,
    Kind::Ip,
    Kind::Rate,
    Kind::Quota,
    Kind::Audit,
];

impl Kind {
    /// Whether the layer needs a principal (and so denies with the authentication verdict
    /// without one). The rate limiter limits anonymous callers by address instead, and
    /// quotas are per key: both pass requests without a principal on. Audit never rejects.
    fn needs_principal(self) -> bool {
        matches!(self, Kind::Auth | Kind::Scope | Kind::Ip)
    }
}

/// A cost read from a request header, so one request breaks one traffic policy on purpose.
fn header_cost(h: &RequestHead<'_>, name: &str) -> Option<u64> {
    h.headers().get(name)?.to_str().ok()?.parse().ok()
}

struct World {
    gate: KeyGate,
    clock: ManualClock,
    sink: MemorySink,
    rules: RouteScopes,
    ip: IpPolicy,
    good: ApiKey,
    revoked: ApiKey,
    disabled: ApiKey,
    expired: ApiKey,
    unknown: ApiKey,
    calls: Arc<AtomicUsize>,
}

fn boxed<S, B>(svc: S) -> Svc
where
    S: tower::Service<Request<()>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes, Error = Infallible> + Send + Sync + 'static,
{
    BoxCloneService::new(svc.map_response(|r| r.map(BodyExt::boxed)))
}

impl World {
    async fn new() -> World {
        let clock = ManualClock::at_2026();
        let store = MemoryStore::new();
        let verifier = Verifier::builder(store.clone())
            .clock(clock.clone())
            .build();
        let gate = KeyGate::new(verifier);
        let now = clock.now();
        let issue = |edit: &dyn Fn(&mut KeyRecord)| {
            let (key, mut record) =
                KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), "k", now)
                    .unwrap();
            record.scopes = vec!["points:read".into(), "collections:read".into()];
            record.resources = vec!["tenant-*".into()];
            record.allowed_ips = vec![
                "198.51.100.0/24".parse().unwrap(),
                "192.0.2.0/24".parse().unwrap(),
            ];
            record.quotas = vec![QuotaPolicy::new("daily", 1_000, QuotaWindow::Day)];
            edit(&mut record);
            (key, record)
        };
        let mut keys = Vec::new();
        for edit in [
            &(|_: &mut KeyRecord| {}) as &dyn Fn(&mut KeyRecord),
            &|r: &mut KeyRecord| r.status = KeyStatus::Revoked,
            &|r: &mut KeyRecord| r.status = KeyStatus::Disabled,
            &|r: &mut KeyRecord| r.expires_at = Some(now + Duration::from_secs(10)),
        ] {
            let (key, record) = issue(edit);
            store.insert(&record).await.unwrap();
            keys.push(key);
        }
        clock.advance(Duration::from_secs(60));
        let unknown = ApiKey::generate(&Prefix::default()).unwrap();
        let rules = RouteScopes::builder()
            .route(
                "POST",
                "/collections/{collection}/points/search",
                "points:read",
            )
            .route("PUT", "/collections/{collection}/points", "points:write")
            .build()
            .unwrap();
        let ip = IpPolicy::new().deny(["192.0.2.128/25"]).unwrap();
        let mut keys = keys.into_iter();
        World {
            gate,
            clock,
            sink: MemorySink::new(),
            rules,
            ip,
            good: keys.next().unwrap(),
            revoked: keys.next().unwrap(),
            disabled: keys.next().unwrap(),
            expired: keys.next().unwrap(),
            unknown,
            calls: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn bare(&self) -> Svc {
        let calls = self.calls.clone();
        boxed(tower::service_fn(move |_req: Request<()>| {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        }))
    }

    fn rate_config(&self) -> RateLimitConfig {
        RateLimitConfig::new()
            .clock(LimiterClock::manual(self.clock.clone()))
            .default_policies([RateLimitPolicy::per_minute("default", 1_000)])
            .anonymous_policies([RateLimitPolicy::per_minute("anonymous", 1_000)])
            .cost(|h| header_cost(h, "x-rate-cost").unwrap_or(1))
    }

    fn quota_config(&self) -> QuotaConfig {
        QuotaConfig::new(MemoryUsageStore::new())
            .clock(self.clock.clone())
            .cost(|h| header_cost(h, "x-quota-cost").unwrap_or(1))
    }

    /// Wraps `svc` in a fresh layer of `kind` (fresh counters for every stack).
    fn wrap(&self, kind: Kind, svc: Svc, with_gate: bool) -> Svc {
        let g = &self.gate;
        match (kind, with_gate) {
            (Kind::Audit, true) => {
                boxed(g.audit_layer(Auditor::direct(self.sink.clone())).layer(svc))
            }
            (Kind::Audit, false) => {
                boxed(AuditLayer::new(Auditor::direct(self.sink.clone())).layer(svc))
            }
            (Kind::Rate, true) => boxed(
                RateLimitLayer::new(self.rate_config())
                    .unwrap()
                    .with_gate(g)
                    .layer(svc),
            ),
            (Kind::Rate, false) => {
                boxed(RateLimitLayer::new(self.rate_config()).unwrap().layer(svc))
            }
            (Kind::Quota, true) => boxed(
                QuotaLayer::new(self.quota_config())
                    .unwrap()
                    .with_gate(g)
                    .layer(svc),
            ),
            (Kind::Quota, false) => boxed(QuotaLayer::new(self.quota_config()).unwrap().layer(svc)),
            (Kind::Auth, _) => boxed(g.auth_layer().layer(svc)),
            (Kind::Scope, true) => boxed(
                ScopeLayer::table(self.rules.clone())
                    .with_gate(g)
                    .layer(svc),
            ),
            (Kind::Scope, false) => boxed(ScopeLayer::table(self.rules.clone()).layer(svc)),
            (Kind::Ip, true) => boxed(IpAllowLayer::new(self.ip.clone()).with_gate(g).layer(svc)),
            (Kind::Ip, false) => boxed(IpAllowLayer::new(self.ip.clone()).layer(svc)),
        }
    }

    /// `order[0]` is outermost.
    fn stack(&self, order: &[Kind], with_gate: bool) -> Svc {
        order
            .iter()
            .rev()
            .fold(self.bare(), |svc, kind| self.wrap(*kind, svc, with_gate))
    }
}

/// One request of the matrix and what the full stack must answer.
struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    key: Option<String>,
    /// An extra request header (a cost).
    header: Option<(&'static str, &'static str)>,
    peer: [u8; 4],
    status: StatusCode,
    /// Client-facing code (`None` for success).
    code: Option<&'static str>,
    /// Exact code in the `Denial` extension.
    exact: Option<&'static str>,
    /// Which layer's policy the case breaks.
    breaks: Option<Kind>,
}

/// A case with an extra request header (a cost).
fn with_header(mut case: Case, name: &'static str, value: &'static str) -> Case {
    case.header = Some((name, value));
    case
}

fn cases(w: &World) -> Vec<Case> {
    let good = Some(w.good.expose_secret().to_owned());
    let search = "/collections/tenant-a/points/search";
    let ok_peer = [198, 51, 100, 7];
    let c = |name, method, path, key: Option<String>, peer, status, code, exact, breaks| Case {
        name,
        method,
        path,
        key,
        header: None,
        peer,
        status,
        code,
        exact,
        breaks,
    };
    use Kind::*;
    let u = StatusCode::UNAUTHORIZED;
    let f = StatusCode::FORBIDDEN;
    let p = StatusCode::PAYLOAD_TOO_LARGE;
    vec![
        // A request costing more than the rate limit's burst (1,000) or the whole quota
        // (1,000 a day): 413 cost_exceeds_limit from whichever layer it breaks.
        with_header(
            c(
                "cost above the rate limit",
                "POST",
                search,
                good.clone(),
                ok_peer,
                p,
                Some("cost_exceeds_limit"),
                Some("cost_exceeds_limit"),
                Some(Rate),
            ),
            "x-rate-cost",
            "1001",
        ),
        with_header(
            c(
                "cost above the quota",
                "POST",
                search,
                good.clone(),
                ok_peer,
                p,
                Some("cost_exceeds_limit"),
                Some("cost_exceeds_limit"),
                Some(Quota),
            ),
            "x-quota-cost",
            "1001",
        ),
        c(
            "allowed",
            "POST",
            search,
            good.clone(),
            ok_peer,
            StatusCode::OK,
            None,
            None,
            None,
        ),
        c(
            "no key",
            "POST",
            search,
            None,
            ok_peer,
            u,
            Some("missing_key"),
            Some("missing_key"),
            Some(Auth),
        ),
        c(
            "malformed",
            "POST",
            search,
            Some("kg_garbage".into()),
            ok_peer,
            u,
            Some("malformed_key"),
            Some("malformed_key"),
            Some(Auth),
        ),
        c(
            "unknown",
            "POST",
            search,
            Some(w.unknown.expose_secret().into()),
            ok_peer,
            u,
            Some("invalid_key"),
            Some("invalid_key"),
            Some(Auth),
        ),
        c(
            "revoked",
            "POST",
            search,
            Some(w.revoked.expose_secret().into()),
            ok_peer,
            u,
            Some("invalid_key"),
            Some("revoked_key"),
            Some(Auth),
        ),
        c(
            "disabled",
            "POST",
            search,
            Some(w.disabled.expose_secret().into()),
            ok_peer,
            u,
            Some("invalid_key"),
            Some("disabled_key"),
            Some(Auth),
        ),
        c(
            "expired",
            "POST",
            search,
            Some(w.expired.expose_secret().into()),
            ok_peer,
            u,
            Some("expired_key"),
            Some("expired_key"),
            Some(Auth),
        ),
        c(
            "missing scope",
            "PUT",
            "/collections/tenant-a/points",
            good.clone(),
            ok_peer,
            f,
            Some("insufficient_scope"),
            Some("insufficient_scope"),
            Some(Scope),
        ),
        // A route no rule knows does not exist (404), for a valid key in any order.
        c(
            "unmatched route",
            "GET",
            "/admin",
            good.clone(),
            ok_peer,
            StatusCode::NOT_FOUND,
            Some("unknown_route"),
            Some("unknown_route"),
            Some(Scope),
        ),
        c(
            "other collection",
            "POST",
            "/collections/private/points/search",
            good.clone(),
            ok_peer,
            f,
            Some("resource_forbidden"),
            Some("resource_forbidden"),
            Some(Scope),
        ),
        c(
            "key's ip list",
            "POST",
            search,
            good.clone(),
            [203, 0, 113, 5],
            f,
            Some("ip_not_allowed"),
            Some("ip_not_allowed"),
            Some(Ip),
        ),
        c(
            "global deny",
            "POST",
            search,
            good,
            [192, 0, 2, 200],
            f,
            Some("ip_not_allowed"),
            Some("ip_not_allowed"),
            Some(Ip),
        ),
    ]
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: StatusCode,
    code: Option<String>,
    exact: Option<&'static str>,
    called: bool,
}

async fn run(w: &World, svc: Svc, case: &Case) -> Outcome {
    let mut req = Request::builder().method(case.method).uri(case.path);
    if let Some(k) = &case.key {
        req = req.header("x-api-key", k);
    }
    if let Some((name, value)) = case.header {
        req = req.header(name, value);
    }
    let mut req = req.body(()).unwrap();
    req.extensions_mut()
        .insert(SocketAddr::from((case.peer, 40_000)));
    let before = w.calls.load(Ordering::SeqCst);
    let res = svc.oneshot(req).await.unwrap();
    let called = w.calls.load(Ordering::SeqCst) > before;
    let status = res.status();
    let exact = res.extensions().get::<Denial>().map(|d| d.code().as_str());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let code = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned));
    Outcome {
        status,
        code,
        exact,
        called,
    }
}

fn expected(case: &Case) -> Outcome {
    Outcome {
        status: case.status,
        code: case.code.map(str::to_owned),
        exact: case.exact,
        called: case.status == StatusCode::OK,
    }
}

/// Every permutation of `items` (Heap's algorithm).
fn permutations<T: Copy>(items: &[T]) -> Vec<Vec<T>> {
    fn heap<T: Copy>(k: usize, a: &mut Vec<T>, out: &mut Vec<Vec<T>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        heap(k - 1, a, out);
        for i in 0..k - 1 {
            if k.is_multiple_of(2) {
                a.swap(i, k - 1);
            } else {
                a.swap(0, k - 1);
            }
            heap(k - 1, a, out);
        }
    }
    let mut a = items.to_vec();
    let mut out = Vec::new();
    heap(a.len(), &mut a, &mut out);
    out
}

#[tokio::test]
async fn every_permutation_of_the_layers_gives_the_same_verdict() {
    let w = World::new().await;
    let perms = permutations(&ALL);
    assert_eq!(perms.len(), 720);
    let cases = cases(&w);
    let mut checked = 0;
    for order in &perms {
        let svc = w.stack(order, true);
        let audit_at = order.iter().position(|k| *k == Kind::Audit).unwrap_or(0);
        let outside = &order[..audit_at];
        for case in &cases {
            let got = run(&w, svc.clone(), case).await;
            assert_eq!(
                got,
                expected(case),
                "case {:?} with order {order:?}",
                case.name
            );
            // The audit layer records the request, with its exact code, whenever the request
            // reaches it: not when a layer outside it refused first (for an authentication
            // failure, any layer that needs a principal refuses it).
            let refused_outside = match case.breaks {
                None => false,
                Some(Kind::Auth) => outside.iter().any(|k| k.needs_principal()),
                Some(k) => outside.contains(&k),
            };
            let events = w.sink.take();
            assert_eq!(
                events.len(),
                usize::from(!refused_outside),
                "events for {:?} with {order:?}",
                case.name
            );
            for e in &events {
                let e = e.as_request().expect("a request event");
                assert_eq!(
                    e.denial.map(|c| c.as_str()),
                    case.exact,
                    "{:?} {order:?}",
                    case.name
                );
                assert_eq!(
                    e.status,
                    Some(case.status.as_u16()),
                    "{:?} {order:?}",
                    case.name
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 720 * cases.len());
}

#[tokio::test]
async fn standalone_layers_inside_the_auth_layer_agree_too() {
    // Layers built without the hub read the principal the auth layer resolved: with auth
    // outermost, any order of the others gives the same verdicts.
    let w = World::new().await;
    let cases = cases(&w);
    for rest in permutations(&ALL[1..]) {
        let mut order = vec![Kind::Auth];
        order.extend(rest);
        let svc = w.stack(&order, false);
        for case in &cases {
            let got = run(&w, svc.clone(), case).await;
            assert_eq!(
                got,
                expected(case),
                "case {:?} with order {order:?}",
                case.name
            );
        }
    }
}

#[tokio::test]
async fn each_layer_alone_with_the_hub_decides_what_it_checks() {
    let w = World::new().await;
    let cases = cases(&w);
    for kind in ALL {
        let svc = w.stack(&[kind], true);
        for case in &cases {
            let got = run(&w, svc.clone(), case).await;
            // A layer that needs a principal resolves it through the hub and denies with the
            // authentication verdict; policies of other layers are not its business.
            let want = match case.breaks {
                Some(k) if k == kind => expected(case),
                Some(Kind::Auth) if kind.needs_principal() => expected(case),
                _ => Outcome {
                    status: StatusCode::OK,
                    code: None,
                    exact: None,
                    called: true,
                },
            };
            assert_eq!(got, want, "case {:?} with {kind:?} alone", case.name);
        }
    }
}

#[tokio::test]
async fn traffic_layers_built_without_the_hub_still_limit() {
    // Without a principal the rate limiter limits by address and the quota layer passes the
    // request on (quotas are per key): neither needs the hub to enforce what it can.
    let w = World::new().await;
    let cases = cases(&w);
    for kind in [Kind::Rate, Kind::Quota, Kind::Audit] {
        let svc = w.stack(&[kind], false);
        for case in &cases {
            let got = run(&w, svc.clone(), case).await;
            let want = if kind == Kind::Rate && case.breaks == Some(Kind::Rate) {
                expected(case)
            } else {
                Outcome {
                    status: StatusCode::OK,
                    code: None,
                    exact: None,
                    called: true,
                }
            };
            assert_eq!(got, want, "case {:?} with standalone {kind:?}", case.name);
        }
    }
}

#[tokio::test]
async fn layers_built_without_the_hub_fail_closed_without_a_principal() {
    let w = World::new().await;
    let cases = cases(&w);
    for kind in [Kind::Scope, Kind::Ip] {
        let svc = w.stack(&[kind], false);
        for case in &cases {
            let got = run(&w, svc.clone(), case).await;
            // The global deny list needs no principal and is checked first.
            let want = if kind == Kind::Ip && case.name == "global deny" {
                expected(case)
            } else {
                Outcome {
                    status: StatusCode::UNAUTHORIZED,
                    code: Some("missing_key".into()),
                    exact: Some("missing_key"),
                    called: false,
                }
            };
            assert_eq!(got, want, "case {:?} with standalone {kind:?}", case.name);
        }
    }
}
