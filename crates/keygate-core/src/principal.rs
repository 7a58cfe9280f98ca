//! The resolved identity of a caller.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;

use crate::key::{KeyId, Prefix};
use crate::record::{KeyRecord, QuotaPolicy, RateLimitPolicy};
use crate::scope::{ResourceSet, Scope, ScopeSet};

/// Who is calling: the key a request was authenticated with and what its record grants.
///
/// Cloning is one reference-count increment. A `Principal` never holds the key's secret or
/// digest, so it is safe to pass to handlers, log with `Debug`, and keep.
#[derive(Clone)]
pub struct Principal {
    inner: Arc<Inner>,
}

struct Inner {
    key_id: KeyId,
    prefix: Prefix,
    name: String,
    owner: Option<String>,
    expires_at: Option<SystemTime>,
    scopes: Vec<String>,
    resources: Vec<String>,
    granted: ScopeSet,
    collections: ResourceSet,
    attributes: BTreeMap<String, String>,
    allowed_ips: Vec<IpNet>,
    rate_limits: Vec<RateLimitPolicy>,
    quotas: Vec<QuotaPolicy>,
}

impl Principal {
    /// The principal a record grants (its digest is not copied).
    pub fn from_record(record: &KeyRecord) -> Self {
        Principal {
            inner: Arc::new(Inner {
                key_id: record.id,
                prefix: record.prefix.clone(),
                name: record.name.clone(),
                owner: record.owner.clone(),
                expires_at: record.expires_at,
                scopes: record.scopes.clone(),
                resources: record.resources.clone(),
                granted: ScopeSet::compile(&record.scopes),
                collections: ResourceSet::compile(&record.resources),
                attributes: record.attributes.clone(),
                allowed_ips: record.allowed_ips.iter().map(|n| canonical(*n)).collect(),
                rate_limits: record.rate_limits.clone(),
                quotas: record.quotas.clone(),
            }),
        }
    }

    /// The public key id.
    pub fn key_id(&self) -> KeyId {
        self.inner.key_id
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
    /// When the key expires, if ever.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.inner.expires_at
    }
    /// Granted scopes as stored.
    pub fn scopes(&self) -> &[String] {
        &self.inner.scopes
    }
    /// Collection patterns the key may touch, as stored.
    pub fn resources(&self) -> &[String] {
        &self.inner.resources
    }
    /// The granted scopes, compiled.
    pub fn granted(&self) -> &ScopeSet {
        &self.inner.granted
    }
    /// Whether the key grants `scope`.
    pub fn has_scope(&self, scope: &Scope) -> bool {
        self.inner.granted.allows(scope)
    }
    /// Whether the key may touch the resource (collection) `name`. A key with no resource
    /// patterns may touch none.
    pub fn can_access(&self, name: &str) -> bool {
        self.inner.collections.allows(name)
    }
    /// All attributes.
    pub fn attributes(&self) -> &BTreeMap<String, String> {
        &self.inner.attributes
    }
    /// One attribute (`principal.attribute("tenant")`).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.inner.attributes.get(name).map(String::as_str)
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
    /// Whether two principals are the same resolution (same allocation).
    pub fn ptr_eq(a: &Principal, b: &Principal) -> bool {
        Arc::ptr_eq(&a.inner, &b.inner)
    }
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
            .field("scopes", &self.inner.scopes)
            .finish_non_exhaustive()
    }
}
