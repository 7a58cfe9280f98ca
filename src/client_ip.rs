//! Client addresses: the connection's peer, and forwarded headers believed only from
//! trusted proxies.
//!
//! The peer address is read from the request's extensions, where servers put it:
//! axum's `ConnectInfo<SocketAddr>` (feature `axum`; serve with
//! `into_make_service_with_connect_info::<SocketAddr>()`), tonic's `TcpConnectInfo` (feature
//! `tonic`) or, behind tonic's TLS server, its `TlsConnectInfo<TcpConnectInfo>` (feature
//! `tonic-tls`), or a plain [`SocketAddr`] extension (plain hyper: insert it yourself per
//! connection). IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) are treated as IPv4.
//!
//! `X-Forwarded-For` and RFC 7239 `Forwarded` are believed only when the peer is a
//! configured trusted proxy. They are read from the right, skipping trusted hops; the first
//! untrusted address is the client. From anyone else they are ignored, so a client cannot
//! claim an address by sending its own header.
//!
//! ```
//! use std::net::{IpAddr, SocketAddr};
//! use keygate::client_ip::TrustedProxies;
//!
//! let proxies = TrustedProxies::new(["10.0.0.0/8"]).unwrap();
//! let mut req = http::Request::get("/")
//!     .header("x-forwarded-for", "203.0.113.7, 10.1.2.3")
//!     .body(())
//!     .unwrap();
//! req.extensions_mut().insert(SocketAddr::from(([10, 0, 0, 1], 443)));
//! assert_eq!(proxies.client_ip(&req), Some(IpAddr::from([203, 0, 113, 7])));
//! ```

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderName, FORWARDED};
use http::Request;
use ipnet::IpNet;

/// A client address a service settled on itself (request extension). keygate's layers keep
/// the address they settle on in the [`RequestContext`](crate::RequestContext)
/// ([`client_ip`](crate::RequestContext::client_ip)); a `ClientIp` a service inserts before
/// them is believed as the settled address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(pub IpAddr);

/// How many trusted hops are skipped at most before giving up (the address is then
/// unknown).
const MAX_TRUSTED_HOPS: usize = 32;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The address of the connection's peer, from the request's extensions, canonical (IPv4-
/// mapped IPv6 as IPv4). `None` when the server put none there.
pub fn peer_addr<B>(req: &Request<B>) -> Option<IpAddr> {
    let ext = req.extensions();
    #[cfg(feature = "axum")]
    if let Some(info) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
        return Some(info.0.ip().to_canonical());
    }
    #[cfg(feature = "tonic")]
    if let Some(addr) = ext
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
    {
        return Some(addr.ip().to_canonical());
    }
    // tonic's own TLS server (`tls_config`) also inserts the TcpConnectInfo above; a stream
    // of TLS connections accepted outside tonic (`serve_with_incoming` over tokio-rustls
    // streams, to reload certificates) carries only this.
    #[cfg(feature = "tonic-tls")]
    if let Some(addr) = ext
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
    {
        return Some(addr.ip().to_canonical());
    }
    ext.get::<SocketAddr>().map(|a| a.ip().to_canonical())
}

/// The address an earlier layer settled on: the request context's, or a [`ClientIp`]
/// extension a service inserted itself.
pub(crate) fn settled_earlier<B>(req: &Request<B>) -> Option<IpAddr> {
    if let Some(ip) = crate::RequestContext::of(req.extensions()).and_then(|c| c.client_ip()) {
        return Some(ip);
    }
    req.extensions().get::<ClientIp>().map(|ClientIp(ip)| *ip)
}

/// The address an earlier layer settled on ([`settled_earlier`]), else the one
/// `proxies` give, else (without proxies) the peer. Does not memoize: for layers built
/// without the hub, which has its own memoizing [`KeyGate::client_ip`](crate::KeyGate::client_ip).
#[cfg(any(feature = "ip-allow", feature = "rate-limit", feature = "audit"))]
pub(crate) fn settled<B>(req: &Request<B>, proxies: Option<&TrustedProxies>) -> Option<IpAddr> {
    if let Some(ip) = settled_earlier(req) {
        return Some(ip);
    }
    match proxies {
        Some(p) => p.client_ip(req),
        None => peer_addr(req),
    }
}

/// Why a network list is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid network {text:?}: {reason}")]
pub struct InvalidNetwork {
    text: String,
    reason: &'static str,
}

impl InvalidNetwork {
    fn new(text: &str, reason: &'static str) -> Self {
        InvalidNetwork {
            text: text.chars().take(64).collect(),
            reason,
        }
    }
}

/// Parses an address or CIDR (`10.0.0.1`, `10.0.0.0/8`, `2001:db8::/32`) into a network; a
/// bare address is a /32 or /128. IPv4-mapped IPv6 networks are turned into IPv4 ones.
/// A CIDR with host bits set (`10.1.2.3/8`) is an error, not silently widened: it usually
/// means a typo.
pub fn parse_network(text: &str) -> Result<IpNet, InvalidNetwork> {
    let t = text.trim();
    let net = match t.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => net,
        Ok(_) => {
            return Err(InvalidNetwork::new(
                text,
                "host bits are set (did you mean the network address?)",
            ))
        }
        Err(_) => match t.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(InvalidNetwork::new(
                    text,
                    "expected an address or CIDR such as 10.0.0.0/8 or 2001:db8::/32",
                ))
            }
        },
    };
    Ok(canonical_net(net))
}

/// Turns `::ffff:a.b.c.d/n` (n ≥ 96) into `a.b.c.d/(n-96)`.
pub(crate) fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                    return IpNet::V4(n.trunc());
                }
            }
        }
    }
    net.trunc()
}

/// The proxies whose forwarded headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// No trusted proxy: forwarded headers are always ignored (the default).
    pub fn none() -> Self {
        Self::default()
    }

    /// Proxies given as addresses or CIDRs; an invalid entry is an error now, not at request
    /// time. So is a /0 network (`0.0.0.0/0`, `::/0`): trusting every address would let any
    /// client choose its own.
    pub fn new<I, T>(nets: I) -> Result<Self, InvalidNetwork>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let nets = nets
            .into_iter()
            .map(|n| {
                let net = parse_network(n.as_ref())?;
                if net.prefix_len() == 0 {
                    return Err(InvalidNetwork::new(
                        n.as_ref(),
                        "a /0 network would trust every address",
                    ));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustedProxies { nets })
    }

    /// The trusted networks.
    pub fn networks(&self) -> &[IpNet] {
        &self.nets
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// The client address of `req`: the peer when it is not a trusted proxy; otherwise the
    /// first untrusted address reading the forwarded chain from the right, skipping trusted
    /// hops. When every hop is trusted, the leftmost one.
    ///
    /// Both `Forwarded` and `X-Forwarded-For` are read. When a request carries both, they
    /// must name the same client, or the address is unknown: many proxies append to
    /// `X-Forwarded-For` but pass a client-written `Forwarded` through untouched, and the
    /// client must not get to choose.
    ///
    /// `None` (unknown) when there is no peer address, or when the chain behind a trusted
    /// proxy holds something that is not an address (garbage, `unknown`, an obfuscated
    /// identifier) before any untrusted address, or more than 32 trusted hops. Layers
    /// treat an unknown address as failing any address policy.
    pub fn client_ip<B>(&self, req: &Request<B>) -> Option<IpAddr> {
        let peer = peer_addr(req)?;
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        let headers = req.headers();
        let forwarded = headers
            .contains_key(FORWARDED)
            .then(|| self.walk(req, &FORWARDED, peer));
        let xff = headers
            .contains_key(&X_FORWARDED_FOR)
            .then(|| self.walk(req, &X_FORWARDED_FOR, peer));
        match (forwarded, xff) {
            (Some(a), Some(b)) => a.filter(|a| Some(*a) == b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => Some(peer),
        }
    }

    /// Walks one forwarded header from the right.
    fn walk<B>(&self, req: &Request<B>, name: &HeaderName, peer: IpAddr) -> Option<IpAddr> {
        let rfc7239 = name == FORWARDED;
        let mut leftmost = peer;
        let mut hops = 0;
        // Header lines are read last to first; within a line, entries right to left.
        for line in req.headers().get_all(name).iter().rev() {
            let text = line.to_str().ok()?;
            for entry in text.rsplit(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                let ip = if rfc7239 {
                    forwarded_for(entry)?
                } else {
                    parse_node(entry)?
                };
                if !self.is_trusted(ip) {
                    return Some(ip);
                }
                hops += 1;
                if hops > MAX_TRUSTED_HOPS {
                    return None;
                }
                leftmost = ip;
            }
        }
        Some(leftmost)
    }
}

/// The `for=` node of one RFC 7239 forwarded-element (`for=192.0.2.60;proto=http`).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        parse_node(v)
    })
}

/// An address with an optional port: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:8080`.
fn parse_node(node: &str) -> Option<IpAddr> {
    if node.len() > 64 {
        return None;
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return addr
            .parse::<std::net::Ipv6Addr>()
            .ok()
            .map(|a| IpAddr::V6(a).to_canonical());
    }
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (addr, port) = node.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    addr.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/");
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut()
            .insert(peer.parse::<SocketAddr>().unwrap());
        r
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn untrusted_peers_cannot_claim_an_address() {
        let p = TrustedProxies::new(["10.0.0.0/8"]).unwrap();
        let r = req("198.51.100.9:5000", &[("x-forwarded-for", "10.0.0.5")]);
        assert_eq!(p.client_ip(&r), ip("198.51.100.9"));
        assert_eq!(TrustedProxies::none().client_ip(&r), ip("198.51.100.9"));
    }

    #[test]
    fn reads_from_the_right_skipping_trusted_hops() {
        let p = TrustedProxies::new(["10.0.0.0/8", "192.168.0.0/16"]).unwrap();
        let r = req(
            "10.0.0.1:443",
            &[(
                "x-forwarded-for",
                "1.1.1.1, 203.0.113.7, 192.168.1.1, 10.2.2.2",
            )],
        );
        assert_eq!(
            p.client_ip(&r),
            ip("203.0.113.7"),
            "the spoofable leftmost entry is not believed"
        );
        let two_lines = req(
            "10.0.0.1:443",
            &[
                ("x-forwarded-for", "203.0.113.7"),
                ("x-forwarded-for", "10.9.9.9"),
            ],
        );
        assert_eq!(p.client_ip(&two_lines), ip("203.0.113.7"));
        let all_trusted = req(
            "10.0.0.1:443",
            &[("x-forwarded-for", "192.168.3.3, 10.2.2.2")],
        );
        assert_eq!(p.client_ip(&all_trusted), ip("192.168.3.3"));
        let none = req("10.0.0.1:443", &[]);
        assert_eq!(p.client_ip(&none), ip("10.0.0.1"));
    }

    #[test]
    fn ports_brackets_and_forwarded() {
        let p = TrustedProxies::new(["10.0.0.0/8"]).unwrap();
        for (value, want) in [
            ("203.0.113.7:8080", "203.0.113.7"),
            ("[2001:db8::1]:8080", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
        ] {
            let r = req("10.0.0.1:1", &[("x-forwarded-for", value)]);
            assert_eq!(p.client_ip(&r), ip(want), "{value}");
        }
        let f = req(
            "10.0.0.1:1",
            &[(
                "forwarded",
                "for=198.51.100.1, for=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.9",
            )],
        );
        assert_eq!(p.client_ip(&f), ip("2001:db8:cafe::17"));
    }

    #[test]
    fn garbage_behind_a_trusted_proxy_is_unknown() {
        let p = TrustedProxies::new(["10.0.0.0/8"]).unwrap();
        for value in [
            "garbage",
            "unknown",
            "_hidden",
            "1.2.3.4:99999",
            "[::1",
            "1.2.3.4.5",
            "1.2.3.4 5",
        ] {
            let r = req("10.0.0.1:1", &[("x-forwarded-for", value)]);
            assert_eq!(p.client_ip(&r), None, "{value:?}");
        }
        let f = req("10.0.0.1:1", &[("forwarded", "for=_hidden")]);
        assert_eq!(p.client_ip(&f), None);
        let long = vec!["10.0.0.2"; 1000].join(", ");
        let r = req("10.0.0.1:1", &[("x-forwarded-for", &long)]);
        assert_eq!(p.client_ip(&r), None, "too many trusted hops");
        let mut spray = vec!["10.0.0.2"; 999].join(", ");
        spray.insert_str(0, "203.0.113.7, ");
        let r = req("198.51.100.1:1", &[("x-forwarded-for", &spray)]);
        assert_eq!(p.client_ip(&r), ip("198.51.100.1"));
    }

    #[test]
    fn networks_parse_and_fail_early() {
        assert!(TrustedProxies::new(["10.0.0.0/33"]).is_err());
        assert!(TrustedProxies::new(["nope"]).is_err());
        assert_eq!(
            parse_network("10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert!(parse_network("10.1.2.3/8").is_err(), "host bits set");
        assert!(TrustedProxies::new(["0.0.0.0/0"]).is_err());
        assert!(TrustedProxies::new(["::/0"]).is_err());
        assert_eq!(
            parse_network("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        let p = TrustedProxies::new(["::ffff:10.0.0.1"]).unwrap();
        assert!(p.is_trusted("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn mapped_peers_are_ipv4() {
        let r = req("[::ffff:203.0.113.7]:5", &[]);
        assert_eq!(peer_addr(&r), ip("203.0.113.7"));
    }
}
