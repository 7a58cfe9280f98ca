use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tower_layer::Layer;

use super::config::{QuotaConfig, Shared};
use super::{ConfigError, Quota, QuotaCheck};
use crate::check::{CheckLayer, One, Resolver};
use crate::core::usage::{UsageError, UsageRecord};
use crate::{KeyGate, KeyId};

/// Layer that applies [`Quota`]: per-key allowances per UTC calendar window (hour, day,
/// month) and credits that refill (or not), counted in a [`UsageStore`](crate::core::usage::UsageStore). Rejects with 429
/// `quota_exceeded` (gRPC RESOURCE_EXHAUSTED); requests without a principal pass unchanged
/// (quotas are per key).
///
/// Build it from the hub ([`QuotaLayer::new`]: resolves the caller itself when no earlier
/// layer has, reads the hub's clock) or without it ([`QuotaLayer::standalone`]: reads the
/// principal an earlier layer put in the extensions). Clones share the counters; keep a
/// [`QuotaHandle`] to flush at shutdown and read usage reports.
#[derive(Clone)]
pub struct QuotaLayer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) resolver: Resolver,
}

impl QuotaLayer {
    /// The layer of `gate` with `config`; refuses invalid configurations.
    pub fn new(gate: &KeyGate, config: QuotaConfig) -> Result<Self, ConfigError> {
        Ok(QuotaLayer {
            shared: Arc::new(Shared::new(config, Some(gate))?),
            resolver: Resolver::Hub(gate.clone()),
        })
    }

    /// A layer without the hub: reads the [`Principal`](crate::Principal) an earlier layer
    /// put in the extensions, and renders with the default renderer.
    pub fn standalone(config: QuotaConfig) -> Result<Self, ConfigError> {
        Ok(QuotaLayer {
            shared: Arc::new(Shared::new(config, None)?),
            resolver: Resolver::standalone(),
        })
    }

    /// The check this layer runs (for a fused [`Stack`](crate::stack::Stack)).
    pub fn check(&self) -> QuotaCheck {
        QuotaCheck {
            shared: self.shared.clone(),
        }
    }

    /// A handle on the layer's counters: flush, reports.
    pub fn handle(&self) -> QuotaHandle {
        QuotaHandle {
            shared: self.shared.clone(),
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
}

impl QuotaHandle {
    /// Writes every count not yet in the store (batched counting). Call it at graceful
    /// shutdown, after the server stopped taking requests, so nothing is lost. Returns how
    /// many (key, window) counters were written. On failure the counts stay pending.
    pub async fn flush(&self) -> Result<usize, UsageError> {
        self.shared.flush().await
    }

    /// Flushes every `every` until the returned task is aborted (or the runtime ends). Requests
    /// also start a flush when one is due, so this is only needed for services with quiet
    /// periods.
    pub fn spawn_flusher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = shared.flush().await {
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
