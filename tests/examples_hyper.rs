//! `examples/hyper_minimal.rs` end to end: its plain hyper 1 server with the auth layer alone,
//! on a loopback port. A valid key reaches the handler, which reads the `Principal` from the
//! request's extensions; no key or a bad one is a 401 problem document and the handler is
//! not reached. Shutdown lets an open connection finish.

mod common;

#[path = "../examples/hyper_minimal.rs"]
#[allow(dead_code)]
mod example;

use std::net::SocketAddr;

use common::{send, Fixture};
use http::{HeaderMap, StatusCode};
use keygate::ApiKey;

async fn start(
    fx: &Fixture,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let gate = fx.gate.clone();
    let server = tokio::spawn(async move {
        example::serve(listener, gate, async {
            let _ = stopped.await;
        })
        .await
        .expect("hyper server");
    });
    (addr, stop, server)
}

fn bearer(secret: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        format!("Bearer {secret}").parse().expect("ASCII"),
    );
    h
}

fn problem(status: StatusCode, headers: &HeaderMap, body: &[u8], code: &str) {
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["content-type"], "application/problem+json");
    assert!(headers["www-authenticate"]
        .to_str()
        .expect("ASCII")
        .starts_with("Bearer"));
    let json: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(json["status"], 401);
    assert_eq!(json["code"], code);
}

#[tokio::test]
async fn key_reaches_the_handler_and_no_key_is_401() {
    let fx = Fixture::new();
    let key: ApiKey = fx
        .issue_with("hyper", |r| r.owner = Some("ada".into()))
        .await;
    let (addr, _stop, _server) = start(&fx).await;

    let (status, headers, body) = send(addr, "/", bearer(key.expose_secret())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(json["name"], "hyper");
    assert_eq!(json["subject"], "ada");
    assert_eq!(json["key_id"], key.id().to_string());

    let (status, headers, body) = send(addr, "/", HeaderMap::new()).await;
    problem(status, &headers, &body, "missing_key");
    let (status, headers, body) = send(addr, "/", bearer(&common::wrong_secret(&key))).await;
    problem(status, &headers, &body, "invalid_key");
    let (status, headers, body) = send(addr, "/anything", bearer("kg_garbage")).await;
    problem(status, &headers, &body, "malformed_key");
    assert!(
        !String::from_utf8_lossy(&body).contains(key.expose_secret()),
        "the key leaked into a response"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let fx = Fixture::new();
    let key = fx.issue("hyper").await;
    let (addr, stop, server) = start(&fx).await;
    assert_eq!(
        send(addr, "/", bearer(key.expose_secret())).await.0,
        StatusCode::OK
    );
    stop.send(()).expect("server running");
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("serve returns after shutdown (bounded wait)")
        .expect("server task");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}
