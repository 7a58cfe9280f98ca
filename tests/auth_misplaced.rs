//! A key in the wrong place: still `missing_key` (keys are read only where configured), but
//! the detail says where something key-shaped was found and where keys go, never echoing
//! it; requests with no key-shaped value anywhere keep the plain detail.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use keygate::credentials::Credentials;
use keygate::{Denial, DenialCode};
use tower::{ServiceBuilder, ServiceExt};

type Body = Full<Bytes>;

const WHERE: &str = r#"send the key in the Authorization header as "Bearer <key>", the "x-api-key" header or the "api-key" header."#;

fn detail_for(place: &str) -> String {
    format!(
        "No API key was provided where keys are read. Something shaped like an API key was \
         found in {place}, where keys are not read (it is not shown here); {WHERE}"
    )
}

async fn send(
    fx: &Fixture,
    calls: &Arc<AtomicUsize>,
    req: Request<Body>,
) -> (StatusCode, Denial, serde_json::Value, String) {
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .service(counting_ok::<Body>(calls.clone()));
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    let denial = res.extensions().get::<Denial>().cloned().expect("a denial");
    let challenge = res.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = serde_json::from_slice(&body_bytes(res.into_body()).await).unwrap();
    (status, denial, body, challenge)
}

#[tokio::test]
async fn a_key_in_the_wrong_place_says_where_it_goes() {
    let fx = Fixture::new();
    let key = fx.issue("k").await;
    let secret = key.expose_secret();
    let calls = Arc::new(AtomicUsize::new(0));
    let rows: Vec<(&str, Request<Body>, String)> = vec![
        (
            "Authorization without a scheme",
            Request::get("/")
                .header("authorization", secret)
                .body(Body::default())
                .unwrap(),
            detail_for("the Authorization header without the Bearer scheme"),
        ),
        (
            "Authorization: Token",
            Request::get("/")
                .header("authorization", format!("Token {secret}"))
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the Authorization header with the "Token" scheme (only Bearer is read)"#),
        ),
        (
            "Authorization: ApiKey",
            Request::get("/")
                .header("authorization", format!("ApiKey {secret}"))
                .body(Body::default())
                .unwrap(),
            detail_for(
                r#"the Authorization header with the "ApiKey" scheme (only Bearer is read)"#,
            ),
        ),
        (
            "apikey header",
            Request::get("/")
                .header("apikey", secret)
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the "apikey" header"#),
        ),
        (
            "api_key header",
            Request::get("/")
                .header("api_key", secret)
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the "api_key" header"#),
        ),
        (
            "api_key query parameter (query not enabled)",
            Request::get(format!("/points?limit=3&api_key={secret}"))
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the query parameter "api_key""#),
        ),
        (
            "a cookie",
            Request::get("/")
                .header("cookie", format!("session=1; token={secret}"))
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the "cookie" header"#),
        ),
        (
            // Only the configured prefix and `_`: a truncated key is key-shaped too.
            "a truncated key",
            Request::get("/")
                .header("apikey", &secret[..10])
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the "apikey" header"#),
        ),
        (
            // A header name that is long or has odd characters is described, not echoed.
            "an odd header name",
            Request::get("/")
                .header("x-weird!name", secret)
                .body(Body::default())
                .unwrap(),
            detail_for("a request header"),
        ),
        (
            // The key format with another prefix.
            "another prefix",
            Request::get("/")
                .header("x-token", format!("sk_live_{}", &secret[3..]))
                .body(Body::default())
                .unwrap(),
            detail_for(r#"the "x-token" header"#),
        ),
    ];
    for (what, req, detail) in rows {
        let (status, denial, body, challenge) = send(&fx, &calls, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(denial.code(), DenialCode::MissingKey, "{what}");
        assert_eq!(body["code"], "missing_key", "{what}");
        assert_eq!(body["detail"], detail.as_str(), "{what}");
        assert_eq!(challenge, r#"Bearer realm="keygate""#, "{what}");
        let text = body.to_string();
        assert!(
            !text.contains(&secret[3..15]),
            "{what}: the key id is never echoed"
        );
        assert!(!format!("{denial:?}").contains(&secret[3..15]), "{what}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn nothing_key_shaped_keeps_the_plain_detail() {
    let fx = Fixture::new();
    let calls = Arc::new(AtomicUsize::new(0));
    for req in [
        Request::get("/").body(Body::default()).unwrap(),
        Request::get("/?api_key=hello&q=kg")
            .body(Body::default())
            .unwrap(),
        Request::get("/")
            .header("authorization", "Basic dXNlcjpwYXNz")
            .header("user-agent", "curl/8.5 kg_")
            .header("x-request-id", "req_kg_1")
            .body(Body::default())
            .unwrap(),
    ] {
        let (status, _, body, _) = send(&fx, &calls, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["detail"], "No API key was provided.");
    }
}

#[tokio::test]
async fn where_keys_go_follows_the_configured_sources() {
    let fx = Fixture::with(
        |v| v,
        |g| {
            g.credentials(
                Credentials::new([])
                    .with_header("x-key".parse().unwrap())
                    .with_query("key"),
            )
        },
    );
    let key = fx.issue("k").await;
    let calls = Arc::new(AtomicUsize::new(0));
    // Bearer is not configured here, so a bearer token is a key in the wrong place.
    let req = Request::get("/")
        .header("authorization", format!("Bearer {}", key.expose_secret()))
        .body(Body::default())
        .unwrap();
    let (status, _, body, _) = send(&fx, &calls, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body["detail"],
        "No API key was provided where keys are read. Something shaped like an API key was \
         found in the Authorization header (Bearer), where keys are not read (it is not shown \
         here); send the key in the \"x-key\" header or the \"key\" query parameter."
    );
    // And the configured places still work.
    let req = Request::get(format!("/?key={}", key.expose_secret()))
        .body(Body::default())
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .service(counting_ok::<Body>(calls.clone()));
    assert_eq!(svc.oneshot(req).await.unwrap().status(), StatusCode::OK);
}
