//! The bad-input matrix of the authentication layer under every way of running `ApiKeyAuthLayer`: in-process
//! (`ServiceBuilder` + `oneshot`, HTTP and gRPC), axum 0.8, plain hyper 1 and tonic 0.14 over
//! loopback sockets, and raw HTTP/1.1 bytes written to the axum and hyper servers.
//!
//! Every row asserts its documented status and code, and that the inner service is called
//! exactly once for an accepted row and never for a denied one.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use keygate::{Denial, KeyGate};
use tonic::metadata::MetadataMap;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::{ServiceBuilder, ServiceExt};

fn count(calls: &AtomicUsize) -> usize {
    calls.load(Ordering::SeqCst)
}

/// Asserts the inner service was called once for an accepted row and never for a denied one.
fn assert_calls(row: &Row, before: usize, after: usize) {
    let expected = match row.expect {
        Expect::Allowed => 1,
        Expect::Denied { .. } => 0,
    };
    assert_eq!(
        after - before,
        expected,
        "{}: inner service calls (expected {expected})",
        row.name
    );
}

#[tokio::test]
async fn matrix_in_process_http() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .service(counting_ok::<Full<Bytes>>(calls.clone()));
    let rows = matrix(&keys);
    assert!(rows.len() >= 25);
    for row in &rows {
        let before = count(&calls);
        let res = svc
            .clone()
            .oneshot(row.request(&[], Full::default()))
            .await
            .expect("infallible");
        assert_calls(row, before, count(&calls));
        let (parts, body) = res.into_parts();
        let body = body_bytes(body).await;
        assert_http(row, parts.status, &parts.headers, &body);
        match row.expect {
            Expect::Allowed => {
                assert_eq!(&body[..], b"ok", "{}", row.name);
                assert!(parts.extensions.get::<Denial>().is_none(), "{}", row.name);
            }
            Expect::Denied { exact, .. } => {
                let denial = parts
                    .extensions
                    .get::<Denial>()
                    .unwrap_or_else(|| panic!("{}: no Denial extension", row.name));
                assert_eq!(denial.code(), exact, "{}", row.name);
            }
        }
    }
}

#[tokio::test]
async fn matrix_in_process_grpc() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .service(counting_ok::<Full<Bytes>>(calls.clone()));
    for content_type in ["application/grpc", "application/grpc+proto"] {
        for row in &matrix(&keys) {
            let before = count(&calls);
            let res = svc
                .clone()
                .oneshot(row.request(&[("content-type", content_type)], Full::default()))
                .await
                .expect("infallible");
            assert_calls(row, before, count(&calls));
            let (parts, body) = res.into_parts();
            let body = body_bytes(body).await;
            match row.expect {
                Expect::Allowed => assert_eq!(parts.status, StatusCode::OK, "{}", row.name),
                Expect::Denied { exact, .. } => {
                    assert_grpc_denied(row, parts.status, &parts.headers);
                    assert!(body.is_empty(), "{}: trailers-only has no body", row.name);
                    assert_eq!(
                        parts.extensions.get::<Denial>().map(Denial::code),
                        Some(exact),
                        "{}",
                        row.name
                    );
                }
            }
        }
    }
}

async fn counted_axum(gate: &KeyGate, calls: Arc<AtomicUsize>) -> SocketAddr {
    let app = Router::new()
        .route(
            "/",
            get(move || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { "ok" }
            }),
        )
        .layer(gate.auth_layer());
    spawn_axum(app).await
}

async fn counted_hyper(gate: &KeyGate, calls: Arc<AtomicUsize>) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service(counting_ok::<hyper::body::Incoming>(calls));
    spawn_hyper(svc).await
}

#[tokio::test]
async fn matrix_axum_over_loopback() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = counted_axum(&fx.gate, calls.clone()).await;
    for row in &matrix(&keys) {
        let before = count(&calls);
        let (status, headers, body) = send(addr, "/", row.header_map()).await;
        assert_calls(row, before, count(&calls));
        assert_http(row, status, &headers, &body);
    }
}

#[tokio::test]
async fn matrix_hyper_over_loopback() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = counted_hyper(&fx.gate, calls.clone()).await;
    for row in &matrix(&keys) {
        let before = count(&calls);
        let (status, headers, body) = send(addr, "/", row.header_map()).await;
        assert_calls(row, before, count(&calls));
        assert_http(row, status, &headers, &body);
    }
}

/// The same rows as raw bytes on the wire (no client library in between), against both
/// servers: what arrives is exactly what the row says, non-UTF-8 bytes included.
#[tokio::test]
async fn matrix_raw_http1_bytes_to_axum_and_hyper() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let servers = [
        ("axum", counted_axum(&fx.gate, calls.clone()).await),
        ("hyper", counted_hyper(&fx.gate, calls.clone()).await),
    ];
    for (server, addr) in servers {
        for row in &matrix(&keys) {
            let before = count(&calls);
            let (status, headers, body) = send_raw(addr, &raw_head(row)).await;
            assert_calls(row, before, count(&calls));
            let mut labelled = row.clone();
            labelled.name = Box::leak(format!("{server}: {}", row.name).into_boxed_str());
            assert_http(&labelled, status, &headers, &body);
        }
    }
}

/// Serves the gRPC health service behind the auth layer with tonic; `calls` counts the
/// requests that reach the service.
async fn spawn_tonic(gate: &KeyGate, calls: Arc<AtomicUsize>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (reporter, health) = tonic_health::server::health_reporter();
    let counter =
        tower::util::MapRequestLayer::new(move |req: http::Request<tonic::body::Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            req
        });
    let server = tonic::transport::Server::builder()
        // room for the 16 KiB rows (hyper's HTTP/2 default is 16 KiB for the whole list)
        .http2_max_header_list_size(64 * 1024)
        .layer(gate.auth_layer())
        .layer(counter)
        .add_service(health)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(async move {
        let _reporter = reporter;
        server.await.expect("tonic server");
    });
    addr
}

async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

fn check_request(metadata: MetadataMap) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    *req.metadata_mut() = metadata;
    req
}

#[tokio::test]
async fn matrix_tonic_over_loopback() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic(&fx.gate, calls.clone()).await;
    let mut client = health_client(addr).await;
    let mut sent = 0;
    for row in &matrix(&keys) {
        let before = count(&calls);
        let result = client
            .check(check_request(MetadataMap::from_headers(row.header_map())))
            .await;
        assert_calls(row, before, count(&calls));
        sent += 1;
        match row.expect {
            Expect::Allowed => {
                let res = result.unwrap_or_else(|s| panic!("{}: {s:?}", row.name));
                assert_eq!(
                    res.into_inner().status(),
                    ServingStatus::Serving,
                    "{}",
                    row.name
                );
            }
            Expect::Denied { public, .. } => {
                let status = result.expect_err(row.name);
                assert_eq!(
                    status.code(),
                    tonic::Code::Unauthenticated,
                    "{}: {status:?}",
                    row.name
                );
                assert!(
                    status.message().starts_with(public.as_str()),
                    "{}: grpc-message {:?}",
                    row.name,
                    status.message()
                );
            }
        }
    }
    assert_eq!(sent, matrix(&keys).len());
}

/// Sends one gRPC-shaped HTTP/2 request (POST, `content-type: application/grpc`, empty body)
/// with hyper's HTTP/2 client, returning what came over the wire.
async fn send_h2(addr: SocketAddr, row: &Row) -> (StatusCode, http::HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    for (name, value) in row.header_map().iter() {
        req.headers_mut().append(name.clone(), value.clone());
    }
    let res = sender.send_request(req).await.expect("response");
    let (parts, body) = res.into_parts();
    (parts.status, parts.headers, body_bytes(body).await)
}

/// What the tonic server puts on the wire for each row: a denied row is HTTP 200 with a
/// trailers-only `grpc-status: 16` (not a bare 401, which a gRPC client would also map to
/// UNAUTHENTICATED but without the message).
#[tokio::test]
async fn matrix_grpc_wire_format_from_the_tonic_server() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic(&fx.gate, calls.clone()).await;
    for row in &matrix(&keys) {
        let before = count(&calls);
        let (status, headers, body) = send_h2(addr, row).await;
        assert_calls(row, before, count(&calls));
        match row.expect {
            Expect::Allowed => assert_eq!(status, StatusCode::OK, "{}", row.name),
            Expect::Denied { .. } => {
                assert_grpc_denied(row, status, &headers);
                assert!(body.is_empty(), "{}", row.name);
            }
        }
    }
}

/// The two cases the issue spells out for tonic, with typed metadata: no key is
/// UNAUTHENTICATED naming `missing_key`; a valid key (Bearer or `x-api-key`) gets SERVING.
#[tokio::test]
async fn tonic_client_without_key_is_unauthenticated_with_key_serving() {
    let fx = Fixture::new();
    let key = fx.issue("grpc").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = spawn_tonic(&fx.gate, calls.clone()).await;
    let mut client = health_client(addr).await;

    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert_eq!(status.message(), "missing_key: No API key was provided.");
    assert_eq!(count(&calls), 0);

    let mut bearer = MetadataMap::new();
    bearer.insert(
        "authorization",
        format!("Bearer {}", key.expose_secret())
            .parse()
            .expect("ascii"),
    );
    let mut x_api_key = MetadataMap::new();
    x_api_key.insert("x-api-key", key.expose_secret().parse().expect("ascii"));
    for metadata in [bearer, x_api_key] {
        let res = client
            .check(check_request(metadata))
            .await
            .expect("authenticated");
        assert_eq!(res.into_inner().status(), ServingStatus::Serving);
    }
    assert_eq!(count(&calls), 2);
}
