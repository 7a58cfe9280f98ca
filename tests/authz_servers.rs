//! `ScopeLayer` and `IpAllowLayer` over real loopback sockets: axum 0.8 (served with
//! `into_make_service_with_connect_info::<SocketAddr>()`), tonic 0.14 (the health service
//! behind `Server::builder().layer(..)`, the client address read from `TcpConnectInfo`) and
//! plain hyper 1 (the peer `SocketAddr` inserted per connection). Every denial asserts its
//! status and code, and that the handler was not called.
#![cfg(all(
    feature = "scope",
    feature = "ip-allow",
    feature = "axum",
    feature = "tonic"
))]

mod authz_support;
mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use authz_support::*;
use axum::extract::Path;
use axum::routing::{get, post, put};
use axum::{Extension, Router};
use common::Fixture;
use http::StatusCode;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{ApiKey, Authenticated, DenialCode, KeyGate};
use tonic::metadata::MetadataMap;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceBuilder;

use DenialCode::*;

const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;
const UNAUTHORIZED: StatusCode = StatusCode::UNAUTHORIZED;

async fn key(
    fx: &Fixture,
    name: &str,
    scopes: &[&str],
    resources: &[&str],
    edit: impl FnOnce(&mut keygate::KeyRecord),
) -> ApiKey {
    fx.issue_with(name, |r| {
        r.scopes = scopes.iter().map(|s| s.to_string()).collect();
        r.resources = resources.iter().map(|s| s.to_string()).collect();
        edit(r);
    })
    .await
}

fn tenant(t: &str) -> impl FnOnce(&mut keygate::KeyRecord) + '_ {
    move |r| {
        r.attributes.insert("tenant".into(), t.into());
    }
}

fn pinned(nets: &[&str]) -> impl FnOnce(&mut keygate::KeyRecord) {
    let nets: Vec<ipnet::IpNet> = nets
        .iter()
        .map(|n| keygate::client_ip::parse_network(n).expect("CIDR"))
        .collect();
    move |r| r.allowed_ips = nets
}

#[track_caller]
fn denied(
    out: &Outcome,
    status: StatusCode,
    code: DenialCode,
    before: usize,
    calls: &AtomicUsize,
    what: &str,
) {
    assert_denied(out, status, code, what);
    assert!(
        out.denial.is_none(),
        "the Denial extension does not travel over the wire"
    );
    assert_eq!(
        count(calls),
        before,
        "{what}: the handler was called on a denial"
    );
}

// ---------------------------------------------------------------------------------------
// axum
// ---------------------------------------------------------------------------------------

/// A Qdrant-like axum app: handlers count their calls and answer with the rows of the
/// caller's tenant, the collection, and the client address they saw.
fn qdrant_app(calls: Arc<AtomicUsize>) -> Router {
    let c1 = calls.clone();
    let c2 = calls.clone();
    let c3 = calls.clone();
    let c4 = calls;
    Router::new()
        .route(
            "/collections",
            get(move || {
                c1.fetch_add(1, Ordering::SeqCst);
                async { "collections" }
            }),
        )
        .route(
            "/collections/{collection}/points/search",
            post(
                move |Authenticated(p): Authenticated,
                      Path(collection): Path<String>,
                      ctx: Option<Extension<keygate::RequestContext>>| {
                    c2.fetch_add(1, Ordering::SeqCst);
                    let ip = ctx
                        .and_then(|Extension(c)| c.client_ip())
                        .map_or("none".to_owned(), |ip| ip.to_string());
                    async move { format!("{collection}|{}|{ip}", rows_of(p.tenant())) }
                },
            ),
        )
        .route(
            "/collections/{collection}/points",
            put(move |Path(collection): Path<String>| {
                c3.fetch_add(1, Ordering::SeqCst);
                async move { format!("upserted into {collection}") }
            }),
        )
        // In axum's router, not in the scope table.
        .route(
            "/cluster",
            get(move || {
                c4.fetch_add(1, Ordering::SeqCst);
                async { "cluster" }
            }),
        )
}

/// What, method, path, key, expected status and code.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Option<&'a str>,
    StatusCode,
    DenialCode,
);

fn qdrant_rules() -> RouteScopes {
    RouteScopes::builder()
        .route("GET", "/collections", "collections:read")
        .reads(
            "POST",
            ["/collections/{collection}/points/search"],
            "points:read",
        )
        .route("PUT", "/collections/{collection}/points", "points:write")
        .build()
        .expect("table")
}

#[tokio::test]
async fn axum_scope_table_over_loopback() {
    let fx = Fixture::new();
    let acme = key(
        &fx,
        "acme",
        &["points:read", "collections:read"],
        &["tenant-*"],
        tenant("acme"),
    )
    .await;
    let writer = key(&fx, "writer", &["points:write"], &["tenant-*"], |_| {}).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = qdrant_app(calls.clone())
        .layer(ScopeLayer::table(qdrant_rules()))
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum_with_peer(app).await;
    let a = Some(acme.expose_secret());
    let w = Some(writer.expose_secret());

    let before = count(&calls);
    let out = send(
        addr,
        "POST",
        "/collections/tenant%2Dacme/points/search",
        a,
        &[],
    )
    .await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text());
    assert_eq!(count(&calls), before + 1);
    // The handler saw the decoded collection the layer checked, and only acme's rows.
    assert_eq!(out.text(), "tenant-acme|a1,a2,a3|none");
    let out = send(addr, "PUT", "/collections/tenant-a/points", w, &[]).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(out.text(), "upserted into tenant-a");
    assert_eq!(count(&calls), before + 2);

    let cases: [Case<'_>; 7] = [
        (
            "writer searches",
            "POST",
            "/collections/tenant-a/points/search",
            w,
            FORBIDDEN,
            InsufficientScope,
        ),
        (
            "acme upserts",
            "PUT",
            "/collections/tenant-a/points",
            a,
            FORBIDDEN,
            InsufficientScope,
        ),
        (
            "other collection",
            "POST",
            "/collections/private/points/search",
            a,
            FORBIDDEN,
            ResourceForbidden,
        ),
        (
            "invalid UTF-8 collection",
            "POST",
            "/collections/%FF/points/search",
            a,
            FORBIDDEN,
            ResourceForbidden,
        ),
        (
            "route unknown to the table",
            "GET",
            "/cluster",
            a,
            StatusCode::NOT_FOUND,
            UnknownRoute,
        ),
        (
            "no key",
            "GET",
            "/collections",
            None,
            UNAUTHORIZED,
            MissingKey,
        ),
        (
            "bad key",
            "GET",
            "/collections",
            Some("kg_garbage"),
            UNAUTHORIZED,
            MalformedKey,
        ),
    ];
    for (what, method, path, k, status, code) in cases {
        let before = count(&calls);
        let out = send(addr, method, path, k, &[]).await;
        denied(&out, status, code, before, &calls, what);
        if code == InsufficientScope {
            let scope = out.json()["required_scope"]
                .as_str()
                .expect("required_scope")
                .to_owned();
            assert_challenge(&out, &scope_challenge(&scope), what);
        }
    }
}

#[tokio::test]
async fn axum_route_layer_require() {
    let fx = Fixture::new();
    let writer = key(&fx, "writer", &["points:write"], &[], |_| {}).await;
    let reader = key(&fx, "reader", &["points:read"], &[], |_| {}).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c1 = calls.clone();
    let c2 = calls.clone();
    let app = Router::new()
        .route(
            "/points",
            put(move || {
                c1.fetch_add(1, Ordering::SeqCst);
                async { "written" }
            })
            .route_layer(ScopeLayer::require("points:write").expect("scope")),
        )
        .route(
            "/points/search",
            post(move || {
                c2.fetch_add(1, Ordering::SeqCst);
                async { "found" }
            })
            .route_layer(ScopeLayer::require("points:read").expect("scope")),
        )
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum_with_peer(app).await;

    let out = send(addr, "PUT", "/points", Some(writer.expose_secret()), &[]).await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (StatusCode::OK, "written")
    );
    let out = send(
        addr,
        "POST",
        "/points/search",
        Some(reader.expose_secret()),
        &[],
    )
    .await;
    assert_eq!((out.status, out.text().as_str()), (StatusCode::OK, "found"));
    assert_eq!(count(&calls), 2);

    let out = send(addr, "PUT", "/points", Some(reader.expose_secret()), &[]).await;
    denied(
        &out,
        FORBIDDEN,
        InsufficientScope,
        2,
        &calls,
        "reader writes",
    );
    assert_challenge(&out, &scope_challenge("points:write"), "reader writes");
    assert_eq!(out.json()["required_scope"], "points:write");
    let out = send(
        addr,
        "POST",
        "/points/search",
        Some(writer.expose_secret()),
        &[],
    )
    .await;
    denied(
        &out,
        FORBIDDEN,
        InsufficientScope,
        2,
        &calls,
        "writer searches",
    );
    assert_challenge(&out, &scope_challenge("points:read"), "writer searches");
}

#[tokio::test]
async fn axum_scope_layer_alone_with_the_hub() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["*"], tenant("globex")).await;
    let calls = Arc::new(AtomicUsize::new(0));
    // No auth layer: the scope layer resolves the key through the hub, and the handler's
    // `Authenticated` extractor finds the principal it left.
    let app =
        qdrant_app(calls.clone()).layer(ScopeLayer::table(qdrant_rules()).with_gate(&fx.gate));
    let addr = spawn_axum_with_peer(app).await;
    let out = send(
        addr,
        "POST",
        "/collections/c/points/search",
        Some(reader.expose_secret()),
        &[],
    )
    .await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (StatusCode::OK, "c|g1|none")
    );
    let out = send(
        addr,
        "POST",
        "/collections/c/points/search",
        Some(&common::wrong_secret(&reader)),
        &[],
    )
    .await;
    denied(&out, UNAUTHORIZED, InvalidKey, 1, &calls, "wrong secret");
    let out = send(addr, "POST", "/collections/c/points/search", None, &[]).await;
    denied(&out, UNAUTHORIZED, MissingKey, 1, &calls, "no key");
}

#[tokio::test]
async fn axum_ip_lists_read_connect_info() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["*"], tenant("acme")).await;
    let elsewhere = key(
        &fx,
        "elsewhere",
        &["points:read"],
        &["*"],
        pinned(&["192.0.2.0/24"]),
    )
    .await;
    let local = key(
        &fx,
        "local",
        &["points:read"],
        &["*"],
        pinned(&["127.0.0.0/8", "::1"]),
    )
    .await;
    let path = "/collections/c/points/search";

    // Deny list with the loopback address.
    let calls = Arc::new(AtomicUsize::new(0));
    let app = qdrant_app(calls.clone())
        .layer(IpAllowLayer::new(
            IpPolicy::new().deny(["127.0.0.1"]).unwrap().per_key(false),
        ))
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum_with_peer(app).await;
    let out = send(addr, "POST", path, Some(reader.expose_secret()), &[]).await;
    denied(&out, FORBIDDEN, IpNotAllowed, 0, &calls, "denied loopback");
    // A client claiming another address changes nothing: no proxy is trusted.
    let out = send(
        addr,
        "POST",
        path,
        Some(reader.expose_secret()),
        &[("x-forwarded-for", "198.51.100.1")],
    )
    .await;
    denied(
        &out,
        FORBIDDEN,
        IpNotAllowed,
        0,
        &calls,
        "denied loopback, spoofed XFF",
    );

    // Allow list with the loopback network: the handler sees the ClientIp.
    let calls = Arc::new(AtomicUsize::new(0));
    let app = qdrant_app(calls.clone()).layer(
        IpAllowLayer::new(IpPolicy::new().allow(["127.0.0.0/8"]).unwrap()).with_gate(&fx.gate),
    );
    let addr = spawn_axum_with_peer(app).await;
    let out = send(addr, "POST", path, Some(reader.expose_secret()), &[]).await;
    assert_eq!(
        (out.status, out.text().as_str()),
        (StatusCode::OK, "c|a1,a2,a3|127.0.0.1")
    );
    let out = send(addr, "POST", path, Some(local.expose_secret()), &[]).await;
    assert_eq!(out.status, StatusCode::OK);
    assert_eq!(count(&calls), 2);
    // The key's own list.
    let out = send(addr, "POST", path, Some(elsewhere.expose_secret()), &[]).await;
    denied(
        &out,
        FORBIDDEN,
        IpNotAllowed,
        2,
        &calls,
        "key pinned elsewhere",
    );
    assert_eq!(
        out.json()["detail"],
        "This API key may not be used from this address."
    );
}

#[tokio::test]
async fn axum_without_connect_info_has_no_address() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["*"], |_| {}).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let app = qdrant_app(calls.clone()).layer(
        IpAllowLayer::new(IpPolicy::new().allow(["127.0.0.0/8"]).unwrap()).with_gate(&fx.gate),
    );
    // Served without `into_make_service_with_connect_info`: the layer cannot know the peer.
    let addr = keygate_testkit::serve::spawn_axum(app).await;
    let out = send(
        addr,
        "POST",
        "/collections/c/points/search",
        Some(reader.expose_secret()),
        &[],
    )
    .await;
    denied(&out, FORBIDDEN, IpNotAllowed, 0, &calls, "no ConnectInfo");
    assert_eq!(out.json()["detail"], "The client address is unknown.");
}

// ---------------------------------------------------------------------------------------
// plain hyper
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hyper_scope_and_ip_with_the_peer_per_connection() {
    let fx = Fixture::new();
    let acme = key(&fx, "acme", &["points:read"], &["tenant-*"], tenant("acme")).await;
    let pinned_away = key(
        &fx,
        "away",
        &["points:read"],
        &["*"],
        pinned(&["192.0.2.0/24"]),
    )
    .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let stack = |gate: &KeyGate, policy: IpPolicy, calls: Arc<AtomicUsize>| {
        ServiceBuilder::new()
            .layer(gate.auth_layer())
            .layer(ScopeLayer::table(qdrant_rules()))
            .layer(IpAllowLayer::new(policy))
            .service(probe::<hyper::body::Incoming>(calls))
    };
    let addr = spawn_hyper(
        stack(
            &fx.gate,
            IpPolicy::new().allow(["127.0.0.0/8"]).unwrap(),
            calls.clone(),
        ),
        true,
    )
    .await;
    let path = "/collections/tenant-a/points/search";

    let out = send(addr, "POST", path, Some(acme.expose_secret()), &[]).await;
    assert_eq!(out.status, StatusCode::OK, "{}", out.text());
    assert_eq!(out.text(), "a1,a2,a3");
    assert_eq!(out.header(SEEN_TENANT), Some("acme"));
    assert_eq!(out.seen_ip(), Some("127.0.0.1".parse().unwrap()));
    assert_eq!(count(&calls), 1);
    for (what, method, p, k, status, code) in [
        (
            "scope",
            "PUT",
            "/collections/tenant-a/points",
            Some(acme.expose_secret()),
            FORBIDDEN,
            InsufficientScope,
        ),
        (
            "resource",
            "POST",
            "/collections/other/points/search",
            Some(acme.expose_secret()),
            FORBIDDEN,
            ResourceForbidden,
        ),
        (
            "key pinned elsewhere",
            "POST",
            path,
            Some(pinned_away.expose_secret()),
            FORBIDDEN,
            IpNotAllowed,
        ),
        ("no key", "POST", path, None, UNAUTHORIZED, MissingKey),
    ] {
        let out = send(addr, method, p, k, &[]).await;
        denied(&out, status, code, 1, &calls, what);
    }

    // A deny list with the loopback address.
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_hyper(
        stack(
            &fx.gate,
            IpPolicy::new().deny(["127.0.0.1"]).unwrap(),
            calls.clone(),
        ),
        true,
    )
    .await;
    let out = send(addr, "POST", path, Some(acme.expose_secret()), &[]).await;
    denied(&out, FORBIDDEN, IpNotAllowed, 0, &calls, "denied loopback");

    // Without the per-connection SocketAddr, the address is unknown: denied, never allowed.
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_hyper(
        stack(
            &fx.gate,
            IpPolicy::new().allow(["127.0.0.0/8"]).unwrap(),
            calls.clone(),
        ),
        false,
    )
    .await;
    let out = send(
        addr,
        "POST",
        path,
        Some(acme.expose_secret()),
        &[("x-forwarded-for", "127.0.0.1")],
    )
    .await;
    denied(&out, FORBIDDEN, IpNotAllowed, 0, &calls, "no peer recorded");
    assert_eq!(out.json()["detail"], "The client address is unknown.");
}

// ---------------------------------------------------------------------------------------
// tonic
// ---------------------------------------------------------------------------------------

/// Serves tonic's health service on 127.0.0.1 behind the given layers (outermost first)
/// and a counter of the requests that reach it; evaluates to the address.
macro_rules! spawn_tonic {
    ($calls:expr, $($layer:expr),+ $(,)?) => {{
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (reporter, health) = tonic_health::server::health_reporter();
        let calls: Arc<AtomicUsize> = $calls;
        let counter = tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            req
        });
        let server = tonic::transport::Server::builder()
            $(.layer($layer))+
            .layer(counter)
            .add_service(health)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        tokio::spawn(async move {
            let _reporter = reporter;
            server.await.expect("tonic server");
        });
        addr
    }};
}

async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

/// One health check with `key` in `x-api-key`.
async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    key: Option<&str>,
) -> Result<ServingStatus, tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(key) = key {
        let mut md = MetadataMap::new();
        md.insert("x-api-key", key.parse().expect("ASCII key"));
        *req.metadata_mut() = md;
    }
    client.check(req).await.map(|r| r.into_inner().status())
}

#[track_caller]
fn grpc_denied(
    result: Result<ServingStatus, tonic::Status>,
    code: tonic::Code,
    denial: DenialCode,
    before: usize,
    calls: &AtomicUsize,
    what: &str,
) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        status.message().starts_with(denial.as_str()),
        "{what}: {:?}",
        status.message()
    );
    assert_eq!(
        count(calls),
        before,
        "{what}: the service was called on a denial"
    );
}

#[tokio::test]
async fn tonic_ip_lists_read_tcp_connect_info() {
    let fx = Fixture::new();
    // A global deny list with the loopback address.
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic!(
        calls.clone(),
        IpAllowLayer::new(IpPolicy::new().deny(["127.0.0.1"]).unwrap().per_key(false))
    );
    let mut client = health_client(addr).await;
    grpc_denied(
        check(&mut client, None).await,
        tonic::Code::PermissionDenied,
        IpNotAllowed,
        0,
        &calls,
        "denied loopback",
    );

    // An allow list with it: passes only if the layer read the address tonic recorded.
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic!(
        calls.clone(),
        IpAllowLayer::new(
            IpPolicy::new()
                .allow(["127.0.0.0/8", "::1"])
                .unwrap()
                .per_key(false)
        )
    );
    let mut client = health_client(addr).await;
    assert_eq!(
        check(&mut client, None).await.expect("allowed"),
        ServingStatus::Serving
    );
    assert_eq!(count(&calls), 1);

    // Keys' own lists, resolved through the hub without the auth layer.
    let here = key(&fx, "here", &[], &[], pinned(&["127.0.0.1"])).await;
    let away = key(&fx, "away", &[], &[], pinned(&["192.0.2.0/24"])).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic!(
        calls.clone(),
        IpAllowLayer::new(IpPolicy::new()).with_gate(&fx.gate)
    );
    let mut client = health_client(addr).await;
    assert_eq!(
        check(&mut client, Some(here.expose_secret()))
            .await
            .expect("here"),
        ServingStatus::Serving
    );
    assert_eq!(count(&calls), 1);
    grpc_denied(
        check(&mut client, Some(away.expose_secret())).await,
        tonic::Code::PermissionDenied,
        IpNotAllowed,
        1,
        &calls,
        "key pinned elsewhere",
    );
    grpc_denied(
        check(&mut client, None).await,
        tonic::Code::Unauthenticated,
        MissingKey,
        1,
        &calls,
        "no key",
    );
}

#[tokio::test]
async fn tonic_scope_table_with_a_grpc_rule() {
    let fx = Fixture::new();
    let with = key(&fx, "with", &["health:read"], &[], |_| {}).await;
    let without = key(&fx, "without", &["points:read"], &["*"], |_| {}).await;
    let wildcard = key(&fx, "wildcard", &["*:read"], &[], |_| {}).await;
    let rules = RouteScopes::builder()
        .grpc("/grpc.health.v1.Health/Check", "health:read")
        .build()
        .expect("table");
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic!(
        calls.clone(),
        fx.gate.auth_layer(),
        ScopeLayer::table(rules)
    );
    let mut client = health_client(addr).await;

    grpc_denied(
        check(&mut client, Some(without.expose_secret())).await,
        tonic::Code::PermissionDenied,
        InsufficientScope,
        0,
        &calls,
        "key without health:read",
    );
    assert_eq!(
        check(&mut client, Some(with.expose_secret()))
            .await
            .expect("with"),
        ServingStatus::Serving
    );
    assert_eq!(
        check(&mut client, Some(wildcard.expose_secret()))
            .await
            .expect("*:read"),
        ServingStatus::Serving
    );
    assert_eq!(count(&calls), 2);
    grpc_denied(
        check(&mut client, None).await,
        tonic::Code::Unauthenticated,
        MissingKey,
        2,
        &calls,
        "no key",
    );
    grpc_denied(
        check(&mut client, Some("kg_garbage")).await,
        tonic::Code::Unauthenticated,
        MalformedKey,
        2,
        &calls,
        "bad key",
    );

    // Both layers at once, the scope layer resolving through the hub (no auth layer).
    let rules = RouteScopes::builder()
        .grpc("/grpc.health.v1.Health/Check", "health:read")
        .build()
        .expect("table");
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic!(
        calls.clone(),
        ScopeLayer::table(rules).with_gate(&fx.gate),
        IpAllowLayer::new(IpPolicy::new().allow(["127.0.0.0/8", "::1"]).unwrap())
            .with_gate(&fx.gate),
    );
    let mut client = health_client(addr).await;
    assert_eq!(
        check(&mut client, Some(with.expose_secret()))
            .await
            .expect("with"),
        ServingStatus::Serving
    );
    grpc_denied(
        check(&mut client, Some(without.expose_secret())).await,
        tonic::Code::PermissionDenied,
        InsufficientScope,
        1,
        &calls,
        "both layers, no scope",
    );
}
