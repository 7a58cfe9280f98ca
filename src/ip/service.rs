use std::net::IpAddr;
use std::sync::Arc;

use http::Request;
use ipnet::IpNet;

use super::IpPolicy;
use crate::check::{Caller, Check, Guarded, One};
use crate::client_ip::{settled, TrustedProxies};
use crate::{Denial, DenialCode, KeyGate, RequestContext};

/// Middleware that allows or denies requests by client address. See
/// [`IpAllowLayer`](super::IpAllowLayer).
pub type IpAllow<S> = Guarded<One<IpCheck>, S>;

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

fn not_allowed(detail: &'static str) -> Denial {
    Denial::new(DenialCode::IpNotAllowed).with_detail(detail)
}

/// The client-address check: global lists and the key's own allowlist.
#[derive(Clone, Debug)]
pub struct IpCheck {
    pub(crate) policy: Arc<IpPolicy>,
    pub(crate) proxies: Arc<TrustedProxies>,
    /// Built from the hub: the address is settled (and memoized) through it.
    pub(crate) gate: Option<KeyGate>,
}

impl IpCheck {
    /// The client address, settled once per request in the request context.
    fn client_ip<B>(&self, req: &mut Request<B>) -> Option<IpAddr> {
        if let Some(gate) = &self.gate {
            return gate.client_ip(req);
        }
        let ip = settled(req, Some(&self.proxies));
        if let Some(ip) = ip {
            RequestContext::of_mut(req.extensions_mut()).set_client_ip(ip);
        }
        ip
    }
}

impl Check for IpCheck {
    type Note = ();

    /// Pure (it only reads the request and its caller): it may run ahead of an earlier
    /// check's I/O.
    fn speculative(&self) -> bool {
        true
    }

    fn needs_caller<B>(&self, _req: &Request<B>) -> bool {
        self.policy.per_key
    }

    fn check<B>(&self, req: &mut Request<B>, who: Caller<'_>) -> Result<(), Denial> {
        let ip = self.client_ip(req);
        let p = &*self.policy;
        if !p.deny.is_empty() || !p.allow.is_empty() {
            let ip = ip.ok_or_else(|| not_allowed("The client address is unknown."))?;
            if contains(&p.deny, ip) {
                return Err(not_allowed("Requests from this address are not allowed."));
            }
            if !p.allow.is_empty() && !contains(&p.allow, ip) {
                return Err(not_allowed("Requests from this address are not allowed."));
            }
        }
        if p.per_key {
            let principal = who.map_err(Denial::clone)?;
            let own = principal.allowed_ips();
            if !own.is_empty() {
                let ip = ip.ok_or_else(|| not_allowed("The client address is unknown."))?;
                if !contains(own, ip) {
                    return Err(not_allowed(
                        "This API key may not be used from this address.",
                    ));
                }
            }
        }
        Ok(())
    }
}
