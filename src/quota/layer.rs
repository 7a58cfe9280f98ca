use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tower_layer::Layer;

use super::config::{QuotaConfig, Shared};
use super::{Quota, QuotaCheck};
use crate::check::{CheckLayer, One, Resolver};
use crate::core::usage::{UsageError, UsageRecord};
use crate::cost::ConfigError;
use crate::{Clock, KeyGate, KeyId};

/// Layer that applies [`Quota`]: per-key allowances per UTC calendar window (hour, day,
/// month) and credits that refill (or not), counted in a [`UsageStore`](crate::core::usage::UsageStore). Rejects with 429
/// `quota_exceeded` (gRPC RESOURCE_EXHAUSTED); requests without a principal pass unchanged
/// (quotas are per key).
///
/// [`QuotaLayer::new`] builds a layer that reads the principal an earlier layer resolved and
/// the system clock (or the configured one); [`QuotaLayer::with_gate`] makes it resolve the
/// caller itself when no earlier layer has, and read the hub's clock. Clones share the
/// counters; keep a [`QuotaHandle`] to flush at shutdown and read usage reports.
#[derive(Clone)]
pub struct QuotaLayer {
    pub(crate) shared: Arc<Shared>,
    /// The clock windows are read from: the configured one, else the hub's (with a gate),
    /// else the system clock.
    clock: Arc<dyn Clock>,
    explicit_clock: bool,
    pub(crate) resolver: Resolver,
}

impl QuotaLayer {
    /// A layer enforcing `config`; refuses invalid configurations. Without
    /// [`with_gate`](Self::with_gate) it reads the principal an earlier layer put in the
    /// request context, reads the system clock (unless [`QuotaConfig::clock`] names one),
    /// and renders with the default renderer.
    pub fn new(config: QuotaConfig) -> Result<Self, ConfigError> {
        let explicit_clock = config.clock.is_some();
        let shared = Shared::new(config)?;
        Ok(QuotaLayer {
            clock: shared.clock.clone(),
            explicit_clock,
            shared: Arc::new(shared),
            resolver: Resolver::standalone(),
        })
    }

    /// Resolves the caller through `gate` when no earlier layer has (memoized: the key is
    /// verified once per request), reads windows from the hub's clock (unless
    /// [`QuotaConfig::clock`] names one), and renders denials with the hub's renderer.
    /// Clones made before keep sharing the counters. Take the [`handle`](Self::handle)
    /// after this call, so its flushes read the same clock.
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        if !self.explicit_clock {
            self.clock = gate.clock().clone();
        }
        self.resolver = Resolver::Hub(gate.clone());
        self
    }

    /// The check this layer runs (for a fused [`Stack`](crate::stack::Stack)).
    pub fn check(&self) -> QuotaCheck {
        QuotaCheck {
            shared: self.shared.clone(),
            clock: self.clock.clone(),
        }
    }

    /// A handle on the layer's counters: flush, reports.
    pub fn handle(&self) -> QuotaHandle {
        QuotaHandle {
            shared: self.shared.clone(),
            clock: self.clock.clone(),
        }
    }
}

impl fmt::Debug for QuotaLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaLayer")
            .field("resolver", &self.resolver)
            .field("strict", &self.shared.strict)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for QuotaLayer {
    type Service = Quota<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CheckLayer::from_parts(One(self.check()), self.resolver.clone()).layer(inner)
    }
}

/// A handle on a [`QuotaLayer`]'s counters. Cheap to clone.
#[derive(Clone)]
pub struct QuotaHandle {
    shared: Arc<Shared>,
    clock: Arc<dyn Clock>,
}

impl QuotaHandle {
    /// Writes every count not yet in the store (batched counting), after waiting for the
    /// refunds sent to the store before this call and not answered yet (strict counting
    /// gives back, in the background, requests refused after they were counted). Call it at graceful shutdown,
    /// after the server stopped taking requests, so nothing is lost. Returns how many
    /// (key, window) counters were written. On failure the counts stay pending.
    pub async fn flush(&self) -> Result<usize, UsageError> {
        self.shared.flush(self.clock.now()).await
    }

    /// Flushes every `every` until the returned task is aborted (or the runtime ends). Requests
    /// also start a flush when one is due, so this is only needed for services with quiet
    /// periods.
    pub fn spawn_flusher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        let clock = self.clock.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = shared.flush(clock.now()).await {
                    tracing::warn!(error = %e, "quota usage flush failed; counts stay pending");
                }
            }
        })
    }

    /// What `key` used (cost and requests) in every window starting in `[from, to)`: quota
    /// windows and the [`meter`](QuotaConfig::meter) window. Flushes first, so the report
    /// includes every count up to now.
    pub async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        self.flush().await?;
        self.shared.store.report(key, from, to).await
    }

    /// How many keys' counters are held in memory (batched counting).
    pub fn keys_in_memory(&self) -> usize {
        self.shared.meter.keys()
    }
}

impl fmt::Debug for QuotaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaHandle").finish_non_exhaustive()
    }
}
