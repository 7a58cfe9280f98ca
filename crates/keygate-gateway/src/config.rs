//! The configuration file (`gateway.toml`).
//!
//! ```toml
//! listen = "127.0.0.1:6334"
//! preset = "qdrant"            # or "chroma"
//!
//! [upstream]
//! url = "http://127.0.0.1:6333"
//! credential_env = "QDRANT_API_KEY"   # or credential_file = "/run/secrets/qdrant-key"
//! # credential_header = "api-key"     # the preset's by default
//! connect_timeout = "2s"
//! timeout = "30s"
//!
//! [limits]
//! max_body_bytes = 33554432
//! rewrite_body_bytes = 8388608
//!
//! [tenant]
//! payload_key = "tenant"
//!
//! [grpc]                       # Qdrant's gRPC API too (qdrant preset only)
//! url = "http://127.0.0.1:6334"
//! max_message_bytes = 4194304
//!
//! [chroma]                     # the chroma preset: the Chroma tenants served
//! tenants = ["default_tenant"]
//!
//! [[routes]]                   # routes the preset does not know, allowed explicitly
//! method = "POST"
//! path = "/collections/{collection}/points/batch"
//! scope = "points:write"
//!
//! [[rate_limits]]              # for keys whose record has none
//! name = "default"
//! limit = 100
//! period = "1s"
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::preset::Preset;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The address to listen on (`HOST:PORT`); `--listen` overrides it.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Which upstream API the gateway speaks.
    pub preset: Preset,
    /// The upstream server.
    pub upstream: UpstreamConfig,
    /// Body sizes and connection limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Tenant row-level security.
    #[serde(default)]
    pub tenant: TenantConfig,
    /// Routes the preset does not list, allowed with a scope (every other unknown route is
    /// refused `404 unknown_route`).
    #[serde(default)]
    pub routes: Vec<ExtraRoute>,
    /// Rate limits of keys whose record has none (none: unlimited).
    #[serde(default)]
    pub rate_limits: Vec<RateLimitConfig>,
    /// Rate limits of requests without a valid key, per client address (default: 10 per
    /// second).
    #[serde(default = "default_anonymous")]
    pub anonymous_rate_limits: Vec<RateLimitConfig>,
    /// The key console in the browser, at `/console` (off by default).
    #[serde(default)]
    pub console: ConsoleConfig,
    /// gRPC pass-through (off without this section).
    #[serde(default)]
    pub grpc: Option<GrpcConfig>,
    /// The Chroma tenants the gateway serves (the `chroma` preset).
    #[serde(default)]
    pub chroma: ChromaConfig,
}

/// `[chroma]`: which of the Chroma server's tenants the gateway serves. A key's collection
/// patterns name Chroma *databases*; they do not say in which Chroma tenant. So the gateway
/// serves the tenants listed here and refuses every path under another one (`403
/// chroma_tenant_refused`): a key for database `db` reaches `db` in each listed tenant.
/// Keep one Chroma tenant per gateway (the default, Chroma's own `default_tenant`), or
/// give the databases of different Chroma tenants different names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChromaConfig {
    /// The Chroma tenants served (default: `["default_tenant"]`).
    #[serde(default = "default_chroma_tenants")]
    pub tenants: Vec<String>,
}

impl Default for ChromaConfig {
    fn default() -> Self {
        ChromaConfig {
            tenants: default_chroma_tenants(),
        }
    }
}

fn default_chroma_tenants() -> Vec<String> {
    vec!["default_tenant".to_owned()]
}

/// `[grpc]`: gRPC pass-through to the upstream's gRPC API (the `qdrant` preset; see
/// [`crate::grpc`]). gRPC requests on the gateway's listener (`content-type:
/// application/grpc`) go to `url` over HTTP/2, through the same layers as REST.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// The upstream's gRPC address: `http://HOST:PORT` (HTTP/2 without negotiation, h2c)
    /// or `https://HOST:PORT` (HTTP/2 by ALPN; `upstream.ca_file` applies). The upstream
    /// credential, timeouts and pool settings of `[upstream]` apply.
    pub url: String,
    /// The largest first message the gateway reads for the collection it names (default
    /// 4 MiB, gRPC's usual message limit): a larger one is refused 8 RESOURCE_EXHAUSTED.
    #[serde(default = "default_grpc_message")]
    pub max_message_bytes: u64,
}

fn default_grpc_message() -> u64 {
    4 << 20
}

/// `[console]`: the key console (`keygate_admin::console`) at `/console`, outside the
/// proxied routes, acting only through the admin API with the signed-in admin key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Serve it (default: no).
    #[serde(default)]
    pub enabled: bool,
    /// Mark its cookies `Secure` even over plain HTTP (behind a TLS-terminating proxy);
    /// over the gateway's own TLS they are anyway.
    #[serde(default)]
    pub secure_cookies: bool,
}

fn default_listen() -> String {
    "127.0.0.1:6334".to_owned()
}

fn default_anonymous() -> Vec<RateLimitConfig> {
    vec![RateLimitConfig {
        name: "anonymous".to_owned(),
        limit: 10,
        period: "1s".to_owned(),
    }]
}

/// `[upstream]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `https://HOST[:PORT]` or `http://HOST:PORT` (an optional path prefix is kept in
    /// front of every request path).
    pub url: String,
    /// The header carrying the upstream's own credential (default: the preset's, `api-key`
    /// for Qdrant, `x-chroma-token` for Chroma).
    #[serde(default)]
    pub credential_header: Option<String>,
    /// Written before the credential in its header, with a space (`Bearer` for an
    /// `authorization` header).
    #[serde(default)]
    pub credential_scheme: Option<String>,
    /// A file holding the upstream credential (one line; not readable by every user).
    #[serde(default)]
    pub credential_file: Option<String>,
    /// An environment variable holding the upstream credential.
    #[serde(default)]
    pub credential_env: Option<String>,
    /// How long connecting to the upstream may take (default 2 s).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: String,
    /// How long the upstream may take to answer a request's head (default 30 s).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Speak HTTP/2 to the upstream without negotiation (h2c; gRPC upstreams).
    #[serde(default)]
    pub http2: bool,
    /// Idle upstream connections kept per host (default 32).
    #[serde(default = "default_pool")]
    pub pool_max_idle: usize,
    /// For an `https://` upstream: PEM certificates to trust instead of the system's roots
    /// (a private CA, or the upstream's self-signed certificate).
    #[serde(default)]
    pub ca_file: Option<String>,
}

impl std::fmt::Debug for UpstreamConfig {
    // Names where the credential is, never the credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("url", &keygate::redact_url(&self.url))
            .field("credential_header", &self.credential_header)
            .field("credential_file", &self.credential_file)
            .field("credential_env", &self.credential_env)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("http2", &self.http2)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

fn default_connect_timeout() -> String {
    "2s".to_owned()
}

fn default_timeout() -> String {
    "30s".to_owned()
}

fn default_pool() -> usize {
    32
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest request body forwarded (default 32 MiB): a larger announced length is
    /// refused `413` before anything is read, a longer stream is cut.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// The largest body the gateway reads whole to rewrite or check it (tenant scoping,
    /// bodies naming other collections; default 8 MiB): a larger one is refused `413
    /// body_too_large`.
    #[serde(default = "default_rewrite_body")]
    pub rewrite_body_bytes: u64,
    /// Seconds a client has to send a request head (default 10).
    #[serde(default = "default_header_read")]
    pub header_read_timeout: String,
    /// The most client connections held at once (default 1,024).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: default_max_body(),
            rewrite_body_bytes: default_rewrite_body(),
            header_read_timeout: default_header_read(),
            max_connections: default_max_connections(),
        }
    }
}

fn default_max_body() -> u64 {
    32 << 20
}

fn default_rewrite_body() -> u64 {
    8 << 20
}

fn default_header_read() -> String {
    "10s".to_owned()
}

fn default_max_connections() -> usize {
    1024
}

/// `[tenant]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The payload (Qdrant) or metadata (Chroma) field naming a record's tenant (default
    /// `tenant`). Keys with a `tenant` attribute only ever see records whose field holds
    /// their tenant.
    #[serde(default = "default_payload_key")]
    pub payload_key: String,
}

impl Default for TenantConfig {
    fn default() -> Self {
        TenantConfig {
            payload_key: default_payload_key(),
        }
    }
}

fn default_payload_key() -> String {
    "tenant".to_owned()
}

/// One `[[routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRoute {
    /// `GET`, `POST`, ..., or `*`.
    pub method: String,
    /// A path pattern (`/collections/{collection}/points/batch`).
    pub path: String,
    /// The scope it needs.
    pub scope: String,
    /// Whether keys with a tenant may call it (default `false`: the gateway cannot scope an
    /// operation it does not know, so it refuses it to tenant keys).
    #[serde(default)]
    pub tenant_keys: bool,
}

/// One rate limit: `limit` requests per `period`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Its name (shown in `RateLimit-Policy`).
    pub name: String,
    /// Requests per period.
    pub limit: u32,
    /// The period (`1s`, `1m`).
    pub period: String,
}

impl RateLimitConfig {
    /// The policy.
    pub fn policy(&self) -> Result<keygate::RateLimitPolicy, ConfigError> {
        Ok(keygate::RateLimitPolicy::new(
            self.name.clone(),
            self.limit,
            duration(&self.period, "rate_limits.period")?,
        ))
    }
}

/// A configuration that cannot be used.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Parses a duration (`2s`, `500ms`, `1m`).
pub fn duration(text: &str, what: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(text)
        .map_err(|e| ConfigError(format!("{what}: {text:?} is not a duration: {e}")))
}

impl Config {
    /// Parses a configuration.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError(format!("the configuration: {e}")))
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// A configuration with the defaults, for `preset` in front of `upstream_url`.
    pub fn new(preset: Preset, upstream_url: &str) -> Config {
        Config {
            listen: default_listen(),
            preset,
            upstream: UpstreamConfig {
                url: upstream_url.to_owned(),
                credential_header: None,
                credential_scheme: None,
                credential_file: None,
                credential_env: None,
                connect_timeout: default_connect_timeout(),
                timeout: default_timeout(),
                http2: false,
                pool_max_idle: default_pool(),
                ca_file: None,
            },
            limits: LimitsConfig::default(),
            tenant: TenantConfig::default(),
            chroma: ChromaConfig::default(),
            routes: Vec::new(),
            rate_limits: Vec::new(),
            anonymous_rate_limits: default_anonymous(),
            console: ConsoleConfig::default(),
            grpc: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = Config::parse(
            r#"
            listen = "0.0.0.0:7000"
            preset = "chroma"
            [upstream]
            url = "http://127.0.0.1:8000"
            credential_env = "CHROMA_TOKEN"
            timeout = "5s"
            [limits]
            rewrite_body_bytes = 1024
            [tenant]
            payload_key = "org"
            [[routes]]
            method = "POST"
            path = "/api/v2/x"
            scope = "records:write"
            [[rate_limits]]
            name = "default"
            limit = 5
            period = "1s"
            "#,
        )
        .expect("parses");
        assert_eq!(c.preset, Preset::Chroma);
        assert_eq!(c.listen, "0.0.0.0:7000");
        assert_eq!(c.limits.rewrite_body_bytes, 1024);
        assert_eq!(c.limits.max_body_bytes, 32 << 20);
        assert_eq!(c.tenant.payload_key, "org");
        assert_eq!(c.routes.len(), 1);
        assert!(!c.routes[0].tenant_keys);
        assert_eq!(
            duration(&c.upstream.timeout, "t").expect("duration"),
            Duration::from_secs(5)
        );
        assert_eq!(c.rate_limits[0].policy().expect("policy").limit, 5);
    }

    #[test]
    fn the_readme_configuration_parses() {
        let readme = include_str!("../README.md");
        let section = readme
            .split("## Configuration")
            .nth(1)
            .expect("a Configuration section");
        let block = section
            .split("```toml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let c = Config::parse(block).expect("the README's configuration parses");
        assert_eq!(c.preset, Preset::Qdrant);
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.anonymous_rate_limits[0].limit, 10);
        duration(&c.limits.header_read_timeout, "x").expect("duration");
    }

    #[test]
    fn the_grpc_section_parses() {
        let c = Config::parse(
            "preset = \"qdrant\"\nupstream = { url = \"http://x:6333\" }\n[grpc]\nurl = \"http://x:6334\"",
        )
        .expect("parses");
        let g = c.grpc.expect("grpc");
        assert_eq!(g.url, "http://x:6334");
        assert_eq!(g.max_message_bytes, 4 << 20);
        assert!(
            Config::parse("preset = \"qdrant\"\nupstream = { url = \"http://x\" }")
                .expect("parses")
                .grpc
                .is_none()
        );
    }

    #[test]
    fn unknown_fields_and_presets_are_refused() {
        let e = Config::parse(
            "preset = \"qdrant\"\nupstream = { url = \"http://x\", tiemout = \"1s\" }",
        )
        .expect_err("typo");
        assert!(e.0.contains("tiemout"), "{e}");
        assert!(Config::parse("preset = \"pinecone\"\nupstream = { url = \"http://x\" }").is_err());
        assert!(duration("soon", "x").is_err());
    }

    #[test]
    fn debug_names_the_credential_source_not_the_url_password() {
        let mut c = Config::new(Preset::Qdrant, "http://user:hunter2@127.0.0.1:6333");
        c.upstream.credential_env = Some("QDRANT_API_KEY".into());
        let text = format!("{c:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("QDRANT_API_KEY"));
    }
}
