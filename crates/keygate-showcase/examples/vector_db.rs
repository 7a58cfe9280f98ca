//! The keygate showcase: a vector database speaking a subset of Qdrant's REST API, behind
//! all six keygate layers, with the admin API at `/admin`. Walk-through: `docs/WALKTHROUGH.md`.
//!
//! ```text
//! cargo run --release --example vector_db
//! cargo run --release --example vector_db -- --listen 0.0.0.0:6333 --audit-log /var/log/keygate/audit.jsonl
//! KEYGATE_DATABASE_URL=postgres://user@host/db cargo run --release --example vector_db
//! ```
//!
//! - Keys live in SQLite `keygate.db` (created if missing) or wherever
//!   `KEYGATE_DATABASE_URL` / `--database-url` points (`sqlite://...`, `postgres://...`).
//!   The server follows the database's change sequence, so keys created, revoked or disabled
//!   by the `keygate` CLI (or another replica) take effect here without a restart.
//! - On first start, with no key in the database, it issues an admin key (`*` on every
//!   collection) and writes it to `keygate-admin.key` (`--admin-key-file`; created
//!   owner-only, never overwritten); it prints the key too only when standard output is a
//!   terminal. URLs with passwords belong in the environment or in a file
//!   (`KEYGATE_DATABASE_URL_FILE`, `KEYGATE_REDIS_URL_FILE`), not on the command line.
//! - HTTPS: `--tls-cert cert.pem --tls-key key.pem` (PEM; read again on SIGHUP: new
//!   connections get the new certificate, open ones are not dropped, a failed reload keeps
//!   the old one), or `--tls-self-signed` (a certificate made at start for local use; its
//!   SHA-256 fingerprint is printed). Requests served over TLS carry
//!   `keygate::transport::TlsConnection`. `--require-tls` refuses a key sent in the clear
//!   from off this host (403 `insecure_transport`, audited as `exposed`);
//!   `--disable-exposed-keys` also disables it.
//! - Metrics: `GET /metrics` (Prometheus/OpenMetrics text, scope `metrics:read`): requests
//!   by decision and denial code, key lifecycle changes; `--metrics-listen ADDR` also
//!   serves it without a key on a listener of its own.
//! - Short-lived tokens: `POST /auth/token` (any valid key; JSON body `scopes`,
//!   `collections`, `ttl`, `subject`, all optional) answers a signed token (EdDSA JWT,
//!   15 minutes by default, at most `--token-max-ttl`) that every route accepts in the
//!   key's place, narrowed; `GET /.well-known/jwks.json` publishes the public keys. Signing
//!   keys from `--token-keys-file` / `KEYGATE_TOKEN_KEYS_FILE` or `KEYGATE_TOKEN_KEYS`;
//!   with neither, a key made at start (said on stderr).
//!   by decision and denial code, rate-limit and quota refusals by policy, key lifecycle
//!   changes, anomalies, verifier cache lookups, audit events and queue depth, request and
//!   stack-time histograms; `--metrics-listen ADDR` also serves it without a key on a
//!   listener of its own.
//! - Last use: each key's last-used time (to the minute) is written to the key database
//!   every `--last-used-every` seconds (30) and at shutdown; `keygate keys list` shows it.
//! - Rotation notices: `--max-key-age 90d` and `--expiry-warning 14d`: a key due for
//!   rotation or about to expire keeps working and answers with `Deprecation` and `Sunset`;
//!   a sweep every `--notices-every` seconds records a `rotation_due` / `expiring` audit
//!   event per due key (once a day), POSTed to `--notice-webhook URL` too when given
//!   (`https://` over the system's roots, or `--notice-webhook-ca PEM`).
//! - Connections: `--header-read-timeout` (10 s), `--idle-timeout` (60 s) and
//!   `--max-connections` (1,024) bound what slow or idle clients can hold.
//! - Audit events go to a hash-chained JSON Lines log: `--audit-log keygate-audit.jsonl`
//!   writes `keygate-audit-000001.jsonl`, `keygate-audit-000002.jsonl`, ... (one file per
//!   start; each continues the chain of the one before), anchored by
//!   `keygate-audit.checkpoint` and keyed by the secret in `KEYGATE_AUDIT_KEY` /
//!   `KEYGATE_AUDIT_KEY_FILE`, else in `keygate-audit.key` beside the log (created on first
//!   start). Key changes also go to the database's audit table, where the CLI's go too.
//!   Repeated denials without a key from one source are folded into one event per
//!   `--audit-window`. Verify with `keygate audit verify .`. A directory (`--audit-log
//!   logs/`, or one that exists) holds `keygate-audit-000001.jsonl`, ...
//!   Every start also prints the `keygate` CLI command that makes another admin key (for
//!   when it is lost): `keygate keys create --name admin --scope '*' --collection '*'`
//!   against the same database.
//! - `--listen HOST:PORT` takes an address or a host name (`localhost:6333`). The address
//!   is bound before anything else: a busy port is one line, `error: cannot listen on ADDR:
//!   address in use`, exit code 1, and no database or audit folder is created. Every
//!   startup error is one `error: ...` line on stderr and exit code 1.
//! - Warnings go to stderr, coloured only when stderr is a terminal.
//! - Ctrl-C or SIGTERM: stop accepting, let in-flight requests finish, flush quota usage,
//!   then drain and fsync the audit log.
//!
//! - Quota usage is counted in the same database (`keygate usage ID` reads it), in batches
//!   flushed every second and at shutdown.
//! - Several replicas: give each the same PostgreSQL `KEYGATE_DATABASE_URL` and
//!   `KEYGATE_REDIS_URL` (`--redis-url`). Rate limits and quotas are then counted in Redis
//!   (one atomic script per request, shared by the replicas; `GET /admin/keys/{id}/usage`
//!   reads them; quota usage is written through to the key database too, so a Redis flush
//!   or restart resets nothing), and key changes are announced through Redis pub/sub.
//!
//! - Pepper: `KEYGATE_PEPPER`, or `KEYGATE_PEPPER_FILE` naming an owner-only file (mode
//!   600), hashes keys with a server-side secret; the CLI must be given the same one. The
//!   database records the pepper's fingerprint at first start and the server refuses to
//!   start with another pepper (or without one, if it was started with one).
//!
//! Vectors are kept in memory and lost at exit.

// The server itself is the `keygate-showcase` library, which its tests (`tests/*.rs`) use too.
use keygate_showcase as server;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keygate::core::audit::{
    AggregateSink, AnomalyConfig, AnomalySink, Auditor, ChainKey, FileSink, TeeSink,
};
use keygate::quota::Counting;
use keygate::redis::{
    LeaseOptions, Publishing, Redis, RedisOptions, RedisRateLimiter, RedisUsageStore, WatchOptions,
};
use keygate::sql::SqlStore;
use keygate::{KeyFilter, KeySpec, Verifier};

/// A vector database (a subset of Qdrant's REST API) behind keygate.
/// How shared limits are decided (`--redis-limits`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RedisLimits {
    /// Leased allowances, small limits precise.
    Leased,
    /// One script per request.
    Precise,
}

#[derive(Debug, clap::Parser)]
#[command(name = "vector_db", version)]
struct Args {
    /// The address to listen on: `HOST:PORT`, the host an IP address or a name to resolve
    /// (`localhost:6333`); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:6333")]
    listen: String,
    /// The key database: `sqlite://FILE` (created if missing) or `postgres://...` [default:
    /// sqlite://keygate.db]. A URL with a password belongs in the environment or in a file
    /// (`KEYGATE_DATABASE_URL_FILE`), not on the command line, where `ps` shows it.
    #[arg(long, env = "KEYGATE_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// A file holding the key database URL (one line), instead of `--database-url`.
    #[arg(long, env = "KEYGATE_DATABASE_URL_FILE")]
    database_url_file: Option<PathBuf>,
    /// The audit log: `DIR/NAME.jsonl` writes `DIR/NAME-000001.jsonl`, ... (one file per
    /// start, one hash chain across them); a directory (`logs/`, or an existing one) writes
    /// `keygate-audit-000001.jsonl`, ... in it.
    #[arg(long, default_value = "keygate-audit.jsonl")]
    audit_log: PathBuf,
    /// Repeated denials without a key from one client, code and route are folded into one
    /// audit event per window of this many seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    audit_window: u64,
    /// Keys' last-used times (to the minute, shown by `keygate keys list`) are marked in
    /// memory and written to the key database every this many seconds, and at shutdown.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    last_used_every: u64,
    /// Redis, for several replicas: rate limits and quota counters shared by every replica,
    /// and key changes announced to all of them (`redis://HOST:6379`). Unset: limits and
    /// quota counting are per process (quota usage flushed to the key database). A URL with
    /// a password belongs in the environment or in a file (`KEYGATE_REDIS_URL_FILE`).
    #[arg(long, env = "KEYGATE_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// How shared limits are decided with `--redis-url`: `leased` (default) reserves a slice
    /// of a busy key's allowance in Redis and spends it locally (no round trip for most
    /// requests; never more than the limit across replicas, a bounded under-use), keeping
    /// small limits precise; `precise` makes one Redis script per request for every limit.
    #[arg(long, env = "KEYGATE_REDIS_LIMITS", value_enum, default_value_t = RedisLimits::Leased)]
    redis_limits: RedisLimits,
    /// A file holding the Redis URL (one line), instead of `--redis-url`.
    #[arg(long, env = "KEYGATE_REDIS_URL_FILE")]
    redis_url_file: Option<PathBuf>,
    /// Where the first start writes the admin key it issues (created owner-only; an
    /// existing file is never overwritten). The key is also printed when standard output
    /// is a terminal.
    #[arg(long, default_value = "keygate-admin.key")]
    admin_key_file: PathBuf,
    /// The prefix of every Redis key this server writes (replicas of one service share it).
    #[arg(long, env = "KEYGATE_REDIS_PREFIX", default_value = "keygate")]
    redis_prefix: String,
    /// Seconds a client has to send a request's head (counted from when the connection
    /// waits for it, so it also closes idle kept-alive connections and slow-header clients).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    header_read_timeout: u64,
    /// Seconds a connection may go without a byte read or written before it is closed (a
    /// trickled body, a client that stopped reading).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    idle_timeout: u64,
    /// The most connections held at once; more wait in the listen backlog until one closes.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    max_connections: u64,
    /// Serve HTTPS with this PEM certificate chain (the server's certificate first); needs
    /// `--tls-key`. Both files are read again on SIGHUP: new connections get the new
    /// certificate, open ones are not dropped.
    #[arg(long, requires = "tls_key", conflicts_with = "tls_self_signed")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of `--tls-cert` (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a certificate made at start (for `localhost`, 127.0.0.1, ::1 and the
    /// `--listen` host), for local use; its SHA-256 fingerprint is printed.
    #[arg(long)]
    tls_self_signed: bool,
    /// Refuse a key sent without TLS from a peer off this host (403 `insecure_transport`)
    /// and record it as exposed in the audit log.
    #[arg(long)]
    require_tls: bool,
    /// With `--require-tls`: also disable each key refused that way, at once.
    #[arg(long, requires = "require_tls")]
    disable_exposed_keys: bool,
    /// Keys older than this (`90d`, `12h`) are due for rotation: they keep working, and
    /// their responses carry `Deprecation` (RFC 9745) and, if they expire, `Sunset`
    /// (RFC 8594).
    #[arg(long, value_parser = parse_age)]
    max_key_age: Option<std::time::Duration>,
    /// Keys expiring within this window (`14d`) get the same fields.
    #[arg(long, value_parser = parse_age)]
    expiry_warning: Option<std::time::Duration>,
    /// Every this many seconds, a sweep of the keys records a `rotation_due` or `expiring`
    /// audit event (and metric) for each key past its maximum age (`--max-key-age`, or a
    /// key's, role's or identity's `max_key_age`) or inside `--expiry-warning`; once per
    /// key and day.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    notices_every: u64,
    /// Also POST each notice as JSON to this `https://` (or `http://`) URL (retried 4 times
    /// with backoff; never with a key in the body).
    #[arg(long)]
    notice_webhook: Option<String>,
    /// PEM certificates to trust for an `https://` --notice-webhook instead of the system's
    /// roots (a private CA, or the receiver's self-signed certificate).
    #[arg(long, value_name = "PEM", requires = "notice_webhook")]
    notice_webhook_ca: Option<PathBuf>,
    /// Also send the legacy `X-RateLimit-Limit`, `-Remaining` and `-Reset` fields (the
    /// tightest policy) beside the IETF `RateLimit` fields.
    #[arg(long)]
    legacy_ratelimit_headers: bool,
    /// Also serve `/metrics` without a key on this address (`127.0.0.1:9464`): for a
    /// scraper on a private network. On the main listener it needs `metrics:read`.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Take GitHub secret-scanning reports at `POST /leaks/github`, signed by the keys in
    /// this file (the JSON GitHub publishes, saved: nothing is fetched). Each reported key
    /// that is one of ours gets `--leak-policy` and an `exposed` audit event.
    #[arg(long)]
    leak_public_keys: Option<PathBuf>,
    /// What a reported leaked key gets: `revoke`, `disable` or `report-only`.
    #[arg(long, default_value = "revoke", requires = "leak_public_keys")]
    leak_policy: keygate_admin::leak::LeakPolicy,
    /// The Ed25519 keys short-lived tokens are signed with (PEM `PRIVATE KEY` blocks or a
    /// JWK set; the last key signs, all verify; owner-only file). The keys themselves may
    /// be in `KEYGATE_TOKEN_KEYS` instead. With neither, a key is made at start (tokens then
    /// die with the process and no other replica accepts them).
    #[arg(long, env = "KEYGATE_TOKEN_KEYS_FILE")]
    token_keys_file: Option<PathBuf>,
    /// The longest time to live of a token (`1h`); requests asking more get this.
    #[arg(long, value_parser = parse_age, default_value = "1h")]
    token_max_ttl: std::time::Duration,
}

/// The token signing keys: `--token-keys-file` / `KEYGATE_TOKEN_KEYS_FILE`, or the keys
/// in `KEYGATE_TOKEN_KEYS`, or (with neither) one made at start, said on stderr.
fn token_keys(args: &Args) -> Result<keygate::token::SigningKeys, String> {
    use keygate::token::{SigningKeys, TOKEN_KEYS_ENV};
    let direct = std::env::var_os(TOKEN_KEYS_ENV).filter(|v| !v.is_empty());
    match (&args.token_keys_file, direct) {
        (Some(_), Some(_)) => Err(format!(
            "the token signing keys are given both in {TOKEN_KEYS_ENV} and in a file: give one"
        )),
        (Some(path), None) => SigningKeys::from_file(path).map_err(|e| e.to_string()),
        (None, Some(_)) => match SigningKeys::from_env() {
            Ok(Some(keys)) => Ok(keys),
            Ok(None) => Err(format!("{TOKEN_KEYS_ENV} is empty")),
            Err(e) => Err(e.to_string()),
        },
        (None, None) => {
            let keys = SigningKeys::generate().map_err(|e| e.to_string())?;
            eprintln!(
                "warning: no token signing keys given (KEYGATE_TOKEN_KEYS_FILE or {TOKEN_KEYS_ENV}): \
                 tokens from POST /auth/token are signed with a key made at start (kid {}); \
                 they stop working at restart and other replicas refuse them",
                keys.kids().last().unwrap_or_default()
            );
            Ok(keys)
        }
    }
}

/// A duration as the CLI writes them (`90d`, `12h`, `30m`).
fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    keygate::core::time::parse_duration(text).map_err(|e| e.to_string())
}

/// The file stem of the audit log when `--audit-log` names a directory.
const DEFAULT_AUDIT_STEM: &str = "keygate-audit";

/// The directory and file stem of the audit log named `path`: a path ending in `/`, or
/// naming an existing directory, means the default stem in that directory.
fn audit_location(path: &Path) -> Result<(PathBuf, String), String> {
    let text = path.as_os_str().to_string_lossy();
    if text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) || path.is_dir() {
        return Ok((path.to_path_buf(), DEFAULT_AUDIT_STEM.to_owned()));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("--audit-log {path:?}: not a file name"))?;
    let stem = name.strip_suffix(".jsonl").unwrap_or(name);
    if stem.is_empty()
        || !stem
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
    {
        return Err(format!(
            "--audit-log {path:?}: the file name may use letters, digits, _, - and . only"
        ));
    }
    Ok((dir, stem.to_owned()))
}

/// The TLS settings the flags ask for: `--tls-cert`/`--tls-key`, `--tls-self-signed`, or
/// none (plain HTTP).
fn tls_from(args: &Args) -> Result<Option<server::tls::Tls>, String> {
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return server::tls::Tls::from_files(cert, key).map(Some);
    }
    if !args.tls_self_signed {
        return Ok(None);
    }
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    // The --listen host too (a name or an address; an IPv6 one is in brackets).
    if let Some((host, _port)) = args.listen.rsplit_once(':') {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if !host.is_empty() && !names.iter().any(|n| n == host) {
            names.push(host.to_owned());
        }
    }
    server::tls::Tls::self_signed(&names).map(|(tls, _pem)| Some(tls))
}

/// Reloads the certificate and key files on every SIGHUP; a failed reload keeps the
/// certificate in use and says why on stderr. The handler is installed when this is called
/// (before `ready`), so an early SIGHUP does not end the process.
fn reload_on_sighup(tls: server::tls::Tls) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) = hup else {
                eprintln!(
                    "warning: cannot listen for SIGHUP: the certificate will not be reloaded"
                );
                return;
            };
            while hup.recv().await.is_some() {
                match tls.reload() {
                    Ok(fp) => println!("TLS certificate reloaded; SHA-256 fingerprint: {fp}"),
                    Err(e) => {
                        eprintln!("warning: TLS reload failed, keeping the certificate in use: {e}")
                    }
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tls;
    }
}

/// Resolves on Ctrl-C or SIGTERM. The SIGTERM handler is installed when this is called
/// (before `ready` is printed), not when the future is first polled, so a SIGTERM sent
/// right after `ready` is a graceful shutdown rather than the default (immediate) exit.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async move {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => {},
            () = term => {},
        }
    }
}

use server::secrets::redact;
/// `text` as one shell word: as it is when it holds only safe characters, else in single
/// quotes.
fn shell_word(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        text.to_owned()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Binds the listener, before anything is created, so a busy port or a bad address is
/// said at once (with the address) and leaves no database or audit folder behind.
async fn listen(addr: &str) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => "address in use".to_owned(),
            std::io::ErrorKind::AddrNotAvailable => "address not available on this host".to_owned(),
            std::io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
            _ => e.to_string(),
        };
        format!("cannot listen on {addr}: {why}")
    })
}

/// Runs the server; an error is printed as one `error: ...` line on stderr, exit code 1.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    {
        use std::io::IsTerminal;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        // sqlx warns about connection parameters it does not know with their values
        // (`?sslpassword=...`): that target stays silent, so no password reaches the log.
        let targets = tracing_subscriber::filter::Targets::new()
            .with_default(tracing::Level::WARN)
            .with_target(
                "sqlx_postgres::options",
                tracing_subscriber::filter::LevelFilter::OFF,
            );
        // Colours only on a terminal: piped into a file, the log stays plain text.
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr)
                    .with_filter(targets),
            )
            .init();
    }
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let args = <Args as clap::FromArgMatches>::from_arg_matches(&matches)?;
    // Passwords never from the command line (`ps` shows arguments to every user).
    let from_argv =
        |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
    if let (Some(url), true) = (&args.database_url, from_argv("database_url")) {
        server::secrets::refuse_password_argument(url, "--database-url", "KEYGATE_DATABASE_URL")?;
    }
    if let (Some(url), true) = (&args.redis_url, from_argv("redis_url")) {
        server::secrets::refuse_password_argument(url, "--redis-url", "KEYGATE_REDIS_URL")?;
    }
    let (audit_dir, audit_stem) = audit_location(&args.audit_log)?;
    // The pepper (KEYGATE_PEPPER or an owner-only KEYGATE_PEPPER_FILE), checked against
    // the fingerprint the database recorded at first use once the store is open.
    let hasher = keygate::KeyHasher::from_env().map_err(|e| e.to_string())?;
    let database_url = server::secrets::url_from(
        args.database_url.clone(),
        args.database_url_file.as_deref(),
        "key database",
    )?
    .unwrap_or_else(|| "sqlite://keygate.db".to_owned());
    let redis_url = server::secrets::url_from(
        args.redis_url.clone(),
        args.redis_url_file.as_deref(),
        "Redis",
    )?;
    let listener = listen(&args.listen).await?;
    let metrics_listener = match &args.metrics_listen {
        Some(addr) => Some(listen(addr).await?),
        None => None,
    };
    // TLS before anything is created, so a bad certificate leaves nothing behind.
    let tls = tls_from(&args)?;
    // The token signing keys likewise (after the address is bound, before any file).
    let token_keys = token_keys(&args)?;

    // Keys: the SQL store, followed so changes made elsewhere reach this server's cache.
    let store = SqlStore::open(&database_url).await.map_err(|e| {
        format!(
            "cannot open the key database {}: {e}",
            redact(&database_url)
        )
    })?;
    // The route table's scopes, so `keygate keys create` refuses a typo in a scope.
    store
        .register_scopes(&keygate::ScopeVocabulary::new(server::routes()?.scopes()))
        .await
        .map_err(|e| format!("cannot register the scope vocabulary: {e}"))?;
    // With Redis: key writes made here are announced to every replica at once (the SQL
    // follower still catches writes made elsewhere, e.g. by the CLI), and rate limits and
    // quotas are counted in Redis, shared by the replicas.
    let redis = match &redis_url {
        Some(url) => Some(
            Redis::open_with(url, RedisOptions::new().prefix(args.redis_prefix.clone()))
                .await
                .map_err(|e| format!("cannot open Redis {}: {e}", redact(url)))?,
        ),
        None => None,
    };
    store
        .check_pepper(&hasher)
        .await
        .map_err(|e| format!("{e} (KEYGATE_PEPPER or KEYGATE_PEPPER_FILE); not starting"))?;
    let verifier = match &redis {
        Some(r) => Verifier::builder(Publishing::new(store.clone(), r))
            .hasher(hasher)
            .build(),
        None => Verifier::builder(store.clone()).hasher(hasher).build(),
    };
    let follower = store.watch(&verifier).await?;
    let last_used = verifier.clone();
    let last_used_flusher =
        last_used.spawn_last_used_flusher(std::time::Duration::from_secs(args.last_used_every));
    let watcher = match &redis {
        Some(r) => Some(r.watch(&verifier, WatchOptions::new()).await),
        None => None,
    };
    // A Redis restart that brought back an older snapshot starts a new epoch: quotas are
    // re-seeded from the database, rate limits hold (a flush is noticed by every call).
    let _restarts = redis
        .as_ref()
        .map(|r| r.detect_restarts(std::time::Duration::from_secs(1)));

    // Audit: the hash-chained file log, written off the request path, with key changes also
    // in the database's audit table (where the CLI records its own).
    let key = match ChainKey::from_env()? {
        Some(k) => k,
        None => ChainKey::load_or_create(audit_dir.join(format!("{audit_stem}.key")))?.0,
    };
    // The console's audit page verifies this chain with the same key.
    let console_chain = keygate_admin::console::ChainCheck::new(
        &audit_dir,
        audit_stem.clone(),
        keygate::core::audit::VerifyOptions {
            key: key.clone(),
            ..Default::default()
        },
    );
    let file = FileSink::builder(&audit_dir)
        .stem(audit_stem.clone())
        .key(key)
        .open()?;
    let sink = AggregateSink::new(TeeSink::lifecycle(file, store.audit_sink()?))
        .window(std::time::Duration::from_secs(args.audit_window));
    // Metrics count every event before denials are folded into summaries. The anomaly
    // detectors see every event first (bounded memory, on the writer thread) and write
    // their signals into the same chain, where the metrics count them too.
    let metrics = keygate::metrics::Metrics::new();
    // The console (`/console`) shows the newest events, every one before aggregation.
    let recent = keygate_admin::console::RecentEvents::new(10_000);
    let auditor = Auditor::spawn(AnomalySink::new(
        AnomalyConfig::default(),
        TeeSink::new(metrics.clone(), TeeSink::new(recent.clone(), sink)),
    ))?;

    // Quota counters in the same database (batched, flushed every second and at shutdown),
    // where `keygate usage` reads them.
    // Verifier lookups and the audit queue are read at each scrape.
    metrics.observe_verifier(&verifier);
    metrics.observe_auditor(&auditor);
    let mut opts = server::Options::new(verifier, auditor.clone());
    opts.require_tls = args.require_tls;
    opts.disable_exposed = args.disable_exposed_keys;
    opts.max_key_age = args.max_key_age;
    opts.metrics = Some(metrics.clone());
    opts.expiry_warning = args.expiry_warning;
    opts.console_events = Some(recent);
    opts.console_chain = Some(console_chain);
    opts.legacy_ratelimit_headers = args.legacy_ratelimit_headers;
    if let Some(path) = &args.leak_public_keys {
        opts.leak_public_keys = Some(
            keygate_admin::leak::PublicKeys::from_file(path)
                .map_err(|e| format!("--leak-public-keys {}: {e}", path.display()))?,
        );
        opts.leak_policy = args.leak_policy;
    }
    opts.tokens = Some(
        keygate::token::Tokens::builder(token_keys)
            .max_ttl(args.token_max_ttl)
            .build(),
    );
    opts.usage = Arc::new(store.usage_store());
    let leased = args.redis_limits == RedisLimits::Leased;
    let mut shared_limits: Option<(RedisRateLimiter, RedisRateLimiter, RedisUsageStore)> = None;
    if let Some(r) = &redis {
        let limiter = |redis: &Redis| {
            let l = RedisRateLimiter::new(redis);
            if leased {
                l.leased(LeaseOptions::new())
            } else {
                l
            }
        };
        let rate = limiter(r);
        opts.rate_backend = Some(Arc::new(rate.clone()));
        // The bytes limit uses the same policy names: its counters live under a prefix of
        // their own.
        let bytes = Redis::open_with(
            redis_url.as_deref().unwrap_or_default(),
            RedisOptions::new().prefix(format!("{}-bytes", args.redis_prefix)),
        )
        .await
        .map_err(|e| format!("cannot open Redis: {e}"))?;
        let bytes_rate = limiter(&bytes);
        opts.bytes_rate_backend = Some(Arc::new(bytes_rate.clone()));
        // Strict: every request is one atomic check-and-add in Redis (or spends a lease
        // reserved there), so replicas cannot overshoot a quota together; written through to
        // the database, so losing Redis's data resets no quota (windows are re-seeded from it).
        let mut usage = RedisUsageStore::new(r).durable(store.usage_store());
        if leased {
            usage = usage.leased(LeaseOptions::for_quotas());
        }
        opts.usage = Arc::new(usage.clone());
        opts.counting = Counting::Strict;
        shared_limits = Some((rate, bytes_rate, usage));
    }
    let mut sweep =
        keygate::notices::NoticeSweep::new(Arc::new(store.clone()), Arc::new(keygate::SystemClock))
            .auditor(auditor.clone());
    if let Some(age) = args.max_key_age {
        sweep = sweep.max_age(age);
    }
    if let Some(window) = args.expiry_warning {
        sweep = sweep.warn_before_expiry(window);
    }
    if let Some(url) = &args.notice_webhook {
        let hook = match &args.notice_webhook_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| {
                    format!("--notice-webhook-ca: cannot read {}: {e}", ca.display())
                })?;
                keygate::notices::Webhook::trusting_pem(url, &pem)
            }
            None => keygate::notices::Webhook::new(url),
        };
        sweep = sweep.webhook(hook.map_err(|e| format!("--notice-webhook: {e}"))?);
    }
    let app = server::build(opts)?;

    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("keygate vector_db listening on {scheme}://{addr}");
    if let Some(tls) = &tls {
        println!("TLS certificate SHA-256 fingerprint: {}", tls.fingerprint());
        if args.tls_cert.is_some() {
            println!("SIGHUP reloads the certificate and key files");
        }
    }
    println!("keys: {} ({})", redact(&database_url), store.backend());
    println!(
        "audit log: {}",
        audit_dir
            .join(format!("{audit_stem}-NNNNNN.jsonl"))
            .display()
    );
    if let Some(url) = &redis_url {
        println!(
            "limits, quotas and key changes shared through {} (prefix {})",
            redact(url),
            args.redis_prefix
        );
    }

    if app.keys.list(&KeyFilter::default()).await?.is_empty() {
        // The file first: if it cannot be made, no key is issued.
        let file = server::secrets::SecretFile::create(&args.admin_key_file)?;
        let spec = KeySpec::new("admin")
            .owner("vector_db")
            .scope("*")
            .resource("*");
        let issued = match app.keys.issue("vector_db", spec).await {
            Ok(issued) => issued,
            Err(e) => {
                file.discard();
                return Err(e.into());
            }
        };
        let path = file.path().display().to_string();
        file.write(issued.key.expose_secret())?;
        println!("no keys yet: created an admin key (scope *, every collection).");
        println!("admin key written to {path} (owner-only)");
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            println!(
                "admin key (shown once, store it now): {}",
                issued.key.expose_secret()
            );
        }
        eprintln!(
            "warning: keygate keeps only the key's digest: move the key from {path} to where you keep secrets, then delete the file"
        );
    }
    println!(
        "another admin key (if this one is lost): keygate --database-url {} keys create --name admin --scope '*' --collection '*'",
        shell_word(&redact(&database_url))
    );
    if let Some(l) = metrics_listener {
        println!(
            "metrics without a key on http://{}/metrics",
            l.local_addr()?
        );
        let router = metrics.router::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(l, router).await;
        });
    }
    let shutdown = shutdown_signal();
    // Only files can be reloaded (a self-signed certificate has none).
    let reloads = match (&tls, &args.tls_cert) {
        (Some(tls), Some(_)) => Some(tokio::spawn(reload_on_sighup(tls.clone()))),
        _ => None,
    };
    let notices = sweep.spawn(std::time::Duration::from_secs(args.notices_every));
    println!("ready");

    let limits = server::serve::ConnLimits {
        header_read_timeout: std::time::Duration::from_secs(args.header_read_timeout),
        idle_timeout: std::time::Duration::from_secs(args.idle_timeout),
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
    };
    match tls {
        Some(tls) => {
            server::serve::serve_tls(listener, app.router, limits, shutdown, None, tls).await?
        }
        None => server::serve::serve(listener, app.router, limits, shutdown, None).await?,
    }

    if let Some(r) = reloads {
        r.abort();
    }
    notices.abort();
    // In-flight requests are done: flush what they counted and recorded.
    println!("shutting down: flushing quota usage, last-used times and the audit log");
    if let Err(e) = app.quota.flush().await {
        eprintln!("quota usage flush failed: {e}");
    }
    if let Some((rate, bytes_rate, usage)) = &shared_limits {
        // Leases: what they served is reported, what they did not spend goes back.
        rate.release_leases().await;
        bytes_rate.release_leases().await;
        usage.release_leases().await;
    }
    last_used_flusher.abort();
    if let Err(e) = last_used.flush_last_used().await {
        eprintln!("last-used times flush failed: {e}");
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
