//! Delivery: the [`Auditor`] handle that layers and the key manager record events through,
//! either straight into a sink or through a bounded queue drained by a background writer.
//!
//! ```
//! use keygate_core::audit::{Auditor, MemorySink, Overflow, RequestEvent};
//! use std::time::UNIX_EPOCH;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let sink = MemorySink::new();
//! let auditor = Auditor::builder().overflow(Overflow::Drop).spawn(sink.clone()).unwrap();
//! assert!(auditor.try_record(RequestEvent::new(UNIX_EPOCH, "r1", "GET", "/").into()).is_ok());
//! auditor.flush().await.unwrap(); // waits until the event is in the sink
//! assert_eq!(sink.len(), 1);
//! assert_eq!(auditor.dropped(), 0);
//! # }
//! ```

use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use tokio::sync::{oneshot, Notify};

use super::event::AuditEvent;
use super::sink::{AuditError, AuditSink, TracingSink};

/// What a queued [`Auditor`] does with a request's event when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Wait for room: lossless; a request's response waits until its event is queued.
    #[default]
    Block,
    /// Drop the event and count it ([`AuditStats::dropped`]); requests never wait.
    Drop,
}

/// Counters of an [`Auditor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditStats {
    /// Events the sink accepted.
    pub written: u64,
    /// Events dropped: queue full under [`Overflow::Drop`], or the writer already shut down.
    pub dropped: u64,
    /// Events the sink failed to record (its error was logged with `tracing`).
    pub failed: u64,
}

#[derive(Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    /// The sink's last record or flush failed (cleared by the next success).
    failing: AtomicBool,
}

impl Counters {
    fn ok(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
        if self.failing.load(Ordering::Relaxed) {
            self.failing.store(false, Ordering::Release);
        }
    }

    fn fail(&self) {
        self.failed.fetch_add(1, Ordering::AcqRel);
        self.failing.store(true, Ordering::Release);
    }

    fn snapshot(&self) -> AuditStats {
        AuditStats {
            written: self.written.load(Ordering::Acquire),
            dropped: self.dropped.load(Ordering::Acquire),
            failed: self.failed.load(Ordering::Acquire),
        }
    }
}

/// Records audit events: into a sink directly, or through a bounded queue and a background
/// writer thread. Cheap to clone; clones share the queue, the counters and the writer, and
/// any clone is the flush and shutdown handle.
///
/// ```
/// use keygate_core::audit::{Auditor, MemorySink, Overflow, RequestEvent};
/// use std::time::UNIX_EPOCH;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let sink = MemorySink::new();
/// let auditor = Auditor::builder().capacity(1024).overflow(Overflow::Block).spawn(sink.clone()).unwrap();
/// for i in 0..100 {
///     auditor.record(RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/").into()).await.unwrap();
/// }
/// let stats = auditor.shutdown().await;
/// assert_eq!(stats.written, 100);
/// assert_eq!(sink.len(), 100);
/// # }
/// ```
#[derive(Clone)]
pub struct Auditor {
    handle: Arc<Handle>,
}

struct Handle {
    target: Target,
    counters: Arc<Counters>,
}

enum Target {
    Direct(Arc<dyn AuditSink>),
    Queued(Arc<Queue>),
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last producer is gone: let the writer drain, sync and exit.
        if let Target::Queued(q) = &self.target {
            q.control(Control::Close);
        }
    }
}

/// Configures a queued [`Auditor`].
#[derive(Debug, Clone)]
pub struct AuditorBuilder {
    capacity: usize,
    overflow: Overflow,
    linger: Duration,
}

impl AuditorBuilder {
    /// How many events the queue holds (default 8,192; at least 2).
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = n.max(2);
        self
    }

    /// What to do when the queue is full (default [`Overflow::Block`]).
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// How long the idle writer sleeps before looking at the queue again (default 5 ms).
    /// Producers wake it early only when the queue is a quarter full, so a quiet service
    /// does not pay a thread wake-up per event; this bounds how long an event waits in
    /// memory.
    pub fn linger(mut self, linger: Duration) -> Self {
        self.linger = linger.max(Duration::from_micros(100));
        self
    }

    /// Starts the writer thread over `sink`.
    pub fn spawn(self, sink: impl AuditSink) -> std::io::Result<Auditor> {
        let counters = Arc::new(Counters::default());
        let queue = Arc::new(Queue {
            events: ArrayQueue::new(self.capacity),
            wake_at: (self.capacity / 4).max(1),
            overflow: self.overflow,
            linger: self.linger,
            writer: OnceLock::new(),
            sleeping: AtomicBool::new(false),
            space: Notify::new(),
            controls: Mutex::new(Controls::default()),
            has_controls: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
        });
        let q = queue.clone();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("keygate-audit".into())
            .spawn(move || writer(q, Box::new(sink), c))?;
        let _ = queue.writer.set(thread.thread().clone());
        Ok(Auditor {
            handle: Arc::new(Handle {
                target: Target::Queued(queue),
                counters,
            }),
        })
    }
}

impl Auditor {
    /// Records into `sink` on the caller, synchronously. For sinks that never block (memory,
    /// `tracing` with a non-blocking subscriber).
    pub fn direct(sink: impl AuditSink) -> Self {
        Auditor {
            handle: Arc::new(Handle {
                target: Target::Direct(Arc::new(sink)),
                counters: Arc::default(),
            }),
        }
    }

    /// Records as `tracing` events, directly (see [`TracingSink`]). The default.
    pub fn tracing() -> Self {
        Self::direct(TracingSink)
    }

    /// Configures a queued auditor (bounded queue, background writer thread).
    pub fn builder() -> AuditorBuilder {
        AuditorBuilder {
            capacity: 8192,
            overflow: Overflow::Block,
            linger: Duration::from_millis(5),
        }
    }

    /// A queued auditor over `sink` with the default settings.
    pub fn spawn(sink: impl AuditSink) -> std::io::Result<Self> {
        Self::builder().spawn(sink)
    }

    /// The overflow policy (`Block` for a direct auditor: it never drops).
    pub fn overflow(&self) -> Overflow {
        match &self.handle.target {
            Target::Direct(_) => Overflow::Block,
            Target::Queued(q) => q.overflow,
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> AuditStats {
        self.handle.counters.snapshot()
    }

    /// Events dropped so far (queue full under [`Overflow::Drop`], or after shutdown).
    pub fn dropped(&self) -> u64 {
        self.handle.counters.dropped.load(Ordering::Acquire)
    }

    /// How many events wait in the queue for the writer now (0 for a direct auditor).
    pub fn queue_depth(&self) -> usize {
        match &self.handle.target {
            Target::Direct(_) => 0,
            Target::Queued(q) => q.events.len(),
        }
    }

    /// How many events the queue holds at most (0 for a direct auditor).
    pub fn queue_capacity(&self) -> usize {
        match &self.handle.target {
            Target::Direct(_) => 0,
            Target::Queued(q) => q.events.capacity(),
        }
    }

    /// Whether the writer has shut down (a direct auditor never does).
    pub fn is_closed(&self) -> bool {
        match &self.handle.target {
            Target::Direct(_) => false,
            Target::Queued(q) => q.closed.load(Ordering::Acquire),
        }
    }

    /// Records `event` without waiting: for the request path.
    ///
    /// Returns the event back only when the queue is full under [`Overflow::Block`]: the
    /// caller must then wait with [`Auditor::record`]. Under [`Overflow::Drop`] a full queue
    /// drops and counts the event; after shutdown every event is dropped and counted.
    // The event comes back by value (no allocation) on the rare full-queue path.
    #[allow(clippy::result_large_err)]
    #[inline]
    pub fn try_record(&self, event: AuditEvent) -> Result<(), AuditEvent> {
        match &self.handle.target {
            Target::Direct(sink) => {
                self.direct_record(sink, &event);
                Ok(())
            }
            Target::Queued(q) => match q.push(event) {
                Ok(()) => Ok(()),
                Err(Rejected::Full(event)) if q.overflow == Overflow::Block => Err(event),
                Err(_) => {
                    self.handle.counters.dropped.fetch_add(1, Ordering::AcqRel);
                    Ok(())
                }
            },
        }
    }

    /// Records `event` without ever waiting, whatever the overflow policy: a full queue drops
    /// and counts it. For places that cannot wait (a `Drop` implementation).
    pub fn record_nowait(&self, event: AuditEvent) {
        if self.try_record(event).is_err() {
            self.handle.counters.dropped.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Records `event`, waiting for room in the queue whatever the overflow policy
    /// (lifecycle events use this: they are never dropped). Fails only after shutdown. If the
    /// future is dropped while it waits, the event is queued when there is room by then,
    /// else dropped and counted.
    pub async fn record(&self, mut event: AuditEvent) -> Result<(), AuditError> {
        let q = match &self.handle.target {
            Target::Direct(sink) => {
                let result = call(&**sink, |s| s.record(&event));
                match &result {
                    Ok(()) => self.handle.counters.ok(),
                    Err(_) => self.handle.counters.fail(),
                }
                return result;
            }
            Target::Queued(q) => q,
        };
        // If this future is dropped while it waits for room, the event is not lost
        // silently: it is queued if there is room by then, else dropped and counted.
        let mut held = Held {
            auditor: self,
            event: None,
        };
        loop {
            let notified = q.space.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            match q.push(event) {
                Ok(()) => return Ok(()),
                Err(Rejected::Closed(_)) => {
                    self.handle.counters.dropped.fetch_add(1, Ordering::AcqRel);
                    return Err(AuditError::Closed);
                }
                Err(Rejected::Full(e)) => {
                    held.event = Some(e);
                    q.wake();
                    notified.await;
                    match held.event.take() {
                        Some(e) => event = e,
                        None => return Ok(()),
                    }
                }
            }
        }
    }

    /// Waits until every event recorded before this call is in the sink and synced
    /// ([`AuditSink::sync`]: on disk for files).
    pub async fn flush(&self) -> Result<(), AuditError> {
        match &self.handle.target {
            Target::Direct(sink) => sink.sync(),
            Target::Queued(q) => {
                let (tx, rx) = oneshot::channel();
                if !q.control(Control::Flush(tx)) {
                    return Err(AuditError::Closed);
                }
                rx.await.unwrap_or(Err(AuditError::Closed))
            }
        }
    }

    /// Stops accepting events, writes and syncs everything queued, stops the writer and
    /// returns the final counters. Events recorded afterwards are dropped and counted.
    /// Calling it again (from any clone) just returns the counters.
    pub async fn shutdown(&self) -> AuditStats {
        match &self.handle.target {
            Target::Direct(sink) => {
                if let Err(e) = sink.sync() {
                    tracing::error!(error = %e, "audit sink sync failed at shutdown");
                }
            }
            Target::Queued(q) => {
                let (tx, rx) = oneshot::channel();
                if q.control(Control::Shutdown(tx)) {
                    let _ = rx.await;
                }
            }
        }
        self.stats()
    }

    fn direct_record(&self, sink: &Arc<dyn AuditSink>, event: &AuditEvent) {
        match call(&**sink, |s| s.record(event)) {
            Ok(()) => self.handle.counters.ok(),
            Err(e) => {
                self.handle.counters.fail();
                tracing::error!(error = %e, "audit sink failed to record an event");
            }
        }
    }

    /// Whether events are being written: `false` after shutdown, and while the sink's last
    /// record or flush failed (until one succeeds again). One atomic load or two: cheap
    /// enough for the request path (the `keygate` crate's `AuditLayer::fail_closed` reads it
    /// per request).
    #[inline]
    pub fn is_healthy(&self) -> bool {
        !self.handle.counters.failing.load(Ordering::Acquire) && !self.is_closed()
    }

    /// Records `event` and waits until the sink has written it and made it durable
    /// ([`AuditSink::record`], then [`AuditSink::sync`]), returning the sink's error if
    /// either failed. For events that must not be lost silently (key changes: the
    /// [`KeyManager`](crate::KeyManager) uses it). Queued auditors write it on the writer
    /// thread, after the events already queued, so the chain stays in one order.
    pub async fn record_durable(&self, event: AuditEvent) -> Result<(), AuditError> {
        match &self.handle.target {
            Target::Direct(sink) => {
                let result =
                    call(&**sink, |s| s.record(&event)).and_then(|()| call(&**sink, |s| s.sync()));
                match &result {
                    Ok(()) => self.handle.counters.ok(),
                    Err(_) => self.handle.counters.fail(),
                }
                result
            }
            Target::Queued(q) => {
                let (tx, rx) = oneshot::channel();
                if !q.control(Control::Record(Box::new(event), tx)) {
                    self.handle.counters.dropped.fetch_add(1, Ordering::AcqRel);
                    return Err(AuditError::Closed);
                }
                rx.await.unwrap_or(Err(AuditError::Closed))
            }
        }
    }
}

/// An event a cancelled [`Auditor::record`] still holds.
struct Held<'a> {
    auditor: &'a Auditor,
    event: Option<AuditEvent>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.event.take() {
            self.auditor.record_nowait(e);
        }
    }
}

impl Default for Auditor {
    /// [`Auditor::tracing`].
    fn default() -> Self {
        Self::tracing()
    }
}

impl fmt::Debug for Auditor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.handle.target {
            Target::Direct(_) => "direct",
            Target::Queued(_) => "queued",
        };
        f.debug_struct("Auditor")
            .field("kind", &kind)
            .field("overflow", &self.overflow())
            .field("stats", &self.stats())
            .finish()
    }
}

enum Control {
    Flush(oneshot::Sender<Result<(), AuditError>>),
    /// Write this event, sync, and say how it went.
    Record(Box<AuditEvent>, oneshot::Sender<Result<(), AuditError>>),
    Shutdown(oneshot::Sender<()>),
    /// The last handle was dropped: shut down, nobody waits.
    Close,
}

#[derive(Default)]
struct Controls {
    list: Vec<Control>,
    /// The writer has exited: controls are answered at once.
    finished: bool,
}

struct Queue {
    events: ArrayQueue<AuditEvent>,
    wake_at: usize,
    overflow: Overflow,
    linger: Duration,
    writer: OnceLock<Thread>,
    /// Set by the writer before it parks.
    sleeping: AtomicBool,
    /// Notified by the writer after it made room (or closed).
    space: Notify,
    controls: Mutex<Controls>,
    has_controls: AtomicBool,
    /// No event is accepted any more.
    closed: AtomicBool,
    /// Producers between their `closed` check and their push.
    inflight: AtomicUsize,
}

enum Rejected {
    Full(AuditEvent),
    Closed(#[allow(dead_code)] AuditEvent),
}

impl Queue {
    #[allow(clippy::result_large_err)]
    #[inline]
    fn push(&self, event: AuditEvent) -> Result<(), Rejected> {
        // `inflight` lets the writer's final drain wait for producers that saw the queue
        // open, so an accepted event is never lost at shutdown.
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return Err(Rejected::Closed(event));
        }
        let pushed = self.events.push(event);
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        match pushed {
            Ok(()) => {
                // Only look at the queue's length (a cache line the writer keeps writing)
                // when the writer sleeps.
                if self.sleeping.load(Ordering::Relaxed) && self.events.len() >= self.wake_at {
                    self.wake();
                }
                Ok(())
            }
            Err(event) => Err(Rejected::Full(event)),
        }
    }

    /// Wakes the writer if it sleeps.
    fn wake(&self) {
        if self.sleeping.load(Ordering::Acquire) && self.sleeping.swap(false, Ordering::AcqRel) {
            if let Some(t) = self.writer.get() {
                t.unpark();
            }
        }
    }

    /// Hands a control message to the writer; `false` (and the message answered or dropped)
    /// when the writer has already exited.
    fn control(&self, c: Control) -> bool {
        {
            let mut controls = self.controls.lock().unwrap_or_else(PoisonError::into_inner);
            if controls.finished {
                drop(controls);
                answer_finished(c);
                return false;
            }
            controls.list.push(c);
            self.has_controls.store(true, Ordering::SeqCst);
        }
        if let Some(t) = self.writer.get() {
            self.sleeping.store(false, Ordering::Release);
            t.unpark();
        }
        true
    }

    fn take_controls(&self) -> Vec<Control> {
        if !self.has_controls.swap(false, Ordering::SeqCst) {
            return Vec::new();
        }
        std::mem::take(
            &mut self
                .controls
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .list,
        )
    }
}

fn answer_finished(c: Control) {
    match c {
        Control::Flush(tx) | Control::Record(_, tx) => {
            let _ = tx.send(Err(AuditError::Closed));
        }
        Control::Shutdown(tx) => {
            let _ = tx.send(());
        }
        Control::Close => {}
    }
}

/// Marks the queue closed and finished however the writer exits (even by a panic), so no
/// producer or flusher waits forever.
struct ExitGuard(Arc<Queue>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let q = &self.0;
        q.closed.store(true, Ordering::SeqCst);
        let rest = {
            let mut controls = q.controls.lock().unwrap_or_else(PoisonError::into_inner);
            controls.finished = true;
            std::mem::take(&mut controls.list)
        };
        rest.into_iter().for_each(answer_finished);
        q.space.notify_waiters();
    }
}

fn writer(q: Arc<Queue>, sink: Box<dyn AuditSink>, counters: Arc<Counters>) {
    let _guard = ExitGuard(q.clone());
    let sink = &*sink;
    loop {
        // Controls first: every event queued before a flush request is drained below.
        let controls = q.take_controls();
        let n = drain(&q, sink, &counters);
        if n > 0 {
            q.space.notify_waiters();
            if let Err(e) = call(sink, |s| s.flush()) {
                counters.failing.store(true, Ordering::Release);
                tracing::error!(error = %e, "audit sink flush failed");
            }
        }
        let mut shutdown = Vec::new();
        let mut close = false;
        for c in controls {
            match c {
                Control::Flush(tx) => {
                    let _ = tx.send(call(sink, |s| s.sync()));
                }
                Control::Record(event, tx) => {
                    let _ = tx.send(durable(sink, &event, &counters));
                }
                Control::Shutdown(tx) => shutdown.push(tx),
                Control::Close => close = true,
            }
        }
        if close || !shutdown.is_empty() {
            q.closed.store(true, Ordering::SeqCst);
            while q.inflight.load(Ordering::SeqCst) > 0 {
                std::thread::yield_now();
            }
            drain(&q, sink, &counters);
            guarded("sync", || sink.sync());
            for c in q.take_controls() {
                match c {
                    Control::Flush(tx) => {
                        let _ = tx.send(Ok(()));
                    }
                    Control::Record(event, tx) => {
                        let _ = tx.send(durable(sink, &event, &counters));
                    }
                    Control::Shutdown(tx) => shutdown.push(tx),
                    Control::Close => {}
                }
            }
            drop(_guard);
            for tx in shutdown {
                let _ = tx.send(());
            }
            return;
        }
        if n == 0 {
            q.sleeping.store(true, Ordering::SeqCst);
            if q.events.is_empty() && !q.has_controls.load(Ordering::SeqCst) {
                std::thread::park_timeout(q.linger);
            }
            q.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

fn drain(q: &Queue, sink: &dyn AuditSink, counters: &Counters) -> usize {
    let mut n = 0;
    while let Some(event) = q.events.pop() {
        n += 1;
        match call(sink, |s| s.record(&event)) {
            Ok(()) => counters.ok(),
            Err(e) => {
                counters.fail();
                tracing::error!(error = %e, "audit sink failed to record an event");
            }
        }
        // Let waiting producers in while a long backlog drains.
        if n % 256 == 0 {
            q.space.notify_waiters();
        }
    }
    n
}

/// Writes one event and syncs, counting the outcome.
fn durable(
    sink: &dyn AuditSink,
    event: &AuditEvent,
    counters: &Counters,
) -> Result<(), AuditError> {
    let result = call(sink, |s| s.record(event)).and_then(|()| call(sink, |s| s.sync()));
    match &result {
        Ok(()) => counters.ok(),
        Err(e) => {
            counters.fail();
            tracing::error!(error = %e, "audit sink failed to record an event");
        }
    }
    result
}

fn call(
    sink: &dyn AuditSink,
    f: impl FnOnce(&dyn AuditSink) -> Result<(), AuditError>,
) -> Result<(), AuditError> {
    catch_unwind(AssertUnwindSafe(|| f(sink)))
        .unwrap_or_else(|_| Err(AuditError::Other("the audit sink panicked".into())))
}

fn guarded(what: &str, f: impl FnOnce() -> Result<(), AuditError>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "audit sink {what} failed"),
        Err(_) => tracing::error!("audit sink panicked during {what}"),
    }
}
