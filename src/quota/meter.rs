//! The in-memory side of batched counting: per key, the windows in use, what the store had
//! when they were loaded, and what was counted since the last flush.

use std::sync::Mutex;
use std::time::SystemTime;

use dashmap::DashMap;
use http::HeaderValue;
use smallvec::SmallVec;

use crate::core::usage::{Increment, Usage, UsageError, UsageStore, Window};
use crate::KeyIdHashBuilder;
use crate::{KeyId, QuotaPolicy};

/// One window of one key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counted {
    pub(crate) window: Window,
    /// What the store held when loaded, plus what was flushed since.
    pub(crate) base: Usage,
    /// Counted here, not yet written to the store.
    pub(crate) pending: Usage,
    /// Refunds of usage already flushed, to subtract from the store at the next flush.
    pub(crate) debt: Usage,
}

impl Counted {
    pub(crate) fn total(&self) -> Usage {
        self.base.plus(self.pending)
    }
}

#[derive(Debug, Default)]
pub(crate) struct KeyCounters {
    pub(crate) windows: SmallVec<[Counted; 3]>,
    /// Used since the last flush (idle keys are dropped from memory at a flush).
    pub(crate) touched: bool,
    /// The key's `RateLimit-Policy` field as last written: it depends only on the quota
    /// policies and their windows, so it is formatted once per window, not per request.
    pub(crate) policy_field: Option<PolicyField>,
}

/// A formatted `RateLimit-Policy` field and what it was formatted from.
#[derive(Debug)]
pub(crate) struct PolicyField {
    pub(crate) quotas: Box<[QuotaPolicy]>,
    pub(crate) windows: SmallVec<[Window; 3]>,
    pub(crate) value: HeaderValue,
}

impl KeyCounters {
    /// The index of the current window of `kind` at `now`, if loaded.
    pub(crate) fn find(&self, window: &Window) -> Option<usize> {
        self.windows.iter().position(|c| c.window == *window)
    }
}

/// The counters of every key (by lineage) and of every identity (by its usage id).
pub(crate) type Counters = DashMap<KeyId, Mutex<KeyCounters>, KeyIdHashBuilder>;

/// Every key's and identity's counters.
#[derive(Debug, Default)]
pub(crate) struct Meter {
    pub(crate) keys: Counters,
    /// Identities' shared counters, in a map of their own: a request of an identity's key
    /// holds its key's entry while it takes its identity's (always in that order), and a
    /// second entry of one map could share the first's shard lock.
    pub(crate) identities: Counters,
    /// Serializes flushes.
    flushing: tokio::sync::Mutex<()>,
}

fn lock(m: &Mutex<KeyCounters>) -> std::sync::MutexGuard<'_, KeyCounters> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Meter {
    /// Records what the store holds for `windows` of `key` (keeping counters already loaded
    /// by a concurrent request).
    pub(crate) fn loaded(&self, map: &Counters, key: KeyId, windows: &[Window], usage: &[Usage]) {
        let entry = map.entry(key).or_default();
        let mut c = lock(&entry);
        c.touched = true;
        for (w, u) in windows.iter().zip(usage) {
            if c.find(w).is_none() {
                c.windows.push(Counted {
                    window: *w,
                    base: *u,
                    pending: Usage::default(),
                    debt: Usage::default(),
                });
            }
        }
    }

    /// Gives back `usage` counted in `windows` of `key`.
    pub(crate) fn refund(&self, map: &Counters, key: KeyId, windows: &[Window], usage: Usage) {
        if let Some(entry) = map.get(&key) {
            let mut c = lock(&entry);
            for w in windows {
                if let Some(i) = c.find(w) {
                    let counted = &mut c.windows[i];
                    let from_pending = Usage {
                        cost: usage.cost.min(counted.pending.cost),
                        requests: usage.requests.min(counted.pending.requests),
                    };
                    let rest = usage.minus(from_pending);
                    counted.pending = counted.pending.minus(from_pending);
                    counted.base = counted.base.minus(rest);
                    counted.debt = counted.debt.plus(rest);
                }
            }
        }
    }

    /// Writes everything counted since the last flush to `store`. On failure nothing is lost
    /// from memory: the counts stay pending for the next flush. Afterwards drops ended
    /// windows and idle keys whose counts are all in the store.
    pub(crate) async fn flush(
        &self,
        store: &dyn UsageStore,
        now: SystemTime,
    ) -> Result<usize, UsageError> {
        let _serial = self.flushing.lock().await;
        let mut adds = Vec::new();
        let mut subs = Vec::new();
        // Identity and key ids never meet (see `Identity::usage_id`): one increment list.
        for entry in self.keys.iter().chain(self.identities.iter()) {
            let mut c = lock(entry.value());
            for counted in c.windows.iter_mut() {
                if counted.pending != Usage::default() {
                    adds.push(Increment {
                        key: *entry.key(),
                        window: counted.window,
                        usage: counted.pending,
                    });
                    counted.base = counted.base.plus(counted.pending);
                    counted.pending = Usage::default();
                }
                if counted.debt != Usage::default() {
                    subs.push(Increment {
                        key: *entry.key(),
                        window: counted.window,
                        usage: counted.debt,
                    });
                    counted.debt = Usage::default();
                }
            }
        }
        let written = adds.len() + subs.len();
        let result = async {
            if !adds.is_empty() {
                store.add(&adds).await?;
            }
            if !subs.is_empty() {
                store.subtract(&subs).await?;
            }
            Ok::<_, UsageError>(())
        }
        .await;
        if let Err(e) = result {
            // Put everything back as pending; a later flush retries. (If `add` succeeded and
            // `subtract` failed, the adds are re-sent: stores are not idempotent, so this
            // can over-count by one batch; it never under-counts.)
            for inc in &adds {
                let entry = self
                    .keys
                    .get(&inc.key)
                    .or_else(|| self.identities.get(&inc.key));
                if let Some(entry) = entry {
                    let mut c = lock(&entry);
                    if let Some(i) = c.find(&inc.window) {
                        let counted = &mut c.windows[i];
                        counted.base = counted.base.minus(inc.usage);
                        counted.pending = counted.pending.plus(inc.usage);
                    }
                }
            }
            for dec in &subs {
                let entry = self
                    .keys
                    .get(&dec.key)
                    .or_else(|| self.identities.get(&dec.key));
                if let Some(entry) = entry {
                    let mut c = lock(&entry);
                    if let Some(i) = c.find(&dec.window) {
                        c.windows[i].debt = c.windows[i].debt.plus(dec.usage);
                    }
                }
            }
            return Err(e);
        }
        // Forget what the store now holds and nobody uses.
        for map in [&self.keys, &self.identities] {
            map.retain(|_, m| {
                let c = m.get_mut().unwrap_or_else(|p| p.into_inner());
                c.windows.retain(|w| {
                    w.pending != Usage::default()
                        || w.debt != Usage::default()
                        || w.window.end.is_none_or(|e| e > now)
                });
                let keep = c.touched && !c.windows.is_empty();
                c.touched = false;
                keep
            });
            map.shrink_to_fit();
        }
        Ok(written)
    }

    /// How many keys are held in memory.
    pub(crate) fn keys(&self) -> usize {
        self.keys.len()
    }
}
