//! Hot-path benchmarks of authorization: `ScopeLayer` and `IpAllowLayer` on a hot (cached) key.
//!
//! Run with `cargo bench --bench authz --features scope,ip-allow` (quick form: append
//! `-- --warm-up-time 1 --measurement-time 3`). `cargo test --benches` runs each benchmark
//! once, as a smoke test.
//!
//! What is measured, all in one run so the differences mean something:
//!
//! - `authz/*`: one request through `tower::ServiceExt::oneshot` on a clone of the service
//!   (as axum does per request), the future polled once with `now_or_never` (everything
//!   completes on the first poll for a cached key). The same request for every variant,
//!   built outside the timed section (`iter_batched`): `POST
//!   /collections/tenant-acme/points/search` with the key in `x-api-key` and the peer
//!   address as a `SocketAddr` extension.
//!   - `bare`: a `service_fn` returning an empty response;
//!   - `auth`: behind `gate.auth_layer()` alone;
//!   - `auth+scope_require`: auth, then `ScopeLayer::require("points:read")`;
//!   - `auth+scope_table15`: auth, then a 15-rule Qdrant-like table; the request matches
//!     rule 14 (scanning 13 rules first) and its collection is checked against `tenant-*`;
//!   - `auth+ip`: auth, then `IpAllowLayer` with 3 global deny nets, 3 global allow nets and
//!     the key's own 3-net allowlist (IPv4 and IPv6 mixed);
//!   - `scope_table15_hub` / `ip_hub`: the layer alone, resolving the key through the hub.
//!
//!   The cost a layer adds is `auth+X` minus `auth` (medians).
//! - `resolved/*`: the same request already carrying the hot key's `Principal` (as behind
//!   the auth layer), through the bare service and through each layer alone (standalone,
//!   reading the principal): the layer's own cost without the auth layer's noise.
//! - `parts/*`: the pieces on their own: compiled scope and resource matching, and the
//!   client-address lookup (peer only, and behind a trusted proxy).
//!
//! The store holds 1,000 keys, all of them in the verifier's cache.

use std::convert::Infallible;
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use keygate::client_ip::{parse_network, TrustedProxies};
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    ApiKey, KeyGate, KeyRecord, KeyStore, Lookup, MemoryStore, Prefix, Principal, Verifier,
};
use keygate::{ResourceSet, Scope, ScopeSet};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

const KEYS: usize = 1_000;
const PATH: &str = "/collections/tenant-acme/points/search";
const PEER: ([u8; 4], u16) = ([198, 51, 100, 7], 5000);

struct Fixture {
    gate: KeyGate,
    hot: ApiKey,
    /// The hot key's principal, as the auth layer would leave it.
    principal: Principal,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let store = MemoryStore::new();
    // Long cache lifetimes so no entry goes stale mid-measurement.
    let verifier = Verifier::builder(store.clone())
        .refresh_after(Duration::from_secs(3600))
        .negative_ttl(Duration::from_secs(3600))
        .build();
    let prefix = Prefix::default();
    let mut hot = None;
    let mut principal = None;
    rt.block_on(async {
        for i in 0..KEYS {
            let (key, mut record) = KeyRecord::generate(
                &prefix,
                verifier.hasher(),
                format!("bench-{i}"),
                verifier.clock().now(),
            )
            .expect("generate key");
            record.scopes = vec!["points:read".into(), "collections:read".into()];
            record.resources = vec!["shared".into(), "tenant-*".into()];
            record.allowed_ips = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.0/24"]
                .iter()
                .map(|n| parse_network(n).expect("net"))
                .collect();
            store.insert(&record).await.expect("insert key");
            verifier
                .verify(key.expose_secret())
                .await
                .expect("fresh key verifies");
            if i == KEYS / 2 {
                hot = Some(key);
                principal = Some(Principal::from_record(&record));
            }
        }
    });
    let hot = hot.expect("hot key");
    assert!(matches!(
        verifier.lookup(hot.expose_secret()),
        Lookup::Done(Ok(_))
    ));
    Fixture {
        gate: KeyGate::new(verifier),
        hot,
        principal: principal.expect("hot principal"),
    }
}

fn table15() -> RouteScopes {
    let c = "/collections/{collection}";
    RouteScopes::builder()
        .route("GET", "/collections", "collections:read")
        .route("GET", c, "collections:read")
        .route("PUT", c, "collections:manage")
        .route("DELETE", c, "collections:manage")
        .route("PATCH", c, "collections:manage")
        .route("GET", &format!("{c}/exists"), "collections:read")
        .route("PUT", &format!("{c}/points"), "points:write")
        .route("POST", &format!("{c}/points/delete"), "points:write")
        .route("POST", &format!("{c}/points/payload"), "points:write")
        .reads(
            "POST",
            [
                format!("{c}/points"),
                format!("{c}/points/scroll"),
                format!("{c}/points/count"),
                format!("{c}/points/query"),
                format!("{c}/points/search"),
            ],
            "points:read",
        )
        .public("GET", "/healthz")
        .build()
        .expect("table")
}

fn ip_policy() -> IpPolicy {
    IpPolicy::new()
        .deny(["203.0.113.0/24", "2001:db8:bad::/48", "192.0.2.66"])
        .expect("deny")
        .allow(["198.51.100.0/24", "10.0.0.0/8", "2001:db8::/32"])
        .expect("allow")
}

fn request(key: &str) -> Request<Empty<Bytes>> {
    let mut req = Request::post(PATH)
        .header("x-api-key", key)
        .body(Empty::new())
        .expect("valid request");
    req.extensions_mut().insert(SocketAddr::from(PEER));
    req
}

async fn empty(_: Request<Empty<Bytes>>) -> Result<Response<Empty<Bytes>>, Infallible> {
    Ok(Response::new(Empty::new()))
}

/// Runs one variant: a fresh request per iteration, a clone of `svc` per request.
fn bench_stack<S, B>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    key: &str,
    svc: S,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
{
    bench_with(g, name, || request(key), svc)
}

/// Like [`bench_stack`], with requests made by `make`.
fn bench_with<S, B>(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    make: impl Fn() -> Request<Empty<Bytes>>,
    svc: S,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>, Error = Infallible> + Clone,
{
    // The variant must take the path it claims to measure: answered now, with 200.
    let res = svc
        .clone()
        .oneshot(make())
        .now_or_never()
        .expect("completes on the first poll")
        .expect("infallible");
    assert_eq!(res.status(), 200, "{name}");
    g.bench_function(name, |b| {
        b.iter_batched(
            &make,
            |req| svc.clone().oneshot(req).now_or_never(),
            BatchSize::SmallInput,
        )
    });
}

fn layer_benches(c: &mut Criterion, f: &Fixture) {
    let gate = &f.gate;
    let key = f.hot.expose_secret();
    let mut g = c.benchmark_group("authz");
    bench_stack(&mut g, "bare", key, service_fn(empty));
    bench_stack(
        &mut g,
        "auth",
        key,
        ServiceBuilder::new()
            .layer(gate.auth_layer())
            .service_fn(empty),
    );
    bench_stack(
        &mut g,
        "auth+scope_require",
        key,
        ServiceBuilder::new()
            .layer(gate.auth_layer())
            .layer(ScopeLayer::require("points:read").expect("scope"))
            .service_fn(empty),
    );
    bench_stack(
        &mut g,
        "auth+scope_table15",
        key,
        ServiceBuilder::new()
            .layer(gate.auth_layer())
            .layer(ScopeLayer::table(table15()))
            .service_fn(empty),
    );
    bench_stack(
        &mut g,
        "auth+ip",
        key,
        ServiceBuilder::new()
            .layer(gate.auth_layer())
            .layer(IpAllowLayer::new(ip_policy()))
            .service_fn(empty),
    );
    bench_stack(
        &mut g,
        "scope_table15_hub",
        key,
        ServiceBuilder::new()
            .layer(ScopeLayer::table(table15()).with_gate(gate))
            .service_fn(empty),
    );
    bench_stack(
        &mut g,
        "ip_hub",
        key,
        ServiceBuilder::new()
            .layer(IpAllowLayer::new(ip_policy()).with_gate(gate))
            .service_fn(empty),
    );
    g.finish();

    // The layers alone on a request that already carries the principal (as behind the auth
    // layer), against the bare service on the same request: the difference is the layer's
    // own cost, without the auth layer's.
    let mut g = c.benchmark_group("resolved");
    let resolved = || {
        let mut req = request(key);
        req.extensions_mut()
            .insert(keygate::RequestContext::authenticated(f.principal.clone()));
        req
    };
    bench_with(&mut g, "bare", resolved, service_fn(empty));
    bench_with(
        &mut g,
        "scope_require",
        resolved,
        ServiceBuilder::new()
            .layer(ScopeLayer::require("points:read").expect("scope"))
            .service_fn(empty),
    );
    bench_with(
        &mut g,
        "scope_table15",
        resolved,
        ServiceBuilder::new()
            .layer(ScopeLayer::table(table15()))
            .service_fn(empty),
    );
    bench_with(
        &mut g,
        "ip",
        resolved,
        ServiceBuilder::new()
            .layer(IpAllowLayer::new(ip_policy()))
            .service_fn(empty),
    );
    g.finish();
}

fn part_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("parts");
    let granted = ScopeSet::compile(["points:read", "collections:read", "keys:*", "*:list"]);
    let required = Scope::parse("points:read").expect("scope");
    let resources = ResourceSet::compile(["shared", "docs", "tenant-*"]);
    g.bench_function("scope_set_allows", |b| {
        b.iter(|| granted.allows(black_box(&required)))
    });
    g.bench_function("resource_set_allows_glob", |b| {
        b.iter(|| resources.allows(black_box("tenant-acme")))
    });
    let none = TrustedProxies::none();
    let proxies = TrustedProxies::new(["10.0.0.0/8"]).expect("proxies");
    let direct = request("k");
    let mut proxied = Request::get("/")
        .header("x-forwarded-for", "203.0.113.7, 10.1.1.1, 10.2.2.2")
        .body(())
        .expect("request");
    proxied
        .extensions_mut()
        .insert(SocketAddr::from(([10, 0, 0, 1], 443)));
    g.bench_function("client_ip_peer", |b| {
        b.iter(|| none.client_ip(black_box(&direct)))
    });
    g.bench_function("client_ip_xff_2_trusted_hops", |b| {
        b.iter(|| proxies.client_ip(black_box(&proxied)))
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    layer_benches(c, &f);
    part_benches(c);
}

criterion_group!(authz, benches);
criterion_main!(authz);
