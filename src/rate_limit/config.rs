//! The rate limit's configuration and the state its checks share: built and validated
//! here, read by the check ([`super::service`]) and wrapped by the layer ([`super::layer`]).
//! Neither of those two imports the other's module.

use std::fmt;
use std::sync::Arc;

use dashmap::DashMap;
use http::HeaderValue;

use super::limiter::{Limiter, LimiterClock, Shape, ShapeError, ShapeHash};
use crate::core::rate::RateBackend;
use crate::core::usage::{write_policy_item, FieldSink};
use crate::cost::{ConfigError, Cost, CostFn, RequestHead};
use crate::RateLimitPolicy;

/// Checks that `policy` can be enforced by [`RateLimitLayer`](super::RateLimitLayer): a name of 1 to 64
/// `[A-Za-z0-9_-]`, a limit of at least 1, a period of at most 366 days and no more than one
/// unit per nanosecond. Key-issuing code calls it so a bad policy is refused when the key is
/// built; a stored record that slips through is enforced fail-closed (every request refused).
pub fn validate_policy(policy: &RateLimitPolicy) -> Result<(), ConfigError> {
    let name = &policy.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(ConfigError::InvalidName(name.chars().take(64).collect()));
    }
    Shape::of(policy).map_err(|e| invalid(policy, e))?;
    Ok(())
}

fn invalid(policy: &RateLimitPolicy, e: ShapeError) -> ConfigError {
    ConfigError::InvalidPolicy {
        name: policy.name.chars().take(64).collect(),
        reason: e.reason(),
    }
}

fn validate_set(policies: &[RateLimitPolicy]) -> Result<(), ConfigError> {
    for (i, p) in policies.iter().enumerate() {
        validate_policy(p)?;
        if policies[..i].iter().any(|q| q.name == p.name) {
            return Err(ConfigError::DuplicateName(p.name.clone()));
        }
    }
    Ok(())
}

/// How a [`RateLimitLayer`](super::RateLimitLayer) limits. Every setting has a default; invalid values are refused
/// when the layer is built.
///
/// | setting | default |
/// |---|---|
/// | [`default_policies`](Self::default_policies) (keys whose record has none) | `default`: 100 per second |
/// | [`anonymous_policies`](Self::anonymous_policies) (requests without a principal, per client address) | `anonymous`: 10 per second |
/// | [`cost`](Self::cost) | 1 per request |
/// | [`headers`](Self::headers) (`RateLimit-Policy` / `RateLimit` on every response) | on |
/// | [`clock`](Self::clock) | monotonic |
/// | [`ipv6_prefix`](Self::ipv6_prefix) | 64 |
/// | [`max_tracked_addresses`](Self::max_tracked_addresses) | 262,144 per policy shape |
/// | [`housekeeping_every`](Self::housekeeping_every) | 65,536 new subjects |
/// | [`backend`](Self::backend) (state shared by replicas) | none: in-process GCRA |
/// | [`fallback`](Self::fallback) (when the backend fails) | [`Fallback::Deny`] (503 `store_unavailable`) |
#[derive(Clone)]
pub struct RateLimitConfig {
    pub(crate) defaults: Vec<RateLimitPolicy>,
    pub(crate) anonymous: Vec<RateLimitPolicy>,
    pub(crate) cost: Option<CostFn>,
    pub(crate) headers: bool,
    pub(crate) clock: LimiterClock,
    pub(crate) ipv6_prefix: u8,
    pub(crate) max_tracked_addresses: usize,
    pub(crate) housekeeping_every: usize,
    pub(crate) backend: Option<Arc<dyn RateBackend>>,
    pub(crate) fallback: Fallback,
}

/// What a [`RateLimitLayer`](super::RateLimitLayer) with a [backend](RateLimitConfig::backend) does when the
/// backend cannot answer ([`RateError::Unavailable`](crate::core::rate::RateError)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fallback {
    /// Refuse the request: 503 `store_unavailable` with `Retry-After: 1` (gRPC UNAVAILABLE).
    /// Fail closed; the default.
    #[default]
    Deny,
    /// Limit in-process (this replica's own GCRA state, with the same policies) until the
    /// backend answers again. Stays available, but while it lasts each replica allows the
    /// whole limit, so `n` replicas allow up to `n` times it.
    Local,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            defaults: vec![RateLimitPolicy::per_second("default", 100)],
            anonymous: vec![RateLimitPolicy::per_second("anonymous", 10)],
            cost: None,
            headers: true,
            clock: LimiterClock::default(),
            ipv6_prefix: 64,
            max_tracked_addresses: 1 << 18,
            housekeeping_every: 1 << 16,
            backend: None,
            fallback: Fallback::Deny,
        }
    }
}

impl RateLimitConfig {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// The policies of keys whose record has none (an empty list: such keys are not
    /// limited).
    pub fn default_policies(mut self, policies: impl IntoIterator<Item = RateLimitPolicy>) -> Self {
        self.defaults = policies.into_iter().collect();
        self
    }

    /// The policies of requests without a principal (no key, or a key that failed to
    /// resolve), counted per client address so guessing keys is slow. An empty list: such
    /// requests are not limited.
    ///
    /// IPv4 clients are counted per address, IPv6 clients per prefix (see
    /// [`ipv6_prefix`](Self::ipv6_prefix)); requests whose address is unknown all share one
    /// bucket (`unknown`), and so do new addresses while
    /// [`max_tracked_addresses`](Self::max_tracked_addresses) are tracked (`overflow`).
    pub fn anonymous_policies(
        mut self,
        policies: impl IntoIterator<Item = RateLimitPolicy>,
    ) -> Self {
        self.anonymous = policies.into_iter().collect();
        self
    }

    /// How many units of every policy a request uses (default 1). A cost of 0 lets the
    /// request through without counting it; a cost above a policy's limit can never pass
    /// and is refused at once (413 `cost_exceeds_limit`, no `Retry-After`).
    pub fn cost<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Cost + Send + Sync + 'static,
    {
        self.cost = Some(Arc::new(f));
        self
    }

    /// Charges every policy in bytes: [`ByBytes::cost`](crate::cost::ByBytes::cost)
    /// as the [`cost`](Self::cost) function (policies' limits are then in `unit`s of bytes
    /// per period).
    pub fn cost_in_bytes(self, bytes: crate::cost::ByBytes) -> Self {
        self.cost(move |head| bytes.cost(head))
    }

    /// Whether successful responses carry `RateLimit-Policy` and `RateLimit` (default on).
    /// Rejections always carry them.
    pub fn headers(mut self, yes: bool) -> Self {
        self.headers = yes;
        self
    }

    /// The clock rate limits read (default: monotonic).
    pub fn clock(mut self, clock: LimiterClock) -> Self {
        self.clock = clock;
        self
    }

    /// The IPv6 prefix length anonymous requests are counted by (1 to 64, default 64: one
    /// host usually holds a whole /64).
    pub fn ipv6_prefix(mut self, len: u8) -> Self {
        self.ipv6_prefix = len;
        self
    }

    /// The most client addresses tracked per policy shape; beyond it, new addresses share
    /// the `overflow` bucket until housekeeping frees room. Bounds memory under address
    /// sprays.
    pub fn max_tracked_addresses(mut self, n: usize) -> Self {
        self.max_tracked_addresses = n;
        self
    }

    /// Runs housekeeping (drop subjects whose state is back to fresh, shrink the maps)
    /// after every `n` new subjects, on the request that crosses the mark.
    pub fn housekeeping_every(mut self, n: usize) -> Self {
        self.housekeeping_every = n;
        self
    }

    /// Keeps rate-limit state in `backend` instead of in-process, so replicas sharing it
    /// enforce one limit together (`keygate::redis::RedisRateLimiter`). Every request with
    /// policies then costs one backend call (an async step), unless the backend's
    /// [`precheck`](RateBackend::precheck) refuses it at once. Policies, costs, fields and
    /// all-or-nothing counting behave as in-process (the backend decides every policy of a
    /// request in one call). A free request (cost 0) asks the backend only for the fields,
    /// and not at all when [`headers`](Self::headers) are off.
    pub fn backend(mut self, backend: impl RateBackend) -> Self {
        self.backend = Some(Arc::new(backend));
        self
    }

    /// What to do when the backend cannot answer (default [`Fallback::Deny`]).
    pub fn fallback(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        validate_set(&self.defaults)?;
        validate_set(&self.anonymous)?;
        if !(1..=64).contains(&self.ipv6_prefix) {
            return Err(ConfigError::InvalidIpv6Prefix(self.ipv6_prefix));
        }
        if self.max_tracked_addresses == 0 {
            return Err(ConfigError::Zero("max_tracked_addresses"));
        }
        if self.housekeeping_every == 0 {
            return Err(ConfigError::Zero("housekeeping_every"));
        }
        Ok(())
    }
}

impl fmt::Debug for RateLimitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitConfig")
            .field("defaults", &self.defaults)
            .field("anonymous", &self.anonymous)
            .field("cost", &self.cost.as_ref().map(|_| "fn"))
            .field("headers", &self.headers)
            .field("clock", &self.clock)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("max_tracked_addresses", &self.max_tracked_addresses)
            .field("housekeeping_every", &self.housekeeping_every)
            .field("backend", &self.backend.as_ref().map(|_| "dyn RateBackend"))
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// A configured policy set (defaults or anonymous), resolved to limiters once.
pub(crate) struct PolicySet {
    pub(crate) entries: Vec<(RateLimitPolicy, Arc<Limiter>)>,
    /// The policies alone (what a backend is asked about).
    pub(crate) policies: Vec<RateLimitPolicy>,
    /// The `RateLimit-Policy` field of the set, formatted once.
    pub(crate) policy_field: Option<HeaderValue>,
}

/// State shared by every clone of the layer and its services.
pub(crate) struct Shared {
    pub(crate) limiters: DashMap<Shape, Arc<Limiter>, ShapeHash>,
    pub(crate) defaults: PolicySet,
    pub(crate) anonymous: PolicySet,
    pub(crate) cost: Option<CostFn>,
    pub(crate) headers: bool,
    pub(crate) ipv6_prefix: u8,
    /// Shared state, when configured (otherwise the limiters above decide).
    pub(crate) backend: Option<Arc<dyn RateBackend>>,
    pub(crate) fallback: Fallback,
    clock: LimiterClock,
    max_tracked_addresses: usize,
    housekeeping_every: usize,
}

impl Shared {
    pub(super) fn new(config: RateLimitConfig) -> Result<Shared, ConfigError> {
        config.validate()?;
        let mut shared = Shared {
            limiters: DashMap::default(),
            defaults: PolicySet {
                entries: Vec::new(),
                policies: Vec::new(),
                policy_field: None,
            },
            anonymous: PolicySet {
                entries: Vec::new(),
                policies: Vec::new(),
                policy_field: None,
            },
            cost: config.cost,
            headers: config.headers,
            ipv6_prefix: config.ipv6_prefix,
            backend: config.backend,
            fallback: config.fallback,
            clock: config.clock,
            max_tracked_addresses: config.max_tracked_addresses,
            housekeeping_every: config.housekeeping_every,
        };
        shared.defaults = shared.set(config.defaults)?;
        shared.anonymous = shared.set(config.anonymous)?;
        Ok(shared)
    }

    fn set(&self, policies: Vec<RateLimitPolicy>) -> Result<PolicySet, ConfigError> {
        let mut entries = Vec::with_capacity(policies.len());
        let list = policies.clone();
        for p in policies {
            let shape = Shape::of(&p).map_err(|e| invalid(&p, e))?;
            let limiter = self.limiter(shape);
            entries.push((p, limiter));
        }
        let mut field = crate::traffic::FieldBuf::new();
        for (i, (p, _)) in entries.iter().enumerate() {
            if i > 0 {
                field.push_str(", ");
            }
            write_policy_item(&mut field, &p.name, u64::from(p.limit), Some(p.period));
        }
        let policy_field = (!entries.is_empty()).then(|| field.to_header()).flatten();
        Ok(PolicySet {
            entries,
            policies: list,
            policy_field,
        })
    }

    /// The limiter of `shape`, made on first use.
    pub(crate) fn limiter(&self, shape: Shape) -> Arc<Limiter> {
        if let Some(l) = self.limiters.get(&shape) {
            return l.clone();
        }
        self.limiters
            .entry(shape)
            .or_insert_with(|| {
                Arc::new(Limiter::new(
                    shape,
                    self.clock.clone(),
                    self.max_tracked_addresses,
                    self.housekeeping_every,
                ))
            })
            .clone()
    }

    pub(crate) fn housekeeping(&self) {
        let limiters: Vec<Arc<Limiter>> = self.limiters.iter().map(|l| l.clone()).collect();
        for l in limiters {
            l.housekeeping();
        }
    }

    pub(crate) fn tracked(&self) -> usize {
        self.limiters.iter().map(|l| l.tracked()).sum()
    }
}
