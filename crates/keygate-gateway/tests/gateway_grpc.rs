//! gRPC pass-through: a tonic client through the gateway to a small gRPC upstream on
//! Qdrant's method paths (hand-written prost messages with Qdrant's field numbers, tonic's
//! server glue), which records what it received.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::core::audit::{Decision, Transport};
use keygate::{DenialCode, KeySpec, RateLimitPolicy};
use keygate_gateway::preset::Preset;
use keygate_gateway::proxy::UpstreamCredential;
use support::{requests, Gw};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, Status};

const SEARCH: &str = "/qdrant.Points/Search";
const UPSERT: &str = "/qdrant.Points/Upsert";
const LIST: &str = "/qdrant.Collections/List";
const GET: &str = "/qdrant.Collections/Get";

// Qdrant's messages, with only the fields the tests use (Qdrant's field numbers).

#[derive(Clone, PartialEq, prost::Message)]
struct PointId {
    #[prost(uint64, tag = "1")]
    num: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SearchPoints {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(float, repeated, tag = "2")]
    vector: Vec<f32>,
    #[prost(uint64, tag = "4")]
    limit: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ScoredPoint {
    #[prost(message, optional, tag = "1")]
    id: Option<PointId>,
    #[prost(float, tag = "3")]
    score: f32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SearchResponse {
    #[prost(message, repeated, tag = "1")]
    result: Vec<ScoredPoint>,
    #[prost(double, tag = "2")]
    time: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PointStruct {
    #[prost(message, optional, tag = "1")]
    id: Option<PointId>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UpsertPoints {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(message, repeated, tag = "3")]
    points: Vec<PointStruct>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct UpdateResult {
    #[prost(uint64, optional, tag = "1")]
    operation_id: Option<u64>,
    #[prost(int32, tag = "2")]
    status: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PointsOperationResponse {
    #[prost(message, optional, tag = "1")]
    result: Option<UpdateResult>,
    #[prost(double, tag = "2")]
    time: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ListCollectionsRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct CollectionDescription {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ListCollectionsResponse {
    #[prost(message, repeated, tag = "1")]
    collections: Vec<CollectionDescription>,
    #[prost(double, tag = "2")]
    time: f64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GetCollectionInfoRequest {
    #[prost(string, tag = "1")]
    collection_name: String,
}

/// One request the upstream received: its path and headers, and the collections of the
/// messages it decoded.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HeaderMap,
}

#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Collections named by the upsert messages received, in order.
    upserted: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

async fn unary<Req, Res>(
    req: Request<Incoming>,
    handler: impl Fn(tonic::Request<Req>) -> Result<tonic::Response<Res>, Status>
        + Send
        + Sync
        + 'static,
) -> Response<tonic::body::Body>
where
    Req: prost::Message + Default + Send + 'static,
    Res: prost::Message + Send + 'static,
{
    let codec = tonic_prost::ProstCodec::<Res, Req>::default();
    let svc = tower::service_fn(move |r| std::future::ready(handler(r)));
    tonic::server::Grpc::new(codec).unary(svc, req).await
}

/// The fake Qdrant: `Search` answers two hits, `Upsert` takes a stream of messages (one
/// for a unary client) and answers how many points it got, `Collections/List` lists
/// `docs`, `Collections/Get` answers NOT_FOUND (trailers-only).
async fn upstream() -> (SocketAddr, Upstream) {
    let state = Upstream::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let st = st.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let st = st.clone();
                async move {
                    st.seen.lock().expect("lock").push(Seen {
                        path: req.uri().path().to_owned(),
                        headers: req.headers().clone(),
                    });
                    let res = match req.uri().path() {
                        SEARCH => {
                            unary(req, |r: tonic::Request<SearchPoints>| {
                                let n = r.get_ref().limit.min(2);
                                Ok(tonic::Response::new(SearchResponse {
                                    result: (1..=n)
                                        .map(|i| ScoredPoint {
                                            id: Some(PointId { num: i }),
                                            score: 1.0 / i as f32,
                                        })
                                        .collect(),
                                    time: 0.001,
                                }))
                            })
                            .await
                        }
                        LIST => {
                            unary(req, |_r: tonic::Request<ListCollectionsRequest>| {
                                Ok(tonic::Response::new(ListCollectionsResponse {
                                    collections: vec![CollectionDescription {
                                        name: "docs".into(),
                                    }],
                                    time: 0.001,
                                }))
                            })
                            .await
                        }
                        GET => {
                            unary(req, |r: tonic::Request<GetCollectionInfoRequest>| {
                                Err::<tonic::Response<ListCollectionsResponse>, _>(
                                    Status::not_found(format!(
                                        "Collection `{}` doesn't exist!",
                                        r.get_ref().collection_name
                                    )),
                                )
                            })
                            .await
                        }
                        UPSERT => {
                            let codec = tonic_prost::ProstCodec::<
                                PointsOperationResponse,
                                UpsertPoints,
                            >::default();
                            let upserted = st.upserted.clone();
                            let svc = tower::service_fn(
                                move |r: tonic::Request<tonic::Streaming<UpsertPoints>>| {
                                    let upserted = upserted.clone();
                                    async move {
                                        let mut stream = r.into_inner();
                                        let mut points = 0;
                                        while let Some(m) = stream.message().await? {
                                            points += m.points.len() as u64;
                                            upserted.lock().expect("lock").push(m.collection_name);
                                        }
                                        Ok::<_, Status>(tonic::Response::new(
                                            PointsOperationResponse {
                                                result: Some(UpdateResult {
                                                    operation_id: Some(points),
                                                    status: 2,
                                                }),
                                                time: 0.001,
                                            },
                                        ))
                                    }
                                },
                            );
                            tonic::server::Grpc::new(codec)
                                .client_streaming(svc, req)
                                .await
                        }
                        _ => Status::unimplemented("no such method").into_http(),
                    };
                    Ok::<_, Infallible>(res)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

/// The gateway with `[grpc]` in front of a fresh fake upstream (REST upstream: nowhere),
/// holding the upstream credential `up-secret` in `api-key`.
async fn start(edit: impl FnOnce(&mut keygate_gateway::config::Config)) -> (Gw, Upstream) {
    let (addr, up) = upstream().await;
    let credential = UpstreamCredential::new("api-key", None, "up-secret").expect("credential");
    let gw = Gw::start(
        Preset::Qdrant,
        "http://127.0.0.1:9",
        Some(credential),
        |c| {
            c.grpc = Some(keygate_gateway::config::GrpcConfig {
                url: format!("http://{addr}"),
                max_message_bytes: 1024,
            });
            edit(c);
        },
    )
    .await;
    (gw, up)
}

/// A tonic client of the gateway.
async fn client(gw: &Gw) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    tonic::client::Grpc::new(channel)
}

fn with_key<T>(msg: T, key: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Some(k) = key {
        req.metadata_mut()
            .insert("api-key", k.parse().expect("metadata"));
    }
    req
}

async fn call<Req, Res>(
    gw: &Gw,
    path: &'static str,
    msg: Req,
    key: Option<&str>,
) -> Result<tonic::Response<Res>, Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Res: prost::Message + Default + Send + Sync + 'static,
{
    let mut c = client(gw).await;
    c.ready().await.expect("ready");
    c.unary(
        with_key(msg, key),
        http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<Req, Res>::default(),
    )
    .await
}

async fn search(gw: &Gw, collection: &str, key: Option<&str>) -> Result<SearchResponse, Status> {
    let msg = SearchPoints {
        collection_name: collection.into(),
        vector: vec![0.1, 0.2],
        limit: 5,
    };
    call(gw, SEARCH, msg, key)
        .await
        .map(tonic::Response::into_inner)
}

fn upsert_msg(collection: &str, ids: &[u64]) -> UpsertPoints {
    UpsertPoints {
        collection_name: collection.into(),
        points: ids
            .iter()
            .map(|&n| PointStruct {
                id: Some(PointId { num: n }),
            })
            .collect(),
    }
}

async fn reader(gw: &Gw, collection: &str) -> String {
    gw.issue(
        KeySpec::new("reader")
            .scope("points:read")
            .scope("collections:read")
            .resource(collection),
    )
    .await
    .0
}

async fn writer(gw: &Gw, collection: &str) -> String {
    gw.issue(
        KeySpec::new("writer")
            .scope("points:read")
            .scope("points:write")
            .resource(collection),
    )
    .await
    .0
}

fn assert_code(r: Result<impl std::fmt::Debug, Status>, code: Code, text: &str) -> Status {
    let s = r.expect_err("refused");
    assert_eq!(s.code(), code, "{s:?}");
    assert!(
        s.message().contains(text),
        "{:?} lacks {text:?}",
        s.message()
    );
    s
}

/// An HTTP/2 connection to the gateway (its driver spawned).
async fn h2<B>(gw: &Gw) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(gw.addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// A gRPC request for `path` with `key` in `api-key` and `body` as it is.
fn grpc_request<B>(gw: &Gw, path: &str, key: &str, body: B) -> Request<B> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{}{path}", gw.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("api-key", key)
        .body(body)
        .expect("request")
}

/// Raw gRPC over HTTP/2 to the gateway: `body` as it is; answers the head (a trailers-only
/// refusal carries `grpc-status` there).
async fn raw(gw: &Gw, path: &str, key: &str, body: Vec<u8>) -> http::response::Parts {
    let mut sender = h2(gw).await;
    let req = grpc_request(gw, path, key, Full::new(Bytes::from(body)));
    let res = sender.send_request(req).await.expect("response");
    let (parts, body) = res.into_parts();
    let _ = body.collect().await;
    parts
}

fn frame(flag: u8, msg: &[u8]) -> Vec<u8> {
    let mut b = vec![flag];
    b.extend_from_slice(&u32::try_from(msg.len()).expect("len").to_be_bytes());
    b.extend_from_slice(msg);
    b
}

#[tokio::test]
async fn an_allowed_call_goes_through_with_the_upstream_credential_only() {
    let (gw, up) = start(|_| {}).await;
    let key = reader(&gw, "docs").await;
    let res = search(&gw, "docs", Some(&key)).await.expect("search");
    assert_eq!(res.result.len(), 2);
    assert_eq!(res.result[0].id, Some(PointId { num: 1 }));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, SEARCH);
    // The client's key never reaches the upstream; the upstream's own credential does.
    assert_eq!(seen[0].headers["api-key"], "up-secret");
    assert!(seen
        .iter()
        .all(|s| s.headers.values().all(|v| v.as_bytes() != key.as_bytes())));
    assert_eq!(seen[0].headers["te"], "trailers");
    // A key in `authorization: Bearer` works the same, and is removed too.
    let mut c = client(&gw).await;
    c.ready().await.expect("ready");
    let mut req = tonic::Request::new(ListCollectionsRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("metadata"),
    );
    let list: ListCollectionsResponse = c
        .unary(
            req,
            http::uri::PathAndQuery::from_static(LIST),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.collections[0].name, "docs");
    let seen = up.seen();
    assert!(!seen[1].headers.contains_key("authorization"));
    assert_eq!(seen[1].headers["api-key"], "up-secret");
    // An upstream error (trailers-only) reaches the client as the upstream sent it.
    let s = call::<_, ListCollectionsResponse>(
        &gw,
        GET,
        GetCollectionInfoRequest {
            collection_name: "docs".into(),
        },
        Some(&key),
    )
    .await;
    assert_code(s, Code::NotFound, "Collection `docs` doesn't exist!");
}

#[tokio::test]
async fn a_streamed_request_is_forwarded_whole_after_its_first_message() {
    let (gw, up) = start(|_| {}).await;
    let key = writer(&gw, "docs").await;
    let mut c = client(&gw).await;
    c.ready().await.expect("ready");
    let messages = vec![
        upsert_msg("docs", &[1, 2]),
        upsert_msg("docs", &[3]),
        upsert_msg("docs", &[4, 5, 6]),
    ];
    let stream = tokio_stream::iter(messages);
    let res: PointsOperationResponse = c
        .client_streaming(
            with_key(stream, Some(&key)),
            http::uri::PathAndQuery::from_static(UPSERT),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect("upsert")
        .into_inner();
    assert_eq!(res.result.and_then(|r| r.operation_id), Some(6));
    assert_eq!(*up.upserted.lock().expect("lock"), vec!["docs"; 3]);
}

#[tokio::test]
async fn a_later_message_for_another_collection_cuts_the_request() {
    let (gw, up) = start(|_| {}).await;
    let key = writer(&gw, "docs").await;
    let mut c = client(&gw).await;
    c.ready().await.expect("ready");
    let messages = vec![upsert_msg("docs", &[1]), upsert_msg("private", &[2])];
    let r: Result<tonic::Response<PointsOperationResponse>, Status> = c
        .client_streaming(
            with_key(tokio_stream::iter(messages), Some(&key)),
            http::uri::PathAndQuery::from_static(UPSERT),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_code(r, Code::PermissionDenied, "resource_forbidden");
    // The upstream never saw the second message.
    assert!(!up
        .upserted
        .lock()
        .expect("lock")
        .contains(&"private".to_owned()));
}

/// A protobuf string field (`tag` < 16, `value` shorter than 128 bytes).
fn string_field(tag: u8, value: &str) -> Vec<u8> {
    let mut b = vec![tag << 3 | 2, u8::try_from(value.len()).expect("short")];
    b.extend_from_slice(value.as_bytes());
    b
}

#[tokio::test]
async fn create_checks_the_collection_it_copies_and_scopes_pair_with_collections() {
    let (gw, up) = start(|_| {}).await;
    let (key, _) = gw
        .issue(
            KeySpec::new("manager")
                .scope("collections:manage")
                .resource("team-*"),
        )
        .await;
    const CREATE: &str = "/qdrant.Collections/Create";
    // `init_from_collection` (field 13) names a collection the key may not use.
    let mut msg = string_field(1, "team-a");
    msg.extend(string_field(13, "other"));
    let res = raw(&gw, CREATE, &key, frame(0, &msg)).await;
    assert_eq!(res.headers["grpc-status"], "7", "{res:?}");
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    let denied = requests(&gw).pop().expect("audited");
    assert_eq!(denied.decision, Decision::Denied);
    assert_eq!(denied.denial, Some(DenialCode::ResourceForbidden));
    // Copying one of its own is forwarded.
    let mut msg = string_field(1, "team-a");
    msg.extend(string_field(13, "team-b"));
    raw(&gw, CREATE, &key, frame(0, &msg)).await;
    assert_eq!(up.seen().len(), 1);
    // A key that writes `docs-*` and only reads `shared` may not write to `shared`: the
    // scope must be granted on the collection the message names.
    let (split, _) = gw
        .issue(
            KeySpec::new("split")
                .grant(keygate::Grant::new(["points:write"], ["docs-*"]))
                .grant(keygate::Grant::new(["points:read"], ["shared"])),
        )
        .await;
    let r =
        call::<_, PointsOperationResponse>(&gw, UPSERT, upsert_msg("shared", &[1]), Some(&split))
            .await;
    assert_code(r, Code::PermissionDenied, "insufficient_scope");
    assert!(up.upserted.lock().expect("lock").is_empty());
    call::<_, PointsOperationResponse>(&gw, UPSERT, upsert_msg("docs-1", &[1]), Some(&split))
        .await
        .expect("its own");
}

#[tokio::test]
async fn full_snapshots_need_a_grant_on_every_collection() {
    let (gw, up) = start(|_| {}).await;
    let (limited, _) = gw
        .issue(
            KeySpec::new("limited")
                .scope("snapshots:manage")
                .resource("docs"),
        )
        .await;
    for method in [
        "/qdrant.Snapshots/CreateFull",
        "/qdrant.Snapshots/DeleteFull",
    ] {
        let res = raw(
            &gw,
            method,
            &limited,
            frame(0, &string_field(1, "full.snapshot")),
        )
        .await;
        assert_eq!(res.headers["grpc-status"], "7", "{method}: {res:?}");
        let denied = requests(&gw).pop().expect("audited");
        assert_eq!(denied.denial, Some(DenialCode::ResourceForbidden));
    }
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    let (all, _) = gw
        .issue(KeySpec::new("all").scope("snapshots:manage").resource("*"))
        .await;
    raw(&gw, "/qdrant.Snapshots/CreateFull", &all, frame(0, &[])).await;
    assert_eq!(up.seen().len(), 1);
}

/// A request body fed by a channel, one data frame per item.
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(http_body::Frame::data(b))))
    }
}

#[tokio::test]
async fn a_later_message_is_checked_while_the_request_streams() {
    let (gw, up) = start(|_| {}).await;
    let key = writer(&gw, "docs").await;
    let mut sender = h2(&gw).await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let req = grpc_request(&gw, UPSERT, &key, Fed(rx));
    let pending = tokio::spawn(async move { sender.send_request(req).await });
    let first = prost::Message::encode_to_vec(&upsert_msg("docs", &[1]));
    tx.send(Bytes::from(frame(0, &first))).await.expect("send");
    // The first message reaches the upstream before the second is written.
    keygate_testkit::net::poll_until(
        std::time::Duration::from_secs(10),
        "the upstream got the first message",
        || {
            let got = up.upserted.lock().expect("lock").len();
            async move { (got == 1).then_some(()) }
        },
    )
    .await;
    let second = prost::Message::encode_to_vec(&upsert_msg("private", &[2]));
    tx.send(Bytes::from(frame(0, &second))).await.expect("send");
    let res = tokio::time::timeout(std::time::Duration::from_secs(10), pending)
        .await
        .expect("answered in time")
        .expect("task")
        .expect("response");
    assert_eq!(res.headers()["grpc-status"], "7", "{res:?}");
    assert!(res.headers()["grpc-message"]
        .to_str()
        .is_ok_and(|m| m.starts_with("resource_forbidden")));
    assert_eq!(*up.upserted.lock().expect("lock"), vec!["docs".to_owned()]);
}

#[tokio::test]
async fn keys_scopes_and_collections_are_checked() {
    let (gw, up) = start(|_| {}).await;
    // No key: 16 UNAUTHENTICATED; a bad key too.
    assert_code(
        search(&gw, "docs", None).await,
        Code::Unauthenticated,
        "missing_key",
    );
    assert_code(
        search(&gw, "docs", Some("kg_nope")).await,
        Code::Unauthenticated,
        "",
    );
    // A key for another collection: 7 PERMISSION_DENIED.
    let other = reader(&gw, "other").await;
    assert_code(
        search(&gw, "docs", Some(&other)).await,
        Code::PermissionDenied,
        "resource_forbidden",
    );
    // A read-only key writing: 7.
    let docs = reader(&gw, "docs").await;
    let r = call::<_, PointsOperationResponse>(&gw, UPSERT, upsert_msg("docs", &[1]), Some(&docs))
        .await;
    assert_code(r, Code::PermissionDenied, "insufficient_scope");
    // A method the preset does not list: 12 UNIMPLEMENTED.
    let r = call::<_, SearchResponse>(
        &gw,
        "/qdrant.PointsInternal/Search",
        SearchPoints::default(),
        Some(&docs),
    )
    .await;
    assert_code(r, Code::Unimplemented, "unknown_route");
    // A message naming no collection: 3 INVALID_ARGUMENT.
    assert_code(
        search(&gw, "", Some(&docs)).await,
        Code::InvalidArgument,
        "bad_message",
    );
    assert!(up.seen().is_empty(), "{:?}", up.seen());
    // The allowed one passes.
    search(&gw, "docs", Some(&docs)).await.expect("allowed");
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test]
async fn malformed_compressed_and_oversized_first_messages_are_refused() {
    let (gw, up) = start(|_| {}).await;
    let key = reader(&gw, "docs").await;
    let msg = prost::Message::encode_to_vec(&SearchPoints {
        collection_name: "docs".into(),
        vector: vec![],
        limit: 1,
    });
    let status = |p: &http::response::Parts| {
        p.headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Compressed.
        (frame(1, &msg), "3"),
        // Not a SearchPoints: field 1 with a varint.
        (frame(0, &[0x08, 0x01]), "3"),
        // Cut inside the message.
        (frame(0, &msg)[..8].to_vec(), "3"),
        // No message at all.
        (Vec::new(), "3"),
        // Over max_message_bytes (1024).
        (frame(0, &vec![0u8; 2000]), "8"),
    ];
    for (body, want) in cases {
        let parts = raw(&gw, SEARCH, &key, body).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["content-type"], "application/grpc");
        assert_eq!(status(&parts).as_deref(), Some(want), "{parts:?}");
    }
    assert!(up.seen().is_empty(), "the upstream saw {:?}", up.seen());
    // The same bytes uncompressed pass.
    let parts = raw(&gw, SEARCH, &key, frame(0, &msg)).await;
    assert_eq!(parts.status, 200);
    assert_eq!(up.seen().len(), 1);
}

/// A request body that never sends anything.
struct Silent;

impl http_body::Body for Silent {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Pending
    }
}

#[tokio::test]
async fn a_first_message_that_never_comes_is_refused_in_time() {
    let (gw, up) = start(|c| c.upstream.timeout = "300ms".into()).await;
    let key = reader(&gw, "docs").await;
    let mut sender = h2(&gw).await;
    let req = grpc_request(&gw, SEARCH, &key, Silent);
    let res = tokio::time::timeout(std::time::Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("answered in time")
        .expect("response");
    assert_eq!(res.headers()["grpc-status"], "4");
    assert!(res.headers()["grpc-message"]
        .to_str()
        .is_ok_and(|m| m.starts_with("message_timeout")));
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn tenant_keys_may_not_call_point_methods() {
    let (gw, up) = start(|_| {}).await;
    let (key, _) = gw.tenant_key("acme", "docs").await;
    let s = assert_code(
        search(&gw, "docs", Some(&key)).await,
        Code::PermissionDenied,
        "tenant_unscopable",
    );
    assert!(s.message().contains("only over REST"), "{}", s.message());
    let r =
        call::<_, PointsOperationResponse>(&gw, UPSERT, upsert_msg("docs", &[1]), Some(&key)).await;
    assert_code(r, Code::PermissionDenied, "tenant_unscopable");
    assert!(up.seen().is_empty());
    // Listing collections reads no points: it passes.
    let list = call::<_, ListCollectionsResponse>(&gw, LIST, ListCollectionsRequest {}, Some(&key))
        .await
        .expect("list");
    assert_eq!(list.into_inner().collections.len(), 1);
}

#[tokio::test]
async fn rate_limits_answer_resource_exhausted() {
    let (gw, _up) = start(|_| {}).await;
    let key = gw
        .issue(
            KeySpec::new("limited")
                .scope("points:read")
                .resource("docs")
                .rate_limit(RateLimitPolicy::new(
                    "tight",
                    2,
                    std::time::Duration::from_secs(60),
                )),
        )
        .await
        .0;
    search(&gw, "docs", Some(&key)).await.expect("first");
    search(&gw, "docs", Some(&key)).await.expect("second");
    let s = assert_code(
        search(&gw, "docs", Some(&key)).await,
        Code::ResourceExhausted,
        "rate_limited",
    );
    assert!(s.metadata().get("retry-after").is_some(), "{s:?}");
}

#[tokio::test]
async fn every_grpc_call_is_audited_with_its_method_and_status() {
    let (gw, _up) = start(|_| {}).await;
    let key = reader(&gw, "docs").await;
    search(&gw, "docs", Some(&key)).await.expect("allowed");
    let other = reader(&gw, "other").await;
    let _ = search(&gw, "docs", Some(&other)).await;
    let _ = call::<_, ListCollectionsResponse>(
        &gw,
        GET,
        GetCollectionInfoRequest {
            collection_name: "docs".into(),
        },
        Some(&key),
    )
    .await;
    let events = requests(&gw);
    assert_eq!(events.len(), 3, "{events:?}");
    let ok = &events[0];
    assert_eq!(ok.protocol, Transport::Grpc);
    assert_eq!(ok.path.as_ref(), SEARCH);
    assert_eq!(ok.rpc.as_deref(), Some("qdrant.Points/Search"));
    assert_eq!(ok.decision, Decision::Allowed);
    assert_eq!(ok.status, Some(200));
    assert!(ok.key_id.is_some());
    let denied = &events[1];
    assert_eq!(denied.decision, Decision::Denied);
    assert_eq!(denied.denial, Some(DenialCode::ResourceForbidden));
    assert_eq!(denied.grpc_status, Some(7));
    // The upstream's trailers-only status is recorded too.
    assert_eq!(events[2].grpc_status, Some(5));
}

#[tokio::test]
async fn grpc_is_refused_when_not_enabled_and_rest_clients_cannot_call_grpc_paths() {
    let (addr, up) = upstream().await;
    let gw = Gw::start(Preset::Qdrant, &format!("http://{addr}"), None, |_| {}).await;
    let key = gw.operator_key().await;
    assert_code(
        search(&gw, "docs", Some(&key)).await,
        Code::Unimplemented,
        "unknown_route",
    );
    // With gRPC on, a gRPC path without a gRPC content type is refused, not forwarded.
    let (gw, up2) = start(|_| {}).await;
    let key = gw.operator_key().await;
    let r = gw.call("POST", SEARCH, Some(&key), None).await;
    assert_eq!(r.status, 415, "{}", r.text);
    assert_eq!(r.code(), "not_grpc");
    assert!(up.seen().is_empty());
    assert!(up2.seen().is_empty());
}

#[tokio::test]
async fn an_unreachable_grpc_upstream_is_unavailable() {
    let gw = Gw::start(Preset::Qdrant, "http://127.0.0.1:9", None, |c| {
        c.grpc = Some(keygate_gateway::config::GrpcConfig {
            url: "http://127.0.0.1:9".into(),
            max_message_bytes: 1024,
        });
    })
    .await;
    let key = gw.operator_key().await;
    assert_code(
        search(&gw, "docs", Some(&key)).await,
        Code::Unavailable,
        "upstream_unavailable",
    );
}

/// A child process killed when dropped.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// The official `qdrant-client` with `prefer_grpc=True` through the gateway
/// (`tests/qdrant/grpc_client.py`) to a gRPC stand-in for Qdrant built from the servicers
/// qdrant-client bundles (`tests/qdrant/grpc_upstream.py`). Needs
/// `KEYGATE_TEST_GATEWAY_VENV` (`scripts/gateway-venv.sh`); prints that it skipped when
/// unset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_over_grpc() {
    use tokio::io::AsyncBufReadExt;
    let Ok(venv) = std::env::var("KEYGATE_TEST_GATEWAY_VENV") else {
        eprintln!("skipped: KEYGATE_TEST_GATEWAY_VENV is not set (scripts/gateway-venv.sh)");
        return;
    };
    let venv = std::path::PathBuf::from(venv);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("calls.jsonl");
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/qdrant/grpc_upstream.py");
    let mut child = tokio::process::Command::new(venv.join("bin").join("python"))
        .arg(script)
        .arg(&log)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the upstream");
    let stdout = child.stdout.take().expect("its stdout");
    let _child = Child(child);
    let mut first = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        tokio::io::BufReader::new(stdout).read_line(&mut first),
    )
    .await
    .expect("the upstream printed its port in time")
    .expect("read its port");
    let port: u16 = first.trim().parse().expect("a port");
    let credential = UpstreamCredential::new("api-key", None, "up-secret").expect("credential");
    let gw = Gw::start(
        Preset::Qdrant,
        "http://127.0.0.1:9",
        Some(credential),
        |c| {
            c.grpc = Some(keygate_gateway::config::GrpcConfig {
                url: format!("http://127.0.0.1:{port}"),
                max_message_bytes: 1 << 20,
            });
        },
    )
    .await;
    let writer = gw
        .issue(
            KeySpec::new("writer")
                .scope("collections:read")
                .scope("points:read")
                .scope("points:write")
                .resource("docs"),
        )
        .await
        .0;
    let other = reader(&gw, "other").await;
    let reader = reader(&gw, "docs").await;
    let (tenant, _) = gw.tenant_key("acme", "docs").await;
    let gport = gw.addr.port();
    let out = support::python(
        &venv,
        "tests/qdrant/grpc_client.py",
        gport,
        "allowed",
        &[&writer],
    )
    .await;
    assert_eq!(out["collections"], serde_json::json!(["docs"]), "{out}");
    assert_eq!(out["upsert"], "completed", "{out}");
    assert_eq!(out["query"], serde_json::json!([1, 2]), "{out}");
    assert_eq!(out["count"], 2, "{out}");
    let calls = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let seen = calls();
    let methods: Vec<&str> = seen.iter().filter_map(|c| c["method"].as_str()).collect();
    assert_eq!(methods, ["List", "Upsert", "Query", "Count"], "{seen:?}");
    for c in &seen {
        assert_eq!(c["api_key"], "up-secret", "{c}");
        assert!(c["authorization"].is_null(), "{c}");
    }
    let out = support::python(
        &venv,
        "tests/qdrant/grpc_client.py",
        gport,
        "refused",
        &[&reader, "-", &other, &tenant],
    )
    .await;
    let code = |v: &serde_json::Value| v["code"].as_str().unwrap_or("").to_owned();
    assert!(out["count"][0].is_null(), "the reader counts: {out}");
    assert_eq!(code(&out["count"][1]), "UNAUTHENTICATED", "{out}");
    assert_eq!(code(&out["count"][2]), "PERMISSION_DENIED", "{out}");
    assert_eq!(code(&out["count"][3]), "PERMISSION_DENIED", "{out}");
    assert!(
        out["count"][3]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tenant_unscopable")),
        "{out}"
    );
    assert_eq!(code(&out["upsert"]), "PERMISSION_DENIED", "{out}");
    // Only the reader's count reached the upstream.
    assert_eq!(calls().len(), seen.len() + 1);
}
