//! Roles, grants and identities: policy as named data, and how a key's effective policy is
//! resolved from its own fields, its roles and its identity.
//!
//! ```
//! use keygate_core::{Grant, KeyRecord, KeyHasher, Prefix, Principal, Role, Scope};
//! use std::time::SystemTime;
//!
//! let (_, mut record) =
//!     KeyRecord::generate(&Prefix::default(), &KeyHasher::new(), "ingest", SystemTime::UNIX_EPOCH).unwrap();
//! // The key may write points to `docs-*` ...
//! record.grants.push(Grant::new(["points:write", "points:read"], ["docs-*"]));
//! // ... and its role lets it only read `shared`.
//! record.roles.push("shared-reader".into());
//! let role = Role::new("shared-reader", SystemTime::UNIX_EPOCH)
//!     .with_grant(Grant::new(["points:read"], ["shared"]));
//!
//! let p = Principal::resolve(&record, &[role], None);
//! let write = Scope::parse("points:write").unwrap();
//! assert!(p.permits(&write, "docs-1"));
//! assert!(!p.permits(&write, "shared"));
//! assert!(p.permits(&Scope::parse("points:read").unwrap(), "shared"));
//! ```
//!
//! # The resolution rule
//!
//! A key's effective policy is built from three sources, in this order: the key's own
//! fields, each role the key names (in the order the key lists them; a name no stored role
//! has contributes nothing), and the key's identity.
//!
//! - **Grants: union.** The key's own `scopes` × `resources` are one grant (so keys written
//!   before grants existed keep their meaning), followed by the key's extra `grants`, then
//!   every grant of every role. A request needing scope `S` on collection `C` is allowed
//!   when *one* grant holds both `S` and a pattern matching `C`; a scope held only on other
//!   collections does not reach `C`. Identities carry no grants.
//! - **Rate limits and quotas: tightest.** Policies from the key and its roles are
//!   gathered; policies with different names all apply. Among rate limits sharing a name
//!   the lowest rate (`limit / period`) wins; among quotas sharing a name the smallest
//!   `limit` wins (windows compared as written: the kept policy keeps its own window). On a
//!   tie the earlier source wins (key, then roles in order). These count per key (its
//!   rotation lineage).
//! - **The identity's limits: shared, and in addition.** The identity's rate limits and
//!   quotas (the tightest of a name among them) follow the key's, marked as shared
//!   ([`Principal::rate_limit_is_shared`](crate::Principal::rate_limit_is_shared)): the
//!   rate-limit and quota layers count them once for all the identity's keys, under
//!   [`Identity::usage_id`]. They never replace a key's or a role's limit, even of the same
//!   name: a request is charged to both and refused when either has no room (the tightest
//!   standing decides). Give them names of their own (`etl-burst`), so the `RateLimit`
//!   fields name each policy once.
//! - **Attributes: the key's own win.** Then each role's, in order, adds the attributes not
//!   yet set. One exception: `max_key_age` (a maximum key age, `30d`) is tightened by the
//!   identity's metadata field of that name when the identity's is shorter.
//! - **Networks and expiry** are the key's own: roles and identities do not carry them.
//! - **Minting ceiling**: the shortest [`Role::mint_max_lifetime_secs`] among the key's
//!   roles that grant `keys:create`
//!   ([`Principal::mint_ceiling`](crate::Principal::mint_ceiling)); none without such a
//!   role. It lets the key mint keys through the admin API (for its own identity, within
//!   its own grants, living at most that long).
//!
//! The verifier resolves a key once per change of the key, of one of its roles or of its
//! identity, and caches the resulting [`Principal`](crate::Principal); no request pays for
//! resolution.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::key::KeyId;
use crate::record::{KeyRecord, QuotaPolicy, RateLimitPolicy};

/// Scopes paired with the collections they apply to: `points:write` on `docs-*`.
///
/// A grant with no collections still grants its scopes on routes that name no collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// Scopes (`points:read`, `points:*`, `*`).
    pub scopes: Vec<String>,
    /// Collection patterns (`docs-*`, `shared`, `*`).
    #[serde(default)]
    pub collections: Vec<String>,
}

impl Grant {
    /// `scopes` on `collections`.
    pub fn new<S, C>(scopes: S, collections: C) -> Self
    where
        S: IntoIterator,
        S::Item: Into<String>,
        C: IntoIterator,
        C::Item: Into<String>,
    {
        Grant {
            scopes: scopes.into_iter().map(Into::into).collect(),
            collections: collections.into_iter().map(Into::into).collect(),
        }
    }

    /// Whether the grant holds nothing (no scopes and no collections).
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.collections.is_empty()
    }
}

/// The attribute (on a key or role) and identity metadata field naming a maximum key age
/// (`30d`, `12h`): the resolved attribute is the tightest of the key's (else its first
/// role's) and its identity's.
const MAX_KEY_AGE: &str = "max_key_age";

/// A named set of grants, attributes and limits that keys hold by name (`vector-reader`,
/// `index-admin`). Changing a role changes every key holding it, without touching the keys.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Role {
    /// The role's name: 1 to 64 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// What the role grants.
    pub grants: Vec<Grant>,
    /// Attributes given to the keys holding it (a key's own attributes win).
    pub attributes: BTreeMap<String, String>,
    /// Rate limits (the tightest of a name applies).
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Quotas (the tightest of a name applies).
    pub quotas: Vec<QuotaPolicy>,
    /// When it was created.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// When it last changed.
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: SystemTime,
    /// Bumped by the store on every write; a conditional write names the version it read.
    pub version: u64,
    /// Delegated minting: when the role grants `keys:create`, the longest lifetime (whole
    /// seconds) of a key that a key holding it may mint through the admin API, for its own
    /// identity and within its own grants. `None`: holding the role lets no key mint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mint_max_lifetime_secs: Option<u64>,
}

impl Role {
    /// An empty role named `name`, created at `now`.
    pub fn new(name: impl Into<String>, now: SystemTime) -> Self {
        Role {
            name: name.into(),
            grants: Vec::new(),
            attributes: BTreeMap::new(),
            rate_limits: Vec::new(),
            quotas: Vec::new(),
            created_at: now,
            updated_at: now,
            version: 0,
            mint_max_lifetime_secs: None,
        }
    }

    /// Lets keys holding the role mint keys living at most `max` (whole seconds, rounded
    /// down); the role must also grant `keys:create`.
    pub fn with_mint_ceiling(mut self, max: std::time::Duration) -> Self {
        self.mint_max_lifetime_secs = Some(max.as_secs());
        self
    }

    /// Adds a grant.
    pub fn with_grant(mut self, grant: Grant) -> Self {
        self.grants.push(grant);
        self
    }

    /// Adds a rate limit.
    pub fn with_rate_limit(mut self, policy: RateLimitPolicy) -> Self {
        self.rate_limits.push(policy);
        self
    }

    /// Adds a quota.
    pub fn with_quota(mut self, policy: QuotaPolicy) -> Self {
        self.quotas.push(policy);
        self
    }

    /// Sets an attribute.
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }
}

/// A service principal (`etl-pipeline`) owning many keys, which usage reports can add up
/// (`keygate usage --identity`). Its rate limits and quotas are shared by all its keys: they
/// join each key's policy marked as the identity's
/// ([`Principal::rate_limit_is_shared`](crate::Principal::rate_limit_is_shared)), and the
/// rate-limit and quota layers count them in one bucket for the whole identity, under
/// [`Identity::usage_id`] (see the [resolution rule](crate::role)).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Identity {
    /// The identity's name: 1 to 64 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Free JSON metadata (not used by keygate).
    pub metadata: serde_json::Value,
    /// Rate limits shared by every key of the identity (one bucket for all).
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Quotas shared by every key of the identity (one count for all).
    pub quotas: Vec<QuotaPolicy>,
    /// When it was created.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: SystemTime,
    /// When it last changed.
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: SystemTime,
}

impl Identity {
    /// The id an identity's shared rate limits and quotas are counted under, in every
    /// store (in-process limiters, SQL usage rows, Redis keys): a key id derived from the
    /// name (blake3, domain-separated), the same in every process. Usage stores hold it as
    /// they hold a key's lineage id; `keygate usage --identity` reads it back. A derived id
    /// cannot be told apart from a random key id, but meeting one is as likely as guessing
    /// a 71-bit number.
    pub fn usage_id(name: &str) -> KeyId {
        KeyId::derive("keygate 2026 identity usage id", name.as_bytes())
    }

    /// An identity named `name` with no limits, created at `now`.
    pub fn new(name: impl Into<String>, now: SystemTime) -> Self {
        Identity {
            name: name.into(),
            metadata: serde_json::Value::Null,
            rate_limits: Vec::new(),
            quotas: Vec::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&crate::time::rfc3339_millis(*t))
}

/// Why a role or identity name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} name {text:?}: 1 to 64 characters of [A-Za-z0-9_.-]")]
pub struct InvalidName {
    what: &'static str,
    text: String,
}

/// Checks a role or identity name (`what` says which, for the message).
pub fn validate_name(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            text: name.chars().take(64).collect(),
        })
    }
}

/// A key's effective policy, resolved from its record, its roles and its identity by the
/// rule in the [module documentation](self).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Resolved {
    /// Every grant, the key's own first.
    pub(crate) grants: Vec<Grant>,
    /// Names of the roles that were found and contributed, in the key's order.
    pub(crate) roles: Vec<String>,
    /// Per grant, the role it came from (`None`: the key's own).
    pub(crate) grant_roles: Vec<Option<usize>>,
    pub(crate) attributes: BTreeMap<String, String>,
    pub(crate) rate_limits: Vec<(RateLimitPolicy, bool)>,
    pub(crate) quotas: Vec<(QuotaPolicy, bool)>,
    /// The tightest minting ceiling of the roles that grant `keys:create` with one.
    pub(crate) mint_ceiling: Option<std::time::Duration>,
}

/// Whether one of `role`'s grants holds the scope `keys:create`.
fn grants_key_creation(role: &Role) -> bool {
    let Ok(create) = crate::Scope::parse("keys:create") else {
        return false;
    };
    role.grants
        .iter()
        .any(|g| crate::ScopeSet::compile(&g.scopes).allows(&create))
}

/// Resolves `record`'s effective policy. `roles` are the stored roles (any order; only
/// those the record names count), `identity` the record's identity if it exists.
pub(crate) fn resolve(record: &KeyRecord, roles: &[Role], identity: Option<&Identity>) -> Resolved {
    let mut grants = Vec::new();
    let mut grant_roles = Vec::new();
    if !record.scopes.is_empty() || !record.resources.is_empty() {
        grants.push(Grant {
            scopes: record.scopes.clone(),
            collections: record.resources.clone(),
        });
        grant_roles.push(None);
    }
    for g in &record.grants {
        grants.push(g.clone());
        grant_roles.push(None);
    }
    let mut attributes = record.attributes.clone();
    // (policy, from_identity)
    let mut rates: Vec<(RateLimitPolicy, bool)> = record
        .rate_limits
        .iter()
        .map(|p| (p.clone(), false))
        .collect();
    let mut quotas: Vec<(QuotaPolicy, bool)> =
        record.quotas.iter().map(|p| (p.clone(), false)).collect();
    let mut found = Vec::new();
    let mut mint_ceiling: Option<std::time::Duration> = None;
    let mut seen = std::collections::BTreeSet::new();
    for name in &record.roles {
        if !seen.insert(name.as_str()) {
            continue;
        }
        let Some(role) = roles.iter().find(|r| &r.name == name) else {
            continue;
        };
        let index = found.len();
        found.push(role.name.clone());
        if let Some(secs) = role.mint_max_lifetime_secs {
            if grants_key_creation(role) {
                let c = std::time::Duration::from_secs(secs);
                mint_ceiling = Some(mint_ceiling.map_or(c, |m| m.min(c)));
            }
        }
        for g in &role.grants {
            grants.push(g.clone());
            grant_roles.push(Some(index));
        }
        for (k, v) in &role.attributes {
            attributes.entry(k.clone()).or_insert_with(|| v.clone());
        }
        rates.extend(role.rate_limits.iter().map(|p| (p.clone(), false)));
        quotas.extend(role.quotas.iter().map(|p| (p.clone(), false)));
    }
    let mut rate_limits = tightest(rates, |a, b| rate_cmp(a, b).is_lt(), |p| &p.name);
    let mut quota_list = tightest(quotas, |a, b| a.limit < b.limit, |p| &p.name);
    if let Some(identity) = identity.filter(|i| record.identity.as_deref() == Some(&i.name)) {
        // The identity's limits count once for all its keys: they never replace a key's or
        // a role's limit of the same name (those count per key); both apply.
        let shared_rates = identity.rate_limits.iter().map(|p| (p.clone(), true));
        rate_limits.extend(tightest(
            shared_rates.collect(),
            |a, b| rate_cmp(a, b).is_lt(),
            |p| &p.name,
        ));
        let shared_quotas = identity.quotas.iter().map(|p| (p.clone(), true));
        quota_list.extend(tightest(
            shared_quotas.collect(),
            |a, b| a.limit < b.limit,
            |p| &p.name,
        ));
        // The identity's maximum key age (its metadata field `max_key_age`) tightens the
        // key's or roles' attribute of that name: the rotation date every key of the
        // identity answers with (`Deprecation`) and the notices sweep agree.
        if let Some(text) = identity.metadata.get(MAX_KEY_AGE).and_then(|v| v.as_str()) {
            if let Ok(age) = crate::time::parse_duration(text) {
                let own = attributes
                    .get(MAX_KEY_AGE)
                    .and_then(|t| crate::time::parse_duration(t).ok());
                if own.is_none_or(|own| age < own) {
                    attributes.insert(MAX_KEY_AGE.to_owned(), text.to_owned());
                }
            }
        }
    }
    Resolved {
        grants,
        roles: found,
        grant_roles,
        attributes,
        rate_limits,
        quotas: quota_list,
        mint_ceiling,
    }
}

/// Keeps, per name, the first policy no later one is tighter than.
fn tightest<P>(
    all: Vec<(P, bool)>,
    tighter: impl Fn(&P, &P) -> bool,
    name: impl Fn(&P) -> &String,
) -> Vec<(P, bool)> {
    let mut out: Vec<(P, bool)> = Vec::with_capacity(all.len());
    for (p, from_identity) in all {
        match out.iter_mut().find(|(q, _)| name(q) == name(&p)) {
            Some(kept) => {
                if tighter(&p, &kept.0) {
                    *kept = (p, from_identity);
                }
            }
            None => out.push((p, from_identity)),
        }
    }
    out
}

/// Compares two rates (`limit / period`) exactly, by cross-multiplying.
fn rate_cmp(a: &RateLimitPolicy, b: &RateLimitPolicy) -> std::cmp::Ordering {
    let lhs = u128::from(a.limit) * b.period.as_nanos();
    let rhs = u128::from(b.limit) * a.period.as_nanos();
    lhs.cmp(&rhs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyHasher, Prefix, QuotaWindow};
    use std::time::Duration;

    fn record() -> KeyRecord {
        KeyRecord::generate(
            &Prefix::default(),
            &KeyHasher::new(),
            "k",
            SystemTime::UNIX_EPOCH,
        )
        .unwrap()
        .1
    }

    #[test]
    fn union_of_grants_tightest_limits_key_attributes_first() {
        let mut r = record();
        r.scopes = vec!["points:read".into()];
        r.resources = vec!["docs-*".into()];
        r.attributes.insert("tenant".into(), "acme".into());
        r.rate_limits = vec![RateLimitPolicy::per_second("burst", 50)];
        r.quotas = vec![QuotaPolicy::new("daily", 1000, QuotaWindow::Day)];
        r.roles = vec!["a".into(), "missing".into(), "b".into(), "a".into()];
        let a = Role::new("a", SystemTime::UNIX_EPOCH)
            .with_grant(Grant::new(["points:write"], ["docs-*"]))
            .with_attribute("tenant", "other")
            .with_attribute("tier", "gold")
            // 600/min = 10/s: tighter than 50/s.
            .with_rate_limit(RateLimitPolicy::per_minute("burst", 600))
            .with_quota(QuotaPolicy::new("daily", 5000, QuotaWindow::Day));
        let b = Role::new("b", SystemTime::UNIX_EPOCH)
            .with_grant(Grant::new(["points:read"], ["shared"]))
            .with_attribute("tier", "silver")
            // Same rate as a's (10/s): the earlier source (a) is kept.
            .with_rate_limit(RateLimitPolicy::per_second("burst", 10))
            .with_rate_limit(RateLimitPolicy::per_hour("hourly", 100))
            .with_quota(QuotaPolicy::new("daily", 10, QuotaWindow::Day));
        let res = resolve(&r, &[b.clone(), a.clone()], None);
        assert_eq!(res.roles, ["a", "b"]);
        assert_eq!(res.grants.len(), 3);
        assert_eq!(res.grant_roles, [None, Some(0), Some(1)]);
        assert_eq!(res.attributes["tenant"], "acme");
        assert_eq!(res.attributes["tier"], "gold");
        let rates: Vec<_> = res.rate_limits.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            rates,
            [
                RateLimitPolicy::per_minute("burst", 600),
                RateLimitPolicy::per_hour("hourly", 100)
            ]
        );
        let quotas: Vec<_> = res.quotas.iter().map(|(p, _)| p.limit).collect();
        assert_eq!(quotas, [10]);

        // The identity's limits join in, marked as the identity's.
        r.identity = Some("etl".into());
        let mut id = Identity::new("etl", SystemTime::UNIX_EPOCH);
        id.rate_limits = vec![RateLimitPolicy::new("burst", 1, Duration::from_secs(1))];
        id.rate_limits.push(RateLimitPolicy::per_second("burst", 5));
        let res = resolve(&r, &[a, b], Some(&id));
        // After the key's and roles' (tightest of a name), never replacing them; the
        // tightest of the identity's own of one name.
        assert_eq!(res.rate_limits.len(), 3);
        assert_eq!(
            res.rate_limits[0],
            (RateLimitPolicy::per_minute("burst", 600), false)
        );
        assert_eq!(res.rate_limits[2], (id.rate_limits[0].clone(), true));
        // An identity other than the key's is ignored.
        r.identity = Some("other".into());
        let res = resolve(&r, &[], Some(&id));
        assert!(res.rate_limits.iter().all(|(_, from_id)| !from_id));
    }

    #[test]
    fn names() {
        assert!(validate_name("role", "vector-reader").is_ok());
        for bad in ["", "a b", "x/y", &"a".repeat(65)] {
            assert!(validate_name("role", bad).is_err(), "{bad}");
        }
    }
}
