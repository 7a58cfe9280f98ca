//! `keygate-gateway --config gateway.toml`: keygate's layers in front of a vector database.
//!
//! - Keys live in the SQL store the `keygate` CLI manages: `--database-url` /
//!   `KEYGATE_DATABASE_URL` (`sqlite://FILE`, `postgres://...`; default
//!   `sqlite://keygate.db`), or a file naming it (`KEYGATE_DATABASE_URL_FILE`). Changes
//!   made by the CLI (a revocation) reach the gateway without a restart.
//! - `--redis-url` / `KEYGATE_REDIS_URL`: rate limits and quota counters shared by every
//!   replica, key changes announced through Redis.
//! - `--tls-cert` / `--tls-key` or `--tls-self-signed`: HTTPS (HTTP/1.1 and HTTP/2, chosen
//!   by ALPN; HTTP/2 in clear text by prior knowledge). SIGHUP reads the certificate files
//!   again: new connections get the new certificate, open ones keep theirs.
//! - Audit events go to a hash-chained JSON Lines log (`--audit-log`), keyed by
//!   `KEYGATE_AUDIT_KEY` / `KEYGATE_AUDIT_KEY_FILE` or a key file beside the log.
//! - `--metrics-listen ADDR`: Prometheus/OpenMetrics counters at `/metrics`, without a key.
//! - Every startup error is one `error: ...` line and exit code 1.

use std::path::PathBuf;
use std::sync::Arc;

use keygate::core::audit::{Auditor, ChainKey, FileSink, TeeSink};
use keygate::quota::Counting;
use keygate::redis::{
    Publishing, Redis, RedisOptions, RedisRateLimiter, RedisUsageStore, WatchOptions,
};
use keygate::sql::SqlStore;
use keygate::Verifier;
use keygate_gateway::config::Config;
use keygate_gateway::serve;
use keygate_showcase::secrets;

/// keygate's API-key layers in front of a vector database (Qdrant, Chroma).
#[derive(Debug, clap::Parser)]
#[command(name = "keygate-gateway", version)]
struct Args {
    /// The configuration file.
    #[arg(long, env = "KEYGATE_GATEWAY_CONFIG")]
    config: PathBuf,
    /// The address to listen on (overrides the file's `listen`); port 0 picks a free one.
    #[arg(long)]
    listen: Option<String>,
    /// The key database: `sqlite://FILE` or `postgres://...` [default: sqlite://keygate.db].
    /// A URL with a password belongs in the environment or in a file, not here.
    #[arg(long, env = "KEYGATE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A file holding the key database URL (one line).
    #[arg(long, env = "KEYGATE_DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    /// Redis, for several replicas (`redis://HOST:6379`).
    #[arg(long, env = "KEYGATE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// A file holding the Redis URL (one line).
    #[arg(long, env = "KEYGATE_REDIS_URL_FILE")]
    redis_url_file: Option<PathBuf>,
    /// The prefix of every Redis key this gateway writes.
    #[arg(long, env = "KEYGATE_REDIS_PREFIX", default_value = "keygate-gateway")]
    redis_prefix: String,
    /// The folder of the audit log (`keygate-gateway-audit-000001.jsonl`, ...).
    #[arg(long, default_value = ".")]
    audit_log: PathBuf,
    /// A PEM certificate chain for HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// HTTPS with a certificate made at start (local use; its fingerprint is printed).
    #[arg(long, conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// Serve Prometheus/OpenMetrics counters at `/metrics` without a key on this address
    /// (requests by decision and denial code, key lifecycle changes), for a scraper on a
    /// private network.
    #[arg(long)]
    metrics_listen: Option<String>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let args = <Args as clap::FromArgMatches>::from_arg_matches(&matches)?;
    let from_argv =
        |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    if let (Some(url), true) = (&args.database_url, from_argv("database_url")) {
        secrets::refuse_password_argument(url, "--database-url", "KEYGATE_DATABASE_URL")?;
    }
    if let (Some(url), true) = (&args.redis_url, from_argv("redis_url")) {
        secrets::refuse_password_argument(url, "--redis-url", "KEYGATE_REDIS_URL")?;
    }
    let config = Config::load(&args.config)?;
    let credential = keygate_gateway::load_credential(&config)?;
    let hasher = keygate::KeyHasher::from_env().map_err(|e| e.to_string())?;
    let database_url = secrets::url_from(
        args.database_url.clone(),
        args.database_url_file.as_deref(),
        "key database",
    )?
    .unwrap_or_else(|| "sqlite://keygate.db".to_owned());
    let redis_url = secrets::url_from(
        args.redis_url.clone(),
        args.redis_url_file.as_deref(),
        "Redis",
    )?;
    let listen = args.listen.clone().unwrap_or_else(|| config.listen.clone());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let metrics_listener = match &args.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = keygate_showcase::tls::Tls::from_files(cert, key)?.offer_http2();
            #[cfg(unix)]
            {
                // SIGHUP: read the certificate files again (open connections keep theirs).
                let tls = tls.clone();
                let mut hangups =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
                tokio::spawn(async move {
                    while hangups.recv().await.is_some() {
                        match tls.reload() {
                            Ok(fp) => println!("SIGHUP: certificate reloaded, SHA-256 {fp}"),
                            Err(e) => eprintln!(
                                "SIGHUP: certificate not reloaded, the current one stays: {e}"
                            ),
                        }
                    }
                });
            }
            Some(tls)
        }
        _ if args.tls_self_signed => {
            let (tls, _pem) = keygate_showcase::tls::Tls::self_signed(&[
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
            ])?;
            let tls = tls.offer_http2();
            println!(
                "self-signed TLS certificate, SHA-256 fingerprint {}",
                tls.fingerprint()
            );
            Some(tls)
        }
        _ => None,
    };

    let store = SqlStore::open(&database_url).await.map_err(|e| {
        format!(
            "cannot open the key database {}: {e}",
            secrets::redact(&database_url)
        )
    })?;
    store
        .register_scopes(&keygate::ScopeVocabulary::new(
            config
                .preset
                .scopes(&config.routes, config.grpc.is_some())?
                .scopes(),
        ))
        .await
        .map_err(|e| format!("cannot register the scope vocabulary: {e}"))?;
    store
        .check_pepper(&hasher)
        .await
        .map_err(|e| format!("{e} (KEYGATE_PEPPER or KEYGATE_PEPPER_FILE); not starting"))?;
    let redis = match &redis_url {
        Some(url) => Some(
            Redis::open_with(url, RedisOptions::new().prefix(args.redis_prefix.clone()))
                .await
                .map_err(|e| format!("cannot open Redis {}: {e}", secrets::redact(url)))?,
        ),
        None => None,
    };
    let verifier = match &redis {
        Some(r) => Verifier::builder(Publishing::new(store.clone(), r))
            .hasher(hasher)
            .build(),
        None => Verifier::builder(store.clone()).hasher(hasher).build(),
    };
    let follower = store.watch(&verifier).await?;
    let watcher = match &redis {
        Some(r) => Some(r.watch(&verifier, WatchOptions::new()).await),
        None => None,
    };

    std::fs::create_dir_all(&args.audit_log)
        .map_err(|e| format!("cannot create {}: {e}", args.audit_log.display()))?;
    let key = match ChainKey::from_env()? {
        Some(k) => k,
        None => ChainKey::load_or_create(args.audit_log.join("keygate-gateway-audit.key"))?.0,
    };
    let file = FileSink::builder(&args.audit_log)
        .stem("keygate-gateway-audit".to_owned())
        .key(key)
        .open()?;
    // Metrics count every event the auditor records.
    let metrics = keygate::metrics::Metrics::new();
    let auditor = Auditor::spawn(TeeSink::new(
        metrics.clone(),
        TeeSink::lifecycle(file, store.audit_sink()?),
    ))?;

    let limits = serve::ConnLimits {
        header_read_timeout: keygate_gateway::config::duration(
            &config.limits.header_read_timeout,
            "limits.header_read_timeout",
        )?,
        max_connections: config.limits.max_connections,
    };
    let preset = config.preset;
    let upstream = secrets::redact(&config.upstream.url);
    let grpc_upstream = config.grpc.as_ref().map(|g| secrets::redact(&g.url));
    let mut opts = keygate_gateway::Options::new(config, verifier, auditor.clone());
    opts.credential = credential;
    opts.usage = Arc::new(store.usage_store());
    if let Some(r) = &redis {
        opts.rate_backend = Some(Arc::new(RedisRateLimiter::new(r)));
        opts.usage = Arc::new(RedisUsageStore::new(r).durable(store.usage_store()));
        opts.counting = Counting::Strict;
    }
    let gateway = keygate_gateway::build(opts)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!(
        "keygate-gateway ({preset:?} preset) listening on {scheme}://{} in front of {upstream}",
        listener.local_addr()?
    );
    if let Some(g) = grpc_upstream {
        println!("gRPC (content-type application/grpc) forwarded to {g}");
    }
    println!(
        "keys: {} ({})",
        secrets::redact(&database_url),
        store.backend()
    );
    if let Some(l) = metrics_listener {
        println!(
            "metrics without a key on http://{}/metrics",
            l.local_addr()?
        );
        tokio::spawn(serve::serve_metrics(l, metrics));
    }
    println!("ready");

    serve::serve(listener, gateway.service, limits, tls, shutdown_signal()).await?;

    println!("shutting down: flushing quota usage and the audit log");
    if let Err(e) = gateway.quota.flush().await {
        eprintln!("quota usage flush failed: {e}");
    }
    follower.shutdown().await;
    if let Some(w) = watcher {
        w.shutdown().await;
    }
    let stats = auditor.shutdown().await;
    store.close().await;
    println!(
        "audit: {} events written, {} dropped",
        stats.written, stats.dropped
    );
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
