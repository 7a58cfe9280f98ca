//! What the admin API reads: request bodies and query strings, validated into lifecycle
//! inputs.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::AdminError;
use keygate::{
    Expiry, Grant, Identity, IdentityUpdate, KeyFilter, KeySpec, KeyUpdate, Prefix, Role,
    RoleUpdate,
};
use keygate::{KeyStatus, QuotaPolicy, RateLimitPolicy};

/// The body of `POST /keys`. Only `name` is required; unknown fields are refused.
///
/// ```json
/// {"name": "reader", "owner": "acme", "scopes": ["points:read"], "collections": ["docs*"],
///  "attributes": {"tenant": "acme"}, "allowed_ips": ["10.0.0.0/8"],
///  "rate_limits": ["burst=20/s"], "quotas": ["daily=10000/day"], "expires_in": "90d",
///  "metadata": {"ticket": 42}, "allow_unknown_scopes": false}
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// A human name.
    pub name: String,
    /// The owner (subject).
    #[serde(default)]
    pub owner: Option<String>,
    /// Granted scopes (`points:read`, `points:*`, `*`).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Collections (names or patterns such as `docs*`); also accepted as `resources`.
    #[serde(default, alias = "resources")]
    pub collections: Vec<String>,
    /// Attributes (`{"tenant": "acme"}`).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Networks the key may be used from (`10.0.0.0/8`, `2001:db8::1`).
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    /// Rate limits: `"burst=20/s"` or `{"name": "burst", "limit": 20, "period": 1000}`
    /// (period in milliseconds).
    #[serde(default)]
    pub rate_limits: Vec<PolicyInput<RateLimitPolicy>>,
    /// Quotas: `"daily=10000/day"` or `{"name": "daily", "limit": 10000, "window": "day"}`.
    #[serde(default)]
    pub quotas: Vec<PolicyInput<QuotaPolicy>>,
    /// Expires this long after creation: `30s`, `15m`, `12h`, `90d`.
    #[serde(default)]
    pub expires_in: Option<String>,
    /// Expires at this instant (RFC 3339, `2027-01-01T00:00:00Z`).
    #[serde(default)]
    pub expires_at: Option<String>,
    /// The key's prefix (default: the manager's).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Free JSON metadata.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Grant scopes that are not in the API's scope vocabulary (custom scopes checked by a
    /// handler rather than the route table); default `false`: such a scope is refused.
    #[serde(default)]
    pub allow_unknown_scopes: bool,
    /// Grants beyond `scopes` × `collections`: `[{"scopes": ["points:write"],
    /// "collections": ["docs-*"]}]`.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Roles the key holds (each must exist).
    #[serde(default)]
    pub roles: Vec<String>,
    /// The identity owning the key (it must exist).
    #[serde(default)]
    pub identity: Option<String>,
}

/// The body of `PATCH /keys/{id}`: each field given replaces the key's (`add_roles` and
/// `remove_roles` add and remove roles; `identity: null` detaches the key from its
/// identity, `expires_at: null` makes it never expire). Unknown fields are refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    /// A new name.
    #[serde(default)]
    pub name: Option<String>,
    /// A new owner.
    #[serde(default)]
    pub owner: Option<String>,
    /// New scopes.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// New collections (also accepted as `resources`).
    #[serde(default, alias = "resources")]
    pub collections: Option<Vec<String>>,
    /// New extra grants.
    #[serde(default)]
    pub grants: Option<Vec<Grant>>,
    /// New attributes.
    #[serde(default)]
    pub attributes: Option<BTreeMap<String, String>>,
    /// New networks.
    #[serde(default)]
    pub allowed_ips: Option<Vec<String>>,
    /// New rate limits.
    #[serde(default)]
    pub rate_limits: Option<Vec<PolicyInput<RateLimitPolicy>>>,
    /// New quotas.
    #[serde(default)]
    pub quotas: Option<Vec<PolicyInput<QuotaPolicy>>>,
    /// New roles (replacing the key's).
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    /// Roles to add.
    #[serde(default)]
    pub add_roles: Vec<String>,
    /// Roles to remove.
    #[serde(default)]
    pub remove_roles: Vec<String>,
    /// The identity (`null` detaches the key).
    #[serde(default, deserialize_with = "present")]
    pub identity: Option<Option<String>>,
    /// Expires this long from now.
    #[serde(default)]
    pub expires_in: Option<String>,
    /// Expires at this instant (`null`: never).
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<String>>,
    /// New metadata.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// A field that may be absent (`None`), `null` (`Some(None)`) or a value.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl UpdateKey {
    /// The lifecycle update this body asks for.
    pub(crate) fn into_update(self) -> Result<KeyUpdate, AdminError> {
        let mut u = KeyUpdate::new();
        u.name = self.name;
        u.owner = self.owner.map(Some);
        u.scopes = self.scopes;
        u.resources = self.collections;
        u.grants = self.grants;
        u.attributes = self.attributes;
        if let Some(ips) = self.allowed_ips {
            let mut nets = Vec::with_capacity(ips.len());
            for text in &ips {
                nets.push(
                    keygate::client_ip::parse_network(text)
                        .map_err(|e| AdminError::invalid(format!("allowed_ips: {e}")))?,
                );
            }
            u.allowed_ips = Some(nets);
        }
        if let Some(ps) = self.rate_limits {
            u.rate_limits = Some(
                ps.into_iter()
                    .map(|p| p.resolve("rate_limits"))
                    .collect::<Result<_, _>>()?,
            );
        }
        if let Some(ps) = self.quotas {
            u.quotas = Some(
                ps.into_iter()
                    .map(|p| p.resolve("quotas"))
                    .collect::<Result<_, _>>()?,
            );
        }
        u.roles = self.roles;
        u.add_roles = self.add_roles;
        u.remove_roles = self.remove_roles;
        u.identity = self.identity;
        u.expires = match (self.expires_in, self.expires_at) {
            (Some(_), Some(_)) => {
                return Err(AdminError::invalid(
                    "give expires_in or expires_at, not both",
                ))
            }
            (Some(d), None) => Some(Some(Expiry::In(duration("expires_in", &d)?))),
            (None, Some(Some(t))) => Some(Some(Expiry::At(instant("expires_at", &t)?))),
            (None, Some(None)) => Some(None),
            (None, None) => None,
        };
        u.metadata = self.metadata;
        if u == KeyUpdate::new() {
            return Err(AdminError::invalid("the body changes nothing"));
        }
        Ok(u)
    }
}

/// The body of `POST /roles`: a name, and grants given as `grants` and/or as one grant
/// `scopes` × `collections`. Unknown fields are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleInput {
    /// The role's name.
    pub name: String,
    /// Grants.
    #[serde(default)]
    pub grants: Vec<Grant>,
    /// Scopes of one more grant, on `collections`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Collections of that grant.
    #[serde(default)]
    pub collections: Vec<String>,
    /// Attributes given to the keys holding the role.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Rate limits.
    #[serde(default)]
    pub rate_limits: Vec<PolicyInput<RateLimitPolicy>>,
    /// Quotas.
    #[serde(default)]
    pub quotas: Vec<PolicyInput<QuotaPolicy>>,
    /// Delegated minting: with `keys:create` in its grants, the longest lifetime of a key
    /// that a key holding the role may mint (`1h`, `7d`).
    #[serde(default)]
    pub mint_max_lifetime: Option<String>,
}

/// A minting ceiling as whole seconds.
fn mint_secs(text: &str) -> Result<u64, AdminError> {
    let d = duration("mint_max_lifetime", text)?;
    Ok(d.as_secs())
}

fn one_grant(
    mut grants: Vec<Grant>,
    scopes: Vec<String>,
    collections: Vec<String>,
) -> Result<Vec<Grant>, AdminError> {
    if scopes.is_empty() && !collections.is_empty() {
        return Err(AdminError::invalid(
            "collections: give scopes for them to apply to",
        ));
    }
    if !scopes.is_empty() {
        grants.push(Grant {
            scopes,
            collections,
        });
    }
    Ok(grants)
}

impl RoleInput {
    pub(crate) fn into_role(self, now: SystemTime) -> Result<Role, AdminError> {
        let mut role = Role::new(self.name, now);
        role.grants = one_grant(self.grants, self.scopes, self.collections)?;
        role.attributes = self.attributes;
        for p in self.rate_limits {
            role.rate_limits.push(p.resolve("rate_limits")?);
        }
        for p in self.quotas {
            role.quotas.push(p.resolve("quotas")?);
        }
        role.mint_max_lifetime_secs = self
            .mint_max_lifetime
            .as_deref()
            .map(mint_secs)
            .transpose()?;
        Ok(role)
    }
}

/// The body of `PATCH /roles/{name}`: each field given replaces the role's (`scopes` and
/// `collections` together stand for one more grant added to `grants`, or for the only one).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleUpdateInput {
    /// New grants.
    #[serde(default)]
    pub grants: Option<Vec<Grant>>,
    /// Scopes of one grant, on `collections`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Collections of that grant.
    #[serde(default)]
    pub collections: Vec<String>,
    /// New attributes.
    #[serde(default)]
    pub attributes: Option<BTreeMap<String, String>>,
    /// New rate limits.
    #[serde(default)]
    pub rate_limits: Option<Vec<PolicyInput<RateLimitPolicy>>>,
    /// New quotas.
    #[serde(default)]
    pub quotas: Option<Vec<PolicyInput<QuotaPolicy>>>,
    /// A new minting ceiling (`null` takes it away).
    #[serde(default, deserialize_with = "present")]
    pub mint_max_lifetime: Option<Option<String>>,
}

impl RoleUpdateInput {
    pub(crate) fn into_update(self) -> Result<RoleUpdate, AdminError> {
        let grants = if self.grants.is_some() || !self.scopes.is_empty() {
            Some(one_grant(
                self.grants.unwrap_or_default(),
                self.scopes,
                self.collections,
            )?)
        } else if !self.collections.is_empty() {
            return Err(AdminError::invalid(
                "collections: give scopes for them to apply to",
            ));
        } else {
            None
        };
        let u = RoleUpdate {
            grants,
            attributes: self.attributes,
            rate_limits: self
                .rate_limits
                .map(|ps| ps.into_iter().map(|p| p.resolve("rate_limits")).collect())
                .transpose()?,
            quotas: self
                .quotas
                .map(|ps| ps.into_iter().map(|p| p.resolve("quotas")).collect())
                .transpose()?,
            mint_max_lifetime_secs: match self.mint_max_lifetime {
                None => None,
                Some(None) => Some(None),
                Some(Some(t)) => Some(Some(mint_secs(&t)?)),
            },
        };
        if u == RoleUpdate::default() {
            return Err(AdminError::invalid("the body changes nothing"));
        }
        Ok(u)
    }
}

/// The body of `POST /identities`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityInput {
    /// The identity's name.
    pub name: String,
    /// Free JSON metadata.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// Rate limits applied to each of its keys.
    #[serde(default)]
    pub rate_limits: Vec<PolicyInput<RateLimitPolicy>>,
    /// Quotas applied to each of its keys.
    #[serde(default)]
    pub quotas: Vec<PolicyInput<QuotaPolicy>>,
}

impl IdentityInput {
    pub(crate) fn into_identity(self, now: SystemTime) -> Result<Identity, AdminError> {
        let mut identity = Identity::new(self.name, now);
        identity.metadata = self.metadata.unwrap_or(serde_json::Value::Null);
        for p in self.rate_limits {
            identity.rate_limits.push(p.resolve("rate_limits")?);
        }
        for p in self.quotas {
            identity.quotas.push(p.resolve("quotas")?);
        }
        Ok(identity)
    }
}

/// The body of `PATCH /identities/{name}`: each field given replaces the identity's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityUpdateInput {
    /// New metadata.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// New rate limits (shared by all its keys).
    #[serde(default)]
    pub rate_limits: Option<Vec<PolicyInput<RateLimitPolicy>>>,
    /// New quotas (shared by all its keys).
    #[serde(default)]
    pub quotas: Option<Vec<PolicyInput<QuotaPolicy>>>,
}

impl IdentityUpdateInput {
    pub(crate) fn into_update(self) -> Result<IdentityUpdate, AdminError> {
        let u = IdentityUpdate {
            metadata: self.metadata,
            rate_limits: self
                .rate_limits
                .map(|ps| ps.into_iter().map(|p| p.resolve("rate_limits")).collect())
                .transpose()?,
            quotas: self
                .quotas
                .map(|ps| ps.into_iter().map(|p| p.resolve("quotas")).collect())
                .transpose()?,
        };
        if u == IdentityUpdate::default() {
            return Err(AdminError::invalid("the body changes nothing"));
        }
        Ok(u)
    }
}

/// A policy written as text (`burst=20/s`, `daily=10000/day`) or as its JSON object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PolicyInput<P> {
    /// `NAME=N/UNIT`.
    Text(String),
    /// The policy's JSON form (as [`KeyInfo`](keygate::KeyInfo) shows it).
    Object(P),
}

impl<P: FromStr> PolicyInput<P>
where
    P::Err: std::fmt::Display,
{
    fn resolve(self, field: &'static str) -> Result<P, AdminError> {
        match self {
            PolicyInput::Object(p) => Ok(p),
            PolicyInput::Text(t) => t
                .parse()
                .map_err(|e: P::Err| AdminError::invalid(format!("{field}: {e}"))),
        }
    }
}

/// The body of `POST /keys/{id}/rotate` (may be empty).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old key keeps working (`0s`, `15m`, `24h`; default: it stops at once).
    #[serde(default)]
    pub grace: Option<String>,
}

/// The body of revoke, disable and enable: empty or `{}`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoFields {}

/// Parses a JSON body; an empty body reads as `{}` when `empty_ok`.
pub(crate) fn json_body<T: DeserializeOwned + Default>(
    bytes: &[u8],
    empty_ok: bool,
) -> Result<T, AdminError> {
    if empty_ok && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| AdminError::json(&e))
}

/// Parses a JSON body that must be present.
pub(crate) fn json_required<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(bytes).map_err(|e| AdminError::json(&e))
}

/// A duration such as `30s`, `15m`, `12h`, `90d`, at most `36500d` (the CLI's syntax and
/// limit: `keygate::core::time::parse_duration`).
pub(crate) fn duration(field: &'static str, text: &str) -> Result<Duration, AdminError> {
    keygate::core::time::parse_duration(text)
        .map_err(|e| AdminError::invalid(format!("{field}: {e}")))
}

/// An RFC 3339 instant.
pub(crate) fn instant(field: &'static str, text: &str) -> Result<SystemTime, AdminError> {
    humantime::parse_rfc3339_weak(text.trim()).map_err(|_| {
        AdminError::invalid(format!(
            "{field}: {:?} is not an RFC 3339 time such as 2027-01-01T00:00:00Z",
            clip(text)
        ))
    })
}

/// At most 64 characters of user input, for error messages.
pub(crate) fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

impl CreateKey {
    /// The lifecycle spec this body asks for (the manager validates names, scopes,
    /// collections, attributes, policies and expiry further).
    pub(crate) fn into_spec(self) -> Result<KeySpec, AdminError> {
        let mut spec = KeySpec::new(self.name);
        spec.owner = self.owner;
        spec.scopes = self.scopes;
        spec.resources = self.collections;
        spec.attributes = self.attributes;
        for text in &self.allowed_ips {
            let net = keygate::client_ip::parse_network(text)
                .map_err(|e| AdminError::invalid(format!("allowed_ips: {e}")))?;
            spec.allowed_ips.push(net);
        }
        for p in self.rate_limits {
            spec.rate_limits.push(p.resolve("rate_limits")?);
        }
        for p in self.quotas {
            spec.quotas.push(p.resolve("quotas")?);
        }
        spec.expires = match (self.expires_in, self.expires_at) {
            (Some(_), Some(_)) => {
                return Err(AdminError::invalid(
                    "give expires_in or expires_at, not both",
                ))
            }
            (Some(d), None) => Some(Expiry::In(duration("expires_in", &d)?)),
            (None, Some(t)) => Some(Expiry::At(instant("expires_at", &t)?)),
            (None, None) => None,
        };
        if let Some(p) = self.prefix {
            spec.prefix =
                Some(Prefix::new(&p).map_err(|e| AdminError::invalid(format!("prefix: {e}")))?);
        }
        if let Some(m) = self.metadata {
            spec.metadata = m;
        }
        spec.grants = self.grants;
        spec.roles = self.roles;
        spec.identity = self.identity;
        Ok(spec)
    }
}

/// The query of `GET /keys`: `owner`, `status`, `prefix`.
pub(crate) fn list_filter(query: Option<&str>) -> Result<KeyFilter, AdminError> {
    let mut filter = KeyFilter::default();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "owner" => filter.owner = Some(v.into_owned()),
            "status" => {
                filter.status = Some(
                    KeyStatus::from_str(&v)
                        .map_err(|e| AdminError::invalid(format!("status: {e}")))?,
                )
            }
            "prefix" => filter.prefix = Some(v.into_owned()),
            other => {
                return Err(AdminError::invalid(format!(
                    "unknown query parameter {:?} (expected owner, status or prefix)",
                    clip(other)
                )))
            }
        }
    }
    Ok(filter)
}

/// The query of `GET /keys/{id}/usage`: `from` and `to` (RFC 3339).
pub(crate) fn usage_range(
    query: Option<&str>,
    now: SystemTime,
) -> Result<(SystemTime, SystemTime), AdminError> {
    let mut from = SystemTime::UNIX_EPOCH;
    let mut to = now + Duration::from_secs(1);
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "from" => from = instant("from", &v)?,
            "to" => to = instant("to", &v)?,
            other => {
                return Err(AdminError::invalid(format!(
                    "unknown query parameter {:?} (expected from or to)",
                    clip(other)
                )))
            }
        }
    }
    if from >= to {
        return Err(AdminError::invalid("from must be before to"));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_read_as_text_or_objects() {
        let body: CreateKey = serde_json::from_str(
            r#"{"name":"n","rate_limits":["burst=20/s",{"name":"slow","limit":1,"period":60000}],
                "quotas":["daily=5/day"],"collections":["docs*"],"expires_in":"90d"}"#,
        )
        .unwrap();
        let spec = body.into_spec().unwrap();
        assert_eq!(
            spec.rate_limits[0],
            RateLimitPolicy::per_second("burst", 20)
        );
        assert_eq!(spec.rate_limits[1], RateLimitPolicy::per_minute("slow", 1));
        assert_eq!(spec.quotas[0].limit, 5);
        assert_eq!(spec.resources, ["docs*"]);
        assert_eq!(
            spec.expires,
            Some(Expiry::In(Duration::from_secs(90 * 86_400)))
        );
    }

    #[test]
    fn bad_input_is_refused_with_the_field() {
        for (body, field) in [
            (r#"{"name":"n","rate_limits":["burst=0/s"]}"#, "rate_limits"),
            (
                r#"{"name":"n","allowed_ips":["10.0.0.1/8"]}"#,
                "allowed_ips",
            ),
            (r#"{"name":"n","expires_in":"soon"}"#, "expires_in"),
            (r#"{"name":"n","expires_at":"tomorrow"}"#, "expires_at"),
            (r#"{"name":"n","prefix":"Bad Prefix"}"#, "prefix"),
        ] {
            let parsed: CreateKey = serde_json::from_str(body).unwrap();
            let err = parsed.into_spec().unwrap_err();
            assert!(err.detail().starts_with(field), "{body}: {}", err.detail());
        }
        assert!(json_required::<CreateKey>(br#"{"name":"n","scope":["x:y"]}"#).is_err());
        assert!(json_required::<CreateKey>(b"{}").is_err());
        assert!(json_body::<RotateKey>(b"", true).is_ok());
        assert!(json_body::<NoFields>(b"{\"x\":1}", true).is_err());
    }

    #[test]
    fn query_strings() {
        let f = list_filter(Some("owner=acme&status=revoked")).unwrap();
        assert_eq!(f.owner.as_deref(), Some("acme"));
        assert_eq!(f.status, Some(KeyStatus::Revoked));
        assert!(list_filter(Some("status=gone")).is_err());
        assert!(list_filter(Some("limit=3")).is_err());
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert!(usage_range(Some("from=2030-01-01T00:00:00Z"), now).is_err());
        let (from, _) = usage_range(Some("from=1970-01-02T00:00:00Z"), now).unwrap();
        assert_eq!(from, SystemTime::UNIX_EPOCH + Duration::from_secs(86_400));
    }
}
