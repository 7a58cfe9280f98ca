//! Leaked keys: an endpoint for GitHub's secret scanning partner program
//! ([`LeakReports`]).
//!
//! keygate's keys are built to be found by secret scanners (a prefix, a checksum, a
//! published pattern). When a scanner finds one in a public place it `POST`s the candidates
//! to the service that issued them; this router receives such reports, checks them and
//! takes the leaked keys out of service.
//!
//! # The request
//! `POST` with a JSON array of candidates, `[{"token", "type", "url", "source"}]`, and two
//! headers: `Github-Public-Key-Identifier` (which of the reporter's public keys signed it)
//! and `Github-Public-Key-Signature` (base64 of a DER ECDSA P-256 SHA-256 signature over the
//! raw body). The public keys are configured ([`PublicKeys`]): the JSON GitHub publishes
//! (`{"public_keys": [{"key_identifier", "key", "is_current"}]}`), saved by the operator to
//! a file, or PEM keys given directly. Nothing is fetched over the network.
//!
//! # What happens to each candidate
//! 1. It is parsed with the verifier's [`KeyParser`]: a wrong prefix, shape or checksum is a
//!    `false_positive` and never reaches the store.
//! 2. Its key id is looked up in the store and its secret's digest compared (in constant
//!    time) with the stored one: no such key, or another secret, is a `false_positive`.
//! 3. A match is a `true_positive`: a lifecycle event `exposed` is recorded for the key
//!    (actor [`LeakReports::actor`], default `secret-scanning:github`), whose one change,
//!    field `exposure`, carries the report's `url` (credentials in it redacted), `source`
//!    and `type`. Then the [`LeakPolicy`] is applied through the [`KeyManager`]: revoke
//!    (the default), disable, or report only; the manager records that change as usual.
//!
//! Every candidate is classified (store reads only) before anything is changed: a store
//! that fails during that pass answers 503 with nothing changed. A key reported twice in one
//! report is acted on once. Reporting a key again is harmless: revoking a revoked key
//! changes nothing, and a revoked key is not disabled (one more `exposed` event is
//! recorded).
//!
//! # The answer
//! `200` with a JSON array, one entry per candidate in the request's order:
//! `[{"token_raw", "token_type", "label": "true_positive" | "false_positive"}]`. The partner
//! format asks for `token_raw`, the candidate exactly as reported, so the answer echoes it
//! (to the reporter that sent it, over the signed exchange); it is never logged nor put in
//! an error or an audit event.
//!
//! | status | code | when (nothing is changed) |
//! |---|---|---|
//! | 400 | `missing_signature` | a signature header is missing or not text |
//! | 400 | `invalid_json` | the (correctly signed) body is not an array of candidates |
//! | 401 | `unknown_public_key` | the key identifier is not a configured public key |
//! | 401 | `bad_signature` | the signature is not base64 DER, or does not verify over the body |
//! | 413 | `too_many_candidates` | more candidates than [`LeakReports::max_candidates`] |
//! | 413 | | the body is over [`LeakReports::max_body_bytes`] |
//! | 503 | `store_unavailable` | the key store is down while candidates are looked up |
//!
//! Once the candidates are classified, a store or audit log that fails while a leaked key
//! is handled answers 503 too (`store_unavailable`, `audit_unavailable`): keys handled
//! before it stay handled, and the policy is applied even when the `exposed` event cannot
//! be written (a leaked key goes out of service first; only a closed audit log stops it,
//! since the key manager then refuses every change); the reporter retries, which is
//! harmless.
//!
//! The router takes no API key: the signature is the caller's credential. Mount it apart
//! from the admin API (`.nest("/leaks/github", reports.router())`).
//!
//! ```
//! use keygate_admin::leak::{LeakPolicy, LeakReports, PublicKeys};
//! use keygate::core::audit::Auditor;
//! use keygate::{KeyManager, MemoryStore, Verifier};
//!
//! let verifier = Verifier::new(MemoryStore::new());
//! let keys = KeyManager::for_verifier(&verifier, Auditor::tracing());
//! // In production: PublicKeys::from_file("github-secret-scanning-keys.json")
//! let public_keys = PublicKeys::from_github_json(r#"{"public_keys": []}"#).unwrap();
//! let app: axum::Router = axum::Router::new().nest(
//!     "/leaks/github",
//!     LeakReports::new(keys, &verifier, public_keys, LeakPolicy::Revoke).router(),
//! );
//! # let _ = app;
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{DerSignature, VerifyingKey};
use p256::pkcs8::DecodePublicKey;
use serde::{Deserialize, Serialize};

use keygate::core::audit::{AuditEvent, FieldChange, LifecycleAction, LifecycleEvent};
use keygate::{
    redact_url, Clock, KeyHasher, KeyId, KeyManager, KeyParser, KeyRecord, KeyStatus,
    LifecycleError, Verifier,
};

use crate::error::AdminError;

/// The header naming the public key that signed a report.
pub const KEY_IDENTIFIER_HEADER: &str = "github-public-key-identifier";
/// The header carrying the report's signature (base64 DER ECDSA P-256 SHA-256).
pub const SIGNATURE_HEADER: &str = "github-public-key-signature";

const DEFAULT_MAX_CANDIDATES: usize = 100;
const DEFAULT_MAX_BODY: usize = 256 * 1024;
/// Longest identifier or field kept from a report (anything longer is cut).
const MAX_FIELD: usize = 2048;

/// What to do with a key a report shows leaked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeakPolicy {
    /// Revoke it, for good (the default): whoever read it can no longer use it.
    #[default]
    Revoke,
    /// Disable it: it stops working until an operator enables it again.
    Disable,
    /// Only record the exposure; the key keeps working.
    ReportOnly,
}

impl LeakPolicy {
    /// `revoke`, `disable` or `report-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            LeakPolicy::Revoke => "revoke",
            LeakPolicy::Disable => "disable",
            LeakPolicy::ReportOnly => "report-only",
        }
    }
}

impl std::str::FromStr for LeakPolicy {
    type Err = String;

    /// `revoke`, `disable` or `report-only` (also `report_only`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "revoke" => Ok(LeakPolicy::Revoke),
            "disable" => Ok(LeakPolicy::Disable),
            "report-only" | "report_only" => Ok(LeakPolicy::ReportOnly),
            _ => Err("expected revoke, disable or report-only".to_owned()),
        }
    }
}

/// A public key that could not be used.
#[derive(Debug)]
pub enum PublicKeyError {
    /// The key file could not be read.
    Io(std::io::Error),
    /// The JSON is not `{"public_keys": [{"key_identifier", "key", ...}]}`.
    Json(serde_json::Error),
    /// A key is not a PEM P-256 public key (`identifier` names it).
    Key {
        /// The key's identifier.
        identifier: String,
    },
    /// An identifier is empty.
    EmptyIdentifier,
}

impl fmt::Display for PublicKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublicKeyError::Io(e) => write!(f, "the public key file could not be read: {e}"),
            PublicKeyError::Json(e) => write!(
                f,
                "the public keys are not JSON of the shape {{\"public_keys\": [{{\"key_identifier\", \"key\"}}]}}: {e}"
            ),
            PublicKeyError::Key { identifier } => {
                write!(f, "public key {identifier:?} is not a PEM P-256 public key")
            }
            PublicKeyError::EmptyIdentifier => f.write_str("a public key has an empty identifier"),
        }
    }
}

impl std::error::Error for PublicKeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PublicKeyError::Io(e) => Some(e),
            PublicKeyError::Json(e) => Some(e),
            _ => None,
        }
    }
}

/// The reporter's public keys, by identifier: the keys a report's signature is checked
/// against. Every listed key is accepted, current or not (a report signed just before the
/// reporter rotated its key still verifies); remove a key from the file to stop trusting it.
#[derive(Clone, Default)]
pub struct PublicKeys {
    keys: HashMap<String, VerifyingKey>,
}

#[derive(Deserialize)]
struct PublishedKeys {
    public_keys: Vec<PublishedKey>,
}

#[derive(Deserialize)]
struct PublishedKey {
    key_identifier: String,
    key: String,
}

impl PublicKeys {
    /// No keys: every report is refused (401 `unknown_public_key`).
    pub fn new() -> Self {
        PublicKeys::default()
    }

    /// Adds a PEM (SPKI, `-----BEGIN PUBLIC KEY-----`) P-256 key under `identifier`.
    pub fn with_key(mut self, identifier: &str, pem: &str) -> Result<Self, PublicKeyError> {
        if identifier.is_empty() {
            return Err(PublicKeyError::EmptyIdentifier);
        }
        let key =
            VerifyingKey::from_public_key_pem(pem.trim()).map_err(|_| PublicKeyError::Key {
                identifier: clip(identifier),
            })?;
        self.keys.insert(identifier.to_owned(), key);
        Ok(self)
    }

    /// The keys in the JSON GitHub publishes for secret scanning:
    /// `{"public_keys": [{"key_identifier": "...", "key": "-----BEGIN PUBLIC KEY-----...", "is_current": true}]}`.
    pub fn from_github_json(json: &str) -> Result<Self, PublicKeyError> {
        let published: PublishedKeys = serde_json::from_str(json).map_err(PublicKeyError::Json)?;
        published
            .public_keys
            .iter()
            .try_fold(PublicKeys::new(), |keys, k| {
                keys.with_key(&k.key_identifier, &k.key)
            })
    }

    /// [`PublicKeys::from_github_json`] read from a file (the published JSON, saved).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, PublicKeyError> {
        let text = std::fs::read_to_string(path).map_err(PublicKeyError::Io)?;
        Self::from_github_json(&text)
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The identifiers, sorted.
    pub fn identifiers(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        ids
    }
}

impl fmt::Debug for PublicKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKeys")
            .field("identifiers", &self.identifiers())
            .finish()
    }
}

/// The secret-scanning endpoint: configure it, then mount its [`router`](Self::router)
/// without an API key in front. See the [module docs](self).
#[derive(Clone)]
pub struct LeakReports {
    shared: Arc<Shared>,
}

#[derive(Clone)]
struct Shared {
    keys: KeyManager,
    parser: KeyParser,
    hasher: KeyHasher,
    clock: Arc<dyn Clock>,
    public_keys: PublicKeys,
    policy: LeakPolicy,
    actor: String,
    max_candidates: usize,
    max_body: usize,
}

impl LeakReports {
    /// Reports checked against `public_keys`, candidates parsed and hashed as `verifier`
    /// does (its prefixes and pepper: give the verifier the service uses), leaked keys
    /// handled by `keys` per `policy`.
    pub fn new(
        keys: KeyManager,
        verifier: &Verifier,
        public_keys: PublicKeys,
        policy: LeakPolicy,
    ) -> Self {
        LeakReports {
            shared: Arc::new(Shared {
                keys,
                parser: verifier.parser().clone(),
                hasher: verifier.hasher().clone(),
                clock: verifier.clock().clone(),
                public_keys,
                policy,
                actor: "secret-scanning:github".to_owned(),
                max_candidates: DEFAULT_MAX_CANDIDATES,
                max_body: DEFAULT_MAX_BODY,
            }),
        }
    }

    fn edit(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// The actor named by the audit events (default `secret-scanning:github`).
    pub fn actor(self, actor: impl Into<String>) -> Self {
        let actor = actor.into();
        self.edit(|s| s.actor = actor)
    }

    /// The most candidates one report may carry (default 100); more is refused with 413
    /// `too_many_candidates` and nothing changed.
    pub fn max_candidates(self, n: usize) -> Self {
        self.edit(|s| s.max_candidates = n)
    }

    /// The largest body accepted, in bytes (default 256 KiB); larger is refused with 413.
    pub fn max_body_bytes(self, n: usize) -> Self {
        self.edit(|s| s.max_body = n)
    }

    /// The policy applied to leaked keys.
    pub fn policy(&self) -> LeakPolicy {
        self.shared.policy
    }

    /// The route: `POST /`, relative to where it is mounted
    /// (`.nest("/leaks/github", reports.router())`).
    pub fn router<S>(self) -> Router<S>
    where
        S: Clone + Send + Sync + 'static,
    {
        let limit = self.shared.max_body;
        Router::new()
            .route("/", post(report))
            .layer(DefaultBodyLimit::max(limit))
            .with_state(self.shared)
    }
}

impl fmt::Debug for LeakReports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakReports")
            .field("public_keys", &self.shared.public_keys)
            .field("policy", &self.shared.policy)
            .field("actor", &self.shared.actor)
            .field("max_candidates", &self.shared.max_candidates)
            .finish_non_exhaustive()
    }
}

/// One reported candidate.
#[derive(Deserialize)]
struct Candidate {
    token: String,
    #[serde(rename = "type")]
    token_type: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

/// One answer, in the partner format.
#[derive(Serialize)]
struct Verdict<'a> {
    token_raw: &'a str,
    token_type: &'a str,
    label: &'static str,
}

async fn report(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    match handle(&s, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(s: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Response, AdminError> {
    verify_signature(&s.public_keys, headers, body)?;
    let candidates: Vec<Candidate> = serde_json::from_slice(body).map_err(|_| {
        AdminError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body is not a JSON array of {\"token\", \"type\", \"url\", \"source\"} objects",
        )
    })?;
    if candidates.len() > s.max_candidates {
        return Err(AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_candidates",
            format!(
                "a report may carry at most {} candidates; this one has {}",
                s.max_candidates,
                candidates.len()
            ),
        ));
    }

    // Pass 1: classify every candidate, reading only.
    let mut matches: Vec<Option<KeyRecord>> = Vec::with_capacity(candidates.len());
    for c in &candidates {
        matches.push(classify(s, &c.token).await?);
    }

    // Pass 2: act once per leaked key.
    let mut done: HashSet<KeyId> = HashSet::new();
    for (c, m) in candidates.iter().zip(&matches) {
        let Some(record) = m else { continue };
        if !done.insert(record.id) {
            continue;
        }
        expose(s, c, record).await?;
    }

    let verdicts: Vec<Verdict<'_>> = candidates
        .iter()
        .zip(&matches)
        .map(|(c, m)| Verdict {
            token_raw: &c.token,
            token_type: &c.token_type,
            label: if m.is_some() {
                "true_positive"
            } else {
                "false_positive"
            },
        })
        .collect();
    let json = serde_json::to_vec(&verdicts).map_err(|_| {
        AdminError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the answer could not be written",
        )
    })?;
    let mut res = Response::new(Body::from(json));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// Checks the report's signature over the raw body with the named public key.
fn verify_signature(keys: &PublicKeys, headers: &HeaderMap, body: &[u8]) -> Result<(), AdminError> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                AdminError::new(
                    StatusCode::BAD_REQUEST,
                    "missing_signature",
                    format!("the report has no {name} header"),
                )
            })
    };
    let identifier = header(KEY_IDENTIFIER_HEADER)?;
    let signature = header(SIGNATURE_HEADER)?;
    let Some(key) = keys.keys.get(identifier) else {
        return Err(AdminError::new(
            StatusCode::UNAUTHORIZED,
            "unknown_public_key",
            format!(
                "the report is signed with public key {:?}, which is not configured",
                clip(identifier)
            ),
        ));
    };
    let bad = || {
        AdminError::new(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "the report's signature does not verify over its body",
        )
    };
    let der = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| bad())?;
    let signature = DerSignature::try_from(der.as_slice()).map_err(|_| bad())?;
    key.verify(body, &signature).map_err(|_| bad())
}

/// The stored record `token` is the key of, if it is one of ours with this very secret.
async fn classify(s: &Shared, token: &str) -> Result<Option<KeyRecord>, AdminError> {
    let Ok(parsed) = s.parser.parse(token) else {
        return Ok(None);
    };
    let record = s
        .keys
        .store()
        .get(&parsed.id())
        .await
        .map_err(|e| AdminError::store(&e))?;
    Ok(record.filter(|r| {
        r.prefix.as_str() == parsed.prefix() && s.hasher.digest(&parsed).ct_eq(&r.digest)
    }))
}

/// Records the exposure, then applies the policy.
async fn expose(s: &Shared, c: &Candidate, record: &KeyRecord) -> Result<(), AdminError> {
    let mut exposure = serde_json::Map::new();
    exposure.insert(
        "reporter".into(),
        serde_json::Value::String("github".into()),
    );
    if let Some(url) = &c.url {
        exposure.insert("url".into(), redact_url(&clip(url)).into());
    }
    if let Some(source) = &c.source {
        exposure.insert("source".into(), clip(source).into());
    }
    exposure.insert("type".into(), clip(&c.token_type).into());
    let event = LifecycleEvent {
        time: s.clock.now(),
        actor: s.actor.clone(),
        action: LifecycleAction::Exposed,
        key_id: record.id,
        key_name: record.name.clone(),
        subject: record.owner.clone(),
        status: record.status,
        related_key: None,
        changes: vec![FieldChange {
            field: "exposure".into(),
            old: serde_json::Value::Null,
            new: serde_json::Value::Object(exposure),
        }],
    };
    // The policy is applied even when the exposure cannot be recorded: a leaked key must
    // go out of service; the reporter is then told to retry (503) so the event is recorded.
    let recorded = s.keys.auditor().record(AuditEvent::Lifecycle(event)).await;
    let applied = match s.policy {
        LeakPolicy::Revoke => s.keys.revoke(&s.actor, record.id).await,
        LeakPolicy::Disable => s.keys.disable(&s.actor, record.id).await,
        LeakPolicy::ReportOnly => Ok(record.clone()),
    };
    match applied {
        Ok(_) => {}
        // A revoked key is not disabled: it is already out of service.
        Err(LifecycleError::WrongStatus {
            status: KeyStatus::Revoked,
            ..
        }) => {}
        Err(e) => return Err(e.into()),
    }
    recorded.map_err(|_| {
        AdminError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log could not record the exposure (the policy was applied); retry",
        )
    })
}

/// At most [`MAX_FIELD`] characters of a reported field.
fn clip(text: &str) -> String {
    text.chars().take(MAX_FIELD).collect()
}
