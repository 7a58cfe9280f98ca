use std::sync::Arc;

use tower_layer::Layer;

use super::rules::{InvalidRule, PathPattern, RouteScopes};
use super::service::{Policy, Scope, ScopeCheck};
use crate::check::{CheckLayer, One, Resolver};
use crate::reject::Renderer;
use crate::KeyGate;

/// Layer that applies [`Scope`]: checks the caller's scopes and resource patterns.
///
/// Built with [`ScopeLayer::require`] (one scope, per route) or [`ScopeLayer::table`] (a
/// route table). By default it only reads the principal an earlier layer resolved (and
/// denies `missing_key` without one); [`ScopeLayer::with_gate`] lets it resolve the key
/// itself through the hub, so it works in any position and even without the auth layer.
#[derive(Clone, Debug)]
pub struct ScopeLayer {
    policy: Arc<Policy>,
    resolver: Resolver,
}

impl ScopeLayer {
    /// Every request needs `scope` (`points:write`). An invalid scope is an error now.
    pub fn require(scope: &str) -> Result<Self, InvalidRule> {
        Ok(Self::from_policy(Policy::Require {
            scope: crate::Scope::parse(scope)?,
            resource: None,
        }))
    }

    /// Also checks the resource named by path parameter `param` of `pattern` (for
    /// `require`): `require("points:write")?.resource_in_path("/collections/{collection}/points", "collection")?`.
    /// A request whose path does not match the pattern is denied `resource_forbidden`.
    /// On a layer built with [`ScopeLayer::table`] it is an error (tables name their
    /// resource parameter per rule).
    pub fn resource_in_path(self, pattern: &str, param: &str) -> Result<Self, InvalidRule> {
        let Policy::Require { scope, .. } = &*self.policy else {
            return Err(InvalidRule::Pattern {
                pattern: pattern.chars().take(128).collect(),
                reason: "resource_in_path applies to ScopeLayer::require, not to route tables",
            });
        };
        let pattern = PathPattern::parse(pattern)?;
        if !pattern.has_param(param) {
            return Err(InvalidRule::Pattern {
                pattern: format!("{pattern:?}"),
                reason: "the pattern has no such parameter",
            });
        }
        Ok(ScopeLayer {
            policy: Arc::new(Policy::Require {
                scope: scope.clone(),
                resource: Some((pattern, param.into())),
            }),
            resolver: self.resolver,
        })
    }

    /// Checks every request against a route table.
    pub fn table(rules: RouteScopes) -> Self {
        Self::from_policy(Policy::Table(rules))
    }

    fn from_policy(policy: Policy) -> Self {
        ScopeLayer {
            policy: Arc::new(policy),
            resolver: Resolver::standalone(),
        }
    }

    /// Resolves the principal through `gate` when no earlier layer has (memoized: the key
    /// is verified once per request), and renders denials with the gate's renderer.
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        self.resolver = Resolver::Hub(gate.clone());
        self
    }

    /// The check this layer runs (for a fused [`Stack`](crate::stack::Stack)).
    pub fn check(&self) -> ScopeCheck {
        ScopeCheck::new(self.policy.clone())
    }

    /// Renders denials with `renderer` (for a layer built without the hub).
    pub fn renderer(mut self, renderer: impl Renderer) -> Self {
        if let Resolver::Extensions(_) = self.resolver {
            self.resolver = Resolver::Extensions(Arc::new(renderer));
        }
        self
    }
}

impl<S> Layer<S> for ScopeLayer {
    type Service = Scope<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckLayer::from_parts(One(self.check()), self.resolver.clone()).layer(inner)
    }
}
