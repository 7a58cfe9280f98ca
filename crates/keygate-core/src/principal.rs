//! The resolved identity of a caller.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use ipnet::IpNet;

use crate::key::{KeyId, Prefix};
use crate::record::{KeyRecord, QuotaPolicy, RateLimitPolicy};
use crate::role::{self, Grant, Identity, Role};
use crate::scope::{ResourceSet, Scope, ScopeSet};

/// Who is calling: the key a request was authenticated with and what its record grants.
///
/// Cloning is one reference-count increment. A `Principal` never holds the key's secret or
/// digest, so it is safe to pass to handlers, log with `Debug`, and keep.
///
/// Memory: the parts many keys share in practice (the granted scopes, the collection
/// patterns, the attributes) are compiled once and shared between the principals a
/// [`Verifier`](crate::Verifier) caches, so a cache of a million keys that share roles and
/// tenants costs a few hundred bytes per key.
#[derive(Clone)]
pub struct Principal {
    inner: Arc<Inner>,
}

struct Inner {
    key_id: KeyId,
    lineage_id: KeyId,
    created_at: SystemTime,
    expires_at: Option<SystemTime>,
    prefix: Prefix,
    name: Arc<str>,
    owner: Option<Arc<str>>,
    grants: Arc<Grants>,
    access: Arc<Access>,
    policy: Arc<Policy>,
    attributes: Arc<Attributes>,
    allowed_ips: Box<[IpNet]>,
    rate_limits: Box<[RateLimitPolicy]>,
    quotas: Box<[QuotaPolicy]>,
    identity: Option<Arc<str>>,
    /// [`Identity::usage_id`] of the identity, when some limit is shared.
    identity_usage: Option<KeyId>,
    /// The longest lifetime of a key this one may mint (delegated minting).
    mint_ceiling: Option<std::time::Duration>,
    /// Per rate limit, then per quota: whether it is the identity's (counted per identity).
    shared_limits: Box<[bool]>,
    /// Set when the caller presented a short-lived token derived from the key.
    token: Option<Box<Narrowing>>,
}

/// What a short-lived token derived from an API key says: its id, who it is for, and the
/// narrowing of the key's policy it carries. [`Principal::narrow`] applies it to the key's
/// *current* principal, so the token never grants more than the key holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenGrant {
    /// The token's id (the JWT `jti`).
    pub id: String,
    /// The end user the token was issued for (the JWT `sub`), if any.
    pub subject: Option<String>,
    /// The scopes the token is limited to; `None`: the key's.
    pub scopes: Option<Vec<String>>,
    /// The collection patterns the token is limited to; `None`: the key's.
    pub collections: Option<Vec<String>>,
    /// When the token expires.
    pub expires_at: SystemTime,
}

/// A token's narrowing of its key's principal, compiled.
struct Narrowing {
    /// The key's principal the token narrows (its current policy).
    parent: Principal,
    id: Arc<str>,
    subject: Option<Arc<str>>,
    scopes: Option<ScopeSet>,
    collections: Option<ResourceSet>,
    scope_list: Option<Box<[String]>>,
    collection_list: Option<Box<[String]>>,
}

impl Narrowing {
    /// `next` limited to this token's narrowing too (scopes and collections this one
    /// allows, the earlier expiry).
    fn within(&self, next: &TokenGrant, expires_at: Option<SystemTime>) -> TokenGrant {
        let scopes = match (&self.scope_list, &next.scopes) {
            (None, n) => n.clone(),
            (Some(o), None) => Some(o.to_vec()),
            (Some(_), Some(n)) => Some(
                n.iter()
                    .filter(|s| Scope::parse(s).is_ok_and(|s| self.allows_scope(&s)))
                    .cloned()
                    .collect(),
            ),
        };
        let collections = match (&self.collection_list, &next.collections) {
            (None, n) => n.clone(),
            (Some(o), None) => Some(o.to_vec()),
            (Some(o), Some(n)) => Some(
                n.iter()
                    .filter(|c| {
                        o.iter().any(|h| h == "*" || h == *c)
                            || (!c.contains('*') && self.allows_collection(c))
                    })
                    .cloned()
                    .collect(),
            ),
        };
        TokenGrant {
            id: next.id.clone(),
            subject: next.subject.clone(),
            scopes,
            collections,
            expires_at: match expires_at {
                Some(e) if e < next.expires_at => e,
                _ => next.expires_at,
            },
        }
    }

    fn allows_scope(&self, scope: &Scope) -> bool {
        self.scopes.as_ref().is_none_or(|s| s.allows(scope))
    }

    fn allows_collection(&self, name: &str) -> bool {
        self.collections.as_ref().is_none_or(|c| c.allows(name))
    }
}

/// The per-collection grants and the roles behind them, compiled.
struct Policy {
    grants: Box<[CompiledGrant]>,
    raw: Box<[Grant]>,
    roles: Arc<[Arc<str>]>,
}

struct CompiledGrant {
    scopes: ScopeSet,
    collections: ResourceSet,
    /// Index into [`Policy::roles`]; `None` for the key's own grants.
    role: Option<usize>,
}

impl Policy {
    fn new(resolved: &PolicyKey) -> Self {
        Policy {
            grants: resolved
                .grants
                .iter()
                .zip(resolved.grant_roles.iter())
                .map(|(g, role)| CompiledGrant {
                    scopes: ScopeSet::compile(&g.scopes),
                    collections: ResourceSet::compile(&g.collections),
                    role: *role,
                })
                .collect(),
            raw: resolved.grants.clone(),
            roles: resolved
                .roles
                .iter()
                .map(|r| Arc::from(r.as_str()))
                .collect(),
        }
    }
}

/// What a [`Policy`] is interned by.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
struct PolicyKey {
    grants: Box<[Grant]>,
    grant_roles: Box<[Option<usize>]>,
    roles: Box<[String]>,
}

impl PolicyKey {
    /// At most one grant and no role: [`Principal::permits`] needs no per-grant sets.
    fn is_trivial(&self) -> bool {
        self.grants.len() <= 1 && self.roles.is_empty()
    }
}

/// Granted scopes, as stored and compiled.
struct Grants {
    scopes: Box<[String]>,
    granted: ScopeSet,
}

impl Grants {
    fn new(scopes: &[String]) -> Self {
        Grants {
            scopes: scopes.into(),
            granted: ScopeSet::compile(scopes),
        }
    }
}

/// Collection patterns, as stored and compiled.
struct Access {
    resources: Box<[String]>,
    collections: ResourceSet,
}

impl Access {
    fn new(resources: &[String]) -> Self {
        Access {
            resources: resources.into(),
            collections: ResourceSet::compile(resources),
        }
    }
}

/// A key's attributes (`tenant=acme`): a small read-only map, sorted by name.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Attributes {
    pairs: Box<[(Box<str>, Arc<str>)]>,
}

impl Attributes {
    /// The attributes of a record.
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order, so the pairs are sorted.
        Attributes {
            pairs: map
                .iter()
                .map(|(k, v)| (Box::from(k.as_str()), Arc::from(v.as_str())))
                .collect(),
        }
    }

    /// The value of attribute `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_shared(name).map(|v| &**v)
    }

    /// The value of attribute `name`, shared: cloning it copies no text (audit events keep
    /// it this way).
    pub fn get_shared(&self, name: &str) -> Option<&Arc<str>> {
        self.pairs
            .binary_search_by(|(k, _)| (**k).cmp(name))
            .ok()
            .map(|i| &self.pairs[i].1)
    }

    /// The attributes as `(name, value)`, sorted by name.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.pairs.iter().map(|(k, v)| (&**k, &**v))
    }

    /// How many attributes there are.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// A copy as a map (as in [`KeyRecord::attributes`]).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.iter().map(|(k, v)| (k.into(), v.into())).collect()
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The union of the scopes and of the collection patterns of every grant, each listed
/// once in first-seen order.
fn unions(grants: &[Grant]) -> (Vec<String>, Vec<String>) {
    let (mut scopes, mut collections) = (Vec::<String>::new(), Vec::<String>::new());
    for g in grants {
        for s in &g.scopes {
            if !scopes.contains(s) {
                scopes.push(s.clone());
            }
        }
        for c in &g.collections {
            if !collections.contains(c) {
                collections.push(c.clone());
            }
        }
    }
    (scopes, collections)
}

impl Principal {
    /// The principal a record grants on its own (its digest is not copied): the roles it
    /// names grant nothing here; use [`Principal::resolve`] to include them.
    pub fn from_record(record: &KeyRecord) -> Self {
        Self::resolve(record, &[], None)
    }

    /// The principal a record grants with its roles and identity, by the rule of
    /// [`crate::role`]: `roles` are stored roles (only those the record names count),
    /// `identity` the record's identity if it exists.
    pub fn resolve(record: &KeyRecord, roles: &[Role], identity: Option<&Identity>) -> Self {
        let resolved = role::resolve(record, roles, identity);
        let (scopes, collections) = unions(&resolved.grants);
        let mut key = policy_key(&resolved);
        if key.is_trivial() {
            key = PolicyKey::default();
        }
        Self::build(
            record,
            &resolved,
            Arc::new(Grants::new(&scopes)),
            Arc::new(Access::new(&collections)),
            Arc::new(Policy::new(&key)),
            Arc::new(Attributes::from_map(&resolved.attributes)),
        )
    }

    /// [`Principal::resolve`], sharing compiled parts with earlier principals.
    pub(crate) fn resolve_shared(
        record: &KeyRecord,
        roles: &[Role],
        identity: Option<&Identity>,
        interner: &Interner,
    ) -> Self {
        let resolved = role::resolve(record, roles, identity);
        let (scopes, collections) = unions(&resolved.grants);
        Self::build(
            record,
            &resolved,
            interner.grants(&scopes),
            interner.access(&collections),
            interner.policy(policy_key(&resolved)),
            interner.attributes(&resolved.attributes),
        )
    }

    fn build(
        record: &KeyRecord,
        resolved: &role::Resolved,
        grants: Arc<Grants>,
        access: Arc<Access>,
        policy: Arc<Policy>,
        attributes: Arc<Attributes>,
    ) -> Self {
        let any_shared = resolved.rate_limits.iter().any(|(_, shared)| *shared)
            || resolved.quotas.iter().any(|(_, shared)| *shared);
        // Empty (no allocation) unless some limit is the identity's.
        let shared_limits = if any_shared {
            resolved
                .rate_limits
                .iter()
                .map(|(_, shared)| *shared)
                .chain(resolved.quotas.iter().map(|(_, shared)| *shared))
                .collect()
        } else {
            Box::default()
        };
        Principal {
            inner: Arc::new(Inner {
                key_id: record.id,
                lineage_id: record.lineage_id(),
                created_at: record.created_at,
                expires_at: record.expires_at,
                prefix: record.prefix.clone(),
                name: record.name.as_str().into(),
                owner: record.owner.as_deref().map(Arc::from),
                grants,
                access,
                policy,
                attributes,
                allowed_ips: record.allowed_ips.iter().map(|n| canonical(*n)).collect(),
                rate_limits: resolved
                    .rate_limits
                    .iter()
                    .map(|(p, _)| p.clone())
                    .collect(),
                quotas: resolved.quotas.iter().map(|(p, _)| p.clone()).collect(),
                identity: record.identity.as_deref().map(Arc::from),
                identity_usage: record
                    .identity
                    .as_deref()
                    .filter(|_| any_shared)
                    .map(Identity::usage_id),
                mint_ceiling: resolved.mint_ceiling,
                shared_limits,
                token: None,
            }),
        }
    }

    /// Whether one grant holds both `scope` and a pattern matching collection `name`: the
    /// check for a request that names a collection. [`Principal::has_scope`] and
    /// [`Principal::can_access`] each look at the union of all grants, so a key that may
    /// write `docs-*` and only read `shared` has the scope `points:write` and may access
    /// `shared`, yet is not permitted to write to `shared`.
    pub fn permits(&self, scope: &Scope, name: &str) -> bool {
        if let Some(t) = &self.inner.token {
            return t.allows_scope(scope)
                && t.allows_collection(name)
                && t.parent.permits(scope, name);
        }
        let grants = &self.inner.policy.grants;
        if grants.len() <= 1 {
            // One grant: the union is that grant (the common case, no extra work).
            return self.has_scope(scope) && self.can_access(name);
        }
        grants
            .iter()
            .any(|g| g.scopes.allows(scope) && g.collections.allows(name))
    }

    /// The names of the roles whose grants permit `scope` (on collection `name`, when the
    /// request names one), in the key's order. Empty when only the key's own grants do.
    pub fn granting_roles<'a>(
        &'a self,
        scope: &'a Scope,
        name: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<str>> + 'a {
        let policy = &*self.inner.policy;
        let mut seen = vec![false; policy.roles.len()];
        for g in policy.grants.iter() {
            if let Some(i) = g.role {
                if g.scopes.allows(scope) && name.is_none_or(|n| g.collections.allows(n)) {
                    seen[i] = true;
                }
            }
        }
        policy
            .roles
            .iter()
            .zip(seen)
            .filter_map(|(r, s)| s.then_some(r))
    }

    /// Every grant of the effective policy as written (the key's own scopes × collections
    /// first, then its extra grants, then its roles'): what an admin check compares a new
    /// grant with (one grant must cover it whole).
    pub fn grants(&self) -> Vec<Grant> {
        if let Some(t) = &self.inner.token {
            return narrow_grants(&t.parent.grants(), t);
        }
        let policy = &*self.inner.policy;
        if policy.raw.is_empty() {
            // One grant of the key's own (or none): the unions are that grant.
            if self.scopes().is_empty() && self.resources().is_empty() {
                return Vec::new();
            }
            return vec![Grant {
                scopes: self.scopes().to_vec(),
                collections: self.resources().to_vec(),
            }];
        }
        policy.raw.to_vec()
    }

    /// The roles that contributed to this principal (stored roles the key names), in the
    /// key's order.
    pub fn roles(&self) -> &[Arc<str>] {
        &self.inner.policy.roles
    }

    /// [`Principal::roles`], shared (cloning it is one reference-count increment; audit
    /// events keep it this way). `None` when there are none.
    pub fn roles_shared(&self) -> Option<&Arc<[Arc<str>]>> {
        let roles = &self.inner.policy.roles;
        (!roles.is_empty()).then_some(roles)
    }

    /// The identity owning the key, if any.
    pub fn identity(&self) -> Option<&str> {
        self.inner.identity.as_deref()
    }

    /// Whether rate limit number `index` (in [`Principal::rate_limits`]) comes from the
    /// key's identity, so it is counted once for all the identity's keys.
    pub fn rate_limit_is_shared(&self, index: usize) -> bool {
        index < self.inner.rate_limits.len()
            && self
                .inner
                .shared_limits
                .get(index)
                .copied()
                .unwrap_or(false)
    }

    /// The id the identity's shared limits are counted under ([`Identity::usage_id`]):
    /// `Some` when the key has an identity and some of its limits are the identity's.
    pub fn identity_usage_id(&self) -> Option<KeyId> {
        self.inner.identity_usage
    }

    /// The longest lifetime of a key this key may mint through the admin API (delegated
    /// minting): the shortest [`Role::mint_max_lifetime_secs`] of its roles that grant
    /// `keys:create`; `None` when it holds no such role.
    pub fn mint_ceiling(&self) -> Option<std::time::Duration> {
        self.inner.mint_ceiling
    }

    /// Whether quota number `index` (in [`Principal::quotas`]) comes from the key's
    /// identity, so it is counted once for all the identity's keys.
    pub fn quota_is_shared(&self, index: usize) -> bool {
        self.inner
            .shared_limits
            .get(self.inner.rate_limits.len() + index)
            .copied()
            .unwrap_or(false)
    }

    /// The public key id.
    pub fn key_id(&self) -> KeyId {
        self.inner.key_id
    }
    /// The id of the first key of this key's rotation chain (its own id for a key that
    /// replaced none): what rate limits and quotas count by, so rotating a key neither
    /// resets its usage nor doubles it during the grace period.
    pub fn lineage_id(&self) -> KeyId {
        self.inner.lineage_id
    }
    /// The key's prefix.
    pub fn prefix(&self) -> &Prefix {
        &self.inner.prefix
    }
    /// The key's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// The owner (subject) of the key, if the record names one.
    pub fn subject(&self) -> Option<&str> {
        self.inner.owner.as_deref()
    }
    /// The key's name, shared: cloning it copies no text (audit events keep it this way).
    pub fn name_shared(&self) -> &Arc<str> {
        &self.inner.name
    }
    /// The owner (subject), shared like [`Principal::name_shared`].
    pub fn subject_shared(&self) -> Option<&Arc<str>> {
        self.inner.owner.as_ref()
    }
    /// The `tenant` attribute, shared like [`Principal::name_shared`].
    pub fn tenant_shared(&self) -> Option<&Arc<str>> {
        self.inner.attributes.get_shared("tenant")
    }
    /// When the key was created (its rotation date is this plus the maximum key age).
    pub fn created_at(&self) -> SystemTime {
        self.inner.created_at
    }

    /// When the key expires, if ever.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.inner.expires_at
    }
    /// Granted scopes: the union of every grant's (the key's own and its roles'). For a
    /// token that names scopes, those of its scopes the key still holds.
    pub fn scopes(&self) -> &[String] {
        &self.inner.grants.scopes
    }
    /// Collection patterns the key may touch with some scope: the union of every grant's.
    /// For a token that names collections, its patterns.
    pub fn resources(&self) -> &[String] {
        &self.inner.access.resources
    }
    /// The granted scopes, compiled (for a token: [`Principal::scopes`] compiled; decisions
    /// go through [`Principal::has_scope`], which also asks the key).
    pub fn granted(&self) -> &ScopeSet {
        &self.inner.grants.granted
    }
    /// Whether the key grants `scope` (and, for a token, the token too).
    pub fn has_scope(&self, scope: &Scope) -> bool {
        match &self.inner.token {
            None => self.inner.grants.granted.allows(scope),
            Some(t) => t.allows_scope(scope) && t.parent.has_scope(scope),
        }
    }
    /// Whether the key may touch the resource (collection) `name` (and, for a token, the
    /// token too). A key with no resource patterns may touch none.
    pub fn can_access(&self, name: &str) -> bool {
        match &self.inner.token {
            None => self.inner.access.collections.allows(name),
            Some(t) => t.allows_collection(name) && t.parent.can_access(name),
        }
    }
    /// All attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.inner.attributes
    }
    /// One attribute (`principal.attribute("tenant")`).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.inner.attributes.get(name)
    }
    /// The `tenant` attribute, for row-level filtering.
    pub fn tenant(&self) -> Option<&str> {
        self.attribute("tenant")
    }
    /// The key's own IP allowlist (empty: any address).
    pub fn allowed_ips(&self) -> &[IpNet] {
        &self.inner.allowed_ips
    }
    /// The key's rate limits (empty: the layer's default).
    pub fn rate_limits(&self) -> &[RateLimitPolicy] {
        &self.inner.rate_limits
    }
    /// The key's quotas.
    pub fn quotas(&self) -> &[QuotaPolicy] {
        &self.inner.quotas
    }
    /// The id (`jti`) of the short-lived token the caller presented; `None` for a key.
    pub fn token_id(&self) -> Option<&str> {
        self.inner.token.as_ref().map(|t| &*t.id)
    }
    /// [`Principal::token_id`], shared (audit events keep it this way).
    pub fn token_id_shared(&self) -> Option<&Arc<str>> {
        self.inner.token.as_ref().map(|t| &t.id)
    }
    /// The end user the presented token was issued for (its `sub`), if any. The key's
    /// owner stays [`Principal::subject`].
    pub fn token_subject(&self) -> Option<&str> {
        self.inner.token.as_ref()?.subject.as_deref()
    }
    /// [`Principal::token_subject`], shared (audit events keep it this way).
    pub fn token_subject_shared(&self) -> Option<&Arc<str>> {
        self.inner.token.as_ref()?.subject.as_ref()
    }
    /// The key's own principal behind a token's ([`Principal::narrow`]); `None` for a key.
    pub fn parent(&self) -> Option<&Principal> {
        self.inner.token.as_ref().map(|t| &t.parent)
    }

    /// This key's principal narrowed by a short-lived token derived from it: everything
    /// (key id, lineage, limits, quotas, networks, attributes, roles) stays the key's, so
    /// limits and quotas are charged to the key; a request is permitted only when both the
    /// key (as it is now) and the token allow it; the expiry is the earlier of the two; the
    /// token's id and subject are carried for handlers and the audit log.
    ///
    /// Narrowing a token's principal again narrows the same key, within both tokens.
    pub fn narrow(&self, token: &TokenGrant) -> Principal {
        let (parent, combined);
        let token = match &self.inner.token {
            Some(t) => {
                parent = t.parent.clone();
                combined = t.within(token, self.inner.expires_at);
                &combined
            }
            None => {
                parent = self.clone();
                token
            }
        };
        let p = &*parent.inner;
        let grants = match &token.scopes {
            Some(list) => {
                let kept: Vec<String> = list
                    .iter()
                    .filter(|s| Scope::parse(s).is_ok_and(|s| parent.has_scope(&s)))
                    .cloned()
                    .collect();
                Arc::new(Grants::new(&kept))
            }
            None => p.grants.clone(),
        };
        let access = match &token.collections {
            Some(list) => Arc::new(Access::new(list)),
            None => p.access.clone(),
        };
        let expires_at = match p.expires_at {
            Some(e) if e < token.expires_at => Some(e),
            _ => Some(token.expires_at),
        };
        let narrowing = Narrowing {
            parent: parent.clone(),
            id: Arc::from(token.id.as_str()),
            subject: token.subject.as_deref().map(Arc::from),
            scopes: token.scopes.as_ref().map(ScopeSet::compile),
            collections: token.collections.as_ref().map(ResourceSet::compile),
            scope_list: token.scopes.as_deref().map(Box::from),
            collection_list: token.collections.as_deref().map(Box::from),
        };
        Principal {
            inner: Arc::new(Inner {
                key_id: p.key_id,
                lineage_id: p.lineage_id,
                created_at: p.created_at,
                expires_at,
                prefix: p.prefix.clone(),
                name: p.name.clone(),
                owner: p.owner.clone(),
                grants,
                access,
                policy: p.policy.clone(),
                attributes: p.attributes.clone(),
                allowed_ips: p.allowed_ips.clone(),
                rate_limits: p.rate_limits.clone(),
                quotas: p.quotas.clone(),
                identity: p.identity.clone(),
                shared_limits: p.shared_limits.clone(),
                // Charged like the key: the identity's shared limits too.
                identity_usage: p.identity_usage,
                // A token never mints keys, whatever its key's roles allow.
                mint_ceiling: None,
                token: Some(Box::new(narrowing)),
            }),
        }
    }

    /// Whether two principals are the same resolution (same allocation).
    pub fn ptr_eq(a: &Principal, b: &Principal) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }
}

/// Shares the compiled parts of principals between cache entries: keys with the same
/// scopes, collection patterns or attributes point at one copy. Entries no principal uses
/// any more are swept when the tables have doubled since the last sweep, so the tables stay
/// within about twice the number of distinct live values.
pub(crate) struct Interner {
    grants: Table<Box<[String]>, Grants>,
    access: Table<Box<[String]>, Access>,
    attributes: Table<Attributes, Attributes>,
    policies: Table<PolicyKey, Policy>,
}

struct Table<K, V> {
    map: DashMap<K, Arc<V>>,
    sweep_at: AtomicUsize,
}

const FIRST_SWEEP: usize = 1024;

impl<K: Eq + std::hash::Hash, V> Table<K, V> {
    fn new() -> Self {
        Table {
            map: DashMap::new(),
            sweep_at: AtomicUsize::new(FIRST_SWEEP),
        }
    }

    fn get_or_insert<Q>(&self, probe: &Q, make: impl FnOnce() -> (K, V)) -> Arc<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + std::hash::Hash + ?Sized,
    {
        if let Some(v) = self.map.get(probe) {
            return v.clone();
        }
        let (k, v) = make();
        let v = self.map.entry(k).or_insert_with(|| Arc::new(v)).clone();
        if self.map.len() >= self.sweep_at.load(Ordering::Relaxed) {
            self.map.retain(|_, v| Arc::strong_count(v) > 1);
            let live = self.map.len();
            self.sweep_at
                .store((live * 2).max(FIRST_SWEEP), Ordering::Relaxed);
        }
        v
    }
}

impl Interner {
    pub(crate) fn new() -> Self {
        Interner {
            grants: Table::new(),
            access: Table::new(),
            attributes: Table::new(),
            policies: Table::new(),
        }
    }

    fn policy(&self, key: PolicyKey) -> Arc<Policy> {
        if key.is_trivial() {
            // One grant of the key's own and no role: the union sets answer every question,
            // so all such keys share one empty policy (no per-key cost).
            let empty = PolicyKey::default();
            return self
                .policies
                .get_or_insert(&empty, || (empty.clone(), Policy::new(&empty)));
        }
        self.policies
            .get_or_insert(&key, || (key.clone(), Policy::new(&key)))
    }

    fn grants(&self, scopes: &[String]) -> Arc<Grants> {
        self.grants
            .get_or_insert(scopes, || (scopes.into(), Grants::new(scopes)))
    }

    fn access(&self, resources: &[String]) -> Arc<Access> {
        self.access
            .get_or_insert(resources, || (resources.into(), Access::new(resources)))
    }

    fn attributes(&self, map: &BTreeMap<String, String>) -> Arc<Attributes> {
        if map.is_empty() {
            return self.attributes.get_or_insert(&Attributes::default(), || {
                (Attributes::default(), Attributes::default())
            });
        }
        let probe = Attributes::from_map(map);
        self.attributes
            .get_or_insert(&probe, || (probe.clone(), probe.clone()))
    }
}

fn policy_key(resolved: &role::Resolved) -> PolicyKey {
    PolicyKey {
        grants: resolved.grants.clone().into(),
        grant_roles: resolved.grant_roles.clone().into(),
        roles: resolved.roles.clone().into(),
    }
}

/// The key's grants within a token's narrowing: of each grant, the token's scopes the grant
/// holds and the token's collection patterns the grant reaches (a pattern counts when the
/// grant has `*` or the same pattern, or when it is a plain name the grant matches); a list
/// the token does not name stays the grant's. Grants left empty are dropped, so it never
/// holds more than both the key and the token.
fn narrow_grants(held: &[Grant], t: &Narrowing) -> Vec<Grant> {
    let mut out = Vec::new();
    for g in held {
        let scopes: Vec<String> = match &t.scope_list {
            None => g.scopes.clone(),
            Some(ts) => {
                let set = ScopeSet::compile(&g.scopes);
                ts.iter()
                    .filter(|s| Scope::parse(s).is_ok_and(|s| set.allows(&s)))
                    .cloned()
                    .collect()
            }
        };
        let collections: Vec<String> = match &t.collection_list {
            None => g.collections.clone(),
            Some(tc) => {
                let gc = ResourceSet::compile(&g.collections);
                tc.iter()
                    .filter(|c| {
                        g.collections.iter().any(|h| h == "*" || h == *c)
                            || (!c.contains('*') && gc.allows(c))
                    })
                    .cloned()
                    .collect()
            }
        };
        if !scopes.is_empty() && !collections.is_empty() {
            out.push(Grant {
                scopes,
                collections,
            });
        }
    }
    out
}

/// IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) as IPv4 (`10.0.0.0/8`), so they match
/// the canonical client addresses the layers compare them with.
fn canonical(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            if let Ok(n) = ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96) {
                return IpNet::V4(n.trunc());
            }
        }
    }
    net
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("key_id", &self.inner.key_id)
            .field("name", &self.inner.name)
            .field("subject", &self.inner.owner)
            .field("scopes", &self.inner.grants.scopes)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod interner_tests {
    use super::*;

    #[test]
    fn unused_entries_are_swept() {
        let interner = Interner::new();
        let kept: Vec<_> = (0..10)
            .map(|i| interner.grants(&[format!("kept{i}:read")]))
            .collect();
        for i in 0..10_000 {
            drop(interner.grants(&[format!("c{i}:read")]));
        }
        // Swept whenever the table doubles: never more than twice the first sweep size.
        assert!(interner.grants.map.len() <= 2 * FIRST_SWEEP);
        // Values still in use survive and are shared.
        for (i, k) in kept.iter().enumerate() {
            let again = interner.grants(&[format!("kept{i}:read")]);
            assert!(Arc::ptr_eq(k, &again));
        }
        let attrs = BTreeMap::from([("tenant".to_string(), "acme".to_string())]);
        let a = interner.attributes(&attrs);
        assert!(Arc::ptr_eq(&a, &interner.attributes(&attrs)));
        assert_eq!(a.get("tenant"), Some("acme"));
        assert_eq!(a.get("other"), None);
        assert_eq!(format!("{a:?}"), r#"{"tenant": "acme"}"#);
    }
}

#[cfg(test)]
mod token_tests {
    use std::time::Duration;

    use super::*;
    use crate::digest::KeyHasher;

    fn scope(s: &str) -> Scope {
        Scope::parse(s).unwrap()
    }

    #[test]
    fn a_token_keeps_its_keys_identity_limits_and_never_mints() {
        let (_, mut record) = KeyRecord::generate(
            &Prefix::default(),
            &KeyHasher::new(),
            "pipeline",
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        record.identity = Some("etl".into());
        record.roles = vec!["minter".into()];
        let role = Role::new("minter", SystemTime::UNIX_EPOCH)
            .with_grant(Grant {
                scopes: vec!["keys:create".into(), "points:read".into()],
                collections: vec!["*".into()],
            })
            .with_mint_ceiling(Duration::from_secs(3_600));
        let mut identity = Identity::new("etl", SystemTime::UNIX_EPOCH);
        identity.rate_limits = vec![crate::RateLimitPolicy::per_second("shared", 10)];
        let key = Principal::resolve(&record, &[role], Some(&identity));
        assert_eq!(key.mint_ceiling(), Some(Duration::from_secs(3_600)));
        assert_eq!(key.identity_usage_id(), Some(Identity::usage_id("etl")));
        let t = key.narrow(&TokenGrant {
            id: "t2".into(),
            subject: None,
            scopes: None,
            collections: None,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(60),
        });
        assert_eq!(
            t.identity_usage_id(),
            key.identity_usage_id(),
            "charged like the key"
        );
        assert_eq!(t.mint_ceiling(), None, "a token mints nothing");
    }

    #[test]
    fn a_token_narrows_within_the_key_and_keeps_the_key_for_limits() {
        let (_, mut record) = KeyRecord::generate(
            &Prefix::default(),
            &KeyHasher::new(),
            "app",
            SystemTime::UNIX_EPOCH,
        )
        .unwrap();
        record.scopes = vec!["points:read".into(), "points:write".into()];
        record.resources = vec!["docs-*".into()];
        record.grants = vec![Grant {
            scopes: vec!["points:read".into()],
            collections: vec!["shared".into()],
        }];
        record.expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(100));
        let key = Principal::from_record(&record);
        let token = TokenGrant {
            id: "t1".into(),
            subject: Some("user-42".into()),
            scopes: Some(vec!["points:read".into(), "points:delete".into()]),
            collections: Some(vec!["docs-a".into(), "shared".into(), "other".into()]),
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(500),
        };
        let t = key.narrow(&token);
        assert_eq!(t.key_id(), key.key_id(), "limits and quotas count the key");
        assert_eq!(t.lineage_id(), key.lineage_id());
        assert_eq!(t.token_id(), Some("t1"));
        assert_eq!(t.token_subject(), Some("user-42"));
        assert!(key.token_id().is_none() && key.token_subject().is_none());
        assert!(Principal::ptr_eq(t.parent().unwrap(), &key));
        assert_eq!(t.expires_at(), key.expires_at(), "the earlier expiry");

        assert!(t.permits(&scope("points:read"), "docs-a"));
        assert!(t.permits(&scope("points:read"), "shared"));
        assert!(
            !t.permits(&scope("points:write"), "docs-a"),
            "not the token's"
        );
        assert!(
            !t.permits(&scope("points:read"), "docs-b"),
            "not the token's"
        );
        assert!(
            !t.permits(&scope("points:delete"), "docs-a"),
            "not the key's"
        );
        assert!(!t.can_access("other"), "not the key's");
        assert!(t.has_scope(&scope("points:read")));
        assert!(!t.has_scope(&scope("points:delete")));
        assert_eq!(t.scopes(), ["points:read"], "the token's, within the key");

        // The grants an admin check would compare: never more than both.
        let grants = t.grants();
        assert_eq!(
            grants,
            vec![
                Grant {
                    scopes: vec!["points:read".into()],
                    collections: vec!["docs-a".into()],
                },
                Grant {
                    scopes: vec!["points:read".into()],
                    collections: vec!["shared".into()],
                },
            ]
        );

        // A token without narrowing is the key, with the token's id and expiry.
        let plain = key.narrow(&TokenGrant {
            id: "t2".into(),
            subject: None,
            scopes: None,
            collections: None,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(50),
        });
        assert!(plain.permits(&scope("points:write"), "docs-b"));
        assert_eq!(plain.grants(), key.grants());
        assert_eq!(
            plain.expires_at(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(50))
        );
        // Narrowing a token narrows the same key, within both.
        let twice = t.narrow(&TokenGrant {
            id: "t3".into(),
            subject: None,
            scopes: Some(vec!["points:write".into()]),
            collections: None,
            expires_at: SystemTime::UNIX_EPOCH + Duration::from_secs(50),
        });
        assert!(Principal::ptr_eq(twice.parent().unwrap(), &key));
        assert!(
            !twice.has_scope(&scope("points:write")),
            "not the first token's"
        );
        assert!(!twice.has_scope(&scope("points:read")), "not the second's");
        assert!(twice.expires_at() <= t.expires_at());
    }
}
