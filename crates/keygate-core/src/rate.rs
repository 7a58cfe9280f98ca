//! Shared rate-limit state: the [`RateBackend`] trait a rate limiter consults instead of its
//! in-process GCRA state, so several replicas enforce one limit together.
//!
//! The `keygate` crate's `RateLimitLayer` keeps per-process GCRA state by default. Given a
//! backend (crate `keygate-redis` provides one on Redis), it asks the backend instead: one
//! call per request, deciding every named policy of the request at once, all or nothing.
//!
//! ```
//! use keygate_core::rate::{RateBackend, RateDecision, RateError, RateStanding, RateSubject};
//! use keygate_core::RateLimitPolicy;
//! use std::time::Duration;
//!
//! /// A backend that lets everything through (for illustration).
//! struct Open;
//!
//! #[async_trait::async_trait]
//! impl RateBackend for Open {
//!     async fn check(&self, _: RateSubject, policies: &[RateLimitPolicy], _: u32) -> Result<RateDecision, RateError> {
//!         let standings = policies
//!             .iter()
//!             .map(|p| RateStanding { remaining: u64::from(p.limit), reset_after: Duration::ZERO, wait: Some(Duration::ZERO) })
//!             .collect();
//!         Ok(RateDecision { allowed: true, standings })
//!     }
//!     fn refund(&self, _: RateSubject, _: &[RateLimitPolicy], _: u32) {}
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let d = Open.check(RateSubject::Unknown, &[RateLimitPolicy::per_second("burst", 5)], 1).await.unwrap();
//! assert!(d.allowed);
//! assert_eq!(d.standings[0].remaining, 5);
//! # }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::key::KeyId;
use crate::record::RateLimitPolicy;

/// Who a rate limit counts for: a key by its resolved id, or, for requests without a
/// principal, the client address (IPv4 whole, IPv6 by prefix) or one shared bucket for
/// requests whose address is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateSubject {
    /// A key, by its id.
    Key(KeyId),
    /// An IPv4 address (as a number).
    Ipv4(u32),
    /// The first 64 bits of an IPv6 address, masked to the limiter's prefix length.
    Ipv6(u64),
    /// A request whose client address is unknown.
    Unknown,
}

impl fmt::Display for RateSubject {
    /// A stable, compact token for store keys: `k:<id>`, `4:<8 hex>`, `6:<16 hex>`, `u`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateSubject::Key(id) => write!(f, "k:{id}"),
            RateSubject::Ipv4(a) => write!(f, "4:{a:08x}"),
            RateSubject::Ipv6(p) => write!(f, "6:{p:016x}"),
            RateSubject::Unknown => f.write_str("u"),
        }
    }
}

/// Where one policy stands for one subject, as a backend reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStanding {
    /// Units left now (after counting, when the request was allowed).
    pub remaining: u64,
    /// How long until the whole limit is available again.
    pub reset_after: Duration,
    /// How long until the request's cost would fit in this policy: zero when it fits now
    /// (always zero for an allowed request), `None` when it never can (the cost is above the
    /// policy's limit).
    pub wait: Option<Duration>,
}

impl RateStanding {
    /// Whether this policy is one a refused request broke (its cost did not fit).
    pub fn violated(&self) -> bool {
        self.wait != Some(Duration::ZERO)
    }
}

/// A backend's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether every policy had room: the cost was then counted in every policy. When not,
    /// nothing was counted.
    pub allowed: bool,
    /// One standing per policy of the call, in the call's order.
    pub standings: Vec<RateStanding>,
}

impl RateDecision {
    /// How long a refused request should wait before trying again: the longest wait of the
    /// policies it broke; `None` when one of them can never fit the cost (or the request
    /// was allowed).
    pub fn retry_after(&self) -> Option<Duration> {
        if self.allowed {
            return None;
        }
        let mut wait = Duration::ZERO;
        for s in self.standings.iter().filter(|s| s.violated()) {
            wait = wait.max(s.wait?);
        }
        Some(wait)
    }
}

/// Why a backend could not decide.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateError {
    /// The backend could not be reached or did not answer in time. The rate limiter then
    /// applies its failure policy (deny with `store_unavailable`, or limit in-process).
    #[error("rate-limit backend unavailable: {0}")]
    Unavailable(String),
    /// A policy cannot be enforced by this backend (for example finer than its time
    /// resolution). The request is refused (`rate_limited`), as for any invalid policy.
    #[error("rate-limit policy {name:?} cannot be enforced by this backend: {reason}")]
    InvalidPolicy {
        /// The policy's name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Rate-limit state kept outside the process (shared by replicas).
///
/// The algorithm is the backend's; keygate's Redis backend runs GCRA with the same
/// arithmetic as the in-process limiter (a policy of `limit` per `period` allows bursts of
/// `limit` and one unit every `period / limit`). Policies of the same shape (limit and
/// period) share state, as in-process: their names only label the fields.
#[async_trait]
pub trait RateBackend: Send + Sync + 'static {
    /// Counts `cost` (at least 1) for `subject` in every one of `policies`, all or nothing:
    /// if every policy has room the cost is counted in each and the decision is allowed;
    /// otherwise nothing is counted. A cost above a policy's limit is refused with a `None`
    /// wait for that policy. The standings follow the order of `policies`.
    async fn check(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError>;

    /// A refusal decided without I/O, when the backend already knows that `subject` has no
    /// room for `cost` in one of `policies` (it saw that state in an earlier answer), so a
    /// caller far over its limit does not cost a round trip. `None`: ask [`check`](Self::check).
    /// Never returns an allowed decision. The default knows nothing.
    fn precheck(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        let _ = (subject, policies, cost);
        None
    }

    /// A decision made without I/O, allowed or refused: what the rate-limit layer asks
    /// first. A backend that leases allowances (keygate's Redis backend with leases) answers
    /// from its lease; `None`: ask [`check`](Self::check). An allowed answer has counted
    /// `cost` as [`check`](Self::check) would. The default is [`precheck`](Self::precheck)
    /// (refusals only).
    fn try_local(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        self.precheck(subject, policies, cost)
    }

    /// [`try_local`](Self::try_local) with a subject per policy, as in
    /// [`check_each`](Self::check_each). The default is
    /// [`precheck_each`](Self::precheck_each).
    fn try_local_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        self.precheck_each(subjects, policies, cost)
    }

    /// [`check`](Self::check) with a subject per policy (`subjects[i]` for
    /// `policies[i]`): what the rate-limit layer asks for a key whose identity has limits
    /// of its own (those count under the identity's
    /// [`usage_id`](crate::Identity::usage_id), the others under the key). Still all or
    /// nothing, and the standings follow the order of `policies`.
    ///
    /// The default asks [`check`](Self::check) once per distinct subject, in order of
    /// first appearance; when one refuses, what the earlier ones counted is given back
    /// ([`refund`](Self::refund)) and the subjects after it are not asked (their standings
    /// read as full, not violated). Between the two calls another request may see the
    /// first subject's count: errs toward refusing. A backend that can decide every
    /// subject in one step (keygate's Redis backend does) overrides it.
    async fn check_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        let mut distinct: Vec<RateSubject> = Vec::new();
        for s in subjects {
            if !distinct.contains(s) {
                distinct.push(*s);
            }
        }
        if distinct.len() <= 1 {
            let subject = distinct.first().copied().unwrap_or(RateSubject::Unknown);
            return self.check(subject, policies, cost).await;
        }
        let full = |p: &RateLimitPolicy| RateStanding {
            remaining: u64::from(p.limit),
            reset_after: Duration::ZERO,
            wait: Some(Duration::ZERO),
        };
        let mut standings: Vec<RateStanding> = policies.iter().map(full).collect();
        let mut counted: Vec<(RateSubject, Vec<RateLimitPolicy>)> = Vec::new();
        for subject in distinct {
            let (index, group): (Vec<usize>, Vec<RateLimitPolicy>) = subjects
                .iter()
                .zip(policies)
                .enumerate()
                .filter(|(_, (s, _))| **s == subject)
                .map(|(i, (_, p))| (i, p.clone()))
                .unzip();
            let decision = match self.check(subject, &group, cost).await {
                Ok(d) => d,
                Err(e) => {
                    for (s, g) in &counted {
                        self.refund(*s, g, cost);
                    }
                    return Err(e);
                }
            };
            for (i, standing) in index.iter().zip(&decision.standings) {
                if let Some(slot) = standings.get_mut(*i) {
                    *slot = *standing;
                }
            }
            if !decision.allowed {
                for (s, g) in &counted {
                    self.refund(*s, g, cost);
                }
                return Ok(RateDecision {
                    allowed: false,
                    standings,
                });
            }
            counted.push((subject, group));
        }
        Ok(RateDecision {
            allowed: true,
            standings,
        })
    }

    /// [`precheck`](Self::precheck) with a subject per policy, as in
    /// [`check_each`](Self::check_each). The default pre-checks only calls with one
    /// subject.
    fn precheck_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        let first = *subjects.first()?;
        if subjects.iter().all(|s| *s == first) {
            self.precheck(first, policies, cost)
        } else {
            None
        }
    }

    /// Gives back `cost` counted for `subject` in `policies` by an allowed
    /// [`check`](Self::check). keygate's `RateLimitLayer` does not call it (every request
    /// counts, whether or not another layer then refuses it); it is there for custom layers
    /// that want to give capacity back. Returns at once;
    /// the backend may finish in the background, and a refund that cannot be delivered is
    /// lost (the subject keeps the cost counted: errs toward refusing).
    fn refund(&self, subject: RateSubject, policies: &[RateLimitPolicy], cost: u32);
}

#[async_trait]
impl<T: RateBackend + ?Sized> RateBackend for Arc<T> {
    async fn check(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        (**self).check(subject, policies, cost).await
    }

    fn precheck(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        (**self).precheck(subject, policies, cost)
    }

    async fn check_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Result<RateDecision, RateError> {
        (**self).check_each(subjects, policies, cost).await
    }

    fn precheck_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        (**self).precheck_each(subjects, policies, cost)
    }

    fn try_local(
        &self,
        subject: RateSubject,
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        (**self).try_local(subject, policies, cost)
    }

    fn try_local_each(
        &self,
        subjects: &[RateSubject],
        policies: &[RateLimitPolicy],
        cost: u32,
    ) -> Option<RateDecision> {
        (**self).try_local_each(subjects, policies, cost)
    }

    fn refund(&self, subject: RateSubject, policies: &[RateLimitPolicy], cost: u32) {
        (**self).refund(subject, policies, cost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_stable_tokens() {
        let id = KeyId::parse("AbCdEfGhIjKl").unwrap();
        assert_eq!(RateSubject::Key(id).to_string(), "k:AbCdEfGhIjKl");
        assert_eq!(RateSubject::Ipv4(0x0a00_0001).to_string(), "4:0a000001");
        assert_eq!(
            RateSubject::Ipv6(0x2001_0db8_0001_0002).to_string(),
            "6:20010db800010002"
        );
        assert_eq!(RateSubject::Unknown.to_string(), "u");
    }

    #[test]
    fn retry_after_is_the_longest_violated_wait() {
        let s = |wait: Option<u64>| RateStanding {
            remaining: 0,
            reset_after: Duration::ZERO,
            wait: wait.map(Duration::from_millis),
        };
        let d = RateDecision {
            allowed: false,
            standings: vec![s(Some(0)), s(Some(300)), s(Some(1200))],
        };
        assert_eq!(d.retry_after(), Some(Duration::from_millis(1200)));
        let never = RateDecision {
            allowed: false,
            standings: vec![s(Some(300)), s(None)],
        };
        assert_eq!(never.retry_after(), None);
        let ok = RateDecision {
            allowed: true,
            standings: vec![s(Some(0))],
        };
        assert_eq!(ok.retry_after(), None);
        assert!(!ok.standings[0].violated());
    }
}
