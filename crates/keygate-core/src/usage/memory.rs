//! The in-memory usage store.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use dashmap::DashMap;

use super::{
    violated_limits, Admission, Increment, Limit, Usage, UsageError, UsageRecord, UsageStore,
    Window,
};
use crate::key::KeyId;

/// An in-memory [`UsageStore`]: per key, a short list of windows and their usage, updated
/// under the key's map-shard lock (so `check_and_add` is atomic per key). For tests and
/// single-process services; counts are lost when the process ends. Clones share the counts.
///
/// Windows are kept until [`MemoryUsageStore::prune`] drops the ended ones (so reports can
/// read past windows).
#[derive(Clone, Default)]
pub struct MemoryUsageStore {
    keys: Arc<DashMap<KeyId, Vec<(Window, Usage)>>>,
}

impl MemoryUsageStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops every window that ended at or before `before`; returns how many were dropped.
    pub fn prune(&self, before: SystemTime) -> usize {
        let mut dropped = 0;
        self.keys.retain(|_, windows| {
            let n = windows.len();
            windows.retain(|(w, _)| w.end.is_none_or(|e| e > before));
            dropped += n - windows.len();
            !windows.is_empty()
        });
        self.keys.shrink_to_fit();
        dropped
    }

    /// How many (key, window) counters it holds.
    pub fn counters(&self) -> usize {
        self.keys.iter().map(|e| e.value().len()).sum()
    }
}

fn usage_of(windows: &[(Window, Usage)], w: &Window) -> Usage {
    windows
        .iter()
        .find(|(x, _)| x == w)
        .map_or(Usage::default(), |(_, u)| *u)
}

fn add_to(windows: &mut Vec<(Window, Usage)>, w: &Window, by: Usage) -> Usage {
    match windows.iter_mut().find(|(x, _)| x == w) {
        Some((_, u)) => {
            *u = u.plus(by);
            *u
        }
        None => {
            windows.push((*w, by));
            by
        }
    }
}

#[async_trait]
impl UsageStore for MemoryUsageStore {
    async fn load(&self, key: &KeyId, windows: &[Window]) -> Result<Vec<Usage>, UsageError> {
        Ok(match self.keys.get(key) {
            Some(stored) => windows.iter().map(|w| usage_of(&stored, w)).collect(),
            None => vec![Usage::default(); windows.len()],
        })
    }

    async fn check_and_add(
        &self,
        key: &KeyId,
        windows: &[Window],
        limits: &[Limit],
        cost: u64,
    ) -> Result<Admission, UsageError> {
        let mut stored = self.keys.entry(*key).or_default();
        let usage: Vec<Usage> = windows.iter().map(|w| usage_of(&stored, w)).collect();
        let violated = violated_limits(&usage, limits, cost);
        if !violated.is_empty() {
            return Ok(Admission::Refused { usage, violated });
        }
        let one = Usage { cost, requests: 1 };
        let after = windows
            .iter()
            .map(|w| add_to(&mut stored, w, one))
            .collect();
        Ok(Admission::Admitted(after))
    }

    async fn add(&self, increments: &[Increment]) -> Result<(), UsageError> {
        for inc in increments {
            add_to(
                &mut self.keys.entry(inc.key).or_default(),
                &inc.window,
                inc.usage,
            );
        }
        Ok(())
    }

    async fn subtract(&self, decrements: &[Increment]) -> Result<(), UsageError> {
        for dec in decrements {
            if let Some(mut stored) = self.keys.get_mut(&dec.key) {
                if let Some((_, u)) = stored.iter_mut().find(|(w, _)| *w == dec.window) {
                    *u = u.minus(dec.usage);
                }
            }
        }
        Ok(())
    }

    async fn report(
        &self,
        key: &KeyId,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<UsageRecord>, UsageError> {
        let mut rows: Vec<UsageRecord> = self
            .keys
            .get(key)
            .map(|stored| {
                stored
                    .iter()
                    .filter(|(w, _)| w.start >= from && w.start < to)
                    .map(|(w, u)| UsageRecord {
                        key: *key,
                        window: *w,
                        usage: *u,
                    })
                    .collect()
            })
            .unwrap_or_default();
        rows.sort_by(|a, b| {
            (a.window.start, a.window.kind.as_str()).cmp(&(b.window.start, b.window.kind.as_str()))
        });
        Ok(rows)
    }
}

impl fmt::Debug for MemoryUsageStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryUsageStore")
            .field("keys", &self.keys.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{QuotaWindow, Refill};
    use crate::usage::utc;

    fn key(s: &str) -> KeyId {
        KeyId::parse(s).unwrap()
    }

    #[tokio::test]
    async fn check_and_add_is_all_or_nothing() {
        let s = MemoryUsageStore::new();
        let k = key("AAAAAAAAAAAA");
        let now = utc(2026, 5, 1, 10, 30, 0);
        let hour = Window::containing(QuotaWindow::Hour, now);
        let day = Window::containing(QuotaWindow::Day, now);
        let limits = [
            Limit {
                window: 0,
                limit: 3,
            },
            Limit {
                window: 1,
                limit: 5,
            },
        ];
        let a = s.check_and_add(&k, &[hour, day], &limits, 3).await.unwrap();
        assert_eq!(
            a,
            Admission::Admitted(vec![
                Usage {
                    cost: 3,
                    requests: 1
                },
                Usage {
                    cost: 3,
                    requests: 1
                }
            ])
        );
        // The hour is full: nothing is added to the day either.
        let r = s.check_and_add(&k, &[hour, day], &limits, 1).await.unwrap();
        assert!(matches!(r, Admission::Refused { ref violated, .. } if violated == &[0]));
        assert_eq!(s.load(&k, &[day]).await.unwrap()[0].cost, 3);
        // Next hour: room again until the day is full.
        let later = utc(2026, 5, 1, 11, 0, 0);
        let hour2 = Window::containing(QuotaWindow::Hour, later);
        assert!(matches!(
            s.check_and_add(&k, &[hour2, day], &limits, 2)
                .await
                .unwrap(),
            Admission::Admitted(_)
        ));
        let r = s
            .check_and_add(&k, &[hour2, day], &limits, 1)
            .await
            .unwrap();
        assert!(matches!(r, Admission::Refused { ref violated, .. } if violated == &[1]));
        // Overflowing costs never pass.
        let r = s
            .check_and_add(&k, &[hour2, day], &limits, u64::MAX)
            .await
            .unwrap();
        assert!(matches!(r, Admission::Refused { ref violated, .. } if violated == &[0, 1]));
    }

    #[tokio::test]
    async fn add_subtract_report_prune() {
        let s = MemoryUsageStore::new();
        let k = key("BBBBBBBBBBBB");
        let d1 = Window::containing(QuotaWindow::Day, utc(2026, 1, 1, 5, 0, 0));
        let d2 = Window::containing(QuotaWindow::Day, utc(2026, 1, 2, 5, 0, 0));
        let credits = Window::containing(
            QuotaWindow::Credits(Refill::Never),
            utc(2026, 1, 2, 5, 0, 0),
        );
        let u = |cost, requests| Usage { cost, requests };
        s.add(&[
            Increment {
                key: k,
                window: d1,
                usage: u(10, 2),
            },
            Increment {
                key: k,
                window: d2,
                usage: u(4, 4),
            },
            Increment {
                key: k,
                window: d2,
                usage: u(1, 1),
            },
            Increment {
                key: k,
                window: credits,
                usage: u(7, 7),
            },
        ])
        .await
        .unwrap();
        s.subtract(&[Increment {
            key: k,
            window: d2,
            usage: u(2, 1),
        }])
        .await
        .unwrap();
        let rows = s
            .report(&k, utc(2026, 1, 1, 0, 0, 0), utc(2026, 1, 3, 0, 0, 0))
            .await
            .unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].usage, u(10, 2));
        assert_eq!(rows[1].usage, u(3, 4));
        let all = s
            .report(&k, std::time::UNIX_EPOCH, utc(2030, 1, 1, 0, 0, 0))
            .await
            .unwrap();
        assert_eq!(all[0].window, credits);
        assert_eq!(s.prune(utc(2026, 1, 2, 0, 0, 0)), 1);
        assert_eq!(s.counters(), 2);
    }
}
