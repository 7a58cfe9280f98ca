//! Acknowledgements that ride on a store's next call: the ids of operations whose answers
//! arrived, so Redis can drop what it kept to settle them had the answers been lost (the
//! quota ledger's admissions, the quota leases' reports).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// At most this many acknowledgements ride on one call (the rest wait for the next).
const PER_CALL: usize = 64;

/// The acknowledgements waiting for the next call.
pub(crate) struct Acks<T>(Mutex<Vec<T>>);

impl<T> Acks<T> {
    pub(crate) fn new() -> Self {
        Acks(Mutex::new(Vec::new()))
    }

    /// Records that the answer of operation `id` arrived.
    pub(crate) fn push(&self, id: T) {
        lock(&self.0).push(id);
    }

    /// Takes out at most [`PER_CALL`] acknowledgements to send with a call.
    pub(crate) fn take(&self) -> Vec<T> {
        let mut acks = lock(&self.0);
        let keep = acks.len().saturating_sub(PER_CALL);
        acks.split_off(keep)
    }

    /// Puts back acknowledgements sent with a call whose outcome is unknown: they are sent
    /// again (dropping an entry twice is harmless).
    pub(crate) fn put_back(&self, acks: Vec<T>) {
        if !acks.is_empty() {
            lock(&self.0).extend(acks);
        }
    }
}

/// A lock that shrugs off poisoning (what this crate guards with it stays consistent:
/// plain lists and maps).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
