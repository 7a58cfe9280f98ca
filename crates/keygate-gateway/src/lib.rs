//! keygate-gateway: keygate's layers in front of an existing vector database (Qdrant,
//! Chroma), as a reverse proxy configured by a file. The binary is `keygate-gateway
//! --config gateway.toml`; this library is what it and the tests build on.
//!
//! # The stack (outermost first)
//! 0. With `[console] enabled = true`, `/console` and below: the key console
//!    ([`keygate_admin::console`]), outside the proxied routes and never forwarded; it acts
//!    only through the admin API with the signed-in admin key.
//! 0. The preset's open health routes ([`Preset::open_paths`](preset::Preset::open_paths)), `GET` only: forwarded
//!    without a key, like the upstream answers them.
//! 1. `AuditLayer`: one event per request.
//! 2. `RateLimitLayer`: per key (the configuration's `rate_limits` for keys whose record
//!    has none) and per client address for requests without a valid key.
//! 3. Fused: `ApiKeyAuthLayer` (401), `IpAllowLayer` (the key's own CIDR list, 403),
//!    `ScopeLayer` with the preset's route table ([`preset`]; 403, and 404 `unknown_route`
//!    for a route neither the preset nor the configuration lists), `QuotaLayer` (429).
//! 4. [`proxy::Proxy`]: client credentials removed, the upstream's added, tenant scoping
//!    ([`qdrant`], [`chroma`]) for keys with a `tenant` attribute, then forwarded. gRPC
//!    requests (`[grpc]`): the collections their first message names checked against the
//!    key's ([`grpc`]), then forwarded to the gRPC upstream.

pub mod chroma;
pub mod config;
pub mod grpc;
pub mod preset;
pub mod problem;
pub mod proxy;
pub mod qdrant;
pub mod reach;
pub mod serve;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use keygate::core::audit::Auditor;
use keygate::core::usage::{MemoryUsageStore, UsageStore};
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{Counting, QuotaConfig, QuotaHandle, QuotaLayer};
use keygate::rate_limit::{LimiterClock, RateLimitConfig, RateLimitLayer};
use keygate::scope::ScopeLayer;
use keygate::{KeyGate, KeyManager, Verifier};
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};

use config::Config;
use proxy::UpstreamCredential;

/// The error type of bodies the gateway answers with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every gateway answer.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// The whole gateway as one service.
pub type GatewayService = BoxCloneSyncService<Request<Incoming>, Response<GatewayBody>, Infallible>;

/// What the gateway is built from. [`Options::new`] sets the defaults; the binary and the
/// tests replace the stores and clocks.
pub struct Options {
    /// The configuration.
    pub config: Config,
    /// The verifier over the key store (its clock is the clock of every decision).
    pub verifier: Verifier,
    /// Where audit events go.
    pub auditor: Auditor,
    /// The upstream's credential (read from the file or variable the configuration names).
    pub credential: Option<UpstreamCredential>,
    /// Where quota usage is counted.
    pub usage: Arc<dyn UsageStore>,
    /// How quota counts reach the usage store.
    pub counting: Counting,
    /// The rate limiter's clock.
    pub limiter_clock: LimiterClock,
    /// Where rate limits are counted (`None`: in this process; Redis: shared by replicas).
    pub rate_backend: Option<Arc<dyn keygate::core::rate::RateBackend>>,
}

impl Options {
    /// Defaults: usage counted in memory, batched every second; limits in this process.
    pub fn new(config: Config, verifier: Verifier, auditor: Auditor) -> Self {
        Options {
            config,
            verifier,
            auditor,
            credential: None,
            usage: Arc::new(MemoryUsageStore::new()),
            counting: Counting::Batched {
                flush_every: std::time::Duration::from_secs(1),
            },
            limiter_clock: LimiterClock::default(),
            rate_backend: None,
        }
    }
}

/// The built gateway.
pub struct Gateway {
    /// The service to serve ([`serve::serve`]).
    pub service: GatewayService,
    /// The hub.
    pub gate: KeyGate,
    /// The key manager over the verifier's store.
    pub keys: KeyManager,
    /// The quota layer's counters: flush them at shutdown.
    pub quota: QuotaHandle,
}

fn boxed<B>(res: Response<B>) -> Response<GatewayBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    res.map(|b| b.map_err(Into::into).boxed_unsync())
}

/// Reads the upstream credential the configuration names (`credential_file`, else
/// `credential_env`); `None` when it names neither. The error names the file or variable,
/// never the value.
pub fn load_credential(config: &Config) -> Result<Option<UpstreamCredential>, String> {
    let up = &config.upstream;
    let secret = match (&up.credential_file, &up.credential_env) {
        (Some(_), Some(_)) => {
            return Err(
                "give the upstream credential in credential_file or credential_env, not both"
                    .into(),
            )
        }
        (Some(path), None) => keygate_showcase::secrets::read_url_file(
            std::path::Path::new(path),
            "the upstream credential",
        )?,
        (None, Some(var)) => std::env::var(var).map_err(|_| {
            format!("the environment variable {var} (upstream credential) is not set")
        })?,
        (None, None) => return Ok(None),
    };
    let header = up
        .credential_header
        .clone()
        .unwrap_or_else(|| config.preset.credential_header().to_owned());
    UpstreamCredential::new(&header, up.credential_scheme.as_deref(), secret.trim()).map(Some)
}

/// Builds the gateway.
pub fn build(opts: Options) -> Result<Gateway, BoxError> {
    let config = opts.config;
    let gate = KeyGate::builder(opts.verifier)
        .credentials(config.preset.client_credentials())
        .build();
    let keys = KeyManager::for_verifier(gate.verifier(), opts.auditor.clone());
    let default_limits = config
        .rate_limits
        .iter()
        .map(config::RateLimitConfig::policy)
        .collect::<Result<Vec<_>, _>>()?;
    let anonymous_limits = config
        .anonymous_rate_limits
        .iter()
        .map(config::RateLimitConfig::policy)
        .collect::<Result<Vec<_>, _>>()?;
    let mut rate_config = RateLimitConfig::new()
        .default_policies(default_limits)
        .anonymous_policies(anonymous_limits)
        .clock(opts.limiter_clock);
    if let Some(backend) = opts.rate_backend {
        rate_config = rate_config.backend(backend);
    }
    let rate = RateLimitLayer::new(rate_config)?.with_gate(&gate);
    let quota =
        QuotaLayer::new(QuotaConfig::new(opts.usage).counting(opts.counting))?.with_gate(&gate);
    let handle = quota.handle();
    if config.grpc.is_some() && config.preset != preset::Preset::Qdrant {
        return Err("[grpc] is for the qdrant preset only".into());
    }
    let scopes = ScopeLayer::table(
        config
            .preset
            .scopes(&config.routes, config.grpc.is_some())?,
    );
    let grpc = match &config.grpc {
        Some(g) => Some(proxy::GrpcUpstream {
            upstream: g
                .url
                .parse()
                .map_err(|_| "the gRPC upstream URL cannot be read")?,
            max_message: g.max_message_bytes,
        }),
        None => None,
    };

    let upstream: http::Uri = config
        .upstream
        .url
        .parse()
        .map_err(|_| "the upstream URL cannot be read")?;
    let proxy = proxy::Proxy::new(
        proxy::ProxyConfig {
            upstream,
            credential: opts.credential,
            connect_timeout: config::duration(
                &config.upstream.connect_timeout,
                "upstream.connect_timeout",
            )?,
            timeout: config::duration(&config.upstream.timeout, "upstream.timeout")?,
            http2: config.upstream.http2,
            pool_max_idle: config.upstream.pool_max_idle,
            upstream_ca: match &config.upstream.ca_file {
                Some(path) => Some(
                    std::fs::read(path)
                        .map_err(|e| format!("cannot read upstream.ca_file {path}: {e}"))?,
                ),
                None => None,
            },
            max_body: config.limits.max_body_bytes,
            rewrite_cap: config.limits.rewrite_body_bytes,
            preset: config.preset,
            extra_routes: config.routes.clone(),
            tenant_field: config.tenant.payload_key.clone(),
            chroma_tenants: config.chroma.tenants.clone(),
            grpc,
        },
        gate.credentials(),
    )?;

    let stacked = ServiceBuilder::new()
        .layer(gate.audit_layer(opts.auditor))
        .layer(rate)
        .layer(
            gate.stack()
                .auth()
                .ip(&IpAllowLayer::new(IpPolicy::new()))
                .scope(&scopes)
                .quota(&quota),
        )
        .service(proxy.clone())
        .map_response(boxed);
    let stacked = BoxCloneSyncService::new(stacked);
    let open_paths = config.preset.open_paths();
    let console: Option<axum::Router> = config.console.enabled.then(|| {
        let api = keygate_admin::AdminApi::new(keys.clone())
            .gate(&gate)
            .quota(handle.clone());
        axum::Router::new().nest(
            "/console",
            keygate_admin::console::Console::new(api)
                .secure_cookies(config.console.secure_cookies)
                .router(),
        )
    });
    let front = tower::service_fn(move |req: Request<Incoming>| {
        let path = req.uri().path();
        let to_console = console.is_some() && (path == "/console" || path.starts_with("/console/"));
        let open = req.method() == http::Method::GET && open_paths.contains(&path);
        let stacked = stacked.clone();
        let proxy = proxy.clone();
        let console = console.clone();
        async move {
            if let (true, Some(console)) = (to_console, console) {
                let req = req.map(axum::body::Body::new);
                let res = match console.oneshot(req).await {
                    Ok(res) => res,
                    Err(never) => match never {},
                };
                Ok::<_, Infallible>(boxed(res))
            } else if open {
                Ok(boxed(proxy.forward_plain(req).await))
            } else {
                stacked.oneshot(req).await
            }
        }
    });
    Ok(Gateway {
        service: BoxCloneSyncService::new(front),
        gate,
        keys,
        quota: handle,
    })
}
