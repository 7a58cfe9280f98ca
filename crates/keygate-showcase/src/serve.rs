//! Serving with bounded connections: an accept loop that holds at most
//! [`ConnLimits::max_connections`] connections (the next one waits in the listen backlog
//! until one closes), HTTP/1.1 through hyper with a header read timeout (the whole request
//! head, including the wait for the next request on a kept-alive connection, must arrive
//! within it), and an idle timeout (a connection on which no byte moves for that long is
//! closed: a trickled body, a stalled reader). `axum::serve` has none of these knobs.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use keygate::transport::TlsConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::tls::Tls;

/// Connection limits (the showcase's `--header-read-timeout`, `--idle-timeout` and
/// `--max-connections`).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// The most time a request head may take to arrive, counted from when the connection
    /// starts waiting for it.
    pub header_read_timeout: Duration,
    /// The most time a connection may go without a byte read or written.
    pub idle_timeout: Duration,
    /// The most connections held at once.
    pub max_connections: usize,
}

impl Default for ConnLimits {
    /// 10 s to send a request head, 60 s without traffic, 1,024 connections.
    fn default() -> Self {
        ConnLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves; then stops
/// accepting, lets every connection finish its request in flight, and returns once all are
/// closed. Requests carry the peer address as [`ConnectInfo`]`<`[`SocketAddr`](std::net::SocketAddr)`>`. `open` (if given)
/// counts the connections held.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    open: Option<Arc<std::sync::atomic::AtomicUsize>>,
) -> io::Result<()> {
    accept_loop(listener, router, limits, shutdown, open, None).await
}

/// [`serve`] over TLS: each connection's handshake (which must finish within the header
/// read timeout) goes through `tls`'s acceptor of the moment, and its requests carry
/// [`TlsConnection`] as well as the peer address. The
/// acceptor's certificate may be replaced while serving
/// ([`Tls::reload`](crate::tls::Tls::reload)): new handshakes use the new one, open
/// connections keep theirs.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    open: Option<Arc<std::sync::atomic::AtomicUsize>>,
    tls: Tls,
) -> io::Result<()> {
    accept_loop(listener, router, limits, shutdown, open, Some(tls)).await
}

async fn accept_loop(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
    open: Option<Arc<std::sync::atomic::AtomicUsize>>,
    tls: Option<Tls>,
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
                // Out of descriptors and the like: wait a little rather than spin.
                Err(_) => {
                    drop(permit);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop_rx.clone();
        let open = open.clone();
        // The acceptor in use now: a reload reaches the connections accepted after it.
        let tls = tls.as_ref().map(Tls::acceptor);
        tokio::spawn(async move {
            let _permit = permit;
            let _counted = open.as_ref().map(|n| Counted::new(n.clone()));
            let io = IdleIo::new(stream, limits.idle_timeout);
            match tls {
                None => {
                    let svc = router.map_request(
                        move |mut req: hyper::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(ConnectInfo(peer));
                            req
                        },
                    );
                    connection(io, svc, limits, stop).await;
                }
                Some(acceptor) => {
                    // A client that never finishes its handshake is cut like one that never
                    // finishes its request head.
                    let handshake =
                        tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io));
                    let stream = tokio::select! {
                        r = handshake => match r {
                            Ok(Ok(s)) => s,
                            _ => return,
                        },
                        _ = stop_wait(stop.clone()) => return,
                    };
                    let svc = router.map_request(
                        move |mut req: hyper::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(ConnectInfo(peer));
                            req.extensions_mut().insert(TlsConnection);
                            req
                        },
                    );
                    connection(stream, svc, limits, stop).await;
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

/// Resolves once the server stops.
async fn stop_wait(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves HTTP/1.1 on one connection until it closes, or until the server stops (then the
/// request in flight finishes first).
async fn connection<I, S>(io: I, svc: S, limits: ConnLimits, stop: watch::Receiver<bool>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop_wait(stop) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Counts a connection in the shared counter while it lives.
struct Counted(Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    fn new(n: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(n)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A stream that fails with `TimedOut` once no byte was read or written for `timeout`.
/// Activity only stores the time; the timer is re-armed when it fires early.
struct IdleIo<T> {
    inner: T,
    timeout: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    fn new(inner: T, timeout: Duration) -> Self {
        let now = Instant::now();
        IdleIo {
            inner,
            timeout,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + timeout)),
        }
    }

    /// `Err(TimedOut)` once idle for the timeout (registering the waker otherwise).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Ok(());
            }
            let due = self.last + self.timeout;
            if Instant::now() >= due {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was idle too long",
                ));
            }
            self.timer.as_mut().reset(due);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.last = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match this.poll_idle(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
