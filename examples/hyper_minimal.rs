//! keygate under plain hyper 1 (no axum, no tonic): `ApiKeyAuthLayer` alone in front of a
//! `service_fn`, served with hyper's HTTP/1 connection builder and hyper-util's
//! `TowerToHyperService`.
//!
//! ```text
//! cargo run --example hyper_minimal                      # listens on 127.0.0.1:3001
//! cargo run --example hyper_minimal -- --listen 127.0.0.1:8080
//! ```
//!
//! It creates a key at start (kept in memory) and prints it once. The handler reads the
//! [`Principal`] the layer put in the request's extensions; without a valid key the layer
//! answers 401 `application/problem+json` and the handler is never called. Ctrl-C or
//! SIGTERM stops accepting, lets open connections finish their requests, and exits.
//!
//! Tests (`tests/examples_hyper.rs`) include this file as a module and run [`serve`] on an
//! ephemeral port.

use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use keygate::{KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};
use tokio::net::TcpListener;
use tower::ServiceBuilder;

/// The handler: who is calling, as JSON.
async fn whoami<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(p) = keygate::RequestContext::of(req.extensions()).and_then(|c| c.principal()) else {
        // Only when served without the auth layer: fail closed.
        let mut res = Response::new(Full::new(Bytes::from_static(b"no caller\n")));
        *res.status_mut() = StatusCode::UNAUTHORIZED;
        return Ok(res);
    };
    let body = serde_json::json!({
        "key_id": p.key_id().to_string(),
        "name": p.name(),
        "subject": p.subject(),
    });
    let mut res = Response::new(Full::new(Bytes::from(body.to_string())));
    res.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

/// The most connections [`serve`] holds at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long a client has to send a request head (counted from when the connection waits
/// for it, so idle kept-alive connections are closed after it too).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts HTTP/1.1 connections on `listener` and serves every request through the auth
/// layer of `gate` and [`whoami`], until `shutdown` completes; then waits for open
/// connections to finish their requests. At most [`MAX_CONNECTIONS`] at once, each closed
/// when a request head takes longer than [`HEADER_READ_TIMEOUT`].
pub async fn serve(
    listener: TcpListener,
    gate: KeyGate,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    serve_with(
        listener,
        gate,
        shutdown,
        MAX_CONNECTIONS,
        HEADER_READ_TIMEOUT,
    )
    .await
}

/// [`serve`] with a connection cap and a header read timeout of your own.
pub async fn serve_with(
    listener: TcpListener,
    gate: KeyGate,
    shutdown: impl Future<Output = ()>,
    max_connections: usize,
    header_read_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let svc = ServiceBuilder::new()
        .layer(gate.auth_layer())
        .service_fn(whoami::<hyper::body::Incoming>);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A connection is accepted only with a permit: past the cap, the next one waits.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                // A failed accept (out of descriptors, a reset connection) ends only that
                // connection; back off a little so a persistent error does not spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let svc = TowerToHyperService::new(svc.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
    }
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let listen = parse_listen()?;
    let store = MemoryStore::new();
    let gate = KeyGate::new(Verifier::new(store.clone()));
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "hyper-minimal",
        gate.clock().now(),
    )?;
    record.owner = Some("you".into());
    store.insert(&record).await?;

    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!("keygate hyper_minimal listening on http://{addr}");
    println!("your API key (shown once): {}", key.expose_secret());
    println!(
        "try:  curl -H 'Authorization: Bearer {}' http://{addr}/",
        key.expose_secret()
    );
    println!("      curl -i http://{addr}/    # 401 missing_key");
    serve(listener, gate, stop_signal()).await?;
    Ok(())
}

/// Resolves when SIGINT (Ctrl-C) or, on Unix, SIGTERM arrives.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn parse_listen() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = ([127, 0, 0, 1], 3001).into();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args
                    .next()
                    .ok_or("--listen needs an address, e.g. 127.0.0.1:3001")?;
                listen = v.parse().map_err(|_| {
                    format!("--listen: {v:?} is not an address like 127.0.0.1:3001")
                })?;
            }
            "-h" | "--help" => {
                println!("usage: hyper_minimal [--listen ADDR]   (default 127.0.0.1:3001)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok(listen)
}
