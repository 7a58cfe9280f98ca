//! Audit events: one per request ([`RequestEvent`]) and one per key lifecycle change
//! ([`LifecycleEvent`]).
//!
//! Events never hold a key, a digest, a credential header or a query string. Their JSON form
//! (one object, `"type": "request"` or `"type": "lifecycle"`) is stable: fields are only
//! ever added.
//!
//! ```
//! use keygate_core::audit::{AuditEvent, LifecycleAction};
//!
//! let json = r#"{"type":"lifecycle","time":"2026-01-01T00:00:00Z","actor":"alice","action":"revoked",
//!   "key_id":"3hG7xQ2mPa9Z","key_name":"ci","subject":null,"status":"revoked","related_key":null,
//!   "changes":[{"field":"status","old":"active","new":"revoked"}]}"#;
//! let event: AuditEvent = serde_json::from_str(json).unwrap();
//! assert_eq!(event.as_lifecycle().unwrap().action, LifecycleAction::Revoked);
//! assert_eq!(event.key_id().unwrap().as_str(), "3hG7xQ2mPa9Z");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::denial::DenialCode;
use crate::key::KeyId;
use crate::record::KeyStatus;

use super::Text;

/// One audit event.
///
/// ```
/// use keygate_core::audit::{AuditEvent, Decision, RequestEvent, Transport};
/// use std::time::{Duration, UNIX_EPOCH};
///
/// let mut event = RequestEvent::new(UNIX_EPOCH, "req-1", "GET", "/collections");
/// event.status = Some(200);
/// event.latency = Duration::from_micros(42);
/// let json = serde_json::to_string(&AuditEvent::Request(event)).unwrap();
/// assert!(json.starts_with(r#"{"type":"request","time":"1970-01-01T00:00:00.000000Z""#));
/// let back: AuditEvent = serde_json::from_str(&json).unwrap();
/// assert!(matches!(back, AuditEvent::Request(ref r) if r.decision == Decision::Allowed && r.protocol == Transport::Http));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AuditEvent {
    /// A request went through an audit layer.
    Request(RequestEvent),
    /// A key was issued, rotated, revoked, disabled, enabled or changed.
    Lifecycle(LifecycleEvent),
    /// Repeated anonymous denials from one source in one window, folded into one event by
    /// an [`AggregateSink`](super::AggregateSink).
    Denials(DenialSummary),
    /// An anomaly signal raised from the request stream by an
    /// [`AnomalyDetector`](super::AnomalyDetector) (a new network for a key, a traffic
    /// spike, a burst of denials, a key used from many networks).
    Anomaly(AnomalyEvent),
}

impl AuditEvent {
    /// When the event happened.
    pub fn time(&self) -> SystemTime {
        match self {
            AuditEvent::Request(r) => r.time,
            AuditEvent::Lifecycle(l) => l.time,
            AuditEvent::Denials(d) => d.time,
            AuditEvent::Anomaly(a) => a.time,
        }
    }

    /// The key the event is about, if any.
    pub fn key_id(&self) -> Option<KeyId> {
        match self {
            AuditEvent::Request(r) => r.key_id,
            AuditEvent::Lifecycle(l) => Some(l.key_id),
            AuditEvent::Denials(_) => None,
            AuditEvent::Anomaly(a) => a.key_id,
        }
    }

    /// The request event, if this is one.
    pub fn as_request(&self) -> Option<&RequestEvent> {
        match self {
            AuditEvent::Request(r) => Some(r),
            AuditEvent::Lifecycle(_) | AuditEvent::Denials(_) | AuditEvent::Anomaly(_) => None,
        }
    }

    /// The lifecycle event, if this is one.
    pub fn as_lifecycle(&self) -> Option<&LifecycleEvent> {
        match self {
            AuditEvent::Lifecycle(l) => Some(l),
            AuditEvent::Request(_) | AuditEvent::Denials(_) | AuditEvent::Anomaly(_) => None,
        }
    }

    /// The denial summary, if this is one.
    pub fn as_denials(&self) -> Option<&DenialSummary> {
        match self {
            AuditEvent::Denials(d) => Some(d),
            AuditEvent::Request(_) | AuditEvent::Lifecycle(_) | AuditEvent::Anomaly(_) => None,
        }
    }

    /// The anomaly signal, if this is one.
    pub fn as_anomaly(&self) -> Option<&AnomalyEvent> {
        match self {
            AuditEvent::Anomaly(a) => Some(a),
            AuditEvent::Request(_) | AuditEvent::Lifecycle(_) | AuditEvent::Denials(_) => None,
        }
    }
}

impl From<RequestEvent> for AuditEvent {
    fn from(e: RequestEvent) -> Self {
        AuditEvent::Request(e)
    }
}

impl From<LifecycleEvent> for AuditEvent {
    fn from(e: LifecycleEvent) -> Self {
        AuditEvent::Lifecycle(e)
    }
}

/// The wire protocol of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Plain HTTP.
    #[default]
    Http,
    /// gRPC (`content-type: application/grpc...`).
    Grpc,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The request reached the service behind the layers (whatever the service answered).
    #[default]
    Allowed,
    /// A keygate layer refused it; [`RequestEvent::denial`] says why.
    Denied,
    /// The service behind the layer failed without a response (an `Err` from the service).
    Error,
    /// The request was abandoned (the client went away, a timeout dropped it) before any
    /// response.
    Cancelled,
}

/// One request, as an audit layer saw it.
///
/// Never holds the key, credential headers or the query string. `path` is the request path
/// only; for gRPC it is `/package.Service/Method` and [`RequestEvent::rpc`] repeats the
/// method without the leading slash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEvent {
    /// When the request arrived (the audit layer's clock).
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// The request id: the client's `x-request-id` when it was acceptable, else generated.
    pub request_id: Text,
    /// The key's public id, when the caller was identified.
    pub key_id: Option<KeyId>,
    /// The key's name (shared with the key's principal: recording it copies no text).
    #[serde(default, with = "shared_str")]
    pub key_name: Option<Arc<str>>,
    /// The key's owner (subject), shared likewise.
    #[serde(default, with = "shared_str")]
    pub subject: Option<Arc<str>>,
    /// The key's `tenant` attribute, shared likewise.
    #[serde(default, with = "shared_str")]
    pub tenant: Option<Arc<str>>,
    /// The client's address, when known.
    pub client_ip: Option<IpAddr>,
    /// HTTP or gRPC.
    pub protocol: Transport,
    /// For gRPC, the method (`package.Service/Method`).
    pub rpc: Option<String>,
    /// The HTTP method.
    pub method: Cow<'static, str>,
    /// The request path, without the query string.
    pub path: Text,
    /// The HTTP status of the response (absent when the service failed without one).
    pub status: Option<u16>,
    /// The gRPC status when the response headers carry it (trailers-only answers, rejections
    /// among them). A streamed gRPC answer carries its status in the trailers, which the layer
    /// does not wait for: then this is absent.
    pub grpc_status: Option<u16>,
    /// What became of the request.
    pub decision: Decision,
    /// The exact denial code when a keygate layer refused the request (`revoked_key` even
    /// when the client was shown `invalid_key`).
    #[serde(with = "denial_code")]
    pub denial: Option<DenialCode>,
    /// Time from the request reaching the audit layer to the response head leaving it.
    #[serde(rename = "latency_us", with = "micros")]
    pub latency: Duration,
    /// The roles behind the calling key's policy (the stored roles it holds, in its order;
    /// shared with the key's principal: recording them copies nothing). Left out of the
    /// JSON when there are none, so events of keys without roles, and every line written
    /// before roles existed, read and chain exactly as before.
    #[serde(default, skip_serializing_if = "no_roles", with = "shared_list")]
    pub roles: Option<SharedNames>,
    /// The id (`jti`) of the short-lived token the caller presented instead of the key
    /// (never the token itself). Left out of the JSON for a key, like `roles`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "shared_str")]
    pub token_id: Option<Arc<str>>,
    /// The end user the presented token was issued for (its `sub`). Left out of the JSON
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "shared_str")]
    pub token_subject: Option<Arc<str>>,
    /// For a refusal by a rate limit or quota (`rate_limited`, `quota_exceeded`,
    /// `cost_exceeds_limit`), the first policy the request broke (`burst`, `daily`). Left
    /// out of the JSON otherwise, so other lines read and chain exactly as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The time keygate's layers added: from the audit layer to the protected service
    /// being called (the whole latency when a layer refused the request). In memory only,
    /// for metrics (`keygate::metrics::Metrics`): never
    /// written to a log, absent from events read back.
    #[serde(skip)]
    pub stack_time: Option<Duration>,
}

/// A list of names shared between a principal and the events that record it.
pub type SharedNames = Arc<[Arc<str>]>;

fn no_roles(roles: &Option<SharedNames>) -> bool {
    roles.as_deref().is_none_or(<[Arc<str>]>::is_empty)
}

impl RequestEvent {
    /// An allowed HTTP request with no key, status or latency yet.
    pub fn new(
        time: SystemTime,
        request_id: impl Into<Text>,
        method: impl Into<Cow<'static, str>>,
        path: impl Into<Text>,
    ) -> Self {
        RequestEvent {
            time,
            request_id: request_id.into(),
            key_id: None,
            key_name: None,
            subject: None,
            tenant: None,
            client_ip: None,
            protocol: Transport::Http,
            rpc: None,
            method: method.into(),
            path: path.into(),
            status: None,
            grpc_status: None,
            decision: Decision::Allowed,
            denial: None,
            latency: Duration::ZERO,
            roles: None,
            token_id: None,
            token_subject: None,
            policy: None,
            stack_time: None,
        }
    }
}

/// What a lifecycle event did to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LifecycleAction {
    /// A new key was issued (also the new key of a rotation).
    Issued,
    /// The key was rotated: a new key replaces it, and it stops working when the grace period
    /// ends.
    Rotated,
    /// The key was revoked (permanently).
    Revoked,
    /// The key was disabled.
    Disabled,
    /// The key was enabled again.
    Enabled,
    /// The key's policies or descriptive fields changed.
    Updated,
    /// The key was seen where others may have read it (sent over plaintext to a
    /// `RequireTls` service): it should be rotated. Its status is unchanged by this event
    /// (a `disabled` event follows when the policy disables exposed keys).
    Exposed,
    /// A role the key holds was created, changed or deleted: the key's effective policy
    /// changed without its record changing. The change names the role (`role:NAME`).
    RoleChanged,
    /// A notice: the key is past its rotation date (its maximum age). Nothing changed;
    /// the change `rotation_due_at` says since when.
    RotationDue,
    /// A notice: the key expires soon (it is inside the expiry warning window). Nothing
    /// changed; the change `expires_at` says when.
    Expiring,
    /// The identity owning the key was changed or deleted: the key's shared limits
    /// changed without its record changing. The change names the identity
    /// (`identity:NAME`).
    IdentityChanged,
}

impl LifecycleAction {
    /// `issued`, `rotated`, `revoked`, `disabled`, `enabled`, `updated`, `exposed`,
    /// `role_changed`, `identity_changed`, `rotation_due` or `expiring`.
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleAction::Issued => "issued",
            LifecycleAction::Rotated => "rotated",
            LifecycleAction::Revoked => "revoked",
            LifecycleAction::Disabled => "disabled",
            LifecycleAction::Enabled => "enabled",
            LifecycleAction::Updated => "updated",
            LifecycleAction::Exposed => "exposed",
            LifecycleAction::RoleChanged => "role_changed",
            LifecycleAction::RotationDue => "rotation_due",
            LifecycleAction::Expiring => "expiring",
            LifecycleAction::IdentityChanged => "identity_changed",
        }
    }
}

impl fmt::Display for LifecycleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One field of a key record that changed, with its old and new public values (JSON, as in
/// [`KeyInfo`](crate::KeyInfo)). Digests are never part of a change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldChange {
    /// The field (`status`, `scopes`, `expires_at`, ...).
    pub field: String,
    /// The value before (`null` when the key was just issued).
    pub old: serde_json::Value,
    /// The value after.
    pub new: serde_json::Value,
}

/// A change to a key, made by someone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// When it happened.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// Who made the change (a user, an admin token's name, `cli`).
    pub actor: String,
    /// What was done.
    pub action: LifecycleAction,
    /// The key changed.
    pub key_id: KeyId,
    /// The key's name (after the change).
    pub key_name: String,
    /// The key's owner (after the change).
    pub subject: Option<String>,
    /// The key's status after the change.
    pub status: KeyStatus,
    /// The other key of a rotation: on `rotated`, the new key; on the new key's `issued`,
    /// the old one.
    pub related_key: Option<KeyId>,
    /// Each field that changed, old and new.
    pub changes: Vec<FieldChange>,
}

/// Denied requests without a key from one source (client address, denial code, method and
/// path) in one window, beyond the first (which is recorded as a [`RequestEvent`] of its
/// own): how many, and when.
///
/// ```
/// use keygate_core::audit::AuditEvent;
///
/// let json = r#"{"type":"denials","time":"2026-01-01T00:00:00Z","until":"2026-01-01T00:00:10Z",
///   "first":"2026-01-01T00:00:00.5Z","last":"2026-01-01T00:00:09Z","client_ip":"203.0.113.9",
///   "protocol":"http","method":"GET","path":"/collections","status":401,"denial":"missing_key","count":4999}"#;
/// let event: AuditEvent = serde_json::from_str(json).unwrap();
/// assert_eq!(event.as_denials().unwrap().count, 4999);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DenialSummary {
    /// The start of the window.
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// The end of the window (exclusive).
    #[serde(with = "rfc3339")]
    pub until: SystemTime,
    /// The first folded request's time.
    #[serde(with = "rfc3339")]
    pub first: SystemTime,
    /// The last folded request's time.
    #[serde(with = "rfc3339")]
    pub last: SystemTime,
    /// The client's address, when known.
    pub client_ip: Option<IpAddr>,
    /// HTTP or gRPC.
    pub protocol: Transport,
    /// The HTTP method.
    pub method: Cow<'static, str>,
    /// The request path, without the query string.
    pub path: String,
    /// The HTTP status the requests got (that of the first folded one).
    pub status: Option<u16>,
    /// The exact denial code.
    #[serde(with = "denial_code")]
    pub denial: Option<DenialCode>,
    /// How many requests were folded into this event (not recorded one by one).
    pub count: u64,
}

/// Which anomaly detector raised a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// A key was used from a network (a /24 for IPv4, a /64 for IPv6 by default) it had not
    /// used before, after the key's learning period.
    NewNetwork,
    /// A key's requests in one window exceeded its own moving baseline by the configured
    /// factor.
    Spike,
    /// Many denied requests from one client address in one window (scope probing, key
    /// guessing).
    DenialBurst,
    /// One key was used from many networks within one window.
    ManyNetworks,
}

impl AnomalyKind {
    /// Every kind, in a fixed order.
    pub const ALL: [AnomalyKind; 4] = [
        AnomalyKind::NewNetwork,
        AnomalyKind::Spike,
        AnomalyKind::DenialBurst,
        AnomalyKind::ManyNetworks,
    ];

    /// `new_network`, `spike`, `denial_burst` or `many_networks`.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::NewNetwork => "new_network",
            AnomalyKind::Spike => "spike",
            AnomalyKind::DenialBurst => "denial_burst",
            AnomalyKind::ManyNetworks => "many_networks",
        }
    }
}

impl fmt::Display for AnomalyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An anomaly signal: what was seen, about which key or address, and the figures behind it.
/// Like every event, it never holds a key or a credential.
///
/// ```
/// use keygate_core::audit::{AnomalyKind, AuditEvent};
///
/// let json = r#"{"type":"anomaly","time":"2026-01-01T00:00:00Z","kind":"new_network",
///   "key_id":"3hG7xQ2mPa9Z","key_name":"ci","client_ip":"198.51.100.7",
///   "network":"198.51.100.0/24","count":1,"threshold":null,"baseline":null,"window_s":null}"#;
/// let event: AuditEvent = serde_json::from_str(json).unwrap();
/// assert_eq!(event.as_anomaly().unwrap().kind, AnomalyKind::NewNetwork);
/// assert_eq!(event.key_id().unwrap().as_str(), "3hG7xQ2mPa9Z");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyEvent {
    /// The time of the request that raised the signal (taken from the request event, so a
    /// recorded log replayed raises the same signals at the same times).
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// Which detector raised it.
    pub kind: AnomalyKind,
    /// The key concerned (for a denial burst: the key of the denied requests when they all
    /// named one, else none).
    pub key_id: Option<KeyId>,
    /// The key's name, when the request event carried it.
    #[serde(default, with = "shared_str")]
    pub key_name: Option<Arc<str>>,
    /// The client address of the request that raised the signal.
    pub client_ip: Option<IpAddr>,
    /// The client's network (`198.51.100.0/24`) for `new_network` and `many_networks`.
    pub network: Option<String>,
    /// The figure that crossed the line: requests in the window (`spike`), denials in the
    /// window (`denial_burst`), networks in the window (`many_networks`), 1 (`new_network`).
    pub count: u64,
    /// The line it crossed, when there is one.
    pub threshold: Option<f64>,
    /// The key's moving baseline of requests per window (`spike`).
    pub baseline: Option<f64>,
    /// The window's length in seconds, when the detector counts in windows.
    pub window_s: Option<u64>,
}

impl From<AnomalyEvent> for AuditEvent {
    fn from(e: AnomalyEvent) -> Self {
        AuditEvent::Anomaly(e)
    }
}

/// RFC 3339 UTC timestamps with microseconds.
pub(crate) mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::SystemTime;

    pub(crate) fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(crate::time::rfc3339_micros(*t).render(&mut crate::time::Rfc3339Buf::new()))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

/// Durations as whole microseconds.
mod micros {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// Denial codes as their stable text.
mod denial_code {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::denial::DenialCode;

    pub(super) fn serialize<S: Serializer>(
        code: &Option<DenialCode>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match code {
            Some(c) => s.serialize_some(c.as_str()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<DenialCode>, D::Error> {
        let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        match text {
            None => Ok(None),
            Some(t) => DenialCode::ALL
                .iter()
                .copied()
                .find(|c| c.as_str() == t)
                .map(Some)
                .ok_or_else(|| serde::de::Error::custom("unknown denial code")),
        }
    }
}

/// `Option<Arc<str>>` as an optional string.
mod shared_str {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<str>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Arc::from))
    }
}

mod shared_list {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::SharedNames;

    pub(super) fn serialize<S: Serializer>(
        v: &Option<SharedNames>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().flat_map(|l| l.iter()).map(|r| &**r))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SharedNames>, D::Error> {
        let list = Option::<Vec<String>>::deserialize(d)?;
        Ok(list
            .filter(|l| !l.is_empty())
            .map(|l| l.into_iter().map(Arc::from).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn request_event_round_trips_with_stable_names() {
        let mut e = RequestEvent::new(
            UNIX_EPOCH + Duration::from_millis(1500),
            "abc",
            "POST",
            "/x",
        );
        e.denial = Some(DenialCode::RevokedKey);
        e.decision = Decision::Denied;
        e.status = Some(401);
        e.latency = Duration::from_micros(7);
        let v = serde_json::to_value(AuditEvent::Request(e.clone())).unwrap();
        assert_eq!(v["type"], "request");
        assert_eq!(v["time"], "1970-01-01T00:00:01.500000Z");
        assert_eq!(v["denial"], "revoked_key");
        assert_eq!(v["decision"], "denied");
        assert_eq!(v["protocol"], "http");
        assert_eq!(v["latency_us"], 7);
        assert!(v.get("roles").is_none(), "no roles: no field");
        let back: AuditEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, AuditEvent::Request(e.clone()));
        // With roles, they are listed and read back.
        e.roles = Some(Arc::from(vec![Arc::from("vector-reader")]));
        let v = serde_json::to_value(AuditEvent::Request(e.clone())).unwrap();
        assert_eq!(v["roles"], serde_json::json!(["vector-reader"]));
        let back: AuditEvent = serde_json::from_value(v).unwrap();
        assert_eq!(back, AuditEvent::Request(e));
    }

    #[test]
    fn unknown_denial_code_is_an_error() {
        let mut v = serde_json::to_value(AuditEvent::Request(RequestEvent::new(
            UNIX_EPOCH, "a", "GET", "/",
        )))
        .unwrap();
        v["denial"] = "nope".into();
        assert!(serde_json::from_value::<AuditEvent>(v).is_err());
    }
}
