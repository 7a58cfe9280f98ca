//! tonic behind TLS accepted outside tonic (a tokio-rustls acceptor feeding
//! `serve_with_incoming`, as a server that reloads its certificate does): such connections
//! carry only tonic's `TlsConnectInfo`, and keygate reads it (feature `tonic-tls`) for the
//! client address of per-key IP lists and for `RequireTls`. The same stack over plaintext
//! refuses the key with `insecure_transport`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::Fixture;
use keygate::check::CheckLayer;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::require_tls::RequireTls;
use keygate::{ApiKey, KeyGate};
use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Serves the stack (RequireTls with loopback not exempt, auth, per-key IP lists, the
/// health service) on `incoming`, in the background.
macro_rules! spawn_stack {
    ($gate:expr, $incoming:expr) => {{
        let gate: &KeyGate = $gate;
        let (reporter, health) = tonic_health::server::health_reporter();
        let router = tonic::transport::Server::builder()
            .layer(CheckLayer::new(RequireTls::new().including_loopback()).with_gate(gate))
            .layer(gate.auth_layer())
            .layer(IpAllowLayer::new(IpPolicy::new()).with_gate(gate))
            .add_service(health);
        let incoming = $incoming;
        tokio::spawn(async move {
            let _reporter = reporter;
            router
                .serve_with_incoming(incoming)
                .await
                .expect("tonic server");
        });
    }};
}

/// Serves over TLS accepted by tokio-rustls; returns the address and the certificate PEM.
async fn spawn_tls(gate: &KeyGate) -> (SocketAddr, String) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![made.cert.der().clone()], key)
    .map(|mut c| {
        c.alpn_protocols = vec![b"h2".to_vec()];
        c
    })
    .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let incoming = futures_util::stream::unfold((listener, acceptor), |(l, a)| async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            match a.accept(tcp).await {
                Ok(tls) => return Some((Ok::<_, std::io::Error>(tls), (l, a))),
                Err(_) => continue,
            }
        }
    });
    spawn_stack!(gate, incoming);
    (addr, made.cert.pem())
}

async fn tls_client(addr: SocketAddr, ca: &str) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .domain_name("localhost")
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .expect("client TLS")
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

async fn check(
    client: &mut HealthClient<tonic::transport::Channel>,
    key: &ApiKey,
) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.metadata_mut().insert(
        "x-api-key",
        key.expose_secret().parse().expect("metadata value"),
    );
    client.check(req).await.map(|_| ())
}

async fn keys(fx: &Fixture) -> (ApiKey, ApiKey) {
    let here = fx
        .issue_with("here", |r| {
            r.allowed_ips = vec!["127.0.0.0/8".parse().expect("CIDR")]
        })
        .await;
    let away = fx
        .issue_with("away", |r| {
            r.allowed_ips = vec!["192.0.2.0/24".parse().expect("CIDR")]
        })
        .await;
    (here, away)
}

#[tokio::test]
async fn over_tls_accepted_outside_tonic_the_peer_and_the_transport_are_known() {
    let fx = Fixture::new();
    let (here, away) = keys(&fx).await;
    let (addr, ca) = spawn_tls(&fx.gate).await;
    let mut client = tls_client(addr, &ca).await;
    check(&mut client, &here)
        .await
        .expect("TLS and a loopback-pinned key: served");
    let refused = check(&mut client, &away)
        .await
        .expect_err("pinned elsewhere");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().starts_with("ip_not_allowed"),
        "{refused:?}"
    );
}

#[tokio::test]
async fn over_plaintext_the_same_key_is_insecure_transport() {
    let fx = Fixture::new();
    let (here, _) = keys(&fx).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    spawn_stack!(
        &fx.gate,
        tonic::transport::server::TcpIncoming::from(listener)
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let refused = check(&mut HealthClient::new(channel), &here)
        .await
        .expect_err("plaintext");
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(
        refused.message().starts_with("insecure_transport"),
        "{refused:?}"
    );
}
