//! Key records: what a store keeps about a key.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::digest::KeyDigest;
use crate::key::{KeyId, Prefix};
use crate::role::Grant;

/// Where a key stands in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// The key works (unless it has expired).
    Active,
    /// Switched off for now; can be enabled again.
    Disabled,
    /// Permanently dead.
    Revoked,
}

impl KeyStatus {
    /// `active`, `disabled` or `revoked`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Disabled => "disabled",
            KeyStatus::Revoked => "revoked",
        }
    }
}

impl fmt::Display for KeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a text is not a key status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key status {0:?}: expected active, disabled or revoked")]
pub struct InvalidStatus(pub String);

impl FromStr for KeyStatus {
    type Err = InvalidStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(KeyStatus::Active),
            "disabled" => Ok(KeyStatus::Disabled),
            "revoked" => Ok(KeyStatus::Revoked),
            other => Err(InvalidStatus(other.chars().take(32).collect())),
        }
    }
}

/// Why a policy text (`burst=20/s`, `daily=10000/day`) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy {text:?}: {reason}")]
pub struct InvalidPolicy {
    text: String,
    reason: &'static str,
}

impl InvalidPolicy {
    fn new(text: &str, reason: &'static str) -> Self {
        InvalidPolicy {
            text: text.chars().take(64).collect(),
            reason,
        }
    }
}

fn split_policy(text: &str) -> Result<(&str, u64, &str), InvalidPolicy> {
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| InvalidPolicy::new(text, "expected NAME=N/UNIT"))?;
    let (n, unit) = rest
        .split_once('/')
        .ok_or_else(|| InvalidPolicy::new(text, "expected NAME=N/UNIT"))?;
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
    {
        return Err(InvalidPolicy::new(
            text,
            "the name must be 1 to 64 characters of [A-Za-z0-9_-]",
        ));
    }
    let n: u64 = n
        .trim()
        .parse()
        .map_err(|_| InvalidPolicy::new(text, "N must be a whole number"))?;
    if n == 0 {
        return Err(InvalidPolicy::new(text, "N must be at least 1"));
    }
    Ok((name, n, unit.trim()))
}

/// A rate limit: at most `limit` requests (or cost units) per `period`, smoothed (GCRA),
/// with bursts of up to `limit`.
///
/// Units read as written: [`RateLimitPolicy::per_second`]`("burst", 20)` allows 20 per
/// second.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateLimitPolicy {
    /// The policy's name (`burst`, `hourly`), reported in `RateLimit-Policy`.
    pub name: String,
    /// How many requests (or cost units) per period.
    pub limit: u32,
    /// The period, in milliseconds when serialized.
    #[serde(with = "duration_ms")]
    pub period: Duration,
}

impl RateLimitPolicy {
    /// `limit` per `period`.
    pub fn new(name: impl Into<String>, limit: u32, period: Duration) -> Self {
        RateLimitPolicy {
            name: name.into(),
            limit,
            period,
        }
    }
    /// `limit` per second.
    pub fn per_second(name: impl Into<String>, limit: u32) -> Self {
        Self::new(name, limit, Duration::from_secs(1))
    }
    /// `limit` per minute.
    pub fn per_minute(name: impl Into<String>, limit: u32) -> Self {
        Self::new(name, limit, Duration::from_secs(60))
    }
    /// `limit` per hour.
    pub fn per_hour(name: impl Into<String>, limit: u32) -> Self {
        Self::new(name, limit, Duration::from_secs(3600))
    }
    /// `limit` per day.
    pub fn per_day(name: impl Into<String>, limit: u32) -> Self {
        Self::new(name, limit, Duration::from_secs(86_400))
    }
}

impl FromStr for RateLimitPolicy {
    type Err = InvalidPolicy;
    /// `NAME=N/UNIT` with UNIT one of `s`, `sec`, `second`, `m`, `min`, `minute`, `h`,
    /// `hour`, `d`, `day`: `burst=20/s`, `hourly=10000/h`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, n, unit) = split_policy(text)?;
        let limit = u32::try_from(n).map_err(|_| InvalidPolicy::new(text, "N is too large"))?;
        let period = match unit {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            "d" | "day" => 86_400,
            _ => {
                return Err(InvalidPolicy::new(
                    text,
                    "UNIT must be s, m, h or d (second, minute, hour, day)",
                ))
            }
        };
        Ok(Self::new(name, limit, Duration::from_secs(period)))
    }
}

/// The window a quota counts in. Calendar windows are UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuotaWindow {
    /// A UTC calendar hour.
    Hour,
    /// A UTC calendar day.
    Day,
    /// A UTC calendar month.
    Month,
    /// Credits (Unkey's model): the allowance is spent down and refills to the whole limit
    /// on `Refill`'s schedule, or never. Serialized as `{"credits":"never"}`,
    /// `{"credits":"daily"}` or `{"credits":{"monthly":{"day":15}}}`.
    Credits(Refill),
}

/// When credits refill to their limit (see [`QuotaWindow::Credits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refill {
    /// Never: a one-time allowance.
    Never,
    /// Every day at 00:00 UTC.
    Daily,
    /// Every month on `day` (1 to 31) at 00:00 UTC; a day past the end of a month falls on
    /// its last day.
    Monthly {
        /// Day of the month, 1 to 31.
        day: u8,
    },
}

impl QuotaWindow {
    /// `hour`, `day`, `month`, `credits`, `credits_daily` or `credits_monthly`.
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaWindow::Hour => "hour",
            QuotaWindow::Day => "day",
            QuotaWindow::Month => "month",
            QuotaWindow::Credits(Refill::Never) => "credits",
            QuotaWindow::Credits(Refill::Daily) => "credits_daily",
            QuotaWindow::Credits(Refill::Monthly { .. }) => "credits_monthly",
        }
    }
}

/// An allowance: at most `limit` requests (or cost units) per calendar window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QuotaPolicy {
    /// The policy's name (`daily`, `monthly`).
    pub name: String,
    /// How much may be used per window.
    pub limit: u64,
    /// The window.
    pub window: QuotaWindow,
}

impl QuotaPolicy {
    /// `limit` per `window`.
    pub fn new(name: impl Into<String>, limit: u64, window: QuotaWindow) -> Self {
        QuotaPolicy {
            name: name.into(),
            limit,
            window,
        }
    }
}

impl FromStr for QuotaPolicy {
    type Err = InvalidPolicy;
    /// `NAME=N/UNIT` with UNIT one of `h`, `hour`, `d`, `day`, `mo`, `month`:
    /// `daily=10000/day`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (name, n, unit) = split_policy(text)?;
        let window = match unit {
            "h" | "hour" => QuotaWindow::Hour,
            "d" | "day" => QuotaWindow::Day,
            "mo" | "month" => QuotaWindow::Month,
            _ => return Err(InvalidPolicy::new(text, "UNIT must be hour, day or month")),
        };
        Ok(Self::new(name, n, window))
    }
}

/// Everything a store keeps about one key. It holds the key's digest, so it deliberately
/// implements neither `Serialize` nor a `Debug` that shows it; use [`KeyRecord::info`] for
/// display and JSON.
#[derive(Clone)]
pub struct KeyRecord {
    /// Public key id.
    pub id: KeyId,
    /// The key's prefix.
    pub prefix: Prefix,
    /// Digest of prefix, id and secret (see [`KeyHasher`](crate::KeyHasher)).
    pub digest: KeyDigest,
    /// A human name (`ci-pipeline`).
    pub name: String,
    /// Who the key belongs to (a user, a service, a customer account).
    pub owner: Option<String>,
    /// Lifecycle status.
    pub status: KeyStatus,
    /// When the key was created.
    pub created_at: SystemTime,
    /// When the record last changed.
    pub updated_at: SystemTime,
    /// When the key stops working, if ever.
    pub expires_at: Option<SystemTime>,
    /// Granted scopes (`points:read`, `points:*`, `*`).
    pub scopes: Vec<String>,
    /// Collections (resources) the key may touch: exact names or patterns (`tenant-*`, `*`).
    pub resources: Vec<String>,
    /// Free-form attributes passed to handlers (`tenant=acme`).
    pub attributes: BTreeMap<String, String>,
    /// Addresses the key may be used from; empty means any.
    pub allowed_ips: Vec<IpNet>,
    /// Rate limits; empty means the layer's default.
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Quotas; empty means none.
    pub quotas: Vec<QuotaPolicy>,
    /// Free JSON metadata (not used by keygate).
    pub metadata: serde_json::Value,
    /// The key this one replaced in a rotation.
    pub rotated_from: Option<KeyId>,
    /// The id of the first key of this key's rotation chain; `None` for a key that is the
    /// first of its own (read it with [`KeyRecord::lineage_id`]). Rate limits and quotas
    /// are counted per lineage, so a rotated key goes on with the usage of the key it
    /// replaced, and both share one allowance during the grace period. Stores keep it;
    /// rows written before stores knew it read as `None`.
    pub lineage: Option<KeyId>,
    /// Grants beyond `scopes` × `resources` (which stay one grant of their own): scopes
    /// paired with the collections they apply to. See [`crate::role`] for the rule.
    pub grants: Vec<Grant>,
    /// Names of the roles the key holds; their grants, attributes and limits join the
    /// key's own when it is resolved. A name no stored role has grants nothing.
    pub roles: Vec<String>,
    /// The identity (service principal) owning the key; its limits join the key's.
    pub identity: Option<String>,
    /// Bumped by the store on every write;
    /// [`KeyStore::update_versioned`](crate::KeyStore::update_versioned) writes only over
    /// the version it read.
    pub version: u64,
    /// When the key was last used successfully, to the minute (the start of the minute),
    /// as far as the store knows: the verifier marks uses in memory and writes them behind
    /// the request path ([`Verifier::flush_last_used`](crate::Verifier::flush_last_used)).
    /// Stores fill it when they read a record and write it only through
    /// [`KeyStore::record_last_used`](crate::KeyStore::record_last_used): `insert` and
    /// `update` ignore it, so a record read earlier never moves it back.
    pub last_used_at: Option<SystemTime>,
}

impl KeyRecord {
    /// A new active record with no policies, created at `now`, first of its lineage.
    pub fn new(
        id: KeyId,
        prefix: Prefix,
        digest: KeyDigest,
        name: impl Into<String>,
        now: SystemTime,
    ) -> Self {
        KeyRecord {
            id,
            prefix,
            digest,
            name: name.into(),
            owner: None,
            status: KeyStatus::Active,
            created_at: now,
            updated_at: now,
            expires_at: None,
            scopes: Vec::new(),
            resources: Vec::new(),
            attributes: BTreeMap::new(),
            allowed_ips: Vec::new(),
            rate_limits: Vec::new(),
            quotas: Vec::new(),
            metadata: serde_json::Value::Null,
            rotated_from: None,
            lineage: None,
            grants: Vec::new(),
            roles: Vec::new(),
            identity: None,
            version: 0,
            last_used_at: None,
        }
    }

    /// The id of the first key of this key's rotation chain: [`KeyRecord::lineage`], or
    /// the key's own id.
    pub fn lineage_id(&self) -> KeyId {
        self.lineage.unwrap_or(self.id)
    }

    /// Generates a new key with `prefix` and its active record named `name`, created at
    /// `now`, its digest computed by `hasher`. Returns the plaintext (show it once) and the
    /// record (store it).
    pub fn generate(
        prefix: &Prefix,
        hasher: &crate::KeyHasher,
        name: impl Into<String>,
        now: SystemTime,
    ) -> Result<(crate::ApiKey, KeyRecord), crate::KeyGenError> {
        let key = crate::ApiKey::generate(prefix)?;
        let digest = hasher.digest(&key.parsed());
        let record = KeyRecord::new(key.id(), prefix.clone(), digest, name, now);
        Ok((key, record))
    }

    /// Whether the key has expired at `now` (expiry is exclusive: a key expiring at `t`
    /// no longer works at `t`).
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    /// The public view of this record: everything but the digest, ready for JSON.
    pub fn info(&self) -> KeyInfo {
        KeyInfo {
            id: self.id,
            prefix: self.prefix.to_string(),
            name: self.name.clone(),
            owner: self.owner.clone(),
            status: self.status,
            created_at: rfc3339(self.created_at),
            updated_at: rfc3339(self.updated_at),
            expires_at: self.expires_at.map(rfc3339),
            scopes: self.scopes.clone(),
            resources: self.resources.clone(),
            attributes: self.attributes.clone(),
            allowed_ips: self.allowed_ips.clone(),
            rate_limits: self.rate_limits.clone(),
            quotas: self.quotas.clone(),
            metadata: self.metadata.clone(),
            rotated_from: self.rotated_from,
            grants: self.grants.clone(),
            roles: self.roles.clone(),
            identity: self.identity.clone(),
            last_used_at: self.last_used_at.map(rfc3339),
        }
    }
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .field("name", &self.name)
            .field("owner", &self.owner)
            .field("status", &self.status)
            .field("expires_at", &self.expires_at.map(rfc3339))
            .finish_non_exhaustive()
    }
}

fn rfc3339(t: SystemTime) -> String {
    crate::time::rfc3339_millis(t).to_string()
}

/// The public view of a [`KeyRecord`]: no digest, times as RFC 3339 text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyInfo {
    /// Public key id.
    pub id: KeyId,
    /// Prefix.
    pub prefix: String,
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: Option<String>,
    /// Status.
    pub status: KeyStatus,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// Expiry (RFC 3339).
    pub expires_at: Option<String>,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Resources (collections).
    pub resources: Vec<String>,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// IP allowlist.
    pub allowed_ips: Vec<IpNet>,
    /// Rate limits.
    pub rate_limits: Vec<RateLimitPolicy>,
    /// Quotas.
    pub quotas: Vec<QuotaPolicy>,
    /// Metadata.
    pub metadata: serde_json::Value,
    /// The key this one replaced.
    pub rotated_from: Option<KeyId>,
    /// Grants beyond scopes × resources.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
    /// Roles held.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Owning identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Last successful use, to the minute (RFC 3339); absent when never used (or not
    /// recorded yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = u64::deserialize(d)?;
        if ms == 0 {
            return Err(serde::de::Error::custom("a period must be at least 1 ms"));
        }
        Ok(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_as_written() {
        let p: RateLimitPolicy = "burst=20/s".parse().unwrap();
        assert_eq!(p, RateLimitPolicy::per_second("burst", 20));
        let p: RateLimitPolicy = "hourly=10000/h".parse().unwrap();
        assert_eq!(p.period, Duration::from_secs(3600));
        let q: QuotaPolicy = "daily=5000/day".parse().unwrap();
        assert_eq!(q, QuotaPolicy::new("daily", 5000, QuotaWindow::Day));
        for bad in [
            "",
            "burst",
            "burst=20",
            "burst=0/s",
            "burst=x/s",
            "=1/s",
            "b=1/week",
            "b c=1/s",
        ] {
            assert!(bad.parse::<RateLimitPolicy>().is_err(), "{bad}");
        }
        assert!("m=1/s".parse::<QuotaPolicy>().is_err());
        assert!("b=99999999999/s".parse::<RateLimitPolicy>().is_err());
    }

    #[test]
    fn status_round_trip() {
        for s in [KeyStatus::Active, KeyStatus::Disabled, KeyStatus::Revoked] {
            assert_eq!(s.as_str().parse::<KeyStatus>().unwrap(), s);
        }
        assert!("gone".parse::<KeyStatus>().is_err());
    }
}
