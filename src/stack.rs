//! Fused stacks: several keygate checks in one service, with one response future.
//!
//! The separate layers ([`ApiKeyAuthLayer`](crate::auth::ApiKeyAuthLayer), `ScopeLayer`,
//! `IpAllowLayer`, `RateLimitLayer`, `QuotaLayer`) stay the any-order, adopt-one-alone
//! interface. A [`Stack`] runs the same checks, in the order they are added, inside one
//! service: the caller is resolved once, each check reads and fills the one
//! [`RequestContext`](crate::RequestContext), and the first check that refuses answers (the
//! checks before it still write their fields on the rejection, as outer layers would).
//! The decisions are the ones the separate layers stacked in the same order reach.
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
//! use keygate::{KeyGate, MemoryStore, Verifier};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let gate = KeyGate::new(Verifier::new(MemoryStore::new()));
//! let rate = RateLimitLayer::new(RateLimitConfig::new()).unwrap();
//! let svc = ServiceBuilder::new()
//!     .layer(gate.stack().rate(&rate).auth())
//!     .service_fn(|_: Request<String>| async { Ok::<_, std::convert::Infallible>(Response::new(String::new())) });
//! let res = svc.oneshot(Request::new(String::new())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! # }
//! ```

use tower_layer::Layer;

use crate::check::{Check, CheckLayer, Checks, Empty, Guarded, One, Resolver, Then};
use crate::KeyGate;

/// A fused stack of checks, built from the hub with [`KeyGate::stack`]. A tower layer: one
/// service ([`Guarded`]) running every check added, in order.
#[derive(Clone, Debug)]
pub struct Stack<C> {
    gate: KeyGate,
    checks: C,
}

impl Stack<Empty> {
    pub(crate) fn new(gate: &KeyGate) -> Self {
        Stack {
            gate: gate.clone(),
            checks: Empty,
        }
    }
}

impl<C: Checks> Stack<C> {
    /// Adds any [`Check`] (one of your own, or a layer's `check()`).
    pub fn check<X: Check>(self, check: X) -> Stack<Then<C, One<X>>> {
        Stack {
            gate: self.gate,
            checks: Then(self.checks, One(check)),
        }
    }

    /// Adds authentication: a request whose key does not resolve is refused.
    #[cfg(feature = "auth")]
    pub fn auth(self) -> Stack<Then<C, One<crate::auth::Authenticate>>> {
        let check = crate::auth::ApiKeyAuthLayer::new(&self.gate).check();
        self.check(check)
    }

    /// Adds the check of `layer` (scopes and collections).
    #[cfg(feature = "scope")]
    pub fn scope(
        self,
        layer: &crate::scope::ScopeLayer,
    ) -> Stack<Then<C, One<crate::scope::ScopeCheck>>> {
        self.check(layer.check())
    }

    /// Adds the check of `layer` (client addresses), settling the address through the hub.
    #[cfg(feature = "ip-allow")]
    pub fn ip(self, layer: &crate::ip::IpAllowLayer) -> Stack<Then<C, One<crate::ip::IpCheck>>> {
        let layer = layer.clone().with_gate(&self.gate);
        self.check(layer.check())
    }

    /// Adds the check of `layer` (rate limits); it shares `layer`'s limiters, and settles
    /// client addresses through the hub.
    #[cfg(feature = "rate-limit")]
    pub fn rate(
        self,
        layer: &crate::rate_limit::RateLimitLayer,
    ) -> Stack<Then<C, One<crate::rate_limit::RateCheck>>> {
        let layer = layer.clone().with_gate(&self.gate);
        self.check(layer.check())
    }

    /// Adds the check of `layer` (quotas); it shares `layer`'s counters (and its
    /// [`QuotaHandle`](crate::quota::QuotaHandle)), and reads the hub's clock unless the
    /// layer's configuration names one.
    #[cfg(feature = "quota")]
    pub fn quota(
        self,
        layer: &crate::quota::QuotaLayer,
    ) -> Stack<Then<C, One<crate::quota::QuotaCheck>>> {
        let layer = layer.clone().with_gate(&self.gate);
        self.check(layer.check())
    }

    /// Records one audit event per request around the stack (the audit layer of the hub,
    /// outermost).
    #[cfg(feature = "audit")]
    pub fn audit(self, auditor: crate::core::audit::Auditor) -> Audited<C> {
        Audited {
            audit: self.gate.audit_layer(auditor),
            stack: self,
        }
    }

    /// The layer of the checks, as a [`CheckLayer`].
    pub fn into_layer(self) -> CheckLayer<C> {
        CheckLayer::from_parts(self.checks, Resolver::Hub(self.gate))
    }
}

impl<C: Checks, S> Layer<S> for Stack<C> {
    type Service = Guarded<C, S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckLayer::from_parts(self.checks.clone(), Resolver::Hub(self.gate.clone())).layer(inner)
    }
}

/// A fused [`Stack`] with the hub's audit layer around it ([`Stack::audit`]).
#[cfg(feature = "audit")]
#[derive(Clone, Debug)]
pub struct Audited<C> {
    audit: crate::audit::AuditLayer,
    stack: Stack<C>,
}

#[cfg(feature = "audit")]
impl<C> Audited<C> {
    /// The audit layer (its auditor: flush, shutdown, counters).
    pub fn audit_layer(&self) -> &crate::audit::AuditLayer {
        &self.audit
    }
}

#[cfg(feature = "audit")]
impl<C: Checks, S> Layer<S> for Audited<C> {
    type Service = crate::audit::Audit<Guarded<C, S>>;

    fn layer(&self, inner: S) -> Self::Service {
        self.audit.layer(self.stack.layer(inner))
    }
}
