//! When the protected service was called: a per-thread stamp the audit layer reads to learn
//! the time keygate's layers added (`RequestEvent::stack_time`).
//!
//! The audit layer arms the stamp right before it calls or polls its inner service; every
//! keygate check layer ([`check::Guarded`](crate::check::Guarded)) writes the time just
//! before it calls its own inner service, so after the audit layer's call (or poll) returns,
//! the stamp holds the moment the innermost layer handed the request on. Calls and polls
//! nest on one thread, so no other request can write in between. Unarmed (no audit layer
//! around), a check layer reads one thread-local and takes no time.

#[cfg(feature = "audit")]
use std::cell::Cell;
#[cfg(feature = "audit")]
use std::time::Instant;

#[cfg(feature = "audit")]
#[derive(Clone, Copy)]
enum Stamp {
    Off,
    Armed,
    At(Instant),
}

#[cfg(feature = "audit")]
thread_local! {
    static STAMP: Cell<Stamp> = const { Cell::new(Stamp::Off) };
}

/// Arms the stamp (the audit layer, before calling or polling its inner service).
#[cfg(feature = "audit")]
#[inline]
pub(crate) fn arm() {
    STAMP.with(|s| s.set(Stamp::Armed));
}

/// Disarms the stamp and returns the time written since [`arm`], if any.
#[cfg(feature = "audit")]
#[inline]
pub(crate) fn take() -> Option<Instant> {
    match STAMP.with(|s| s.replace(Stamp::Off)) {
        Stamp::At(t) => Some(t),
        _ => None,
    }
}

/// Notes that the protected service is being called now, if an audit layer asked.
#[cfg(feature = "audit")]
#[inline]
pub(crate) fn mark() {
    STAMP.with(|s| {
        if !matches!(s.get(), Stamp::Off) {
            s.set(Stamp::At(Instant::now()));
        }
    });
}

/// Without the audit layer nobody asks.
#[cfg(not(feature = "audit"))]
#[inline]
pub(crate) fn mark() {}
