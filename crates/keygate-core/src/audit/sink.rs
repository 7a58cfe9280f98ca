//! Where audit events go: the [`AuditSink`] trait, an in-memory sink for tests and a
//! `tracing` sink.
//!
//! ```
//! use keygate_core::audit::{AuditError, AuditEvent, AuditSink};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//!
//! /// A sink of your own: count events.
//! #[derive(Default)]
//! struct Counter(AtomicUsize);
//!
//! impl AuditSink for Counter {
//!     fn record(&self, _event: &AuditEvent) -> Result<(), AuditError> {
//!         self.0.fetch_add(1, Ordering::Relaxed);
//!         Ok(())
//!     }
//! }
//!
//! let c = Counter::default();
//! c.record(&keygate_core::audit::RequestEvent::new(std::time::UNIX_EPOCH, "r", "GET", "/").into()).unwrap();
//! assert_eq!(c.0.load(Ordering::Relaxed), 1);
//! ```

use std::sync::{Arc, Mutex, PoisonError};

use super::event::AuditEvent;

/// Why a sink could not record or flush.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// Reading or writing a file failed.
    #[error("audit i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// An event could not be encoded.
    #[error("audit event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
    /// The background writer has shut down; the event was not recorded.
    #[error("the audit writer has shut down")]
    Closed,
    /// Another sink-specific failure.
    #[error("audit sink error: {0}")]
    Other(String),
    /// Another writer held the log's lock for too long.
    #[error("audit log locked: {0}")]
    Locked(String),
    /// The log does not match its checkpoint (or has none): it was cut, changed or
    /// replaced, and is not continued.
    #[error("audit log refused: {0}")]
    Tampered(String),
    /// The chain key could not be loaded (the message names the source, never the key).
    #[error("audit chain key: {0}")]
    Key(String),
}

/// A destination for audit events.
///
/// Called from one background writer thread (see [`Auditor::spawn`](super::Auditor::spawn)),
/// or directly on the request path for sinks that never block (see
/// [`Auditor::direct`](super::Auditor::direct)). Implementations must never record a secret:
/// events carry none, so a sink that writes what it is given is safe.
pub trait AuditSink: Send + Sync + 'static {
    /// Records one event. A sink may buffer; [`AuditSink::flush`] pushes buffers out.
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError>;

    /// Hands buffered events to the operating system (or the next stage). The background
    /// writer calls it whenever its queue runs dry.
    fn flush(&self) -> Result<(), AuditError> {
        Ok(())
    }

    /// Makes everything recorded so far durable (`fsync` for files). Called by
    /// [`Auditor::flush`](super::Auditor::flush) and at shutdown. Defaults to
    /// [`AuditSink::flush`].
    fn sync(&self) -> Result<(), AuditError> {
        self.flush()
    }
}

impl<T: AuditSink + ?Sized> AuditSink for Arc<T> {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        (**self).record(event)
    }
    fn flush(&self) -> Result<(), AuditError> {
        (**self).flush()
    }
    fn sync(&self) -> Result<(), AuditError> {
        (**self).sync()
    }
}

/// Records into two sinks: every event into the first, and every event (or, built with
/// [`TeeSink::lifecycle`], only key lifecycle events) into the second. Both are always
/// tried; the first error is returned. For one trail of key changes in two places (a
/// server's file log and the key database's audit table).
///
/// ```
/// use keygate_core::audit::{AuditSink, MemorySink, RequestEvent, TeeSink};
/// use std::time::UNIX_EPOCH;
///
/// let (all, keys) = (MemorySink::new(), MemorySink::new());
/// let tee = TeeSink::lifecycle(all.clone(), keys.clone());
/// tee.record(&RequestEvent::new(UNIX_EPOCH, "r1", "GET", "/").into()).unwrap();
/// assert_eq!((all.len(), keys.len()), (1, 0));
/// ```
#[derive(Debug)]
pub struct TeeSink<A, B> {
    first: A,
    second: B,
    lifecycle_only: bool,
}

impl<A: AuditSink, B: AuditSink> TeeSink<A, B> {
    /// Every event into both.
    pub fn new(first: A, second: B) -> Self {
        TeeSink {
            first,
            second,
            lifecycle_only: false,
        }
    }

    /// Every event into `first`; lifecycle events also into `second`.
    pub fn lifecycle(first: A, second: B) -> Self {
        TeeSink {
            first,
            second,
            lifecycle_only: true,
        }
    }
}

impl<A: AuditSink, B: AuditSink> AuditSink for TeeSink<A, B> {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let a = self.first.record(event);
        let b = if self.lifecycle_only && event.as_lifecycle().is_none() {
            Ok(())
        } else {
            self.second.record(event)
        };
        a.and(b)
    }
    fn flush(&self) -> Result<(), AuditError> {
        let a = self.first.flush();
        a.and(self.second.flush())
    }
    fn sync(&self) -> Result<(), AuditError> {
        let a = self.first.sync();
        a.and(self.second.sync())
    }
}

/// Keeps every event in memory, in order. For tests and examples; clones share the events.
///
/// ```
/// use keygate_core::audit::{AuditEvent, AuditSink, MemorySink, RequestEvent};
/// use std::time::UNIX_EPOCH;
///
/// let sink = MemorySink::new();
/// sink.record(&RequestEvent::new(UNIX_EPOCH, "r1", "GET", "/").into()).unwrap();
/// assert_eq!(sink.len(), 1);
/// assert_eq!(sink.events()[0].as_request().unwrap().request_id, "r1");
/// ```
#[derive(Clone, Default)]
pub struct MemorySink {
    events: Arc<Mutex<Vec<AuditEvent>>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the events recorded so far, oldest first.
    pub fn events(&self) -> Vec<AuditEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Takes the events recorded so far, leaving the sink empty.
    pub fn take(&self) -> Vec<AuditEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// How many events are held.
    pub fn len(&self) -> usize {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MemorySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySink")
            .field("events", &self.len())
            .finish()
    }
}

impl AuditSink for MemorySink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(event.clone());
        Ok(())
    }
}

/// Emits each event as a `tracing` event at `INFO` on the target `keygate::audit`, with one
/// field per event field. The default sink: the subscriber decides where events go (for
/// files off the request path, use `tracing-appender`'s non-blocking writer, or the
/// [`FileSink`](super::FileSink) behind a background [`Auditor`](super::Auditor)).
///
/// ```
/// use keygate_core::audit::{AuditSink, RequestEvent, TracingSink};
/// use std::time::UNIX_EPOCH;
///
/// // Without a subscriber the event goes nowhere, and that is not an error.
/// assert!(TracingSink.record(&RequestEvent::new(UNIX_EPOCH, "r1", "GET", "/").into()).is_ok());
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TracingSink;

impl AuditSink for TracingSink {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        match event {
            AuditEvent::Request(r) => {
                tracing::info!(
                    target: "keygate::audit",
                    kind = "request",
                    time = %crate::time::rfc3339_micros(r.time),
                    request_id = %r.request_id,
                    key_id = r.key_id.as_ref().map(|k| k.as_str()),
                    key_name = r.key_name.as_deref(),
                    subject = r.subject.as_deref(),
                    tenant = r.tenant.as_deref(),
                    client_ip = r.client_ip.map(tracing::field::display),
                    protocol = ?r.protocol,
                    rpc = r.rpc.as_deref(),
                    method = %r.method,
                    path = %r.path,
                    status = r.status,
                    grpc_status = r.grpc_status,
                    decision = ?r.decision,
                    denial = r.denial.map(|d| d.as_str()),
                    latency_us = u64::try_from(r.latency.as_micros()).unwrap_or(u64::MAX),
                    "request"
                );
            }
            AuditEvent::Denials(d) => {
                tracing::info!(
                    target: "keygate::audit",
                    kind = "denials",
                    time = %humantime::format_rfc3339_micros(d.time),
                    until = %humantime::format_rfc3339_micros(d.until),
                    client_ip = d.client_ip.map(tracing::field::display),
                    protocol = ?d.protocol,
                    method = %d.method,
                    path = %d.path,
                    status = d.status,
                    denial = d.denial.map(|c| c.as_str()),
                    count = d.count,
                    "denials"
                );
            }
            AuditEvent::Anomaly(a) => {
                tracing::warn!(
                    target: "keygate::audit",
                    kind = "anomaly",
                    time = %crate::time::rfc3339_micros(a.time),
                    anomaly = a.kind.as_str(),
                    key_id = a.key_id.as_ref().map(|k| k.as_str()),
                    key_name = a.key_name.as_deref(),
                    client_ip = a.client_ip.map(tracing::field::display),
                    network = a.network.as_deref(),
                    count = a.count,
                    threshold = a.threshold,
                    baseline = a.baseline,
                    "anomaly {}",
                    a.kind
                );
            }
            AuditEvent::Lifecycle(l) => {
                let changes = serde_json::to_string(&l.changes)?;
                tracing::info!(
                    target: "keygate::audit",
                    kind = "lifecycle",
                    time = %crate::time::rfc3339_micros(l.time),
                    actor = %l.actor,
                    action = l.action.as_str(),
                    key_id = l.key_id.as_str(),
                    key_name = %l.key_name,
                    subject = l.subject.as_deref(),
                    status = l.status.as_str(),
                    related_key = l.related_key.as_ref().map(|k| k.as_str()),
                    changes = %changes,
                    "key {}",
                    l.action
                );
            }
        }
        Ok(())
    }
}
