//! Clocks: the system clock, and a manual one for tests (expiry, windows, rate limits).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time. Everything in keygate that depends on time (expiry, cache
/// freshness, windows) reads it through this trait so tests can control it.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// Resolution is one nanosecond; it covers 1970 to 2554.
#[derive(Clone)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock set to `start`.
    pub fn new(start: SystemTime) -> Self {
        let clock = ManualClock {
            nanos: Arc::new(AtomicU64::new(0)),
        };
        clock.set(start);
        clock
    }

    /// A clock set to a fixed, round instant (2026-01-01T00:00:00Z), so tests read the same
    /// on every run.
    pub fn at_2026() -> Self {
        Self::new(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let add = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.nanos
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(n.saturating_add(add))
            })
            .ok();
    }

    /// Sets the clock to `to` (times before 1970 read as 1970).
    pub fn set(&self, to: SystemTime) {
        let n = to
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        self.nanos.store(n, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.nanos.load(Ordering::SeqCst))
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ManualClock")
            .field(&format_args!("{}", crate::time::rfc3339_micros(self.now())))
            .finish()
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now(&self) -> SystemTime {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at_2026();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        let shared = c.clone();
        shared.advance(Duration::from_millis(1500));
        assert_eq!(
            c.now().duration_since(t0).unwrap(),
            Duration::from_millis(1500)
        );
        c.set(UNIX_EPOCH);
        assert_eq!(shared.now(), UNIX_EPOCH);
        assert!(format!("{c:?}").contains("1970-01-01T00:00:00"));
    }
}
