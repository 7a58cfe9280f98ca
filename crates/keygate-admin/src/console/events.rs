//! The audit events the console shows: the newest ones, kept in memory by a sink of the
//! auditor's pipeline; and where the hash-chained log lies, to verify it.

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use keygate::core::audit::{AuditError, AuditEvent, AuditSink, VerifyOptions};

/// An [`AuditSink`] keeping the newest events (at most its capacity, oldest dropped) for
/// the console's audit and usage pages. Put a clone in the auditor's pipeline (with
/// `TeeSink`, behind `Auditor::spawn` so the request path never waits on its lock) and hand
/// another to [`Console::recent_events`](super::Console::recent_events).
#[derive(Clone)]
pub struct RecentEvents {
    inner: Arc<Mutex<VecDeque<AuditEvent>>>,
    capacity: usize,
}

impl RecentEvents {
    /// A buffer of at most `capacity` events (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecentEvents {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(4096)))),
            capacity,
        }
    }

    /// A copy of the events held, oldest first.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl AuditSink for RecentEvents {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let mut q = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() >= self.capacity {
            q.pop_front();
        }
        q.push_back(event.clone());
        Ok(())
    }
}

impl fmt::Debug for RecentEvents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecentEvents")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// The hash-chained audit log ([`FileSink`](keygate::core::audit::FileSink)) whose chain
/// the audit page verifies ([`verify_dir`](keygate::core::audit::verify_dir)) each time it
/// is shown.
#[derive(Clone)]
pub struct ChainCheck {
    pub(crate) dir: PathBuf,
    pub(crate) stem: String,
    pub(crate) options: VerifyOptions,
}

impl ChainCheck {
    /// The log of files `stem*` in `dir`, checked against `options` (the chain key above
    /// all).
    pub fn new(dir: impl Into<PathBuf>, stem: impl Into<String>, options: VerifyOptions) -> Self {
        ChainCheck {
            dir: dir.into(),
            stem: stem.into(),
            options,
        }
    }
}

impl fmt::Debug for ChainCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainCheck")
            .field("dir", &self.dir)
            .field("stem", &self.stem)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate::core::audit::RequestEvent;
    use std::time::UNIX_EPOCH;

    #[test]
    fn keeps_the_newest_events_up_to_its_capacity() {
        let r = RecentEvents::new(2);
        for i in 0..3 {
            r.record(&RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/").into())
                .unwrap();
        }
        let ids: Vec<String> = r
            .events()
            .iter()
            .map(|e| e.as_request().unwrap().request_id.to_string())
            .collect();
        assert_eq!(ids, ["r1", "r2"]);
    }
}
