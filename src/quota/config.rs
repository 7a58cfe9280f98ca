//! The quota's configuration and the state its checks share: built and validated here,
//! read by the check ([`super::service`]) and wrapped by the layer ([`super::layer`]).
//! Neither of those two imports the other's module.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::meter::Meter;
use crate::core::usage::{UsageError, UsageStore};
use crate::cost::{ConfigError, Cost, CostFn, RequestHead};
use crate::{Clock, QuotaPolicy, QuotaWindow, Refill, SystemClock};

/// Checks that `policy` can be enforced by [`QuotaLayer`](super::QuotaLayer): a name of 1 to 64
/// `[A-Za-z0-9_-]`, a limit of at least 1, and a monthly refill day of 1 to 31. Key-issuing
/// code calls it so a bad policy is refused when the key is built; a stored record that
/// slips through is enforced fail-closed (every request of the key refused).
pub fn validate_policy(policy: &QuotaPolicy) -> Result<(), ConfigError> {
    let invalid = |reason| ConfigError::InvalidPolicy {
        name: policy.name.chars().take(64).collect(),
        reason,
    };
    let name = &policy.name;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(ConfigError::InvalidName(name.chars().take(64).collect()));
    }
    if policy.limit == 0 {
        return Err(invalid("the limit must be at least 1"));
    }
    if let QuotaWindow::Credits(Refill::Monthly { day }) = policy.window {
        if !(1..=31).contains(&day) {
            return Err(invalid("the refill day must be 1 to 31"));
        }
    }
    Ok(())
}

/// How counts reach the [`UsageStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Count in memory (the store is read once per key and window) and write the counts to
    /// the store in batches, every `flush_every` (when a request finds the time has come and
    /// a tokio runtime is running) and on [`QuotaHandle::flush`](super::QuotaHandle::flush). A crash loses what was
    /// counted since the last flush (keys get that much extra allowance); a graceful shutdown
    /// that calls `flush` loses nothing. Replicas sharing a store see each other's counts
    /// only when they load a window, so limits are per replica between loads.
    Batched {
        /// How often counts are written.
        flush_every: Duration,
    },
    /// Every request is one atomic [`UsageStore::check_and_add`] before the inner service
    /// runs: exact across replicas, nothing to lose in a crash, one store round trip per
    /// request.
    Strict,
}

/// How a [`QuotaLayer`](super::QuotaLayer) counts. Built with the [`UsageStore`] to count in; every other
/// setting has a default.
///
/// | setting | default |
/// |---|---|
/// | [`counting`](Self::counting) | batched, flushed every second |
/// | [`cost`](Self::cost) | 1 per request |
/// | [`headers`](Self::headers) (`RateLimit-Policy` / `RateLimit` on every response) | on |
/// | [`status_extension`](Self::status_extension) ([`QuotaStatus`](super::QuotaStatus) for handlers) | on |
/// | [`meter`](Self::meter) (count every key, quota or not) | off |
/// | [`charge_refused`](Self::charge_refused) (charge requests refused after the count) | off |
/// | [`clock`](Self::clock) | the hub's clock with [`with_gate`](super::QuotaLayer::with_gate), else the system clock |
#[derive(Clone)]
pub struct QuotaConfig {
    pub(crate) store: Arc<dyn UsageStore>,
    pub(crate) counting: Counting,
    pub(crate) cost: Option<CostFn>,
    pub(crate) headers: bool,
    pub(crate) status: bool,
    pub(crate) meter: Option<QuotaWindow>,
    pub(crate) clock: Option<Arc<dyn Clock>>,
    pub(crate) charge_refused: bool,
}

impl QuotaConfig {
    /// Counting in `store`, with the defaults above.
    pub fn new(store: impl UsageStore) -> Self {
        QuotaConfig {
            store: Arc::new(store),
            counting: Counting::Batched {
                flush_every: Duration::from_secs(1),
            },
            cost: None,
            headers: true,
            status: true,
            meter: None,
            clock: None,
            charge_refused: false,
        }
    }

    /// Batched (default) or strict counting.
    pub fn counting(mut self, counting: Counting) -> Self {
        self.counting = counting;
        self
    }

    /// How many units of every quota a request uses (default 1). A cost of 0 passes without
    /// being counted; a cost larger than a quota's limit can never pass and is refused
    /// at once (413 `cost_exceeds_limit`, no `Retry-After`); a sum that would overflow
    /// counts as over the limit.
    pub fn cost<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Cost + Send + Sync + 'static,
    {
        self.cost = Some(Arc::new(f));
        self
    }

    /// Charges every quota in bytes: [`ByBytes::cost`](crate::cost::ByBytes::cost) as the
    /// [`cost`](Self::cost) function (quotas' limits are then in `unit`s of bytes per
    /// window).
    pub fn cost_in_bytes(self, bytes: crate::cost::ByBytes) -> Self {
        self.cost(move |head| bytes.cost(head))
    }

    /// Whether successful responses carry `RateLimit-Policy` and `RateLimit` for the key's
    /// quotas (default on). Rejections always carry them.
    pub fn headers(mut self, yes: bool) -> Self {
        self.headers = yes;
        self
    }

    /// Whether requests that pass carry a [`QuotaStatus`](super::QuotaStatus) extension
    /// (default on).
    pub fn status_extension(mut self, yes: bool) -> Self {
        self.status = yes;
        self
    }

    /// Also counts every authenticated request in this window, whether its key has quotas or
    /// not, for usage reports (billing, cost attribution). Off by default.
    pub fn meter(mut self, window: QuotaWindow) -> Self {
        self.meter = Some(window);
        self
    }

    /// Whether requests that are refused after being counted are charged anyway (default
    /// off: they are given back). "Refused" means a keygate layer's denial, or a 4xx other
    /// than 429 from the service (a gRPC client-error status in a trailers-only answer too);
    /// see the module docs. Turn it on to bill every request that passed the quota check.
    pub fn charge_refused(mut self, yes: bool) -> Self {
        self.charge_refused = yes;
        self
    }

    /// The clock windows are read from (default: the hub's with [`QuotaLayer::with_gate`](super::QuotaLayer::with_gate), else the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Counting::Batched { flush_every } = self.counting {
            if flush_every.is_zero() {
                return Err(ConfigError::Zero("flush_every"));
            }
        }
        if let Some(QuotaWindow::Credits(Refill::Monthly { day })) = self.meter {
            if !(1..=31).contains(&day) {
                return Err(ConfigError::InvalidPolicy {
                    name: "meter".into(),
                    reason: "the refill day must be 1 to 31",
                });
            }
        }
        Ok(())
    }
}

impl fmt::Debug for QuotaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaConfig")
            .field("counting", &self.counting)
            .field("cost", &self.cost.as_ref().map(|_| "fn"))
            .field("headers", &self.headers)
            .field("status_extension", &self.status)
            .field("meter", &self.meter)
            .field("charge_refused", &self.charge_refused)
            .finish_non_exhaustive()
    }
}

/// State shared by every clone of the layer, its services and handles.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn UsageStore>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) strict: bool,
    pub(crate) flush_every: Duration,
    /// Nanoseconds since the epoch of the next automatic flush.
    pub(crate) next_flush: AtomicU64,
    pub(crate) cost: Option<CostFn>,
    pub(crate) headers: bool,
    pub(crate) status: bool,
    pub(crate) meter_window: Option<QuotaWindow>,
    pub(crate) meter: Meter,
    pub(crate) charge_refused: bool,
    /// Strict refunds sent to the store and not answered yet.
    pub(crate) refunds: Refunds,
}

/// Strict refunds in flight, so a flush can wait for those sent before it.
#[derive(Default)]
pub(crate) struct Refunds {
    /// The next refund's number.
    next: AtomicU64,
    /// The numbers of the refunds in flight.
    in_flight: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// Woken whenever a refund ends.
    ended: tokio::sync::Notify,
}

impl Refunds {
    /// A refund starts; the guard ends it when dropped.
    pub(crate) fn start(shared: &Arc<Shared>) -> RefundGuard {
        let r = &shared.refunds;
        let n = r.next.fetch_add(1, Ordering::Relaxed);
        lock_set(&r.in_flight).insert(n);
        RefundGuard(shared.clone(), n)
    }

    /// Waits until every refund started before this call has ended (later ones are not
    /// waited for, so steady refused traffic cannot hold a flush back).
    async fn settled(&self) {
        let before = self.next.load(Ordering::Relaxed);
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if lock_set(&self.in_flight)
                .first()
                .is_none_or(|oldest| *oldest >= before)
            {
                return;
            }
            ended.await;
        }
    }
}

fn lock_set(
    m: &std::sync::Mutex<std::collections::BTreeSet<u64>>,
) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<u64>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One strict refund in flight (see [`Refunds::start`]).
pub(crate) struct RefundGuard(Arc<Shared>, u64);

impl Drop for RefundGuard {
    fn drop(&mut self) {
        let r = &self.0.refunds;
        lock_set(&r.in_flight).remove(&self.1);
        r.ended.notify_waiters();
    }
}

/// `next_flush` before the first counted request.
const UNSET: u64 = 0;

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl Shared {
    pub(super) fn new(config: QuotaConfig) -> Result<Shared, ConfigError> {
        config.validate()?;
        let clock = config.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let (strict, flush_every) = match config.counting {
            Counting::Strict => (true, Duration::MAX),
            Counting::Batched { flush_every } => (false, flush_every),
        };
        Ok(Shared {
            store: config.store,
            clock,
            strict,
            flush_every,
            next_flush: AtomicU64::new(UNSET),
            cost: config.cost,
            headers: config.headers,
            status: config.status,
            meter_window: config.meter,
            meter: Meter::default(),
            charge_refused: config.charge_refused,
            refunds: Refunds::default(),
        })
    }

    /// Starts a flush in the background when one is due (batched counting, a tokio runtime).
    pub(crate) fn maybe_flush(self: &Arc<Self>, now: SystemTime) {
        let now = nanos(now);
        let due = self.next_flush.load(Ordering::Relaxed);
        let next =
            now.saturating_add(u64::try_from(self.flush_every.as_nanos()).unwrap_or(u64::MAX));
        if due == UNSET {
            // The first counted request starts the interval, on the clock the check reads.
            let _ =
                self.next_flush
                    .compare_exchange(UNSET, next, Ordering::Relaxed, Ordering::Relaxed);
            return;
        }
        if now < due {
            return;
        }
        if self
            .next_flush
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.clone();
            rt.spawn(async move {
                if let Err(e) = shared
                    .flush(SystemTime::UNIX_EPOCH + Duration::from_nanos(now))
                    .await
                {
                    tracing::warn!(error = %e, "quota usage flush failed; counts stay pending");
                }
            });
        }
    }

    /// Writes the pending counts, as of `now`.
    pub(crate) async fn flush(&self, now: SystemTime) -> Result<usize, UsageError> {
        self.refunds.settled().await;
        self.meter.flush(&*self.store, now).await
    }
}
