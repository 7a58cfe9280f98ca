//! `ApiKeyAuthLayer::strip_credentials(true)`: the inner service never sees the key, in
//! process, under axum, plain hyper and tonic.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use keygate::credentials::Credentials;
use keygate::{KeyGate, Principal};
use tonic::metadata::MetadataMap;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::{ServiceBuilder, ServiceExt};

const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "x-api-key", "api-key"];

/// What the inner service saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    headers: HeaderMap,
    uri: Uri,
    principal: Option<Principal>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

fn last(log: &Log) -> Seen {
    log.lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("the inner service was called")
}

fn assert_no_credential(seen: &Seen, what: &str) {
    for name in CREDENTIAL_HEADERS {
        assert!(
            seen.headers.get(name).is_none(),
            "{what}: the inner service saw {name}: {:?}",
            seen.headers.get(name)
        );
    }
    assert!(seen.principal.is_some(), "{what}: principal inserted");
}

/// The protected in-process service: the layer of `gate` (stripping when `strip`) in front of
/// a service recording what it sees.
async fn call(gate: &KeyGate, strip: bool, req: Request<Full<Bytes>>, log: &Log) -> StatusCode {
    let log = log.clone();
    let svc = ServiceBuilder::new()
        .layer(gate.auth_layer().strip_credentials(strip))
        .service(tower::service_fn(move |req: Request<Full<Bytes>>| {
            log.lock().expect("lock").push(Seen {
                headers: req.headers().clone(),
                uri: req.uri().clone(),
                principal: keygate::RequestContext::of(req.extensions())
                    .and_then(|c| c.principal())
                    .cloned(),
            });
            async { Ok::<_, std::convert::Infallible>(Response::new(Full::<Bytes>::default())) }
        }));
    svc.oneshot(req).await.expect("infallible").status()
}

fn request(uri: &str, headers: &[(&'static str, String)]) -> Request<Full<Bytes>> {
    let mut req = Request::get(uri).body(Full::default()).expect("request");
    for (n, v) in headers {
        req.headers_mut()
            .append(*n, HeaderValue::from_str(v).expect("header value"));
    }
    req
}

#[tokio::test]
async fn stripped_credentials_do_not_reach_the_inner_service() {
    let fx = Fixture::new();
    let key = fx.issue("strip").await;
    let k = key.expose_secret().to_owned();
    let log: Log = Arc::default();

    let cases: Vec<(&str, Vec<(&'static str, String)>)> = vec![
        ("Bearer", vec![("authorization", format!("Bearer {k}"))]),
        (
            "lower-case bearer",
            vec![("authorization", format!("bearer {k}"))],
        ),
        ("X-API-Key", vec![("x-api-key", k.clone())]),
        ("api-key", vec![("api-key", k.clone())]),
        (
            "all three",
            vec![
                ("authorization", format!("Bearer {k}")),
                ("x-api-key", k.clone()),
                ("api-key", k.clone()),
            ],
        ),
        (
            "twice in X-API-Key",
            vec![("x-api-key", k.clone()), ("x-api-key", k.clone())],
        ),
    ];
    for (what, headers) in &cases {
        let mut headers = headers.clone();
        headers.push(("x-request-id", "r-1".into()));
        let status = call(&fx.gate, true, request("/", &headers), &log).await;
        assert_eq!(status, StatusCode::OK, "{what}");
        let seen = last(&log);
        assert_no_credential(&seen, what);
        assert_eq!(
            seen.headers["x-request-id"], "r-1",
            "{what}: other headers kept"
        );
    }

    // Control: without stripping the inner service does see the key.
    let status = call(
        &fx.gate,
        false,
        request("/", &[("x-api-key", k.clone())]),
        &log,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(last(&log).headers["x-api-key"], k.as_str());
}

#[tokio::test]
async fn another_scheme_in_authorization_is_left_alone() {
    let fx = Fixture::new();
    let key = fx.issue("strip").await;
    let log: Log = Arc::default();
    let req = request(
        "/",
        &[
            ("authorization", "Basic dXNlcjpwYXNz".into()),
            ("x-api-key", key.expose_secret().into()),
        ],
    );
    assert_eq!(call(&fx.gate, true, req, &log).await, StatusCode::OK);
    let seen = last(&log);
    assert_eq!(seen.headers["authorization"], "Basic dXNlcjpwYXNz");
    assert!(seen.headers.get("x-api-key").is_none());
}

#[tokio::test]
async fn a_key_in_the_query_string_is_stripped_from_the_uri() {
    let fx = Fixture::with(
        |v| v,
        |g| g.credentials(Credentials::default().with_query("api_key")),
    );
    let key = fx.issue("query").await;
    let log: Log = Arc::default();
    let uri = format!("/points?x=1&api_key={}&y=2", key.expose_secret());
    assert_eq!(
        call(&fx.gate, true, request(&uri, &[]), &log).await,
        StatusCode::OK
    );
    let seen = last(&log);
    assert_eq!(seen.uri, "/points?x=1&y=2");
    assert!(seen.principal.is_some());
}

/// Surrounding whitespace is accepted (RFC 9110 field values), so the header that carried the
/// accepted key must be stripped too. An in-process request (or a framework that keeps the
/// whitespace) can hand the layer ` \tBearer <key>` unchanged.
#[tokio::test]
async fn a_padded_bearer_header_is_stripped_too() {
    let fx = Fixture::new();
    let key = fx.issue("padded").await;
    let log: Log = Arc::default();
    for value in [
        format!(" Bearer {}", key.expose_secret()),
        format!("\tbearer {} ", key.expose_secret()),
    ] {
        let req = request("/", &[("authorization", value.clone())]);
        assert_eq!(
            call(&fx.gate, true, req, &log).await,
            StatusCode::OK,
            "{value:?} is accepted"
        );
        assert_no_credential(&last(&log), "padded Bearer");
    }
}

fn headers_with(name: &'static str, value: String) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(name, HeaderValue::from_str(&value).expect("ascii"));
    h
}

#[tokio::test]
async fn stripping_under_axum_and_hyper() {
    let fx = Fixture::new();
    let key = fx.issue("strip").await;
    let k = key.expose_secret();

    // axum: the handler answers with the names of the credential headers it saw.
    let app = Router::new()
        .route(
            "/",
            get(|headers: HeaderMap| async move {
                CREDENTIAL_HEADERS
                    .iter()
                    .filter(|n| headers.contains_key(**n))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(",")
            }),
        )
        .layer(fx.gate.auth_layer().strip_credentials(true));
    let axum_addr = spawn_axum(app).await;

    // hyper: same, with a plain service_fn.
    let svc =
        ServiceBuilder::new()
            .layer(fx.gate.auth_layer().strip_credentials(true))
            .service(tower::service_fn(|req: Request<hyper::body::Incoming>| {
                let seen = CREDENTIAL_HEADERS
                    .iter()
                    .filter(|n| req.headers().contains_key(**n))
                    .copied()
                    .collect::<Vec<_>>()
                    .join(",");
                async move {
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(seen))))
                }
            }));
    let hyper_addr = spawn_hyper(svc).await;

    for addr in [axum_addr, hyper_addr] {
        for headers in [
            headers_with("authorization", format!("Bearer {k}")),
            headers_with("x-api-key", k.to_owned()),
            headers_with("api-key", k.to_owned()),
        ] {
            let (status, _, body) = send(addr, "/", headers.clone()).await;
            assert_eq!(status, StatusCode::OK, "{headers:?}");
            assert_eq!(&body[..], b"", "the handler saw {}", lossy(&body));
        }
    }
}

#[tokio::test]
async fn stripping_under_tonic() {
    let fx = Fixture::new();
    let key = fx.issue("grpc").await;
    let saw_credential = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(AtomicUsize::new(0));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (saw, n) = (saw_credential.clone(), calls.clone());
    let inspect = tower::util::MapRequestLayer::new(move |req: Request<tonic::body::Body>| {
        n.fetch_add(1, Ordering::SeqCst);
        if CREDENTIAL_HEADERS
            .iter()
            .any(|name| req.headers().contains_key(*name))
        {
            saw.fetch_add(1, Ordering::SeqCst);
        }
        req
    });
    let server = tonic::transport::Server::builder()
        .layer(fx.gate.auth_layer().strip_credentials(true))
        .layer(inspect)
        .add_service(health)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(server);

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut client = HealthClient::new(channel);
    for (name, value) in [
        ("authorization", format!("Bearer {}", key.expose_secret())),
        ("x-api-key", key.expose_secret().to_owned()),
        ("api-key", key.expose_secret().to_owned()),
    ] {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        *req.metadata_mut() = MetadataMap::from_headers(headers_with(name, value));
        let res = client.check(req).await.expect("authenticated");
        assert_eq!(res.into_inner().status(), ServingStatus::Serving);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(saw_credential.load(Ordering::SeqCst), 0);
}
