//! [`CountingStore`]: a memory key store that counts lookups and last-used writes and can
//! simulate an outage.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use keygate_core::{
    Identity, KeyFilter, KeyId, KeyRecord, KeyStore, MemoryStore, Role, StoreError,
};

/// A [`MemoryStore`] that counts [`KeyStore::get`] calls and can simulate an outage (every
/// operation then fails with [`StoreError::Unavailable`]). Clones share the records, the
/// counter and the outage switch.
#[derive(Clone, Default)]
pub struct CountingStore {
    inner: MemoryStore,
    gets: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    last_used_writes: Arc<AtomicUsize>,
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

    /// How many times [`KeyStore::record_last_used`] was called (a request must never
    /// cause one; a flush causes one).
    pub fn last_used_writes(&self) -> usize {
        self.last_used_writes.load(Ordering::SeqCst)
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

    async fn update_versioned(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.check()?;
        self.inner.update_versioned(record).await
    }

    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        self.check()?;
        self.inner.roles(names).await
    }

    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        self.check()?;
        self.inner.list_roles().await
    }

    async fn insert_role(&self, role: &Role) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert_role(role).await
    }

    async fn update_role(&self, role: &Role) -> Result<(), StoreError> {
        self.check()?;
        self.inner.update_role(role).await
    }

    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete_role(name).await
    }

    async fn keys_with_role(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.check()?;
        self.inner.keys_with_role(name).await
    }

    async fn get_identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        self.check()?;
        self.inner.get_identity(name).await
    }

    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        self.check()?;
        self.inner.list_identities().await
    }

    async fn insert_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.check()?;
        self.inner.insert_identity(identity).await
    }

    async fn record_last_used(
        &self,
        used: &[(KeyId, std::time::SystemTime)],
    ) -> Result<(), StoreError> {
        self.last_used_writes.fetch_add(1, Ordering::SeqCst);
        self.check()?;
        self.inner.record_last_used(used).await
    }

    async fn update_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        self.check()?;
        self.inner.update_identity(identity).await
    }

    async fn delete_identity(&self, name: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete_identity(name).await
    }

    async fn keys_with_identity(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        self.check()?;
        self.inner.keys_with_identity(name).await
    }
}
