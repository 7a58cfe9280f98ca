use std::fmt;
use std::sync::Arc;

use tower_layer::Layer;

use super::config::{RateLimitConfig, Shared};
use super::{RateCheck, RateLimit};
use crate::check::{CheckLayer, One, Resolver};
use crate::cost::ConfigError;
use crate::KeyGate;

/// Layer that applies [`RateLimit`]: per-key GCRA rate limits (governor), several named
/// policies per key, weighted costs, and per-address limits for requests without a
/// principal. Rejects with 429 `rate_limited` (gRPC RESOURCE_EXHAUSTED).
///
/// [`RateLimitLayer::new`] builds a layer that reads the principal an earlier layer resolved,
/// and the [`ClientIp`](crate::client_ip::ClientIp) extension or the peer address;
/// [`RateLimitLayer::with_gate`] makes it resolve the caller itself when no earlier layer
/// has, and settle the client address through the hub's trusted proxies. Clones share the
/// limiters.
#[derive(Clone)]
pub struct RateLimitLayer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) resolver: Resolver,
}

impl RateLimitLayer {
    /// A layer enforcing `config`; refuses invalid configurations. Without
    /// [`with_gate`](Self::with_gate) it reads the principal an earlier layer put in the
    /// request context, and renders with the default renderer.
    pub fn new(config: RateLimitConfig) -> Result<Self, ConfigError> {
        Ok(RateLimitLayer {
            shared: Arc::new(Shared::new(config)?),
            resolver: Resolver::standalone(),
        })
    }

    /// Resolves the caller through `gate` when no earlier layer has (memoized: the key is
    /// verified once per request), settles client addresses through the hub's trusted
    /// proxies, and renders denials with the hub's renderer. Clones made before keep
    /// sharing the limiters.
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        self.resolver = Resolver::Hub(gate.clone());
        self
    }

    /// The check this layer runs (for a fused [`Stack`](crate::stack::Stack)).
    pub fn check(&self) -> RateCheck {
        RateCheck {
            shared: self.shared.clone(),
            gate: self.resolver.gate().cloned(),
        }
    }

    /// Runs housekeeping now: drops every subject whose state is back to fresh (governor's
    /// `retain_recent`) and shrinks the maps (`shrink_to_fit`). It also runs by itself after
    /// every [`housekeeping_every`](RateLimitConfig::housekeeping_every) new subjects.
    pub fn housekeeping(&self) {
        self.shared.housekeeping();
    }

    /// How many (subject, policy shape) states are tracked.
    pub fn tracked(&self) -> usize {
        self.shared.tracked()
    }
}

impl fmt::Debug for RateLimitLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("resolver", &self.resolver)
            .field("tracked", &self.tracked())
            .finish()
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckLayer::from_parts(One(self.check()), self.resolver.clone()).layer(inner)
    }
}
