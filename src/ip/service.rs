use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use ipnet::IpNet;
use tower_service::Service;

use super::IpPolicy;
use crate::client_ip::{settled, ClientIp, TrustedProxies};
use crate::future::ResponseFuture;
use crate::guard::{self, Check, Resolver};
use crate::reject::ResponseBody;
use crate::{Denial, DenialCode, Principal};

/// Middleware that allows or denies requests by client address. See
/// [`IpAllowLayer`](super::IpAllowLayer).
#[derive(Clone, Debug)]
pub struct IpAllow<S> {
    inner: S,
    policy: Arc<IpPolicy>,
    proxies: Arc<TrustedProxies>,
    resolver: Resolver,
}

impl<S> IpAllow<S> {
    pub(crate) fn new(
        inner: S,
        policy: Arc<IpPolicy>,
        proxies: Arc<TrustedProxies>,
        resolver: Resolver,
    ) -> Self {
        IpAllow {
            inner,
            policy,
            proxies,
            resolver,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

fn not_allowed(detail: &'static str) -> Denial {
    Denial::new(DenialCode::IpNotAllowed).with_detail(detail)
}

struct IpCheck {
    policy: Arc<IpPolicy>,
    ip: Option<IpAddr>,
}

impl<ReqB> Check<ReqB> for IpCheck {
    type Note = ();

    fn check(
        self,
        _req: &mut Request<ReqB>,
        who: Result<&Principal, &Denial>,
    ) -> Result<(), Denial> {
        let p = &*self.policy;
        if !p.deny.is_empty() || !p.allow.is_empty() {
            let ip = self
                .ip
                .ok_or_else(|| not_allowed("The client address is unknown."))?;
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
                let ip = self
                    .ip
                    .ok_or_else(|| not_allowed("The client address is unknown."))?;
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

impl<S, ReqB, ResB> Service<Request<ReqB>> for IpAllow<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Send + 'static,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        let ip = match &self.resolver {
            Resolver::Hub(gate) => gate.client_ip(&mut req),
            Resolver::Extensions(_) => {
                let ip = settled(&req, Some(&self.proxies));
                if let Some(ip) = ip {
                    req.extensions_mut().insert(ClientIp(ip));
                }
                ip
            }
        };
        let check = IpCheck {
            policy: self.policy.clone(),
            ip,
        };
        guard::call(&mut self.inner, &self.resolver, req, check)
    }
}
