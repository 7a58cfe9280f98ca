//! Where key records live: the [`KeyStore`] trait and the in-memory [`MemoryStore`].

use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::key::KeyId;
use crate::record::{KeyRecord, KeyStatus};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store could not be reached or did not answer. Requests that need it are denied
    /// with `store_unavailable` (fail closed).
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// A record with this id already exists.
    #[error("a key with id {0} already exists")]
    AlreadyExists(KeyId),
    /// No record with this id.
    #[error("no key with id {0}")]
    NotFound(KeyId),
    /// A stored record could not be read (a damaged or foreign row).
    #[error("stored key record is unreadable: {0}")]
    Corrupt(String),
}

/// Which records [`KeyStore::list`] returns. Every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFilter {
    /// Only keys of this owner.
    pub owner: Option<String>,
    /// Only keys with this status.
    pub status: Option<KeyStatus>,
    /// Only keys with this prefix.
    pub prefix: Option<String>,
}

impl KeyFilter {
    /// Whether `record` passes the filter.
    pub fn matches(&self, record: &KeyRecord) -> bool {
        self.owner
            .as_deref()
            .is_none_or(|o| record.owner.as_deref() == Some(o))
            && self.status.is_none_or(|s| record.status == s)
            && self
                .prefix
                .as_deref()
                .is_none_or(|p| record.prefix.as_str() == p)
    }
}

/// Persistent storage of key records.
///
/// The verifier calls [`KeyStore::get`] only on a cache miss; it is never on the hot path of
/// a known key.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The record with this id, if any.
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Adds a new record; [`StoreError::AlreadyExists`] if the id is taken.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Replaces an existing record; [`StoreError::NotFound`] if there is none.
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// The records passing `filter`, ordered by creation time, then id.
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError>;
}

#[async_trait]
impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        (**self).get(id).await
    }
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        (**self).insert(record).await
    }
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        (**self).update(record).await
    }
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        (**self).list(filter).await
    }
}

/// An in-memory key store (a concurrent hash map). For tests, examples and single-process
/// services that create their keys at start. Clones share the same records.
#[derive(Clone, Default)]
pub struct MemoryStore {
    records: Arc<DashMap<KeyId, KeyRecord>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("records", &self.records.len())
            .finish()
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self.records.get(id).map(|r| r.clone()))
    }

    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        match self.records.entry(record.id) {
            dashmap::Entry::Occupied(_) => Err(StoreError::AlreadyExists(record.id)),
            dashmap::Entry::Vacant(v) => {
                v.insert(record.clone());
                Ok(())
            }
        }
    }

    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError> {
        match self.records.get_mut(&record.id) {
            Some(mut r) => {
                *r = record.clone();
                Ok(())
            }
            None => Err(StoreError::NotFound(record.id)),
        }
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let mut out: Vec<KeyRecord> = self
            .records
            .iter()
            .filter(|r| filter.matches(r.value()))
            .map(|r| r.value().clone())
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}
