//! The GCRA state behind [`RateLimitLayer`](super::RateLimitLayer): one governor keyed rate
//! limiter per policy shape (limit, period), all keyed by [`Subject`], sharing one clock.

use std::cell::Cell;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{
    Clock as GovernorClock, FakeRelativeClock, QuantaClock, QuantaInstant, Reference,
};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};

use crate::{Clock, KeyId, ManualClock, RateLimitPolicy};

/// The longest period a rate limit may have (366 days); longer allowances are quotas.
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 86_400);

/// The clock rate limits read: a monotonic clock (the default), or, for tests, keygate's
/// [`ManualClock`] or governor's `FakeRelativeClock`. Clones share the same time source.
#[derive(Clone)]
pub struct LimiterClock(ClockKind);

#[derive(Clone)]
enum ClockKind {
    Monotonic(QuantaClock, QuantaInstant),
    Manual(ManualClock),
    Fake(FakeRelativeClock),
}

impl LimiterClock {
    /// A monotonic clock (governor's quanta clock): never goes back with the wall clock.
    pub fn monotonic() -> Self {
        let clock = QuantaClock::default();
        let origin = clock.now();
        LimiterClock(ClockKind::Monotonic(clock, origin))
    }

    /// Reads keygate's [`ManualClock`], so one clock drives expiry, quotas and rate limits in
    /// tests. Moving it backwards freezes rate limits until it passes the old time again.
    pub fn manual(clock: ManualClock) -> Self {
        LimiterClock(ClockKind::Manual(clock))
    }

    /// Reads governor's `FakeRelativeClock`.
    pub fn fake(clock: FakeRelativeClock) -> Self {
        LimiterClock(ClockKind::Fake(clock))
    }
}

impl Default for LimiterClock {
    fn default() -> Self {
        Self::monotonic()
    }
}

impl fmt::Debug for LimiterClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.0 {
            ClockKind::Monotonic(..) => "monotonic",
            ClockKind::Manual(_) => "manual",
            ClockKind::Fake(_) => "fake",
        };
        f.debug_tuple("LimiterClock").field(&kind).finish()
    }
}

impl GovernorClock for LimiterClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match &self.0 {
            ClockKind::Monotonic(clock, origin) => clock.now().duration_since(*origin),
            ClockKind::Manual(clock) => {
                let since = clock
                    .now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO);
                Nanos::from(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
            }
            ClockKind::Fake(clock) => clock.now(),
        }
    }
}

/// Who a rate limit counts for: a key (by its resolved id), or, for requests without a
/// principal, the client address (IPv6 by prefix), an unknown address, or the overflow
/// bucket once too many addresses are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Subject {
    Key(KeyId),
    V4(u32),
    /// The first 64 bits of an IPv6 address, masked to the configured prefix.
    V6(u64),
    Unknown,
    Overflow,
}

impl Subject {
    pub(crate) fn of_addr(ip: Option<IpAddr>, v6_prefix: u8) -> Subject {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Subject::V4(u32::from(v4)),
            Some(IpAddr::V6(v6)) => {
                let high = (u128::from(v6) >> 64) as u64;
                let mask = u64::MAX.checked_shl(64 - u32::from(v6_prefix)).unwrap_or(0);
                Subject::V6(high & mask)
            }
            None => Subject::Unknown,
        }
    }

    fn is_address(&self) -> bool {
        matches!(self, Subject::V4(_) | Subject::V6(_))
    }
}

/// The key governor's limiters are asked about: the subject, plus a slot where the store
/// leaves the theoretical arrival time it wrote (for the `RateLimit` field). Equality and
/// hashing look at the subject only.
#[derive(Clone)]
pub(crate) struct Probe {
    subject: Subject,
    tat: Cell<u64>,
    /// The clock reading of the decision (schedules housekeeping when full).
    now: u64,
}

impl PartialEq for Probe {
    fn eq(&self, other: &Self) -> bool {
        self.subject == other.subject
    }
}
impl Eq for Probe {}
impl Hash for Probe {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.subject.hash(state)
    }
}

/// A concurrent map from subject to GCRA state (theoretical arrival time, nanoseconds since
/// the limiter started; 0 means fresh), shared between the governor limiter and keygate's
/// bookkeeping (refunds, reports, housekeeping).
#[derive(Clone)]
pub(crate) struct Store(Arc<StoreInner>);

struct StoreInner {
    map: DashMap<Subject, AtomicU64>,
    /// Entries inserted since creation (schedules housekeeping).
    inserted: AtomicUsize,
    /// Entries now (approximate between housekeepings).
    live: AtomicUsize,
    /// Set when housekeeping should run after the current decision.
    due: AtomicBool,
    max_addresses: usize,
    every: usize,
    /// While full: the clock reading before which no new housekeeping is asked for, and
    /// the gap between two (one unit's interval), so a flood of new addresses cannot make
    /// every request scan the map.
    full_retry_at: AtomicU64,
    full_gap: u64,
}

fn cas_loop<T, E>(
    cell: &AtomicU64,
    probe: &Probe,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let mut prev = cell.load(Ordering::Acquire);
    loop {
        let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
        let next = next.as_u64();
        match cell.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                probe.tat.set(next);
                return Ok(result);
            }
            Err(now) => prev = now,
        }
    }
}

impl StateStore for Store {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, key: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let inner = &*self.0;
        if let Some(cell) = inner.map.get(&key.subject) {
            return cas_loop(&cell, key, f);
        }
        let mut subject = key.subject;
        if subject.is_address() && inner.live.load(Ordering::Relaxed) >= inner.max_addresses {
            // Too many addresses tracked at once: new ones share the overflow bucket until
            // housekeeping makes room (asked for at most once per unit interval).
            let at = inner.full_retry_at.load(Ordering::Relaxed);
            if key.now >= at
                && inner
                    .full_retry_at
                    .compare_exchange(
                        at,
                        key.now.saturating_add(inner.full_gap),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                inner.due.store(true, Ordering::Relaxed);
            }
            subject = Subject::Overflow;
        }
        let cell = inner.map.entry(subject).or_insert_with(|| {
            let n = inner.inserted.fetch_add(1, Ordering::Relaxed) + 1;
            inner.live.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(inner.every) {
                inner.due.store(true, Ordering::Relaxed);
            }
            AtomicU64::new(0)
        });
        cas_loop(&cell, key, f)
    }
}

impl ShrinkableKeyedStateStore<Probe> for Store {
    fn retain_recent(&self, drop_below: Nanos) {
        let below = drop_below.as_u64();
        self.0.map.retain(|_, v| v.load(Ordering::Relaxed) > below);
        self.0.live.store(self.0.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.map.len()
    }

    fn is_empty(&self) -> bool {
        self.0.map.is_empty()
    }
}

/// Hashes [`Shape`]s (chosen by administrators, not clients) with a multiply-xorshift instead
/// of SipHash: the shape map is looked up on every request of a key with its own policies.
#[derive(Clone, Copy, Default)]
pub(crate) struct ShapeHasher(u64);

impl Hasher for ShapeHasher {
    fn finish(&self) -> u64 {
        let x = self.0 ^ (self.0 >> 29);
        x.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (x >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The [`BuildHasher`](std::hash::BuildHasher) of the shape map.
pub(crate) type ShapeHash = std::hash::BuildHasherDefault<ShapeHasher>;

/// A policy's shape: what the GCRA state depends on. Policies of the same shape share a
/// limiter (their names only label the fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub(crate) limit: u32,
    pub(crate) period: Duration,
}

/// Why a rate-limit policy is unusable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShapeError {
    ZeroLimit,
    ZeroPeriod,
    TooLong,
    TooFine,
}

impl ShapeError {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            ShapeError::ZeroLimit => "the limit must be at least 1",
            ShapeError::ZeroPeriod => "the period must not be zero",
            ShapeError::TooLong => {
                "the period must be at most 366 days (use a quota for longer windows)"
            }
            ShapeError::TooFine => {
                "the limit is too large for the period (less than 1 ns per request)"
            }
        }
    }
}

impl Shape {
    pub(crate) fn of(p: &RateLimitPolicy) -> Result<Shape, ShapeError> {
        if p.limit == 0 {
            return Err(ShapeError::ZeroLimit);
        }
        if p.period.is_zero() {
            return Err(ShapeError::ZeroPeriod);
        }
        if p.period > MAX_PERIOD {
            return Err(ShapeError::TooLong);
        }
        if p.period.as_nanos() < u128::from(p.limit) {
            return Err(ShapeError::TooFine);
        }
        Ok(Shape {
            limit: p.limit,
            period: p.period,
        })
    }
}

type Governor = RateLimiter<Probe, Store, LimiterClock, NoOpMiddleware<Nanos>>;

/// One governor limiter: GCRA of one shape over every subject.
pub(crate) struct Limiter {
    gov: Governor,
    store: Store,
    clock: LimiterClock,
    /// The clock reading when the limiter was built (governor's origin, to within the time
    /// between two clock reads).
    start: u64,
    /// Nanoseconds per unit (`period / limit`).
    t: u64,
    pub(crate) shape: Shape,
}

/// Where one subject stands under one limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Standing {
    pub(crate) remaining: u64,
    pub(crate) reset_after: Duration,
}

/// A limiter's answer to a request of some cost.
pub(crate) enum Verdict {
    /// Counted; the new standing.
    Allowed(Standing),
    /// Not counted; how long until this cost could pass.
    Denied(Duration),
}

impl Limiter {
    pub(crate) fn new(
        shape: Shape,
        clock: LimiterClock,
        max_addresses: usize,
        every: usize,
    ) -> Limiter {
        let per = shape.period / shape.limit;
        // Shape::of guarantees a non-zero interval and limit.
        let quota = Quota::with_period(per)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(shape.limit).unwrap_or(NonZeroU32::MIN));
        let store = Store(Arc::new(StoreInner {
            map: DashMap::new(),
            inserted: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            due: AtomicBool::new(false),
            max_addresses: max_addresses.max(1),
            every: every.max(1),
            full_retry_at: AtomicU64::new(0),
            full_gap: u64::try_from(per.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1_000_000),
        }));
        let start = clock.now().as_u64();
        let gov = RateLimiter::new(quota, store.clone(), clock.clone());
        Limiter {
            gov,
            store,
            clock,
            start,
            t: u64::try_from(per.as_nanos()).unwrap_or(u64::MAX).max(1),
            shape,
        }
    }

    fn t0(&self, now: Nanos) -> u64 {
        now.as_u64().saturating_sub(self.start)
    }

    fn standing(&self, tat: u64, t0: u64) -> Standing {
        let used = tat.saturating_sub(t0);
        let limit = u64::from(self.shape.limit);
        let spent = used.div_ceil(self.t).min(limit);
        Standing {
            remaining: limit - spent,
            reset_after: Duration::from_nanos(used),
        }
    }

    /// Checks and counts `cost` (at least 1, at most the limit) for `subject` through
    /// governor's `check_key_n`.
    pub(crate) fn check(&self, subject: Subject, cost: NonZeroU32) -> Verdict {
        let now = self.clock.now();
        let probe = Probe {
            subject,
            tat: Cell::new(0),
            now: now.as_u64(),
        };
        match self.gov.check_key_n(&probe, cost) {
            // Governor read the clock again, a little later than `now`: the standing is
            // taken as of a reading after its own, so the time in between does not count
            // as a spent unit (ceil((T + δ) / T) = 2 with the earlier reading).
            Ok(Ok(())) => {
                let after = self.clock.now();
                Verdict::Allowed(self.standing(probe.tat.get(), self.t0(after)))
            }
            Ok(Err(not_until)) => Verdict::Denied(not_until.wait_time_from(now)),
            // The caller never asks for more than the limit.
            Err(_) => Verdict::Denied(self.shape.period),
        }
    }

    /// The subject's standing now, and how long until `cost` could pass (zero if it could
    /// now), without counting anything.
    pub(crate) fn peek(&self, subject: Subject, cost: u32) -> (Standing, Duration) {
        let now = self.clock.now();
        let t0 = self.t0(now);
        let tat = self
            .store
            .0
            .map
            .get(&subject)
            .map_or(0, |c| c.load(Ordering::Acquire));
        let standing = self.standing(tat, t0);
        // GCRA: `cost` fits when max(tat, t0) + cost·t <= t0 + limit·t.
        let need = tat
            .max(t0)
            .saturating_add(self.t.saturating_mul(u64::from(cost)));
        let room = t0.saturating_add(self.t.saturating_mul(u64::from(self.shape.limit)));
        (standing, Duration::from_nanos(need.saturating_sub(room)))
    }

    /// Gives back `cost` counted for `subject` (a refund when another layer refused the
    /// request).
    pub(crate) fn refund(&self, subject: Subject, cost: u32) {
        let weight = self.t.saturating_mul(u64::from(cost));
        if let Some(cell) = self.store.0.map.get(&subject) {
            let _ = cell.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(weight))
            });
        }
    }

    /// Whether housekeeping was asked for (and clears the request).
    pub(crate) fn take_due(&self) -> bool {
        self.store.0.due.load(Ordering::Relaxed) && self.store.0.due.swap(false, Ordering::Relaxed)
    }

    /// Drops the subjects whose state is indistinguishable from fresh (governor's
    /// `retain_recent`) and gives memory back (`shrink_to_fit`).
    pub(crate) fn housekeeping(&self) {
        self.gov.retain_recent();
        self.gov.shrink_to_fit();
    }

    /// How many subjects are tracked.
    pub(crate) fn tracked(&self) -> usize {
        self.gov.len()
    }
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("shape", &self.shape)
            .field("tracked", &self.tracked())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(limit: u32, period: Duration) -> (Limiter, ManualClock) {
        let clock = ManualClock::at_2026();
        let shape = Shape::of(&RateLimitPolicy::new("x", limit, period)).unwrap();
        (
            Limiter::new(shape, LimiterClock::manual(clock.clone()), 1000, 1 << 20),
            clock,
        )
    }

    fn key(n: u8) -> Subject {
        Subject::Key(KeyId::parse(&format!("{:0>12}", n)).unwrap())
    }

    #[test]
    fn twenty_per_second_means_twenty_per_second() {
        let (l, clock) = limiter(20, Duration::from_secs(1));
        let k = key(1);
        for i in 0..20 {
            match l.check(k, NonZeroU32::MIN) {
                Verdict::Allowed(s) => assert_eq!(s.remaining, 19 - i),
                Verdict::Denied(_) => panic!("request {i} denied"),
            }
        }
        match l.check(k, NonZeroU32::MIN) {
            Verdict::Denied(wait) => assert_eq!(wait, Duration::from_millis(50)),
            Verdict::Allowed(_) => panic!("21st allowed"),
        }
        clock.advance(Duration::from_millis(50));
        assert!(matches!(l.check(k, NonZeroU32::MIN), Verdict::Allowed(_)));
        clock.advance(Duration::from_secs(1));
        let (s, wait) = l.peek(k, 20);
        assert_eq!(s.remaining, 20);
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn refunds_and_peeks() {
        let (l, _clock) = limiter(10, Duration::from_secs(10));
        let k = key(2);
        assert!(
            matches!(l.check(k, NonZeroU32::new(10).unwrap()), Verdict::Allowed(s) if s.remaining == 0 && s.reset_after == Duration::from_secs(10))
        );
        let (_, wait) = l.peek(k, 3);
        assert_eq!(wait, Duration::from_secs(3));
        l.refund(k, 4);
        let (s, wait) = l.peek(k, 3);
        assert_eq!(s.remaining, 4);
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn ipv6_is_limited_by_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Subject::of_addr(Some(a), 64), Subject::of_addr(Some(b), 64));
        assert_ne!(Subject::of_addr(Some(a), 64), Subject::of_addr(Some(c), 64));
        assert_eq!(Subject::of_addr(Some(a), 48), Subject::of_addr(Some(c), 48));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Subject::of_addr(Some(mapped), 64), Subject::V4(0x0a00_0001));
        assert_eq!(Subject::of_addr(None, 64), Subject::Unknown);
    }
}
