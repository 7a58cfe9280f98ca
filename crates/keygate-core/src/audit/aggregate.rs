//! Folding floods of anonymous denials into one event per source and window: [`AggregateSink`]
//! (documented on the type, which is public where this module is not).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::event::{AuditEvent, Decision, DenialSummary, RequestEvent, Transport};
use super::sink::{AuditError, AuditSink};
use crate::denial::DenialCode;

/// Groups of one window, at most this many by default; past it, new sources pass through.
const DEFAULT_MAX_SOURCES: usize = 10_000;

#[derive(Hash, PartialEq, Eq)]
struct Source {
    client_ip: Option<IpAddr>,
    denial: Option<DenialCode>,
    protocol: Transport,
    method: Cow<'static, str>,
    path: String,
}

struct Folded {
    /// The order the group was first seen in (summaries are written in that order).
    order: u64,
    status: Option<u16>,
    first: SystemTime,
    last: SystemTime,
    count: u64,
}

#[derive(Default)]
struct Window {
    /// The current window's number (`time / window`).
    index: u64,
    groups: HashMap<Source, Folded>,
    next_order: u64,
}

/// A sink that folds repeated anonymous denials into [`DenialSummary`] events before
/// passing everything to `inner`.
///
/// Folding floods of anonymous denials into one event per source and window
/// ([`AggregateSink`]).
///
/// Traffic without a valid key (scanners, a client with a typo in its key, a flood) would
/// otherwise write one line per request: tens of megabytes a second. Denied requests that
/// name no key are grouped by source (client address, denial code, method and path) and by
/// window (`time / window`, from the events' own times, so a manual clock makes it
/// deterministic). The first of a group in a window is recorded as usual; the rest are
/// counted, and one [`DenialSummary`] per group is recorded when the first event of a later
/// window arrives, at [`AuditSink::sync`] (the auditor's `flush` and `shutdown`), or when
/// the sink is dropped. Allowed requests, requests with a key, and lifecycle events pass
/// through untouched, in order.
///
/// ```
/// use keygate_core::audit::{AggregateSink, AuditSink, Decision, MemorySink, RequestEvent};
/// use keygate_core::DenialCode;
/// use std::time::{Duration, UNIX_EPOCH};
///
/// let memory = MemorySink::new();
/// let sink = AggregateSink::new(memory.clone()).window(Duration::from_secs(10));
/// for i in 0..1000u64 {
///     let mut e = RequestEvent::new(UNIX_EPOCH + Duration::from_millis(i), format!("r{i}"), "GET", "/x");
///     e.decision = Decision::Denied;
///     e.denial = Some(DenialCode::MissingKey);
///     e.client_ip = Some("203.0.113.9".parse().unwrap());
///     sink.record(&e.into()).unwrap();
/// }
/// sink.sync().unwrap();
/// let events = memory.events();
/// assert_eq!(events.len(), 2); // the first request, then a summary of the other 999
/// assert_eq!(events[1].as_denials().unwrap().count, 999);
/// ```
pub struct AggregateSink<S: AuditSink> {
    inner: S,
    window: Duration,
    max_sources: usize,
    state: Mutex<Window>,
}

impl<S: AuditSink> AggregateSink<S> {
    /// Folds into 10-second windows (see [`AggregateSink::window`]).
    pub fn new(inner: S) -> Self {
        AggregateSink {
            inner,
            window: Duration::from_secs(10),
            max_sources: DEFAULT_MAX_SOURCES,
            state: Mutex::new(Window::default()),
        }
    }

    /// The window length (at least 1 ms). Windows are counted from the Unix epoch.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window.max(Duration::from_millis(1));
        self
    }

    /// How many sources one window folds at most (default 10,000): denials from further
    /// sources are recorded one by one, so memory stays bounded.
    pub fn max_sources(mut self, n: usize) -> Self {
        self.max_sources = n;
        self
    }

    /// The sink events go to.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn index_of(&self, t: SystemTime) -> u64 {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        u64::try_from(since.as_nanos() / self.window.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Writes the summaries of the window held and empties it.
    fn close(&self, w: &mut Window) -> Result<(), AuditError> {
        let mut groups: Vec<(Source, Folded)> = w.groups.drain().collect();
        groups.sort_by_key(|(_, f)| f.order);
        let start = UNIX_EPOCH
            + Duration::from_nanos(
                u64::try_from(self.window.as_nanos())
                    .unwrap_or(u64::MAX)
                    .saturating_mul(w.index),
            );
        let mut result = Ok(());
        for (s, f) in groups.into_iter().filter(|(_, f)| f.count > 0) {
            let summary = DenialSummary {
                time: start,
                until: start + self.window,
                first: f.first,
                last: f.last,
                client_ip: s.client_ip,
                protocol: s.protocol,
                method: s.method,
                path: s.path,
                status: f.status,
                denial: s.denial,
                count: f.count,
            };
            let r = self.inner.record(&AuditEvent::Denials(summary));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    fn fold(&self, w: &mut Window, r: &RequestEvent) -> bool {
        let key = Source {
            client_ip: r.client_ip,
            denial: r.denial,
            protocol: r.protocol,
            method: r.method.clone(),
            // Owned: a shared `Text` would keep its whole buffer alive in the map.
            path: r.path.to_string(),
        };
        if let Some(f) = w.groups.get_mut(&key) {
            f.count += 1;
            if f.count == 1 {
                (f.first, f.last) = (r.time, r.time);
            } else {
                f.first = f.first.min(r.time);
                f.last = f.last.max(r.time);
            }
            return true;
        }
        if w.groups.len() < self.max_sources {
            let order = w.next_order;
            w.next_order += 1;
            w.groups.insert(
                key,
                Folded {
                    order,
                    status: r.status,
                    first: r.time,
                    last: r.time,
                    count: 0,
                },
            );
        }
        false
    }
}

impl<S: AuditSink> AuditSink for AggregateSink<S> {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let index = self.index_of(event.time());
        let closed = if index > w.index {
            let r = self.close(&mut w);
            w.next_order = 0;
            w.index = index;
            r
        } else {
            Ok(())
        };
        let folded = match event {
            AuditEvent::Request(r)
                if r.key_id.is_none() && r.decision == Decision::Denied && index == w.index =>
            {
                self.fold(&mut w, r)
            }
            _ => false,
        };
        let recorded = if folded {
            Ok(())
        } else {
            self.inner.record(event)
        };
        closed.and(recorded)
    }

    fn flush(&self) -> Result<(), AuditError> {
        self.inner.flush()
    }

    fn sync(&self) -> Result<(), AuditError> {
        let closed = {
            let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let r = self.close(&mut w);
            w.next_order = 0;
            r
        };
        closed.and(self.inner.sync())
    }
}

impl<S: AuditSink> Drop for AggregateSink<S> {
    fn drop(&mut self) {
        let mut w = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(e) = self.close(&mut w) {
            tracing::error!(error = %e, "audit denial summaries could not be written on drop");
        }
    }
}

impl<S: AuditSink> std::fmt::Debug for AggregateSink<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateSink")
            .field("window", &self.window)
            .field("max_sources", &self.max_sources)
            .finish_non_exhaustive()
    }
}
