//! HTTPS over a real socket, with a rustls client that trusts only the test certificates:
//! a request with a key is answered over TLS; after the certificate files are replaced and
//! reloaded (what `SIGHUP` does in the binary), a new connection sees the new certificate
//! while a connection opened before keeps working; a reload that fails keeps the old
//! certificate; a self-signed certificate's printed fingerprint is the one clients see.

mod showcase_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use showcase_support::server::serve::{serve_tls, ConnLimits};
use showcase_support::server::tls::{fingerprint, Tls};
use showcase_support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

/// A self-signed certificate for `localhost`: its PEM, its key's PEM, and its DER.
fn certificate() -> (String, String, CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    (
        made.cert.pem(),
        made.key_pair.serialize_pem(),
        made.cert.der().clone(),
    )
}

/// A client trusting exactly `roots`.
fn connector(roots: &[&CertificateDer<'static>]) -> TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// An HTTPS connection to `addr` (as `localhost`): the request sender and the certificate
/// the server presented.
async fn connect(
    tls: &TlsConnector,
    addr: SocketAddr,
) -> (SendRequest<Full<Bytes>>, CertificateDer<'static>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tls.connect(name, tcp).await.expect("TLS handshake");
    let presented = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("a server certificate")
        .clone()
        .into_owned();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    (sender, presented)
}

/// `GET path` with `key` on an open connection: the status.
async fn get(sender: &mut SendRequest<Full<Bytes>>, path: &str, key: Option<&str>) -> StatusCode {
    sender.ready().await.expect("connection usable");
    let mut req = Request::get(path).header("host", "localhost");
    if let Some(k) = key {
        req = req.header("api-key", k);
    }
    let res = sender
        .send_request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    let status = res.status();
    res.into_body().collect().await.expect("body");
    status
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
}

/// The world's router over HTTPS with `tls`.
async fn https(w: &World, tls: &Tls) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = w.app.router.clone();
    let tls = tls.clone();
    tokio::spawn(async move {
        serve_tls(
            listener,
            router,
            ConnLimits::default(),
            std::future::pending(),
            None,
            tls,
        )
        .await
        .expect("serve");
    });
    addr
}

#[tokio::test]
async fn https_serves_keys_and_a_reload_reaches_new_connections_only() {
    let w = World::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (a_pem, a_key, a_der) = certificate();
    let (b_pem, b_key, b_der) = certificate();
    write(&cert_file, &a_pem);
    write(&key_file, &a_key);
    let tls = Tls::from_files(&cert_file, &key_file).expect("load");
    assert_eq!(tls.fingerprint(), fingerprint(&a_der));
    let addr = https(&w, &tls).await;
    let client = connector(&[&a_der, &b_der]);

    let (mut old, presented) = connect(&client, addr).await;
    assert_eq!(presented, a_der);
    assert_eq!(
        get(&mut old, "/collections", Some(&w.admin)).await,
        StatusCode::OK
    );
    assert_eq!(
        get(&mut old, "/collections", None).await,
        StatusCode::UNAUTHORIZED
    );

    // Replace the files, then reload (the binary's SIGHUP handler calls the same function).
    write(&cert_file, &b_pem);
    write(&key_file, &b_key);
    assert_eq!(tls.reload().expect("reload"), fingerprint(&b_der));

    let (mut new, presented) = connect(&client, addr).await;
    assert_eq!(
        presented, b_der,
        "a new connection sees the new certificate"
    );
    assert_eq!(
        get(&mut new, "/collections", Some(&w.admin)).await,
        StatusCode::OK
    );
    // The connection opened before the reload was not dropped.
    assert_eq!(
        get(&mut old, "/collections", Some(&w.admin)).await,
        StatusCode::OK
    );

    // A key that does not go with the certificate: the reload fails, nothing changes.
    write(&key_file, &a_key);
    let err = tls.reload().expect_err("mismatched key");
    assert!(err.contains("does not go with"), "{err}");
    assert!(
        !err.contains("PRIVATE KEY"),
        "no key material in errors: {err}"
    );
    let (mut again, presented) = connect(&client, addr).await;
    assert_eq!(presented, b_der);
    assert_eq!(
        get(&mut again, "/collections", Some(&w.admin)).await,
        StatusCode::OK
    );

    // A client that trusts only the old certificate now fails its handshake.
    let only_a = connector(&[&a_der]);
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let refused = only_a
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await;
    assert!(refused.is_err(), "the old certificate is no longer served");
}

#[tokio::test]
async fn a_self_signed_certificate_is_the_one_its_fingerprint_names() {
    let w = World::new().await;
    let (tls, pem) = Tls::self_signed(&["localhost".to_owned()]).expect("self-signed");
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    let addr = https(&w, &tls).await;
    let (mut conn, presented) = connect(&connector(&[&der]), addr).await;
    assert_eq!(fingerprint(&presented), tls.fingerprint());
    assert_eq!(tls.fingerprint().len(), 95, "{}", tls.fingerprint());
    assert_eq!(
        get(&mut conn, "/collections", Some(&w.admin)).await,
        StatusCode::OK
    );
    assert!(tls.reload().is_err(), "no files to reload");
}

#[tokio::test]
async fn unreadable_or_empty_files_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("dir");
    let missing = dir.path().join("missing.pem");
    let err = Tls::from_files(&missing, &missing).expect_err("missing");
    assert!(err.contains("missing.pem"), "{err}");
    let empty = dir.path().join("empty.pem");
    write(&empty, "");
    let err = Tls::from_files(&empty, &empty).expect_err("empty");
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn requests_served_over_tls_carry_the_tls_extension() {
    use axum::routing::get;
    use keygate::transport::is_tls;
    let probe = || {
        axum::Router::new().route(
            "/",
            get(|req: axum::extract::Request| async move {
                if is_tls(&req) {
                    "tls"
                } else {
                    "plain"
                }
            }),
        )
    };
    // Over TLS.
    let (tls, pem) = Tls::self_signed(&["localhost".to_owned()]).expect("self-signed");
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = probe();
    tokio::spawn(async move {
        serve_tls(
            listener,
            router,
            ConnLimits::default(),
            std::future::pending(),
            None,
            tls,
        )
        .await
        .expect("serve");
    });
    let (mut conn, _) = connect(&connector(&[&der]), addr).await;
    conn.ready().await.expect("ready");
    let res = conn
        .send_request(
            Request::get("/")
                .header("host", "localhost")
                .body(Full::new(Bytes::new()))
                .expect("request"),
        )
        .await
        .expect("response");
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"tls");

    // In the clear.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = probe();
    tokio::spawn(async move {
        showcase_support::server::serve::serve(
            listener,
            router,
            ConnLimits::default(),
            std::future::pending(),
            None,
        )
        .await
        .expect("serve");
    });
    let r = call(addr, "GET", "/", None, None).await;
    assert_eq!(r.text, "plain");
}

#[tokio::test]
async fn the_showcase_with_require_tls_refuses_and_disables_a_key_sent_in_the_clear() {
    use axum::extract::ConnectInfo;
    use keygate::core::audit::LifecycleAction;
    use keygate::transport::TlsConnection;
    use tower::ServiceExt;
    let w = World::with(|mut o| {
        o.require_tls = true;
        o.disable_exposed = true;
        o
    })
    .await;
    let (key, id) = w
        .issue(serde_json::json!({"name": "reader", "scopes": ["collections:read"], "collections": ["*"]}))
        .await;
    let remote = SocketAddr::from(([203, 0, 113, 7], 50000));
    let request = |tls: bool| {
        let mut req = Request::get("/collections")
            .header("api-key", &key)
            .body(axum::body::Body::empty())
            .expect("request");
        req.extensions_mut().insert(ConnectInfo(remote));
        if tls {
            req.extensions_mut().insert(TlsConnection);
        }
        req
    };
    // Over TLS from afar: served.
    let res = w
        .app
        .router
        .clone()
        .oneshot(request(true))
        .await
        .expect("ok");
    assert_eq!(res.status(), StatusCode::OK);
    // In the clear from afar: refused, recorded as exposed, disabled.
    let res = w
        .app
        .router
        .clone()
        .oneshot(request(false))
        .await
        .expect("ok");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("insecure_transport"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let exposed: Vec<_> = w
        .sink
        .events()
        .iter()
        .filter_map(|e| e.as_lifecycle().cloned())
        .filter(|l| l.key_id.as_str() == id)
        .map(|l| l.action)
        .collect();
    assert_eq!(
        exposed,
        [
            LifecycleAction::Issued,
            LifecycleAction::Exposed,
            LifecycleAction::Disabled
        ]
    );
    // Now disabled, even over TLS.
    let res = w
        .app
        .router
        .clone()
        .oneshot(request(true))
        .await
        .expect("ok");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    // The admin key over the real (loopback) socket is unaffected.
    let r = w.admin("GET", "/collections", None).await;
    assert_eq!(r.status, StatusCode::OK);
}
