//! Forwarded headers behind a trusted proxy: a client cannot choose its address with a
//! `Forwarded` header of its own, because `Forwarded` and `X-Forwarded-For` must agree when
//! both are present.
#![cfg(feature = "ip-allow")]

mod authz_support;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use authz_support::*;
use http::StatusCode;
use keygate::client_ip::TrustedProxies;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::DenialCode;
use tower::ServiceBuilder;

/// src/client_ip.rs documents: forwarded headers are believed only from trusted proxies,
/// "so a client cannot claim an address by sending its own header".
///
/// The most common trusted proxy (nginx with `proxy_add_x_forwarded_for`, AWS ALB, most
/// CDNs) appends the real client to `X-Forwarded-For` and passes every other header through
/// untouched, including a `Forwarded` header the client wrote itself. `client_ip` reads
/// `Forwarded` whenever it is present, so such a client picks its own address.
#[tokio::test]
async fn a_client_behind_an_xff_proxy_cannot_claim_an_address_with_its_own_forwarded_header() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            IpAllowLayer::new(
                IpPolicy::new()
                    .allow(["203.0.113.0/24"])
                    .unwrap()
                    .per_key(false),
            )
            .trusted_proxies(TrustedProxies::new(["10.0.0.0/8"]).unwrap()),
        )
        .service(probe(calls.clone()));
    // What the proxy at 10.0.0.1 forwards for a client at 198.51.100.66 that sent
    // `Forwarded: for=203.0.113.7`: the proxy appended the real address to X-Forwarded-For.
    let req = from_peer(
        http::Request::get("/")
            .body(http_body_util::Full::default())
            .unwrap(),
        "10.0.0.1:443",
    );
    let req = with_header(req, "forwarded", b"for=203.0.113.7");
    let req = with_header(req, "x-forwarded-for", b"198.51.100.66");
    let (out, reached) = call(&svc, &calls, req).await;
    assert_eq!(
        out.seen_ip(),
        None,
        "the handler was told the client is {:?}",
        out.seen_ip()
    );
    assert!(!reached, "the spoofed address was believed");
    assert_denied(
        &out,
        StatusCode::FORBIDDEN,
        DenialCode::IpNotAllowed,
        "spoofed Forwarded",
    );
}
