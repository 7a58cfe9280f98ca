//! Anomaly signals from the request stream: [`AnomalyDetector`] (pure, deterministic),
//! [`AnomalySink`] (runs it in the audit pipeline) and [`KeyDisabler`] (disables keys for
//! the signal kinds a policy names). Documented on the types, which are public where this
//! module is not.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ipnet::IpNet;
use tokio::sync::mpsc;

use super::event::{AnomalyEvent, AnomalyKind, AuditEvent, Decision};
use super::sink::{AuditError, AuditSink};
use crate::denial::DenialCode;
use crate::key::KeyId;
use crate::lifecycle::KeyManager;

/// The detectors' settings. Start from [`AnomalyConfig::default`] and change what you need.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyConfig {
    /// How long after a key's first request its networks and traffic are only learned
    /// (no `new_network` or `spike` signal; requests at the end of the period itself are
    /// still learned, so even a zero period learns the first request's network).
    /// Default: 1 day.
    pub learning: Duration,
    /// The IPv4 network size a client address is cut to (default 24; at most 32).
    pub v4_prefix: u8,
    /// The IPv6 network size a client address is cut to (default 64; at most 128).
    pub v6_prefix: u8,
    /// The window a key's requests are counted in for `spike` (default 1 minute).
    pub spike_window: Duration,
    /// A window's count must exceed the baseline times this (default 10).
    pub spike_factor: f64,
    /// ...and be at least this many requests (default 100), so a quiet key does not raise a
    /// signal for a handful of calls.
    pub spike_min: u64,
    /// The weight of the newest closed window in the moving baseline, between 0 and 1
    /// (default 0.2; empty windows count as zero requests).
    pub spike_alpha: f64,
    /// The window denials from one address are counted in (default 1 minute).
    pub denial_window: Duration,
    /// Denials from one address in one window that raise `denial_burst` (default 20).
    pub denial_threshold: u64,
    /// The window distinct networks of one key are counted in (default 10 minutes).
    pub networks_window: Duration,
    /// Distinct networks of one key in one window that raise `many_networks` (default 4).
    pub networks_threshold: usize,
    /// At most this many keys are tracked (default 10 000).
    pub max_keys: usize,
    /// At most this many client addresses are tracked for denial bursts (default 10 000).
    pub max_addresses: usize,
    /// At most this many networks are remembered per key (default 32).
    pub max_networks_per_key: usize,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        AnomalyConfig {
            learning: Duration::from_secs(24 * 3600),
            v4_prefix: 24,
            v6_prefix: 64,
            spike_window: Duration::from_secs(60),
            spike_factor: 10.0,
            spike_min: 100,
            spike_alpha: 0.2,
            denial_window: Duration::from_secs(60),
            denial_threshold: 20,
            networks_window: Duration::from_secs(600),
            networks_threshold: 4,
            max_keys: 10_000,
            max_addresses: 10_000,
            max_networks_per_key: 32,
        }
    }
}

impl AnomalyConfig {
    /// The settings with out-of-range values brought into range: prefixes capped at 32 and
    /// 128, windows at least one second, thresholds and caps at least 1, the factor at
    /// least 1 and the weight within (0, 1].
    fn normalized(mut self) -> Self {
        let second = Duration::from_secs(1);
        self.v4_prefix = self.v4_prefix.min(32);
        self.v6_prefix = self.v6_prefix.min(128);
        self.spike_window = self.spike_window.max(second);
        self.denial_window = self.denial_window.max(second);
        self.networks_window = self.networks_window.max(second);
        self.spike_factor = if self.spike_factor.is_finite() {
            self.spike_factor.max(1.0)
        } else {
            10.0
        };
        self.spike_alpha = if self.spike_alpha.is_finite() && self.spike_alpha > 0.0 {
            self.spike_alpha.min(1.0)
        } else {
            0.2
        };
        self.spike_min = self.spike_min.max(1);
        self.denial_threshold = self.denial_threshold.max(1);
        self.networks_threshold = self.networks_threshold.max(1);
        self.max_keys = self.max_keys.max(1);
        self.max_addresses = self.max_addresses.max(1);
        self.max_networks_per_key = self.max_networks_per_key.max(1);
        self
    }
}

struct KeyState {
    first_seen: SystemTime,
    last_seen: SystemTime,
    /// Networks the key was used from, with when each was last used.
    networks: Vec<(IpNet, SystemTime)>,
    /// When `many_networks` was last raised (once per window).
    many_raised_at: Option<SystemTime>,
    /// The current spike window.
    bucket_start: SystemTime,
    bucket_count: u64,
    /// Requests per window, moving average; none before the first window closed.
    baseline: Option<f64>,
    spike_raised: bool,
}

struct AddressState {
    last_seen: SystemTime,
    window_start: SystemTime,
    count: u64,
    raised: bool,
    /// The key of this window's denials: `None` before the first, `Some(None)` when they
    /// named no key or several.
    key: Option<Option<KeyId>>,
}

/// Runs four anomaly detectors over audit events. Pure: no clock, no I/O, no randomness in
/// what it raises.
///
/// Four detectors, each per key or per client address, all driven by the events' own
/// timestamps (so replaying a recorded log raises the same signals as the live stream did,
/// and tests use a manual clock):
///
/// - **new network** ([`AnomalyKind::NewNetwork`]): a key used from a network (the client
///   address cut to a /24 for IPv4, a /64 for IPv6) it has not used before, once the key's
///   learning period (counted from the first request the detector saw with it) is over;
/// - **spike** ([`AnomalyKind::Spike`]): a key's requests in one window beyond
///   `spike_factor` times its own exponentially weighted moving average of requests per
///   window (and at least `spike_min`), after the learning period;
/// - **denial burst** ([`AnomalyKind::DenialBurst`]): `denial_threshold` denied requests
///   from one client address in one window (scope probing with a key, key guessing without
///   one); rate-limit and quota refusals are not counted (they are the limiter working);
/// - **many networks** ([`AnomalyKind::ManyNetworks`]): one key used from
///   `networks_threshold` networks or more within one window.
///
/// Each detector raises a signal at most once per window for one key or address.
///
/// Memory is bounded: at most [`AnomalyConfig::max_keys`] keys and
/// [`AnomalyConfig::max_addresses`] addresses are tracked, each key remembering at most
/// [`AnomalyConfig::max_networks_per_key`] networks. When a table is full, the quarter
/// seen least recently is forgotten (a forgotten key starts a new learning period when it
/// comes back; a forgotten network counts as new again). With the defaults that is about
/// 10 000 × (120 + 32 × 48) + 10 000 × 80 bytes: under 20 MB (16.4 MB measured with
/// IPv6 networks), whatever a client sprays.
///
/// ```
/// use keygate_core::audit::{AnomalyConfig, AnomalyDetector, AnomalyKind, RequestEvent};
/// use keygate_core::KeyId;
/// use std::time::{Duration, UNIX_EPOCH};
///
/// let mut detector = AnomalyDetector::new(AnomalyConfig {
///     learning: Duration::from_secs(3600),
///     ..AnomalyConfig::default()
/// });
/// let key: KeyId = "3hG7xQ2mPa9Z".parse().unwrap();
/// let request = |secs: u64, ip: &str| {
///     let mut e = RequestEvent::new(UNIX_EPOCH + Duration::from_secs(secs), "r", "GET", "/");
///     e.key_id = Some(key);
///     e.client_ip = Some(ip.parse().unwrap());
///     e.into()
/// };
/// // Learning: the key's usual network.
/// assert!(detector.observe(&request(0, "192.0.2.10")).is_empty());
/// // After the learning period, the same /24 is fine; another network is a signal.
/// assert!(detector.observe(&request(7200, "192.0.2.99")).is_empty());
/// let signals = detector.observe(&request(7201, "198.51.100.7"));
/// assert_eq!(signals[0].kind, AnomalyKind::NewNetwork);
/// assert_eq!(signals[0].network.as_deref(), Some("198.51.100.0/24"));
/// ```
pub struct AnomalyDetector {
    config: AnomalyConfig,
    keys: HashMap<KeyId, KeyState>,
    addresses: HashMap<IpAddr, AddressState>,
}

impl std::fmt::Debug for AnomalyDetector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnomalyDetector")
            .field("config", &self.config)
            .field("keys", &self.keys.len())
            .field("addresses", &self.addresses.len())
            .finish()
    }
}

impl Default for AnomalyDetector {
    fn default() -> Self {
        AnomalyDetector::new(AnomalyConfig::default())
    }
}

/// `later - earlier`, zero when `later` is not later (events may arrive slightly out of
/// order).
fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or(Duration::ZERO)
}

/// Forgets the quarter of `map` seen least recently (at least one entry).
fn evict_oldest<K: Hash + Eq + Clone, V>(
    map: &mut HashMap<K, V>,
    last_seen: impl Fn(&V) -> SystemTime,
) {
    let n = (map.len() / 4).max(1);
    let mut times: Vec<SystemTime> = map.values().map(&last_seen).collect();
    if times.is_empty() {
        return;
    }
    let idx = n.min(times.len()) - 1;
    let (_, cutoff, _) = times.select_nth_unstable(idx);
    let cutoff = *cutoff;
    let mut removed = 0;
    map.retain(|_, v| {
        if removed < n && last_seen(v) <= cutoff {
            removed += 1;
            false
        } else {
            true
        }
    });
}

fn ignored_denial(code: Option<DenialCode>) -> bool {
    matches!(
        code,
        Some(DenialCode::RateLimited | DenialCode::QuotaExceeded)
    )
}

impl AnomalyDetector {
    /// A detector with these settings (out-of-range values are brought into range).
    pub fn new(config: AnomalyConfig) -> Self {
        AnomalyDetector {
            config: config.normalized(),
            keys: HashMap::new(),
            addresses: HashMap::new(),
        }
    }

    /// The settings in use.
    pub fn config(&self) -> &AnomalyConfig {
        &self.config
    }

    /// How many keys are tracked now (never more than [`AnomalyConfig::max_keys`]).
    pub fn tracked_keys(&self) -> usize {
        self.keys.len()
    }

    /// How many client addresses are tracked now (never more than
    /// [`AnomalyConfig::max_addresses`]).
    pub fn tracked_addresses(&self) -> usize {
        self.addresses.len()
    }

    /// The network `ip` belongs to, at the configured size.
    pub fn network_of(&self, ip: IpAddr) -> IpNet {
        let prefix = match ip {
            IpAddr::V4(_) => self.config.v4_prefix,
            IpAddr::V6(_) => self.config.v6_prefix,
        };
        // The prefix is in range (normalized); fall back to the single address otherwise.
        IpNet::new(ip, prefix)
            .map(|n| n.trunc())
            .unwrap_or_else(|_| IpNet::from(ip))
    }

    /// Feeds one event; returns the signals it raises (usually none), in a fixed order:
    /// `new_network`, `many_networks`, `spike`, `denial_burst`. Request events and denial
    /// summaries are looked at; lifecycle and anomaly events are ignored.
    pub fn observe(&mut self, event: &AuditEvent) -> Vec<AnomalyEvent> {
        let mut out = Vec::new();
        match event {
            AuditEvent::Request(r) => {
                if let Some(key) = r.key_id {
                    self.observe_key(key, r.key_name.clone(), r.client_ip, r.time, &mut out);
                }
                if r.decision == Decision::Denied && !ignored_denial(r.denial) {
                    if let Some(ip) = r.client_ip {
                        self.observe_denials(ip, r.key_id, r.key_name.clone(), 1, r.time, &mut out);
                    }
                }
            }
            AuditEvent::Denials(d) => {
                if let Some(ip) = d.client_ip {
                    if !ignored_denial(d.denial) {
                        self.observe_denials(ip, None, None, d.count, d.time, &mut out);
                    }
                }
            }
            AuditEvent::Lifecycle(_) | AuditEvent::Anomaly(_) => {}
        }
        out
    }

    fn signal(
        kind: AnomalyKind,
        time: SystemTime,
        key_id: Option<KeyId>,
        key_name: Option<std::sync::Arc<str>>,
        client_ip: Option<IpAddr>,
    ) -> AnomalyEvent {
        AnomalyEvent {
            time,
            kind,
            key_id,
            key_name,
            client_ip,
            network: None,
            count: 1,
            threshold: None,
            baseline: None,
            window_s: None,
        }
    }

    fn observe_key(
        &mut self,
        key: KeyId,
        key_name: Option<std::sync::Arc<str>>,
        ip: Option<IpAddr>,
        now: SystemTime,
        out: &mut Vec<AnomalyEvent>,
    ) {
        let net = ip.map(|ip| self.network_of(ip));
        if !self.keys.contains_key(&key) && self.keys.len() >= self.config.max_keys {
            evict_oldest(&mut self.keys, |s| s.last_seen);
        }
        let c = &self.config;
        let state = self.keys.entry(key).or_insert_with(|| KeyState {
            first_seen: now,
            last_seen: now,
            networks: Vec::new(),
            many_raised_at: None,
            bucket_start: now,
            bucket_count: 0,
            baseline: None,
            spike_raised: false,
        });
        if now > state.last_seen {
            state.last_seen = now;
        }
        // Strictly after: a zero learning period still learns the first request's network.
        let learned = since(now, state.first_seen) > c.learning;

        // New network, and many networks.
        if let (Some(ip), Some(net)) = (ip, net) {
            match state.networks.iter_mut().find(|(n, _)| *n == net) {
                Some((_, seen)) => {
                    if now > *seen {
                        *seen = now;
                    }
                }
                None => {
                    if learned {
                        let mut s = Self::signal(
                            AnomalyKind::NewNetwork,
                            now,
                            Some(key),
                            key_name.clone(),
                            Some(ip),
                        );
                        s.network = Some(net.to_string());
                        out.push(s);
                    }
                    if state.networks.len() >= c.max_networks_per_key {
                        if let Some(i) = state
                            .networks
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, (_, t))| *t)
                            .map(|(i, _)| i)
                        {
                            state.networks.swap_remove(i);
                        }
                    }
                    state.networks.push((net, now));
                }
            }
            let recent = state
                .networks
                .iter()
                .filter(|(_, t)| since(now, *t) < c.networks_window)
                .count();
            let quiet = state
                .many_raised_at
                .is_none_or(|t| since(now, t) >= c.networks_window);
            if recent >= c.networks_threshold && quiet {
                state.many_raised_at = Some(now);
                let mut s = Self::signal(
                    AnomalyKind::ManyNetworks,
                    now,
                    Some(key),
                    key_name.clone(),
                    Some(ip),
                );
                s.network = Some(net.to_string());
                s.count = recent as u64;
                s.threshold = Some(c.networks_threshold as f64);
                s.window_s = Some(c.networks_window.as_secs());
                out.push(s);
            }
        }

        // Spike against the key's own moving baseline.
        let elapsed = since(now, state.bucket_start);
        if elapsed >= c.spike_window {
            let windows = elapsed.as_nanos() / c.spike_window.as_nanos().max(1);
            let count = state.bucket_count as f64;
            let mut baseline = match state.baseline {
                None => count,
                Some(b) => c.spike_alpha * count + (1.0 - c.spike_alpha) * b,
            };
            // The windows in between were empty.
            let empty = i32::try_from(windows.saturating_sub(1).min(10_000)).unwrap_or(10_000);
            baseline *= (1.0 - c.spike_alpha).powi(empty);
            state.baseline = Some(baseline);
            let step = c
                .spike_window
                .checked_mul(u32::try_from(windows).unwrap_or(u32::MAX))
                .unwrap_or(elapsed);
            state.bucket_start = state.bucket_start.checked_add(step).unwrap_or(now);
            state.bucket_count = 0;
            state.spike_raised = false;
        }
        state.bucket_count += 1;
        if let (true, Some(baseline), false) = (learned, state.baseline, state.spike_raised) {
            let threshold = (baseline * c.spike_factor).max(c.spike_min as f64);
            if state.bucket_count as f64 > threshold {
                state.spike_raised = true;
                let mut s = Self::signal(AnomalyKind::Spike, now, Some(key), key_name, ip);
                s.count = state.bucket_count;
                s.threshold = Some(threshold);
                s.baseline = Some(baseline);
                s.window_s = Some(c.spike_window.as_secs());
                out.push(s);
            }
        }
    }

    fn observe_denials(
        &mut self,
        ip: IpAddr,
        key: Option<KeyId>,
        key_name: Option<std::sync::Arc<str>>,
        n: u64,
        now: SystemTime,
        out: &mut Vec<AnomalyEvent>,
    ) {
        if !self.addresses.contains_key(&ip) && self.addresses.len() >= self.config.max_addresses {
            evict_oldest(&mut self.addresses, |s| s.last_seen);
        }
        let c = &self.config;
        let state = self.addresses.entry(ip).or_insert_with(|| AddressState {
            last_seen: now,
            window_start: now,
            count: 0,
            raised: false,
            key: None,
        });
        if now > state.last_seen {
            state.last_seen = now;
        }
        if since(now, state.window_start) >= c.denial_window {
            state.window_start = now;
            state.count = 0;
            state.raised = false;
            state.key = None;
        }
        state.count = state.count.saturating_add(n);
        state.key = match state.key {
            None => Some(key),
            Some(k) if k == key => Some(k),
            Some(_) => Some(None),
        };
        if state.count >= c.denial_threshold && !state.raised {
            state.raised = true;
            let key_id = state.key.flatten();
            let mut s = Self::signal(
                AnomalyKind::DenialBurst,
                now,
                key_id,
                key_id.and(key_name),
                Some(ip),
            );
            s.count = state.count;
            s.threshold = Some(c.denial_threshold as f64);
            s.window_s = Some(c.denial_window.as_secs());
            out.push(s);
        }
    }
}

/// Signals queued for a [`KeyDisabler`] at most; past it, a signal's disable request is
/// dropped with a warning (the signal itself is still recorded).
const DISABLE_QUEUE: usize = 1024;

/// A sink that runs an [`AnomalyDetector`] over every event on its way to `inner`, and
/// records each signal into `inner` right after the event that raised it (so signals land
/// in the same hash-chained log, and a metrics sink in `inner` counts them).
///
/// Put it outermost, before an [`AggregateSink`](super::AggregateSink), so every denial is
/// seen one by one: `AnomalySink::new(config, AggregateSink::new(file_sink))`. Anomaly events
/// it is given are passed on and not looked at. Signals are written within the call that
/// records their event, so an [`Auditor`](super::Auditor)'s counters count that event once.
///
/// ```
/// use keygate_core::audit::{AnomalyConfig, AnomalySink, AuditSink, Decision, MemorySink, RequestEvent};
/// use keygate_core::DenialCode;
/// use std::time::UNIX_EPOCH;
///
/// let memory = MemorySink::new();
/// let sink = AnomalySink::new(AnomalyConfig { denial_threshold: 3, ..Default::default() }, memory.clone());
/// for i in 0..3 {
///     let mut e = RequestEvent::new(UNIX_EPOCH, format!("r{i}"), "GET", "/");
///     e.decision = Decision::Denied;
///     e.denial = Some(DenialCode::InvalidKey);
///     e.client_ip = Some("203.0.113.9".parse().unwrap());
///     sink.record(&e.into()).unwrap();
/// }
/// // Three requests, then the signal.
/// assert_eq!(memory.len(), 4);
/// assert!(memory.events()[3].as_anomaly().is_some());
/// ```
pub struct AnomalySink<S> {
    detector: Mutex<AnomalyDetector>,
    inner: S,
    disable: Option<(Vec<AnomalyKind>, mpsc::Sender<DisableRequest>)>,
}

/// A key to disable, and the kind of signal that asked for it.
type DisableRequest = (KeyId, AnomalyKind);

impl<S> std::fmt::Debug for AnomalySink<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnomalySink")
            .field(
                "detector",
                &*self.detector.lock().unwrap_or_else(PoisonError::into_inner),
            )
            .field("disable", &self.disable.as_ref().map(|(k, _)| k))
            .finish_non_exhaustive()
    }
}

impl<S: AuditSink> AnomalySink<S> {
    /// Runs the detectors with `config` in front of `inner`.
    pub fn new(config: AnomalyConfig, inner: S) -> Self {
        AnomalySink {
            detector: Mutex::new(AnomalyDetector::new(config)),
            inner,
            disable: None,
        }
    }

    /// Also disables the key of each signal of one of `kinds` through `manager` (a
    /// `disabled` lifecycle event follows the signal, with the actor `anomaly:KIND`).
    /// Disabling happens in the returned [`KeyDisabler`]: spawn its
    /// [`run`](KeyDisabler::run) on your runtime. Signals without a key (a denial burst
    /// that named none) disable nothing.
    pub fn disable_keys_on(
        mut self,
        kinds: impl IntoIterator<Item = AnomalyKind>,
        manager: KeyManager,
    ) -> (Self, KeyDisabler) {
        let (tx, rx) = mpsc::channel(DISABLE_QUEUE);
        self.disable = Some((kinds.into_iter().collect(), tx));
        (self, KeyDisabler { rx, manager })
    }

    /// How many keys and addresses the detector tracks now.
    pub fn tracked(&self) -> (usize, usize) {
        let d = self.detector.lock().unwrap_or_else(PoisonError::into_inner);
        (d.tracked_keys(), d.tracked_addresses())
    }

    /// The sink events are passed to.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AuditSink> AuditSink for AnomalySink<S> {
    fn record(&self, event: &AuditEvent) -> Result<(), AuditError> {
        let signals = self
            .detector
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .observe(event);
        let mut result = self.inner.record(event);
        for signal in signals {
            let target = signal
                .key_id
                .zip(self.disable.as_ref())
                .and_then(|(k, d)| d.0.contains(&signal.kind).then_some((k, signal.kind, &d.1)));
            let r = self.inner.record(&AuditEvent::Anomaly(signal));
            result = result.and(r);
            if let Some((key, kind, tx)) = target {
                if tx.try_send((key, kind)).is_err() {
                    tracing::warn!(
                        target: "keygate::audit",
                        key_id = key.as_str(),
                        anomaly = kind.as_str(),
                        "anomaly: the key could not be queued for disabling (queue full or disabler stopped)"
                    );
                }
            }
        }
        result
    }
    fn flush(&self) -> Result<(), AuditError> {
        self.inner.flush()
    }
    fn sync(&self) -> Result<(), AuditError> {
        self.inner.sync()
    }
}

/// Disables the keys an [`AnomalySink`] names (see [`AnomalySink::disable_keys_on`]).
pub struct KeyDisabler {
    rx: mpsc::Receiver<DisableRequest>,
    manager: KeyManager,
}

impl std::fmt::Debug for KeyDisabler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDisabler").finish_non_exhaustive()
    }
}

impl KeyDisabler {
    /// Disables each key named, one at a time, until the sink is dropped. A key already
    /// disabled is left as it is (nothing is recorded); a revoked or unknown key is logged
    /// at `WARN` and skipped.
    pub async fn run(mut self) {
        while let Some((key, kind)) = self.rx.recv().await {
            let actor = format!("anomaly:{}", kind.as_str());
            if let Err(e) = self.manager.disable(&actor, key).await {
                tracing::warn!(
                    target: "keygate::audit",
                    key_id = key.as_str(),
                    anomaly = kind.as_str(),
                    error = %e,
                    "anomaly: the key could not be disabled"
                );
            }
        }
    }
}
