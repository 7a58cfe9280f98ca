//! Usage counting for quotas: the [`UsageStore`] trait, the in-memory [`MemoryUsageStore`],
//! UTC calendar [`Window`]s, and the [`LimitState`] of a policy that rate-limit and quota
//! rejections carry.
//!
//! A store counts, per key and window, the cost used and the number of requests. Its one
//! decision, [`UsageStore::check_and_add`], is atomic: either every limit has room for the
//! cost and the cost is added to every window, or nothing is added. SQL and Redis stores
//! implement the same trait (a transaction, a Lua script).
//!
//! ```
//! use keygate_core::usage::{Admission, Limit, MemoryUsageStore, UsageStore, Window};
//! use keygate_core::{KeyId, QuotaWindow};
//! use std::time::SystemTime;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let store = MemoryUsageStore::new();
//! let key = KeyId::parse("AbCdEfGhIjKl").unwrap();
//! let day = Window::containing(QuotaWindow::Day, SystemTime::now());
//! let limits = [Limit { window: 0, limit: 2 }];
//! for _ in 0..2 {
//!     assert!(matches!(store.check_and_add(&key, &[day], &limits, 1).await.unwrap(), Admission::Admitted(_)));
//! }
//! let refused = store.check_and_add(&key, &[day], &limits, 1).await.unwrap();
//! assert!(matches!(refused, Admission::Refused { ref violated, .. } if violated == &[0]));
//! assert_eq!(store.load(&key, &[day]).await.unwrap()[0].cost, 2);
//! # }
//! ```

mod limit;
mod memory;
mod window;

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::key::KeyId;

pub use limit::{
    ceil_secs, push_u64, write_limit_item, write_policy_item, write_sf_string, FieldSink,
    LimitState, MAX_SF_INTEGER,
};
pub use memory::MemoryUsageStore;
pub use window::{utc, Window};

/// What was used in one window: the summed cost and the number of requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Summed cost (a request costs 1 unless the layer's cost function says otherwise).
    pub cost: u64,
    /// Number of requests counted.
    pub requests: u64,
}

impl Usage {
    /// `self + other`, saturating.
    pub fn plus(self, other: Usage) -> Usage {
        Usage {
            cost: self.cost.saturating_add(other.cost),
            requests: self.requests.saturating_add(other.requests),
        }
    }

    /// `self - other`, saturating at zero.
    pub fn minus(self, other: Usage) -> Usage {
        Usage {
            cost: self.cost.saturating_sub(other.cost),
            requests: self.requests.saturating_sub(other.requests),
        }
    }
}

/// One limit of a [`UsageStore::check_and_add`]: the window it counts in (an index into the
/// call's windows) and the most cost that window may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Index of the window in the call's `windows`.
    pub window: usize,
    /// The most cost the window may hold.
    pub limit: u64,
}

/// The answer of [`UsageStore::check_and_add`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Every limit had room: the cost and one request were added to every window. Holds the
    /// usage of each window after the addition, in the order of the call's windows.
    Admitted(Vec<Usage>),
    /// At least one limit had no room: nothing was added.
    Refused {
        /// The usage of each window (unchanged), in the order of the call's windows.
        usage: Vec<Usage>,
        /// The indexes (into the call's limits) of the limits that had no room.
        violated: Vec<usize>,
    },
}

/// An addition (or, for [`UsageStore::subtract`], a removal) of usage in one window of one
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Increment {
    /// The key.
    pub key: KeyId,
    /// The window.
    pub window: Window,
    /// What to add.
    pub usage: Usage,
}

/// One row of a usage report: what one key used in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageRecord {
    /// The key.
    pub key: KeyId,
    /// The window.
    pub window: Window,
    /// What was used.
    pub usage: Usage,
}

/// Why a usage store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UsageError {
    /// The store could not be reached or did not answer. Requests whose decision needs it
    /// are denied with `store_unavailable` (fail closed).
    #[error("usage store unavailable: {0}")]
    Unavailable(String),
    /// A stored counter could not be read.
    #[error("stored usage is unreadable: {0}")]
    Corrupt(String),
}

/// Persistent counting of quota usage per key and window.
///
/// Implementations must make [`check_and_add`](UsageStore::check_and_add) atomic per key
/// (no interleaving of two calls for the same key between the check and the addition), so
/// concurrent requests and replicas never push a window over its limit.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// The usage of `key` in each of `windows` (zero for a window never counted), in order.
    async fn load(&self, key: &KeyId, windows: &[Window]) -> Result<Vec<Usage>, UsageError>;

    /// Atomically: if, for every limit, the window's cost plus `cost` stays within the
    /// limit (an overflowing sum does not), adds `cost` and one request to every one of
    /// `windows` (those without a limit count too) and answers [`Admission::Admitted`];
    /// otherwise adds nothing and answers [`Admission::Refused`].
    async fn check_and_add(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError>;

    /// Adds usage unconditionally (a batch of requests already admitted in memory).
    async fn add(&self, increments: &[Increment]) -> Result<(), UsageError>;

    /// Removes usage (saturating at zero): a refund for requests counted and then refused by
    /// another layer.
    async fn subtract(&self, decrements: &[Increment]) -> Result<(), UsageError>;

    /// What `key` used in every window that starts in `[from, to)`, ordered by window start.
    async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError>;
}

#[async_trait]
impl<T: UsageStore + ?Sized> UsageStore for Arc<T> {
    async fn load(&self, key: &KeyId, windows: &[Window]) -> Result<Vec<Usage>, UsageError> {
        (**self).load(key, windows).await
    }
    async fn check_and_add(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        (**self).check_and_add(key, windows, limits, cost).await
    }
    async fn add(&self, increments: &[Increment]) -> Result<(), UsageError> {
        (**self).add(increments).await
    }
    async fn subtract(&self, decrements: &[Increment]) -> Result<(), UsageError> {
        (**self).subtract(decrements).await
    }
    async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        (**self).report(key, from, to).await
    }
}

/// Decides a check-and-add against known usage: the indexes of the limits that `cost` would
/// push over (an overflowing sum counts as over). Shared by stores and the in-memory meter.
pub fn violated_limits(usage: &[Usage], limits: &[Limit], cost: u64) -> Vec<usize> {
    limits
        .iter()
        .enumerate()
        .filter(|(_, l)| {
            let used = usage.get(l.window).map_or(0, |u| u.cost);
            used.checked_add(cost).is_none_or(|total| total > l.limit)
        })
        .map(|(i, _)| i)
        .collect()
}
