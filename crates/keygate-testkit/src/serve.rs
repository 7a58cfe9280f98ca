//! Loopback servers for tests: axum or plain hyper on 127.0.0.1 (an ephemeral port), served
//! until the test's runtime ends.

use std::net::SocketAddr;

use http::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A tower service plain hyper can serve on a spawned task: what [`spawn_hyper`] and
/// [`spawn_hyper_peer`] take (implemented for every such service).
pub trait HyperService<B>:
    tower::Service<
        Request<hyper::body::Incoming>,
        Response = Response<B>,
        Error: Into<BoxError>,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HyperService<B> for S where
    S: tower::Service<
            Request<hyper::body::Incoming>,
            Response = Response<B>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A listener on 127.0.0.1 (an ephemeral port) and its address.
async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Serves `app` with axum on 127.0.0.1 (an ephemeral port) until the runtime ends.
pub async fn spawn_axum(app: axum::Router) -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("axum server");
    });
    addr
}

/// Serves `app` with axum on 127.0.0.1, recording the peer as `ConnectInfo<SocketAddr>`.
pub async fn spawn_axum_with_peer(app: axum::Router) -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .expect("axum server");
    });
    addr
}

/// Serves `svc` with plain hyper 1 on 127.0.0.1. With `record_peer`, each connection's
/// requests carry the peer as a plain [`SocketAddr`] extension (inserted by a
/// `tower::util::MapRequest` wrapped around the service per accepted connection); without
/// it, no address is recorded.
pub async fn spawn_hyper_peer<S, B>(svc: S, record_peer: bool) -> SocketAddr
where
    S: HyperService<B>,
    B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                return;
            };
            let per_connection = tower::util::MapRequest::new(
                svc.clone(),
                move |mut req: Request<hyper::body::Incoming>| {
                    if record_peer {
                        req.extensions_mut().insert(peer);
                    }
                    req
                },
            );
            let svc = hyper_util::service::TowerToHyperService::new(per_connection);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Serves the tower service `svc` with plain hyper 1 (HTTP/1.1, through
/// `hyper_util::service::TowerToHyperService`) on 127.0.0.1 until the runtime ends, without
/// recording the peer.
pub async fn spawn_hyper<S, B>(svc: S) -> SocketAddr
where
    S: HyperService<B>,
    B: http_body::Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    spawn_hyper_peer(svc, false).await
}

/// Serves `app` over TLS on 127.0.0.1 (an ephemeral port) with a certificate made now for
/// `localhost`, until the runtime ends; answers the address and the certificate (PEM), for
/// a client to trust. Failed handshakes are dropped.
pub async fn spawn_axum_tls(app: axum::Router) -> (SocketAddr, String) {
    use std::sync::Arc;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![made.cert.der().clone()], key)
    .expect("TLS certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, made.cert.pem())
}
