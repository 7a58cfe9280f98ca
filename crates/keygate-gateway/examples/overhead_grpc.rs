//! The gateway's gRPC overhead: the same unary `qdrant.Points/Search` call sent straight to
//! a gRPC upstream and through the gateway in front of it (`[grpc]`), in one run, on
//! loopback, HTTP/2 both sides. Prints calls per second and latency percentiles for each.
//!
//! ```text
//! cargo run --release -p keygate-gateway --example overhead_grpc -- [SECONDS] [CONNECTIONS]
//! ```
//!
//! The upstream answers every call at once with one small message and `grpc-status: 0` in
//! trailers, so the figures are the gateway's cost (the keygate stack, reading the first
//! message for its collection, the forwarding, one more loopback hop), not Qdrant's. Each
//! client connection sends one call at a time.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use keygate::core::audit::{Auditor, MemorySink};
use keygate::{KeySpec, MemoryStore, Verifier};
use keygate_gateway::config::{Config, GrpcConfig};
use keygate_gateway::preset::Preset;
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};

/// `SearchPoints` with the fields this call sets (Qdrant's field numbers).
#[derive(Clone, PartialEq, prost::Message)]
struct SearchPoints {
    #[prost(string, tag = "1")]
    collection_name: String,
    #[prost(float, repeated, tag = "2")]
    vector: Vec<f32>,
    #[prost(uint64, tag = "4")]
    limit: u64,
}

/// A gRPC frame: uncompressed, 4-byte big-endian length, the message.
fn frame(msg: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&u32::try_from(msg.len()).expect("small").to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

/// One hit: `ScoredPoint { id: PointId { num: 1 }, score: 0.9 }` in `SearchResponse.result`.
const ANSWER: &[u8] = &[
    0x0a, 0x09, 0x0a, 0x02, 0x08, 0x01, 0x1d, 0x66, 0x66, 0x66, 0x3f,
];

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                    Ok(Frame::data(frame(ANSWER))),
                    Ok(Frame::trailers(trailers)),
                ];
                let mut res = Response::new(StreamBody::new(tokio_stream::iter(frames)));
                res.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(res)
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Runs `connections` HTTP/2 clients, one call at a time each, for `seconds`; returns
/// every latency.
async fn load(
    addr: SocketAddr,
    key: Option<String>,
    body: Bytes,
    seconds: u64,
    connections: usize,
) -> (usize, Vec<Duration>) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let key = key.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let mut req = Request::post(format!("http://{addr}/qdrant.Points/Search"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers");
                if let Some(k) = &key {
                    req = req.header("api-key", k.as_str());
                }
                let req = req.body(Full::new(body.clone())).expect("request");
                let start = Instant::now();
                let res = sender.send_request(req).await.expect("response");
                let collected = res.into_body().collect().await.expect("body");
                let status = collected
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .map(HeaderValue::as_bytes);
                assert_eq!(status, Some(&b"0"[..]), "the call failed");
                latencies.push(start.elapsed());
            }
            latencies
        }));
    }
    support::gather(tasks).await
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let connections: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(16);
    let up = upstream().await;

    let mut config = Config::new(Preset::Qdrant, "http://127.0.0.1:9");
    config.anonymous_rate_limits.clear();
    config.grpc = Some(GrpcConfig {
        url: format!("http://{up}"),
        max_message_bytes: 4 << 20,
    });
    let verifier = Verifier::builder(MemoryStore::new()).build();
    let auditor = Auditor::spawn(MemorySink::new()).expect("auditor");
    let opts = keygate_gateway::Options::new(config, verifier, auditor);
    let gateway = keygate_gateway::build(opts).expect("gateway");
    let reader = gateway
        .keys
        .issue(
            "bench",
            KeySpec::new("reader").scope("points:read").resource("docs"),
        )
        .await
        .expect("key");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gw = listener.local_addr().expect("addr");
    tokio::spawn(keygate_gateway::serve::serve(
        listener,
        gateway.service.clone(),
        keygate_gateway::serve::ConnLimits::default(),
        None,
        std::future::pending(),
    ));
    let gateway = Arc::new(gateway);
    let msg = SearchPoints {
        collection_name: "docs".into(),
        vector: vec![0.1, 0.2, 0.3, 0.4],
        limit: 10,
    }
    .encode_to_vec();
    let body = frame(&msg);
    let key = Some(reader.key.expose_secret().to_owned());

    println!(
        "{connections} connections, {seconds} s each, unary qdrant.Points/Search ({} B message)",
        msg.len()
    );
    // A short warm-up of each path first.
    let _ = load(up, None, body.clone(), 1, connections).await;
    let _ = load(gw, key.clone(), body.clone(), 1, connections).await;
    let direct = support::report(
        "upstream directly",
        "calls",
        seconds,
        load(up, None, body.clone(), seconds, connections).await,
    );
    let through = support::report(
        "gateway (collection checked)",
        "calls",
        seconds,
        load(gw, key, body, seconds, connections).await,
    );
    println!(
        "gateway: {:.0} % of direct throughput, p99 +{:.1} µs",
        through.0 / direct.0 * 100.0,
        (through.1.as_secs_f64() - direct.1.as_secs_f64()) * 1e6
    );
    drop(gateway);
}
