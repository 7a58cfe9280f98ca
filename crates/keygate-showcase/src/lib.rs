//! The showcase server, as a library the binary (`examples/vector_db.rs`) and the tests
//! (`tests/showcase_*.rs`) share: [`build`] turns [`Options`] into an
//! axum router behind all six keygate layers, with the admin API at `/admin` and the key
//! console at `/console` ([`keygate_admin::console`]).
//!
//! # The stack (outermost first)
//! 0. [`qdrant_extra::resolve_aliases`], around the whole router: a collection alias in the
//!    path is replaced by its collection before routing, so every layer below checks (and
//!    the audit records) the real collection. Without aliases it reads one atomic flag.
//! 1. `AuditLayer`: one event per request, denied ones included, into the auditor.
//!    With [`Options::require_tls`], `RequireTls` right inside it: a key sent without TLS
//!    from off this host is refused (`403 insecure_transport`) and recorded as exposed.
//! 2. [`body::admit`]: a body's size must be announced (`Content-Length`, else 411) and fit
//!    the route ([`body::route_cap`], else 413), before anything of it is read.
//! 3. The bytes rate limit: a `RateLimitLayer` with the same policies as the next one,
//!    charging [`body::byte_units`] (one unit per started 64 KiB past the first), so a key
//!    cannot make the server read more bytes than its limit allows. Refused before the body
//!    is read.
//! 4. [`body::read_upsert`]: for an upsert by a valid key that may write points to that
//!    collection only, reads the body (one buffer of the announced size), parses it (vectors
//!    no longer than the collection's dimension, at most [`body::MAX_BATCH_POINTS`] points)
//!    and puts the points in the request's extensions with their [`PointCount`];
//!    [`qdrant_extra::count_batch_requests`] puts a [`PointCount`] of a batch search's or
//!    query's number of requests.
//! 5. The points rate limit: per key (cost: [`PointCount`], else 1); requests without a
//!    valid key are limited per client address, so guessing keys gets 429 after a few
//!    401s. It sits outside the auth layer for that reason (inside it, failed attempts
//!    would never reach it); it resolves the key through the hub itself. Every request
//!    counts, including those another layer then refuses: rate limits protect capacity.
//! 6. `ApiKeyAuthLayer`: 401 for missing, malformed, unknown, revoked, disabled and expired
//!    keys (`Authorization: Bearer`, `X-API-Key`, or Qdrant's `api-key` header). Fused with
//!    it, `KeyDeprecation` ([`Options::max_key_age`], [`Options::expiry_warning`]): a key
//!    due for rotation or close to expiry answers with `Deprecation` and `Sunset`.
//! 7. `IpAllowLayer`: the key's own CIDR allowlist (403 `ip_not_allowed`).
//! 8. `ScopeLayer` with the route table of [`routes`]: 403 `insufficient_scope` /
//!    `resource_forbidden` (per-collection keys).
//! 9. `QuotaLayer`: per key (cost: points plus byte units); innermost, so only requests
//!    every other layer let through are counted.
//!
//! Why middlewares for the cost: the layers decide before the body is read and their cost
//! functions see only the request head (`keygate::cost::RequestHead`), while the point count
//! is in the body. The byte count is in the head, so bytes are charged before reading; the
//! upsert middleware resolves the key through the hub (memoized: the layers reuse the
//! verdict) and reads only upserts of valid keys allowed to make them, once their bytes are
//! paid for. The handler writes exactly the points that were counted.
//!
//! `/`, `/healthz`, `/livez` and `/readyz` are outside the stack: open, unaudited, unlimited
//! (like Qdrant, which exempts them from its API key). So is `POST /leaks/github`, the
//! secret-scanning endpoint, when [`Options::leak_public_keys`] is set: it takes no API
//! key, only reports signed by a configured public key. And `GET /.well-known/jwks.json`,
//! with [`Options::tokens`]: the public keys of short-lived tokens.
//!
//! With [`Options::tokens`], `POST /auth/token` sits behind the whole stack (audited, rate
//! limited, any valid key: a public route of the table) and trades the key for a token;
//! the hub accepts such tokens in every place a key is read, narrowed from their key.

pub mod body;
pub mod filter;
pub mod qdrant;
pub mod qdrant_extra;
pub mod secrets;
pub mod serve;
pub mod store;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{Method, StatusCode};
use axum::routing::{delete, get, post, put};
use axum::Router;
use keygate::check::CheckLayer;
use keygate::core::audit::Auditor;
use keygate::core::usage::{MemoryUsageStore, UsageStore};
use keygate::deprecation::KeyDeprecation;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{Counting, QuotaConfig, QuotaHandle, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::require_tls::RequireTls;
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{KeyGate, KeyId, KeyManager, QuotaWindow, RateLimitPolicy, Verifier};
use keygate_admin::console::Console;
use keygate_admin::leak::LeakReports;
use keygate_admin::{AdminApi, TokenApi};
use tower::ServiceBuilder;

use store::VectorStore;

pub use body::MAX_BODY;

/// The number of points in an upsert, set by [`body::read_upsert`] and read by the
/// rate-limit and quota cost functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointCount(pub usize);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The vectors.
    pub vectors: VectorStore,
    /// The key store, for `/readyz`.
    pub keys: KeyManager,
    /// The audit log, for `/readyz`.
    pub auditor: Auditor,
    /// `/readyz`'s last answer about the key store.
    pub readiness: Arc<Readiness>,
    /// Aliases and payload indexes (`qdrant_extra`).
    pub extras: qdrant_extra::Extras,
}

/// How long `/readyz` reuses its answer about the key store.
pub const READY_CACHE: Duration = Duration::from_secs(1);

/// `/readyz`'s cache: at most one key-store query per [`READY_CACHE`] (read on the hub's
/// clock), however many callers; callers arriving while a query runs wait for its answer.
pub struct Readiness {
    clock: Arc<dyn keygate::Clock>,
    last: tokio::sync::Mutex<Option<(std::time::SystemTime, bool)>>,
}

impl Readiness {
    /// A cache reading `clock`.
    pub fn new(clock: Arc<dyn keygate::Clock>) -> Self {
        Readiness {
            clock,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the key store answered, asking it only when the last answer is older than
    /// [`READY_CACHE`].
    pub async fn store_ready(&self, keys: &KeyManager) -> bool {
        let mut last = self.last.lock().await;
        let now = self.clock.now();
        if let Some((at, ready)) = *last {
            if now.duration_since(at).is_ok_and(|age| age < READY_CACHE) {
                return ready;
            }
        }
        let ready = match KeyId::parse("000000000000") {
            Ok(id) => keys.store().get(&id).await.is_ok(),
            Err(_) => false,
        };
        *last = Some((now, ready));
        ready
    }
}

/// How to build the server. [`Options::new`] sets the defaults; tests replace the clocks
/// and the usage store.
pub struct Options {
    /// The verifier over the key store (its clock is the clock of every decision).
    pub verifier: Verifier,
    /// Where audit events go.
    pub auditor: Auditor,
    /// Where quota usage is counted.
    pub usage: Arc<dyn UsageStore>,
    /// How quota counts reach the usage store.
    pub counting: Counting,
    /// The rate limiter's clock.
    pub limiter_clock: LimiterClock,
    /// Rate limits of keys whose record has none.
    pub default_rate_limits: Vec<RateLimitPolicy>,
    /// Rate limits of requests without a valid key, per client address.
    pub anonymous_rate_limits: Vec<RateLimitPolicy>,
    /// Where rate limits are counted: `None` in this process, or a shared backend (Redis,
    /// so several replicas share one limit).
    pub rate_backend: Option<Arc<dyn keygate::core::rate::RateBackend>>,
    /// Where the bytes rate limit is counted (see [`body`]): `None` in this process, or a
    /// shared backend of its own (not the one of `rate_backend`: the two limits use the
    /// same policy names).
    pub bytes_rate_backend: Option<Arc<dyn keygate::core::rate::RateBackend>>,
    /// Refuse keys sent without TLS from peers off this host (`403 insecure_transport`,
    /// recorded as `exposed`): `keygate::require_tls::RequireTls`, right inside the audit
    /// layer.
    pub require_tls: bool,
    /// With `require_tls`: also disable each key refused that way, at once.
    pub disable_exposed: bool,
    /// Keys older than this are due for rotation: their responses carry `Deprecation` (and
    /// `Sunset` when they expire). `keygate::deprecation::KeyDeprecation`.
    pub max_key_age: Option<Duration>,
    /// Keys expiring within this window get the same fields.
    pub expiry_warning: Option<Duration>,
    /// Prometheus counters, served at `GET /metrics` behind the layers (scope
    /// `metrics:read`). They count what reaches them as an audit sink: put the same
    /// `Metrics` in the auditor's pipeline.
    pub metrics: Option<keygate::metrics::Metrics>,
    /// GitHub's secret-scanning public keys: with them, `POST /leaks/github` (open, outside
    /// the layers: the report's signature is its credential) takes reports of leaked keys
    /// and applies [`Options::leak_policy`] ([`keygate_admin::leak`]).
    pub leak_public_keys: Option<keygate_admin::leak::PublicKeys>,
    /// What `POST /leaks/github` does to a reported key (default: revoke).
    pub leak_policy: keygate_admin::leak::LeakPolicy,
    /// The audit events the console at `/console` shows (its audit page and denials
    /// chart): put the same buffer in the auditor's pipeline.
    pub console_events: Option<keygate_admin::console::RecentEvents>,
    /// The hash-chained audit log whose chain the console's audit page verifies.
    pub console_chain: Option<keygate_admin::console::ChainCheck>,
    /// Short-lived tokens: with them, `POST /auth/token` (behind the layers, any valid key)
    /// trades a key for a signed token that every route accepts in its place, and
    /// `GET /.well-known/jwks.json` (open) publishes the public keys
    /// ([`keygate_admin::TokenApi`]).
    pub tokens: Option<keygate::token::Tokens>,
    /// Also write the legacy `X-RateLimit-Limit`, `-Remaining` and `-Reset` fields
    /// (`keygate::rate_limit::LegacyRateLimitHeadersLayer`), for clients that read those.
    pub legacy_ratelimit_headers: bool,
}

impl Options {
    /// Defaults: usage counted in memory (batched, flushed every second), keys without
    /// limits get [`default_rate_limit`], callers without a valid key 10 requests per
    /// second per address.
    pub fn new(verifier: Verifier, auditor: Auditor) -> Self {
        Options {
            verifier,
            auditor,
            usage: Arc::new(MemoryUsageStore::new()),
            counting: Counting::Batched {
                flush_every: Duration::from_secs(1),
            },
            limiter_clock: LimiterClock::default(),
            default_rate_limits: vec![default_rate_limit()],
            anonymous_rate_limits: vec![RateLimitPolicy::per_second("anonymous", 10)],
            rate_backend: None,
            bytes_rate_backend: None,
            require_tls: false,
            disable_exposed: false,
            max_key_age: None,
            expiry_warning: None,
            metrics: None,
            leak_public_keys: None,
            leak_policy: keygate_admin::leak::LeakPolicy::default(),
            console_events: None,
            console_chain: None,
            tokens: None,
            legacy_ratelimit_headers: false,
        }
    }
}

/// The rate limit of keys whose record has none: 2,000 per 20 seconds, counted in points
/// (every request costs at least 1, an upsert its point count) and, separately, in 64 KiB
/// body units. A sustained 100 requests (or points) per second, and a burst of 2,000, so an
/// ordinary client batch (64 to 1,000 points) passes at once, even right after other
/// requests.
pub fn default_rate_limit() -> RateLimitPolicy {
    RateLimitPolicy::new("default", 2_000, Duration::from_secs(20))
}

/// The built server.
pub struct Showcase {
    /// The router; serve it with
    /// `into_make_service_with_connect_info::<SocketAddr>()` (the IP layer needs the peer).
    pub router: Router,
    /// The hub.
    pub gate: KeyGate,
    /// The key manager (what the admin API uses).
    pub keys: KeyManager,
    /// The quota layer's counters: flush them at shutdown.
    pub quota: QuotaHandle,
    /// The vectors.
    pub vectors: VectorStore,
}

/// The route table: which scope each route needs; `{collection}` is checked against the
/// key's collection patterns. Search, query, scroll, count, retrieve, facets, groups and
/// batches are reads; payload changes are point writes; payload indexes and aliases manage
/// collections (`POST /collections/aliases` names its collections in the body: the handler
/// checks them). A route no rule names is refused.
pub fn routes() -> Result<RouteScopes, keygate::scope::InvalidRule> {
    RouteScopes::builder()
        .route("GET", "/collections", "collections:read")
        .route("GET", "/collections/{collection}", "collections:read")
        .route(
            "GET",
            "/collections/{collection}/exists",
            "collections:read",
        )
        .route("PUT", "/collections/{collection}", "collections:manage")
        .route("DELETE", "/collections/{collection}", "collections:manage")
        // Payload indexes and aliases change a collection's schema and names.
        .route(
            "PUT",
            "/collections/{collection}/index",
            "collections:manage",
        )
        .route(
            "DELETE",
            "/collections/{collection}/index/{field}",
            "collections:manage",
        )
        .route("POST", "/collections/aliases", "collections:manage")
        .route("GET", "/aliases", "collections:read")
        .route(
            "GET",
            "/collections/{collection}/aliases",
            "collections:read",
        )
        .route(
            "POST",
            "/collections/{collection}/points/payload",
            "points:write",
        )
        .route(
            "PUT",
            "/collections/{collection}/points/payload",
            "points:write",
        )
        .route(
            "POST",
            "/collections/{collection}/points/payload/delete",
            "points:write",
        )
        .route(
            "POST",
            "/collections/{collection}/points/payload/clear",
            "points:write",
        )
        .route("PUT", "/collections/{collection}/points", WRITE_POINTS)
        .route(
            "POST",
            "/collections/{collection}/points/delete",
            "points:write",
        )
        .reads(
            "POST",
            [
                "/collections/{collection}/points",
                "/collections/{collection}/points/search",
                "/collections/{collection}/points/query",
                "/collections/{collection}/points/scroll",
                "/collections/{collection}/points/count",
                "/collections/{collection}/points/search/batch",
                "/collections/{collection}/points/query/batch",
                "/collections/{collection}/points/search/groups",
                "/collections/{collection}/points/query/groups",
                "/collections/{collection}/facet",
            ],
            "points:read",
        )
        .route(
            "GET",
            "/collections/{collection}/points/{id}",
            "points:read",
        )
        .route("GET", "/metrics", "metrics:read")
        // Creating a key: the admin API decides who may (`keys:admin`, or a key that may
        // mint: delegated minting), so the table only asks for a key (the stack's
        // authentication still refuses a request without one).
        .public("POST", "/admin/keys")
        .route("*", "/admin/keys", "keys:admin")
        .route("*", "/admin/keys/{id}", "keys:admin")
        .route("*", "/admin/keys/{id}/{action}", "keys:admin")
        .route("*", "/admin/roles", "keys:admin")
        .route("*", "/admin/roles/{name}", "keys:admin")
        .route("*", "/admin/identities", "keys:admin")
        .route("*", "/admin/identities/{name}", "keys:admin")
        // Any valid key may trade itself for a narrower token.
        .public("POST", "/auth/token")
        .build()
}

/// The scope an upsert needs (see [`routes`]).
const WRITE_POINTS: &str = "points:write";

/// The collection an upsert (`PUT /collections/{c}/points`) writes to, still
/// percent-encoded; `None` for any other request.
pub(crate) fn upserted_collection<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let mut parts = path.split('/');
    let ok =
        method == Method::PUT && parts.next() == Some("") && parts.next() == Some("collections");
    let collection = parts.next().filter(|c| ok && !c.is_empty())?;
    (parts.next() == Some("points") && parts.next().is_none()).then_some(collection)
}

/// Whether the scope layer will let `p` upsert into `raw` (the collection as it appears in
/// the path): the key grants [`WRITE_POINTS`] and may access the collection (decoded as the
/// scope layer decodes it).
pub(crate) fn may_upsert(p: &keygate::Principal, raw: &str) -> bool {
    let name = match percent_encoding::percent_decode_str(raw).decode_utf8() {
        Ok(name) if !name.chars().any(|c| c == '/' || c.is_control()) => name,
        _ => return false,
    };
    keygate::Scope::parse(WRITE_POINTS).is_ok_and(|s| p.has_scope(&s)) && p.can_access(&name)
}

fn point_cost(ext: &axum::http::Extensions) -> u64 {
    ext.get::<PointCount>()
        .map_or(1, |c| u64::try_from(c.0).unwrap_or(u64::MAX))
}

fn body_units(ext: &axum::http::Extensions) -> u64 {
    ext.get::<body::BodySize>()
        .map_or(0, |b| body::byte_units(b.0))
}

/// `GET /readyz`: 200 when the key store answers and the audit log is open, else 503. The
/// store's answer is cached for [`READY_CACHE`] (the route is open and unlimited).
async fn readyz(State(app): State<AppState>) -> (StatusCode, &'static str) {
    if app.auditor.is_closed() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the audit log is closed");
    }
    if app.readiness.store_ready(&app.keys).await {
        (StatusCode::OK, "all shards are ready")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the key store is unavailable",
        )
    }
}

/// Builds the server: the Qdrant routes and the admin API behind the six layers.
pub fn build(opts: Options) -> Result<Showcase, Box<dyn std::error::Error + Send + Sync>> {
    let gate = match &opts.tokens {
        Some(tokens) => KeyGate::builder(opts.verifier)
            .tokens(tokens.clone())
            .build(),
        None => KeyGate::new(opts.verifier),
    };
    let token_api = opts.tokens.as_ref().map(|t| {
        let api = TokenApi::new(&gate, t.clone());
        match opts.metrics.clone() {
            Some(metrics) => api.on_issued(move || metrics.token_issued()),
            None => api,
        }
    });
    let keys = KeyManager::for_verifier(gate.verifier(), opts.auditor.clone());
    let vectors = VectorStore::new();
    let bytes_config = RateLimitConfig::new()
        .default_policies(opts.default_rate_limits.clone())
        .anonymous_policies(Vec::new())
        .clock(opts.limiter_clock.clone())
        .headers(false)
        .cost(|h| body_units(h.extensions()));
    let mut rate_config = RateLimitConfig::new()
        .default_policies(opts.default_rate_limits)
        .anonymous_policies(opts.anonymous_rate_limits)
        .clock(opts.limiter_clock)
        .cost(|h| point_cost(h.extensions()));
    let mut bytes_config = bytes_config;
    if let Some(backend) = opts.rate_backend {
        rate_config = rate_config.backend(backend);
    }
    if let Some(backend) = opts.bytes_rate_backend {
        bytes_config = bytes_config.backend(backend);
    }
    let rate_bytes = RateLimitLayer::new(bytes_config)?.with_gate(&gate);
    let rate = RateLimitLayer::new(rate_config)?.with_gate(&gate);
    let quota = QuotaLayer::new(
        QuotaConfig::new(opts.usage)
            .counting(opts.counting)
            .meter(QuotaWindow::Day)
            .cost(|h| point_cost(h.extensions()).saturating_add(body_units(h.extensions()))),
    )?
    .with_gate(&gate);
    let handle = quota.handle();
    let admin = AdminApi::new(keys.clone())
        .gate(&gate)
        .quota(handle.clone())
        .scope_vocabulary(keygate::ScopeVocabulary::new(routes()?.scopes()));
    // The key console at `/console`: outside the layers (its pages carry no API key), it
    // acts only through the admin API above, with the signed-in key as the bearer.
    let mut console = Console::new(admin.clone());
    if let Some(age) = opts.max_key_age {
        console = console.rotation_due_after(age);
    }
    if let Some(events) = opts.console_events {
        console = console.recent_events(events);
    }
    if let Some(chain) = opts.console_chain {
        console = console.chain_check(chain);
    }
    let extras = qdrant_extra::Extras::new();
    let state = AppState {
        vectors: vectors.clone(),
        keys: keys.clone(),
        auditor: opts.auditor.clone(),
        readiness: Arc::new(Readiness::new(gate.clock().clone())),
        extras: extras.clone(),
    };

    let mut require_tls = RequireTls::new()
        .audit(opts.auditor.clone())
        .clock(gate.clock().clone());
    if opts.disable_exposed {
        require_tls = require_tls.disable_exposed(keys.clone());
    }
    // Off: the check is not in the stack at all.
    // (The response mapped back to axum's body, so on and off have one type.)
    let require_tls = opts.require_tls.then(|| {
        ServiceBuilder::new()
            .map_response(|r: axum::response::Response<_>| r.map(axum::body::Body::new))
            .layer(CheckLayer::new(require_tls).with_gate(&gate))
            .into_inner()
    });

    let mut deprecation = KeyDeprecation::new(gate.clock().clone());
    if let Some(age) = opts.max_key_age {
        deprecation = deprecation.max_age(age);
    }
    if let Some(window) = opts.expiry_warning {
        deprecation = deprecation.warn_before_expiry(window);
    }
    let legacy_headers = opts
        .legacy_ratelimit_headers
        .then(keygate::rate_limit::LegacyRateLimitHeadersLayer::new);
    let metrics_routes = match &opts.metrics {
        Some(m) => m.router(),
        None => Router::new(),
    };

    // `POST /auth/token` behind the layers (audited, rate limited, any valid key);
    // `GET /.well-known/jwks.json` open, below.
    let (token_routes, jwks_routes) = match &token_api {
        Some(api) => {
            let (issue, jwks) = api.clone().split();
            (issue, jwks)
        }
        None => (Router::new(), Router::new()),
    };
    let api = Router::new()
        .merge(metrics_routes)
        .merge(token_routes)
        .route("/collections", get(qdrant::list_collections))
        .route(
            "/collections/{collection}",
            put(qdrant::create_collection)
                .get(qdrant::collection_info)
                .delete(qdrant_extra::delete_collection),
        )
        .route(
            "/collections/{collection}/exists",
            get(qdrant::collection_exists),
        )
        .route(
            "/collections/{collection}/points",
            put(qdrant::upsert).post(qdrant::retrieve),
        )
        .route(
            "/collections/{collection}/points/{id}",
            get(qdrant::get_point),
        )
        .route(
            "/collections/{collection}/points/search",
            post(qdrant::search),
        )
        .route(
            "/collections/{collection}/points/query",
            post(qdrant::query),
        )
        .route(
            "/collections/{collection}/points/scroll",
            post(qdrant::scroll),
        )
        .route(
            "/collections/{collection}/points/count",
            post(qdrant::count),
        )
        .route(
            "/collections/{collection}/points/delete",
            post(qdrant::delete_points),
        )
        .route("/aliases", get(qdrant_extra::list_aliases))
        .route("/collections/aliases", post(qdrant_extra::change_aliases))
        .route(
            "/collections/{collection}/aliases",
            get(qdrant_extra::collection_aliases),
        )
        .route(
            "/collections/{collection}/index",
            put(qdrant_extra::create_index),
        )
        .route(
            "/collections/{collection}/index/{field}",
            delete(qdrant_extra::delete_index),
        )
        .route(
            "/collections/{collection}/points/payload",
            post(qdrant_extra::set_payload).put(qdrant_extra::overwrite_payload),
        )
        .route(
            "/collections/{collection}/points/payload/delete",
            post(qdrant_extra::delete_payload),
        )
        .route(
            "/collections/{collection}/points/payload/clear",
            post(qdrant_extra::clear_payload),
        )
        .route(
            "/collections/{collection}/points/search/batch",
            post(qdrant_extra::search_batch),
        )
        .route(
            "/collections/{collection}/points/query/batch",
            post(qdrant_extra::query_batch),
        )
        .route(
            "/collections/{collection}/points/search/groups",
            post(qdrant_extra::search_groups),
        )
        .route(
            "/collections/{collection}/points/query/groups",
            post(qdrant_extra::query_groups),
        )
        .route("/collections/{collection}/facet", post(qdrant_extra::facet))
        .nest("/admin", admin.router())
        .fallback(qdrant::not_found)
        .with_state(state.clone())
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(
            ServiceBuilder::new()
                .layer(gate.audit_layer(opts.auditor))
                .option_layer(legacy_headers)
                .option_layer(require_tls)
                .layer(axum::middleware::from_fn_with_state(
                    vectors.clone(),
                    body::admit,
                ))
                .layer(rate_bytes)
                .layer(axum::middleware::from_fn_with_state(
                    (gate.clone(), vectors.clone()),
                    body::read_upsert,
                ))
                .layer(axum::middleware::from_fn_with_state(
                    gate.clone(),
                    qdrant_extra::count_batch_requests,
                ))
                // Rate limits, authentication, addresses, scopes and quotas fused: one
                // service. The rate limit decides first (by address for requests without a
                // key); with Redis in precise mode its round trip and the strict quota's go
                // out together.
                .layer(
                    gate.stack()
                        .rate(&rate)
                        .auth()
                        // Deprecation and Sunset for keys due for rotation (nothing when
                        // neither age nor warning is set).
                        .check(deprecation)
                        .ip(&IpAllowLayer::new(IpPolicy::new()))
                        .scope(&ScopeLayer::table(routes()?))
                        .quota(&quota),
                ),
        );

    let open = Router::new()
        .route("/", get(qdrant::root))
        .route("/healthz", get(qdrant::healthz))
        .route("/livez", get(qdrant::healthz))
        .route("/readyz", get(readyz))
        .nest("/console", console.router())
        .with_state(state)
        .merge(jwks_routes);
    let open = match opts.leak_public_keys {
        Some(public_keys) => open.nest(
            "/leaks/github",
            LeakReports::new(keys.clone(), gate.verifier(), public_keys, opts.leak_policy).router(),
        ),
        None => open,
    };

    // Aliases are resolved before routing and before any layer (see
    // `qdrant_extra::resolve_aliases`), so the whole router sits behind that middleware.
    let routed = ServiceBuilder::new()
        .layer(axum::middleware::from_fn_with_state(
            extras,
            qdrant_extra::resolve_aliases,
        ))
        .service(open.merge(api));
    Ok(Showcase {
        router: Router::new().fallback_service(routed),
        gate,
        keys,
        quota: handle,
        vectors,
    })
}
