//! Serving the gateway: HTTP/1.1 and HTTP/2 (prior knowledge; TLS offers HTTP/1.1) on one
//! listener, at most `max_connections` connections at once, a header read timeout, and a
//! graceful stop (no new connections; requests in flight finish).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use keygate::transport::TlsConnection;
use keygate_showcase::tls::Tls;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tower::ServiceExt;

use crate::GatewayService;

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// The most time a request head may take to arrive (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// The most connections held at once (the next waits in the listen backlog).
    pub max_connections: usize,
}

impl Default for ConnLimits {
    /// 10 s, 1,024 connections.
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
        }
    }
}

/// Serves `service` on `listener` until `shutdown` resolves, then lets every connection
/// finish its requests in flight and returns once all are closed. With `tls`, every
/// connection's handshake goes through its acceptor of the moment. Requests carry the peer
/// address as a [`SocketAddr`] extension (and [`TlsConnection`] over TLS).
pub async fn serve(
    listener: TcpListener,
    service: GatewayService,
    limits: ConnLimits,
    tls: Option<Tls>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    // Out of descriptors and the like: wait a little rather than spin.
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let mut stop = stop_rx.clone();
        let acceptor = tls.as_ref().map(Tls::acceptor);
        tokio::spawn(async move {
            let _permit = permit;
            let secure = acceptor.is_some();
            let svc = service.map_request(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert::<SocketAddr>(peer);
                if secure {
                    req.extensions_mut().insert(TlsConnection);
                }
                req
            });
            let svc = TowerToHyperService::new(svc);
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout);
            match acceptor {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream));
                    let stream = match handshake.await {
                        Ok(Ok(s)) => s,
                        _ => return,
                    };
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop.wait_for(|s| *s) => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it closes.
    let _all = permits.acquire_many(max as u32).await;
    Ok(())
}

/// Serves `metrics` at `GET /metrics` (OpenMetrics text) on `listener`, without a key: for
/// a scraper on a private network (`--metrics-listen`). Runs until the task is dropped.
pub async fn serve_metrics(listener: TcpListener, metrics: keygate::metrics::Metrics) {
    while let Ok((stream, _)) = listener.accept().await {
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = if req.method() == http::Method::GET && req.uri().path() == "/metrics"
                {
                    let mut res = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(metrics.render()),
                    ));
                    res.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(keygate::metrics::CONTENT_TYPE),
                    );
                    res
                } else {
                    let mut res =
                        http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    *res.status_mut() = http::StatusCode::NOT_FOUND;
                    res
                };
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
