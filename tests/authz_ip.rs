//! `IpAllowLayer` and client addresses in process (`ServiceBuilder` + `oneshot`, the peer
//! recorded as a plain `SocketAddr` extension as a hyper server would): global allow and
//! deny lists, keys' own allowlists, IPv6 and IPv4-mapped IPv6, unknown addresses, the
//! `ClientIp` extension, trusted proxies (through the hub and standalone) and bad forwarded
//! headers, and invalid configuration failing at build time.
#![cfg(feature = "ip-allow")]

mod authz_support;
mod common;

use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use authz_support::*;
use common::Fixture;
use http::StatusCode;
use ipnet::IpNet;
use keygate::client_ip::{parse_network, ClientIp, TrustedProxies};
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::{ApiKey, DenialCode};
use tower::ServiceBuilder;

use DenialCode::*;

const FORBIDDEN: StatusCode = StatusCode::FORBIDDEN;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().expect("CIDR")).collect()
}

async fn key_from(fx: &Fixture, name: &str, allowed: &[&str]) -> ApiKey {
    fx.issue_with(name, |r| r.allowed_ips = nets(allowed)).await
}

#[track_caller]
fn allowed_from(out: &Outcome, reached: bool, client: &str, what: &str) {
    assert_allowed(out, what);
    assert!(reached, "{what}: handler not called");
    assert_eq!(
        out.seen_ip(),
        Some(ip(client)),
        "{what}: ClientIp seen by the handler"
    );
}

#[track_caller]
fn ip_denied(out: &Outcome, reached: bool, what: &str) {
    assert_denied(out, FORBIDDEN, IpNotAllowed, what);
    assert!(!reached, "{what}: handler called on a denial");
    assert!(
        out.header("www-authenticate").is_none(),
        "{what}: no challenge on 403 ip"
    );
}

#[tokio::test]
async fn global_deny_and_allow_lists() {
    let calls = Arc::new(AtomicUsize::new(0));
    let deny_only = ServiceBuilder::new()
        .layer(IpAllowLayer::new(
            IpPolicy::new()
                .deny(["203.0.113.0/24", "192.0.2.66"])
                .expect("nets")
                .per_key(false),
        ))
        .service(probe(calls.clone()));
    for (peer, client, ok) in [
        ("203.0.113.9:4000", "203.0.113.9", false),
        ("203.0.113.255:1", "203.0.113.255", false),
        ("192.0.2.66:1", "192.0.2.66", false),
        ("192.0.2.67:1", "192.0.2.67", true),
        ("198.51.100.1:4000", "198.51.100.1", true),
        ("[2001:db8::1]:4000", "2001:db8::1", true),
    ] {
        let (out, reached) = call(
            &deny_only,
            &calls,
            from_peer(request("GET", "/", None), peer),
        )
        .await;
        if ok {
            allowed_from(&out, reached, client, peer);
        } else {
            ip_denied(&out, reached, peer);
            assert_eq!(
                out.json()["detail"],
                "Requests from this address are not allowed."
            );
        }
    }

    let allow_and_deny = ServiceBuilder::new()
        .layer(IpAllowLayer::new(
            IpPolicy::new()
                .allow(["198.51.100.0/24", "10.0.0.0/8"])
                .expect("nets")
                .deny(["198.51.100.13"])
                .expect("nets")
                .per_key(false),
        ))
        .service(probe(calls.clone()));
    for (peer, ok) in [
        ("198.51.100.1:1", true),
        ("10.200.3.4:1", true),
        ("198.51.100.13:1", false), // in both lists: deny wins
        ("198.51.101.1:1", false),
        ("203.0.113.1:1", false),
        ("[2001:db8::1]:1", false),
        ("127.0.0.1:1", false),
    ] {
        let (out, reached) = call(
            &allow_and_deny,
            &calls,
            from_peer(request("GET", "/", None), peer),
        )
        .await;
        if ok {
            assert_allowed(&out, peer);
            assert!(reached);
        } else {
            ip_denied(&out, reached, peer);
        }
    }
    // gRPC callers get PERMISSION_DENIED.
    let (out, reached) = call(
        &allow_and_deny,
        &calls,
        from_peer(grpc_request("/pkg.Svc/M", None), "203.0.113.1:1"),
    )
    .await;
    assert_grpc_denied(&out, 7, IpNotAllowed, "gRPC");
    assert!(!reached);
}

#[tokio::test]
async fn keys_own_allowlists() {
    let fx = Fixture::new();
    let pinned = key_from(&fx, "pinned", &["198.51.100.128/25", "2001:db8:1::/48"]).await;
    let roaming = key_from(&fx, "roaming", &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    // Per-key checks are on by default; the layer resolves the key through the hub.
    let svc = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let p = Some(pinned.expose_secret());
    for (peer, client, ok) in [
        ("198.51.100.200:1", "198.51.100.200", true),
        ("198.51.100.7:1", "198.51.100.7", false),
        ("[2001:db8:1:2::3]:1", "2001:db8:1:2::3", true),
        ("[2001:db8:2::3]:1", "2001:db8:2::3", false),
        ("[::ffff:198.51.100.129]:1", "198.51.100.129", true),
    ] {
        let (out, reached) = call(&svc, &calls, from_peer(request("GET", "/", p), peer)).await;
        if ok {
            allowed_from(&out, reached, client, peer);
            assert_eq!(out.header(SEEN_KEY), Some("pinned"));
        } else {
            ip_denied(&out, reached, peer);
            assert_eq!(
                out.json()["detail"],
                "This API key may not be used from this address."
            );
        }
    }
    // A key with an empty list may come from anywhere.
    for peer in ["198.51.100.7:1", "203.0.113.1:1", "[2001:db8:2::3]:1"] {
        let (out, reached) = call(
            &svc,
            &calls,
            from_peer(request("GET", "/", Some(roaming.expose_secret())), peer),
        )
        .await;
        assert_allowed(&out, peer);
        assert!(reached);
    }
    // Authentication failures come through unchanged (401, not 403).
    let (out, reached) = call(
        &svc,
        &calls,
        from_peer(request("GET", "/", Some("garbage")), "198.51.100.200:1"),
    )
    .await;
    assert_denied(&out, StatusCode::UNAUTHORIZED, MalformedKey, "bad key");
    assert!(!reached);

    // Global lists and the key's list must both pass.
    let both = ServiceBuilder::new()
        .layer(
            IpAllowLayer::new(IpPolicy::new().allow(["198.51.100.0/24"]).expect("nets"))
                .with_gate(&fx.gate),
        )
        .service(probe(calls.clone()));
    for (peer, ok) in [
        ("198.51.100.200:1", true),
        ("198.51.100.7:1", false),
        ("[2001:db8:1::1]:1", false),
    ] {
        let (out, reached) = call(&both, &calls, from_peer(request("GET", "/", p), peer)).await;
        if ok {
            assert_allowed(&out, peer);
        } else {
            ip_denied(&out, reached, peer);
        }
    }
}

#[tokio::test]
async fn ipv6_and_ipv4_mapped_addresses() {
    let calls = Arc::new(AtomicUsize::new(0));
    let layer = |policy: IpPolicy| {
        ServiceBuilder::new()
            .layer(IpAllowLayer::new(policy.per_key(false)))
            .service(probe(calls.clone()))
    };
    let v6 = layer(
        IpPolicy::new()
            .allow(["2001:db8::/32"])
            .unwrap()
            .deny(["2001:db8:bad::/48", "::1"])
            .unwrap(),
    );
    for (peer, client, ok) in [
        ("[2001:db8::1]:443", "2001:db8::1", true),
        ("[2001:db8:ffff::1]:443", "2001:db8:ffff::1", true),
        ("[2001:db8:bad::1]:443", "2001:db8:bad::1", false),
        ("[2001:db9::1]:443", "2001:db9::1", false),
        ("[::1]:443", "::1", false),
        ("203.0.113.7:443", "203.0.113.7", false),
    ] {
        let (out, reached) = call(&v6, &calls, from_peer(request("GET", "/", None), peer)).await;
        if ok {
            allowed_from(&out, reached, client, peer);
        } else {
            ip_denied(&out, reached, peer);
        }
    }

    // IPv4-mapped peers are IPv4: they match IPv4 lists, and the handler sees IPv4.
    let v4 = layer(IpPolicy::new().allow(["203.0.113.0/24"]).unwrap());
    let (out, reached) = call(
        &v4,
        &calls,
        from_peer(request("GET", "/", None), "[::ffff:203.0.113.7]:5"),
    )
    .await;
    allowed_from(&out, reached, "203.0.113.7", "mapped peer, IPv4 allow list");
    let (out, reached) = call(
        &v4,
        &calls,
        from_peer(request("GET", "/", None), "[::ffff:198.51.100.7]:5"),
    )
    .await;
    ip_denied(&out, reached, "mapped peer outside the list");
    let denied_v4 = layer(IpPolicy::new().deny(["203.0.113.0/24"]).unwrap());
    let (out, reached) = call(
        &denied_v4,
        &calls,
        from_peer(request("GET", "/", None), "[::ffff:203.0.113.7]:5"),
    )
    .await;
    ip_denied(
        &out,
        reached,
        "mapped peer, IPv4 deny list: no bypass through the mapped form",
    );

    // Lists written in the mapped form match IPv4 peers.
    let mapped_list = layer(IpPolicy::new().allow(["::ffff:203.0.113.0/120"]).unwrap());
    for (peer, ok) in [
        ("203.0.113.9:1", true),
        ("[::ffff:203.0.113.9]:1", true),
        ("198.51.100.1:1", false),
    ] {
        let (out, reached) = call(
            &mapped_list,
            &calls,
            from_peer(request("GET", "/", None), peer),
        )
        .await;
        if ok {
            allowed_from(&out, reached, "203.0.113.9", peer);
        } else {
            ip_denied(&out, reached, peer);
        }
    }
    let mapped_deny = layer(IpPolicy::new().deny(["::ffff:203.0.113.9"]).unwrap());
    let (out, reached) = call(
        &mapped_deny,
        &calls,
        from_peer(request("GET", "/", None), "203.0.113.9:1"),
    )
    .await;
    ip_denied(
        &out,
        reached,
        "mapped single address in the deny list, IPv4 peer",
    );
}

#[tokio::test]
async fn a_keys_mapped_allowlist_matches_ipv4_peers() {
    let fx = Fixture::new();
    let k = key_from(&fx, "mapped", &["::ffff:203.0.113.0/120"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(IpAllowLayer::new(IpPolicy::new()))
        .service(probe(calls.clone()));
    let s = Some(k.expose_secret());
    for (peer, client, ok) in [
        ("203.0.113.9:1", "203.0.113.9", true),
        ("[::ffff:203.0.113.10]:1", "203.0.113.10", true),
        ("203.0.114.9:1", "203.0.114.9", false),
        ("[2001:db8::1]:1", "2001:db8::1", false),
    ] {
        let (out, reached) = call(&svc, &calls, from_peer(request("GET", "/", s), peer)).await;
        if ok {
            allowed_from(&out, reached, client, peer);
        } else {
            ip_denied(&out, reached, peer);
        }
    }
}

#[tokio::test]
async fn no_address_while_a_policy_applies_is_denied() {
    let fx = Fixture::new();
    let pinned = key_from(&fx, "pinned", &["198.51.100.0/24"]).await;
    let roaming = key_from(&fx, "roaming", &[]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let unknown = "The client address is unknown.";
    // Global deny list only: an unknown address might be a denied one.
    let deny = ServiceBuilder::new()
        .layer(IpAllowLayer::new(
            IpPolicy::new()
                .deny(["203.0.113.0/24"])
                .unwrap()
                .per_key(false),
        ))
        .service(probe(calls.clone()));
    let (out, reached) = call(&deny, &calls, request("GET", "/", None)).await;
    ip_denied(&out, reached, "no peer, deny list");
    assert_eq!(out.json()["detail"], unknown);
    let allow = ServiceBuilder::new()
        .layer(IpAllowLayer::new(
            IpPolicy::new()
                .allow(["0.0.0.0/0", "::/0"])
                .unwrap()
                .per_key(false),
        ))
        .service(probe(calls.clone()));
    let (out, reached) = call(&allow, &calls, request("GET", "/", None)).await;
    ip_denied(&out, reached, "no peer, allow-everything list");
    // The key's own list.
    let per_key = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &per_key,
        &calls,
        request("GET", "/", Some(pinned.expose_secret())),
    )
    .await;
    ip_denied(&out, reached, "no peer, key with a list");
    assert_eq!(out.json()["detail"], unknown);
    // No policy applies: no address needed, and no ClientIp is made up.
    let (out, reached) = call(
        &per_key,
        &calls,
        request("GET", "/", Some(roaming.expose_secret())),
    )
    .await;
    assert_allowed(&out, "no peer, key without a list");
    assert!(reached);
    assert_eq!(out.seen_ip(), None);
    // An address the proxies' headers make unknown counts as no address.
    let proxied = ServiceBuilder::new()
        .layer(
            IpAllowLayer::new(
                IpPolicy::new()
                    .deny(["203.0.113.0/24"])
                    .unwrap()
                    .per_key(false),
            )
            .trusted_proxies(TrustedProxies::new(["10.0.0.0/8"]).unwrap()),
        )
        .service(probe(calls.clone()));
    let req = with_header(
        from_peer(request("GET", "/", None), "10.0.0.1:1"),
        "x-forwarded-for",
        b"unknown",
    );
    let (out, reached) = call(&proxied, &calls, req).await;
    ip_denied(&out, reached, "unknown behind a trusted proxy");
}

#[tokio::test]
async fn per_key_checks_without_a_principal_fail_closed() {
    let fx = Fixture::new();
    let k = key_from(&fx, "k", &["198.51.100.0/24"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let standalone = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new().per_key(true)))
        .service(probe(calls.clone()));
    for key in [None, Some(k.expose_secret())] {
        let (out, reached) = call(
            &standalone,
            &calls,
            from_peer(request("GET", "/", key), "198.51.100.1:1"),
        )
        .await;
        assert_denied(
            &out,
            StatusCode::UNAUTHORIZED,
            MissingKey,
            "standalone, per_key",
        );
        assert!(!reached);
        let (out, reached) = call(
            &standalone,
            &calls,
            from_peer(grpc_request("/p.S/M", key), "198.51.100.1:1"),
        )
        .await;
        assert_grpc_denied(&out, 16, MissingKey, "standalone, per_key, gRPC");
        assert!(!reached);
    }
    assert_eq!(
        fx.store.gets(),
        0,
        "a standalone layer never reads the store"
    );
    // Behind the auth layer, the same standalone layer works.
    let behind = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(IpAllowLayer::new(IpPolicy::new()))
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &behind,
        &calls,
        from_peer(
            request("GET", "/", Some(k.expose_secret())),
            "198.51.100.1:1",
        ),
    )
    .await;
    allowed_from(&out, reached, "198.51.100.1", "behind auth");
    let (out, reached) = call(
        &behind,
        &calls,
        from_peer(request("GET", "/", Some(k.expose_secret())), "192.0.2.1:1"),
    )
    .await;
    ip_denied(&out, reached, "behind auth, wrong address");
    // per_key(false) with no lists: a pure pass-through that still records ClientIp.
    let open = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new().per_key(false)))
        .service(probe(calls.clone()));
    let (out, reached) = call(
        &open,
        &calls,
        from_peer(request("GET", "/", None), "192.0.2.1:1"),
    )
    .await;
    allowed_from(&out, reached, "192.0.2.1", "no policy");
}

#[tokio::test]
async fn client_ip_extension_is_left_for_the_handler() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let svc = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new().per_key(false)))
        .service_fn(
            move |req: http::Request<http_body_util::Full<bytes::Bytes>>| {
                seen2.lock().unwrap().push(
                    keygate::RequestContext::of(req.extensions())
                        .and_then(|c| c.client_ip())
                        .map(ClientIp),
                );
                async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::<
                        bytes::Bytes,
                    >::default(
                    )))
                }
            },
        );
    use tower::ServiceExt;
    for peer in ["192.0.2.1:1", "[2001:db8::5]:1", "[::ffff:192.0.2.9]:1"] {
        let res = svc
            .clone()
            .oneshot(from_peer(request("GET", "/", None), peer))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let res = svc
        .clone()
        .oneshot(request("GET", "/", None))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            Some(ClientIp(ip("192.0.2.1"))),
            Some(ClientIp(ip("2001:db8::5"))),
            Some(ClientIp(ip("192.0.2.9"))),
            None
        ]
    );
}

#[tokio::test]
async fn trusted_proxies_through_the_hub() {
    let fx = Fixture::with(
        |v| v,
        |g| g.trusted_proxies(TrustedProxies::new(["10.0.0.0/8", "fd00::/8"]).expect("proxies")),
    );
    let k = key_from(&fx, "office", &["203.0.113.0/24"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let s = Some(k.expose_secret());
    let cases: [(&str, &str, &[u8], Option<&str>); 7] = [
        (
            "10.0.0.1:443",
            "x-forwarded-for",
            b"203.0.113.7",
            Some("203.0.113.7"),
        ),
        (
            "10.0.0.1:443",
            "x-forwarded-for",
            b"203.0.113.7, 10.3.3.3",
            Some("203.0.113.7"),
        ),
        (
            "[fd00::1]:443",
            "x-forwarded-for",
            b"203.0.113.8, fd00::2",
            Some("203.0.113.8"),
        ),
        (
            "10.0.0.1:443",
            "forwarded",
            b"for=203.0.113.9;proto=https",
            Some("203.0.113.9"),
        ),
        ("10.0.0.1:443", "x-forwarded-for", b"198.51.100.1", None),
        // The client put an allowed address on the left; the proxy appended the real one.
        (
            "10.0.0.1:443",
            "x-forwarded-for",
            b"203.0.113.7, 198.51.100.1",
            None,
        ),
        // An untrusted peer's header is ignored.
        ("198.51.100.1:443", "x-forwarded-for", b"203.0.113.7", None),
    ];
    for (peer, header, value, client) in cases {
        let req = with_header(from_peer(request("GET", "/", s), peer), header, value);
        let (out, reached) = call(&svc, &calls, req).await;
        let what = format!("{peer} {header}: {}", String::from_utf8_lossy(value));
        match client {
            Some(c) => allowed_from(&out, reached, c, &what),
            None => ip_denied(&out, reached, &what),
        }
    }
    // The standalone layer of a hub-less stack ignores the hub's proxies: it has its own.
    let own = ServiceBuilder::new()
        .layer(fx.gate.auth_layer())
        .layer(IpAllowLayer::new(IpPolicy::new()))
        .service(probe(calls.clone()));
    let req = with_header(
        from_peer(request("GET", "/", s), "10.0.0.1:1"),
        "x-forwarded-for",
        b"203.0.113.7",
    );
    let (out, reached) = call(&own, &calls, req).await;
    ip_denied(
        &out,
        reached,
        "standalone layer without proxies: the proxy is the client",
    );
}

#[tokio::test]
async fn trusted_proxies_standalone() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            IpAllowLayer::new(
                IpPolicy::new()
                    .allow(["203.0.113.0/24"])
                    .unwrap()
                    .per_key(false),
            )
            .trusted_proxies(TrustedProxies::new(["10.0.0.0/8", "::ffff:192.168.0.1"]).unwrap()),
        )
        .service(probe(calls.clone()));
    for (peer, value, client) in [
        ("10.0.0.1:1", "203.0.113.7", Some("203.0.113.7")),
        ("192.168.0.1:1", "203.0.113.7", Some("203.0.113.7")),
        ("[::ffff:10.0.0.1]:1", "203.0.113.7", Some("203.0.113.7")),
        ("192.168.0.2:1", "203.0.113.7", None),
        ("198.51.100.1:1", "203.0.113.7", None),
    ] {
        let req = with_header(
            from_peer(request("GET", "/", None), peer),
            "x-forwarded-for",
            value.as_bytes(),
        );
        let (out, reached) = call(&svc, &calls, req).await;
        match client {
            Some(c) => allowed_from(&out, reached, c, peer),
            None => ip_denied(&out, reached, peer),
        }
    }
}

/// Forwarded headers a client (or a broken proxy) may send, arriving through a trusted
/// proxy at 10.0.0.1, against a global allow list of 203.0.113.0/24 and 2001:db8::/32.
/// `Some(client)`: allowed, the handler sees `client`; `None`: 403 `ip_not_allowed`.
#[tokio::test]
async fn bad_forwarded_headers_behind_a_trusted_proxy() {
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = ServiceBuilder::new()
        .layer(
            IpAllowLayer::new(
                IpPolicy::new()
                    .allow(["203.0.113.0/24", "2001:db8::/32"])
                    .unwrap()
                    .per_key(false),
            )
            .trusted_proxies(TrustedProxies::new(["10.0.0.0/8"]).unwrap()),
        )
        .service(probe(calls.clone()));
    let thousand_trusted = vec!["10.0.0.2"; 1000].join(", ");
    let thousand_allowed = vec!["203.0.113.7"; 1000].join(", ");
    let thousand_garbage = vec!["garbage"; 1000].join(",");
    let mut allowed_then_32_trusted = String::from("203.0.113.7");
    let mut allowed_then_33_trusted = String::from("203.0.113.7");
    for i in 0..33 {
        if i < 32 {
            allowed_then_32_trusted.push_str(&format!(", 10.0.1.{i}"));
        }
        allowed_then_33_trusted.push_str(&format!(", 10.0.1.{i}"));
    }
    let spoof_left = format!("{thousand_trusted}, 198.51.100.1");
    let rows: Vec<(&str, &str, Vec<u8>, Option<&str>)> = vec![
        (
            "plain",
            "x-forwarded-for",
            b"203.0.113.7".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "port",
            "x-forwarded-for",
            b"203.0.113.7:8080".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "bracketed IPv6 with port",
            "x-forwarded-for",
            b"[2001:db8::1]:443".to_vec(),
            Some("2001:db8::1"),
        ),
        (
            "bracketed IPv6",
            "x-forwarded-for",
            b"[2001:db8::1]".to_vec(),
            Some("2001:db8::1"),
        ),
        (
            "bare IPv6",
            "x-forwarded-for",
            b"2001:db8::1".to_vec(),
            Some("2001:db8::1"),
        ),
        (
            "mapped IPv6",
            "x-forwarded-for",
            b"::ffff:203.0.113.7".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "padded",
            "x-forwarded-for",
            b"  203.0.113.7  ,  10.0.0.3 ".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "empty entries",
            "x-forwarded-for",
            b",,203.0.113.7,, ,".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "two lines, last line last",
            "x-forwarded-for",
            b"203.0.113.7".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "1,000 copies of an allowed address",
            "x-forwarded-for",
            thousand_allowed.into_bytes(),
            Some("203.0.113.7"),
        ),
        (
            "allowed behind 32 trusted hops",
            "x-forwarded-for",
            allowed_then_32_trusted.into_bytes(),
            Some("203.0.113.7"),
        ),
        (
            "Forwarded",
            "forwarded",
            b"for=203.0.113.7".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "Forwarded, upper-case key",
            "forwarded",
            b"For=203.0.113.7;proto=https".to_vec(),
            Some("203.0.113.7"),
        ),
        (
            "Forwarded, quoted IPv6 with port",
            "forwarded",
            b"for=\"[2001:db8::17]:4711\"".to_vec(),
            Some("2001:db8::17"),
        ),
        (
            "Forwarded, two elements",
            "forwarded",
            b"for=198.51.100.1, for=203.0.113.7".to_vec(),
            Some("203.0.113.7"),
        ),
        // Denied: the client is an address outside the list, or unknown.
        (
            "spoofed leftmost",
            "x-forwarded-for",
            b"203.0.113.7, 198.51.100.1".to_vec(),
            None,
        ),
        (
            "1,000 trusted hops",
            "x-forwarded-for",
            thousand_trusted.into_bytes(),
            None,
        ),
        (
            "1,000 trusted hops then a client",
            "x-forwarded-for",
            spoof_left.into_bytes(),
            None,
        ),
        (
            "allowed behind 33 trusted hops",
            "x-forwarded-for",
            allowed_then_33_trusted.into_bytes(),
            None,
        ),
        (
            "1,000 garbage entries",
            "x-forwarded-for",
            thousand_garbage.into_bytes(),
            None,
        ),
        ("garbage", "x-forwarded-for", b"garbage".to_vec(), None),
        (
            "garbage right of an allowed address",
            "x-forwarded-for",
            b"203.0.113.7, garbage".to_vec(),
            None,
        ),
        ("unknown", "x-forwarded-for", b"unknown".to_vec(), None),
        ("obfuscated", "x-forwarded-for", b"_hidden".to_vec(), None),
        (
            "bad port",
            "x-forwarded-for",
            b"203.0.113.7:99999".to_vec(),
            None,
        ),
        (
            "empty port",
            "x-forwarded-for",
            b"203.0.113.7:".to_vec(),
            None,
        ),
        (
            "bracketed IPv4",
            "x-forwarded-for",
            b"[203.0.113.7]".to_vec(),
            None,
        ),
        (
            "unclosed bracket",
            "x-forwarded-for",
            b"[2001:db8::1".to_vec(),
            None,
        ),
        (
            "junk after bracket",
            "x-forwarded-for",
            b"[2001:db8::1]x".to_vec(),
            None,
        ),
        ("zone id", "x-forwarded-for", b"fe80::1%eth0".to_vec(), None),
        (
            "five octets",
            "x-forwarded-for",
            b"203.0.113.7.1".to_vec(),
            None,
        ),
        (
            "octal-looking",
            "x-forwarded-for",
            b"0203.0.113.7".to_vec(),
            None,
        ),
        (
            "integer form",
            "x-forwarded-for",
            b"3405803783".to_vec(),
            None,
        ),
        (
            "inner space",
            "x-forwarded-for",
            b"203.0.113 .7".to_vec(),
            None,
        ),
        (
            "semicolon",
            "x-forwarded-for",
            b"203.0.113.7;x".to_vec(),
            None,
        ),
        (
            "very long entry",
            "x-forwarded-for",
            format!("203.0.113.7{}", " ".repeat(100))
                .into_bytes()
                .into_iter()
                .chain(b"x".iter().copied())
                .collect(),
            None,
        ),
        (
            "non-UTF-8 byte",
            "x-forwarded-for",
            b"203.0.113.7\xff".to_vec(),
            None,
        ),
        (
            "empty: the proxy itself is the client",
            "x-forwarded-for",
            b"".to_vec(),
            None,
        ),
        (
            "only commas: the proxy is the client",
            "x-forwarded-for",
            b", , ,".to_vec(),
            None,
        ),
        (
            "Forwarded, obfuscated",
            "forwarded",
            b"for=_hidden".to_vec(),
            None,
        ),
        (
            "Forwarded, unknown",
            "forwarded",
            b"for=unknown".to_vec(),
            None,
        ),
        (
            "Forwarded, no for=",
            "forwarded",
            b"proto=https;by=10.0.0.1".to_vec(),
            None,
        ),
        ("Forwarded, garbage", "forwarded", b"for".to_vec(), None),
        (
            "Forwarded, unquoted IPv6 with port",
            "forwarded",
            b"for=[2001:db8::1]:99999".to_vec(),
            None,
        ),
        (
            "Forwarded, spoofed leftmost",
            "forwarded",
            b"for=203.0.113.7, for=198.51.100.1".to_vec(),
            None,
        ),
    ];
    for (what, header, value, client) in rows {
        let mut req = from_peer(request("GET", "/", None), "10.0.0.1:443");
        if what == "two lines, last line last" {
            req = with_header(req, "x-forwarded-for", b"198.51.100.1, 203.0.113.7");
            req = with_header(req, header, b"10.0.0.9");
        } else {
            req = with_header(req, header, &value);
        }
        let (out, reached) = call(&svc, &calls, req).await;
        match client {
            Some(c) => allowed_from(&out, reached, c, what),
            None => ip_denied(&out, reached, what),
        }
    }
    // `Forwarded` and `X-Forwarded-For` naming different clients: never the allowed one
    // (today `Forwarded` is read; see tests/authz_forwarded_headers.rs for why that alone is not
    // enough).
    let req = from_peer(request("GET", "/", None), "10.0.0.1:443");
    let req = with_header(
        with_header(req, "forwarded", b"for=198.51.100.1"),
        "x-forwarded-for",
        b"203.0.113.7",
    );
    let (out, reached) = call(&svc, &calls, req).await;
    ip_denied(&out, reached, "Forwarded and X-Forwarded-For disagree");
}

/// A client that sends its own forwarded headers from an untrusted address stays denied,
/// whatever it claims.
#[tokio::test]
async fn untrusted_clients_cannot_claim_an_allowed_address() {
    let fx = Fixture::with(
        |v| v,
        |g| g.trusted_proxies(TrustedProxies::new(["10.0.0.0/8"]).unwrap()),
    );
    let k = key_from(&fx, "office", &["203.0.113.0/24"]).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let global = ServiceBuilder::new()
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
    let per_key = ServiceBuilder::new()
        .layer(IpAllowLayer::new(IpPolicy::new()).with_gate(&fx.gate))
        .service(probe(calls.clone()));
    let claims: [(&str, &[u8]); 6] = [
        ("x-forwarded-for", b"203.0.113.7"),
        ("x-forwarded-for", b"10.0.0.1, 203.0.113.7"),
        ("x-real-ip", b"203.0.113.7"),
        ("forwarded", b"for=203.0.113.7"),
        ("forwarded", b"for=10.0.0.1"),
        ("x-forwarded-for", b"127.0.0.1"),
    ];
    for (header, value) in claims {
        let what = format!("{header}: {}", String::from_utf8_lossy(value));
        let req = with_header(
            from_peer(request("GET", "/", None), "198.51.100.66:5000"),
            header,
            value,
        );
        let (out, reached) = call(&global, &calls, req).await;
        ip_denied(&out, reached, &what);
        let req = with_header(
            from_peer(
                request("GET", "/", Some(k.expose_secret())),
                "198.51.100.66:5000",
            ),
            header,
            value,
        );
        let (out, reached) = call(&per_key, &calls, req).await;
        ip_denied(&out, reached, &what);
    }
}

#[test]
fn invalid_configuration_fails_at_build() {
    for bad in [
        "",
        " ",
        "nope",
        "10.0.0.0/33",
        "10.0.0.0/",
        "10.0.0.0/-1",
        "10.0.0/8",
        "256.0.0.0/8",
        "2001:db8::/129",
        "1.2.3.4:80",
        "[2001:db8::1]",
        "[2001:db8::1]:443",
        "fe80::1%eth0",
        "10.0.0.0/8,192.168.0.0/16",
        "0x0a000000/8",
    ] {
        assert!(IpPolicy::new().allow([bad]).is_err(), "allow({bad:?})");
        assert!(IpPolicy::new().deny([bad]).is_err(), "deny({bad:?})");
        assert!(
            TrustedProxies::new([bad]).is_err(),
            "TrustedProxies({bad:?})"
        );
        assert!(parse_network(bad).is_err(), "parse_network({bad:?})");
    }
    // One bad entry among good ones fails the whole list.
    assert!(IpPolicy::new().allow(["10.0.0.0/8", "bad", "::1"]).is_err());
    assert!(TrustedProxies::new(["10.0.0.0/8", "10.0.0.0/99"]).is_err());
    // The error does not echo unbounded input.
    let long = "x".repeat(10_000);
    let err = parse_network(&long).unwrap_err();
    assert!(err.to_string().len() < 300, "{err}");
    // Accepted forms, canonical.
    for (text, canonical) in [
        ("10.0.0.1", "10.0.0.1/32"),
        (" 10.0.0.0/8 ", "10.0.0.0/8"),
        ("2001:db8::1", "2001:db8::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:10.0.0.1", "10.0.0.1/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ] {
        assert_eq!(
            parse_network(text).unwrap().to_string(),
            canonical,
            "{text}"
        );
    }
    let proxies = TrustedProxies::new(["10.0.0.0/8", "::ffff:192.168.0.0/112"]).unwrap();
    assert_eq!(
        proxies.networks(),
        &nets(&["10.0.0.0/8", "192.168.0.0/16"])[..]
    );
    assert!(proxies.is_trusted(ip("192.168.3.4")));
    assert!(proxies.is_trusted(ip("::ffff:192.168.3.4")));
    assert!(!proxies.is_trusted(ip("192.169.0.1")));
    assert!(!TrustedProxies::none().is_trusted(ip("10.0.0.1")));
}
