//! Forwarded / X-Forwarded-For parsing behind trusted proxies; CIDR and network lists.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::{Arbitrary, Unstructured};
use http::header::HeaderValue;
use http::Request;
use ipnet::IpNet;
use keygate::client_ip::{parse_network, TrustedProxies};
use keygate::ip::IpPolicy;

#[derive(Debug, Arbitrary)]
struct ForwardedInput {
    /// Trusted networks, by index into `NETS`.
    trusted: Vec<u8>,
    peer: u8,
    forwarded: Vec<Vec<u8>>,
    xff: Vec<Vec<u8>>,
}

const NETS: &[&str] = &[
    "10.0.0.0/8",
    "192.0.2.0/24",
    "2001:db8::/32",
    "127.0.0.1",
    "::1",
];
const PEERS: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001)),
    IpAddr::V4(Ipv4Addr::LOCALHOST),
];

/// An address with an optional port, as documented: `a.b.c.d`, `a.b.c.d:port`, an IPv6
/// address, `[v6]` or `[v6]:port`; at most 64 bytes.
fn reference_node(node: &str) -> Option<IpAddr> {
    if node.len() > 64 {
        return None;
    }
    let port_ok = |p: &str| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
    };
    if let Some(rest) = node.strip_prefix('[') {
        let close = rest.find(']')?;
        let (addr, after) = (&rest[..close], &rest[close + 1..]);
        if !after.is_empty() && !after.strip_prefix(':').is_some_and(port_ok) {
            return None;
        }
        return addr
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| IpAddr::V6(a).to_canonical());
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let colon = node.rfind(':')?;
    if !port_ok(&node[colon + 1..]) {
        return None;
    }
    node[..colon].parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// One forwarded header walked from the right, plainly: lines last to first, entries right
/// to left; a line that is not visible ASCII (`None` here) is garbage where it stands.
fn reference_walk(
    nets: &[IpNet],
    lines: &[Option<&str>],
    rfc7239: bool,
    peer: IpAddr,
) -> Option<IpAddr> {
    let trusted = |ip: IpAddr| nets.iter().any(|n| n.contains(&ip.to_canonical()));
    let mut leftmost = peer;
    let mut hops = 0;
    for line in lines.iter().rev() {
        let line = (*line)?;
        for entry in line.split(',').rev() {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let ip = if rfc7239 {
                entry.split(';').find_map(|pair| {
                    let (k, v) = pair.trim().split_once('=')?;
                    if !k.trim().eq_ignore_ascii_case("for") {
                        return None;
                    }
                    let v = v.trim();
                    let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                        Some(inner) => inner,
                        None => v,
                    };
                    reference_node(v)
                })?
            } else {
                reference_node(entry)?
            };
            if !trusted(ip) {
                return Some(ip);
            }
            hops += 1;
            if hops > 32 {
                return None;
            }
            leftmost = ip;
        }
    }
    Some(leftmost)
}

/// `TrustedProxies::client_ip` against the reference walk.
pub fn forwarded(data: &[u8]) {
    let Ok(input) = ForwardedInput::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let chosen: Vec<&str> = input
        .trusted
        .iter()
        .map(|i| NETS[usize::from(*i) % NETS.len()])
        .collect();
    let proxies = TrustedProxies::new(&chosen).expect("valid networks");
    let peer = PEERS[usize::from(input.peer) % PEERS.len()];
    let mut req = Request::get("/").body(()).expect("request");
    let mut fwd = Vec::new();
    for v in &input.forwarded {
        if let Ok(h) = HeaderValue::from_bytes(v) {
            req.headers_mut().append("forwarded", h);
            fwd.push(v);
        }
    }
    let mut xff = Vec::new();
    for v in &input.xff {
        if let Ok(h) = HeaderValue::from_bytes(v) {
            req.headers_mut().append("x-forwarded-for", h);
            xff.push(v);
        }
    }
    req.extensions_mut().insert(SocketAddr::new(peer, 443));
    let got = proxies.client_ip(&req);

    let peer_c = peer.to_canonical();
    let nets = proxies.networks();
    let want = if !proxies.is_trusted(peer_c) {
        Some(peer_c)
    } else {
        let walk = |lines: &[&Vec<u8>], rfc: bool| -> Option<IpAddr> {
            let text: Vec<Option<&str>> = lines
                .iter()
                .map(|l| {
                    let visible = l.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
                    visible.then(|| std::str::from_utf8(l).expect("ASCII"))
                })
                .collect();
            reference_walk(nets, &text, rfc, peer_c)
        };
        let a = (!fwd.is_empty()).then(|| walk(&fwd, true));
        let b = (!xff.is_empty()).then(|| walk(&xff, false));
        match (a, b) {
            (Some(a), Some(b)) => a.filter(|a| Some(*a) == b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => Some(peer_c),
        }
    };
    assert_eq!(got, want, "client_ip disagrees with the reference: {req:?}");
    if let Some(ip) = got {
        assert_eq!(
            ip,
            ip.to_canonical(),
            "client_ip answers a non-canonical address"
        );
    }
}

/// `parse_network` round trips and agrees with the lists built from it.
pub fn network(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_network(text);
    assert_eq!(IpPolicy::new().allow([text]).is_ok(), parsed.is_ok());
    assert_eq!(IpPolicy::new().deny([text]).is_ok(), parsed.is_ok());
    match &parsed {
        Ok(net) => {
            assert_eq!(*net, net.trunc(), "host bits kept in {text:?}");
            if let IpNet::V6(v6) = net {
                assert!(
                    v6.addr().to_ipv4_mapped().is_none() || v6.prefix_len() < 96,
                    "an IPv4-mapped network was not made IPv4: {text:?}"
                );
            }
            let again = parse_network(&net.to_string());
            assert_eq!(again.as_ref().ok(), Some(net), "{net} does not round trip");
            let trusted = TrustedProxies::new([text]);
            assert_eq!(trusted.is_ok(), net.prefix_len() != 0);
            if let Ok(t) = trusted {
                // Both ends of the network are trusted, unless an end is an IPv4-mapped
                // address (those are compared as IPv4: `::/80` does not trust `::ffff:a.b.c.d`).
                for end in [net.network(), net.broadcast()] {
                    if end.to_canonical() == end {
                        assert!(t.is_trusted(end), "{end} not trusted by {net}");
                    }
                }
            }
        }
        Err(_) => {
            assert!(TrustedProxies::new([text]).is_err());
        }
    }
}
