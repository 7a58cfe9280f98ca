//! `RateLimitLayer` over real loopback sockets: axum 0.8 (with the client address from
//! `ConnectInfo`), plain hyper 1, and tonic 0.14 (the gRPC health service), where a limited
//! call is RESOURCE_EXHAUSTED.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use common::*;
use http::{HeaderMap, StatusCode};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::{ApiKey, KeyGate, RateLimitPolicy};
use tonic::metadata::MetadataMap;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tower::ServiceBuilder;

fn layer(fx: &Fixture) -> RateLimitLayer {
    let cfg = RateLimitConfig::new()
        .clock(LimiterClock::manual(fx.clock.clone()))
        .anonymous_policies([RateLimitPolicy::per_minute("anonymous", 2)]);
    RateLimitLayer::new(cfg).unwrap().with_gate(&fx.gate)
}

async fn limited_key(fx: &Fixture) -> ApiKey {
    fx.issue_with("k", |r| {
        r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 2)]
    })
    .await
}

fn assert_limited(status: StatusCode, headers: &HeaderMap, body: &[u8]) {
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(headers["ratelimit-policy"], r#""burst";q=2;w=60"#);
    assert_eq!(headers["ratelimit"], r#""burst";r=0;t=60"#);
    assert_eq!(headers["content-type"], "application/problem+json");
    let json: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(json["code"], "rate_limited");
    assert_eq!(json["violated-policies"], serde_json::json!(["burst"]));
}

#[tokio::test]
async fn axum_over_loopback() {
    let fx = Fixture::new();
    let key = limited_key(&fx).await;
    // Rate limit outside authentication: anonymous requests are counted per address.
    let app = Router::new()
        .route("/points", get(|| async { "ok" }))
        .layer(fx.gate.auth_layer())
        .layer(layer(&fx));
    let addr = keygate_testkit::serve::spawn_axum_with_peer(app).await;
    for r in ["1", "0"] {
        let (status, headers, body) = send(addr, "/points", with_key(&key)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"ok");
        assert_eq!(
            headers["ratelimit"],
            format!(r#""burst";r={r};t={}"#, if r == "1" { 30 } else { 60 })
        );
    }
    let (status, headers, body) = send(addr, "/points", with_key(&key)).await;
    assert_limited(status, &headers, &body);
    // No key: 401 from the auth layer until 127.0.0.1's anonymous allowance is used.
    for _ in 0..2 {
        let (status, headers, _) = send(addr, "/points", HeaderMap::new()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers["ratelimit-policy"], r#""anonymous";q=2;w=60"#);
    }
    let (status, headers, _) = send(addr, "/points", HeaderMap::new()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "30");
}

#[tokio::test]
async fn hyper_over_loopback() {
    let fx = Fixture::new();
    let key = limited_key(&fx).await;
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(layer(&fx))
        .service(counting_ok::<hyper::body::Incoming>(Arc::default()));
    let addr = spawn_hyper(svc).await;
    for _ in 0..2 {
        let (status, headers, _) = send(addr, "/", with_key(&key)).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key("ratelimit"));
    }
    let (status, headers, body) = send(addr, "/", with_key(&key)).await;
    assert_limited(status, &headers, &body);
}

async fn spawn_tonic(gate: &KeyGate, layer: RateLimitLayer) -> SocketAddr {
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
    let fx = Fixture::new();
    let key = limited_key(&fx).await;
    let addr = spawn_tonic(&fx.gate, layer(&fx)).await;
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
    for _ in 0..2 {
        let res = client.check(call()).await.unwrap();
        let fields = res
            .metadata()
            .get("ratelimit")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert!(fields.starts_with(r#""burst";r="#), "{fields}");
    }
    let status = client.check(call()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().starts_with("rate_limited"), "{status:?}");
}
