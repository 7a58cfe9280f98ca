//! `QuotaLayer` over real loopback sockets: axum 0.8, plain hyper 1, and tonic 0.14 (the
//! gRPC health service), where an exhausted quota is RESOURCE_EXHAUSTED.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use common::*;
use http::{HeaderMap, StatusCode};
use keygate::core::usage::{utc, MemoryUsageStore};
use keygate::quota::{QuotaConfig, QuotaLayer, QuotaStatus};
use keygate::{ApiKey, KeyGate, QuotaPolicy, QuotaWindow};
use tonic::metadata::MetadataMap;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceBuilder;

async fn setup() -> (Fixture, ApiKey, QuotaLayer) {
    let fx = Fixture::new();
    fx.clock.set(utc(2026, 7, 4, 18, 0, 0));
    let key = fx
        .issue_with("k", |r| {
            r.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)]
        })
        .await;
    let layer = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))
        .unwrap()
        .with_gate(&fx.gate);
    (fx, key, layer)
}

fn assert_exceeded(status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "21600");
    assert_eq!(headers["ratelimit-policy"], r#""daily";q=2;w=86400"#);
    assert_eq!(headers["ratelimit"], r#""daily";r=0;t=21600"#);
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        json["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(json["code"], "quota_exceeded");
    assert_eq!(json["violated-policies"], serde_json::json!(["daily"]));
}

#[tokio::test]
async fn axum_over_loopback() {
    let (fx, key, layer) = setup().await;
    let handle = layer.handle();
    let app = Router::new()
        .route(
            "/points",
            get(|req: axum::extract::Request| async move {
                let left = req
                    .extensions()
                    .get::<keygate::RequestContext>()
                    .and_then(|c| c.quota())
                    .and_then(QuotaStatus::remaining);
                format!("{left:?}")
            }),
        )
        .layer(layer)
        .layer(fx.gate.auth_layer());
    let addr = spawn_axum(app).await;
    for left in ["Some(1)", "Some(0)"] {
        let (status, headers, body) = send(addr, "/points", with_key(&key)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], left.as_bytes());
        assert!(headers.contains_key("ratelimit"));
    }
    let (status, headers, body) = send(addr, "/points", with_key(&key)).await;
    assert_exceeded(status, &headers, &body);
    // Without a key: the quota layer lets it through, the auth layer answers 401.
    let (status, _, _) = send(addr, "/points", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(handle.flush().await.unwrap(), 1);
}

#[tokio::test]
async fn hyper_over_loopback() {
    let (fx, key, layer) = setup().await;
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(layer)
        .service(counting_ok::<hyper::body::Incoming>(Arc::default()));
    let addr = spawn_hyper(svc).await;
    for _ in 0..2 {
        assert_eq!(send(addr, "/", with_key(&key)).await.0, StatusCode::OK);
    }
    let (status, headers, body) = send(addr, "/", with_key(&key)).await;
    assert_exceeded(status, &headers, &body);
}

async fn spawn_tonic(gate: &KeyGate, layer: QuotaLayer) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    let server = tonic::transport::Server::builder()
        .layer(gate.auth_layer())
        .layer(layer)
        .add_service(health)
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    tokio::spawn(async move {
        let _reporter = reporter;
        server.await.unwrap();
    });
    addr
}

#[tokio::test]
async fn tonic_over_loopback_is_resource_exhausted() {
    let (fx, key, layer) = setup().await;
    let addr = spawn_tonic(&fx.gate, layer).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let call = || {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        let mut md = MetadataMap::new();
        md.insert("x-api-key", key.expose_secret().parse().unwrap());
        *req.metadata_mut() = md;
        req
    };
    for r in [1, 0] {
        let res = client.check(call()).await.unwrap();
        assert_eq!(
            res.metadata().get("ratelimit").unwrap().to_str().unwrap(),
            format!(r#""daily";r={r};t=21600"#)
        );
    }
    let status = client.check(call()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().starts_with("quota_exceeded"), "{status:?}");
}
