//! An HTTP/1.1 client call and a counting inner service, for tests that drive a service over
//! loopback or in-process.

use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Sends `req` to `addr` over a new HTTP/1.1 connection (hyper's client) and returns the
/// answer with its body still to be read. The caller sets the `host` header.
pub async fn send<B>(addr: SocketAddr, req: Request<B>) -> Response<hyper::body::Incoming>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender.send_request(req).await.expect("response")
}

/// Collects a body into bytes.
pub async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.expect("body").to_bytes()
}

/// An inner service that adds one to `calls` per request and answers with `respond(&req)`.
pub fn counting<B, F>(calls: Arc<AtomicUsize>, respond: F) -> CountingService<F>
where
    F: Fn(&Request<B>) -> Response<Full<Bytes>>,
{
    CountingService { calls, respond }
}

/// The service [`counting`] makes.
#[derive(Clone)]
pub struct CountingService<F> {
    calls: Arc<AtomicUsize>,
    respond: F,
}

impl<B, F> tower::Service<Request<B>> for CountingService<F>
where
    F: Fn(&Request<B>) -> Response<Full<Bytes>>,
{
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok((self.respond)(&req)))
    }
}
