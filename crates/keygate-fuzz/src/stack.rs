//! The whole stack: request sequences through the six layers over an in-memory store,
//! checked against a plain reference model of the policies, in several layer orders.
//!
//! [`build_stack`] is the one place the layers are assembled.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use arbitrary::{Arbitrary, Unstructured};
use axum::body::Body;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use ipnet::IpNet;
use keygate::core::audit::{AuditEvent, Auditor, Decision, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    ApiKey, Denial, KeyGate, KeyRecord, KeyStore, ManualClock, MemoryStore, Prefix, QuotaPolicy,
    QuotaWindow, RateLimitPolicy, Verifier,
};
use keygate::{DenialCode, KeyStatus};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

/// The stack as one boxed service answering `Response<Body>`.
pub type Stack = BoxCloneService<Request<Body>, Response<Body>, Infallible>;

/// The order of the three access layers between the audit layer (outermost) and the rate
/// limit and quota layers (innermost, in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Auth, then addresses, then scopes (the documented order).
    AuthIpScope,
    /// Scopes, then addresses, then auth.
    ScopeIpAuth,
    /// Addresses, then auth, then scopes.
    IpAuthScope,
}

/// Every order the fuzzer compares.
pub const ORDERS: [Order; 3] = [Order::AuthIpScope, Order::ScopeIpAuth, Order::IpAuthScope];

/// What the stack is built from: the hub and its clock, the audit sink, the route table.
pub struct World {
    /// The hub (verifier over the in-memory store, manual clock).
    pub gate: KeyGate,
    /// The clock every layer reads.
    pub clock: ManualClock,
    /// Where the audit layer records.
    pub sink: MemorySink,
    /// The plaintext keys, by [`KEYS`] index.
    pub keys: Vec<ApiKey>,
    /// The stored records, by [`KEYS`] index.
    pub records: Vec<KeyRecord>,
}

/// The denied network of the global address policy.
const DENIED_NET: &str = "203.0.113.0/24";
/// The network the `narrow` key is allowed from.
const KEY_NET: &str = "198.51.100.0/24";

/// The keys of the world, by role.
pub const KEYS: &[&str] = &[
    "reader",
    "admin",
    "expiring",
    "revoked",
    "disabled",
    "scopeless",
    "narrow",
];

/// The showcase's Qdrant route table.
pub fn rules() -> RouteScopes {
    let mut b = RouteScopes::builder();
    for (m, p, s) in ROUTES {
        b = b.route(m, p, s);
    }
    b.build().expect("valid rules")
}

const ROUTES: &[(&str, &str, &str)] = &[
    ("GET", "/collections", "collections:read"),
    ("GET", "/collections/{collection}", "collections:read"),
    ("PUT", "/collections/{collection}", "collections:manage"),
    ("DELETE", "/collections/{collection}", "collections:manage"),
    ("PUT", "/collections/{collection}/points", "points:write"),
    (
        "GET",
        "/collections/{collection}/points/{id}",
        "points:read",
    ),
    (
        "POST",
        "/collections/{collection}/points/search",
        "points:read",
    ),
    (
        "POST",
        "/collections/{collection}/points/delete",
        "points:write",
    ),
];

impl World {
    /// A fresh world: a new store with one key per [`KEYS`] role.
    pub async fn new() -> World {
        let clock = ManualClock::at_2026();
        let store = MemoryStore::new();
        let gate = KeyGate::new(
            Verifier::builder(store.clone())
                .clock(clock.clone())
                .build(),
        );
        let now = keygate::Clock::now(&clock);
        let mut keys = Vec::new();
        let mut records = Vec::new();
        for role in KEYS {
            let (key, mut r) =
                KeyRecord::generate(&Prefix::default(), gate.verifier().hasher(), *role, now)
                    .expect("rng");
            r.scopes = vec!["points:read".into(), "collections:read".into()];
            r.resources = vec!["docs".into(), "docs-*".into()];
            match *role {
                "admin" => {
                    r.scopes = vec!["*".into()];
                    r.resources = vec!["*".into()];
                    r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 3)];
                    r.quotas = vec![QuotaPolicy::new("hourly", 5, QuotaWindow::Hour)];
                }
                "expiring" => r.expires_at = Some(now + Duration::from_secs(600)),
                "revoked" => r.status = KeyStatus::Revoked,
                "disabled" => r.status = KeyStatus::Disabled,
                "scopeless" => r.scopes.clear(),
                "narrow" => r.allowed_ips = vec![KEY_NET.parse().expect("cidr")],
                _ => {}
            }
            store.insert(&r).await.expect("insert");
            keys.push(key);
            records.push(r);
        }
        World {
            gate,
            clock,
            sink: MemorySink::new(),
            keys,
            records,
        }
    }
}

async fn ok(_req: Request<Body>) -> Result<Response<Body>, Infallible> {
    Ok(Response::new(Body::from("ok")))
}

/// The six layers over a handler answering 200, in `order`, all from one hub. The one
/// place the stack is assembled.
pub fn build_stack(world: &World, order: Order) -> Stack {
    let g = &world.gate;
    let audit = g.audit_layer(Auditor::direct(world.sink.clone()));
    let auth = g.auth_layer();
    let ip = IpAllowLayer::new(IpPolicy::new().deny([DENIED_NET]).expect("cidr")).with_gate(g);
    let scope = ScopeLayer::table(rules()).with_gate(g);
    let rate = RateLimitLayer::new(
        RateLimitConfig::new()
            .headers(true)
            .clock(LimiterClock::manual(world.clock.clone())),
    )
    .expect("rate limit config")
    .with_gate(g);
    let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))
        .expect("quota")
        .with_gate(g);
    let tail = ServiceBuilder::new()
        .layer(rate)
        .layer(quota)
        .service_fn(ok)
        .map_response(|r| r.map(Body::new));
    let tail = BoxCloneService::new(tail);
    let access: Stack = match order {
        Order::AuthIpScope => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(auth)
                .layer(ip)
                .layer(scope)
                .service(tail)
                .map_response(|r| r.map(Body::new)),
        ),
        Order::ScopeIpAuth => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(scope)
                .layer(ip)
                .layer(auth)
                .service(tail)
                .map_response(|r| r.map(Body::new)),
        ),
        Order::IpAuthScope => BoxCloneService::new(
            ServiceBuilder::new()
                .layer(ip)
                .layer(auth)
                .layer(scope)
                .service(tail)
                .map_response(|r| r.map(Body::new)),
        ),
    };
    BoxCloneService::new(
        ServiceBuilder::new()
            .layer(audit)
            .service(access)
            .map_response(|r| r.map(Body::new)),
    )
}

#[derive(Debug, Arbitrary)]
enum Cred {
    None,
    Bearer(u8),
    Header(u8),
    Both(u8, u8),
    Query(u8),
    LowerBearer(u8),
    /// A well-formed key with one secret character changed (valid checksum recomputed).
    WrongSecret(u8),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum PathIn {
    Route(u8, u8, u8),
    Raw(String),
}

#[derive(Debug, Arbitrary)]
struct Req {
    method: u8,
    path: PathIn,
    cred: Cred,
    peer: u8,
    headers: Vec<(u8, Vec<u8>)>,
    /// Seconds the clock moves before the request.
    step: u16,
}

const METHODS: &[Method] = &[
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::HEAD,
];
const COLLECTIONS: &[&str] = &[
    "docs",
    "docs-1",
    "other",
    "%64ocs",
    "docs%2F..",
    "%FF",
    "d%C3%A9",
];
const PEERS: &[Option<IpAddr>] = &[
    Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7))),
    Some(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5))),
    Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
    Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    Some(IpAddr::V6(Ipv6Addr::new(
        0, 0, 0, 0, 0, 0xffff, 0xc633, 0x6407,
    ))),
    None,
];
const EXTRA: &[&str] = &[
    "x-forwarded-for",
    "forwarded",
    "x-request-id",
    "authorization",
    "x-api-key",
    "cookie",
];

/// The credential a request carries, as the reference sees it.
#[derive(Debug, Clone)]
enum Presented {
    Missing,
    Malformed,
    Unknown,
    Key(usize),
}

fn fix_checksum(text: &str) -> String {
    let parser = keygate::KeyParser::default();
    // Recompute the checksum the plain way: CRC32 of the head in base62.
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let head = &text[..text.len() - 6];
    let mut n = crc32fast::hash(head.as_bytes());
    let mut sum = [0u8; 6];
    for s in sum.iter_mut().rev() {
        *s = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    let out = format!("{head}{}", std::str::from_utf8(&sum).expect("ascii"));
    debug_assert!(parser.parse(&out).is_ok());
    out
}

/// One request's reference verdict: the set of denial codes the policies give (empty:
/// allowed, subject to the rate limit and quota bounds).
fn reference(
    world: &World,
    presented: &Presented,
    method: &Method,
    path: &str,
    peer: Option<IpAddr>,
) -> Vec<DenialCode> {
    let now = keygate::Clock::now(&world.clock);
    let record = match presented {
        Presented::Missing => return vec![DenialCode::MissingKey, DenialCode::IpNotAllowed],
        Presented::Malformed => return vec![DenialCode::MalformedKey, DenialCode::IpNotAllowed],
        Presented::Unknown => return vec![DenialCode::InvalidKey, DenialCode::IpNotAllowed],
        Presented::Key(i) => &world.records[*i],
    };
    let auth = match record.status {
        KeyStatus::Revoked => Some(DenialCode::RevokedKey),
        KeyStatus::Disabled => Some(DenialCode::DisabledKey),
        _ if record.expires_at.is_some_and(|e| now >= e) => Some(DenialCode::ExpiredKey),
        _ => None,
    };
    if let Some(code) = auth {
        return vec![code, DenialCode::IpNotAllowed];
    }
    let mut codes = Vec::new();
    let denied: IpNet = DENIED_NET.parse().expect("cidr");
    let ip_ok = peer.is_some_and(|ip| {
        let ip = ip.to_canonical();
        !denied.contains(&ip)
            && (record.allowed_ips.is_empty() || record.allowed_ips.iter().any(|n| n.contains(&ip)))
    });
    if !ip_ok {
        codes.push(DenialCode::IpNotAllowed);
    }
    let table: Vec<(&str, Vec<crate::routes::Seg>, bool)> = ROUTES
        .iter()
        .map(|(m, p, _)| (*m, crate::routes::segments(p), false))
        .collect();
    let principal = keygate::Principal::from_record(record);
    match crate::routes::reference_match(&table, method.as_str(), path) {
        None => codes.push(DenialCode::UnknownRoute),
        Some((i, resource)) => {
            let scope = keygate::Scope::parse(ROUTES[i].2).expect("scope");
            if !principal.has_scope(&scope) {
                codes.push(DenialCode::InsufficientScope);
            } else if let Some(raw) = resource {
                let ok =
                    crate::routes::reference_decode(raw).is_some_and(|n| principal.can_access(&n));
                if !ok {
                    codes.push(DenialCode::ResourceForbidden);
                }
            }
        }
    }
    codes
}

fn documented_status(code: DenialCode) -> StatusCode {
    match code {
        DenialCode::InsufficientScope
        | DenialCode::ResourceForbidden
        | DenialCode::IpNotAllowed => StatusCode::FORBIDDEN,
        DenialCode::RateLimited | DenialCode::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
        DenialCode::CostExceedsLimit => StatusCode::PAYLOAD_TOO_LARGE,
        DenialCode::UnknownRoute => StatusCode::NOT_FOUND,
        DenialCode::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    }
}

/// What one stack answered to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    status: StatusCode,
    denial: Option<DenialCode>,
}

/// A sequence of up to 12 requests through the stack in three layer orders (auth-ip-scope,
/// scope-ip-auth, ip-auth-scope; each over its own fresh world), checked against the
/// reference model.
pub fn stack(data: &[u8]) {
    let Ok(reqs) = Vec::<Req>::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let reqs: Vec<Req> = reqs.into_iter().take(12).collect();
    check(&reqs);
}

/// Runs `reqs` through every order, checking every invariant; answers the outcomes of the
/// first order.
fn check(reqs: &[Req]) -> Vec<Outcome> {
    crate::block_on(async {
        let mut per_order: Vec<Vec<Outcome>> = Vec::new();
        for order in ORDERS {
            let world = World::new().await;
            let svc = build_stack(&world, order);
            per_order.push(run(&world, svc, reqs).await);
        }
        for (o, outcomes) in per_order.iter().enumerate().skip(1) {
            for (i, (a, b)) in per_order[0].iter().zip(outcomes).enumerate() {
                assert_eq!(
                    a.denial.is_none(),
                    b.denial.is_none(),
                    "request {i} ({:?}) decided differently in order {:?}: {a:?} vs {b:?}",
                    reqs[i],
                    ORDERS[o]
                );
            }
        }
        per_order.swap_remove(0)
    })
}

async fn run(world: &World, svc: Stack, reqs: &[Req]) -> Vec<Outcome> {
    let secrets: Vec<String> = world
        .keys
        .iter()
        .map(|k| k.expose_secret().to_owned())
        .collect();
    let mut outcomes = Vec::new();
    // Per key: the time of its first allowed request and the allowed count; per (key, hour).
    let mut rate: HashMap<usize, (SystemTime, u64)> = HashMap::new();
    let mut hourly: HashMap<(usize, u64), u64> = HashMap::new();
    for r in reqs {
        world
            .clock
            .advance(Duration::from_secs(u64::from(r.step % 1200)));
        let now = keygate::Clock::now(&world.clock);
        let method = METHODS[usize::from(r.method) % METHODS.len()].clone();
        let uri = match &r.path {
            PathIn::Route(i, c, id) => {
                let (_, p, _) = ROUTES[usize::from(*i) % ROUTES.len()];
                p.replace(
                    "{collection}",
                    COLLECTIONS[usize::from(*c) % COLLECTIONS.len()],
                )
                .replace("{id}", &id.to_string())
            }
            PathIn::Raw(s) => s.clone(),
        };
        let Ok(mut req) = Request::builder()
            .method(method.clone())
            .uri(&uri)
            .body(Body::empty())
        else {
            continue;
        };
        let key_at = |i: &u8| usize::from(*i) % world.keys.len();
        let mut presented = Presented::Missing;
        let mut unknown_credential = false;
        let set = |req: &mut Request<Body>, name: &str, value: String| {
            if let Ok(v) = HeaderValue::from_str(&value) {
                req.headers_mut()
                    .append(HeaderName::from_bytes(name.as_bytes()).expect("name"), v);
            }
        };
        match &r.cred {
            Cred::None => {}
            Cred::Bearer(i) | Cred::LowerBearer(i) => {
                let scheme = if matches!(r.cred, Cred::Bearer(_)) {
                    "Bearer"
                } else {
                    "bearer"
                };
                set(
                    &mut req,
                    "authorization",
                    format!("{scheme} {}", secrets[key_at(i)]),
                );
                presented = Presented::Key(key_at(i));
            }
            Cred::Header(i) => {
                set(&mut req, "x-api-key", secrets[key_at(i)].clone());
                presented = Presented::Key(key_at(i));
            }
            Cred::Both(a, b) => {
                set(
                    &mut req,
                    "authorization",
                    format!("Bearer {}", secrets[key_at(a)]),
                );
                set(&mut req, "x-api-key", secrets[key_at(b)].clone());
                presented = if key_at(a) == key_at(b) {
                    Presented::Key(key_at(a))
                } else {
                    Presented::Malformed
                };
            }
            Cred::Query(i) => {
                // Keys are not read from the query here: the request has no credential.
                let sep = if uri.contains('?') { '&' } else { '?' };
                let Ok(u) = format!("{uri}{sep}api_key={}", secrets[key_at(i)]).parse() else {
                    continue;
                };
                *req.uri_mut() = u;
            }
            Cred::WrongSecret(i) => {
                let s = &secrets[key_at(i)];
                let mut b = s.clone().into_bytes();
                let at = 3 + 12 + usize::from(*i) % 22;
                b[at] = if b[at] == b'A' { b'B' } else { b'A' };
                let wrong = fix_checksum(std::str::from_utf8(&b).expect("ascii"));
                set(&mut req, "authorization", format!("Bearer {wrong}"));
                presented = Presented::Unknown;
            }
            Cred::Raw(bytes) => {
                if let Ok(v) = HeaderValue::from_bytes(bytes) {
                    req.headers_mut().append("authorization", v);
                    unknown_credential = true;
                }
            }
        }
        let mut extra_credential = unknown_credential;
        for (n, v) in r.headers.iter().take(4) {
            let name = EXTRA[usize::from(*n) % EXTRA.len()];
            if let Ok(v) = HeaderValue::from_bytes(v) {
                extra_credential |= name == "authorization" || name == "x-api-key";
                req.headers_mut().append(name, v);
            }
        }
        let path = req.uri().path().to_owned();
        let peer = PEERS[usize::from(r.peer) % PEERS.len()];
        if let Some(ip) = peer {
            let addr = SocketAddr::new(ip, 40_000);
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(addr));
        }
        let events_before = world.sink.len();
        let res = svc.clone().oneshot(req).await.expect("infallible");
        let status = res.status();
        let denial = res.extensions().get::<Denial>().map(Denial::code);
        let head = format!("{:?}", res.headers());
        let body = res
            .into_body()
            .collect()
            .await
            .expect("in-memory body")
            .to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        for s in &secrets {
            assert!(
                !head.contains(s.as_str()) && !body.contains(s.as_str()),
                "a key in a response"
            );
        }
        // Exactly one audit event, naming the same decision, and no key in it.
        let events = world.sink.events();
        assert_eq!(
            events.len(),
            events_before + 1,
            "one audit event per request"
        );
        let event = match &events[events_before] {
            AuditEvent::Request(e) => e.clone(),
            other => panic!("not a request event: {other:?}"),
        };
        let text = serde_json::to_string(&event).expect("serializes");
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "a key in an audit event");
        }
        assert_eq!(event.status, Some(status.as_u16()));
        match denial {
            None => {
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "an allowed request reaches the handler"
                );
                assert!(matches!(event.decision, Decision::Allowed), "{event:?}");
                assert_eq!(event.denial, None);
            }
            Some(code) => {
                assert!(
                    status != StatusCode::SERVICE_UNAVAILABLE,
                    "503 from an in-memory store"
                );
                assert_eq!(status, documented_status(code.public()), "{code:?}");
                assert!(!matches!(event.decision, Decision::Allowed), "{event:?}");
                assert_eq!(event.denial, Some(code), "the audit event's code");
            }
        }
        assert!(!status.is_server_error());
        // The reference, unless extra headers may have added or spoiled a credential.
        if !extra_credential {
            let want = reference(world, &presented, &method, &path, peer);
            match denial {
                None => assert!(
                    want.is_empty(),
                    "allowed, but the reference denies {want:?}: {r:?}"
                ),
                Some(code) if want.is_empty() => assert!(
                    matches!(code, DenialCode::RateLimited | DenialCode::QuotaExceeded),
                    "denied {code:?}, but the reference allows: {r:?}"
                ),
                Some(code) => assert!(
                    want.contains(&code),
                    "denied {code:?}, the reference says {want:?}: {r:?}"
                ),
            }
        }
        if denial.is_none() {
            if let Presented::Key(k) = presented {
                if let Some(policy) = world.records[k].rate_limits.first() {
                    let e = rate.entry(k).or_insert((now, 0));
                    e.1 += 1;
                    let elapsed = now.duration_since(e.0).unwrap_or_default();
                    let refill = elapsed.as_secs() * u64::from(policy.limit)
                        / policy.period.as_secs().max(1);
                    assert!(
                        e.1 <= u64::from(policy.limit) + refill + 1,
                        "more requests than the rate limit allows"
                    );
                }
                if let Some(q) = world.records[k].quotas.first() {
                    let hour = now
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .expect("after 1970")
                        .as_secs()
                        / 3600;
                    let n = hourly.entry((k, hour)).or_insert(0);
                    *n += 1;
                    assert!(*n <= q.limit, "more requests than the quota allows");
                }
            }
        }
        outcomes.push(Outcome { status, denial });
    }
    outcomes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: u8, route: u8, collection: u8, cred: Cred, peer: u8, step: u16) -> Req {
        Req {
            method,
            path: PathIn::Route(route, collection, 7),
            cred,
            peer,
            headers: Vec::new(),
            step,
        }
    }

    #[test]
    fn the_model_allows_and_denies_what_the_stack_does() {
        // reader: search in docs from an allowed peer; then a collection it lacks; then
        // a wrong secret; then no key.
        let out = check(&[
            req(1, 6, 0, Cred::Bearer(0), 0, 0),
            req(1, 6, 2, Cred::Bearer(0), 0, 0),
            req(1, 6, 0, Cred::WrongSecret(0), 0, 0),
            req(1, 6, 0, Cred::None, 0, 0),
            req(1, 6, 0, Cred::Bearer(6), 2, 0),
        ]);
        let codes: Vec<Option<DenialCode>> = out.iter().map(|o| o.denial).collect();
        assert_eq!(
            codes,
            [
                None,
                Some(DenialCode::ResourceForbidden),
                Some(DenialCode::InvalidKey),
                Some(DenialCode::MissingKey),
                Some(DenialCode::IpNotAllowed),
            ]
        );
    }

    #[test]
    fn the_admin_key_meets_its_rate_limit_then_its_quota() {
        // Three at once pass (burst 3), the fourth is rate limited; after a minute, two
        // more pass and the quota (5 an hour) refuses the next.
        let mut reqs: Vec<Req> = (0..4)
            .map(|_| req(0, 0, 0, Cred::Bearer(1), 0, 0))
            .collect();
        reqs.push(req(0, 0, 0, Cred::Bearer(1), 0, 60));
        reqs.push(req(0, 0, 0, Cred::Bearer(1), 0, 0));
        reqs.push(req(0, 0, 0, Cred::Bearer(1), 0, 60));
        let codes: Vec<Option<DenialCode>> = check(&reqs).iter().map(|o| o.denial).collect();
        assert_eq!(
            &codes[..4],
            [None, None, None, Some(DenialCode::RateLimited)]
        );
        assert_eq!(&codes[4..6], [None, None]);
        assert_eq!(codes[6], Some(DenialCode::QuotaExceeded));
    }
}
