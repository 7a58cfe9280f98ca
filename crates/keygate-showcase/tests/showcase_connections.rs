//! The showcase's connection limits over real sockets: a slow-header (slowloris) client and
//! an idle one are closed after the header read timeout, a trickled body after the idle
//! timeout, and past the connection cap a new connection waits until one closes.

mod showcase_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_testkit::net::until_closed;
use showcase_support::server::serve::{serve, ConnLimits};
use showcase_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Far more than any timeout below: a connection the server should close is closed well
/// within it; without the limits it would stay open forever.
const DEADLINE: Duration = Duration::from_secs(10);

/// The world's router served with `limits`; its address and open-connection counter.
async fn limited(w: &World, limits: ConnLimits) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let open = Arc::new(AtomicUsize::new(0));
    let router = w.app.router.clone();
    let counter = open.clone();
    tokio::spawn(async move {
        serve(
            listener,
            router,
            limits,
            std::future::pending(),
            Some(counter),
        )
        .await
        .expect("serve");
    });
    (addr, open)
}

#[tokio::test]
async fn slow_and_idle_clients_are_closed_after_the_header_read_timeout() {
    let w = World::new().await;
    let limits = ConnLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(3600),
        max_connections: 16,
    };
    let (addr, open) = limited(&w, limits).await;

    // Slowloris: a byte of the head every 50 ms, forever.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    let trickle = async {
        let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: ";
        for b in head.iter().chain(std::iter::repeat(&b'a')) {
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(DEADLINE, trickle)
        .await
        .expect("the slow client was cut off");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "not before the timeout: {took:?}"
    );

    // Idle: connected, nothing sent.
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    tokio::time::timeout(DEADLINE, until_closed(&mut idle))
        .await
        .expect("the idle connection was closed");

    // A kept-alive connection is served, then closed once it idles past the timeout.
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("request");
    let answer = tokio::time::timeout(DEADLINE, until_closed(&mut kept))
        .await
        .expect("closed after the answer");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    poll_until(DEADLINE, "every connection released", || {
        let n = open.load(Ordering::SeqCst);
        async move { n == 0 }
    })
    .await;
}

#[tokio::test]
async fn a_trickled_body_is_closed_after_the_idle_timeout() {
    let w = World::new().await;
    w.collection("docs").await;
    let limits = ConnLimits {
        header_read_timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_millis(300),
        max_connections: 16,
    };
    let (addr, _) = limited(&w, limits).await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT /collections/docs/points HTTP/1.1\r\nhost: x\r\napi-key: {}\r\ncontent-length: 1000\r\n\r\n{{",
        w.admin
    );
    s.write_all(head.as_bytes()).await.expect("head");
    // The rest of the body never comes.
    tokio::time::timeout(DEADLINE, until_closed(&mut s))
        .await
        .expect("the stalled upload was closed");
    // A body that keeps moving is not cut: 20 bytes 50 ms apart (1 s in all, past the
    // idle timeout of 300 ms) is answered.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = br#"{"points": [{"id": 1, "vector": [1, 0, 0, 0]}]}"#;
    let head = format!(
        "PUT /collections/docs/points HTTP/1.1\r\nhost: x\r\napi-key: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        w.admin,
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    for chunk in body.chunks(body.len().div_ceil(20)) {
        s.write_all(chunk).await.expect("body");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let answer = tokio::time::timeout(DEADLINE, until_closed(&mut s))
        .await
        .expect("answered");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn past_the_connection_cap_a_new_connection_waits() {
    let w = World::new().await;
    let limits = ConnLimits {
        header_read_timeout: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(3600),
        max_connections: 2,
    };
    let (addr, open) = limited(&w, limits).await;
    let request = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n";
    // Two kept-alive connections, each served once (so both are accepted and held).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("request");
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"));
        held.push(s);
    }
    assert_eq!(open.load(Ordering::SeqCst), 2);

    // The third connects (the kernel's backlog) but is not served while two are held.
    let mut third = TcpStream::connect(addr).await.expect("connect");
    third.write_all(request).await.expect("request");
    let mut buf = [0u8; 1024];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection was served past the cap"
    );
    assert_eq!(open.load(Ordering::SeqCst), 2);

    // One closes: the third is accepted and answered.
    drop(held.pop());
    let n = tokio::time::timeout(DEADLINE, third.read(&mut buf))
        .await
        .expect("the waiting connection is served once one closes")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200 OK"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
