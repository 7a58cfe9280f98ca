//! The audit layer: one event per request with the exact denial code whatever the layer
//! order, request ids, protocol and status, client address, overflow and shutdown, and no
//! secret in any sink's output.
#![cfg(all(feature = "audit", feature = "auth"))]

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};

use common::{matrix, matrix_keys, Capture, Expect, Fixture};
use http::{HeaderValue, Request, Response, StatusCode};
use keygate::audit::AuditLayer;
use keygate::client_ip::{ClientIp, TrustedProxies};
use keygate::core::audit::{
    verify_dir, AuditError, AuditEvent, AuditSink, Auditor, Decision, FileSink, MemorySink,
    Overflow, RequestEvent, Transport, VerifyOptions,
};
use keygate::credentials::Credentials;
use keygate::{Denial, DenialCode, KeyGate};
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Body = String;

/// An inner service answering 200 with the caller's name (or `anonymous`).
fn ok_service() -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
       + Send
       + 'static {
    service_fn(|req: Request<Body>| async move {
        let who = req
            .extensions()
            .get::<keygate::RequestContext>()
            .and_then(|c| c.principal())
            .map_or("anonymous".to_owned(), |p| p.name().to_owned());
        Ok::<_, Infallible>(Response::new(who))
    })
}

fn requests(events: &[AuditEvent]) -> Vec<RequestEvent> {
    events
        .iter()
        .map(|e| e.as_request().expect("a request event").clone())
        .collect()
}

/// Sends to `a` and `b`.
struct Tee<A, B>(A, B);

impl<A: AuditSink, B: AuditSink> AuditSink for Tee<A, B> {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.0.record(event)?;
        self.1.record(event)
    }
    fn flush(&self) -> Result<(), AuditError> {
        self.0.flush()?;
        self.1.flush()
    }
    fn sync(&self) -> Result<(), AuditError> {
        self.0.sync()?;
        self.1.sync()
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "keygate-audit-layer-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn all_file_text(dir: &std::path::Path) -> String {
    let mut text = String::new();
    for f in keygate::core::audit::log_files(dir, "audit").unwrap() {
        text.push_str(&std::fs::read_to_string(f).unwrap());
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mixed_requests_give_exactly_n_events_with_exact_codes() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;
    let rows = matrix(&keys);
    let memory = MemorySink::new();
    let dir = TempDir::new("concurrent");
    let file = FileSink::builder(&dir.0)
        .rotate_bytes(16 * 1024)
        .open()
        .unwrap();
    let auditor = Auditor::builder()
        .capacity(64)
        .spawn(Tee(memory.clone(), file))
        .unwrap();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(auditor.clone()))
        .layer(fx.gate.auth_layer())
        .service(ok_service());

    const ROUNDS: usize = 8;
    let mut expected = HashMap::new();
    let mut tasks = Vec::new();
    for round in 0..ROUNDS {
        for (i, row) in rows.iter().enumerate() {
            let id = format!("req-{round}-{i}");
            expected.insert(id.clone(), row.clone());
            let mut req = row.request(&[], Body::new());
            req.headers_mut()
                .insert("x-request-id", HeaderValue::from_str(&id).unwrap());
            let svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let res = svc.oneshot(req).await.unwrap();
                assert_eq!(
                    res.headers()["x-request-id"].to_str().unwrap(),
                    id,
                    "the request id comes back"
                );
                res.status()
            }));
        }
    }
    let n = tasks.len();
    for t in tasks {
        t.await.unwrap();
    }
    auditor.flush().await.unwrap();

    let events = requests(&memory.events());
    assert_eq!(events.len(), n, "exactly one event per request");
    let mut seen = std::collections::HashSet::new();
    for e in &events {
        assert!(
            seen.insert(e.request_id.clone()),
            "duplicate {}",
            e.request_id
        );
        let row = &expected[e.request_id.as_str()];
        match row.expect {
            Expect::Allowed => {
                assert_eq!(e.decision, Decision::Allowed, "{}", row.name);
                assert_eq!(e.status, Some(200), "{}", row.name);
                assert_eq!(e.denial, None, "{}", row.name);
                assert!(e.key_name.is_some(), "{}: the key is named", row.name);
            }
            Expect::Denied { exact, .. } => {
                assert_eq!(e.decision, Decision::Denied, "{}", row.name);
                assert_eq!(e.denial, Some(exact), "{}", row.name);
                assert_eq!(e.status, Some(401), "{}", row.name);
                assert_eq!(e.key_id, None, "{}", row.name);
            }
        }
        assert_eq!(e.protocol, Transport::Http);
        assert_eq!(e.path, "/");
    }
    let stats = auditor.shutdown().await;
    assert_eq!(
        (stats.written, stats.dropped, stats.failed),
        (n as u64, 0, 0)
    );

    // The file holds the same n events, its chain intact, and no secret.
    assert_eq!(
        verify_dir(&dir.0, "audit", &VerifyOptions::default())
            .unwrap()
            .lines,
        n as u64
    );
    let file_text = all_file_text(&dir.0);
    let memory_text =
        serde_json::to_string(&memory.events()).unwrap() + &format!("{:?}", memory.events());
    for secret in keys.secrets() {
        assert!(!file_text.contains(&secret), "a key in the file sink");
        assert!(!memory_text.contains(&secret), "a key in the memory sink");
    }
}

#[tokio::test]
async fn the_tracing_sink_never_shows_a_key_or_a_query_string() {
    let fx = Fixture::with(
        |v| v,
        |g| g.credentials(Credentials::default().with_query("api_key")),
    );
    let keys = matrix_keys(&fx).await;
    let capture = Capture::new();
    let _guard = capture.install();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::tracing()))
        .layer(fx.gate.auth_layer())
        .service(ok_service());
    for row in matrix(&keys) {
        let _ = svc
            .clone()
            .oneshot(row.request(&[], Body::new()))
            .await
            .unwrap();
    }
    let uri = format!(
        "/collections/c/points?api_key={}&limit=3",
        keys.valid.expose_secret()
    );
    let res = svc
        .clone()
        .oneshot(Request::get(uri).body(Body::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let text = capture.text();
    assert!(text.contains("keygate::audit"), "{text}");
    assert!(text.contains("path=/collections/c/points"), "{text}");
    assert!(text.contains("denial=\"revoked_key\""), "{text}");
    assert!(!text.contains("limit=3"));
    for secret in keys.secrets() {
        assert!(!text.contains(&secret), "a key in the tracing output");
    }
}

#[tokio::test]
async fn credentials_and_query_strings_are_never_recorded() {
    let fx = Fixture::with(
        |v| v,
        |g| g.credentials(Credentials::default().with_query("api_key")),
    );
    let key = fx.issue("q").await;
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .service(ok_service());
    let secret = key.expose_secret();
    let reqs = [
        Request::get(format!("/search?api_key={secret}&q=1"))
            .body(Body::new())
            .unwrap(),
        Request::get("/a")
            .header("authorization", format!("Bearer {secret}"))
            .header("cookie", format!("session={secret}"))
            .body(Body::new())
            .unwrap(),
        Request::get("/b")
            .header("api-key", secret)
            .body(Body::new())
            .unwrap(),
    ];
    for req in reqs {
        assert_eq!(svc.clone().oneshot(req).await.unwrap().status(), 200);
    }
    let events = requests(&sink.events());
    assert_eq!(
        events.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        ["/search", "/a", "/b"]
    );
    assert!(events.iter().all(|e| e.key_name.as_deref() == Some("q")));
    // A client sending its key as a request id does not get it logged either.
    let res = svc
        .clone()
        .oneshot(
            Request::get("/c")
                .header("api-key", secret)
                .header("x-request-id", secret)
                .body(Body::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], secret);
    let text = serde_json::to_string(&sink.events()).unwrap();
    assert_eq!(sink.len(), 4);
    assert!(!text.contains(secret));
    assert!(!text.contains("q=1"));
}

#[cfg(feature = "scope")]
#[tokio::test]
async fn outermost_audit_names_the_key_of_a_request_an_inner_layer_refused() {
    let fx = Fixture::new();
    let reader = fx
        .issue_with("reader", |r| {
            r.scopes = vec!["points:read".into()];
            r.owner = Some("acme".into());
            r.attributes.insert("tenant".into(), "acme".into());
        })
        .await;
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .layer(
            keygate::scope::ScopeLayer::require("points:write")
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(ok_service());
    let res = svc
        .oneshot(
            Request::post("/collections/c/points")
                .header("x-api-key", reader.expose_secret())
                .body(Body::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let e = &requests(&sink.events())[0];
    assert_eq!(e.denial, Some(DenialCode::InsufficientScope));
    assert_eq!(e.key_id, Some(reader.id()));
    assert_eq!(e.key_name.as_deref(), Some("reader"));
    assert_eq!(e.subject.as_deref(), Some("acme"));
    assert_eq!(e.tenant.as_deref(), Some("acme"));
    assert_eq!(e.method, "POST");
    // The key was verified once for the whole stack.
    assert_eq!(fx.store.gets(), 1);
}

/// A request event names the roles behind the calling key's policy (and none for a key
/// without roles, whose JSON has no `roles` field).
#[cfg(feature = "scope")]
#[tokio::test]
async fn request_events_name_the_roles_behind_the_key() {
    use keygate::{Grant, KeyStore, Role};
    let fx = Fixture::new();
    let role = Role::new("shared-reader", fx.gate.clock().now())
        .with_grant(Grant::new(["points:read"], ["*"]));
    fx.store.memory().insert_role(&role).await.unwrap();
    let with_role = fx
        .issue_with("with-role", |r| r.roles = vec!["shared-reader".into()])
        .await;
    let plain = fx
        .issue_with("plain", |r| r.scopes = vec!["points:read".into()])
        .await;
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .layer(
            keygate::scope::ScopeLayer::require("points:read")
                .unwrap()
                .with_gate(&fx.gate),
        )
        .service(ok_service());
    for key in [&with_role, &plain] {
        let res = svc
            .clone()
            .oneshot(
                Request::get("/x")
                    .header("x-api-key", key.expose_secret())
                    .body(Body::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let events = requests(&sink.events());
    let roles: Vec<&str> = events[0]
        .roles
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|r| &**r)
        .collect();
    assert_eq!(roles, ["shared-reader"]);
    assert!(events[1].roles.is_none());
    let json = serde_json::to_value(AuditEvent::Request(events[1].clone())).unwrap();
    assert!(json.get("roles").is_none());
}

#[tokio::test]
async fn any_layer_s_denial_on_the_response_is_recorded_with_its_exact_code() {
    // An inner layer that refuses with a code of its own (as the rate limiter does).
    let fx = Fixture::new();
    let key = fx.issue("busy").await;
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .service(service_fn(|_req: Request<Body>| async {
            let mut res = Response::new(Body::new());
            *res.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            res.extensions_mut()
                .insert(Denial::new(DenialCode::RateLimited));
            Ok::<_, Infallible>(res)
        }));
    let res = svc
        .oneshot(
            Request::get("/")
                .header("x-api-key", key.expose_secret())
                .body(Body::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    let e = &requests(&sink.events())[0];
    assert_eq!(
        (e.decision, e.denial, e.status),
        (Decision::Denied, Some(DenialCode::RateLimited), Some(429))
    );
    assert_eq!(e.key_name.as_deref(), Some("busy"));
}

#[tokio::test]
async fn audit_without_the_hub_reads_what_it_can() {
    let fx = Fixture::new();
    let keys = matrix_keys(&fx).await;

    // Outermost, without the hub: every request, exact codes, no principal.
    let sink = MemorySink::new();
    let outer = ServiceBuilder::new()
        .layer(AuditLayer::new(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .service(ok_service());
    for key in [&keys.valid, &keys.revoked] {
        let req = Request::get("/")
            .header("x-api-key", key.expose_secret())
            .body(Body::new())
            .unwrap();
        outer.clone().oneshot(req).await.unwrap();
    }
    let events = requests(&sink.events());
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0].decision, events[0].key_id),
        (Decision::Allowed, None)
    );
    assert_eq!(events[1].denial, Some(DenialCode::RevokedKey));

    // Inner to the auth layer: only what auth let through, with its principal.
    let sink = MemorySink::new();
    let inner = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(AuditLayer::new(Auditor::direct(sink.clone())))
        .service(ok_service());
    for key in [&keys.valid, &keys.revoked, &keys.other_valid] {
        let req = Request::get("/")
            .header("x-api-key", key.expose_secret())
            .body(Body::new())
            .unwrap();
        inner.clone().oneshot(req).await.unwrap();
    }
    let names: Vec<_> = requests(&sink.events())
        .into_iter()
        .map(|e| e.key_name.as_deref().map(str::to_owned))
        .collect();
    assert_eq!(
        names,
        [Some("valid".to_owned()), Some("other-valid".to_owned())]
    );
}

#[tokio::test]
async fn audit_alone_from_the_hub_never_rejects() {
    let fx = Fixture::new();
    let key = fx.issue("k").await;
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .service(ok_service());
    let res = svc
        .clone()
        .oneshot(Request::get("/open").body(Body::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = svc
        .oneshot(
            Request::get("/open")
                .header("x-api-key", key.expose_secret())
                .body(Body::new())
                .unwrap(),
        )
        .await
        .unwrap();
    // The hub-resolved principal reaches the handler too.
    assert_eq!(res.into_body(), "k");
    let events = requests(&sink.events());
    assert_eq!(
        (events[0].decision, events[0].denial),
        (Decision::Allowed, None)
    );
    assert_eq!(events[1].key_name.as_deref(), Some("k"));
}

#[tokio::test]
async fn request_ids_are_reused_when_sane_and_generated_otherwise() {
    let sink = MemorySink::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(AuditLayer::new(Auditor::direct(sink.clone())))
        .service(service_fn(move |req: Request<Body>| {
            let s = s2.clone();
            async move {
                let ext = keygate::RequestContext::of(req.extensions())
                    .and_then(|c| c.request_id())
                    .unwrap()
                    .to_string();
                let header = req.headers()["x-request-id"].to_str().unwrap().to_owned();
                s.lock().unwrap().push((ext, header));
                Ok::<_, Infallible>(Response::new(Body::new()))
            }
        }));
    let long = "a".repeat(129);
    let cases: [(Option<&[u8]>, bool); 6] = [
        (Some(b"abc-123_XYZ.9"), true),
        (Some(&[b'b'; 128]), true),
        (Some(long.as_bytes()), false),
        (Some(b"two words"), false),
        (Some(b"caf\xc3\xa9"), false),
        (None, false),
    ];
    for (given, reused) in cases {
        let mut req = Request::get("/").body(Body::new()).unwrap();
        if let Some(v) = given {
            req.headers_mut()
                .insert("x-request-id", HeaderValue::from_bytes(v).unwrap());
        }
        let res = svc.clone().oneshot(req).await.unwrap();
        let back = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        let event = requests(&sink.take()).remove(0);
        let (ext, header) = seen.lock().unwrap().pop().unwrap();
        assert_eq!(back, event.request_id);
        assert_eq!(ext, event.request_id);
        assert_eq!(header, event.request_id);
        if reused {
            assert_eq!(given.unwrap(), event.request_id.as_bytes());
        } else {
            assert_eq!(event.request_id.len(), 32);
            assert!(event.request_id.bytes().all(|c| c.is_ascii_hexdigit()));
        }
    }

    // Not trusting clients, and another header name; a response's own id is kept.
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(
            AuditLayer::new(Auditor::direct(sink.clone()))
                .trust_request_id(false)
                .request_id_header(http::HeaderName::from_static("x-correlation-id")),
        )
        .service(service_fn(|_req: Request<Body>| async {
            Ok::<_, Infallible>(
                Response::builder()
                    .header("x-correlation-id", "set-by-handler")
                    .body(Body::new())
                    .unwrap(),
            )
        }));
    let res = svc
        .oneshot(
            Request::get("/")
                .header("x-correlation-id", "client-chose")
                .body(Body::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.headers()["x-correlation-id"], "set-by-handler");
    let e = requests(&sink.events()).remove(0);
    assert_ne!(e.request_id, "client-chose");
    assert_eq!(e.request_id.len(), 32);
}

#[tokio::test]
async fn grpc_requests_record_their_method_and_status() {
    let fx = Fixture::new();
    let key = fx.issue("g").await;
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .layer(fx.gate.auth_layer())
        .service(service_fn(|req: Request<Body>| async move {
            let mut res = Response::new(Body::new());
            res.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            if req.uri().path().ends_with("/Unary") {
                // A trailers-only answer carries its status in the headers.
                res.headers_mut()
                    .insert("grpc-status", HeaderValue::from_static("5"));
            }
            Ok::<_, Infallible>(res)
        }));
    let grpc = |path: &str, key: Option<&str>| {
        let mut b = Request::post(path).header("content-type", "application/grpc+proto");
        if let Some(k) = key {
            b = b.header("x-api-key", k);
        }
        b.body(Body::new()).unwrap()
    };
    let denied = svc
        .clone()
        .oneshot(grpc("/qdrant.Points/Search", None))
        .await
        .unwrap();
    assert_eq!(denied.status(), 200);
    svc.clone()
        .oneshot(grpc("/qdrant.Points/Unary", Some(key.expose_secret())))
        .await
        .unwrap();
    svc.clone()
        .oneshot(grpc("/qdrant.Points/Stream", Some(key.expose_secret())))
        .await
        .unwrap();
    let events = requests(&sink.events());
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.protocol,
                e.rpc.as_deref(),
                e.status,
                e.grpc_status,
                e.denial,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                Transport::Grpc,
                Some("qdrant.Points/Search"),
                Some(200),
                Some(16),
                Some(DenialCode::MissingKey)
            ),
            (
                Transport::Grpc,
                Some("qdrant.Points/Unary"),
                Some(200),
                Some(5),
                None
            ),
            (
                Transport::Grpc,
                Some("qdrant.Points/Stream"),
                Some(200),
                None,
                None
            ),
        ]
    );
}

#[tokio::test]
async fn the_client_address_is_recorded() {
    let sink = MemorySink::new();
    let plain = ServiceBuilder::new()
        .layer(AuditLayer::new(Auditor::direct(sink.clone())))
        .service(ok_service());
    let peer = SocketAddr::from(([192, 0, 2, 7], 5555));
    let mut req = Request::get("/").body(Body::new()).unwrap();
    req.extensions_mut().insert(peer);
    plain.clone().oneshot(req).await.unwrap();
    // A ClientIp an outer layer settled on wins.
    let mut req = Request::get("/").body(Body::new()).unwrap();
    req.extensions_mut().insert(peer);
    req.extensions_mut()
        .insert(ClientIp(IpAddr::from([198, 51, 100, 1])));
    plain.clone().oneshot(req).await.unwrap();
    // Forwarded headers only through trusted proxies.
    let proxied = ServiceBuilder::new()
        .layer(
            AuditLayer::new(Auditor::direct(sink.clone()))
                .trusted_proxies(TrustedProxies::new(["192.0.2.0/24"]).unwrap()),
        )
        .service(ok_service());
    let mut req = Request::get("/")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Body::new())
        .unwrap();
    req.extensions_mut().insert(peer);
    proxied.clone().oneshot(req).await.unwrap();
    let mut req = Request::get("/")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Body::new())
        .unwrap();
    req.extensions_mut()
        .insert(SocketAddr::from(([198, 18, 0, 1], 1)));
    proxied.oneshot(req).await.unwrap();
    // The hub settles (and memoizes) the address for the layers inside.
    let fx = Fixture::with(
        |v| v,
        |g| g.trusted_proxies(TrustedProxies::new(["192.0.2.0/24"]).unwrap()),
    );
    let inner_saw = Arc::new(Mutex::new(None));
    let saw = inner_saw.clone();
    let hub = ServiceBuilder::new()
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())))
        .service(service_fn(move |req: Request<Body>| {
            *saw.lock().unwrap() = keygate::RequestContext::of(req.extensions())
                .and_then(|c| c.client_ip())
                .map(ClientIp);
            async { Ok::<_, Infallible>(Response::new(Body::new())) }
        }));
    let mut req = Request::get("/")
        .header("x-forwarded-for", "203.0.113.10")
        .body(Body::new())
        .unwrap();
    req.extensions_mut().insert(peer);
    hub.oneshot(req).await.unwrap();
    assert_eq!(
        *inner_saw.lock().unwrap(),
        Some(ClientIp(IpAddr::from([203, 0, 113, 10])))
    );

    let ips: Vec<_> = requests(&sink.events())
        .into_iter()
        .map(|e| e.client_ip)
        .collect();
    assert_eq!(
        ips,
        [
            Some(IpAddr::from([192, 0, 2, 7])),
            Some(IpAddr::from([198, 51, 100, 1])),
            Some(IpAddr::from([203, 0, 113, 9])),
            Some(IpAddr::from([198, 18, 0, 1])),
            Some(IpAddr::from([203, 0, 113, 10])),
        ]
    );
}

#[tokio::test]
async fn a_failed_or_abandoned_request_is_still_recorded() {
    let sink = MemorySink::new();
    let failing = ServiceBuilder::new()
        .layer(AuditLayer::new(Auditor::direct(sink.clone())))
        .service(service_fn(|_req: Request<Body>| async {
            Err::<Response<Body>, _>(std::io::Error::other("backend down"))
        }));
    assert!(failing
        .oneshot(Request::get("/f").body(Body::new()).unwrap())
        .await
        .is_err());
    let mut never = ServiceBuilder::new()
        .layer(AuditLayer::new(Auditor::direct(sink.clone())))
        .service(service_fn(|_req: Request<Body>| {
            std::future::pending::<Result<Response<Body>, Infallible>>()
        }));
    let mut fut = Box::pin(
        never
            .ready()
            .await
            .unwrap()
            .call(Request::get("/slow").body(Body::new()).unwrap()),
    );
    assert!(poll_once(fut.as_mut()).is_pending());
    drop(fut);
    let events = requests(&sink.events());
    assert_eq!(
        events
            .iter()
            .map(|e| (e.path.as_str(), e.decision, e.status))
            .collect::<Vec<_>>(),
        [
            ("/f", Decision::Error, None),
            ("/slow", Decision::Cancelled, None)
        ]
    );
}

fn poll_once<F: Future>(fut: Pin<&mut F>) -> Poll<F::Output> {
    fut.poll(&mut Context::from_waker(Waker::noop()))
}

/// A sink whose `record` waits until the test opens the gate, and says when it started
/// waiting.
#[derive(Clone)]
struct GateSink {
    inner: MemorySink,
    gate: Arc<(Mutex<bool>, Condvar)>,
    entered: Arc<(Mutex<usize>, Condvar)>,
}

impl GateSink {
    fn new() -> Self {
        GateSink {
            inner: MemorySink::new(),
            gate: Arc::new((Mutex::new(false), Condvar::new())),
            entered: Arc::new((Mutex::new(0), Condvar::new())),
        }
    }
    fn open(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }
    /// Blocks until the writer is inside `record`.
    fn wait_entered(&self) {
        let mut n = self.entered.0.lock().unwrap();
        while *n == 0 {
            n = self.entered.1.wait(n).unwrap();
        }
    }
}

impl AuditSink for GateSink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        *self.entered.0.lock().unwrap() += 1;
        self.entered.1.notify_all();
        let mut open = self.gate.0.lock().unwrap();
        while !*open {
            open = self.gate.1.wait(open).unwrap();
        }
        self.inner.record(event)
    }
}

fn plain(
    auditor: Auditor,
) -> impl Service<
    Request<Body>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone {
    ServiceBuilder::new()
        .layer(AuditLayer::new(auditor))
        .service(ok_service())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_blocks_the_response_under_block() {
    let sink = GateSink::new();
    let auditor = Auditor::builder()
        .capacity(2)
        .overflow(Overflow::Block)
        .spawn(sink.clone())
        .unwrap();
    let svc = plain(auditor.clone());
    // The first event is taken by the writer, which then waits at the gate.
    svc.clone()
        .oneshot(Request::get("/1").body(Body::new()).unwrap())
        .await
        .unwrap();
    let s = sink.clone();
    tokio::task::spawn_blocking(move || s.wait_entered())
        .await
        .unwrap();
    // Two more fill the queue.
    for p in ["/2", "/3"] {
        svc.clone()
            .oneshot(Request::get(p).body(Body::new()).unwrap())
            .await
            .unwrap();
    }
    // The fourth response waits for room.
    let mut s4 = svc.clone();
    let mut fut = Box::pin(
        s4.ready()
            .await
            .unwrap()
            .call(Request::get("/4").body(Body::new()).unwrap()),
    );
    assert!(poll_once(fut.as_mut()).is_pending());
    assert!(poll_once(fut.as_mut()).is_pending());
    sink.open();
    assert_eq!(fut.await.unwrap().status(), 200);
    let stats = auditor.shutdown().await;
    assert_eq!((stats.written, stats.dropped), (4, 0));
    let paths: Vec<_> = requests(&sink.inner.events())
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(paths, ["/1", "/2", "/3", "/4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_dropped_while_waiting_for_room_counts_its_event() {
    let sink = GateSink::new();
    let auditor = Auditor::builder().capacity(2).spawn(sink.clone()).unwrap();
    let svc = plain(auditor.clone());
    svc.clone()
        .oneshot(Request::get("/1").body(Body::new()).unwrap())
        .await
        .unwrap();
    let s = sink.clone();
    tokio::task::spawn_blocking(move || s.wait_entered())
        .await
        .unwrap();
    for p in ["/2", "/3"] {
        svc.clone()
            .oneshot(Request::get(p).body(Body::new()).unwrap())
            .await
            .unwrap();
    }
    let mut s4 = svc.clone();
    let mut fut = Box::pin(
        s4.ready()
            .await
            .unwrap()
            .call(Request::get("/4").body(Body::new()).unwrap()),
    );
    assert!(poll_once(fut.as_mut()).is_pending());
    drop(fut);
    assert_eq!(auditor.dropped(), 1);
    sink.open();
    let stats = auditor.shutdown().await;
    assert_eq!((stats.written, stats.dropped), (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_drops_and_counts_under_drop() {
    let sink = GateSink::new();
    let auditor = Auditor::builder()
        .capacity(2)
        .overflow(Overflow::Drop)
        .spawn(sink.clone())
        .unwrap();
    let svc = plain(auditor.clone());
    svc.clone()
        .oneshot(Request::get("/1").body(Body::new()).unwrap())
        .await
        .unwrap();
    let s = sink.clone();
    tokio::task::spawn_blocking(move || s.wait_entered())
        .await
        .unwrap();
    for p in ["/2", "/3", "/4", "/5", "/6"] {
        // Never waits.
        let mut s = svc.clone();
        let mut fut = Box::pin(
            s.ready()
                .await
                .unwrap()
                .call(Request::get(p).body(Body::new()).unwrap()),
        );
        assert!(poll_once(fut.as_mut()).is_ready(), "{p}");
    }
    assert_eq!(auditor.dropped(), 3);
    assert_eq!(auditor.overflow(), Overflow::Drop);
    sink.open();
    let stats = auditor.shutdown().await;
    assert_eq!((stats.written, stats.dropped, stats.failed), (3, 3, 0));
}

#[cfg(feature = "axum")]
#[tokio::test]
async fn under_axum_over_a_socket() {
    use axum::routing::get;
    let fx = Fixture::new();
    let key = fx.issue("axum-key").await;
    let sink = MemorySink::new();
    let app = axum::Router::new()
        .route("/hello", get(|| async { "hi" }))
        .layer(fx.gate.auth_layer())
        .layer(fx.gate.audit_layer(Auditor::direct(sink.clone())));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    for k in [Some(key.expose_secret()), None] {
        let mut b = Request::get(format!("http://{addr}/hello?x=1"));
        if let Some(k) = k {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        let res = client
            .request(b.body(Default::default()).unwrap())
            .await
            .unwrap();
        assert!(res.headers().contains_key("x-request-id"));
    }
    server.abort();
    let events = requests(&sink.events());
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].key_name.as_deref(), Some("axum-key"));
    assert_eq!(events[0].status, Some(200));
    assert_eq!(events[1].denial, Some(DenialCode::MissingKey));
    for e in &events {
        assert_eq!(e.client_ip, Some(IpAddr::from([127, 0, 0, 1])));
        assert_eq!(e.path, "/hello");
    }
}

#[tokio::test]
async fn gate_less_layers_keep_their_clock_and_the_hub_gives_its_own() {
    let fx = Fixture::new();
    let sink = MemorySink::new();
    let svc = ServiceBuilder::new()
        .layer(KeyGate::audit_layer(
            &fx.gate,
            Auditor::direct(sink.clone()),
        ))
        .service(ok_service());
    svc.oneshot(Request::get("/").body(Body::new()).unwrap())
        .await
        .unwrap();
    // The fixture's manual clock stands at 2026-01-01.
    assert_eq!(requests(&sink.events())[0].time, fx.gate.clock().now());
}
