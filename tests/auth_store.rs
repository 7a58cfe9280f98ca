//! What `ApiKeyAuthLayer` asks the key store, counted: malformed keys never reach it, a
//! repeated unknown key reaches it once, an outage on a cache miss fails closed (503
//! `store_unavailable`), and a request's key is verified once however many layers (or
//! `KeyGate::resolve` calls) look at it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::header::{CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use keygate::{Denial, DenialCode, KeyGate, Principal};
use tower::{Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;

fn get_with(headers: &[(&'static str, &str)]) -> Req {
    let mut req = Request::get("/").body(Full::default()).expect("request");
    for (n, v) in headers {
        req.headers_mut()
            .append(*n, HeaderValue::from_str(v).expect("header value"));
    }
    req
}

/// The layer of `gate` in front of a counting 200 service.
fn protected(
    gate: &KeyGate,
    calls: &Arc<AtomicUsize>,
) -> impl Service<
    Req,
    Response = Response<keygate::reject::ResponseBody<Full<Bytes>>>,
    Error = std::convert::Infallible,
> + Clone {
    ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service(counting_ok::<Full<Bytes>>(calls.clone()))
}

async fn code_of<S, B>(svc: &S, req: Req) -> (StatusCode, Option<DenialCode>)
where
    S: Service<Req, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
{
    let res = svc.clone().oneshot(req).await.expect("response");
    (
        res.status(),
        res.extensions().get::<Denial>().map(Denial::code),
    )
}

#[tokio::test]
async fn missing_and_malformed_keys_never_reach_the_store() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = protected(&fx.gate, &calls);

    let rows: Vec<Row> = matrix(&keys)
        .into_iter()
        .filter(|r| {
            matches!(
                r.expect,
                Expect::Denied {
                    exact: DenialCode::MissingKey | DenialCode::MalformedKey,
                    ..
                }
            )
        })
        .collect();
    assert!(rows.len() >= 15, "{} rows", rows.len());
    for row in &rows {
        for extra in [&[][..], &[("content-type", "application/grpc")][..]] {
            let res = svc
                .clone()
                .oneshot(row.request(extra, Full::default()))
                .await
                .expect("infallible");
            let Expect::Denied { exact, .. } = row.expect else {
                unreachable!()
            };
            assert_eq!(
                res.extensions().get::<Denial>().map(Denial::code),
                Some(exact),
                "{}",
                row.name
            );
        }
    }
    // More shapes that fail parsing: each stops before any lookup.
    let valid = keys.valid.expose_secret();
    let too_long = format!("{valid}{valid}");
    let bad_char = format!("{}-{}", &valid[..10], &valid[11..]);
    let short = &valid[..valid.len() - 1];
    for text in [
        "kg_",
        "kg",
        "nonsense",
        "kg_0123456789",
        short,
        &too_long,
        &bad_char,
        &valid.replacen("kg_", "KG_", 1),
    ] {
        let (status, code) = code_of(&svc, get_with(&[("x-api-key", text)])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
        assert_eq!(code, Some(DenialCode::MalformedKey), "{text}");
    }
    assert_eq!(
        fx.store.gets(),
        0,
        "a malformed or missing key reached the store"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // The counter works: a fresh, well-formed key is looked up once, then cached.
    let (status, _) = code_of(&svc, get_with(&[("x-api-key", valid)])).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = code_of(&svc, get_with(&[("x-api-key", valid)])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fx.store.gets(), 1);
}

#[tokio::test]
async fn malformed_keys_never_reach_the_store_over_axum() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum(app).await;
    let mut sent = 0;
    for row in matrix(&keys) {
        if let Expect::Denied {
            exact: DenialCode::MissingKey | DenialCode::MalformedKey,
            ..
        } = row.expect
        {
            let (status, _, _) = send(addr, "/", row.header_map()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{}", row.name);
            sent += 1;
        }
    }
    assert!(sent >= 15);
    assert_eq!(fx.store.gets(), 0);
}

#[tokio::test]
async fn a_repeated_unknown_key_reaches_the_store_once() {
    let fx = Fixture::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = protected(&fx.gate, &calls);
    let (unknown, _) = keygate::KeyRecord::generate(
        &keygate::Prefix::default(),
        fx.gate.verifier().hasher(),
        "never stored",
        fx.gate.clock().now(),
    )
    .expect("rng");
    let same_id_other_secret = wrong_secret(&unknown);

    for i in 0..5 {
        let (status, code) =
            code_of(&svc, get_with(&[("x-api-key", unknown.expose_secret())])).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "attempt {i}");
        assert_eq!(code, Some(DenialCode::InvalidKey), "attempt {i}");
    }
    // The negative cache is keyed by id: another secret for the same unknown id, and gRPC,
    // are answered from it too.
    let (_, code) = code_of(&svc, get_with(&[("x-api-key", &same_id_other_secret)])).await;
    assert_eq!(code, Some(DenialCode::InvalidKey));
    let (status, code) = code_of(
        &svc,
        get_with(&[
            ("x-api-key", unknown.expose_secret()),
            ("content-type", "application/grpc"),
        ]),
    )
    .await;
    assert_eq!(
        (status, code),
        (StatusCode::OK, Some(DenialCode::InvalidKey))
    );
    assert_eq!(fx.store.gets(), 1);
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Control: without the negative cache every attempt is a lookup.
    let fx = Fixture::with(|v| v.negative_capacity(0), |g| g);
    let svc = protected(&fx.gate, &calls);
    for _ in 0..3 {
        let (_, code) = code_of(&svc, get_with(&[("x-api-key", unknown.expose_secret())])).await;
        assert_eq!(code, Some(DenialCode::InvalidKey));
    }
    assert_eq!(fx.store.gets(), 3);
}

fn assert_store_unavailable_http(status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers[CONTENT_TYPE], "application/problem+json");
    assert_eq!(headers[RETRY_AFTER], "1");
    assert!(
        headers.get(WWW_AUTHENTICATE).is_none(),
        "503 is not a credential problem"
    );
    let json: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    assert_eq!(json["code"], "store_unavailable");
    assert_eq!(json["status"], 503);
}

#[tokio::test]
async fn a_store_outage_on_a_cache_miss_is_503_store_unavailable() {
    let fx = Fixture::new();
    let key = fx.issue("fresh").await;
    let (unknown, _) = keygate::KeyRecord::generate(
        &keygate::Prefix::default(),
        fx.gate.verifier().hasher(),
        "never stored",
        fx.gate.clock().now(),
    )
    .expect("rng");
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = protected(&fx.gate, &calls);
    fx.store.set_down(true);

    // HTTP, for a known key and for an unknown one: the store could not say, so fail closed.
    for presented in [key.expose_secret(), unknown.expose_secret()] {
        let res = svc
            .clone()
            .oneshot(get_with(&[("x-api-key", presented)]))
            .await
            .expect("infallible");
        let (parts, body) = res.into_parts();
        let body = body_bytes(body).await;
        assert_store_unavailable_http(parts.status, &parts.headers, &body);
        let denial = parts.extensions.get::<Denial>().expect("Denial");
        assert_eq!(denial.code(), DenialCode::StoreUnavailable);
        assert_eq!(denial.retry_after(), Some(Duration::from_secs(1)));
    }
    // gRPC: UNAVAILABLE (14), never a bare HTTP 503.
    let res = svc
        .clone()
        .oneshot(get_with(&[
            ("x-api-key", key.expose_secret()),
            ("content-type", "application/grpc"),
        ]))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "14");
    assert!(res.headers()["grpc-message"]
        .to_str()
        .expect("ascii")
        .starts_with("store_unavailable"));
    // Over a real socket (axum).
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum(app).await;
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", key.expose_secret().parse().expect("ascii"));
    let (status, res_headers, body) = send(addr, "/", headers.clone()).await;
    assert_store_unavailable_http(status, &res_headers, &body);

    assert_eq!(calls.load(Ordering::SeqCst), 0, "fail closed");
    assert_eq!(fx.store.gets(), 4, "every miss asked the store");

    // The outage is not remembered: once the store is back, the key works.
    fx.store.set_down(false);
    let (status, _, body) = send(addr, "/", headers).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let (status, code) = code_of(&svc, get_with(&[("x-api-key", unknown.expose_secret())])).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, Some(DenialCode::InvalidKey))
    );
}

#[tokio::test]
async fn a_cached_key_keeps_working_during_an_outage() {
    let fx = Fixture::new();
    let key = fx.issue("warm").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = protected(&fx.gate, &calls);
    let (status, _) = code_of(&svc, get_with(&[("x-api-key", key.expose_secret())])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fx.store.gets(), 1);
    fx.store.set_down(true);
    let (status, _) = code_of(&svc, get_with(&[("x-api-key", key.expose_secret())])).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fx.store.gets(), 1, "a cached key is not looked up");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A verifier that reads the store on every verification (no reuse of cached records, no
/// negative cache): any second verification of a request's key would show in the counter.
fn always_lookup() -> Fixture {
    Fixture::with(
        |v| {
            v.refresh_after(Duration::ZERO)
                .max_stale(Duration::ZERO)
                .negative_capacity(0)
        },
        |g| g,
    )
}

/// An inner service recording the principal it was given.
fn recording(
    seen: Arc<Mutex<Vec<Option<Principal>>>>,
) -> impl Service<
    Req,
    Response = Response<Full<Bytes>>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<Response<Full<Bytes>>, std::convert::Infallible>,
    > + Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |req: Req| {
        seen.lock().expect("lock").push(
            keygate::RequestContext::of(req.extensions())
                .and_then(|c| c.principal())
                .cloned(),
        );
        async { Ok(Response::new(Full::new(Bytes::from_static(b"ok")))) }
    })
}

#[tokio::test]
async fn two_stacked_auth_layers_verify_once() {
    let fx = always_lookup();
    let key = fx.issue("fresh").await;
    let (unknown, _) = keygate::KeyRecord::generate(
        &keygate::Prefix::default(),
        fx.gate.verifier().hasher(),
        "never stored",
        fx.gate.clock().now(),
    )
    .expect("rng");
    let seen = Arc::new(Mutex::new(Vec::new()));

    // Control: one layer, two requests: two lookups (the setup caches nothing).
    let single = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .service(recording(seen.clone()));
    for _ in 0..2 {
        let res = single
            .clone()
            .oneshot(get_with(&[("x-api-key", key.expose_secret())]))
            .await
            .expect("infallible");
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(fx.store.gets(), 2);

    // Two layers, one request: one lookup.
    let stacked = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(fx.gate.auth_layer())
        .service(recording(seen.clone()));
    let res = stacked
        .clone()
        .oneshot(get_with(&[("x-api-key", key.expose_secret())]))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(fx.store.gets(), 3);
    let last = seen.lock().expect("lock").last().cloned().flatten();
    assert_eq!(last.map(|p| p.key_id()), Some(key.id()));

    // An unknown key: the outer layer asks once and rejects.
    let (status, code) = code_of(
        &stacked,
        get_with(&[("x-api-key", unknown.expose_secret())]),
    )
    .await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, Some(DenialCode::InvalidKey))
    );
    assert_eq!(fx.store.gets(), 4);

    // The same under axum, over a socket: two `.layer(auth)` calls, one lookup per request.
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(fx.gate.auth_layer())
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum(app).await;
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", key.expose_secret().parse().expect("ascii"));
    let (status, _, _) = send(addr, "/", headers).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fx.store.gets(), 5);
}

type Verdicts = Arc<Mutex<Vec<Result<Principal, Denial>>>>;

/// A custom layer calling `KeyGate::resolve` before the auth layer; records its verdicts.
fn resolve_then_auth(
    gate: &KeyGate,
    verdicts: Verdicts,
    seen: Arc<Mutex<Vec<Option<Principal>>>>,
) -> impl Service<
    Req,
    Response = Response<keygate::reject::ResponseBody<Full<Bytes>>>,
    Error = std::convert::Infallible,
> + Clone {
    let inner = ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service(recording(seen));
    let gate = gate.clone();
    tower::service_fn(move |mut req: Req| {
        let gate = gate.clone();
        let inner = inner.clone();
        let verdicts = verdicts.clone();
        async move {
            let verdict = gate.resolve(&mut req).await;
            // A second call in the same layer is answered from the memo too.
            let again = gate.resolve(&mut req).await;
            assert_eq!(
                again.as_ref().map(Principal::key_id).map_err(Denial::code),
                verdict
                    .as_ref()
                    .map(Principal::key_id)
                    .map_err(Denial::code)
            );
            verdicts.lock().expect("lock").push(verdict);
            inner.oneshot(req).await
        }
    })
}

#[tokio::test]
async fn resolve_in_a_custom_layer_then_the_auth_layer_verifies_once() {
    let fx = always_lookup();
    let key = fx.issue("fresh").await;
    let revoked = fx
        .issue_with("revoked", |r| r.status = keygate::KeyStatus::Revoked)
        .await;
    let (unknown, _) = keygate::KeyRecord::generate(
        &keygate::Prefix::default(),
        fx.gate.verifier().hasher(),
        "never stored",
        fx.gate.clock().now(),
    )
    .expect("rng");
    let verdicts: Verdicts = Arc::default();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = resolve_then_auth(&fx.gate, verdicts.clone(), seen.clone());

    // A fresh key: one lookup; the handler gets the very principal `resolve` produced.
    let res = svc
        .clone()
        .oneshot(get_with(&[(
            "authorization",
            &format!("Bearer {}", key.expose_secret()),
        )]))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(fx.store.gets(), 1);
    let resolved = verdicts.lock().expect("lock")[0].clone().expect("resolved");
    let handed = seen.lock().expect("lock")[0].clone().expect("principal");
    assert!(
        Principal::ptr_eq(&resolved, &handed),
        "the memoized principal"
    );

    // An unknown key (negative cache off): one lookup, and the auth layer's answer.
    let (status, code) = code_of(&svc, get_with(&[("x-api-key", unknown.expose_secret())])).await;
    assert_eq!(
        (status, code),
        (StatusCode::UNAUTHORIZED, Some(DenialCode::InvalidKey))
    );
    assert_eq!(fx.store.gets(), 2);

    // A revoked key: the memoized failure keeps its exact code; the client sees invalid_key.
    let res = svc
        .clone()
        .oneshot(get_with(&[("api-key", revoked.expose_secret())]))
        .await
        .expect("infallible");
    assert_eq!(fx.store.gets(), 3);
    assert_eq!(
        verdicts.lock().expect("lock")[2]
            .as_ref()
            .map_err(Denial::code)
            .err(),
        Some(DenialCode::RevokedKey)
    );
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.extensions().get::<Denial>().map(Denial::code),
        Some(DenialCode::RevokedKey)
    );
    let body = body_bytes(res.into_body()).await;
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(json["code"], "invalid_key");

    assert_eq!(
        seen.lock().expect("lock").len(),
        1,
        "only the valid key got through"
    );
}

#[tokio::test]
async fn the_resolution_is_readable_from_the_extensions() {
    let fx = Fixture::new();
    let key = fx.issue("reader").await;
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .service(tower::service_fn(move |req: Req| {
            let r = keygate::resolution(req.extensions())
                .map(|r| r.map(Principal::key_id).map_err(Denial::code));
            *seen2.lock().expect("lock") = Some(r);
            async { Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default())) }
        }));
    let res = svc
        .oneshot(get_with(&[("x-api-key", key.expose_secret())]))
        .await
        .expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(*seen.lock().expect("lock"), Some(Some(Ok(key.id()))));
}
