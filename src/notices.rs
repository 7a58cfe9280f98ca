//! Expiry and rotation-due notices (feature `notices`): a background sweep over the key
//! store that tells someone, once, when a key is past its rotation date or about to
//! expire, instead of leaving it to clients to read `Deprecation` headers.
//!
//! [`NoticeSweep::run_once`] lists the active keys and, for each one that is **due**:
//!
//! - **rotation due**: older than its maximum age. The maximum age is the tightest of the
//!   global one ([`NoticeSweep::max_age`]), the key's resolved attribute `max_key_age`
//!   (set on the key or on a role it holds: the attribute rule of
//!   `keygate::core::role`, the key's own first, then its roles in order) and its
//!   identity's `max_key_age` metadata field (`{"max_key_age": "30d"}`), each written as
//!   `90d`, `12h`, `30m`;
//! - **expiring**: inside the warning window before its expiry
//!   ([`NoticeSweep::warn_before_expiry`]);
//!
//! records a lifecycle audit event (`rotation_due` or `expiring`, actor
//! `keygate-notices`; the metrics count them as `keygate_key_lifecycle_total{action}`), and,
//! with a [`Webhook`], POSTs a JSON notice ([`KeyNotice`]: the key's public id, name,
//! owner, identity and dates; never the key, its secret or its digest), retrying a failed
//! delivery a bounded number of times with exponential backoff.
//!
//! A key is noticed once per kind, then again only after [`NoticeSweep::repeat_after`]
//! (default one day) while it stays due. Time comes from the clock given, so tests drive
//! the sweep with the manual clock; [`NoticeSweep::spawn`] runs it periodically.
//!
//! The built-in webhook client speaks HTTP/1.1 over TLS to `https://` URLs (the server's
//! certificate checked against the operating system's trusted roots, or only against the
//! certificates given to [`Webhook::trusting_pem`]) and in plain text to `http://` URLs (a
//! local relay, a sidecar, a collector on a private network).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::core::audit::{AuditEvent, Auditor, FieldChange, LifecycleAction, LifecycleEvent};
use crate::{Clock, KeyFilter, KeyId, KeyRecord, KeyStatus, KeyStore, Principal, StoreError};

/// The actor of the notices' audit events.
pub const ACTOR: &str = "keygate-notices";

use crate::deprecation::MAX_KEY_AGE;

/// What a notice is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The key is past its rotation date.
    RotationDue,
    /// The key expires soon.
    Expiring,
}

impl NoticeKind {
    /// `rotation_due` or `expiring`.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::RotationDue => "rotation_due",
            NoticeKind::Expiring => "expiring",
        }
    }

    fn action(self) -> LifecycleAction {
        match self {
            NoticeKind::RotationDue => LifecycleAction::RotationDue,
            NoticeKind::Expiring => LifecycleAction::Expiring,
        }
    }
}

/// One notice: the webhook's JSON body. Public facts only (the key id is the public part
/// of a key); never the key, its secret or its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyNotice {
    /// `keygate.key_notice`.
    #[serde(rename = "type")]
    pub kind_tag: &'static str,
    /// What the notice is about.
    pub kind: NoticeKind,
    /// The key's public id.
    pub key_id: KeyId,
    /// The key's name.
    pub key_name: String,
    /// The key's owner.
    pub owner: Option<String>,
    /// The identity owning the key.
    pub identity: Option<String>,
    /// When the key was created (RFC 3339).
    pub created_at: String,
    /// When the key expires, if ever (RFC 3339).
    pub expires_at: Option<String>,
    /// For `rotation_due`: since when (created + maximum age, RFC 3339).
    pub rotation_due_at: Option<String>,
    /// For `rotation_due`: the maximum age that applied, in seconds.
    pub max_age_s: Option<u64>,
    /// When the sweep found it (RFC 3339).
    pub noticed_at: String,
}

fn rfc3339(t: SystemTime) -> String {
    crate::core::time::rfc3339_seconds(t).to_string()
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// The notices raised this time (keys noticed earlier and not yet due again are left
    /// out).
    pub notices: Vec<KeyNotice>,
    /// Notices the webhook accepted.
    pub delivered: usize,
    /// Notices the webhook did not accept after every attempt (each logged as a warning).
    pub failed: usize,
}

/// Why a webhook could not be used or did not accept a notice.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebhookError {
    /// The URL is not an `https://` or `http://` URL with a host.
    #[error("webhook URL must be https://HOST[:PORT]/PATH or http://HOST[:PORT]/PATH: {0}")]
    BadUrl(String),
    /// The certificates to trust could not be used (none given, none readable, or none on
    /// this system for an `https://` URL).
    #[error("webhook TLS: {0}")]
    Certificates(String),
    /// Every attempt failed; the last failure.
    #[error("webhook delivery failed after {attempts} attempts: {last}")]
    Failed {
        /// How many attempts were made.
        attempts: u32,
        /// The last failure (a status, or a connection error).
        last: String,
    },
}

/// Where notices are POSTed, with bounded retries (see the [module docs](self)).
#[derive(Clone)]
pub struct Webhook {
    url: Uri,
    attempts: u32,
    backoff: Duration,
    timeout: Duration,
    client: HttpsClient,
}

type HttpsClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// A client for `http://` and `https://` URLs, trusting `roots` over TLS.
fn client(roots: rustls::RootCertStore) -> Result<HttpsClient, WebhookError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Certificates(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

impl fmt::Debug for Webhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The path may hold a token: show the authority only.
        f.debug_struct("Webhook")
            .field("host", &self.url.authority().map(|a| a.as_str()))
            .field("attempts", &self.attempts)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// POSTs to `url` (`https://HOST[:PORT]/PATH`, trusting the operating system's roots,
    /// or `http://...`): 4 attempts, the first retry after 500 ms, doubling; 10 s per
    /// attempt.
    pub fn new(url: &str) -> Result<Self, WebhookError> {
        Self::build(url, None)
    }

    /// [`Webhook::new`] trusting only the PEM certificates in `pem` for an `https://` URL (a
    /// private CA, or the receiver's own self-signed certificate), not the system's roots.
    pub fn trusting_pem(url: &str, pem: &[u8]) -> Result<Self, WebhookError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| WebhookError::Certificates(format!("unreadable PEM: {e}")))?;
        if certs.is_empty() {
            return Err(WebhookError::Certificates(
                "no certificate in the PEM".into(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| WebhookError::Certificates(e.to_string()))?;
        }
        Self::build(url, Some(roots))
    }

    fn build(url: &str, roots: Option<rustls::RootCertStore>) -> Result<Self, WebhookError> {
        let bad = || WebhookError::BadUrl(crate::redact_url(url));
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad());
        }
        let roots = match roots {
            Some(given) => given,
            None if tls => {
                let mut system = rustls::RootCertStore::empty();
                system.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if system.is_empty() {
                    return Err(WebhookError::Certificates(
                        "no trusted root certificates on this system; give them with Webhook::trusting_pem"
                            .into(),
                    ));
                }
                system
            }
            None => rustls::RootCertStore::empty(),
        };
        Ok(Webhook {
            url: uri,
            attempts: 4,
            backoff: Duration::from_millis(500),
            timeout: Duration::from_secs(10),
            client: client(roots)?,
        })
    }

    /// At most `n` attempts per notice (at least 1).
    pub fn attempts(mut self, n: u32) -> Self {
        self.attempts = n.max(1);
        self
    }

    /// The wait before the first retry; each further retry waits twice as long.
    pub fn backoff(mut self, first: Duration) -> Self {
        self.backoff = first;
        self
    }

    /// How long one attempt may take.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// POSTs `notice` as JSON until a 2xx answer or the attempts run out; returns how many
    /// attempts it took.
    pub async fn post(&self, notice: &KeyNotice) -> Result<u32, WebhookError> {
        let body = Bytes::from(serde_json::to_vec(notice).unwrap_or_default());
        let mut wait = self.backoff;
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            let req = Request::post(self.url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::USER_AGENT, "keygate-notices")
                .body(Full::new(body.clone()));
            let req = match req {
                Ok(r) => r,
                Err(e) => return Err(WebhookError::BadUrl(e.to_string())),
            };
            match tokio::time::timeout(self.timeout, self.client.request(req)).await {
                Ok(Ok(res)) if res.status().is_success() => {
                    // Drain the answer so the connection can be reused.
                    let _ = res.into_body().collect().await;
                    return Ok(attempt);
                }
                Ok(Ok(res)) => last = status_text(res.status()),
                Ok(Err(e)) => last = format!("connection: {e}"),
                Err(_) => last = format!("no answer within {} ms", self.timeout.as_millis()),
            }
            if attempt < self.attempts {
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
            }
        }
        Err(WebhookError::Failed {
            attempts: self.attempts,
            last,
        })
    }
}

fn status_text(s: StatusCode) -> String {
    format!("HTTP {}", s.as_u16())
}

/// The sweep (see the [module docs](self)). Clones share what was already noticed.
#[derive(Clone)]
pub struct NoticeSweep {
    store: Arc<dyn KeyStore>,
    clock: Arc<dyn Clock>,
    max_age: Option<Duration>,
    warn_before_expiry: Option<Duration>,
    repeat_after: Duration,
    auditor: Option<Auditor>,
    webhook: Option<Webhook>,
    noticed: Arc<Mutex<HashMap<(KeyId, NoticeKind), SystemTime>>>,
}

impl fmt::Debug for NoticeSweep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NoticeSweep")
            .field("max_age", &self.max_age)
            .field("warn_before_expiry", &self.warn_before_expiry)
            .field("repeat_after", &self.repeat_after)
            .field("webhook", &self.webhook)
            .finish_non_exhaustive()
    }
}

impl NoticeSweep {
    /// A sweep over `store` reading time from `clock`; no notice until a maximum age (global
    /// or per key, role or identity) or an expiry warning applies.
    pub fn new(store: Arc<dyn KeyStore>, clock: Arc<dyn Clock>) -> Self {
        NoticeSweep {
            store,
            clock,
            max_age: None,
            warn_before_expiry: None,
            repeat_after: Duration::from_secs(86_400),
            auditor: None,
            webhook: None,
            noticed: Arc::default(),
        }
    }

    /// Keys older than `age` are due for rotation (a tighter per key, role or identity age
    /// wins).
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// Keys expiring within `window` are noticed.
    pub fn warn_before_expiry(mut self, window: Duration) -> Self {
        self.warn_before_expiry = Some(window);
        self
    }

    /// A key still due is noticed again after this long (default one day).
    pub fn repeat_after(mut self, d: Duration) -> Self {
        self.repeat_after = d;
        self
    }

    /// Records each notice as a lifecycle audit event.
    pub fn auditor(mut self, auditor: Auditor) -> Self {
        self.auditor = Some(auditor);
        self
    }

    /// POSTs each notice to this webhook.
    pub fn webhook(mut self, webhook: Webhook) -> Self {
        self.webhook = Some(webhook);
        self
    }

    /// The maximum age that applies to `record`: the tightest of the global one, the
    /// resolved `max_key_age` attribute (key, then roles) and the identity's metadata.
    pub fn max_age_of(
        &self,
        record: &KeyRecord,
        principal: &Principal,
        identity: Option<&crate::Identity>,
    ) -> Option<Duration> {
        let parse = |text: &str, whose: &str| match crate::core::time::parse_duration(text) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(key_id = %record.id, source = whose, error = %e, "ignoring an unreadable max_key_age");
                None
            }
        };
        let own = principal
            .attribute(MAX_KEY_AGE)
            .and_then(|t| parse(t, "attribute"));
        let of_identity = identity
            .and_then(|i| i.metadata.get(MAX_KEY_AGE))
            .and_then(|v| v.as_str())
            .and_then(|t| parse(t, "identity"));
        [self.max_age, own, of_identity].into_iter().flatten().min()
    }

    /// The notices due for `record` at `now` (ignoring what was already noticed).
    fn due(
        &self,
        record: &KeyRecord,
        max_age: Option<Duration>,
        now: SystemTime,
    ) -> Vec<KeyNotice> {
        let mut out = Vec::new();
        if record.status != KeyStatus::Active || record.is_expired_at(now) {
            return out;
        }
        let notice = |kind, rotation_due_at: Option<SystemTime>| KeyNotice {
            kind_tag: "keygate.key_notice",
            kind,
            key_id: record.id,
            key_name: record.name.clone(),
            owner: record.owner.clone(),
            identity: record.identity.clone(),
            created_at: rfc3339(record.created_at),
            expires_at: record.expires_at.map(rfc3339),
            rotation_due_at: rotation_due_at.map(rfc3339),
            max_age_s: rotation_due_at.and(max_age).map(|d| d.as_secs()),
            noticed_at: rfc3339(now),
        };
        if let Some(due) = max_age.and_then(|a| record.created_at.checked_add(a)) {
            if due <= now {
                out.push(notice(NoticeKind::RotationDue, Some(due)));
            }
        }
        if let (Some(w), Some(exp)) = (self.warn_before_expiry, record.expires_at) {
            if exp.checked_sub(w).is_none_or(|start| start <= now) {
                out.push(notice(NoticeKind::Expiring, None));
            }
        }
        out
    }

    /// One sweep: lists the active keys (with their roles and identities), raises the
    /// notices due and not raised within [`repeat_after`](Self::repeat_after), records and
    /// delivers them. Fails only when the store cannot be read.
    pub async fn run_once(&self) -> Result<SweepReport, StoreError> {
        let now = self.clock.now();
        let records = self
            .store
            .list(&KeyFilter {
                status: Some(KeyStatus::Active),
                ..KeyFilter::default()
            })
            .await?;
        let roles = if records.iter().any(|r| !r.roles.is_empty()) {
            match self.store.list_roles().await {
                Err(StoreError::Unsupported(_)) => Vec::new(),
                other => other?,
            }
        } else {
            Vec::new()
        };
        let identities = if records.iter().any(|r| r.identity.is_some()) {
            match self.store.list_identities().await {
                Err(StoreError::Unsupported(_)) => Vec::new(),
                other => other?,
            }
        } else {
            Vec::new()
        };
        let mut raised = Vec::new();
        {
            let mut noticed = self.noticed.lock().unwrap_or_else(PoisonError::into_inner);
            let mut still_due = std::collections::HashSet::new();
            for record in &records {
                let identity = record
                    .identity
                    .as_deref()
                    .and_then(|n| identities.iter().find(|i| i.name == n));
                let principal = Principal::resolve(record, &roles, identity);
                let max_age = self.max_age_of(record, &principal, identity);
                for n in self.due(record, max_age, now) {
                    let key = (n.key_id, n.kind);
                    still_due.insert(key);
                    let fresh = noticed.get(&key).is_none_or(|at| {
                        now.duration_since(*at).unwrap_or_default() >= self.repeat_after
                    });
                    if fresh {
                        noticed.insert(key, now);
                        raised.push(n);
                    }
                }
            }
            // Keys no longer due (rotated, revoked, gone) are forgotten: memory stays
            // bounded by the keys due now.
            noticed.retain(|k, _| still_due.contains(k));
        }
        let mut report = SweepReport::default();
        for n in &raised {
            if let Some(a) = &self.auditor {
                let _ = a.record(self.event(n, now)).await;
            }
            if let Some(w) = &self.webhook {
                match w.post(n).await {
                    Ok(_) => report.delivered += 1,
                    Err(e) => {
                        report.failed += 1;
                        tracing::warn!(key_id = %n.key_id, kind = n.kind.as_str(), error = %e, "key notice not delivered to the webhook");
                    }
                }
            }
        }
        report.notices = raised;
        Ok(report)
    }

    fn event(&self, n: &KeyNotice, now: SystemTime) -> AuditEvent {
        let (field, value) = match n.kind {
            NoticeKind::RotationDue => ("rotation_due_at", n.rotation_due_at.clone()),
            NoticeKind::Expiring => ("expires_at", n.expires_at.clone()),
        };
        let value = value.map_or(serde_json::Value::Null, serde_json::Value::String);
        AuditEvent::Lifecycle(LifecycleEvent {
            time: now,
            actor: ACTOR.to_owned(),
            action: n.kind.action(),
            key_id: n.key_id,
            key_name: n.key_name.clone(),
            subject: n.owner.clone(),
            status: KeyStatus::Active,
            related_key: None,
            changes: vec![FieldChange {
                field: field.to_owned(),
                old: value.clone(),
                new: value,
            }],
        })
    }

    /// Runs [`run_once`](Self::run_once) every `every` on the current tokio runtime (the
    /// first sweep at once); a failed sweep logs a warning. Abort the handle to stop it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (as `tokio::spawn`).
    pub fn spawn(self, every: Duration) -> tokio::task::JoinHandle<()> {
        let every = every.max(Duration::from_millis(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = self.run_once().await {
                    tracing::warn!(error = %e, "key notice sweep could not read the key store");
                }
            }
        })
    }
}
