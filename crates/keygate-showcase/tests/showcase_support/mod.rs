//! Shared support for the showcase tests: the server library (as `server`), a world around
//! it on a real socket, and a small HTTP client.
#![allow(dead_code)]

pub use keygate_showcase as server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::Counting;
use keygate::rate_limit::LimiterClock;
use keygate::{KeySpec, ManualClock, MemoryStore, Verifier};
use serde_json::{json, Value};
use tokio::net::TcpStream;

pub use server::{build, Options, Showcase};

/// An answer: status, headers, body as JSON (`Value::Null` when it is not JSON) and text.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Resp {
    /// The problem+json `code`, if any.
    pub fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or("")
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one HTTP/1.1 request to `addr` with `key` in Qdrant's `api-key` header.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .header("host", addr.to_string());
    if let Some(k) = key {
        req = req.header("api-key", k);
    }
    let bytes = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(v).expect("json"))
        }
        None => Bytes::new(),
    };
    let res = sender
        .send_request(req.body(Full::new(bytes)).expect("request"))
        .await
        .expect("response");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    Resp {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        text,
    }
}

/// Serves a router on 127.0.0.1 (an ephemeral port) with the peer address available.
pub use keygate_testkit::serve::spawn_axum_with_peer as serve;

/// The showcase on a socket, over a memory key store and a manual clock.
pub struct World {
    pub app: Showcase,
    pub addr: SocketAddr,
    pub clock: ManualClock,
    pub sink: MemorySink,
    pub auditor: Auditor,
    /// An admin key (`*` on every collection).
    pub admin: String,
}

impl World {
    /// Default options, events into a [`MemorySink`].
    pub async fn new() -> World {
        World::with(|o| o).await
    }

    /// Options edited by `edit` (the clocks are already the manual clock).
    pub async fn with(edit: impl FnOnce(Options) -> Options) -> World {
        let sink = MemorySink::new();
        World::with_auditor(Auditor::direct(sink.clone()), sink, edit).await
    }

    /// With this auditor.
    pub async fn with_auditor(
        auditor: Auditor,
        sink: MemorySink,
        edit: impl FnOnce(Options) -> Options,
    ) -> World {
        World::with_store(MemoryStore::new(), auditor, sink, edit).await
    }

    /// Keys in `store`, with this auditor.
    pub async fn with_store(
        store: impl keygate::KeyStore,
        auditor: Auditor,
        sink: MemorySink,
        edit: impl FnOnce(Options) -> Options,
    ) -> World {
        let clock = ManualClock::at_2026();
        let verifier = Verifier::builder(store).clock(clock.clone()).build();
        let mut opts = Options::new(verifier, auditor.clone());
        opts.limiter_clock = LimiterClock::manual(clock.clone());
        opts.usage = Arc::new(MemoryUsageStore::new());
        opts.counting = Counting::Strict;
        let app = build(edit(opts)).expect("build the showcase");
        let admin = app
            .keys
            .issue("setup", KeySpec::new("admin").scope("*").resource("*"))
            .await
            .expect("admin key");
        let addr = serve(app.router.clone()).await;
        World {
            app,
            addr,
            clock,
            sink,
            auditor,
            admin: admin.key.expose_secret().to_owned(),
        }
    }

    /// A request with `key`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        call(self.addr, method, path, key, body.as_ref()).await
    }

    /// A request with the admin key.
    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        call(self.addr, method, path, Some(&self.admin), body.as_ref()).await
    }

    /// Issues a key through the admin API; returns its plaintext and id.
    pub async fn issue(&self, spec: Value) -> (String, String) {
        let r = self.admin("POST", "/admin/keys", Some(spec)).await;
        assert_eq!(r.status, StatusCode::CREATED, "issue: {}", r.text);
        let key = r.json["key"].as_str().expect("key").to_owned();
        let id = r.json["id"].as_str().expect("id").to_owned();
        (key, id)
    }

    /// Creates collection `name` (4 dimensions, cosine) with the admin key.
    pub async fn collection(&self, name: &str) {
        let r = self
            .admin(
                "PUT",
                &format!("/collections/{name}"),
                Some(json!({"vectors": {"size": 4, "distance": "Cosine"}})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "create {name}: {}", r.text);
    }
}

/// `n` points with ids from `first`, payload `{"n": id}`.
pub fn points(first: u64, n: u64) -> Value {
    let pts: Vec<Value> = (first..first + n)
        .map(|i| json!({"id": i, "vector": [1.0, i as f32, 0.5, 0.25], "payload": {"n": i}}))
        .collect();
    json!({ "points": pts })
}

/// Polls `check` every 10 ms until it holds or `limit` passes; returns how long it took.
pub async fn poll_until<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The ids of a list of points or records.
pub fn ids(points: &Value) -> Vec<u64> {
    points
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default()
}
