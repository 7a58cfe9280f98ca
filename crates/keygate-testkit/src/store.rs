//! [`CountingStore`]: a memory key store that counts lookups and can simulate an outage.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use keygate_core::{KeyFilter, KeyId, KeyRecord, KeyStore, MemoryStore, StoreError};

/// A [`MemoryStore`] that counts [`KeyStore::get`] calls and can simulate an outage (every
/// operation then fails with [`StoreError::Unavailable`]). Clones share the records, the
/// counter and the outage switch.
#[derive(Clone, Default)]
pub struct CountingStore {
    inner: MemoryStore,
    gets: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl CountingStore {
    /// An empty, reachable store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The records, bypassing the counter and the outage switch.
    pub fn memory(&self) -> &MemoryStore {
        &self.inner
    }

    /// How many times `get` was called.
    pub fn gets(&self) -> usize {
        self.gets.load(Ordering::SeqCst)
    }

    /// Starts (`true`) or ends (`false`) a simulated outage.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("simulated outage".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl KeyStore for CountingStore {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.get(id).await
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert(record).await
    }

    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.update(record).await
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        self.check()?;
        self.inner.list(filter).await
    }
}
