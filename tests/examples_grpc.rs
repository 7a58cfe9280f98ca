//! `examples/grpc_vector_db.rs` end to end: its server (the six layers in front of the
//! hand-written tonic service) on a loopback port, called with its own tonic client. Every
//! denial is a gRPC status (never a bare HTTP error), the service is not reached on a denial,
//! and the audit sink records each call with its method and status and no key.

mod common;

#[path = "../examples/grpc_vector_db.rs"]
#[allow(dead_code)]
mod example;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::Fixture;
use example::pb::{
    self, CreateCollectionRequest, Distance, Point, SearchRequest, UpsertRequest, VectorDbClient,
};
use example::{Protection, VectorDb};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::core::audit::{Auditor, Decision, MemorySink, Transport};
use keygate::core::usage::MemoryUsageStore;
use keygate::ip::IpPolicy;
use keygate::quota::QuotaConfig;
use keygate::rate_limit::{LimiterClock, RateLimitConfig};
use keygate::{ApiKey, DenialCode, KeyRecord, QuotaPolicy, QuotaWindow, RateLimitPolicy};
use tonic::{Code, Request, Status};

const ALL_SCOPES: &[&str] = &["collections:manage", "points:write", "points:read"];

struct Server {
    fx: Fixture,
    sink: MemorySink,
    addr: SocketAddr,
    client: VectorDbClient,
}

/// The example's protection over a fixture hub: per-key IP lists, 1,000 calls a minute on
/// the fixture's manual clock, quotas in memory, audit events into `sink`.
fn protection(fx: &Fixture, sink: &MemorySink) -> Protection {
    Protection {
        gate: fx.gate.clone(),
        ip: IpPolicy::new(),
        rate_limit: RateLimitConfig::new()
            .clock(LimiterClock::manual(fx.clock.clone()))
            .default_policies([RateLimitPolicy::per_minute("default", 1_000)]),
        quota: QuotaConfig::new(MemoryUsageStore::new()),
        auditor: Auditor::direct(sink.clone()),
    }
}

/// Serves the example on 127.0.0.1 with a fixture hub (manual clock, counting store that
/// can fail), a limiter on the same manual clock, and a memory audit sink.
async fn start() -> Server {
    start_with(VectorDb::new()).await
}

/// Like [`start`], serving `db`.
async fn start_with(db: VectorDb) -> Server {
    let fx = Fixture::new();
    let sink = MemorySink::new();
    let protection = protection(&fx, &sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        example::serve(listener, protection, db, std::future::pending())
            .await
            .expect("grpc server");
    });
    let client = VectorDbClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Server {
        fx,
        sink,
        addr,
        client,
    }
}

impl Server {
    async fn key(&self, name: &str, scopes: &[&str], edit: impl FnOnce(&mut KeyRecord)) -> ApiKey {
        self.fx
            .issue_with(name, |r| {
                r.scopes = scopes.iter().map(|s| s.to_string()).collect();
                r.resources = vec!["*".into()];
                edit(r);
            })
            .await
    }
}

fn req<T>(msg: T, key: Option<&ApiKey>) -> Request<T> {
    let mut req = Request::new(msg);
    if let Some(key) = key {
        req.metadata_mut()
            .insert("x-api-key", key.expose_secret().parse().expect("ASCII key"));
    }
    req
}

fn create(collection: &str, dimension: u32) -> CreateCollectionRequest {
    CreateCollectionRequest {
        collection: collection.into(),
        dimension,
        distance: Distance::Cosine as i32,
    }
}

fn upsert(collection: &str, points: &[(u64, [f32; 2])]) -> UpsertRequest {
    UpsertRequest {
        collection: collection.into(),
        points: points
            .iter()
            .map(|(id, v)| Point {
                id: *id,
                vector: v.to_vec(),
                payload: Default::default(),
            })
            .collect(),
    }
}

fn search(collection: &str, v: [f32; 2]) -> SearchRequest {
    SearchRequest {
        collection: collection.into(),
        vector: v.to_vec(),
        limit: 0,
    }
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, prefix: &str) {
    let status = result.expect_err(prefix);
    assert_eq!(status.code(), code, "{prefix}: {status:?}");
    assert!(
        status.message().starts_with(prefix),
        "expected a message starting with {prefix:?}: {status:?}"
    );
}

/// Ids of a search's hits, closest first.
async fn hits(s: &mut Server, key: &ApiKey, collection: &str, v: [f32; 2]) -> Vec<u64> {
    s.client
        .search(req(search(collection, v), Some(key)))
        .await
        .expect("search")
        .into_inner()
        .hits
        .iter()
        .map(|h| h.id)
        .collect()
}

#[tokio::test]
async fn valid_key_creates_upserts_and_searches() {
    let mut s = start().await;
    let key = s.key("writer", ALL_SCOPES, |_| {}).await;

    let created = s
        .client
        .create_collection(req(create("docs", 2), Some(&key)))
        .await;
    assert!(created.expect("create").into_inner().created);
    let again = s
        .client
        .create_collection(req(create("docs", 2), Some(&key)))
        .await;
    assert!(!again.expect("create again").into_inner().created);

    let points = [(1, [1.0, 0.0]), (2, [0.0, 1.0]), (3, [0.7, 0.7])];
    let res = s
        .client
        .upsert(req(upsert("docs", &points), Some(&key)))
        .await
        .expect("upsert");
    assert_eq!(res.get_ref().upserted, 3);
    // The rate limiter's fields travel as response metadata.
    assert!(
        res.metadata().get("ratelimit").is_some(),
        "{:?}",
        res.metadata()
    );
    assert_eq!(hits(&mut s, &key, "docs", [0.9, 0.1]).await, vec![1, 3, 2]);

    // Bad input is the handler's INVALID_ARGUMENT, and changes nothing.
    let wrong_len = SearchRequest {
        vector: vec![1.0, 0.0, 0.0],
        ..search("docs", [0.0, 0.0])
    };
    assert_status(
        s.client.search(req(wrong_len, Some(&key))).await,
        Code::InvalidArgument,
        "the vector has 3 numbers",
    );
    let mut bad = upsert("docs", &[(9, [0.5, 0.5])]);
    bad.points.push(Point {
        id: 10,
        vector: vec![f32::NAN, 1.0],
        payload: Default::default(),
    });
    assert_status(
        s.client.upsert(req(bad, Some(&key))).await,
        Code::InvalidArgument,
        "vectors hold finite numbers only",
    );
    assert_eq!(hits(&mut s, &key, "docs", [0.9, 0.1]).await, vec![1, 3, 2]);
    assert_status(
        s.client
            .search(req(search("nope", [1.0, 0.0]), Some(&key)))
            .await,
        Code::NotFound,
        "no such collection",
    );

    // One audit event per call: gRPC, the method, the key's name, allowed.
    let events = s.sink.events();
    assert_eq!(events.len(), 8, "{events:#?}");
    let first = events[0].as_request().expect("request event");
    assert_eq!(first.protocol, Transport::Grpc);
    assert_eq!(
        first.rpc.as_deref(),
        Some("keygate.vectordb.v1.VectorDb/CreateCollection")
    );
    assert_eq!(first.key_name.as_deref(), Some("writer"));
    assert_eq!(first.decision, Decision::Allowed);
    let last = events[7].as_request().expect("request event");
    assert_eq!(
        last.rpc.as_deref(),
        Some("keygate.vectordb.v1.VectorDb/Search")
    );
    assert_eq!(last.grpc_status, Some(Code::NotFound as u16));
    let json = serde_json::to_string(&events.iter().map(|e| e.as_request()).collect::<Vec<_>>())
        .expect("events serialize");
    assert!(
        !json.contains(key.expose_secret()),
        "the key is in the audit"
    );
}

#[tokio::test]
async fn missing_or_bad_key_is_unauthenticated() {
    let mut s = start().await;
    let key = s.key("writer", ALL_SCOPES, |_| {}).await;

    assert_status(
        s.client
            .create_collection(req(create("docs", 2), None))
            .await,
        Code::Unauthenticated,
        "missing_key",
    );
    let mut forged = Request::new(create("docs", 2));
    let wrong = common::wrong_secret(&key);
    forged
        .metadata_mut()
        .insert("x-api-key", wrong.parse().expect("ASCII"));
    assert_status(
        s.client.create_collection(forged).await,
        Code::Unauthenticated,
        "invalid_key",
    );
    let mut garbage = Request::new(create("docs", 2));
    garbage
        .metadata_mut()
        .insert("authorization", "Bearer kg_garbage".parse().expect("ASCII"));
    assert_status(
        s.client.create_collection(garbage).await,
        Code::Unauthenticated,
        "malformed_key",
    );
    // The service was never reached: the collection does not exist.
    assert_status(
        s.client
            .search(req(search("docs", [1.0, 0.0]), Some(&key)))
            .await,
        Code::NotFound,
        "no such collection",
    );
    let events = s.sink.events();
    let denied: Vec<_> = events
        .iter()
        .filter_map(|e| e.as_request())
        .filter(|e| e.decision == Decision::Denied)
        .map(|e| (e.denial, e.grpc_status))
        .collect();
    assert_eq!(
        denied,
        vec![
            (Some(DenialCode::MissingKey), Some(16)),
            (Some(DenialCode::InvalidKey), Some(16)),
            (Some(DenialCode::MalformedKey), Some(16)),
        ]
    );
}

#[tokio::test]
async fn wrong_scope_or_collection_is_permission_denied() {
    let mut s = start().await;
    let writer = s.key("writer", ALL_SCOPES, |_| {}).await;
    let reader = s.key("reader", &["points:read"], |_| {}).await;
    let narrow = s
        .key("narrow", ALL_SCOPES, |r| {
            r.resources = vec!["team-*".into()]
        })
        .await;
    s.client
        .create_collection(req(create("docs", 2), Some(&writer)))
        .await
        .expect("create");
    s.client
        .upsert(req(upsert("docs", &[(1, [1.0, 0.0])]), Some(&writer)))
        .await
        .expect("upsert");

    // The scope layer: a read-only key may search but not write or create.
    assert_eq!(hits(&mut s, &reader, "docs", [1.0, 0.0]).await, vec![1]);
    assert_status(
        s.client
            .upsert(req(upsert("docs", &[(2, [0.0, 1.0])]), Some(&reader)))
            .await,
        Code::PermissionDenied,
        "insufficient_scope",
    );
    assert_status(
        s.client
            .create_collection(req(create("other", 2), Some(&reader)))
            .await,
        Code::PermissionDenied,
        "insufficient_scope",
    );
    assert_eq!(hits(&mut s, &writer, "docs", [0.0, 1.0]).await, vec![1]);

    // The collection is in the message: the handler checks it (resource_forbidden).
    assert_status(
        s.client
            .search(req(search("docs", [1.0, 0.0]), Some(&narrow)))
            .await,
        Code::PermissionDenied,
        "resource_forbidden",
    );
    s.client
        .create_collection(req(create("team-a", 2), Some(&narrow)))
        .await
        .expect("a collection the key may use");

    // A method without a rule in the table is refused before the service: it does not
    // exist (UNIMPLEMENTED, unknown_route), whatever the key's scopes.
    let mut grpc = tonic::client::Grpc::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", s.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    grpc.ready().await.expect("ready");
    let res: Result<tonic::Response<pb::SearchResponse>, Status> = grpc
        .unary(
            req(search("docs", [1.0, 0.0]), Some(&writer)),
            http::uri::PathAndQuery::from_static("/keygate.vectordb.v1.VectorDb/Delete"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_status(res, Code::Unimplemented, "unknown_route");
}

#[tokio::test]
async fn tenants_see_only_their_points() {
    let mut s = start().await;
    let admin = s.key("admin", ALL_SCOPES, |_| {}).await;
    let tenant = |t: &'static str| {
        move |r: &mut KeyRecord| {
            r.attributes.insert("tenant".into(), t.into());
        }
    };
    let acme = s.key("acme", ALL_SCOPES, tenant("acme")).await;
    let umbrella = s.key("umbrella", ALL_SCOPES, tenant("umbrella")).await;
    s.client
        .create_collection(req(create("shared", 2), Some(&admin)))
        .await
        .expect("create");
    s.client
        .upsert(req(upsert("shared", &[(1, [1.0, 0.0])]), Some(&acme)))
        .await
        .expect("acme upsert");
    s.client
        .upsert(req(
            upsert("shared", &[(1, [0.0, 1.0]), (2, [1.0, 1.0])]),
            Some(&umbrella),
        ))
        .await
        .expect("umbrella upsert");

    assert_eq!(hits(&mut s, &acme, "shared", [0.0, 1.0]).await, vec![1]);
    let res = s
        .client
        .search(req(search("shared", [0.0, 1.0]), Some(&acme)))
        .await
        .expect("search");
    assert_eq!(res.get_ref().hits[0].payload["tenant"], "acme");
    assert_eq!(
        hits(&mut s, &umbrella, "shared", [0.0, 1.0]).await,
        vec![1, 2]
    );
    // A key without a tenant sees every tenant's points.
    assert_eq!(hits(&mut s, &admin, "shared", [0.0, 1.0]).await.len(), 3);
}

#[tokio::test]
async fn pinned_key_from_elsewhere_is_permission_denied() {
    let mut s = start().await;
    let here = s
        .key("here", ALL_SCOPES, |r| {
            r.allowed_ips = vec!["127.0.0.0/8".parse().expect("CIDR")]
        })
        .await;
    let away = s
        .key("away", ALL_SCOPES, |r| {
            r.allowed_ips = vec!["192.0.2.0/24".parse().expect("CIDR")]
        })
        .await;
    s.client
        .create_collection(req(create("docs", 2), Some(&here)))
        .await
        .expect("loopback is allowed");
    assert_status(
        s.client
            .search(req(search("docs", [1.0, 0.0]), Some(&away)))
            .await,
        Code::PermissionDenied,
        "ip_not_allowed",
    );
    let event = s.sink.events().pop().expect("event");
    let event = event.as_request().expect("request event");
    assert_eq!(event.denial, Some(DenialCode::IpNotAllowed));
    assert_eq!(event.client_ip, Some([127, 0, 0, 1].into()));
}

/// Sends one gRPC `Search` as raw HTTP/2 and returns the status and headers: what a client
/// other than tonic sees.
async fn raw_search(addr: SocketAddr, key: &ApiKey) -> (http::StatusCode, http::HeaderMap) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    // An empty, uncompressed message: flag 0, length 0.
    let body = Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]));
    let request = http::Request::post(format!("http://{addr}{}", pb::SEARCH))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-api-key", key.expose_secret())
        .body(body)
        .expect("request");
    let res = sender.send_request(request).await.expect("response");
    let (parts, body) = res.into_parts();
    let _ = body.collect().await;
    (parts.status, parts.headers)
}

#[tokio::test]
async fn over_the_rate_limit_is_resource_exhausted_never_a_bare_429() {
    let mut s = start().await;
    let key = s
        .key("burst", ALL_SCOPES, |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 2)]
        })
        .await;
    s.client
        .create_collection(req(create("docs", 2), Some(&key)))
        .await
        .expect("first call");
    assert!(hits(&mut s, &key, "docs", [1.0, 0.0]).await.is_empty());
    assert_status(
        s.client
            .search(req(search("docs", [1.0, 0.0]), Some(&key)))
            .await,
        Code::ResourceExhausted,
        "rate_limited",
    );
    // On the wire: HTTP 200 with a trailers-only gRPC status 8, not HTTP 429 (which tonic and
    // grpc-go would read as UNAVAILABLE and retry).
    let (status, headers) = raw_search(s.addr, &key).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["grpc-status"], "8");
    assert!(headers["content-type"]
        .to_str()
        .expect("ASCII")
        .starts_with("application/grpc"));
    assert!(headers["grpc-message"]
        .to_str()
        .expect("ASCII")
        .starts_with("rate_limited"));
    // GCRA: one call every 30 s comes back.
    s.fx.clock.advance(Duration::from_secs(30));
    assert!(hits(&mut s, &key, "docs", [1.0, 0.0]).await.is_empty());
    let denials: Vec<_> = s
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_request().and_then(|e| e.denial))
        .collect();
    assert_eq!(denials, vec![DenialCode::RateLimited; 2]);
}

#[tokio::test]
async fn quota_used_up_is_resource_exhausted() {
    let mut s = start().await;
    let key = s
        .key("metered", ALL_SCOPES, |r| {
            r.quotas = vec![QuotaPolicy::new("daily", 2, QuotaWindow::Day)]
        })
        .await;
    s.client
        .create_collection(req(create("docs", 2), Some(&key)))
        .await
        .expect("first call");
    assert!(hits(&mut s, &key, "docs", [1.0, 0.0]).await.is_empty());
    assert_status(
        s.client
            .search(req(search("docs", [1.0, 0.0]), Some(&key)))
            .await,
        Code::ResourceExhausted,
        "quota_exceeded",
    );
    let (status, headers) = raw_search(s.addr, &key).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["grpc-status"], "8");
}

#[tokio::test]
async fn key_store_down_is_unavailable() {
    let mut s = start().await;
    let known = s.key("known", ALL_SCOPES, |_| {}).await;
    let fresh = s.key("fresh", ALL_SCOPES, |_| {}).await;
    s.client
        .create_collection(req(create("docs", 2), Some(&known)))
        .await
        .expect("create");

    s.fx.store.set_down(true);
    // A key the verifier has not seen needs the store: fail closed, UNAVAILABLE (14).
    assert_status(
        s.client
            .search(req(search("docs", [1.0, 0.0]), Some(&fresh)))
            .await,
        Code::Unavailable,
        "store_unavailable",
    );
    let (status, headers) = raw_search(s.addr, &fresh).await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["grpc-status"], "14");
    // A cached key does not wait on the store.
    assert!(hits(&mut s, &known, "docs", [1.0, 0.0]).await.is_empty());

    s.fx.store.set_down(false);
    assert!(hits(&mut s, &fresh, "docs", [1.0, 0.0]).await.is_empty());
    let event = s
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_request().cloned())
        .find(|e| e.denial.is_some())
        .expect("a denied event");
    assert_eq!(event.denial, Some(DenialCode::StoreUnavailable));
    assert_eq!(event.grpc_status, Some(14));
}

#[tokio::test]
async fn bad_keys_are_rate_limited_per_address() {
    let mut s = start().await;
    let good = s.key("good", ALL_SCOPES, |_| {}).await;
    let bad = common::wrong_secret(&good);
    let bad_req = || {
        let mut r = Request::new(search("docs", [1.0, 0.0]));
        r.metadata_mut()
            .insert("x-api-key", bad.parse().expect("ASCII key"));
        r
    };
    // The anonymous limit (10 per second per address) counts failed keys too: the rate
    // limit sits outside auth.
    for _ in 0..10 {
        assert_status(s.client.search(bad_req()).await, Code::Unauthenticated, "");
    }
    assert_status(
        s.client.search(bad_req()).await,
        Code::ResourceExhausted,
        "rate_limited",
    );
    // The valid key is not affected.
    s.client
        .create_collection(req(create("docs", 2), Some(&good)))
        .await
        .expect("a valid key still passes");
}

#[tokio::test]
async fn an_upsert_costs_its_point_count() {
    let mut s = start().await;
    let key = s
        .key("ingest", ALL_SCOPES, |r| {
            r.rate_limits = vec![RateLimitPolicy::per_minute("burst", 6)]
        })
        .await;
    s.client
        .create_collection(req(create("docs", 2), Some(&key)))
        .await
        .expect("create (1)");
    let three = [(1, [1.0, 0.0]), (2, [0.0, 1.0]), (3, [1.0, 1.0])];
    s.client
        .upsert(req(upsert("docs", &three), Some(&key)))
        .await
        .expect("3 points (4 of 6)");
    // Three more points are more than the 2 left: refused, nothing written.
    let more = [(4, [1.0, 0.0]), (5, [0.0, 1.0]), (6, [1.0, 1.0])];
    assert_status(
        s.client
            .upsert(req(upsert("docs", &more), Some(&key)))
            .await,
        Code::ResourceExhausted,
        "rate_limited",
    );
    // A search costs 1.
    assert_eq!(hits(&mut s, &key, "docs", [1.0, 0.0]).await.len(), 3);
    assert_eq!(
        example::count_points(&[0, 0, 0, 0, 2, 0x12, 0]),
        1,
        "an empty point is one"
    );
}

#[tokio::test]
async fn each_tenant_has_its_own_share_of_memory() {
    let mut s = start_with(VectorDb::with_tenant_share(8)).await;
    let admin = s.key("admin", ALL_SCOPES, |_| {}).await;
    let tenant = |t: &'static str| {
        move |r: &mut KeyRecord| {
            r.attributes.insert("tenant".into(), t.into());
        }
    };
    let acme = s.key("acme", ALL_SCOPES, tenant("acme")).await;
    let umbrella = s.key("umbrella", ALL_SCOPES, tenant("umbrella")).await;
    s.client
        .create_collection(req(create("shared", 2), Some(&admin)))
        .await
        .expect("create");
    let four = [
        (1, [1.0, 0.0]),
        (2, [0.0, 1.0]),
        (3, [1.0, 1.0]),
        (4, [1.0, 2.0]),
    ];
    s.client
        .upsert(req(upsert("shared", &four), Some(&acme)))
        .await
        .expect("acme fills its share (8 numbers)");
    assert_status(
        s.client
            .upsert(req(upsert("shared", &[(5, [1.0, 0.0])]), Some(&acme)))
            .await,
        Code::ResourceExhausted,
        "this tenant's share",
    );
    // Overwriting its own points needs no more room.
    s.client
        .upsert(req(upsert("shared", &[(1, [2.0, 0.0])]), Some(&acme)))
        .await
        .expect("acme overwrites");
    // Umbrella's share is untouched by acme's.
    s.client
        .upsert(req(upsert("shared", &four), Some(&umbrella)))
        .await
        .expect("umbrella fills its own share");
}

#[tokio::test]
async fn over_tls_per_key_ip_lists_read_the_tls_peer() {
    // The example served over TLS (accepted with rustls before tonic), called by a tonic
    // client that trusts the test certificate: per-key IP lists see the TCP peer through
    // tonic's TlsConnectInfo.
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert, key) = (made.cert.pem(), made.key_pair.serialize_pem());
    let fx = Fixture::new();
    let sink = MemorySink::new();
    let protection = protection(&fx, &sink);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = tls_files(dir.path(), &cert, &key);
    tokio::spawn(async move {
        example::serve_tls(
            listener,
            protection,
            VectorDb::new(),
            std::future::pending(),
            Some(tls),
        )
        .await
        .expect("grpc server");
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name("localhost")
                .ca_certificate(tonic::transport::Certificate::from_pem(&cert)),
        )
        .expect("client TLS")
        .connect()
        .await
        .expect("TLS connect");
    let mut client = VectorDbClient::new(channel);
    let s = Server {
        fx,
        sink,
        addr,
        client: client.clone(),
    };
    let here = s
        .key("here", ALL_SCOPES, |r| {
            r.allowed_ips = vec!["127.0.0.0/8".parse().expect("CIDR")]
        })
        .await;
    let away = s
        .key("away", ALL_SCOPES, |r| {
            r.allowed_ips = vec!["192.0.2.0/24".parse().expect("CIDR")]
        })
        .await;
    client
        .create_collection(req(create("docs", 2), Some(&here)))
        .await
        .expect("a loopback-pinned key works over TLS");
    assert_status(
        client
            .search(req(search("docs", [1.0, 0.0]), Some(&away)))
            .await,
        Code::PermissionDenied,
        "ip_not_allowed",
    );
    let event = s.sink.events().pop().expect("event");
    let event = event.as_request().expect("request event");
    assert_eq!(event.client_ip, Some([127, 0, 0, 1].into()));
}

/// Writes `cert` and `key` (PEM) into `dir` and loads them as the example's TLS.
fn tls_files(dir: &std::path::Path, cert: &str, key: &str) -> example::ReloadableTls {
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert).expect("write cert");
    std::fs::write(&k, key).expect("write key");
    example::ReloadableTls::from_files(c, k).expect("TLS files")
}

/// A TLS channel to `addr` trusting only `ca` (PEM).
async fn tls_channel(
    addr: SocketAddr,
    ca: &str,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name("localhost")
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .expect("client TLS")
        .connect()
        .await
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_connections_and_open_ones_keep_working() {
    let first = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let second = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert1, key1) = (first.cert.pem(), first.key_pair.serialize_pem());
    let (cert2, key2) = (second.cert.pem(), second.key_pair.serialize_pem());
    let fx = Fixture::new();
    let protection = protection(&fx, &MemorySink::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = tls_files(dir.path(), &cert1, &key1);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server_tls = tls.clone();
    tokio::spawn(async move {
        example::serve_tls(
            listener,
            protection,
            VectorDb::new(),
            std::future::pending(),
            Some(server_tls),
        )
        .await
        .expect("grpc server");
    });
    let mut before = VectorDbClient::new(tls_channel(addr, &cert1).await.expect("first cert"));
    let s = Server {
        fx,
        sink: MemorySink::new(),
        addr,
        client: before.clone(),
    };
    let key = s.key("k", ALL_SCOPES, |_| {}).await;
    before
        .create_collection(req(create("docs", 2), Some(&key)))
        .await
        .expect("served with the first certificate");

    // A file that does not load leaves the first certificate in use.
    std::fs::write(dir.path().join("key.pem"), "not a key").expect("write");
    assert!(tls.reload().is_err());
    tls_channel(addr, &cert1)
        .await
        .expect("still the first certificate");

    // The second certificate: new connections get it, the open one keeps working.
    std::fs::write(dir.path().join("cert.pem"), &cert2).expect("write");
    std::fs::write(dir.path().join("key.pem"), &key2).expect("write");
    tls.reload().expect("reload");
    assert!(
        tls_channel(addr, &cert1).await.is_err(),
        "a new connection is served the second certificate"
    );
    let mut after = VectorDbClient::new(tls_channel(addr, &cert2).await.expect("second cert"));
    after
        .search(req(search("docs", [1.0, 0.0]), Some(&key)))
        .await
        .expect("served with the second certificate");
    before
        .search(req(search("docs", [1.0, 0.0]), Some(&key)))
        .await
        .expect("the connection opened before the reload still works");
}
