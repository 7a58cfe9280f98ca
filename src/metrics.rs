//! Prometheus metrics fed from the audit event stream (feature `metrics`).
//!
//! [`Metrics`] is an [`AuditSink`]: put it in the audit pipeline (beside your log with a
//! [`TeeSink`](crate::core::audit::TeeSink), before any
//! [`AggregateSink`](crate::core::audit::AggregateSink) so every denial is counted one by
//! one; folded denial summaries are counted by their `count` too) and it counts:
//!
//! - `keygate_requests_total{decision, code}`: requests by decision (`allowed`, `denied`,
//!   `error`, `cancelled`) and denial code (`none` when not denied);
//! - `keygate_denials_total{layer}`: refused requests by the check that refused them
//!   (`auth`, `scope`, `ip`, `rate_limit`, `quota`, `limit`, `require_tls`:
//!   [`DenialCode::layer`](crate::DenialCode::layer));
//! - `keygate_limit_refusals_total{code, policy}`: refusals by a rate limit or quota
//!   (`rate_limited`, `quota_exceeded`, `cost_exceeds_limit`) by the policy broken
//!   (`burst`, `daily`; at most [`MAX_POLICY_LABELS`] names, later ones count as `other`);
//! - `keygate_key_lifecycle_total{action}`: key changes (`issued`, `rotated`, `revoked`,
//!   `disabled`, `enabled`, `updated`, `exposed`);
//! - `keygate_anomalies_total{kind}`: anomaly signals (`new_network`, `spike`,
//!   `denial_burst`, `many_networks`) written by an
//!   [`AnomalySink`](crate::core::audit::AnomalySink);
//! - `keygate_request_duration_seconds{protocol}`: a histogram of each request's time from
//!   the audit layer to its response head (`http` or `grpc`), the service's time included;
//! - `keygate_stack_duration_seconds{protocol}`: a histogram of the time keygate's layers
//!   added: from the audit layer to the protected service being called (a refused
//!   request's whole time);
//! - `keygate_tokens_issued_total`: tokens issued, counted by whoever issues them through
//!   [`Metrics::token_issued`];
//! - with [`Metrics::observe_verifier`]: `keygate_verifier_lookups_total{result}` (`hit`,
//!   `miss`, `negative_hit`) and `keygate_verifier_store_errors_total`, read from
//!   [`Verifier::stats`](crate::Verifier::stats) at each scrape;
//! - with [`Metrics::observe_auditor`]: `keygate_audit_events_total{outcome}` (`written`,
//!   `dropped`, `failed`) and the gauge `keygate_audit_queue_depth`, read from the
//!   [`Auditor`] at each scrape;
//! - opt-in, with [`Metrics::per_key`]: `keygate_key_requests_total{key_id, decision}` for
//!   identified keys only, bounded by [`PerKey`].
//!
//! Labels come from fixed sets (decisions, denial codes, actions) or bounded ones (policy
//! names, per-key series): no address or path becomes a label, and a key id only when you
//! ask for it and only up to your bound, so a client spraying keys cannot grow the registry.
//! [`Metrics::render`] writes the OpenMetrics text exposition (which Prometheus scrapes);
//! with the `axum` feature [`Metrics::router`] serves it at `/metrics` (mount it behind a
//! scope, e.g. `metrics:read`, or on a listener of its own).
//!
//! ```
//! use keygate::core::audit::{AuditEvent, AuditSink, Decision, RequestEvent};
//! use keygate::metrics::Metrics;
//!
//! let metrics = Metrics::new();
//! let mut event = RequestEvent::new(std::time::UNIX_EPOCH, "r1", "GET", "/");
//! event.decision = Decision::Denied;
//! event.denial = Some(keygate::DenialCode::MissingKey);
//! metrics.record(&AuditEvent::Request(event)).unwrap();
//! assert!(metrics
//!     .render()
//!     .contains(r#"keygate_requests_total{decision="denied",code="missing_key"} 1"#));
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::audit::{AuditError, AuditEvent, AuditSink, Auditor, Decision, Transport};
use crate::{KeyId, Verifier};

type Labels = Vec<(&'static str, &'static str)>;
type OwnedLabels = Vec<(&'static str, String)>;

/// How many distinct policy names get a `policy` label of their own; later names are
/// counted as `other`.
pub const MAX_POLICY_LABELS: usize = 64;

/// Which keys get series of their own in `keygate_key_requests_total` ([`Metrics::per_key`]).
/// Only identified keys count (a request whose key was not accepted has no key id), and the
/// number of series never exceeds the bound, whatever clients send.
#[derive(Debug, Clone)]
pub enum PerKey {
    /// Exactly these keys; others are not counted per key.
    Allowlist(HashSet<KeyId>),
    /// The first `n` keys seen; every later key is counted under `key_id="other"`.
    First(usize),
}

/// keygate's counters and their registry; clones share them. See the [module docs](self).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<Labels, Counter>,
    denials: Family<Labels, Counter>,
    refusals: Family<OwnedLabels, Counter>,
    /// The policy names with a label of their own.
    policies: Mutex<HashSet<String>>,
    lifecycle: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    stack: Family<Labels, Histogram>,
    anomalies: Family<Labels, Counter>,
    tokens: Counter,
    per_key: Option<KeySeries>,
    observed: Arc<Observed>,
}

struct KeySeries {
    rule: PerKey,
    counts: Family<OwnedLabels, Counter>,
    /// Under [`PerKey::First`], the keys admitted so far.
    admitted: Mutex<HashSet<KeyId>>,
}

/// What the scrape reads live: a verifier's lookups, an auditor's counters.
#[derive(Default)]
struct Observed {
    verifier: Mutex<Option<Verifier>>,
    auditor: Mutex<Option<Auditor>>,
}

impl fmt::Debug for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct ObservedCollector(Arc<Observed>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Collector for ObservedCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let verifier = lock(&self.0.verifier).clone();
        if let Some(v) = verifier {
            let stats = v.stats();
            let mut family = encoder.encode_descriptor(
                "verifier_lookups",
                "Key lookups by how they were answered: hit (cache), miss (store read), negative_hit (known unknown id)",
                None,
                MetricType::Counter,
            )?;
            for (result, n) in [
                ("hit", stats.hits),
                ("miss", stats.misses),
                ("negative_hit", stats.negative_hits),
            ] {
                let labels = [("result", result)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
            let errors = ConstCounter::new(stats.store_errors);
            errors.encode(encoder.encode_descriptor(
                "verifier_store_errors",
                "Key store reads that failed",
                None,
                errors.metric_type(),
            )?)?;
        }
        let auditor = lock(&self.0.auditor).clone();
        if let Some(a) = auditor {
            let stats = a.stats();
            let mut family = encoder.encode_descriptor(
                "audit_events",
                "Audit events by outcome: written by the sink, dropped (queue full or closed), failed (the sink refused)",
                None,
                MetricType::Counter,
            )?;
            for (outcome, n) in [
                ("written", stats.written),
                ("dropped", stats.dropped),
                ("failed", stats.failed),
            ] {
                let labels = [("outcome", outcome)];
                ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
            }
            let depth = ConstGauge::new(i64::try_from(a.queue_depth()).unwrap_or(i64::MAX));
            depth.encode(encoder.encode_descriptor(
                "audit_queue_depth",
                "Audit events waiting for the writer",
                None,
                depth.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn decision(d: Decision) -> &'static str {
    match d {
        Decision::Allowed => "allowed",
        Decision::Denied => "denied",
        Decision::Error => "error",
        Decision::Cancelled => "cancelled",
    }
}

impl Metrics {
    /// Counters at zero, in a registry of their own, without per-key series.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// [`Metrics::new`] with per-key series (`keygate_key_requests_total{key_id,
    /// decision}`), bounded by `rule`.
    pub fn per_key(rule: PerKey) -> Self {
        Self::build(Some(rule))
    }

    fn build(per_key: Option<PerKey>) -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let requests = Family::<Labels, Counter>::default();
        let lifecycle = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Requests by decision and denial code",
            requests.clone(),
        );
        let denials = Family::<Labels, Counter>::default();
        registry.register(
            "denials",
            "Refused requests by the check that refused them",
            denials.clone(),
        );
        let refusals = Family::<OwnedLabels, Counter>::default();
        registry.register(
            "limit_refusals",
            "Refusals by a rate limit or quota, by denial code and the policy broken",
            refusals.clone(),
        );
        registry.register(
            "key_lifecycle",
            "Key lifecycle changes by action",
            lifecycle.clone(),
        );
        let anomalies = Family::<Labels, Counter>::default();
        registry.register("anomalies", "Anomaly signals by kind", anomalies.clone());
        // 0.5 ms to about 8 s.
        let duration = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 15))) as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from the audit layer to the response head, by protocol",
            duration.clone(),
        );
        // 1 µs to about 33 ms.
        let stack = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_001, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register(
            "stack_duration_seconds",
            "Time keygate's layers added before the service was called (a refusal's whole time), by protocol",
            stack.clone(),
        );
        let tokens = Counter::default();
        registry.register("tokens_issued", "Tokens issued", tokens.clone());
        let per_key = per_key.map(|rule| {
            let counts = Family::<OwnedLabels, Counter>::default();
            registry.register(
                "key_requests",
                "Requests per key (opt-in, bounded), by decision",
                counts.clone(),
            );
            KeySeries {
                rule,
                counts,
                admitted: Mutex::new(HashSet::new()),
            }
        });
        let observed = Arc::new(Observed::default());
        registry.register_collector(Box::new(ObservedCollector(observed.clone())));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                denials,
                refusals,
                policies: Mutex::new(HashSet::new()),
                lifecycle,
                duration,
                stack,
                anomalies,
                tokens,
                per_key,
                observed,
            }),
        }
    }

    /// The registry, to register counters of your own beside keygate's.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Reads `verifier`'s lookup counters ([`Verifier::stats`](crate::Verifier::stats)) at
    /// each scrape (replacing a verifier observed before).
    pub fn observe_verifier(&self, verifier: &Verifier) {
        *lock(&self.inner.observed.verifier) = Some(verifier.clone());
    }

    /// Reads `auditor`'s counters and queue depth at each scrape (replacing an auditor
    /// observed before).
    pub fn observe_auditor(&self, auditor: &Auditor) {
        *lock(&self.inner.observed.auditor) = Some(auditor.clone());
    }

    /// Counts one token issued (`keygate_tokens_issued_total`): the hook for whatever
    /// issues tokens (a token endpoint calls it once per token it hands out).
    pub fn token_issued(&self) {
        self.inner.tokens.inc();
    }

    /// The OpenMetrics text exposition of every counter ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// An axum router serving [`render`](Self::render) at `GET /metrics`. It has no
    /// protection of its own: mount it behind keygate's layers with a scope, or on a
    /// listener only the scraper reaches.
    #[cfg(feature = "axum")]
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> axum::Router<S> {
        let metrics = self.clone();
        axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let text = metrics.render();
                async move { ([(http::header::CONTENT_TYPE, CONTENT_TYPE)], text) }
            }),
        )
    }

    /// The `policy` label for `name`: itself while fewer than [`MAX_POLICY_LABELS`] names
    /// have one, `other` after.
    fn policy_label(&self, name: &str) -> String {
        let mut known = lock(&self.inner.policies);
        if known.contains(name) {
            return name.to_owned();
        }
        if known.len() < MAX_POLICY_LABELS {
            known.insert(name.to_owned());
            return name.to_owned();
        }
        "other".to_owned()
    }

    fn count_key(&self, key: Option<KeyId>, d: Decision) {
        let (Some(series), Some(key)) = (&self.inner.per_key, key) else {
            return;
        };
        let label = match &series.rule {
            PerKey::Allowlist(ids) => {
                if !ids.contains(&key) {
                    return;
                }
                key.to_string()
            }
            PerKey::First(n) => {
                let mut admitted = lock(&series.admitted);
                if admitted.contains(&key) || admitted.len() < *n {
                    admitted.insert(key);
                    key.to_string()
                } else {
                    "other".to_owned()
                }
            }
        };
        series
            .counts
            .get_or_create(&vec![
                ("key_id", label),
                ("decision", decision(d).to_owned()),
            ])
            .inc();
    }
}

fn protocol(t: Transport) -> &'static str {
    match t {
        Transport::Http => "http",
        Transport::Grpc => "grpc",
    }
}

impl AuditSink for Metrics {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        match event {
            AuditEvent::Request(r) => {
                let code = r.denial.map_or("none", |c| c.as_str());
                self.inner
                    .requests
                    .get_or_create(&vec![("decision", decision(r.decision)), ("code", code)])
                    .inc();
                if let Some(denial) = r.denial {
                    self.inner
                        .denials
                        .get_or_create(&vec![("layer", denial.layer())])
                        .inc();
                }
                if let (Some(denial), Some(policy)) = (r.denial, r.policy.as_deref()) {
                    let policy = self.policy_label(policy);
                    self.inner
                        .refusals
                        .get_or_create(&vec![
                            ("code", denial.as_str().to_owned()),
                            ("policy", policy),
                        ])
                        .inc();
                }
                let protocol = protocol(r.protocol);
                self.inner
                    .duration
                    .get_or_create(&vec![("protocol", protocol)])
                    .observe(r.latency.as_secs_f64());
                if let Some(t) = r.stack_time {
                    self.inner
                        .stack
                        .get_or_create(&vec![("protocol", protocol)])
                        .observe(t.as_secs_f64());
                }
                self.count_key(r.key_id, r.decision);
            }
            AuditEvent::Lifecycle(l) => {
                self.inner
                    .lifecycle
                    .get_or_create(&vec![("action", l.action.as_str())])
                    .inc();
            }
            AuditEvent::Anomaly(a) => {
                self.inner
                    .anomalies
                    .get_or_create(&vec![("kind", a.kind.as_str())])
                    .inc();
            }
            AuditEvent::Denials(d) => {
                let code = d.denial.map_or("none", |c| c.as_str());
                self.inner
                    .requests
                    .get_or_create(&vec![("decision", "denied"), ("code", code)])
                    .inc_by(d.count);
                if let Some(denial) = d.denial {
                    self.inner
                        .denials
                        .get_or_create(&vec![("layer", denial.layer())])
                        .inc_by(d.count);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::audit::{AnomalyEvent, AnomalyKind};

    #[test]
    fn anomalies_are_counted_by_kind() {
        let metrics = Metrics::new();
        for kind in [
            AnomalyKind::Spike,
            AnomalyKind::Spike,
            AnomalyKind::DenialBurst,
        ] {
            let signal = AnomalyEvent {
                time: std::time::UNIX_EPOCH,
                kind,
                key_id: None,
                key_name: None,
                client_ip: None,
                network: None,
                count: 1,
                threshold: None,
                baseline: None,
                window_s: None,
            };
            metrics.record(&AuditEvent::Anomaly(signal)).unwrap();
        }
        let text = metrics.render();
        assert!(
            text.contains(r#"keygate_anomalies_total{kind="spike"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"keygate_anomalies_total{kind="denial_burst"} 1"#));
        assert!(!text.contains(r#"kind="new_network""#));
    }
}
