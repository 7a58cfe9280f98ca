//! [`CountingStore`]: a memory key store that counts lookups and can simulate an outage.

use std::future::Future;
use std::pin::Pin;
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

type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

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

// `KeyStore` is an `async_trait`; these are its desugared signatures (the test crate does not
// depend on `async-trait`).
impl KeyStore for CountingStore {
    fn get<'life0, 'life1, 'async_trait>(
        &'life0 self,
        id: &'life1 KeyId,
    ) -> StoreFuture<'async_trait, Option<KeyRecord>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.check()?;
            self.inner.get(id).await
        })
    }

    fn insert<'life0, 'life1, 'async_trait>(
        &'life0 self,
        record: &'life1 KeyRecord,
    ) -> StoreFuture<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.insert(record).await
        })
    }

    fn update<'life0, 'life1, 'async_trait>(
        &'life0 self,
        record: &'life1 KeyRecord,
    ) -> StoreFuture<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.update(record).await
        })
    }

    fn list<'life0, 'life1, 'async_trait>(
        &'life0 self,
        filter: &'life1 KeyFilter,
    ) -> StoreFuture<'async_trait, Vec<KeyRecord>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            self.check()?;
            self.inner.list(filter).await
        })
    }
}
