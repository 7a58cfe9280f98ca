//! The connection limits of `examples/hyper_minimal.rs` over real sockets: a slow-header
//! client is closed after the header read timeout, and past the connection cap a new
//! connection waits until one closes. (`examples/load_target.rs` serves through the
//! showcase's accept loop, tested in `showcase_connections.rs`.)

#[allow(dead_code, unreachable_pub)]
#[path = "../examples/hyper_minimal.rs"]
mod example;

use std::net::SocketAddr;
use std::time::Duration;

use keygate::{KeyGate, MemoryStore, Verifier};
use keygate_testkit::net::until_closed;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DEADLINE: Duration = Duration::from_secs(10);

async fn start(max: usize, header: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let gate = KeyGate::new(Verifier::new(MemoryStore::new()));
    tokio::spawn(async move {
        example::serve_with(listener, gate, std::future::pending(), max, header)
            .await
            .expect("serve");
    });
    addr
}

#[tokio::test]
async fn hyper_minimal_closes_slow_headers_and_caps_connections() {
    let addr = start(1, Duration::from_millis(300)).await;
    // Slowloris: a byte every 50 ms never completes a head.
    let mut slow = TcpStream::connect(addr).await.expect("connect");
    let trickle = async {
        for b in b"GET / HTTP/1.1\r\nx-padding: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
        {
            if slow.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(DEADLINE, trickle)
        .await
        .expect("the slow client was cut off");
    drop(slow);

    // One connection held (the cap is 1): a second is not served until it closes.
    let request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = TcpStream::connect(addr).await.expect("connect");
    first.write_all(request).await.expect("request");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(DEADLINE, first.read(&mut buf))
        .await
        .expect("answered")
        .expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    let mut second = TcpStream::connect(addr).await.expect("connect");
    second.write_all(request).await.expect("request");
    let early = tokio::time::timeout(Duration::from_millis(100), second.read(&mut buf)).await;
    assert!(early.is_err(), "served past the cap");
    // The first idles past the header read timeout and is closed; the second is served.
    tokio::time::timeout(DEADLINE, until_closed(&mut first))
        .await
        .expect("the idle first connection was closed");
    let answer = tokio::time::timeout(DEADLINE, second.read(&mut buf))
        .await
        .expect("the second is served once the first closed")
        .expect("read");
    assert!(buf[..answer].starts_with(b"HTTP/1.1 401"));
}
