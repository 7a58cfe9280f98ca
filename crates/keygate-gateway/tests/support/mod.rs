//! Shared support for the gateway tests: the gateway on a loopback port in front of an
//! upstream, keys in a memory store, and a small HTTP client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::core::audit::{Auditor, MemorySink};
use keygate::core::usage::MemoryUsageStore;
use keygate::quota::Counting;
use keygate::rate_limit::LimiterClock;
use keygate::{KeyId, KeySpec, ManualClock, MemoryStore, Verifier};
use keygate_gateway::config::Config;
use keygate_gateway::preset::Preset;
use keygate_gateway::proxy::UpstreamCredential;
use keygate_gateway::Gateway;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

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
}

async fn read(res: http::Response<hyper::body::Incoming>) -> Resp {
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Resp {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        text: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let bytes = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(v).expect("json"))
        }
        None => Bytes::new(),
    };
    req.body(Full::new(bytes)).expect("request")
}

/// One HTTP/1.1 request with extra headers.
pub async fn call_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Resp {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = request(method, path, headers, body);
    req.headers_mut()
        .insert("host", addr.to_string().parse().expect("host"));
    read(sender.send_request(req).await.expect("response")).await
}

/// One HTTP/2 request (prior knowledge) with `key` in `api-key`.
pub async fn call_h2(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> Resp {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let mut req = request(method, path, &[("api-key", key)], body);
    *req.uri_mut() = format!("http://{addr}{path}").parse().expect("uri");
    read(sender.send_request(req).await.expect("response")).await
}

/// One HTTP/1.1 request with `key` in Qdrant's `api-key` header.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    match key {
        Some(k) => call_with(addr, method, path, &[("api-key", k)], body).await,
        None => call_with(addr, method, path, &[], body).await,
    }
}

/// The gateway on a loopback port.
pub struct Gw {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub sink: MemorySink,
    pub clock: ManualClock,
}

impl Gw {
    /// A gateway with `config` (edited) in front of `upstream`, holding `credential`.
    pub async fn start(
        preset: Preset,
        upstream: &str,
        credential: Option<UpstreamCredential>,
        edit: impl FnOnce(&mut Config),
    ) -> Gw {
        Gw::start_tls(preset, upstream, credential, edit, None).await
    }

    /// As [`Gw::start`], serving HTTPS with `tls` when given.
    pub async fn start_tls(
        preset: Preset,
        upstream: &str,
        credential: Option<UpstreamCredential>,
        edit: impl FnOnce(&mut Config),
        tls: Option<keygate_showcase::tls::Tls>,
    ) -> Gw {
        let mut config = Config::new(preset, upstream);
        edit(&mut config);
        let clock = ManualClock::at_2026();
        let sink = MemorySink::new();
        let verifier = Verifier::builder(MemoryStore::new())
            .clock(clock.clone())
            .build();
        let mut opts =
            keygate_gateway::Options::new(config, verifier, Auditor::direct(sink.clone()));
        opts.credential = credential;
        opts.usage = Arc::new(MemoryUsageStore::new());
        opts.counting = Counting::Strict;
        opts.limiter_clock = LimiterClock::manual(clock.clone());
        let gateway = keygate_gateway::build(opts).expect("build the gateway");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = gateway.service.clone();
        tokio::spawn(keygate_gateway::serve::serve(
            listener,
            service,
            keygate_gateway::serve::ConnLimits::default(),
            tls,
            std::future::pending(),
        ));
        Gw {
            addr,
            gateway: Arc::new(gateway),
            sink,
            clock,
        }
    }

    /// Issues a key; returns its plaintext and id.
    pub async fn issue(&self, spec: KeySpec) -> (String, KeyId) {
        let issued = self.gateway.keys.issue("test", spec).await.expect("issue");
        (issued.key.expose_secret().to_owned(), issued.record.id)
    }

    /// A key for tenant `tenant` reading and writing points of `collection`.
    pub async fn tenant_key(&self, tenant: &str, collection: &str) -> (String, KeyId) {
        self.issue(
            KeySpec::new(tenant)
                .scope("points:read")
                .scope("points:write")
                .scope("collections:read")
                .resource(collection)
                .attribute("tenant", tenant),
        )
        .await
    }

    /// A key without a tenant, every scope on every collection.
    pub async fn operator_key(&self) -> String {
        self.issue(KeySpec::new("operator").scope("*").resource("*"))
            .await
            .0
    }

    /// A request through the gateway.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        call(self.addr, method, path, key, body.as_ref()).await
    }
}

/// Runs one step of a Python client script (`script`, relative to this crate) with the
/// virtualenv `venv`; returns the JSON report on its last line of output.
pub async fn python(
    venv: &std::path::Path,
    script: &str,
    port: u16,
    step: &str,
    keys: &[&str],
) -> Value {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = tokio::process::Command::new(venv.join("bin").join("python"))
        .arg(script)
        .arg(port.to_string())
        .arg(step)
        .args(keys)
        .env("ANONYMIZED_TELEMETRY", "False")
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{step}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|_| panic!("{step}: not JSON: {stdout}"))
}

/// An upstream answering every request with what it saw: method, path, headers, body
/// length. Counts its requests.
pub async fn echo() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move {
            let (parts, body) = req.into_parts();
            let body = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::json!(v.to_str().unwrap_or("?"))))
                .collect();
            let answer = serde_json::json!({
                "method": parts.method.as_str(),
                "path": parts.uri.to_string(),
                "headers": headers,
                "body_len": body.len(),
                "body": String::from_utf8_lossy(&body),
            });
            let mut res = http::Response::new(Full::new(Bytes::from(answer.to_string())));
            res.headers_mut()
                .insert("connection", "x-secret-hop".parse().expect("value"));
            res.headers_mut()
                .insert("x-secret-hop", "1".parse().expect("value"));
            Ok::<_, std::convert::Infallible>(res)
        }
    });
    (keygate_testkit::serve::spawn_hyper(svc).await, calls)
}

/// The request events the gateway's audit sink holds, in order.
pub fn requests(gw: &Gw) -> Vec<keygate::core::audit::RequestEvent> {
    gw.sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            keygate::core::audit::AuditEvent::Request(r) => Some(r),
            _ => None,
        })
        .collect()
}
