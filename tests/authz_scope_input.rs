//! Bad input for `ScopeLayer` and its route tables: percent-encoded paths, trailing and
//! double slashes, very long paths, gRPC paths with odd characters, and invalid rules. Each
//! case has its documented result (src/scope/rules.rs: literals are compared to the raw
//! path, the resource parameter is percent-decoded and must be UTF-8, a trailing slash is a
//! segment of its own, more than 32 segments match no rule) and nothing panics.
#![cfg(feature = "scope")]

mod authz_support;
mod common;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use authz_support::*;
use common::Fixture;
use http::StatusCode;
use keygate::scope::{InvalidRule, RouteScopes, ScopeLayer};
use keygate::{ApiKey, DenialCode};
use tower::ServiceBuilder;

use DenialCode::*;

async fn key(fx: &Fixture, name: &str, scopes: &[&str], resources: &[&str]) -> ApiKey {
    fx.issue_with(name, |r| {
        r.scopes = scopes.iter().map(|s| s.to_string()).collect();
        r.resources = resources.iter().map(|s| s.to_string()).collect();
    })
    .await
}

fn table() -> RouteScopes {
    RouteScopes::builder()
        .route("GET", "/collections", "collections:read")
        .reads(
            "POST",
            [
                "/collections/{collection}/points/search",
                "/collections/{collection}/points",
            ],
            "points:read",
        )
        .grpc("/pkg.Svc/Method", "pkg:call")
        .build()
        .expect("table")
}

#[derive(Debug, Clone, Copy)]
enum Want {
    Ok,
    Denied(DenialCode),
}

#[track_caller]
fn check(out: &Outcome, reached: bool, want: Want, what: &str) {
    match want {
        Want::Ok => {
            assert_allowed(out, what);
            assert!(reached, "{what}: handler not called");
        }
        Want::Denied(code) => {
            let status = if code == UnknownRoute {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            };
            assert_denied(out, status, code, what);
            assert!(!reached, "{what}: handler called on a denial");
        }
    }
}

#[tokio::test]
async fn percent_encoded_paths() {
    let fx = Fixture::new();
    let tenant = key(&fx, "tenant", &["*"], &["tenant-*"]).await;
    let any = key(&fx, "any", &["*"], &["*"]).await;
    let exact = key(&fx, "exact", &["*"], &["docs"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(table()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let forbidden = Want::Denied(ResourceForbidden);
    let unmatched = Want::Denied(UnknownRoute);
    let rows: Vec<(&str, &ApiKey, &str, Want)> = vec![
        // The resource parameter is decoded before it is checked.
        (
            "%2D decodes to -",
            &tenant,
            "/collections/tenant%2Dacme/points/search",
            Want::Ok,
        ),
        (
            "lower-case hex",
            &tenant,
            "/collections/tenant%2dacme/points/search",
            Want::Ok,
        ),
        (
            "encoded first letter",
            &tenant,
            "/collections/%74enant-acme/points/search",
            Want::Ok,
        ),
        (
            "encoded name of another collection",
            &tenant,
            "/collections/%70rivate/points/search",
            forbidden,
        ),
        (
            "encoded exact name",
            &exact,
            "/collections/%64ocs/points/search",
            Want::Ok,
        ),
        (
            "encoded UTF-8 name, not granted",
            &exact,
            "/collections/d%C3%B6cs/points/search",
            forbidden,
        ),
        // Invalid UTF-8 is forbidden, even for a key with `*`.
        (
            "%FF, tenant-*",
            &tenant,
            "/collections/tenant-%FF/points/search",
            forbidden,
        ),
        ("%FF, *", &any, "/collections/%FF/points/search", forbidden),
        (
            "overlong encoding of /",
            &any,
            "/collections/%C0%AF/points/search",
            forbidden,
        ),
        (
            "lone surrogate",
            &any,
            "/collections/%ED%A0%80/points/search",
            forbidden,
        ),
        // An encoded slash stays inside the segment; the decoded name is what is checked.
        (
            "%2F in an exact name",
            &exact,
            "/collections/docs%2F..%2Fprivate/points/search",
            forbidden,
        ),
        // A `%` that starts no escape stays literal.
        (
            "stray %",
            &tenant,
            "/collections/tenant-%zz/points/search",
            Want::Ok,
        ),
        (
            "stray %, exact",
            &exact,
            "/collections/docs%/points/search",
            forbidden,
        ),
        // Literals are compared to the raw path: encoded literals match no rule.
        (
            "encoded literal segment",
            &any,
            "/collect%69ons/c/points/search",
            unmatched,
        ),
        (
            "encoded last literal",
            &any,
            "/collections/c/points/%73earch",
            unmatched,
        ),
        (
            "encoded literal of a plain route",
            &any,
            "/collection%73",
            unmatched,
        ),
        (
            "encoded slash in a literal position",
            &any,
            "/collections%2Fc/points/search",
            unmatched,
        ),
        (
            "upper-case literal",
            &any,
            "/Collections/c/points/search",
            unmatched,
        ),
    ];
    for (what, k, path, want) in rows {
        let (out, reached) =
            call(&svc, &calls, request("POST", path, Some(k.expose_secret()))).await;
        check(&out, reached, want, what);
    }
    let (out, reached) = call(
        &svc,
        &calls,
        request("GET", "/collect%69ons", Some(any.expose_secret())),
    )
    .await;
    check(&out, reached, unmatched, "GET encoded literal");
}

#[tokio::test]
async fn trailing_and_double_slashes_match_no_rule() {
    let fx = Fixture::new();
    let any = key(&fx, "any", &["*"], &["*"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(table()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let k = Some(any.expose_secret());
    for (method, path) in [
        ("GET", "/collections/"),
        ("GET", "//collections"),
        ("GET", "/collections//"),
        ("POST", "/collections/c/points/search/"),
        ("POST", "/collections//points/search"),
        ("POST", "/collections/c//points/search"),
        ("POST", "//collections/c/points/search"),
        ("POST", "/collections/c/points/"),
        ("POST", "/collections/./points/search/.."),
    ] {
        let (out, reached) = call(&svc, &calls, request(method, path, k)).await;
        check(
            &out,
            reached,
            Want::Denied(UnknownRoute),
            &format!("{method} {path}"),
        );
    }
    // The exact forms are allowed (the rows above fail for their slashes only).
    for (method, path) in [
        ("GET", "/collections"),
        ("POST", "/collections/c/points/search"),
    ] {
        let (out, reached) = call(&svc, &calls, request(method, path, k)).await;
        check(&out, reached, Want::Ok, path);
    }
    // `.` and `..` are names like any other (no normalisation): granted by `*` here.
    let (out, reached) = call(
        &svc,
        &calls,
        request("POST", "/collections/../points/search", k),
    )
    .await;
    check(&out, reached, Want::Ok, "`..` as a collection name");
    // OPTIONS * (asterisk-form): no path at all, no rule.
    let mut req = request("OPTIONS", "/", k);
    *req.uri_mut() = http::Uri::from_static("*");
    let (out, reached) = call(&svc, &calls, req).await;
    check(&out, reached, Want::Denied(UnknownRoute), "OPTIONS *");
}

#[tokio::test]
async fn very_long_paths() {
    let fx = Fixture::new();
    let any = key(&fx, "any", &["*"], &["*"]).await;
    let tenant = key(&fx, "tenant", &["*"], &["tenant-*", "*a*a*a*a*a*a*b"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let deep: String = (0..32).map(|i| format!("/s{i}")).collect();
    let mut builder = RouteScopes::builder().route("GET", &deep, "deep:read");
    builder = builder.reads(
        "POST",
        ["/collections/{collection}/points/search"],
        "points:read",
    );
    let svc = ServiceBuilder::new()
        .layer(
            ScopeLayer::table(builder.build().expect("32 segments are allowed"))
                .with_gate(&fx.gate),
        )
        .service(probe(calls.clone()));
    let k = Some(any.expose_secret());

    let (out, reached) = call(&svc, &calls, request("GET", &deep, k)).await;
    check(&out, reached, Want::Ok, "32 segments");
    let deeper = format!("{deep}/s32");
    let (out, reached) = call(&svc, &calls, request("GET", &deeper, k)).await;
    check(&out, reached, Want::Denied(UnknownRoute), "33 segments");
    let thousands = "/a".repeat(10_000);
    let (out, reached) = call(&svc, &calls, request("GET", &thousands, k)).await;
    check(&out, reached, Want::Denied(UnknownRoute), "10,000 segments");
    let slashes = "/".repeat(40_000);
    let (out, reached) = call(&svc, &calls, request("GET", &slashes, k)).await;
    check(&out, reached, Want::Denied(UnknownRoute), "40,000 slashes");

    // A 40,000-byte collection name: allowed by `*`, not by `tenant-*`, and the glob with
    // many stars stays fast on it.
    let name = "a".repeat(40_000);
    let path = format!("/collections/{name}/points/search");
    let (out, reached) = call(&svc, &calls, request("POST", &path, k)).await;
    check(&out, reached, Want::Ok, "long name, *");
    let started = std::time::Instant::now();
    let (out, reached) = call(
        &svc,
        &calls,
        request("POST", &path, Some(tenant.expose_secret())),
    )
    .await;
    check(
        &out,
        reached,
        Want::Denied(ResourceForbidden),
        "long name, globs",
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "glob matching is linear"
    );
    let encoded = format!("/collections/{}/points/search", "%FF".repeat(10_000));
    let (out, reached) = call(&svc, &calls, request("POST", &encoded, k)).await;
    check(
        &out,
        reached,
        Want::Denied(ResourceForbidden),
        "long invalid UTF-8 name",
    );
}

#[tokio::test]
async fn grpc_paths_with_odd_characters() {
    let fx = Fixture::new();
    let caller = key(&fx, "caller", &["pkg:call"], &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(table()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let k = Some(caller.expose_secret());
    let (out, reached) = call(&svc, &calls, grpc_request("/pkg.Svc/Method", k)).await;
    assert_allowed(&out, "the declared method");
    assert!(reached);
    for path in [
        "/pkg.Svc/Method%20x",
        "/pkg.Svc/Method%2F",
        "/pkg.Svc/",
        "/pkg.Svc",
        "//",
        "/",
        "/pkg.Svc//Method",
        "/pkg.Svc/Method/",
        "/pkg.Svc/Method/extra",
        "/pkg.Svc/method",
        "/PKG.SVC/Method",
        "/pkg%2ESvc/Method",
        "/pkg.Svc/Meth%00od",
        "/pkg.Svc/Method;x",
        "/pkg.Svc/Method~!$&'()*+,=:@",
    ] {
        let (out, reached) = call(&svc, &calls, grpc_request(path, k)).await;
        assert_grpc_denied(&out, 12, UnknownRoute, path);
        assert!(!reached, "{path}");
    }
}

/// A deterministic spray of odd paths (a fixed linear congruential generator over an
/// alphabet of path pieces): every answer is 200 or a 403 with a scope code, never a panic.
#[tokio::test]
async fn sprayed_paths_never_panic() {
    let fx = Fixture::new();
    let any = key(&fx, "any", &["*"], &["tenant-*"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(ScopeLayer::table(table()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let pieces = [
        "/",
        "//",
        "collections",
        "points",
        "search",
        "{collection}",
        "%",
        "%2F",
        "%FF",
        "%C3%A9",
        "%00",
        "tenant-",
        "a",
        "..",
        ".",
        "pkg.Svc",
        "Method",
        "?q=1",
        "%25",
        "~",
        "*",
    ];
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    let mut tried = 0;
    for _ in 0..3_000 {
        let len = next() % 10;
        let mut path = String::from("/");
        for _ in 0..len {
            path.push_str(pieces[next() % pieces.len()]);
        }
        let Ok(uri) = http::Uri::try_from(path.as_str()) else {
            continue;
        };
        tried += 1;
        let method = ["GET", "POST", "PUT"][next() % 3];
        let mut req = if next() % 2 == 0 {
            request(method, "/", Some(any.expose_secret()))
        } else {
            grpc_request("/", Some(any.expose_secret()))
        };
        *req.uri_mut() = uri;
        let (out, reached) = call(&svc, &calls, req).await;
        match out.denial {
            None => {
                assert_eq!(out.status, StatusCode::OK, "{path}");
                assert!(reached, "{path}");
            }
            Some(code) => {
                assert!(
                    matches!(code, UnknownRoute | ResourceForbidden),
                    "{path}: {code:?}"
                );
                assert!(!reached, "{path}");
            }
        }
    }
    assert!(tried > 2_000, "most sprayed paths are valid URIs ({tried})");
}

#[test]
fn invalid_rules_fail_at_build() {
    fn build(method: &str, pattern: &str, scope: &str) -> Result<RouteScopes, InvalidRule> {
        RouteScopes::builder().route(method, pattern, scope).build()
    }
    // Bad scopes.
    let too_long = format!("{}:read", "x".repeat(65));
    for scope in [
        "",
        "points",
        ":read",
        "points:",
        "a:b:c",
        "po ints:read",
        "points:réad",
        "**",
        too_long.as_str(),
    ] {
        let err = build("GET", "/x", scope).expect_err(scope);
        assert!(matches!(err, InvalidRule::Scope(_)), "{scope:?}: {err:?}");
        assert!(ScopeLayer::require(scope).is_err(), "require({scope:?})");
    }
    // Bad patterns.
    let long = format!("x{}", "/y".repeat(5_000));
    let too_deep: String = (0..33).map(|i| format!("/s{i}")).collect();
    for pattern in [
        "",
        "collections",
        "collections/{collection}",
        "/collections/{unclosed",
        "/collections/unopened}",
        "/collections/{a}/points/{a}",
        "/collections/{}",
        "/collections/{bad-name}",
        "/collections/{col lection}",
        "/collections/x{collection}",
        "/collections/{collection}x",
        "/collections/{{collection}}",
        "/has space",
        "/has?query",
        "/has#fragment",
        "/tab\there",
        "/nul\0",
        long.as_str(),
        too_deep.as_str(),
    ] {
        let err = build("GET", pattern, "points:read").expect_err(pattern);
        assert!(
            matches!(err, InvalidRule::Pattern { .. }),
            "{pattern:?}: {err:?}"
        );
        // The error names the pattern, shortened.
        let InvalidRule::Pattern { pattern: shown, .. } = &err else {
            unreachable!()
        };
        assert!(shown.chars().count() <= 128, "{pattern:?}");
        let _ = err.to_string();
        let public = RouteScopes::builder().public("GET", pattern).build();
        assert!(public.is_err(), "public({pattern:?})");
    }
    // Bad methods.
    for method in ["", "GE T", "GET\n", "(GET)", "GET/", "\u{e9}"] {
        let err = build(method, "/x", "points:read").expect_err(method);
        assert!(matches!(err, InvalidRule::Method(_)), "{method:?}: {err:?}");
    }
    // Accepted: method case, `*`, extension methods, gRPC paths, 32 segments, `.`-words.
    for (method, pattern) in [
        ("get", "/x"),
        ("*", "/x/{collection}"),
        ("PURGE", "/x"),
        ("POST", "/qdrant.Points/Search"),
        ("GET", "/"),
        ("GET", "/a/{b}/c/{d_1}"),
    ] {
        build(method, pattern, "points.v2:read-all")
            .unwrap_or_else(|e| panic!("{method} {pattern}: {e}"));
    }
    // One bad rule among good ones fails the whole table.
    let err = RouteScopes::builder()
        .route("GET", "/ok", "points:read")
        .grpc("pkg.Svc/Method", "points:read")
        .route("GET", "/ok2", "points:read")
        .build()
        .expect_err("gRPC path without a leading /");
    assert!(matches!(err, InvalidRule::Pattern { .. }));
    let err = RouteScopes::builder()
        .reads(
            "POST",
            ["/a/{collection}/search", "/a/{collection}/{collection}"],
            "points:read",
        )
        .build()
        .expect_err("duplicate parameter in reads");
    assert!(matches!(err, InvalidRule::Pattern { .. }));
}

#[test]
fn resource_in_path_is_validated() {
    let require = || ScopeLayer::require("points:write").expect("scope");
    assert!(require()
        .resource_in_path("/collections/{collection}/points", "collection")
        .is_ok());
    for (pattern, param) in [
        ("/collections/{collection}/points", "name"),
        ("/collections/points", "collection"),
        ("collections/{collection}", "collection"),
        ("/collections/{collection", "collection"),
        ("/c/{x}/{x}", "x"),
    ] {
        let err = require()
            .resource_in_path(pattern, param)
            .expect_err(pattern);
        assert!(
            matches!(err, InvalidRule::Pattern { .. }),
            "{pattern}: {err:?}"
        );
    }
}
