//! Roles and identities through the [`KeyManager`]: validated, stored, announced to the
//! verifier (every key holding a changed role is resolved again on its next request) and
//! audited (one `role_changed` lifecycle event per key the change reaches).

use std::collections::BTreeMap;

use super::{
    check_attributes, check_grants, check_metadata, check_quotas, check_rate_limits, invalid,
    InvalidSpec, KeyManager, LifecycleError,
};
use crate::audit::{AuditEvent, FieldChange, LifecycleAction, LifecycleEvent};
use crate::record::{KeyStatus, QuotaPolicy, RateLimitPolicy};
use crate::role::{validate_name, Grant, Identity, Role};
use crate::store::StoreError;

/// A change to a role; each `Some` field replaces the role's. Validated like a new role.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoleUpdate {
    /// New grants.
    pub grants: Option<Vec<Grant>>,
    /// New attributes.
    pub attributes: Option<BTreeMap<String, String>>,
    /// New rate limits.
    pub rate_limits: Option<Vec<RateLimitPolicy>>,
    /// New quotas.
    pub quotas: Option<Vec<QuotaPolicy>>,
    /// A new minting ceiling (`Some(None)` takes it away).
    pub mint_max_lifetime_secs: Option<Option<u64>>,
}

/// The longest minting ceiling a role may set (366 days).
const MAX_MINT_SECS: u64 = 366 * 86_400;

/// A change to an identity; each `Some` field replaces the identity's. Validated like a
/// new identity.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentityUpdate {
    /// New metadata.
    pub metadata: Option<serde_json::Value>,
    /// New rate limits (shared by all the identity's keys).
    pub rate_limits: Option<Vec<RateLimitPolicy>>,
    /// New quotas (shared by all the identity's keys).
    pub quotas: Option<Vec<QuotaPolicy>>,
}

fn identity_json(identity: Option<&Identity>) -> serde_json::Value {
    identity
        .and_then(|i| serde_json::to_value(i).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn role_json(role: Option<&Role>) -> serde_json::Value {
    role.and_then(|r| serde_json::to_value(r).ok())
        .unwrap_or(serde_json::Value::Null)
}

fn check_role(role: Role) -> Result<Role, InvalidSpec> {
    validate_name("role", &role.name).map_err(|e| invalid("name", e.to_string()))?;
    if let Some(s) = role.mint_max_lifetime_secs {
        if s == 0 || s > MAX_MINT_SECS {
            return Err(invalid(
                "mint_max_lifetime",
                "the longest lifetime of a minted key must be 1 second to 366 days",
            ));
        }
    }
    Ok(Role {
        grants: check_grants(role.grants)?,
        attributes: check_attributes(role.attributes)?,
        rate_limits: check_rate_limits(role.rate_limits)?,
        quotas: check_quotas(role.quotas)?,
        ..role
    })
}

impl KeyManager {
    /// Checks that every role in `roles` exists (those in `held` may be missing: a key keeps
    /// naming a role deleted since), and returns them without duplicates.
    pub(super) async fn check_roles(
        &self,
        roles: Vec<String>,
        held: &[String],
    ) -> Result<Vec<String>, LifecycleError> {
        let mut out: Vec<String> = Vec::with_capacity(roles.len());
        for r in roles {
            validate_name("role", &r).map_err(|e| invalid("roles", e.to_string()))?;
            if !out.contains(&r) {
                out.push(r);
            }
        }
        let wanted: Vec<String> = out.iter().filter(|r| !held.contains(r)).cloned().collect();
        if !wanted.is_empty() {
            let found = self.inner.store.roles(&wanted).await?;
            if let Some(missing) = wanted.iter().find(|w| !found.iter().any(|f| &f.name == *w)) {
                return Err(invalid("roles", format!("no role named {missing:?}")).into());
            }
        }
        Ok(out)
    }

    /// Checks that the identity exists.
    pub(super) async fn check_identity(
        &self,
        identity: Option<String>,
    ) -> Result<Option<String>, LifecycleError> {
        let Some(name) = identity else {
            return Ok(None);
        };
        validate_name("identity", &name).map_err(|e| invalid("identity", e.to_string()))?;
        if self.inner.store.get_identity(&name).await?.is_none() {
            return Err(invalid("identity", format!("no identity named {name:?}")).into());
        }
        Ok(Some(name))
    }

    /// Creates a role. Keys already naming it gain its grants at their next request.
    pub async fn create_role(&self, actor: &str, role: Role) -> Result<Role, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let mut role = check_role(role)?;
        role.created_at = now;
        role.updated_at = now;
        role.version = 0;
        self.inner.store.insert_role(&role).await?;
        self.role_changed(actor, &role.name, None, Some(&role))
            .await?;
        Ok(role)
    }

    /// One role.
    pub async fn show_role(&self, name: &str) -> Result<Role, LifecycleError> {
        self.inner
            .store
            .roles(&[name.to_owned()])
            .await?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| {
                StoreError::NoSuchName {
                    kind: "role",
                    name: name.to_owned(),
                }
                .into()
            })
    }

    /// Every role, by name.
    pub async fn list_roles(&self) -> Result<Vec<Role>, LifecycleError> {
        Ok(self.inner.store.list_roles().await?)
    }

    /// Changes a role; every key holding it sees the change at its next request. The write
    /// lands only over the version read ([`StoreError::Conflict`] otherwise).
    pub async fn update_role(
        &self,
        actor: &str,
        name: &str,
        update: RoleUpdate,
    ) -> Result<Role, LifecycleError> {
        self.update_role_checked(actor, name, update, |_, _| Ok(()))
            .await
    }

    /// [`KeyManager::update_role`], calling `check` with the role as read and as it would
    /// be written: an `Err` refuses the change ([`LifecycleError::Refused`]). The write
    /// lands only over the version `check` saw.
    pub async fn update_role_checked(
        &self,
        actor: &str,
        name: &str,
        update: RoleUpdate,
        check: impl FnOnce(&Role, &Role) -> Result<(), String>,
    ) -> Result<Role, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let old = self.show_role(name).await?;
        let mut new = old.clone();
        if let Some(v) = update.grants {
            new.grants = v;
        }
        if let Some(v) = update.attributes {
            new.attributes = v;
        }
        if let Some(v) = update.rate_limits {
            new.rate_limits = v;
        }
        if let Some(v) = update.quotas {
            new.quotas = v;
        }
        if let Some(v) = update.mint_max_lifetime_secs {
            new.mint_max_lifetime_secs = v;
        }
        let mut new = check_role(new)?;
        if new == old {
            return Ok(old);
        }
        check(&old, &new).map_err(LifecycleError::Refused)?;
        new.updated_at = now;
        self.inner.store.update_role(&new).await?;
        new.version = old.version.wrapping_add(1);
        self.role_changed(actor, name, Some(&old), Some(&new))
            .await?;
        Ok(new)
    }

    /// Deletes a role: keys keep naming it, and it grants them nothing from their next
    /// request on. Whether there was one.
    pub async fn delete_role(&self, actor: &str, name: &str) -> Result<bool, LifecycleError> {
        self.delete_role_checked(actor, name, |_| Ok(())).await
    }

    /// [`KeyManager::delete_role`], calling `check` with the role first: an `Err` refuses
    /// the deletion ([`LifecycleError::Refused`]).
    pub async fn delete_role_checked(
        &self,
        actor: &str,
        name: &str,
        check: impl FnOnce(&Role) -> Result<(), String>,
    ) -> Result<bool, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let old = match self.show_role(name).await {
            Ok(r) => r,
            Err(LifecycleError::Store(StoreError::NoSuchName { .. })) => return Ok(false),
            Err(e) => return Err(e),
        };
        check(&old).map_err(LifecycleError::Refused)?;
        let deleted = self.inner.store.delete_role(name).await?;
        if deleted {
            self.role_changed(actor, name, Some(&old), None).await?;
        }
        Ok(deleted)
    }

    /// Tells the verifier about every key holding role `name` and records one
    /// `role_changed` event per key. A role change takes effect even when its audit fails
    /// (the error says so): undoing a narrowing would widen access again.
    async fn role_changed(
        &self,
        actor: &str,
        name: &str,
        old: Option<&Role>,
        new: Option<&Role>,
    ) -> Result<(), LifecycleError> {
        let holders = self.inner.store.keys_with_role(name).await?;
        let now = self.inner.clock.now();
        let change = FieldChange {
            field: format!("role:{name}"),
            old: role_json(old),
            new: role_json(new),
        };
        let mut failure = None;
        for id in holders {
            self.notify(&id).await;
            let Ok(Some(record)) = self.inner.store.get(&id).await else {
                continue;
            };
            if record.status == KeyStatus::Revoked {
                continue;
            }
            let event = LifecycleEvent {
                time: now,
                actor: actor.to_owned(),
                action: LifecycleAction::RoleChanged,
                key_id: id,
                key_name: record.name.clone(),
                subject: record.owner.clone(),
                status: record.status,
                related_key: None,
                changes: vec![change.clone()],
            };
            if let Err(e) = self
                .inner
                .auditor
                .record_durable(AuditEvent::Lifecycle(event))
                .await
            {
                tracing::error!(key_id = %id, role = %name, error = %e, "role change could not be audited");
                failure = Some(e.to_string());
            }
        }
        tracing::info!(role = %name, actor = %actor, "role changed");
        match failure {
            Some(reason) => Err(LifecycleError::AuditFailed { kept: true, reason }),
            None => Ok(()),
        }
    }

    /// Creates an identity.
    pub async fn create_identity(
        &self,
        actor: &str,
        identity: Identity,
    ) -> Result<Identity, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        validate_name("identity", &identity.name).map_err(|e| invalid("name", e.to_string()))?;
        let identity = Identity {
            metadata: check_metadata(identity.metadata)?,
            rate_limits: check_rate_limits(identity.rate_limits)?,
            quotas: check_quotas(identity.quotas)?,
            created_at: now,
            updated_at: now,
            ..identity
        };
        self.inner.store.insert_identity(&identity).await?;
        tracing::info!(identity = %identity.name, actor = %actor, "identity created");
        Ok(identity)
    }

    /// One identity.
    pub async fn show_identity(&self, name: &str) -> Result<Identity, LifecycleError> {
        self.inner.store.get_identity(name).await?.ok_or_else(|| {
            StoreError::NoSuchName {
                kind: "identity",
                name: name.to_owned(),
            }
            .into()
        })
    }

    /// Every identity, by name.
    pub async fn list_identities(&self) -> Result<Vec<Identity>, LifecycleError> {
        Ok(self.inner.store.list_identities().await?)
    }

    /// Changes an identity's metadata or shared limits. Every key it owns follows on its
    /// next request (the store announces each, and this manager's verifier is told at
    /// once); each key that is not revoked gets one `identity_changed` lifecycle event. An
    /// update that changes nothing records nothing.
    pub async fn update_identity(
        &self,
        actor: &str,
        name: &str,
        update: IdentityUpdate,
    ) -> Result<Identity, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let now = self.inner.clock.now();
        let old = self.show_identity(name).await?;
        let mut new = old.clone();
        if let Some(v) = update.metadata {
            new.metadata = check_metadata(v)?;
        }
        if let Some(v) = update.rate_limits {
            new.rate_limits = check_rate_limits(v)?;
        }
        if let Some(v) = update.quotas {
            new.quotas = check_quotas(v)?;
        }
        if new == old {
            return Ok(old);
        }
        new.updated_at = now;
        self.inner.store.update_identity(&new).await?;
        self.identity_changed(actor, name, Some(&old), Some(&new))
            .await?;
        Ok(new)
    }

    /// Deletes an identity. Refused with [`StoreError::InUse`] while a key that is not
    /// revoked names it (move those keys to another identity, or revoke them, first): a
    /// key losing its identity would lose the limits it shares, so deleting must not do
    /// that behind the keys' backs. Whether there was one.
    pub async fn delete_identity(&self, actor: &str, name: &str) -> Result<bool, LifecycleError> {
        self.preflight(actor)?;
        let _guard = self.inner.lock.lock().await;
        let old = match self.show_identity(name).await {
            Ok(i) => i,
            Err(LifecycleError::Store(StoreError::NoSuchName { .. })) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut holders = 0;
        for id in self.inner.store.keys_with_identity(name).await? {
            match self.inner.store.get(&id).await? {
                Some(r) if r.status != KeyStatus::Revoked => holders += 1,
                _ => {}
            }
        }
        if holders > 0 {
            return Err(StoreError::InUse {
                kind: "identity",
                name: name.to_owned(),
                holders,
            }
            .into());
        }
        let deleted = self.inner.store.delete_identity(name).await?;
        if deleted {
            self.identity_changed(actor, name, Some(&old), None).await?;
        }
        Ok(deleted)
    }

    /// Tells the verifier about every key of identity `name` and records one
    /// `identity_changed` event per key that is not revoked. The change stays even when its
    /// audit fails (the error says so).
    async fn identity_changed(
        &self,
        actor: &str,
        name: &str,
        old: Option<&Identity>,
        new: Option<&Identity>,
    ) -> Result<(), LifecycleError> {
        let owned = self.inner.store.keys_with_identity(name).await?;
        let now = self.inner.clock.now();
        let change = FieldChange {
            field: format!("identity:{name}"),
            old: identity_json(old),
            new: identity_json(new),
        };
        let mut failure = None;
        for id in owned {
            self.notify(&id).await;
            let Ok(Some(record)) = self.inner.store.get(&id).await else {
                continue;
            };
            if record.status == KeyStatus::Revoked {
                continue;
            }
            let event = LifecycleEvent {
                time: now,
                actor: actor.to_owned(),
                action: LifecycleAction::IdentityChanged,
                key_id: id,
                key_name: record.name.clone(),
                subject: record.owner.clone(),
                status: record.status,
                related_key: None,
                changes: vec![change.clone()],
            };
            if let Err(e) = self
                .inner
                .auditor
                .record_durable(AuditEvent::Lifecycle(event))
                .await
            {
                tracing::error!(key_id = %id, identity = %name, error = %e, "identity change could not be audited");
                failure = Some(e.to_string());
            }
        }
        tracing::info!(identity = %name, actor = %actor, "identity changed");
        match failure {
            Some(reason) => Err(LifecycleError::AuditFailed { kept: true, reason }),
            None => Ok(()),
        }
    }
}
