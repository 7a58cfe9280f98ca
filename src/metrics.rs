//! Prometheus metrics fed from the audit event stream (feature `metrics`).
//!
//! [`Metrics`] is an [`AuditSink`]: put it in the audit pipeline (beside your log with a
//! [`TeeSink`](crate::core::audit::TeeSink), before any
//! [`AggregateSink`](crate::core::audit::AggregateSink) so every denial is counted one by
//! one; folded denial summaries are counted by their `count` too) and it counts:
//!
//! - `keygate_requests_total{decision, code}`: requests by decision (`allowed`, `denied`,
//!   `error`, `cancelled`) and denial code (`none` when not denied);
//! - `keygate_key_lifecycle_total{action}`: key changes (`issued`, `rotated`, `revoked`,
//!   `disabled`, `enabled`, `updated`, `exposed`);
//! - `keygate_anomalies_total{kind}`: anomaly signals (`new_network`, `spike`,
//!   `denial_burst`, `many_networks`) written by an
//!   [`AnomalySink`](crate::core::audit::AnomalySink);
//! - `keygate_request_duration_seconds{protocol}`: a histogram of each request's time from
//!   the audit layer to its response head (`http` or `grpc`), the service's time included.
//!
//! Labels come from fixed sets (decisions, denial codes, actions): no key id, address or
//! path becomes a label, so a client spraying keys cannot grow the registry.
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

use std::fmt;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::audit::{AuditError, AuditEvent, AuditSink, Decision, Transport};

type Labels = Vec<(&'static str, &'static str)>;

/// keygate's counters and their registry; clones share them. See the [module docs](self).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<Labels, Counter>,
    lifecycle: Family<Labels, Counter>,
    duration: Family<Labels, Histogram>,
    anomalies: Family<Labels, Counter>,
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
    /// Counters at zero, in a registry of their own.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keygate");
        let requests = Family::<Labels, Counter>::default();
        let lifecycle = Family::<Labels, Counter>::default();
        registry.register(
            "requests",
            "Requests by decision and denial code",
            requests.clone(),
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
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                lifecycle,
                duration,
                anomalies,
            }),
        }
    }

    /// The registry, to register counters of your own beside keygate's.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
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
                let protocol = match r.protocol {
                    Transport::Http => "http",
                    Transport::Grpc => "grpc",
                };
                self.inner
                    .duration
                    .get_or_create(&vec![("protocol", protocol)])
                    .observe(r.latency.as_secs_f64());
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
