use std::sync::Arc;

use http::header::HeaderName;
use tower_layer::Layer;

use super::Audit;
use crate::client_ip::TrustedProxies;
use crate::core::audit::Auditor;
use crate::{Clock, KeyGate, SystemClock};

/// Layer that applies [`Audit`]: records one [`RequestEvent`](crate::core::audit::RequestEvent)
/// per request through an [`Auditor`], and never rejects.
///
/// With the hub ([`AuditLayer::with_gate`], or the shorthand [`KeyGate::audit_layer`]) it
/// resolves the caller itself (once per request, memoized, so an inner auth layer reuses the
/// verdict) and so names the key even when it is the outermost layer. Without it
/// ([`AuditLayer::new`] alone) it reads the caller from the request's extensions: it names
/// the key when an outer layer resolved it, and otherwise only records what comes back
/// (status and the exact denial code).
#[derive(Clone, Debug)]
pub struct AuditLayer {
    pub(crate) config: Arc<Config>,
}

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) auditor: Auditor,
    pub(crate) gate: Option<KeyGate>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) header: HeaderName,
    pub(crate) trust_incoming: bool,
    pub(crate) proxies: Option<TrustedProxies>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("auditor", &self.auditor)
            .field("hub", &self.gate.is_some())
            .field("header", &self.header)
            .field("trust_incoming", &self.trust_incoming)
            .finish_non_exhaustive()
    }
}

impl AuditLayer {
    /// A layer recording through `auditor` that learns the caller from the request's
    /// extensions only (see the type's docs). Times come from the system clock.
    pub fn new(auditor: Auditor) -> Self {
        AuditLayer {
            config: Arc::new(Config {
                auditor,
                gate: None,
                clock: Arc::new(SystemClock),
                header: HeaderName::from_static("x-request-id"),
                trust_incoming: true,
                proxies: None,
            }),
        }
    }

    /// Resolves the caller through `gate` (never rejecting), settles the client address
    /// with the hub's trusted proxies, and reads time from the hub's clock (a
    /// [`clock`](Self::clock) set afterwards wins).
    pub fn with_gate(mut self, gate: &KeyGate) -> Self {
        let c = Arc::make_mut(&mut self.config);
        c.clock = gate.clock().clone();
        c.gate = Some(gate.clone());
        self
    }

    /// The request-id header (default `x-request-id`).
    pub fn request_id_header(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).header = name;
        self
    }

    /// Whether a client's request id is reused when acceptable (1 to 128 visible ASCII
    /// characters; default `true`). When `false`, every request gets a fresh id.
    pub fn trust_request_id(mut self, yes: bool) -> Self {
        Arc::make_mut(&mut self.config).trust_incoming = yes;
        self
    }

    /// For a layer built without the hub: the proxies whose forwarded headers are believed
    /// when settling the client address (default: none; the peer address is recorded).
    pub fn trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        Arc::make_mut(&mut self.config).proxies = Some(proxies);
        self
    }

    /// Reads event times from `clock` (default: the hub's clock, or the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        Arc::make_mut(&mut self.config).clock = clock;
        self
    }

    /// The auditor: flush it, shut it down or read its counters.
    pub fn auditor(&self) -> &Auditor {
        &self.config.auditor
    }

    /// The layer that makes this audit trail fail closed: placed just inside this layer,
    /// it refuses requests with 503 `store_unavailable` while the auditor cannot write
    /// (see [`AuditGuardLayer`](super::AuditGuardLayer)). Without it, requests carry on
    /// when the log cannot be written, and the auditor counts the lost events.
    pub fn fail_closed(&self) -> super::AuditGuardLayer {
        let guard = super::AuditGuardLayer::new(self.config.auditor.clone());
        match &self.config.gate {
            Some(gate) => guard.with_gate(gate),
            None => guard,
        }
    }
}

impl Default for AuditLayer {
    /// [`AuditLayer::new`] with the default (`tracing`) auditor.
    fn default() -> Self {
        AuditLayer::new(Auditor::default())
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Audit {
            inner,
            config: self.config.clone(),
        }
    }
}
