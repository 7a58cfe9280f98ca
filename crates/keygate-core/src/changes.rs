//! [`ChangeHandler`]: what a propagation path (keygate-sql's change follower, keygate-redis's
//! change watcher) tells about key changes made elsewhere.

use std::sync::Arc;

use crate::{KeyId, Verifier};

/// What a change follower or watcher tells about key changes made by another process.
/// [`Verifier`] implements it by invalidating its cache; one handler serves every
/// propagation path (the SQL stores' change table, Redis pub/sub).
pub trait ChangeHandler: Send + Sync + 'static {
    /// The key `id` was inserted, updated or deleted.
    fn changed(&self, id: &KeyId);
    /// Changes may have been missed (pruned before a follower read them, or published while
    /// a watcher was disconnected): forget everything derived from the store.
    fn resync(&self);
}

impl ChangeHandler for Verifier {
    fn changed(&self, id: &KeyId) {
        self.invalidate(id);
    }
    fn resync(&self) {
        self.invalidate_all();
    }
}

impl<H: ChangeHandler + ?Sized> ChangeHandler for Arc<H> {
    fn changed(&self, id: &KeyId) {
        (**self).changed(id);
    }
    fn resync(&self) {
        (**self).resync();
    }
}
