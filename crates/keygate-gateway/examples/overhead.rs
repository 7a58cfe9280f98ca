//! The gateway's overhead: the same requests sent straight to an upstream and through the
//! gateway in front of it, in one run, on loopback. Prints requests per second and
//! latency percentiles for each.
//!
//! ```text
//! cargo run --release -p keygate-gateway --example overhead -- [SECONDS] [CONNECTIONS]
//! ```
//!
//! The upstream answers every request at once with a small fixed JSON body, so the figures
//! are the gateway's cost (the keygate stack, the forwarding, one more loopback hop), not
//! a vector database's. Three runs: straight to the upstream; through the gateway with a
//! key without a tenant (streamed, no rewriting); with a tenant key (the search body read,
//! scoped and forwarded rewritten). Then a `query` naming `lookup_from`, with a key on every
//! collection (streamed) and with a key limited to `docs` (the body read and its
//! collections checked, [`keygate_gateway::reach`]).

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keygate::core::audit::{Auditor, MemorySink};
use keygate::{KeySpec, MemoryStore, Verifier};
use keygate_gateway::config::Config;
use keygate_gateway::preset::Preset;
use tokio::net::{TcpListener, TcpStream};

const BODY: &[u8] = br#"{"vector":[0.1,0.2,0.3,0.4],"limit":10,"with_payload":true}"#;
const SEARCH: &str = "/collections/docs/points/search";
const QUERY_BODY: &[u8] = br#"{"query":[0.1,0.2,0.3,0.4],"limit":10,"with_payload":true,"lookup_from":{"collection":"docs"}}"#;
const QUERY: &str = "/collections/docs/points/query";
const ANSWER: &[u8] = br#"{"result":[{"id":1,"version":0,"score":0.9,"payload":{"n":1}}],"status":"ok","time":0.0001}"#;

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                let _ = req.into_body().collect().await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(ANSWER))))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Runs `connections` keep-alive clients for `seconds`; returns every latency.
async fn load(
    addr: SocketAddr,
    key: Option<String>,
    (path, body): (&'static str, &'static [u8]),
    seconds: u64,
    connections: usize,
) -> (usize, Vec<Duration>) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.expect("connect");
            let _ = stream.set_nodelay(true);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let mut req = Request::post(path)
                    .header("host", "gateway")
                    .header("content-type", "application/json");
                if let Some(k) = &key {
                    req = req.header("api-key", k.as_str());
                }
                let req = req
                    .body(Full::new(Bytes::from_static(body)))
                    .expect("request");
                let start = Instant::now();
                let res = sender.send_request(req).await.expect("response");
                assert!(res.status().is_success(), "status {}", res.status());
                let _ = res.into_body().collect().await.expect("body");
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

    let mut config = Config::new(Preset::Qdrant, &format!("http://{up}"));
    config.anonymous_rate_limits.clear();
    let verifier = Verifier::builder(MemoryStore::new()).build();
    let sink = MemorySink::new();
    let auditor = Auditor::spawn(sink).expect("auditor");
    let opts = keygate_gateway::Options::new(config, verifier, auditor);
    let gateway = keygate_gateway::build(opts).expect("gateway");
    let operator = gateway
        .keys
        .issue("bench", KeySpec::new("operator").scope("*").resource("*"))
        .await
        .expect("key");
    let tenant = gateway
        .keys
        .issue(
            "bench",
            KeySpec::new("acme")
                .scope("points:read")
                .resource("docs")
                .attribute("tenant", "acme"),
        )
        .await
        .expect("key");
    let limited = gateway
        .keys
        .issue(
            "bench",
            KeySpec::new("limited")
                .scope("points:read")
                .resource("docs"),
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

    println!(
        "{connections} connections, {seconds} s each, POST .../points/search ({} B body)",
        BODY.len()
    );
    // A short warm-up of each path first.
    let _ = load(up, None, (SEARCH, BODY), 1, connections).await;
    let _ = load(
        gw,
        Some(operator.key.expose_secret().to_owned()),
        (SEARCH, BODY),
        1,
        connections,
    )
    .await;
    let direct = support::report(
        "upstream directly",
        "req",
        seconds,
        load(up, None, (SEARCH, BODY), seconds, connections).await,
    );
    let plain = support::report(
        "gateway, key without tenant",
        "req",
        seconds,
        load(
            gw,
            Some(operator.key.expose_secret().to_owned()),
            (SEARCH, BODY),
            seconds,
            connections,
        )
        .await,
    );
    let scoped = support::report(
        "gateway, tenant key",
        "req",
        seconds,
        load(
            gw,
            Some(tenant.key.expose_secret().to_owned()),
            (SEARCH, BODY),
            seconds,
            connections,
        )
        .await,
    );
    println!(
        "POST .../points/query with lookup_from ({} B body)",
        QUERY_BODY.len()
    );
    let query_all = support::report(
        "gateway, key on *",
        "req",
        seconds,
        load(
            gw,
            Some(operator.key.expose_secret().to_owned()),
            (QUERY, QUERY_BODY),
            seconds,
            connections,
        )
        .await,
    );
    let query_checked = support::report(
        "gateway, key on docs",
        "req",
        seconds,
        load(
            gw,
            Some(limited.key.expose_secret().to_owned()),
            (QUERY, QUERY_BODY),
            seconds,
            connections,
        )
        .await,
    );
    for (name, (rps, p99)) in [
        ("without tenant", plain),
        ("tenant key", scoped),
        ("query, key on *", query_all),
        ("query, body checked", query_checked),
    ] {
        println!(
            "{name}: {:.0} % of direct throughput, p99 +{:.1} µs",
            rps / direct.0 * 100.0,
            (p99.as_secs_f64() - direct.1.as_secs_f64()) * 1e6
        );
    }
    drop(gateway);
}
