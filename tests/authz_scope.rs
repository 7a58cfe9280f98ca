//! `ScopeLayer` in process (`ServiceBuilder` + `oneshot`): per-route `require`, route tables
//! (a Qdrant-like one), wildcard scopes, resource patterns, unmatched routes, the rendered
//! denials (HTTP and gRPC), attributes reaching the handler, and the layer with and without
//! the hub and the auth layer. Bad input (percent-encoding, slashes, long paths, odd gRPC
//! paths, invalid rules) is in `authz_scope_input.rs`.
#![cfg(feature = "scope")]

mod authz_support;
mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use authz_support::*;
use bytes::Bytes;
use common::Fixture;
use http::StatusCode;
use http_body_util::Full;
use keygate::scope::{RouteScopes, ScopeLayer, Unmatched};
use keygate::{ApiKey, DenialCode};
use tower::{ServiceBuilder, ServiceExt};

use DenialCode::*;

/// Issues a key with these scopes, collection patterns and attributes.
async fn key(
    fx: &Fixture,
    name: &str,
    scopes: &[&str],
    resources: &[&str],
    attributes: &[(&str, &str)],
) -> ApiKey {
    fx.issue_with(name, |r| {
        r.scopes = scopes.iter().map(|s| s.to_string()).collect();
        r.resources = resources.iter().map(|s| s.to_string()).collect();
        r.attributes = attributes
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    })
    .await
}

/// A Qdrant-like route table.
fn qdrant_table() -> RouteScopes {
    RouteScopes::builder()
        .public("GET", "/healthz")
        .route("GET", "/collections", "collections:read")
        .route("PUT", "/collections/{collection}", "collections:manage")
        .route("DELETE", "/collections/{collection}", "collections:manage")
        .route("PUT", "/collections/{collection}/points", "points:write")
        // Qdrant sends reads as POST.
        .reads(
            "POST",
            [
                "/collections/{collection}/points/search",
                "/collections/{collection}/points/query",
                "/collections/{collection}/points/scroll",
                "/collections/{collection}/points/count",
                // retrieve
                "/collections/{collection}/points",
            ],
            "points:read",
        )
        .grpc("/qdrant.Points/Search", "points:read")
        .build()
        .expect("valid table")
}

/// What a row expects.
#[derive(Debug, Clone, Copy)]
enum Want {
    Ok,
    Denied(StatusCode, DenialCode),
}

const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;
const UNAUTHORIZED: StatusCode = StatusCode::UNAUTHORIZED;

#[track_caller]
fn check(out: &Outcome, reached: bool, want: Want, what: &str) {
    match want {
        Want::Ok => {
            assert_allowed(out, what);
            assert!(reached, "{what}: the handler was not called");
        }
        Want::Denied(status, code) => {
            assert_denied(out, status, code, what);
            assert!(!reached, "{what}: the handler was called on a denial");
        }
    }
}

#[tokio::test]
async fn table_routes_need_their_scopes() {
    let fx = Fixture::new();
    let reader = key(
        &fx,
        "reader",
        &["points:read", "collections:read"],
        &["*"],
        &[],
    )
    .await;
    let writer = key(&fx, "writer", &["points:write"], &["*"], &[]).await;
    let manager = key(&fx, "manager", &["collections:manage"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));

    let r = Some(reader.expose_secret());
    let w = Some(writer.expose_secret());
    let m = Some(manager.expose_secret());
    let denied = Want::Denied(FORBIDDEN, InsufficientScope);
    let rows: Vec<(&str, Option<&str>, &str, &str, Want)> = vec![
        ("reader lists", r, "GET", "/collections", Want::Ok),
        ("writer lists", w, "GET", "/collections", denied),
        ("manager creates", m, "PUT", "/collections/c1", Want::Ok),
        ("manager deletes", m, "DELETE", "/collections/c1", Want::Ok),
        ("reader creates", r, "PUT", "/collections/c1", denied),
        ("reader deletes", r, "DELETE", "/collections/c1", denied),
        (
            "writer upserts",
            w,
            "PUT",
            "/collections/c1/points",
            Want::Ok,
        ),
        ("reader upserts", r, "PUT", "/collections/c1/points", denied),
        (
            "manager upserts",
            m,
            "PUT",
            "/collections/c1/points",
            denied,
        ),
        (
            "reader searches",
            r,
            "POST",
            "/collections/c1/points/search",
            Want::Ok,
        ),
        (
            "reader queries",
            r,
            "POST",
            "/collections/c1/points/query",
            Want::Ok,
        ),
        (
            "reader scrolls",
            r,
            "POST",
            "/collections/c1/points/scroll",
            Want::Ok,
        ),
        (
            "reader counts",
            r,
            "POST",
            "/collections/c1/points/count",
            Want::Ok,
        ),
        (
            "reader retrieves",
            r,
            "POST",
            "/collections/c1/points",
            Want::Ok,
        ),
        (
            "writer searches",
            w,
            "POST",
            "/collections/c1/points/search",
            denied,
        ),
        (
            "writer retrieves",
            w,
            "POST",
            "/collections/c1/points",
            denied,
        ),
        (
            "query string is not part of the path",
            r,
            "POST",
            "/collections/c1/points/search?limit=10",
            Want::Ok,
        ),
        (
            "public route, no key needed by the table",
            r,
            "GET",
            "/healthz",
            Want::Ok,
        ),
        // The table says which method: GET on a POST-only read matches no rule, so it is
        // an unknown route (404), like a path no rule knows.
        (
            "method matters",
            r,
            "GET",
            "/collections/c1/points/search",
            Want::Denied(StatusCode::NOT_FOUND, UnknownRoute),
        ),
        (
            "unmatched route",
            r,
            "GET",
            "/cluster",
            Want::Denied(StatusCode::NOT_FOUND, UnknownRoute),
        ),
    ];
    for (what, key, method, path, want) in rows {
        let (out, reached) = call(&svc, &calls, request(method, path, key)).await;
        check(&out, reached, want, what);
    }

    // gRPC paths work the same way.
    let (out, reached) = call(&svc, &calls, grpc_request("/qdrant.Points/Search", r)).await;
    assert_eq!(out.status, StatusCode::OK);
    assert!(reached);
    let (out, reached) = call(&svc, &calls, grpc_request("/qdrant.Points/Search", w)).await;
    assert_grpc_denied(&out, 7, InsufficientScope, "writer over gRPC");
    assert!(!reached);
}

#[tokio::test]
async fn require_per_route_and_its_challenge() {
    let fx = Fixture::new();
    let writer = key(&fx, "writer", &["points:write"], &["*"], &[]).await;
    let reader = key(&fx, "reader", &["points:read"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::require("points:write").expect("valid scope"))
        .service(probe(calls.clone()));

    let (out, reached) = call(
        &svc,
        &calls,
        request("PUT", "/anything", Some(writer.expose_secret())),
    )
    .await;
    check(&out, reached, Want::Ok, "writer");

    let (out, reached) = call(
        &svc,
        &calls,
        request("PUT", "/anything", Some(reader.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(FORBIDDEN, InsufficientScope),
        "reader",
    );
    assert_challenge(&out, &scope_challenge("points:write"), "reader");
    assert_eq!(
        out.header("www-authenticate"),
        Some(r#"Bearer realm="keygate", error="insufficient_scope", scope="points:write""#)
    );
    let json = out.json();
    assert_eq!(json["required_scope"], "points:write", "{json}");
    assert_eq!(json["title"], "Forbidden", "{json}");
    assert_eq!(out.required_scope.as_deref(), Some("points:write"));
    assert_eq!(out.header("cache-control"), Some("no-store"));

    // `require` checks no resource unless told to: a key without collections passes.
    let no_collections = key(&fx, "no-collections", &["points:write"], &[], &[]).await;
    let (out, reached) = call(
        &svc,
        &calls,
        request(
            "PUT",
            "/collections/c1/points",
            Some(no_collections.expose_secret()),
        ),
    )
    .await;
    check(&out, reached, Want::Ok, "require without resource_in_path");
}

#[tokio::test]
async fn require_with_a_resource_in_the_path() {
    let fx = Fixture::new();
    let tenant = key(&fx, "tenant", &["points:write"], &["tenant-*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = ScopeLayer::require("points:write")
        .expect("scope")
        .resource_in_path("/collections/{collection}/points", "collection")
        .expect("pattern");
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(layer)
        .service(probe(calls.clone()));
    let k = Some(tenant.expose_secret());
    for (what, path, want) in [
        ("own collection", "/collections/tenant-a/points", Want::Ok),
        (
            "other collection",
            "/collections/private/points",
            Want::Denied(FORBIDDEN, ResourceForbidden),
        ),
        (
            "path not matching the pattern",
            "/other/tenant-a/points",
            Want::Denied(FORBIDDEN, ResourceForbidden),
        ),
        (
            "trailing slash",
            "/collections/tenant-a/points/",
            Want::Denied(FORBIDDEN, ResourceForbidden),
        ),
    ] {
        let (out, reached) = call(&svc, &calls, request("PUT", path, k)).await;
        check(&out, reached, want, what);
    }
}

#[tokio::test]
async fn wildcard_scopes() {
    let fx = Fixture::new();
    let points_any = key(&fx, "points:*", &["points:*"], &["*"], &[]).await;
    let everything = key(&fx, "*", &["*"], &["*"], &[]).await;
    let any_read = key(&fx, "*:read", &["*:read"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let p = Some(points_any.expose_secret());
    let e = Some(everything.expose_secret());
    let a = Some(any_read.expose_secret());
    let denied = Want::Denied(FORBIDDEN, InsufficientScope);
    for (what, key, method, path, want) in [
        (
            "points:* writes points",
            p,
            "PUT",
            "/collections/c/points",
            Want::Ok,
        ),
        (
            "points:* reads points",
            p,
            "POST",
            "/collections/c/points/search",
            Want::Ok,
        ),
        (
            "points:* does not list collections",
            p,
            "GET",
            "/collections",
            denied,
        ),
        (
            "points:* does not manage collections",
            p,
            "DELETE",
            "/collections/c",
            denied,
        ),
        (
            "* writes points",
            e,
            "PUT",
            "/collections/c/points",
            Want::Ok,
        ),
        (
            "* manages collections",
            e,
            "PUT",
            "/collections/c",
            Want::Ok,
        ),
        ("* lists collections", e, "GET", "/collections", Want::Ok),
        (
            "*:read reads points",
            a,
            "POST",
            "/collections/c/points/scroll",
            Want::Ok,
        ),
        (
            "*:read lists collections",
            a,
            "GET",
            "/collections",
            Want::Ok,
        ),
        (
            "*:read does not write",
            a,
            "PUT",
            "/collections/c/points",
            denied,
        ),
        ("*:read does not manage", a, "PUT", "/collections/c", denied),
        // Even `*` does not open routes the table does not know: they do not exist (404).
        (
            "* on an unmatched route",
            e,
            "GET",
            "/cluster",
            Want::Denied(StatusCode::NOT_FOUND, UnknownRoute),
        ),
    ] {
        let (out, reached) = call(&svc, &calls, request(method, path, key)).await;
        check(&out, reached, want, what);
    }
}

#[tokio::test]
async fn resource_patterns() {
    let fx = Fixture::new();
    let exact = key(
        &fx,
        "exact",
        &["points:*", "collections:read"],
        &["docs"],
        &[],
    )
    .await;
    let glob = key(
        &fx,
        "glob",
        &["points:*", "collections:read"],
        &["tenant-*"],
        &[],
    )
    .await;
    let any = key(&fx, "any", &["points:*", "collections:read"], &["*"], &[]).await;
    let none = key(&fx, "none", &["points:*", "collections:read"], &[], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let forbidden = Want::Denied(FORBIDDEN, ResourceForbidden);
    let search = |c: &str| format!("/collections/{c}/points/search");
    let cases: Vec<(&str, &ApiKey, String, Want)> = vec![
        ("exact: its collection", &exact, search("docs"), Want::Ok),
        ("exact: a prefix of it", &exact, search("doc"), forbidden),
        ("exact: longer name", &exact, search("docs2"), forbidden),
        ("exact: case matters", &exact, search("Docs"), forbidden),
        ("glob: tenant-acme", &glob, search("tenant-acme"), Want::Ok),
        (
            "glob: tenant- (empty tail)",
            &glob,
            search("tenant-"),
            Want::Ok,
        ),
        ("glob: tenant", &glob, search("tenant"), forbidden),
        ("glob: other", &glob, search("docs"), forbidden),
        ("any: docs", &any, search("docs"), Want::Ok),
        ("any: tenant-x", &any, search("tenant-x"), Want::Ok),
        ("none: docs", &none, search("docs"), forbidden),
        ("none: tenant-x", &none, search("tenant-x"), forbidden),
    ];
    for (what, k, path, want) in cases {
        let (out, reached) = call(
            &svc,
            &calls,
            request("POST", &path, Some(k.expose_secret())),
        )
        .await;
        check(&out, reached, want, what);
        if let Want::Denied(..) = want {
            assert!(
                out.header("www-authenticate").is_none(),
                "{what}: no challenge on resource_forbidden"
            );
            assert!(out.json().get("required_scope").is_none(), "{what}");
        }
    }
    // A key with no collections may still use routes that name none.
    let (out, reached) = call(
        &svc,
        &calls,
        request("GET", "/collections", Some(none.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Ok,
        "none: route without a collection parameter",
    );
    // The scope is checked before the resource: the scope denial wins.
    let (out, reached) = call(
        &svc,
        &calls,
        request("PUT", "/collections/docs", Some(glob.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(FORBIDDEN, InsufficientScope),
        "scope before resource",
    );
}

#[tokio::test]
async fn custom_resource_parameter() {
    let fx = Fixture::new();
    let k = key(&fx, "k", &["indexes:read"], &["idx-*"], &[]).await;
    let table = RouteScopes::builder()
        .resource_param("index")
        .route("GET", "/indexes/{index}/stats", "indexes:read")
        // `collection` is not the resource parameter of this table: not checked.
        .route("GET", "/collections/{collection}/stats", "indexes:read")
        .build()
        .expect("table");
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(table))
        .service(probe(calls.clone()));
    let s = Some(k.expose_secret());
    for (what, path, want) in [
        ("own index", "/indexes/idx-1/stats", Want::Ok),
        (
            "other index",
            "/indexes/main/stats",
            Want::Denied(FORBIDDEN, ResourceForbidden),
        ),
        (
            "not the resource parameter",
            "/collections/main/stats",
            Want::Ok,
        ),
    ] {
        let (out, reached) = call(&svc, &calls, request("GET", path, s)).await;
        check(&out, reached, want, what);
    }
}

#[tokio::test]
async fn unmatched_routes_are_unknown_unless_the_table_says_otherwise() {
    let fx = Fixture::new();
    let k = key(&fx, "k", &["*"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let strict = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &strict,
        &calls,
        request("GET", "/cluster", Some(k.expose_secret())),
    )
    .await;
    // A key holding `*` asks for a route no rule knows: 404 unknown_route, no challenge
    // (no scope would help).
    check(
        &out,
        reached,
        Want::Denied(StatusCode::NOT_FOUND, UnknownRoute),
        "unmatched",
    );
    assert!(out.header("www-authenticate").is_none(), "unmatched");
    assert_eq!(out.json()["code"], "unknown_route");
    assert_eq!(
        out.json()["detail"],
        "No route of this service matches this method and path."
    );
    // Without a valid key the authentication verdict comes first: anonymous callers learn
    // nothing about which routes exist.
    for bad in [None, Some("kg_garbage")] {
        let (out, reached) = call(&strict, &calls, request("GET", "/cluster", bad)).await;
        assert_eq!(out.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        assert!(!reached);
    }

    // The older answer, 403 insufficient_scope, on request.
    let old_table = RouteScopes::builder()
        .route("PUT", "/collections/{collection}/points", "points:write")
        .unmatched(Unmatched::InsufficientScope)
        .build()
        .expect("table");
    assert_eq!(old_table.unmatched(), Unmatched::InsufficientScope);
    assert_eq!(qdrant_table().unmatched(), Unmatched::UnknownRoute);
    let old = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(old_table))
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &old,
        &calls,
        request("GET", "/cluster", Some(k.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(FORBIDDEN, InsufficientScope),
        "unmatched as before",
    );
    // No rule, so no scope to name.
    assert_challenge(
        &out,
        r#"Bearer realm="keygate", error="insufficient_scope""#,
        "unmatched as before",
    );
    assert!(out.json().get("required_scope").is_none());
    assert!(out.required_scope.is_none());

    let lenient_table = RouteScopes::builder()
        .route("PUT", "/collections/{collection}/points", "points:write")
        .allow_unmatched(true)
        .build()
        .expect("table");
    assert!(lenient_table.allows_unmatched());
    assert!(!qdrant_table().allows_unmatched());
    let reader = key(&fx, "reader", &["points:read"], &["*"], &[]).await;
    let lenient = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(lenient_table))
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &lenient,
        &calls,
        request("GET", "/cluster", Some(reader.expose_secret())),
    )
    .await;
    check(&out, reached, Want::Ok, "allow_unmatched");
    // Matched rules are still enforced.
    let (out, reached) = call(
        &lenient,
        &calls,
        request("PUT", "/collections/c/points", Some(reader.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(FORBIDDEN, InsufficientScope),
        "allow_unmatched, matched rule",
    );
}

#[tokio::test]
async fn grpc_denials_are_permission_denied() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["tenant-*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let table = RouteScopes::builder()
        .grpc("/qdrant.Points/Search", "points:read")
        .grpc("/qdrant.Points/Upsert", "points:write")
        .route(
            "POST",
            "/collections/{collection}/points/search",
            "points:read",
        )
        .build()
        .expect("table");
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(table).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let k = Some(reader.expose_secret());

    let (out, reached) = call(&svc, &calls, grpc_request("/qdrant.Points/Search", k)).await;
    assert_eq!(out.status, StatusCode::OK);
    assert!(reached);
    for (what, req, grpc, code) in [
        (
            "scope",
            grpc_request("/qdrant.Points/Upsert", k),
            7,
            InsufficientScope,
        ),
        (
            "unmatched: UNIMPLEMENTED",
            grpc_request("/qdrant.Points/Delete", k),
            12,
            UnknownRoute,
        ),
        (
            "resource",
            grpc_request("/collections/private/points/search", k),
            7,
            ResourceForbidden,
        ),
    ] {
        let (out, reached) = call(&svc, &calls, req).await;
        assert_grpc_denied(&out, grpc, code, what);
        assert!(!reached, "{what}");
        assert!(
            out.header("www-authenticate").is_none(),
            "{what}: no HTTP challenge for gRPC"
        );
    }
    // An authentication failure reaching the scope layer is UNAUTHENTICATED, not 7.
    let (out, reached) = call(&svc, &calls, grpc_request("/qdrant.Points/Search", None)).await;
    assert_grpc_denied(&out, 16, MissingKey, "no key");
    assert!(!reached);
}

#[tokio::test]
async fn attributes_reach_the_handler_for_row_filtering() {
    let fx = Fixture::new();
    let acme = key(
        &fx,
        "acme-reader",
        &["points:read"],
        &["*"],
        &[("tenant", "acme"), ("plan", "pro")],
    )
    .await;
    let globex = key(
        &fx,
        "globex-reader",
        &["points:read"],
        &["*"],
        &[("tenant", "globex")],
    )
    .await;
    let anonymous = key(&fx, "no-tenant", &["points:read"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let path = "/collections/shared/points/scroll";
    let (out, _) = call(
        &svc,
        &calls,
        request("POST", path, Some(acme.expose_secret())),
    )
    .await;
    assert_allowed(&out, "acme");
    assert_eq!(out.header(SEEN_TENANT), Some("acme"));
    assert_eq!(out.text(), "a1,a2,a3", "only acme's rows");
    let (out, _) = call(
        &svc,
        &calls,
        request("POST", path, Some(globex.expose_secret())),
    )
    .await;
    assert_eq!(out.text(), "g1", "only globex's rows");
    let (out, _) = call(
        &svc,
        &calls,
        request("POST", path, Some(anonymous.expose_secret())),
    )
    .await;
    assert_eq!(out.header(SEEN_TENANT), Some("none"));
    assert_eq!(out.text(), "", "no tenant, no rows");

    // The same through the principal directly.
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(qdrant_table()).with_gate(&fx.gate))
        .service_fn(move |req: http::Request<Full<Bytes>>| {
            let p = keygate::RequestContext::of(req.extensions())
                .and_then(|c| c.principal())
                .cloned();
            *seen2.lock().unwrap() = p;
            async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::<Bytes>::default()))
            }
        });
    let res = svc
        .oneshot(request("POST", path, Some(acme.expose_secret())))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let p = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the handler got the principal");
    assert_eq!(p.tenant(), Some("acme"));
    assert_eq!(p.attribute("plan"), Some("pro"));
    assert_eq!(p.name(), "acme-reader");
}

#[tokio::test]
async fn with_gate_and_no_auth_layer_the_scope_layer_resolves_the_key() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(qdrant_table()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let path = "/collections/c/points/search";

    let (out, reached) = call(
        &svc,
        &calls,
        request("POST", path, Some(reader.expose_secret())),
    )
    .await;
    check(&out, reached, Want::Ok, "valid key");
    assert_eq!(
        out.header(SEEN_KEY),
        Some("reader"),
        "the principal reached the handler"
    );
    assert_eq!(fx.store.gets(), 1, "one store read");
    let (out, reached) = call(
        &svc,
        &calls,
        request("POST", path, Some(reader.expose_secret())),
    )
    .await;
    check(&out, reached, Want::Ok, "valid key, cached");
    assert_eq!(
        fx.store.gets(),
        1,
        "the second request is served from the cache"
    );

    let bad = common::wrong_secret(&reader);
    let (out, reached) = call(&svc, &calls, request("POST", path, Some(&bad))).await;
    check(
        &out,
        reached,
        Want::Denied(UNAUTHORIZED, InvalidKey),
        "wrong secret",
    );
    assert!(out
        .header("www-authenticate")
        .expect("challenge")
        .contains(r#"error="invalid_token""#));
    let (out, reached) = call(&svc, &calls, request("POST", path, Some("garbage"))).await;
    check(
        &out,
        reached,
        Want::Denied(UNAUTHORIZED, MalformedKey),
        "garbage key",
    );
    let (out, reached) = call(&svc, &calls, request("POST", path, None)).await;
    check(
        &out,
        reached,
        Want::Denied(UNAUTHORIZED, MissingKey),
        "no key",
    );
    assert_challenge(&out, r#"Bearer realm="keygate""#, "no key");
    // Unmatched without a key: the authentication verdict comes first.
    let (out, reached) = call(&svc, &calls, request("GET", "/cluster", None)).await;
    check(
        &out,
        reached,
        Want::Denied(UNAUTHORIZED, MissingKey),
        "unmatched, no key",
    );
    // Public routes need no key at all, and a bad one does not matter there.
    for k in [None, Some("garbage")] {
        let (out, reached) = call(&svc, &calls, request("GET", "/healthz", k)).await;
        check(&out, reached, Want::Ok, "public route");
        assert_eq!(
            out.header(SEEN_KEY),
            Some("none"),
            "public route: not resolved"
        );
    }
}

#[tokio::test]
async fn with_gate_behind_the_auth_layer_verifies_once() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    // Scope outermost, auth inside: the scope layer resolves, auth reuses the verdict.
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(qdrant_table()).with_gate(&fx.gate))
        .layer(fx.gate.auth_layer())
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &svc,
        &calls,
        request(
            "POST",
            "/collections/c/points/count",
            Some(reader.expose_secret()),
        ),
    )
    .await;
    check(&out, reached, Want::Ok, "scope then auth");
    assert_eq!(fx.store.gets(), 1, "the key is verified once per request");
    let (out, reached) = call(
        &svc,
        &calls,
        request("PUT", "/collections/c/points", Some(reader.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(FORBIDDEN, InsufficientScope),
        "scope then auth, denied",
    );
}

#[tokio::test]
async fn standalone_without_the_auth_layer_fails_closed() {
    let fx = Fixture::new();
    let everything = key(&fx, "root", &["*"], &["*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let table = ServiceBuilder::new()
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let require = ServiceBuilder::new()
        .layer(ScopeLayer::require("points:read").expect("scope"))
        .service(probe(calls.clone()));
    let k = Some(everything.expose_secret());
    // Even a valid all-powerful key: nobody resolved it, so nobody is calling.
    let (out, reached) = call(
        &table,
        &calls,
        request("POST", "/collections/c/points/search", k),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(UNAUTHORIZED, MissingKey),
        "table, standalone",
    );
    let (out, reached) = call(&require, &calls, request("POST", "/x", k)).await;
    check(
        &out,
        reached,
        Want::Denied(UNAUTHORIZED, MissingKey),
        "require, standalone",
    );
    let (out, reached) = call(&table, &calls, grpc_request("/qdrant.Points/Search", k)).await;
    assert_grpc_denied(&out, 16, MissingKey, "gRPC, standalone");
    assert!(!reached);
    assert_eq!(
        fx.store.gets(),
        0,
        "a standalone layer never reads the store"
    );
    // Public routes stay public.
    let (out, reached) = call(&table, &calls, request("GET", "/healthz", None)).await;
    check(&out, reached, Want::Ok, "public, standalone");
}

#[tokio::test]
async fn standalone_behind_the_auth_layer_works() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["tenant-*"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let k = Some(reader.expose_secret());
    for (what, req, want) in [
        (
            "allowed",
            request("POST", "/collections/tenant-a/points/search", k),
            Want::Ok,
        ),
        (
            "scope",
            request("PUT", "/collections/tenant-a/points", k),
            Want::Denied(FORBIDDEN, InsufficientScope),
        ),
        (
            "resource",
            request("POST", "/collections/x/points/search", k),
            Want::Denied(FORBIDDEN, ResourceForbidden),
        ),
        (
            "auth first",
            request(
                "POST",
                "/collections/tenant-a/points/search",
                Some("kg_nope"),
            ),
            Want::Denied(UNAUTHORIZED, MalformedKey),
        ),
    ] {
        let (out, reached) = call(&svc, &calls, req).await;
        check(&out, reached, want, what);
    }
}

#[tokio::test]
async fn custom_renderer_on_a_standalone_layer() {
    use keygate::reject::{RenderContext, Renderer};
    struct Teapot;
    impl Renderer for Teapot {
        fn render(&self, denial: &keygate::Denial, _: &RenderContext<'_>) -> http::Response<Bytes> {
            let mut res = http::Response::new(Bytes::from(denial.code().as_str()));
            *res.status_mut() = StatusCode::IM_A_TEAPOT;
            res
        }
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            ScopeLayer::require("points:read")
                .expect("scope")
                .renderer(Teapot),
        )
        .service(probe(calls.clone()));
    let (out, reached) = call(&svc, &calls, request("GET", "/", None)).await;
    assert_eq!(out.status, StatusCode::IM_A_TEAPOT);
    assert_eq!(out.text(), "missing_key");
    assert_eq!(
        out.denial,
        Some(MissingKey),
        "the Denial extension is still added"
    );
    assert!(!reached);
}

#[tokio::test]
async fn the_first_matching_rule_decides() {
    let fx = Fixture::new();
    let reader = key(&fx, "reader", &["points:read"], &["*"], &[]).await;
    let admin = key(&fx, "admin", &["admin:all"], &["*"], &[]).await;
    let table = RouteScopes::builder()
        // A specific rule before the general one wins...
        .route("GET", "/collections/admin/points", "admin:all")
        .route("*", "/collections/{collection}/points", "points:read")
        // ...and a general rule before a specific one shadows it.
        .public("GET", "/status/{part}")
        .route("GET", "/status/secret", "admin:all")
        .build()
        .expect("table");
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(table).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let r = Some(reader.expose_secret());
    let a = Some(admin.expose_secret());
    let denied = Want::Denied(FORBIDDEN, InsufficientScope);
    for (what, key, method, path, want) in [
        (
            "specific rule first",
            r,
            "GET",
            "/collections/admin/points",
            denied,
        ),
        (
            "specific rule first, admin",
            a,
            "GET",
            "/collections/admin/points",
            Want::Ok,
        ),
        (
            "any method: GET",
            r,
            "GET",
            "/collections/c/points",
            Want::Ok,
        ),
        (
            "any method: DELETE",
            r,
            "DELETE",
            "/collections/c/points",
            Want::Ok,
        ),
        (
            "any method: PATCH, admin lacks points:read",
            a,
            "PATCH",
            "/collections/c/points",
            denied,
        ),
        // Only GET is special-cased for `admin`: other methods take the general rule.
        (
            "other method on the specific path",
            r,
            "PUT",
            "/collections/admin/points",
            Want::Ok,
        ),
        (
            "shadowed by an earlier public rule",
            None,
            "GET",
            "/status/secret",
            Want::Ok,
        ),
    ] {
        let (out, reached) = call(&svc, &calls, request(method, path, key)).await;
        check(&out, reached, want, what);
    }
}

#[tokio::test]
async fn resource_forbidden_says_which_collection_and_why() {
    let fx = Fixture::new();
    let tenant = key(&fx, "tenant", &["*"], &["tenant-*"], &[]).await;
    let none = key(&fx, "none", &["*"], &[], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(qdrant_table()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let long = "x".repeat(65);
    let cases: Vec<(&str, &ApiKey, String, String)> = vec![
        (
            "no matching pattern",
            &tenant,
            "private".into(),
            r#"Collection "private" is refused: it matches none of the API key's collection patterns."#.into(),
        ),
        (
            "no patterns at all",
            &none,
            "tenant-a".into(),
            r#"Collection "tenant-a" is refused: the API key has no collection patterns, so it may access no collection."#.into(),
        ),
        (
            "quotes and backslashes escaped",
            &tenant,
            "a%22b%5Cc".into(),
            r#"Collection "a\"b\\c" is refused: it matches none of the API key's collection patterns."#.into(),
        ),
        (
            "64 characters are echoed",
            &tenant,
            "y".repeat(64),
            format!(
                r#"Collection "{}" is refused: it matches none of the API key's collection patterns."#,
                "y".repeat(64)
            ),
        ),
        (
            "longer names are not",
            &tenant,
            long.clone(),
            "The collection asked for (65 bytes, not shown) is refused: it matches none of the API key's collection patterns.".into(),
        ),
        (
            "non-ASCII names are not",
            &tenant,
            "caf%C3%A9".into(),
            "The collection asked for (5 bytes, not shown) is refused: it matches none of the API key's collection patterns.".into(),
        ),
        (
            "undecodable names",
            &tenant,
            "%FF".into(),
            "The collection name in the path is not valid (it must decode to UTF-8 without '/' or control characters).".into(),
        ),
    ];
    for (what, k, name, detail) in cases {
        let path = format!("/collections/{name}/points/search");
        let (out, reached) = call(
            &svc,
            &calls,
            request("POST", &path, Some(k.expose_secret())),
        )
        .await;
        assert!(!reached, "{what}");
        assert_eq!(out.status, StatusCode::FORBIDDEN, "{what}");
        let body = out.json();
        assert_eq!(body["code"], "resource_forbidden", "{what}");
        assert_eq!(body["detail"], detail.as_str(), "{what}");
        assert!(
            !body["detail"].as_str().unwrap().contains("tenant-*"),
            "{what}: patterns are never listed"
        );
    }
}

/// Grants pair scopes with collections: a key that may write `docs-*` (its own grant) and
/// only read `shared` (through a role) is refused a write to `shared`, with the required
/// scope named, and may still read `shared` and write `docs-1`. Changing the role reaches
/// the key at its next resolution.
#[tokio::test]
async fn write_docs_but_only_read_shared() {
    use keygate::{Grant, KeyStore, Role};
    let fx = Fixture::new();
    let role = Role::new("shared-reader", fx.gate.clock().now())
        .with_grant(Grant::new(["points:read"], ["shared"]));
    fx.store.memory().insert_role(&role).await.unwrap();
    let k = fx
        .issue_with("ingest", |r| {
            r.scopes = vec!["points:write".into(), "points:read".into()];
            r.resources = vec!["docs-*".into()];
            r.roles = vec!["shared-reader".into()];
        })
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(ScopeLayer::table(qdrant_table()))
        .service(probe(calls.clone()));
    let insufficient = Want::Denied(FORBIDDEN, InsufficientScope);
    let forbidden = Want::Denied(FORBIDDEN, ResourceForbidden);
    let cases: Vec<(&str, &str, &str, Want)> = vec![
        (
            "write docs-1",
            "PUT",
            "/collections/docs-1/points",
            Want::Ok,
        ),
        (
            "read docs-1",
            "POST",
            "/collections/docs-1/points/search",
            Want::Ok,
        ),
        (
            "read shared",
            "POST",
            "/collections/shared/points/search",
            Want::Ok,
        ),
        (
            "write shared",
            "PUT",
            "/collections/shared/points",
            insufficient,
        ),
        ("write other", "PUT", "/collections/other/points", forbidden),
        (
            "read other",
            "POST",
            "/collections/other/points/search",
            forbidden,
        ),
    ];
    for (what, method, path, want) in &cases {
        let (out, reached) =
            call(&svc, &calls, request(method, path, Some(k.expose_secret()))).await;
        check(&out, reached, *want, what);
        if matches!(want, Want::Denied(_, InsufficientScope)) {
            assert_eq!(out.json()["required_scope"], "points:write", "{what}");
        }
    }
    // The principal names the role that granted the read of `shared`, and no role for
    // the write to `docs-1` (the key's own grant).
    let p = fx.gate.verifier().verify(k.expose_secret()).await.unwrap();
    let read = keygate::Scope::parse("points:read").unwrap();
    let write = keygate::Scope::parse("points:write").unwrap();
    let names: Vec<_> = p.granting_roles(&read, Some("shared")).collect();
    assert_eq!(names.len(), 1);
    assert_eq!(&**names[0], "shared-reader");
    assert_eq!(p.granting_roles(&write, Some("docs-1")).count(), 0);

    // Deleting the role takes the read of `shared` away once the key is resolved again.
    fx.store
        .memory()
        .delete_role("shared-reader")
        .await
        .unwrap();
    fx.gate.verifier().invalidate(&k.id());
    let (out, reached) = call(
        &svc,
        &calls,
        request(
            "POST",
            "/collections/shared/points/search",
            Some(k.expose_secret()),
        ),
    )
    .await;
    check(
        &out,
        reached,
        forbidden,
        "read shared after the role is gone",
    );
}
