//! The axum `Authenticated` extractor over a real socket: it works behind the layer,
//! `Option<Authenticated>` is `None` on an open route, and `Authenticated` on a route that is
//! not behind the layer is a 500 `missing_principal` (a wiring mistake, never a silent pass).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use common::*;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, StatusCode};
use keygate::{Authenticated, ServiceBuilderExt};
use tower::ServiceBuilder;

fn with_key(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_str(key).expect("ascii"));
    h
}

#[tokio::test]
async fn the_authenticated_extractor() {
    let fx = Fixture::new();
    let key = fx
        .issue_with("alice-laptop", |r| r.owner = Some("alice".into()))
        .await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();

    let app = Router::new()
        .route(
            "/me",
            get(move |Authenticated(p): Authenticated| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move { format!("{} {}", p.name(), p.subject().unwrap_or("-")) }
            }),
        )
        .route(
            "/maybe-protected",
            get(|who: Option<Authenticated>| async move {
                who.map_or("anonymous".to_owned(), |a| a.name().to_owned())
            }),
        )
        .layer(fx.gate.auth_layer())
        // Routes added after `.layer` are not behind it.
        .route(
            "/open",
            get(|who: Option<Authenticated>| async move {
                who.map_or("anonymous".to_owned(), |a| a.name().to_owned())
            }),
        )
        .route(
            "/unwired",
            get(|Authenticated(p): Authenticated| async move { p.name().to_owned() }),
        );
    let addr = spawn_axum(app).await;
    let k = key.expose_secret();

    // Behind the layer.
    let (status, _, body) = send(addr, "/me", with_key(k)).await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"alice-laptop alice"[..])
    );
    let (status, _, body) = send(addr, "/maybe-protected", with_key(k)).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"alice-laptop"[..]));
    let (status, _, _) = send(addr, "/me", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the layer rejects first");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // An open route: `Option<Authenticated>` is None, even when a key is presented (nothing
    // resolved it).
    for headers in [HeaderMap::new(), with_key(k)] {
        let (status, _, body) = send(addr, "/open", headers).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"anonymous"[..]));
    }

    // `Authenticated` without the layer: 500 missing_principal, with or without a key.
    for headers in [HeaderMap::new(), with_key(k)] {
        let (status, headers, body) = send(addr, "/unwired", headers).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(headers[CONTENT_TYPE], "application/problem+json");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(json["code"], "missing_principal");
        assert_eq!(json["status"], 500);
        assert!(!lossy(&body).contains(k));
    }
}

/// The `ServiceBuilder` shortcut gives the same layer: an axum router behind
/// `ServiceBuilder::new().api_key_auth(&gate)`.
#[tokio::test]
async fn the_service_builder_shortcut_under_axum() {
    let fx = Fixture::new();
    let key = fx.issue("builder").await;
    let app = Router::new()
        .route(
            "/me",
            get(|a: Authenticated| async move { a.0.name().to_owned() }),
        )
        .layer(ServiceBuilder::new().api_key_auth(&fx.gate));
    let addr = spawn_axum(app).await;
    let (status, _, body) = send(addr, "/me", with_key(key.expose_secret())).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"builder"[..]));
    let (status, _, body) = send(addr, "/me", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["code"], "missing_key");
}
