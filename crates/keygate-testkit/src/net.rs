//! Polling with a deadline, a TCP proxy that can cut or stall connections to a real server
//! (PostgreSQL, Redis), and URL host rewriting to route a client through it.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Polls `check` (every millisecond) until it returns `Some`, failing the test after
/// `limit`. Returns the value and how long it took.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return (v, start.elapsed());
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What a [`Proxy`] does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forwards both ways.
    On,
    /// Drops every open connection and closes new ones as soon as they are accepted.
    Cut,
    /// Keeps every connection open but forwards nothing (a hung server or a black hole).
    Stall,
}

/// A TCP proxy on 127.0.0.1 in front of `target`, with a switch ([`Mode`]). Leaving
/// `Stall` closes the stalled connections.
pub struct Proxy {
    /// Where clients connect (127.0.0.1, an ephemeral port).
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding connections to `target` (in [`Mode::On`]).
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (mode, mode_rx) = watch::channel(Mode::On);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let mut mode_rx = mode_rx.clone();
                let now = *mode_rx.borrow_and_update();
                tokio::spawn(async move {
                    match now {
                        Mode::Cut => return,
                        Mode::Stall => {
                            // Hold the socket, say nothing, until the mode changes.
                            let _held = client;
                            let _ = mode_rx.changed().await;
                            return;
                        }
                        Mode::On => {}
                    }
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    let stalled = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        m = mode_rx.wait_for(|m| *m != Mode::On) => {
                            matches!(m.as_deref(), Ok(Mode::Stall))
                        }
                    };
                    if stalled {
                        // Keep both sockets open and silent until the mode changes again.
                        let _ = mode_rx.changed().await;
                    }
                    // Both sockets close here.
                });
            }
        });
        Proxy { addr, mode, task }
    }

    /// Sets what the proxy does from now on.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// `On` (`true`) or `Cut` (`false`).
    pub fn set_on(&self, on: bool) {
        self.set(if on { Mode::On } else { Mode::Cut });
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The host and port of a `scheme://[user[:password]@]host[:port]/...` URL, with
/// `default_port` when it names none (`localhost` read as 127.0.0.1).
pub fn url_addr(url: &str, default_port: u16) -> SocketAddr {
    let (_, authority, _) = split_authority(url);
    let hostport = authority.rsplit('@').next().unwrap_or_default();
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().expect("host:port of the URL")
}

/// `url` with its host and port replaced by `addr`.
pub fn with_addr(url: &str, addr: SocketAddr) -> String {
    let (scheme, authority, rest) = split_authority(url);
    let userinfo = authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}{rest}")
}

fn split_authority(url: &str) -> (&str, &str, &str) {
    let (scheme, after) = url.split_once("://").expect("scheme://");
    let end = after.find(['/', '?']).unwrap_or(after.len());
    (scheme, &after[..end], &after[end..])
}

/// Reads what the server sends until it closes the connection (EOF or reset).
pub async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}
