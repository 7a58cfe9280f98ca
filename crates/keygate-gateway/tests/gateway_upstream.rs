//! Forwarding: credentials, streaming bodies, body caps and upstream failures, against
//! small upstreams on loopback ports.

mod support;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keygate::KeySpec;
use keygate_gateway::preset::Preset;
use keygate_gateway::proxy::UpstreamCredential;
use serde_json::{json, Value};
use support::{call_with, echo, Gw};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[tokio::test]
async fn client_credentials_are_stripped_and_the_upstreams_added() {
    let (up, _) = echo().await;
    let credential =
        UpstreamCredential::new("api-key", None, "upstream-secret").expect("credential");
    let gw = Gw::start(
        Preset::Qdrant,
        &format!("http://{up}"),
        Some(credential),
        |_| {},
    )
    .await;
    let key = gw.operator_key().await;
    let bearer = format!("Bearer {key}");
    let r = call_with(
        gw.addr,
        "POST",
        "/collections/docs/points/search?timeout=3",
        &[
            ("authorization", &bearer),
            ("x-chroma-token", "stray"),
            ("x-custom", "kept"),
        ],
        Some(&json!({"vector": [1.0]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let seen = &r.json["headers"];
    assert_eq!(seen["api-key"], "upstream-secret");
    assert!(seen.get("authorization").is_none(), "{seen}");
    assert!(seen.get("x-chroma-token").is_none(), "{seen}");
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(r.json["path"], "/collections/docs/points/search?timeout=3");
    assert_eq!(r.json["body"], "{\"vector\":[1.0]}");
    assert!(!r.text.contains(&key));
    // Hop-by-hop fields of the answer (and those its `Connection` names) stop here.
    assert!(r.headers.get("x-secret-hop").is_none());

    // The client's key in the upstream's own header is stripped just the same, and the
    // upstream's credential replaces it.
    let r = call_with(gw.addr, "GET", "/collections", &[("api-key", &key)], None).await;
    assert_eq!(
        r.json["headers"]["api-key"], "upstream-secret",
        "{}",
        r.text
    );
}

#[tokio::test]
async fn chroma_credential_as_a_bearer_token_and_the_tenant_in_where() {
    let (up, _) = echo().await;
    let credential = UpstreamCredential::new("authorization", Some("Bearer"), "chroma-secret")
        .expect("credential");
    let gw = Gw::start(
        Preset::Chroma,
        &format!("http://{up}/"),
        Some(credential),
        |_| {},
    )
    .await;
    let (key, _) = gw
        .issue(
            KeySpec::new("acme")
                .scope("records:read")
                .scope("records:write")
                // Every database: the gateway does not list the echo's collections to
                // check the collection id is the path's database's.
                .resource("*")
                .attribute("tenant", "acme"),
        )
        .await;
    let base = "/api/v2/tenants/default_tenant/databases/db/collections/4b1e";
    let r = call_with(
        gw.addr,
        "POST",
        &format!("{base}/query"),
        &[("x-chroma-token", &key)],
        Some(&json!({"query_embeddings": [[1.0]], "where": {"k": 1}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["headers"]["authorization"], "Bearer chroma-secret");
    let sent: Value = serde_json::from_str(r.json["body"].as_str().expect("body")).expect("json");
    assert_eq!(
        sent["where"],
        json!({"$and": [{"k": 1}, {"tenant": {"$eq": "acme"}}]})
    );
    // Another database is not a key's limited to `db`.
    let (key, _) = gw
        .issue(
            KeySpec::new("acme-db")
                .scope("records:read")
                .resource("db")
                .attribute("tenant", "acme"),
        )
        .await;
    let r = call_with(
        gw.addr,
        "POST",
        "/api/v2/tenants/default_tenant/databases/other/collections/4b1e/get",
        &[("x-chroma-token", &key)],
        Some(&json!({})),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.code(), "resource_forbidden");
}

#[tokio::test]
async fn bodies_over_the_caps_are_refused_before_the_upstream() {
    let (up, calls) = echo().await;
    let gw = Gw::start(Preset::Qdrant, &format!("http://{up}"), None, |c| {
        c.limits.max_body_bytes = 1024;
        c.limits.rewrite_body_bytes = 64;
    })
    .await;
    let key = gw.operator_key().await;
    let big = json!({"vector": vec![0.5; 400]});
    let r = support::call(
        gw.addr,
        "POST",
        "/collections/docs/points/search",
        Some(&key),
        Some(&big),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert_eq!(r.code(), "body_too_large");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // A tenant key's body is read to be rewritten: the smaller cap applies.
    let (tenant, _) = gw.tenant_key("acme", "docs").await;
    let medium = json!({"vector": vec![0.5; 30]});
    let r = support::call(
        gw.addr,
        "POST",
        "/collections/docs/points/search",
        Some(&tenant),
        Some(&medium),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    // A streamed body without a length is cut at the cap: 413.
    let stream = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    tx.send(Bytes::from(vec![b' '; 800])).await.expect("send");
    tx.send(Bytes::from(vec![b' '; 800])).await.expect("send");
    drop(tx);
    let req = Request::post("/collections/docs/points/search")
        .header("host", gw.addr.to_string())
        .header("api-key", &key)
        .body(ChannelBody(rx))
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    let problem: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["code"], "body_too_large");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the upstream was called, cut short"
    );
    calls.store(0, Ordering::SeqCst);
    // Under both caps it goes through.
    let r = support::call(
        gw.addr,
        "POST",
        "/collections/docs/points/search",
        Some(&key),
        Some(&medium),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn upstream_failures_are_problem_documents() {
    // Nothing listens: 503.
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let gw = Gw::start(
        Preset::Qdrant,
        &format!("http://{closed_addr}"),
        None,
        |_| {},
    )
    .await;
    let key = gw.operator_key().await;
    let r = support::call(gw.addr, "GET", "/collections", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.code(), "upstream_unavailable");
    assert_eq!(r.headers["content-type"], "application/problem+json");

    // Accepts and never answers: 504 after the configured timeout.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let held = Arc::new(Mutex::new(Vec::new()));
    let holder = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = silent.accept().await {
            holder.lock().expect("lock").push(s);
        }
    });
    let gw = Gw::start(
        Preset::Qdrant,
        &format!("http://{silent_addr}"),
        None,
        |c| {
            c.upstream.timeout = "300ms".into();
        },
    )
    .await;
    let key = gw.operator_key().await;
    let r = support::call(gw.addr, "GET", "/collections", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.text);
    assert_eq!(r.code(), "upstream_timeout");

    // Accepts, reads the request and hangs up: 502.
    let rude = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let rude_addr = rude.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = rude.accept().await {
            let mut buf = [0u8; 1024];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            drop(s);
        }
    });
    let gw = Gw::start(Preset::Qdrant, &format!("http://{rude_addr}"), None, |_| {}).await;
    let key = gw.operator_key().await;
    let r = support::call(gw.addr, "GET", "/collections", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(r.code(), "upstream_error");
}

/// A body fed from a channel: each message is one frame; the body ends when the sender is
/// dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    // The upstream answers at once with the first request frame it reads, then one more
    // frame for each further request frame: so the client sees an answer while its own
    // body is still open, and the answer's frames arrive one by one.
    let svc = tower::service_fn(|req: Request<Incoming>| async move {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let mut body = req.into_body();
        let first = loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        break data;
                    }
                }
                _ => break Bytes::new(),
            }
        };
        tx.send(first).await.expect("send");
        tokio::spawn(async move {
            while let Some(Ok(f)) = body.frame().await {
                if let Ok(data) = f.into_data() {
                    if tx.send(data).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok::<_, Infallible>(Response::new(ChannelBody(rx)))
    });
    let up = keygate_testkit::serve::spawn_hyper(svc).await;
    let gw = Gw::start(Preset::Qdrant, &format!("http://{up}"), None, |_| {}).await;
    let key = gw.operator_key().await;

    let stream = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let req = Request::post("/collections/docs/points/search")
        .header("host", gw.addr.to_string())
        .header("api-key", &key)
        .body(ChannelBody(rx))
        .expect("request");
    tx.send(Bytes::from_static(b"first")).await.expect("send");
    let res = sender
        .send_request(req)
        .await
        .expect("answer while the body is open");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let frame = body.frame().await.expect("a frame").expect("ok");
    assert_eq!(
        frame.into_data().expect("data"),
        Bytes::from_static(b"first")
    );
    tx.send(Bytes::from_static(b"second")).await.expect("send");
    let frame = body.frame().await.expect("a frame").expect("ok");
    assert_eq!(
        frame.into_data().expect("data"),
        Bytes::from_static(b"second")
    );
    drop(tx);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn https_clients_are_served() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let (up, _) = echo().await;
    let (tls, pem) =
        keygate_showcase::tls::Tls::self_signed(&["localhost".to_owned()]).expect("certificate");
    let credential =
        UpstreamCredential::new("api-key", None, "upstream-secret").expect("credential");
    let gw = Gw::start_tls(
        Preset::Qdrant,
        &format!("http://{up}"),
        Some(credential),
        |_| {},
        Some(tls),
    )
    .await;
    let key = gw.operator_key().await;

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem"))
        .expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let stream = connector
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/collections")
        .header("host", "localhost")
        .header("api-key", &key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.expect("body").to_bytes();
    let seen: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(seen["headers"]["api-key"], "upstream-secret");

    // Plain HTTP on the TLS port gets no answer: the handshake fails, the connection closes.
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/collections")
        .header("host", "localhost")
        .header("api-key", &key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert!(sender.send_request(req).await.is_err());
}

/// An upstream over TLS (a self-signed certificate for `localhost`) answering every request
/// with the path and the upstream credential it received; its address and certificate.
async fn tls_upstream() -> (std::net::SocketAddr, String) {
    let (tls, pem) =
        keygate_showcase::tls::Tls::self_signed(&["localhost".to_owned()]).expect("certificate");
    let svc = tower::service_fn(|req: Request<Incoming>| async move {
        let answer = json!({
            "path": req.uri().path(),
            "api_key": req.headers().get("api-key").and_then(|v| v.to_str().ok()),
        });
        let body = Full::new(Bytes::from(answer.to_string()))
            .map_err(|never| match never {})
            .boxed_unsync();
        Ok::<_, Infallible>(Response::new(body))
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(keygate_gateway::serve::serve(
        listener,
        tower::util::BoxCloneSyncService::new(svc),
        keygate_gateway::serve::ConnLimits::default(),
        Some(tls),
        std::future::pending(),
    ));
    (addr, pem)
}

#[tokio::test]
async fn an_https_upstream_is_reached_when_its_certificate_is_trusted() {
    let (up, pem) = tls_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, &pem).expect("write");
    let credential =
        UpstreamCredential::new("api-key", None, "upstream-secret").expect("credential");
    let upstream = format!("https://localhost:{}", up.port());
    let gw = Gw::start(Preset::Qdrant, &upstream, Some(credential.clone()), |c| {
        c.upstream.ca_file = Some(ca.to_str().unwrap().to_owned());
    })
    .await;
    let key = gw.operator_key().await;
    let r = gw.call("GET", "/collections", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json["path"], "/collections");
    assert_eq!(
        r.json["api_key"], "upstream-secret",
        "the credential travels over TLS"
    );

    // Trusting only another certificate: the handshake fails, so the upstream counts as
    // unreachable (503 upstream_unavailable); nothing is sent in the clear.
    let (_, other) =
        keygate_showcase::tls::Tls::self_signed(&["localhost".to_owned()]).expect("certificate");
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, &other).expect("write");
    let gw = Gw::start(Preset::Qdrant, &upstream, Some(credential), |c| {
        c.upstream.ca_file = Some(other_ca.to_str().unwrap().to_owned());
    })
    .await;
    let key = gw.operator_key().await;
    let r = gw.call("GET", "/collections", Some(&key), None).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text);
    assert_eq!(r.code(), "upstream_unavailable");
}

#[tokio::test]
async fn http2_is_negotiated_over_tls() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let (up, _) = echo().await;
    let (tls, pem) =
        keygate_showcase::tls::Tls::self_signed(&["localhost".to_owned()]).expect("certificate");
    let gw = Gw::start_tls(
        Preset::Qdrant,
        &format!("http://{up}"),
        None,
        |_| {},
        Some(tls.offer_http2()),
    )
    .await;
    let key = gw.operator_key().await;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem"))
        .expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get("https://localhost/collections")
        .header("api-key", &key)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.version(), http::Version::HTTP_2);
}
