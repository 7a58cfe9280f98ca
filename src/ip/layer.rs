use std::sync::Arc;

use ipnet::IpNet;
use tower_layer::Layer;

use super::service::{IpAllow, IpCheck};
use crate::check::{CheckLayer, One, Resolver};
use crate::client_ip::{parse_network, InvalidNetwork, TrustedProxies};
use crate::reject::Renderer;
use crate::KeyGate;

/// Global address lists and whether keys' own allowlists are enforced. Invalid entries are
/// errors when the policy is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpPolicy {
    pub(crate) allow: Vec<IpNet>,
    pub(crate) deny: Vec<IpNet>,
    pub(crate) per_key: bool,
}

impl Default for IpPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl IpPolicy {
    /// No global list; per-key allowlists enforced.
    pub fn new() -> Self {
        IpPolicy {
            allow: Vec::new(),
            deny: Vec::new(),
            per_key: true,
        }
    }

    /// Only these addresses or networks may call (in addition to the deny list and keys'
    /// lists).
    pub fn allow<I, T>(mut self, nets: I) -> Result<Self, InvalidNetwork>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        for n in nets {
            self.allow.push(parse_network(n.as_ref())?);
        }
        Ok(self)
    }

    /// These addresses or networks may never call.
    pub fn deny<I, T>(mut self, nets: I) -> Result<Self, InvalidNetwork>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        for n in nets {
            self.deny.push(parse_network(n.as_ref())?);
        }
        Ok(self)
    }

    /// Whether keys' own allowlists are enforced (default true). With it on, the layer needs
    /// the principal; turn it off for a purely global filter that works without keys.
    pub fn per_key(mut self, yes: bool) -> Self {
        self.per_key = yes;
        self
    }
}

/// Layer that applies [`IpAllow`].
///
/// [`IpAllowLayer::new`] builds a layer that only reads the principal an earlier layer
/// resolved and takes the peer address (with its own trusted proxies, none by default);
/// [`IpAllowLayer::with_gate`] resolves through the hub and uses the hub's trusted proxies.
#[derive(Clone, Debug)]
pub struct IpAllowLayer {
    policy: Arc<IpPolicy>,
    proxies: Arc<TrustedProxies>,
    resolver: Resolver,
}

impl IpAllowLayer {
    /// A layer enforcing `policy`.
    pub fn new(policy: IpPolicy) -> Self {
        IpAllowLayer {
            policy: Arc::new(policy),
            proxies: Arc::new(TrustedProxies::none()),
            resolver: Resolver::standalone(),
        }
    }

    /// Resolves the principal and the client address through `gate` (its verifier and
    /// trusted proxies), rendering with its renderer.
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        self.proxies = Arc::new(gate.trusted_proxies().clone());
        self.resolver = Resolver::Hub(gate.clone());
        self
    }

    /// Believes forwarded headers from these proxies (for a layer built without the hub; a
    /// layer built [`with_gate`](IpAllowLayer::with_gate) settles the address through the
    /// hub, whose trusted proxies win).
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = Arc::new(proxies);
        self
    }

    /// The check this layer runs (for a fused [`Stack`](crate::stack::Stack)).
    pub fn check(&self) -> IpCheck {
        IpCheck {
            policy: self.policy.clone(),
            proxies: self.proxies.clone(),
            gate: self.resolver.gate().cloned(),
        }
    }

    /// Renders denials with `renderer` (for a layer built without the hub; with the hub, the
    /// hub's renderer is used).
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        if let Resolver::Extensions(_) = self.resolver {
            self.resolver = Resolver::Extensions(Arc::new(renderer));
        }
        self
    }
}

impl<S> Layer<S> for IpAllowLayer {
    type Service = IpAllow<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckLayer::from_parts(One(self.check()), self.resolver.clone()).layer(inner)
    }
}
