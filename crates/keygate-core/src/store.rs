//! Where key records live: the [`KeyStore`] trait and the in-memory [`MemoryStore`].

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use dashmap::DashMap;

use crate::key::KeyId;
use crate::record::{KeyRecord, KeyStatus};
use crate::role::{Identity, Role};

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
    /// A conditional write found a newer version than the one it was based on: someone
    /// else changed the record first. Nothing was written; read it again and retry.
    #[error("{kind} {name} was changed by someone else; nothing was written")]
    Conflict {
        /// `key`, `role` or `identity`.
        kind: &'static str,
        /// The key id or the name.
        name: String,
    },
    /// No role or identity with this name.
    #[error("no {kind} named {name}")]
    NoSuchName {
        /// `role` or `identity`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A role or identity with this name already exists.
    #[error("a {kind} named {name} already exists")]
    NameTaken {
        /// `role` or `identity`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The store does not keep this kind of data (roles or identities).
    #[error("this key store does not support {0}")]
    Unsupported(&'static str),
    /// The role or identity is still held by keys, so it was not deleted.
    #[error("{kind} {name} is held by {holders} key(s) that are not revoked; nothing was deleted")]
    InUse {
        /// `identity`.
        kind: &'static str,
        /// The name.
        name: String,
        /// How many keys hold it.
        holders: usize,
    },
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

/// A stored row that [`KeyStore::list_report`] could not read and left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedRow {
    /// The key id, when the row's id is a valid one.
    pub key_id: Option<KeyId>,
    /// The id as stored (cut to 32 characters and escaped when it is not a key id).
    pub id: String,
    /// The first column that could not be read (`status`, `scopes`, `id`, ...).
    pub column: String,
    /// Why, in a few words. Never a stored secret or digest.
    pub reason: String,
}

impl std::fmt::Display for SkippedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "key {}: column {}: {}",
            self.id, self.column, self.reason
        )
    }
}

/// The readable records of a listing and the rows left out ([`KeyStore::list_report`]).
#[derive(Debug, Clone, Default)]
pub struct KeyListing {
    /// The records passing the filter, ordered by creation time, then id.
    pub records: Vec<KeyRecord>,
    /// The rows that could not be read, in the order met.
    pub skipped: Vec<SkippedRow>,
}

/// What [`KeyStore::set_status`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusWrite {
    /// The status was written.
    Written,
    /// The key already had that status: nothing was written.
    Unchanged,
    /// The key is revoked (for good): nothing was written.
    Revoked,
}

/// Persistent storage of key records.
///
/// The verifier calls [`KeyStore::get`] only on a cache miss; it is never on the hot path of
/// a known key.
///
/// A stored record that cannot be read (a corrupt row) is [`StoreError::Corrupt`] from
/// [`KeyStore::get`] (the verifier refuses the key with `corrupt_key`); listings leave such
/// rows out instead of failing ([`KeyStore::list_report`] says which), and
/// [`KeyStore::set_status`] can still revoke or disable them.
#[async_trait]
pub trait KeyStore: Send + Sync + 'static {
    /// The record with this id, if any.
    async fn get(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    /// Adds a new record; [`StoreError::AlreadyExists`] if the id is taken.
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// Replaces an existing record; [`StoreError::NotFound`] if there is none.
    async fn update(&self, record: &KeyRecord) -> Result<(), StoreError>;
    /// The records passing `filter`, ordered by creation time, then id. Rows that cannot
    /// be read are left out (stores that can have such rows log a warning for each; use
    /// [`KeyStore::list_report`] to learn which).
    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError>;

    /// [`KeyStore::list`], with the rows that could not be read and were left out. The
    /// default has none to report (a store that never holds unreadable rows).
    async fn list_report(&self, filter: &KeyFilter) -> Result<KeyListing, StoreError> {
        Ok(KeyListing {
            records: self.list(filter).await?,
            skipped: Vec::new(),
        })
    }

    /// Sets only the status (and `updated_at`) of key `id`, without reading the rest of its
    /// record, so a key whose other columns are unreadable can still be revoked or
    /// disabled. A revoked key stays revoked ([`StatusWrite::Revoked`]);
    /// [`StoreError::NotFound`] if there is no such key.
    ///
    /// The default reads the record and writes it back whole (so it fails on a record it
    /// cannot read); stores that can hold unreadable rows override it.
    async fn set_status(
        &self,
        id: &KeyId,
        status: KeyStatus,
        at: SystemTime,
    ) -> Result<StatusWrite, StoreError> {
        let Some(mut record) = self.get(id).await?.filter(|r| r.id == *id) else {
            return Err(StoreError::NotFound(*id));
        };
        if record.status == status {
            return Ok(StatusWrite::Unchanged);
        }
        if record.status == KeyStatus::Revoked {
            return Ok(StatusWrite::Revoked);
        }
        record.status = status;
        record.updated_at = at;
        self.update(&record).await?;
        Ok(StatusWrite::Written)
    }

    /// Replaces an existing record only if the stored one still has `record.version` (the
    /// version it was read with), bumping the version: a compare-and-set, so two writers
    /// that read the same version cannot both write. [`StoreError::Conflict`] when the
    /// stored version differs, [`StoreError::NotFound`] when there is no such key.
    ///
    /// The default reads and then writes (not atomic); every store in this workspace
    /// overrides it with one atomic step.
    async fn update_versioned(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let Some(stored) = self.get(&record.id).await?.filter(|r| r.id == record.id) else {
            return Err(StoreError::NotFound(record.id));
        };
        if stored.version != record.version {
            return Err(StoreError::Conflict {
                kind: "key",
                name: record.id.to_string(),
            });
        }
        let mut next = record.clone();
        next.version = record.version.wrapping_add(1);
        self.update(&next).await
    }

    /// The stored roles among `names` (in any order; names with no role are left out).
    /// The verifier calls it when it reads a key that holds roles. The default knows no
    /// roles, so keys' roles grant nothing (fail closed).
    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        let _ = names;
        Ok(Vec::new())
    }

    /// Every role, ordered by name.
    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        Err(StoreError::Unsupported("roles"))
    }

    /// Adds a role; [`StoreError::NameTaken`] if the name is taken.
    async fn insert_role(&self, role: &Role) -> Result<(), StoreError> {
        let _ = role;
        Err(StoreError::Unsupported("roles"))
    }

    /// Replaces a role if the stored one still has `role.version` (compare-and-set, the
    /// version bumped), and announces a change of every key holding it, so caches
    /// everywhere resolve those keys again. [`StoreError::Conflict`] or
    /// [`StoreError::NoSuchName`] otherwise.
    async fn update_role(&self, role: &Role) -> Result<(), StoreError> {
        let _ = role;
        Err(StoreError::Unsupported("roles"))
    }

    /// Deletes a role (keys keep naming it; it grants them nothing any more) and announces
    /// a change of every key holding it. Whether there was one.
    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        let _ = name;
        Err(StoreError::Unsupported("roles"))
    }

    /// The ids of the keys that name role `name`.
    async fn keys_with_role(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        let _ = name;
        Ok(Vec::new())
    }

    /// The identity named `name`, if any. The default knows none.
    async fn get_identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        let _ = name;
        Ok(None)
    }

    /// Every identity, ordered by name.
    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        Err(StoreError::Unsupported("identities"))
    }

    /// Adds an identity; [`StoreError::NameTaken`] if the name is taken.
    async fn insert_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let _ = identity;
        Err(StoreError::Unsupported("identities"))
    }

    /// Records when keys were last used: for each `(id, time)`, the stored last-used time
    /// becomes `time` unless it is later already (it never moves back). Ids with no record
    /// are ignored or kept apart; nothing else of the record changes: no version bump, no
    /// change announcement, no cache invalidation anywhere. Read it back in
    /// [`KeyRecord::last_used_at`].
    ///
    /// The verifier calls it from [`Verifier::flush_last_used`](crate::Verifier::flush_last_used),
    /// in the background, with one entry per key used since the last flush; never once per
    /// request. The default keeps nothing ([`StoreError::Unsupported`]).
    async fn record_last_used(&self, used: &[(KeyId, SystemTime)]) -> Result<(), StoreError> {
        let _ = used;
        Err(StoreError::Unsupported("last-used times"))
    }

    /// Replaces the identity named `identity.name` (its `created_at` is kept) and
    /// announces a change of every key it owns, so caches everywhere resolve those keys
    /// again. [`StoreError::NoSuchName`] when there is none. The last writer wins.
    async fn update_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        let _ = identity;
        Err(StoreError::Unsupported("identities"))
    }

    /// Deletes an identity (keys naming it keep the name; it gives them nothing any
    /// more) and announces a change of every key it owned. Whether there was one.
    async fn delete_identity(&self, name: &str) -> Result<bool, StoreError> {
        let _ = name;
        Err(StoreError::Unsupported("identities"))
    }

    /// The ids of the keys that name identity `name` (any status).
    async fn keys_with_identity(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        let _ = name;
        Ok(Vec::new())
    }
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
    async fn list_report(&self, filter: &KeyFilter) -> Result<KeyListing, StoreError> {
        (**self).list_report(filter).await
    }
    async fn set_status(
        &self,
        id: &KeyId,
        status: KeyStatus,
        at: SystemTime,
    ) -> Result<StatusWrite, StoreError> {
        (**self).set_status(id, status, at).await
    }
    async fn update_versioned(&self, record: &KeyRecord) -> Result<(), StoreError> {
        (**self).update_versioned(record).await
    }
    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        (**self).roles(names).await
    }
    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        (**self).list_roles().await
    }
    async fn insert_role(&self, role: &Role) -> Result<(), StoreError> {
        (**self).insert_role(role).await
    }
    async fn update_role(&self, role: &Role) -> Result<(), StoreError> {
        (**self).update_role(role).await
    }
    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        (**self).delete_role(name).await
    }
    async fn keys_with_role(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        (**self).keys_with_role(name).await
    }
    async fn get_identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        (**self).get_identity(name).await
    }
    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        (**self).list_identities().await
    }
    async fn insert_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        (**self).insert_identity(identity).await
    }
    async fn record_last_used(&self, used: &[(KeyId, SystemTime)]) -> Result<(), StoreError> {
        (**self).record_last_used(used).await
    }

    async fn update_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        (**self).update_identity(identity).await
    }
    async fn delete_identity(&self, name: &str) -> Result<bool, StoreError> {
        (**self).delete_identity(name).await
    }
    async fn keys_with_identity(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        (**self).keys_with_identity(name).await
    }
}

/// An in-memory key store (a concurrent hash map). For tests, examples and single-process
/// services that create their keys at start. Clones share the same records.
#[derive(Clone, Default)]
pub struct MemoryStore {
    records: Arc<DashMap<KeyId, KeyRecord>>,
    roles: Arc<DashMap<String, Role>>,
    identities: Arc<DashMap<String, Identity>>,
    /// Last-used times, apart from the records so that writing one never touches a record.
    last_used: Arc<DashMap<KeyId, SystemTime>>,
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

    fn with_last_used(&self, mut record: KeyRecord) -> KeyRecord {
        record.last_used_at = self.last_used.get(&record.id).map(|t| *t);
        record
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
        Ok(self.records.get(id).map(|r| self.with_last_used(r.clone())))
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
                let version = r.version.wrapping_add(1);
                *r = record.clone();
                r.version = version;
                Ok(())
            }
            None => Err(StoreError::NotFound(record.id)),
        }
    }

    async fn update_versioned(&self, record: &KeyRecord) -> Result<(), StoreError> {
        // The shard lock held by `get_mut` makes the compare and the write one step.
        match self.records.get_mut(&record.id) {
            Some(mut r) if r.version == record.version => {
                *r = record.clone();
                r.version = record.version.wrapping_add(1);
                Ok(())
            }
            Some(_) => Err(StoreError::Conflict {
                kind: "key",
                name: record.id.to_string(),
            }),
            None => Err(StoreError::NotFound(record.id)),
        }
    }

    async fn roles(&self, names: &[String]) -> Result<Vec<Role>, StoreError> {
        Ok(names
            .iter()
            .filter_map(|n| self.roles.get(n).map(|r| r.clone()))
            .collect())
    }

    async fn list_roles(&self) -> Result<Vec<Role>, StoreError> {
        let mut out: Vec<Role> = self.roles.iter().map(|r| r.value().clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn insert_role(&self, role: &Role) -> Result<(), StoreError> {
        match self.roles.entry(role.name.clone()) {
            dashmap::Entry::Occupied(_) => Err(StoreError::NameTaken {
                kind: "role",
                name: role.name.clone(),
            }),
            dashmap::Entry::Vacant(v) => {
                let mut role = role.clone();
                role.version = 0;
                v.insert(role);
                Ok(())
            }
        }
    }

    async fn update_role(&self, role: &Role) -> Result<(), StoreError> {
        match self.roles.get_mut(&role.name) {
            Some(mut r) if r.version == role.version => {
                *r = role.clone();
                r.version = role.version.wrapping_add(1);
                Ok(())
            }
            Some(_) => Err(StoreError::Conflict {
                kind: "role",
                name: role.name.clone(),
            }),
            None => Err(StoreError::NoSuchName {
                kind: "role",
                name: role.name.clone(),
            }),
        }
    }

    async fn delete_role(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.roles.remove(name).is_some())
    }

    async fn keys_with_role(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        Ok(self
            .records
            .iter()
            .filter(|r| r.roles.iter().any(|n| n == name))
            .map(|r| r.id)
            .collect())
    }

    async fn get_identity(&self, name: &str) -> Result<Option<Identity>, StoreError> {
        Ok(self.identities.get(name).map(|i| i.clone()))
    }

    async fn list_identities(&self) -> Result<Vec<Identity>, StoreError> {
        let mut out: Vec<Identity> = self.identities.iter().map(|r| r.value().clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn record_last_used(&self, used: &[(KeyId, SystemTime)]) -> Result<(), StoreError> {
        for (id, at) in used {
            if !self.records.contains_key(id) {
                continue;
            }
            self.last_used
                .entry(*id)
                .and_modify(|t| *t = (*t).max(*at))
                .or_insert(*at);
        }
        Ok(())
    }

    async fn insert_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        match self.identities.entry(identity.name.clone()) {
            dashmap::Entry::Occupied(_) => Err(StoreError::NameTaken {
                kind: "identity",
                name: identity.name.clone(),
            }),
            dashmap::Entry::Vacant(v) => {
                v.insert(identity.clone());
                Ok(())
            }
        }
    }

    async fn update_identity(&self, identity: &Identity) -> Result<(), StoreError> {
        match self.identities.get_mut(&identity.name) {
            Some(mut stored) => {
                let created_at = stored.created_at;
                *stored = identity.clone();
                stored.created_at = created_at;
                Ok(())
            }
            None => Err(StoreError::NoSuchName {
                kind: "identity",
                name: identity.name.clone(),
            }),
        }
    }

    async fn delete_identity(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.identities.remove(name).is_some())
    }

    async fn keys_with_identity(&self, name: &str) -> Result<Vec<KeyId>, StoreError> {
        Ok(self
            .records
            .iter()
            .filter(|r| r.identity.as_deref() == Some(name))
            .map(|r| r.id)
            .collect())
    }

    async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let mut out: Vec<KeyRecord> = self
            .records
            .iter()
            .filter(|r| filter.matches(r.value()))
            .map(|r| self.with_last_used(r.value().clone()))
            .collect();
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}
