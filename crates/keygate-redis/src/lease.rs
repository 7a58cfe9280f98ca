//! Leased allowances: the settings shared by the rate limiter's and the usage store's leases,
//! the adaptive lease size, and the local clock leases expire on.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use crate::conn::micros;
use crate::rate::TimeSource;

/// How a [`RedisRateLimiter`](crate::RedisRateLimiter) or a
/// [`RedisUsageStore`](crate::RedisUsageStore) leases allowances.
///
/// A replica reserves a slice of a key's allowance in Redis (one script, debited there at
/// once, so the shared limit holds) and spends it locally without a round trip; what it
/// did not spend goes back to Redis when the lease expires (or with the next lease), or is
/// reclaimed by Redis after a crash. The size of a lease follows the key's observed rate:
///
/// `size = clamp(ceil(2 · spent / age · lifetime), 1, cap)`, where `spent / age` is what
/// the previous lease of the same key served per second on this replica (the first lease
/// of a key is `min(cap, 4)`), and `cap = min(limit / max_share, limit / (2 · replicas))`
/// over the limits involved (`replicas`: the replicas that leased in the last 10 s, as
/// Redis counts them), at least 1. A limit below [`min_limit`](Self::min_limit) (or a rate
/// policy named [`precise`](Self::precise)) is never leased: its requests are decided by one
/// script each, as without leases.
///
/// **Under-use bound**: a request is refused only when Redis has no room for it; what other
/// replicas hold unspent at that moment is at most `(replicas − 1) · cap` per key (and the
/// refusing replica's own unspent lease, if any, is returned with its refill). So while
/// every replica has demand, a key gets at least `limit − replicas · cap` units per period
/// and never more than `limit`. Unspent units come back within one lease lifetime
/// (a crashed replica's after the Redis-side expiry, see the store).
///
/// **How long a change takes to bite**: a lease is tied to the limits it was taken for;
/// a request under another policy (a lowered limit, a role change) does not spend it, so
/// a change bites on the first request that sees it. A revoked key is refused by the
/// verifier before any limit is consulted. What a lease does delay, by at most its
/// lifetime, is a change made to the state in Redis itself (a hold after Redis lost the
/// state, an operator clearing a key): a replica spends what it already holds first.
#[derive(Debug, Clone)]
pub struct LeaseOptions {
    pub(crate) lifetime: Duration,
    pub(crate) min_limit: u64,
    pub(crate) max_share: u64,
    pub(crate) precise: HashSet<String>,
}

impl Default for LeaseOptions {
    fn default() -> Self {
        LeaseOptions::new()
    }
}

impl LeaseOptions {
    /// The defaults for rate limits: leases live at most 1 s (and at most a tenth of the
    /// policy's period), limits below 20 are not leased, a lease is at most a tenth of the
    /// limit.
    pub fn new() -> Self {
        LeaseOptions {
            lifetime: Duration::from_secs(1),
            min_limit: 20,
            max_share: 10,
            precise: HashSet::new(),
        }
    }

    /// The defaults for quotas: leases live 1 s, quotas below 1000 are not leased, a lease is
    /// at most a hundredth of the quota (what a crashed replica can make a key lose).
    pub fn for_quotas() -> Self {
        LeaseOptions {
            lifetime: Duration::from_secs(1),
            min_limit: 1000,
            max_share: 100,
            precise: HashSet::new(),
        }
    }

    /// How long a lease may be spent locally (default 1 s; at least 1 ms). For rate limits,
    /// also at most a tenth of the policy's period.
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime.max(Duration::from_millis(1));
        self
    }

    /// Limits below this are never leased (decided by one script per request).
    pub fn min_limit(mut self, limit: u64) -> Self {
        self.min_limit = limit;
        self
    }

    /// A lease is at most `limit / share` (default 10 for rate limits, 100 for quotas; at
    /// least 1).
    pub fn max_share(mut self, share: u64) -> Self {
        self.max_share = share.max(1);
        self
    }

    /// Keeps the rate-limit policy named `name` precise: requests under it are decided by one
    /// script each (for tiny limits, where a lease held by one replica would be unfair to
    /// the others). Quotas are chosen by [`min_limit`](Self::min_limit) only.
    pub fn precise(mut self, name: impl Into<String>) -> Self {
        self.precise.insert(name.into());
        self
    }

    /// The largest lease for a limit, `None` when it is not leased.
    pub(crate) fn cap(&self, limit: u64, replicas: u64) -> Option<u64> {
        if limit < self.min_limit {
            return None;
        }
        let by_share = limit / self.max_share;
        let by_replicas = limit / (2 * replicas.max(1));
        Some(by_share.min(by_replicas).max(1))
    }
}

/// The next lease's size: what the last one served per µs over `age`, for twice the
/// lifetime, within `1..=cap`.
pub(crate) fn next_size(cap: u64, spent: u64, age_us: f64, lifetime_us: f64, first: bool) -> u64 {
    if first {
        return cap.clamp(1, 4);
    }
    let age = age_us.max(lifetime_us / 100.0).max(1.0);
    let want = (2.0 * spent as f64 / age * lifetime_us).ceil();
    if !want.is_finite() || want < 1.0 {
        return 1;
    }
    (want as u64).clamp(1, cap.max(1))
}

/// The clock leases expire on: the time source's clock, or a monotonic count from `origin`.
#[derive(Clone)]
pub(crate) struct LocalClock {
    pub(crate) time: TimeSource,
    pub(crate) origin: Instant,
}

impl LocalClock {
    /// Now, in µs.
    pub(crate) fn now(&self) -> u64 {
        match &self.time {
            TimeSource::Server => micros(self.origin.elapsed()),
            TimeSource::Clock(c) => micros(c.now().duration_since(UNIX_EPOCH).unwrap_or_default()),
        }
    }

    /// The script's `now` argument: empty for the server's clock.
    pub(crate) fn script_now(&self) -> String {
        match &self.time {
            TimeSource::Server => String::new(),
            TimeSource::Clock(_) => self.now().to_string(),
        }
    }
}

/// A replica's id in Redis's count of leasing replicas.
pub(crate) fn replica_id() -> String {
    format!("{:016x}", crate::epoch::new_token())
}

/// Runs `sweep` every `every` (real time) while `owner` lives.
pub(crate) fn spawn_sweeper<T: Send + Sync + 'static, F, Fut>(
    owner: &Arc<T>,
    every: Duration,
    sweep: F,
) where
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(owner);
    rt.spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(owner) = weak.upgrade() else { return };
            sweep(owner).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_follow_the_limit_and_the_replicas() {
        let o = LeaseOptions::new();
        assert_eq!(o.cap(5, 1), None, "a tiny limit is not leased");
        assert_eq!(o.cap(19, 1), None);
        assert_eq!(o.cap(20, 1), Some(2));
        assert_eq!(o.cap(10_000, 3), Some(1000));
        assert_eq!(o.cap(10_000, 10), Some(500), "limit / (2 · replicas)");
        let q = LeaseOptions::for_quotas();
        assert_eq!(q.cap(999, 1), None);
        assert_eq!(q.cap(1_000_000, 3), Some(10_000));
    }

    #[test]
    fn sizes_follow_the_observed_rate() {
        // First lease: small.
        assert_eq!(next_size(1000, 0, 0.0, 1e6, true), 4);
        assert_eq!(next_size(2, 0, 0.0, 1e6, true), 2);
        // 100 spent in 10 ms (10k/s) with a 1 s lifetime: capped.
        assert_eq!(next_size(1000, 100, 10_000.0, 1e6, false), 1000);
        // 5 spent over a whole second: 10.
        assert_eq!(next_size(1000, 5, 1e6, 1e6, false), 10);
        // Idle: 1.
        assert_eq!(next_size(1000, 0, 1e6, 1e6, false), 1);
    }
}
