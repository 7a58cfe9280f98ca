//! Key lifecycle: issue, rotate, revoke, disable, enable, update, list and show, over any
//! [`KeyStore`], each change an audit event.
//!
//! [`KeyManager`] validates input before it touches the store, tells a running
//! [`Verifier`] about every change at once (so a revoked key stops working on the next
//! request), and records a [`LifecycleEvent`] naming the actor, the key and each field that
//! changed (old and new public values; never a key or a digest).
//!
//! ```
//! use keygate_core::audit::{Auditor, LifecycleAction, MemorySink};
//! use keygate_core::{DenialCode, KeyManager, KeySpec, MemoryStore, Verifier};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let verifier = Verifier::new(MemoryStore::new());
//! let sink = MemorySink::new();
//! let keys = KeyManager::for_verifier(&verifier, Auditor::direct(sink.clone()));
//!
//! let issued = keys.issue("alice", KeySpec::new("ci").scope("points:read")).await.unwrap();
//! assert!(verifier.verify(issued.key.expose_secret()).await.is_ok());
//!
//! keys.revoke("alice", issued.key.id()).await.unwrap();
//! let denial = verifier.verify(issued.key.expose_secret()).await.unwrap_err();
//! assert_eq!(denial.code(), DenialCode::RevokedKey);
//!
//! let actions: Vec<_> = sink.events().iter().map(|e| e.as_lifecycle().unwrap().action).collect();
//! assert_eq!(actions, [LifecycleAction::Issued, LifecycleAction::Revoked]);
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;

use crate::audit::{AuditEvent, Auditor, FieldChange, LifecycleAction, LifecycleEvent};
use crate::clock::{Clock, SystemClock};
use crate::digest::KeyHasher;
use crate::key::{ApiKey, KeyGenError, KeyId, Prefix};
use crate::record::{KeyRecord, KeyStatus, QuotaPolicy, RateLimitPolicy};
use crate::role::Grant;
use crate::scope::{validate_resource_pattern, Scope};
use crate::store::{KeyFilter, KeyStore, StatusWrite, StoreError};
use crate::verifier::Verifier;

#[path = "lifecycle_roles.rs"]
mod roles;
pub use roles::{IdentityUpdate, RoleUpdate};

/// Longest key name, in characters.
pub const MAX_NAME_LEN: usize = 128;
/// Longest owner (subject), in characters.
pub const MAX_OWNER_LEN: usize = 256;
/// Longest attribute value, in characters.
pub const MAX_ATTRIBUTE_VALUE_LEN: usize = 1024;
/// Largest metadata, serialized as JSON, in bytes.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// When a key stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// At this instant (must be in the future).
    At(SystemTime),
    /// This long after the change (must be more than zero).
    In(Duration),
}

/// What a new key looks like. Start with [`KeySpec::new`] and add to it.
///
/// Validated by [`KeyManager::issue`]:
/// - `name`: 1 to 128 characters, no control characters; `owner` likewise, up to 256;
/// - scopes: as [`Scope::parse`](crate::Scope::parse) accepts (`points:read`, `points:*`,
///   `*`);
/// - resources (collections): as
///   [`validate_resource_pattern`](crate::validate_resource_pattern) accepts (`tenant-*`,
///   `*`);
/// - attributes: names of `[A-Za-z0-9_.-]`, 1 to 64 bytes; values up to 1,024 characters
///   without control characters;
/// - allowed IPs: networks without host bits (`10.0.0.0/8`, not `10.0.0.1/8`);
/// - rate limits and quotas: limits of at least 1, a period of at least 1 ms, names of
///   `[A-Za-z0-9_-]` (1 to 64), unique within their list;
/// - expiry in the future; the prefix one the verifier accepts; metadata up to 64 KiB of JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct KeySpec {
    /// A human name (`ci-pipeline`).
    pub name: String,
    /// Who the key belongs to.
    pub owner: Option<String>,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Collections the key may touch.
    pub resources: Vec<String>,
    /// Free-form attributes (`tenant=acme`).
    pub attributes: BTreeMap<String, String>,
    /// Networks the key may be used from (empty: any).
    pub allowed_ips: Vec<IpNet>,
    /// Rate limits.
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Quotas.
    pub quotas: Vec<QuotaPolicy>,
    /// When the key stops working (none: never).
    pub expires: Option<Expiry>,
    /// The key's prefix (none: the manager's default).
    pub prefix: Option<Prefix>,
    /// Free JSON metadata.
    pub metadata: serde_json::Value,
    /// Grants beyond scopes × resources (scopes paired with collections).
    pub grants: Vec<Grant>,
    /// Roles the key holds (each must exist when the key is issued).
    pub roles: Vec<String>,
    /// The identity owning the key (it must exist).
    pub identity: Option<String>,
}

impl KeySpec {
    /// A key named `name` with nothing else.
    pub fn new(name: impl Into<String>) -> Self {
        KeySpec {
            name: name.into(),
            owner: None,
            scopes: Vec::new(),
            resources: Vec::new(),
            attributes: BTreeMap::new(),
            allowed_ips: Vec::new(),
            rate_limits: Vec::new(),
            quotas: Vec::new(),
            expires: None,
            prefix: None,
            metadata: serde_json::Value::Null,
            grants: Vec::new(),
            roles: Vec::new(),
            identity: None,
        }
    }
    /// Adds a grant (scopes on collections).
    pub fn grant(mut self, grant: Grant) -> Self {
        self.grants.push(grant);
        self
    }
    /// Adds a role.
    pub fn role(mut self, name: impl Into<String>) -> Self {
        self.roles.push(name.into());
        self
    }
    /// Sets the identity owning the key.
    pub fn identity(mut self, name: impl Into<String>) -> Self {
        self.identity = Some(name.into());
        self
    }
    /// Sets the owner (subject).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }
    /// Adds a scope.
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scopes.push(scope.into());
        self
    }
    /// Adds a collection (resource) name or pattern.
    pub fn resource(mut self, resource: impl Into<String>) -> Self {
        self.resources.push(resource.into());
        self
    }
    /// Sets an attribute.
    pub fn attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }
    /// Adds a network the key may be used from.
    pub fn allow_ip(mut self, net: IpNet) -> Self {
        self.allowed_ips.push(net);
        self
    }
    /// Adds a rate limit.
    pub fn rate_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.rate_limits.push(policy);
        self
    }
    /// Adds a quota.
    pub fn quota(mut self, policy: QuotaPolicy) -> Self {
        self.quotas.push(policy);
        self
    }
    /// The key stops working at `at`.
    pub fn expires_at(mut self, at: SystemTime) -> Self {
        self.expires = Some(Expiry::At(at));
        self
    }
    /// The key stops working `after` its creation.
    pub fn expires_in(mut self, after: Duration) -> Self {
        self.expires = Some(Expiry::In(after));
        self
    }
    /// Uses this prefix.
    pub fn prefix(mut self, prefix: Prefix) -> Self {
        self.prefix = Some(prefix);
        self
    }
    /// Sets the metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A change to a key's policies or descriptive fields; each `Some` field replaces the
/// record's. Validated like [`KeySpec`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new owner (`Some(None)` removes it).
    pub owner: Option<Option<String>>,
    /// New scopes.
    pub scopes: Option<Vec<String>>,
    /// New collections.
    pub resources: Option<Vec<String>>,
    /// New attributes.
    pub attributes: Option<BTreeMap<String, String>>,
    /// New allowed networks.
    pub allowed_ips: Option<Vec<IpNet>>,
    /// New rate limits.
    pub rate_limits: Option<Vec<RateLimitPolicy>>,
    /// New quotas.
    pub quotas: Option<Vec<QuotaPolicy>>,
    /// A new expiry (`Some(None)` removes it).
    pub expires: Option<Option<Expiry>>,
    /// New metadata.
    pub metadata: Option<serde_json::Value>,
    /// New extra grants (replacing the old ones).
    pub grants: Option<Vec<Grant>>,
    /// New roles (replacing the old ones; applied before `add_roles` and `remove_roles`).
    pub roles: Option<Vec<String>>,
    /// Roles to add (each must exist).
    pub add_roles: Vec<String>,
    /// Roles to remove.
    pub remove_roles: Vec<String>,
    /// New identity (`Some(None)` removes it).
    pub identity: Option<Option<String>>,
}

impl KeyUpdate {
    /// An update that changes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Renames the key.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Sets or removes the owner.
    pub fn owner(mut self, owner: Option<String>) -> Self {
        self.owner = Some(owner);
        self
    }
    /// Replaces the scopes.
    pub fn scopes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, scopes: I) -> Self {
        self.scopes = Some(scopes.into_iter().map(Into::into).collect());
        self
    }
    /// Replaces the collections.
    pub fn resources<I: IntoIterator<Item = S>, S: Into<String>>(mut self, resources: I) -> Self {
        self.resources = Some(resources.into_iter().map(Into::into).collect());
        self
    }
    /// Replaces the attributes.
    pub fn attributes(mut self, attributes: BTreeMap<String, String>) -> Self {
        self.attributes = Some(attributes);
        self
    }
    /// Replaces the allowed networks.
    pub fn allowed_ips(mut self, nets: Vec<IpNet>) -> Self {
        self.allowed_ips = Some(nets);
        self
    }
    /// Replaces the rate limits.
    pub fn rate_limits(mut self, policies: Vec<RateLimitPolicy>) -> Self {
        self.rate_limits = Some(policies);
        self
    }
    /// Replaces the quotas.
    pub fn quotas(mut self, policies: Vec<QuotaPolicy>) -> Self {
        self.quotas = Some(policies);
        self
    }
    /// Sets or removes the expiry.
    pub fn expires(mut self, expires: Option<Expiry>) -> Self {
        self.expires = Some(expires);
        self
    }
    /// Replaces the metadata.
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }
    /// Replaces the extra grants.
    pub fn grants(mut self, grants: Vec<Grant>) -> Self {
        self.grants = Some(grants);
        self
    }
    /// Adds a role.
    pub fn add_role(mut self, name: impl Into<String>) -> Self {
        self.add_roles.push(name.into());
        self
    }
    /// Removes a role.
    pub fn remove_role(mut self, name: impl Into<String>) -> Self {
        self.remove_roles.push(name.into());
        self
    }
    /// Sets or removes the identity.
    pub fn identity(mut self, identity: Option<String>) -> Self {
        self.identity = Some(identity);
        self
    }
}

/// Why a spec, update or actor is not acceptable: the field and the reason. Never contains
/// a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct InvalidSpec {
    /// The field (`name`, `scopes`, `allowed_ips`, ...).
    pub field: &'static str,
    /// What is wrong.
    pub reason: String,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field,
        reason: reason.into(),
    }
}

/// Why a lifecycle operation failed. Nothing was changed, except where a variant says so.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LifecycleError {
    /// The input is not acceptable.
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    /// No key with this id.
    #[error("no key with id {0}")]
    NotFound(KeyId),
    /// The key's status does not allow the operation (a revoked key cannot be enabled,
    /// rotated or changed; a disabled key cannot be rotated).
    #[error("key {id} is {status}: cannot {operation} it")]
    WrongStatus {
        /// The key.
        id: KeyId,
        /// Its status.
        status: KeyStatus,
        /// The refused operation.
        operation: &'static str,
    },
    /// The key has expired, so it cannot be rotated.
    #[error("key {0} has expired")]
    Expired(KeyId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The operating system's random number generator failed.
    #[error(transparent)]
    KeyGen(#[from] KeyGenError),
    /// The auditor has shut down, so the change would go unrecorded: refused.
    #[error("the audit log is shut down; no change was made")]
    AuditClosed,
    /// A caller's check refused the change ([`KeyManager::update_checked`]).
    #[error("refused: {0}")]
    Refused(String),
    /// The change's audit event could not be written. A change that grants access (issue,
    /// rotate, enable, update) was undone (`kept` is `false`; an issued key is revoked, its
    /// plaintext never shown); one that takes access away (revoke, disable) was kept
    /// (`kept` is `true`: failing closed).
    #[error("{}: {reason}", if *kept { "the change was made but could not be audited" } else { "the change could not be audited and was undone" })]
    AuditFailed {
        /// Whether the change stays.
        kept: bool,
        /// The audit sink's error.
        reason: String,
    },
}

/// A newly issued key: the plaintext (show it once, then drop it) and its record.
///
/// `Debug` shows only the key's redacted form.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    /// The plaintext key. It is never stored and never shown again.
    pub key: ApiKey,
    /// The stored record.
    pub record: KeyRecord,
}

/// Issues and manages keys over a [`KeyStore`], keeping a [`Verifier`] up to date and
/// recording every change through an [`Auditor`]. Cheap to clone.
///
/// Changes made through one `KeyManager` are serialized (one at a time). Updates by two
/// managers (or processes) at once cannot both land: [`KeyManager::update`] writes only
/// over the version it read, and the later writer gets [`StoreError::Conflict`].
#[derive(Clone)]
pub struct KeyManager {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn KeyStore>,
    verifier: Option<Verifier>,
    clock: Arc<dyn Clock>,
    hasher: KeyHasher,
    auditor: Auditor,
    default_prefix: Prefix,
    accepted: Option<Vec<Prefix>>,
    lock: tokio::sync::Mutex<()>,
}

/// Configures a [`KeyManager`].
pub struct KeyManagerBuilder {
    store: Arc<dyn KeyStore>,
    verifier: Option<Verifier>,
    clock: Arc<dyn Clock>,
    hasher: KeyHasher,
    auditor: Auditor,
    default_prefix: Option<Prefix>,
}

impl KeyManagerBuilder {
    /// Keep this verifier's cache up to date, and take its hasher, clock and accepted
    /// prefixes (set them afterwards to override).
    pub fn verifier(mut self, verifier: &Verifier) -> Self {
        self.hasher = verifier.hasher().clone();
        self.clock = verifier.clock().clone();
        self.verifier = Some(verifier.clone());
        self
    }
    /// Read time from this clock (default: the system clock, or the verifier's).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    /// Hash keys with this hasher (default: no pepper, or the verifier's).
    pub fn hasher(mut self, hasher: KeyHasher) -> Self {
        self.hasher = hasher;
        self
    }
    /// Record changes through this auditor (default: `tracing`).
    pub fn auditor(mut self, auditor: Auditor) -> Self {
        self.auditor = auditor;
        self
    }
    /// The prefix of keys whose spec names none (default `kg`, or the verifier's first
    /// accepted prefix when it does not accept `kg`).
    pub fn default_prefix(mut self, prefix: Prefix) -> Self {
        self.default_prefix = Some(prefix);
        self
    }
    /// Builds the manager.
    pub fn build(self) -> KeyManager {
        let accepted = self
            .verifier
            .as_ref()
            .map(|v| v.parser().prefixes().to_vec());
        let default_prefix = self.default_prefix.unwrap_or_else(|| {
            let kg = Prefix::default();
            match &accepted {
                Some(list) if !list.contains(&kg) && !list.is_empty() => list[0].clone(),
                _ => kg,
            }
        });
        KeyManager {
            inner: Arc::new(Inner {
                store: self.store,
                verifier: self.verifier,
                clock: self.clock,
                hasher: self.hasher,
                auditor: self.auditor,
                default_prefix,
                accepted,
                lock: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

impl KeyManager {
    /// Configures a manager over `store`.
    pub fn builder(store: Arc<dyn KeyStore>) -> KeyManagerBuilder {
        KeyManagerBuilder {
            store,
            verifier: None,
            clock: Arc::new(SystemClock),
            hasher: KeyHasher::new(),
            auditor: Auditor::default(),
            default_prefix: None,
        }
    }

    /// A manager over `verifier`'s store, hasher and clock, keeping its cache up to date and
    /// recording through `auditor`.
    pub fn for_verifier(verifier: &Verifier, auditor: Auditor) -> Self {
        Self::builder(verifier.store().clone())
            .verifier(verifier)
            .auditor(auditor)
            .build()
    }

    /// The auditor changes are recorded through.
    pub fn auditor(&self) -> &Auditor {
        &self.inner.auditor
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.inner.store
    }

    /// Issues a key: validates `spec`, stores the record and returns the plaintext once.
    pub async fn issue(&self, actor: &str, spec: KeySpec) -> Result<IssuedKey, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let prefix = spec
            .prefix
            .clone()
            .unwrap_or_else(|| self.inner.default_prefix.clone());
        if let Some(accepted) = &self.inner.accepted {
            if !accepted.contains(&prefix) {
                return Err(invalid("prefix", "the verifier does not accept this prefix").into());
            }
        }
        let name = check_name(&spec.name)?;
        let (key, mut record) = KeyRecord::generate(&prefix, &self.inner.hasher, name, now)?;
        record.owner = spec.owner.map(check_owner).transpose()?;
        record.scopes = check_scopes(spec.scopes)?;
        record.resources = check_resources(spec.resources)?;
        record.attributes = check_attributes(spec.attributes)?;
        record.allowed_ips = check_ips(spec.allowed_ips)?;
        record.rate_limits = check_rate_limits(spec.rate_limits)?;
        record.quotas = check_quotas(spec.quotas)?;
        record.expires_at = spec.expires.map(|e| check_expiry(e, now)).transpose()?;
        record.metadata = check_metadata(spec.metadata)?;
        record.grants = check_grants(spec.grants)?;
        record.roles = self.check_roles(spec.roles, &[]).await?;
        record.identity = self.check_identity(spec.identity).await?;
        self.inner.store.insert(&record).await?;
        self.notify(&record.id).await;
        if let Err(e) = self
            .emit(actor, LifecycleAction::Issued, None, &record, None, now)
            .await
        {
            self.undo(None, &record).await;
            return Err(e);
        }
        Ok(IssuedKey { key, record })
    }

    /// Rotates a key: issues a new key that inherits everything (name, owner, scopes,
    /// collections, grants, roles, identity, attributes, networks, policies, metadata and
    /// expiry) with `rotated_from` set, and makes the old key expire `grace` from now (at
    /// once for zero; an earlier expiry stays). Only active, unexpired keys rotate. The new key
    /// keeps the old one's lineage ([`KeyRecord::lineage`]), so rate limits and quotas go on
    /// counting where they were, and old and new key share one allowance during the grace.
    pub async fn rotate(
        &self,
        actor: &str,
        id: KeyId,
        grace: Duration,
    ) -> Result<IssuedKey, LifecycleError> {
        self.rotate_checked(actor, id, grace, |_| Ok(())).await
    }

    /// [`KeyManager::rotate`], calling `check` with the old key's record as read: an `Err`
    /// refuses the rotation ([`LifecycleError::Refused`]). Check and write are one step:
    /// the old key's new expiry is written only over the version `check` saw
    /// ([`KeyStore::update_versioned`]), so a concurrent change makes this fail with
    /// [`StoreError::Conflict`] (the new key, whose plaintext nobody has seen, is then
    /// revoked).
    pub async fn rotate_checked(
        &self,
        actor: &str,
        id: KeyId,
        grace: Duration,
        check: impl FnOnce(&KeyRecord) -> Result<(), String>,
    ) -> Result<IssuedKey, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let old = self.get(id).await?;
        if old.status != KeyStatus::Active {
            return Err(LifecycleError::WrongStatus {
                id,
                status: old.status,
                operation: "rotate",
            });
        }
        if old.is_expired_at(now) {
            return Err(LifecycleError::Expired(id));
        }
        check(&old).map_err(LifecycleError::Refused)?;
        let (key, mut new) =
            KeyRecord::generate(&old.prefix, &self.inner.hasher, old.name.clone(), now)?;
        new.owner = old.owner.clone();
        new.scopes = old.scopes.clone();
        new.resources = old.resources.clone();
        new.attributes = old.attributes.clone();
        new.allowed_ips = old.allowed_ips.clone();
        new.rate_limits = old.rate_limits.clone();
        new.quotas = old.quotas.clone();
        new.metadata = old.metadata.clone();
        new.grants = old.grants.clone();
        new.roles = old.roles.clone();
        new.identity = old.identity.clone();
        new.expires_at = old.expires_at;
        new.rotated_from = Some(old.id);
        // Usage is counted per lineage: the new key goes on with the old one's.
        new.lineage = Some(old.lineage_id());
        self.inner.store.insert(&new).await?;

        let mut ending = old.clone();
        let end = now.checked_add(grace).unwrap_or(now);
        ending.expires_at = Some(old.expires_at.map_or(end, |e| e.min(end)));
        ending.updated_at = now;
        if let Err(e) = self.inner.store.update_versioned(&ending).await {
            // Nobody will ever see the new key's plaintext: make sure it cannot work.
            let mut dead = new.clone();
            dead.status = KeyStatus::Revoked;
            if let Err(e2) = self.inner.store.update(&dead).await {
                tracing::error!(key_id = %new.id, error = %e2, "could not revoke the orphaned key of a failed rotation");
            }
            self.notify(&new.id).await;
            return Err(e.into());
        }
        ending.version = old.version.wrapping_add(1);
        self.notify(&new.id).await;
        self.notify(&old.id).await;
        let audited = match self
            .emit(
                actor,
                LifecycleAction::Rotated,
                Some(&old),
                &ending,
                Some(new.id),
                now,
            )
            .await
        {
            Ok(()) => {
                self.emit(
                    actor,
                    LifecycleAction::Issued,
                    None,
                    &new,
                    Some(old.id),
                    now,
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = audited {
            self.undo(Some(&old), &ending).await;
            self.undo(None, &new).await;
            return Err(e);
        }
        Ok(IssuedKey { key, record: new })
    }

    /// Revokes a key: it stops working at once, for good. Revoking a revoked key changes
    /// nothing and records nothing.
    pub async fn revoke(&self, actor: &str, id: KeyId) -> Result<KeyRecord, LifecycleError> {
        self.set_status(actor, id, KeyStatus::Revoked, |_| Ok(()))
            .await
    }

    /// Disables a key (it can be enabled again). Disabling a disabled key changes nothing;
    /// a revoked key cannot be disabled.
    pub async fn disable(&self, actor: &str, id: KeyId) -> Result<KeyRecord, LifecycleError> {
        self.set_status(actor, id, KeyStatus::Disabled, |_| Ok(()))
            .await
    }

    /// Enables a disabled key. Enabling an active key changes nothing; a revoked key cannot
    /// be enabled.
    pub async fn enable(&self, actor: &str, id: KeyId) -> Result<KeyRecord, LifecycleError> {
        self.set_status(actor, id, KeyStatus::Active, |_| Ok(()))
            .await
    }

    /// Revokes, disables or enables key `id` (as [`KeyManager::revoke`],
    /// [`KeyManager::disable`], [`KeyManager::enable`]), calling `check` with the record as
    /// read: an `Err` refuses the change ([`LifecycleError::Refused`]). Check and write are
    /// one step: the status is written only over the version `check` saw
    /// ([`KeyStore::update_versioned`]), so a concurrent change makes this fail with
    /// [`StoreError::Conflict`] instead of acting on a key `check` did not see. A key
    /// already in the status asked for is left alone, without calling `check`.
    pub async fn set_status_checked(
        &self,
        actor: &str,
        id: KeyId,
        to: KeyStatus,
        check: impl FnOnce(&KeyRecord) -> Result<(), String>,
    ) -> Result<KeyRecord, LifecycleError> {
        self.set_status(actor, id, to, check).await
    }

    /// Revokes or disables key `id` by writing only its status ([`KeyStore::set_status`]),
    /// for a key whose stored record cannot be read ([`KeyManager::revoke`] and
    /// [`KeyManager::disable`] read the record first, so they fail on it with
    /// [`StoreError::Corrupt`]). A revoked key stays revoked (disabling it is
    /// [`LifecycleError::WrongStatus`]); enabling this way is refused (`Invalid`), since a
    /// key nobody can read must not be switched on blind.
    ///
    /// The change is audited like any other; its event has an empty `key_name`, no
    /// `subject`, and `null` as the old status (none of them could be read).
    pub async fn set_status_only(
        &self,
        actor: &str,
        id: KeyId,
        to: KeyStatus,
    ) -> Result<StatusWrite, LifecycleError> {
        self.preflight(actor)?;
        let (action, operation) = match to {
            KeyStatus::Revoked => (LifecycleAction::Revoked, "revoke"),
            KeyStatus::Disabled => (LifecycleAction::Disabled, "disable"),
            KeyStatus::Active => {
                return Err(invalid(
                    "status",
                    "a key whose record cannot be read can only be revoked or disabled",
                )
                .into())
            }
        };
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let written = self.inner.store.set_status(&id, to, now).await?;
        match written {
            StatusWrite::Written => {}
            StatusWrite::Unchanged => return Ok(written),
            StatusWrite::Revoked => {
                if to == KeyStatus::Revoked {
                    return Ok(StatusWrite::Unchanged);
                }
                return Err(LifecycleError::WrongStatus {
                    id,
                    status: KeyStatus::Revoked,
                    operation,
                });
            }
        }
        self.notify(&id).await;
        let event = LifecycleEvent {
            time: now,
            actor: actor.to_owned(),
            action,
            key_id: id,
            key_name: String::new(),
            subject: None,
            status: to,
            related_key: None,
            changes: vec![FieldChange {
                field: "status".into(),
                old: serde_json::Value::Null,
                new: serde_json::Value::String(to.as_str().into()),
            }],
        };
        if let Err(e) = self
            .inner
            .auditor
            .record(AuditEvent::Lifecycle(event))
            .await
        {
            tracing::error!(key_id = %id, action = action.as_str(), error = %e, "lifecycle change could not be audited");
        }
        Ok(written)
    }

    /// Changes a key's policies or descriptive fields. A revoked key cannot be changed. An
    /// update that changes nothing records nothing.
    ///
    /// The write is conditional on the version read ([`KeyStore::update_versioned`]): if
    /// another writer changed the key in between, nothing is written and the error is
    /// [`StoreError::Conflict`].
    pub async fn update(
        &self,
        actor: &str,
        id: KeyId,
        update: KeyUpdate,
    ) -> Result<KeyRecord, LifecycleError> {
        self.update_checked(actor, id, update, |_, _| Ok(())).await
    }

    /// [`KeyManager::update`], calling `check` with the record as read and as it would be
    /// written before writing: an `Err` refuses the change ([`LifecycleError::Refused`]).
    /// Check and write are one step: the write lands only over the version `check` saw, so
    /// a concurrent change makes this fail with [`StoreError::Conflict`] instead of writing
    /// over what `check` did not see.
    pub async fn update_checked(
        &self,
        actor: &str,
        id: KeyId,
        update: KeyUpdate,
        check: impl FnOnce(&KeyRecord, &KeyRecord) -> Result<(), String>,
    ) -> Result<KeyRecord, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let old = self.get(id).await?;
        if old.status == KeyStatus::Revoked {
            return Err(LifecycleError::WrongStatus {
                id,
                status: old.status,
                operation: "update",
            });
        }
        let mut new = old.clone();
        if let Some(name) = update.name {
            new.name = check_name(&name)?.to_owned();
        }
        if let Some(owner) = update.owner {
            new.owner = owner.map(check_owner).transpose()?;
        }
        if let Some(v) = update.scopes {
            new.scopes = check_scopes(v)?;
        }
        if let Some(v) = update.resources {
            new.resources = check_resources(v)?;
        }
        if let Some(v) = update.attributes {
            new.attributes = check_attributes(v)?;
        }
        if let Some(v) = update.allowed_ips {
            new.allowed_ips = check_ips(v)?;
        }
        if let Some(v) = update.rate_limits {
            new.rate_limits = check_rate_limits(v)?;
        }
        if let Some(v) = update.quotas {
            new.quotas = check_quotas(v)?;
        }
        if let Some(v) = update.expires {
            new.expires_at = v.map(|e| check_expiry(e, now)).transpose()?;
        }
        if let Some(v) = update.metadata {
            new.metadata = check_metadata(v)?;
        }
        if let Some(v) = update.grants {
            new.grants = check_grants(v)?;
        }
        if update.roles.is_some() || !update.add_roles.is_empty() || !update.remove_roles.is_empty()
        {
            let mut roles = update.roles.unwrap_or_else(|| old.roles.clone());
            roles.extend(update.add_roles);
            roles.retain(|r| !update.remove_roles.contains(r));
            // Roles the key already holds may have been deleted since: they stay allowed.
            new.roles = self.check_roles(roles, &old.roles).await?;
        }
        if let Some(v) = update.identity {
            new.identity = self.check_identity(v).await?;
        }
        if changes(Some(&old), &new).is_empty() {
            return Ok(old);
        }
        check(&old, &new).map_err(LifecycleError::Refused)?;
        new.updated_at = now;
        self.inner.store.update_versioned(&new).await?;
        new.version = old.version.wrapping_add(1);
        self.notify(&id).await;
        if let Err(e) = self
            .emit(actor, LifecycleAction::Updated, Some(&old), &new, None, now)
            .await
        {
            self.undo(Some(&old), &new).await;
            return Err(e);
        }
        Ok(new)
    }

    /// The keys passing `filter` (owner, status, prefix), oldest first.
    pub async fn list(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, LifecycleError> {
        Ok(self.inner.store.list(filter).await?)
    }

    /// One key.
    pub async fn show(&self, id: KeyId) -> Result<KeyRecord, LifecycleError> {
        self.get(id).await
    }

    async fn set_status(
        &self,
        actor: &str,
        id: KeyId,
        to: KeyStatus,
        check: impl FnOnce(&KeyRecord) -> Result<(), String>,
    ) -> Result<KeyRecord, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let old = self.get(id).await?;
        if old.status == to {
            return Ok(old);
        }
        let (action, operation) = match to {
            KeyStatus::Revoked => (LifecycleAction::Revoked, "revoke"),
            KeyStatus::Disabled => (LifecycleAction::Disabled, "disable"),
            KeyStatus::Active => (LifecycleAction::Enabled, "enable"),
        };
        if old.status == KeyStatus::Revoked {
            return Err(LifecycleError::WrongStatus {
                id,
                status: old.status,
                operation,
            });
        }
        check(&old).map_err(LifecycleError::Refused)?;
        let mut new = old.clone();
        new.status = to;
        new.updated_at = now;
        self.inner.store.update_versioned(&new).await?;
        new.version = old.version.wrapping_add(1);
        self.notify(&id).await;
        if let Err(e) = self.emit(actor, action, Some(&old), &new, None, now).await {
            if to == KeyStatus::Active {
                self.undo(Some(&old), &new).await;
            }
            return Err(e);
        }
        Ok(new)
    }

    async fn get(&self, id: KeyId) -> Result<KeyRecord, LifecycleError> {
        match self.inner.store.get(&id).await? {
            Some(r) if r.id == id => Ok(r),
            _ => Err(LifecycleError::NotFound(id)),
        }
    }

    fn preflight(&self, actor: &str) -> Result<(), LifecycleError> {
        check_text("actor", actor, 128)?;
        if self.inner.auditor.is_closed() {
            return Err(LifecycleError::AuditClosed);
        }
        Ok(())
    }

    /// Tells the verifier about a change at once.
    async fn notify(&self, id: &KeyId) {
        if let Some(v) = &self.inner.verifier {
            if v.refresh(id).await.is_err() {
                v.invalidate(id);
            }
        }
    }

    /// Takes back an unaudited change that granted access: `old` is restored, or (for a
    /// key that did not exist before) `new` is revoked. Best effort: a store failure here is
    /// logged.
    async fn undo(&self, old: Option<&KeyRecord>, new: &KeyRecord) {
        let restore = match old {
            Some(old) => old.clone(),
            None => {
                let mut dead = new.clone();
                dead.status = KeyStatus::Revoked;
                dead
            }
        };
        if let Err(e) = self.inner.store.update(&restore).await {
            tracing::error!(key_id = %new.id, error = %e, "could not undo an unaudited key change");
        }
        self.notify(&new.id).await;
    }

    /// Records a change's event and waits until it is written; an error (the change is
    /// to be undone or reported) when it cannot be.
    async fn emit(
        &self,
        actor: &str,
        action: LifecycleAction,
        old: Option<&KeyRecord>,
        new: &KeyRecord,
        related_key: Option<KeyId>,
        now: SystemTime,
    ) -> Result<(), LifecycleError> {
        let event = LifecycleEvent {
            time: now,
            actor: actor.to_owned(),
            action,
            key_id: new.id,
            key_name: new.name.clone(),
            subject: new.owner.clone(),
            status: new.status,
            related_key,
            changes: changes(old, new),
        };
        self.inner
            .auditor
            .record_durable(AuditEvent::Lifecycle(event))
            .await
            .map_err(|e| {
                tracing::error!(key_id = %new.id, action = action.as_str(), error = %e, "lifecycle change could not be audited");
                LifecycleError::AuditFailed {
                    kept: matches!(action, LifecycleAction::Revoked | LifecycleAction::Disabled),
                    reason: e.to_string(),
                }
            })
    }
}

impl fmt::Debug for KeyManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyManager")
            .field("default_prefix", &self.inner.default_prefix)
            .field("verifier", &self.inner.verifier.is_some())
            .field("auditor", &self.inner.auditor)
            .finish_non_exhaustive()
    }
}

/// The public fields that differ between `old` (none: everything is new) and `new`.
fn changes(old: Option<&KeyRecord>, new: &KeyRecord) -> Vec<FieldChange> {
    let as_map = |r: &KeyRecord| match serde_json::to_value(r.info()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let before = old.map(as_map).unwrap_or_default();
    let mut after = as_map(new);
    // Fields left out when empty (grants, roles, identity) still count when they empty.
    for field in before.keys() {
        if !after.contains_key(field) {
            after.insert(field.clone(), serde_json::Value::Null);
        }
    }
    after
        .into_iter()
        // The last-used time is not a change anyone made.
        .filter(|(field, _)| field != "updated_at" && field != "last_used_at")
        .filter_map(|(field, value)| {
            let prior = before
                .get(&field)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            (prior != value).then_some(FieldChange {
                field,
                old: prior,
                new: value,
            })
        })
        .filter(|c| old.is_some() || !c.new.is_null())
        .collect()
}

fn check_text<'a>(field: &'static str, text: &'a str, max: usize) -> Result<&'a str, InvalidSpec> {
    if text.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if text.chars().count() > max {
        return Err(invalid(field, format!("longer than {max} characters")));
    }
    if text.chars().any(char::is_control) {
        return Err(invalid(field, "contains control characters"));
    }
    Ok(text)
}

fn check_name(name: &str) -> Result<&str, InvalidSpec> {
    check_text("name", name, MAX_NAME_LEN)
}

fn check_owner(owner: String) -> Result<String, InvalidSpec> {
    check_text("owner", &owner, MAX_OWNER_LEN)?;
    Ok(owner)
}

fn is_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

fn check_scopes(scopes: Vec<String>) -> Result<Vec<String>, InvalidSpec> {
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for s in scopes {
        Scope::parse(&s).map_err(|e| invalid("scopes", e.to_string()))?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn check_grants(grants: Vec<Grant>) -> Result<Vec<Grant>, InvalidSpec> {
    let mut out: Vec<Grant> = Vec::with_capacity(grants.len());
    for g in grants {
        let g = Grant {
            scopes: check_scopes(g.scopes).map_err(|e| invalid("grants", e.reason))?,
            collections: check_resources(g.collections).map_err(|e| invalid("grants", e.reason))?,
        };
        if g.scopes.is_empty() {
            return Err(invalid("grants", "a grant needs at least one scope"));
        }
        if !out.contains(&g) {
            out.push(g);
        }
    }
    Ok(out)
}

fn check_resources(resources: Vec<String>) -> Result<Vec<String>, InvalidSpec> {
    let mut out: Vec<String> = Vec::with_capacity(resources.len());
    for r in resources {
        validate_resource_pattern(&r).map_err(|e| invalid("resources", e.to_string()))?;
        if !out.contains(&r) {
            out.push(r);
        }
    }
    Ok(out)
}

fn check_attributes(
    attributes: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, InvalidSpec> {
    for (k, v) in &attributes {
        if k.len() > 64 || !is_word(k) {
            return Err(invalid(
                "attributes",
                format!(
                    "{:?} is not an attribute name ([A-Za-z0-9_.-], 1 to 64)",
                    k.chars().take(64).collect::<String>()
                ),
            ));
        }
        if v.chars().count() > MAX_ATTRIBUTE_VALUE_LEN || v.chars().any(char::is_control) {
            return Err(invalid(
                "attributes",
                format!("the value of {k:?} is too long or has control characters"),
            ));
        }
    }
    Ok(attributes)
}

fn check_ips(nets: Vec<IpNet>) -> Result<Vec<IpNet>, InvalidSpec> {
    let mut out: Vec<IpNet> = Vec::with_capacity(nets.len());
    for n in nets {
        if n.trunc() != n {
            return Err(invalid(
                "allowed_ips",
                format!("{n} has host bits set (did you mean {}?)", n.trunc()),
            ));
        }
        if !out.contains(&n) {
            out.push(n);
        }
    }
    Ok(out)
}

fn is_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-'))
}

fn check_rate_limits(policies: Vec<RateLimitPolicy>) -> Result<Vec<RateLimitPolicy>, InvalidSpec> {
    for (i, p) in policies.iter().enumerate() {
        if !is_policy_name(&p.name) {
            return Err(invalid(
                "rate_limits",
                "a policy name must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        if p.limit == 0 {
            return Err(invalid(
                "rate_limits",
                format!("{}: the limit must be at least 1", p.name),
            ));
        }
        if p.period < Duration::from_millis(1) {
            return Err(invalid(
                "rate_limits",
                format!("{}: the period must be at least 1 ms", p.name),
            ));
        }
        if policies[..i].iter().any(|q| q.name == p.name) {
            return Err(invalid(
                "rate_limits",
                format!("{}: duplicate policy name", p.name),
            ));
        }
    }
    Ok(policies)
}

fn check_quotas(policies: Vec<QuotaPolicy>) -> Result<Vec<QuotaPolicy>, InvalidSpec> {
    for (i, p) in policies.iter().enumerate() {
        if !is_policy_name(&p.name) {
            return Err(invalid(
                "quotas",
                "a policy name must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        if p.limit == 0 {
            return Err(invalid(
                "quotas",
                format!("{}: the limit must be at least 1", p.name),
            ));
        }
        if policies[..i].iter().any(|q| q.name == p.name) {
            return Err(invalid(
                "quotas",
                format!("{}: duplicate policy name", p.name),
            ));
        }
    }
    Ok(policies)
}

fn check_expiry(expiry: Expiry, now: SystemTime) -> Result<SystemTime, InvalidSpec> {
    let at = match expiry {
        Expiry::At(t) => t,
        Expiry::In(d) => now
            .checked_add(d)
            .ok_or_else(|| invalid("expires", "too far in the future"))?,
    };
    if at <= now {
        return Err(invalid("expires", "must be in the future"));
    }
    Ok(at)
}

fn check_metadata(metadata: serde_json::Value) -> Result<serde_json::Value, InvalidSpec> {
    let len = serde_json::to_vec(&metadata).map_or(usize::MAX, |v| v.len());
    if len > MAX_METADATA_BYTES {
        return Err(invalid("metadata", "larger than 64 KiB"));
    }
    Ok(metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_resources_are_checked_with_the_scope_grammar() {
        assert!(check_scopes(vec!["points:read".into(), "*".into()]).is_ok());
        assert_eq!(
            check_scopes(vec!["points:read".into(), "points:read".into()]).unwrap(),
            ["points:read"]
        );
        for bad in ["", "points", "points:", "a b:c"] {
            assert_eq!(
                check_scopes(vec![bad.into()]).unwrap_err().field,
                "scopes",
                "{bad}"
            );
        }
        assert!(check_resources(vec!["tenant-*".into()]).is_ok());
        assert!(check_resources(vec!["a/b".into()]).is_err());
    }

    #[test]
    fn changes_list_only_what_differs_and_never_the_digest() {
        let (_, r) = KeyRecord::generate(
            &Prefix::default(),
            &KeyHasher::new(),
            "n",
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        let issued = changes(None, &r);
        assert!(issued
            .iter()
            .all(|c| c.field != "digest" && !c.new.is_null()));
        assert!(issued.iter().any(|c| c.field == "id"));
        let mut r2 = r.clone();
        r2.status = KeyStatus::Disabled;
        r2.updated_at = SystemTime::now();
        let diff = changes(Some(&r), &r2);
        assert_eq!(diff.len(), 1);
        assert_eq!(diff[0].field, "status");
        assert_eq!(diff[0].old, "active");
        assert_eq!(diff[0].new, "disabled");
    }
}
