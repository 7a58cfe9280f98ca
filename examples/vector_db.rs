//! The keygate showcase: a vector database speaking a subset of Qdrant's REST API, behind
//! all six keygate layers, with the admin API at `/admin`. Walk-through: `docs/WALKTHROUGH.md`.
//!
//! ```text
//! cargo run --release --example vector_db --all-features
//! cargo run --release --example vector_db --all-features -- --listen 0.0.0.0:6333 --audit-log /var/log/keygate/audit.jsonl
//! KEYGATE_DATABASE_URL=postgres://user@host/db cargo run --release --example vector_db --all-features
//! ```
//!
//! - Keys live in SQLite `keygate.db` (created if missing) or wherever
//!   `KEYGATE_DATABASE_URL` / `--database-url` points (`sqlite://...`, `postgres://...`).
//!   The server follows the database's change sequence, so keys created, revoked or disabled
//!   by the `keygate` CLI (or another replica) take effect here without a restart.
//! - On first start, with no key in the database, it issues an admin key (`*` on every
//!   collection) and prints it once.
//!   Every start also prints the `keygate` CLI command that makes another one (for when it
//!   is lost): `keygate --database-url URL keys create --name admin --scope '*'
//!   --collection '*'`.
//! - `--listen HOST:PORT` takes an address or a host name (`localhost:6333`). The address
//!   is bound before anything else: a busy port is one line, `error: cannot listen on ADDR:
//!   address in use`, exit code 1, and no database or audit folder is created. Every
//!   startup error is one `error: ...` line on stderr and exit code 1.
//! - Audit events go to a hash-chained JSON Lines log: `--audit-log keygate-audit.jsonl`
//!   writes `keygate-audit-000001.jsonl`, `keygate-audit-000002.jsonl`, ... (one file per
//!   start; each continues the chain of the one before). Verify with
//!   `keygate audit verify keygate-audit-*.jsonl`. A directory (`--audit-log logs/`, or one
//!   that exists) holds `keygate-audit-000001.jsonl`, ...
//! - Warnings go to stderr, coloured only when stderr is a terminal.
//! - Ctrl-C or SIGTERM: stop accepting, let in-flight requests finish, flush quota usage,
//!   then drain and fsync the audit log.
//!
//! - Quota usage is counted in the same database (`keygate usage ID` reads it), in batches
//!   flushed every second and at shutdown.
//! - Several replicas: give each the same PostgreSQL `KEYGATE_DATABASE_URL` and
//!   `KEYGATE_REDIS_URL` (`--redis-url`). Rate limits and quotas are then counted in Redis
//!   (one atomic script per request, shared by the replicas; `GET /admin/keys/{id}/usage`
//!   reads them), and key changes are announced through Redis pub/sub.
//!
//! Vectors are kept in memory and lost at exit.

// Shared with the tests (`tests/showcase_*.rs`), which use parts this binary does not.
#[allow(dead_code)]
#[path = "vector_db/mod.rs"]
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use keygate::core::audit::{Auditor, FileSink};
use keygate::quota::Counting;
use keygate::redis::{
    Publishing, Redis, RedisOptions, RedisRateLimiter, RedisUsageStore, WatchOptions,
};
use keygate::sql::SqlStore;
use keygate::{KeyFilter, KeySpec, Verifier};

/// A vector database (a subset of Qdrant's REST API) behind keygate.
#[derive(Debug, Parser)]
#[command(name = "vector_db", version)]
struct Args {
    /// The address to listen on: `HOST:PORT`, the host an IP address or a name to resolve
    /// (`localhost:6333`); port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:6333")]
    listen: String,
    /// The key database: `sqlite://FILE` (created if missing) or `postgres://...`.
    #[arg(
        long,
        env = "KEYGATE_DATABASE_URL",
        default_value = "sqlite://keygate.db"
    )]
    database_url: String,
    /// The audit log: `DIR/NAME.jsonl` writes `DIR/NAME-000001.jsonl`, ... (one file per
    /// start, one hash chain across them); a directory (`logs/`, or an existing one) writes
    /// `keygate-audit-000001.jsonl`, ... in it.
    #[arg(long, default_value = "keygate-audit.jsonl")]
    audit_log: PathBuf,
    /// Redis, for several replicas: rate limits and quota counters shared by every replica,
    /// and key changes announced to all of them (`redis://HOST:6379`). Unset: limits and
    /// quota counting are per process (quota usage flushed to the key database).
    #[arg(long, env = "KEYGATE_REDIS_URL")]
    redis_url: Option<String>,
    /// The prefix of every Redis key this server writes (replicas of one service share it).
    #[arg(long, env = "KEYGATE_REDIS_PREFIX", default_value = "keygate")]
    redis_prefix: String,
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

/// Resolves on Ctrl-C or SIGTERM.
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
        () = ctrl_c => {},
        () = term => {},
    }
}

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

/// Hides a database URL's password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
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
    use std::io::IsTerminal;
    // Colours only on a terminal: piped into a file, the log stays plain text.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let (audit_dir, audit_stem) = audit_location(&args.audit_log)?;
    let listener = listen(&args.listen).await?;

    // Keys: the SQL store, followed so changes made elsewhere reach this server's cache.
    let store = SqlStore::open(&args.database_url).await.map_err(|e| {
        format!(
            "cannot open the key database {}: {e}",
            redact(&args.database_url)
        )
    })?;
    // With Redis: key writes made here are announced to every replica at once (the SQL
    // follower still catches writes made elsewhere, e.g. by the CLI), and rate limits and
    // quotas are counted in Redis, shared by the replicas.
    let redis = match &args.redis_url {
        Some(url) => Some(
            Redis::open_with(url, RedisOptions::new().prefix(args.redis_prefix.clone()))
                .await
                .map_err(|e| format!("cannot open Redis {}: {e}", redact(url)))?,
        ),
        None => None,
    };
    let verifier = match &redis {
        Some(r) => Verifier::new(Publishing::new(store.clone(), r)),
        None => Verifier::new(store.clone()),
    };
    let follower = store.watch(&verifier).await?;
    let watcher = match &redis {
        Some(r) => Some(r.watch(&verifier, WatchOptions::new()).await),
        None => None,
    };

    // Audit: the hash-chained file log, written off the request path.
    let sink = FileSink::builder(&audit_dir)
        .stem(audit_stem.clone())
        .open()?;
    let auditor = Auditor::spawn(sink)?;

    // Quota counters in the same database (batched, flushed every second and at shutdown),
    // where `keygate usage` reads them.
    let mut opts = server::Options::new(verifier, auditor.clone());
    opts.usage = Arc::new(store.usage_store());
    if let Some(r) = &redis {
        opts.rate_backend = Some(Arc::new(RedisRateLimiter::new(r)));
        // Strict: every request is one atomic check-and-add in Redis, so replicas cannot
        // overshoot a quota together.
        opts.usage = Arc::new(RedisUsageStore::new(r));
        opts.counting = Counting::Strict;
    }
    let app = server::build(opts)?;

    let addr = listener.local_addr()?;
    println!("keygate vector_db listening on http://{addr}");
    println!("keys: {} ({})", redact(&args.database_url), store.backend());
    println!(
        "audit log: {}",
        audit_dir
            .join(format!("{audit_stem}-NNNNNN.jsonl"))
            .display()
    );
    if let Some(url) = &args.redis_url {
        println!(
            "limits, quotas and key changes shared through {} (prefix {})",
            redact(url),
            args.redis_prefix
        );
    }

    if app.keys.list(&KeyFilter::default()).await?.is_empty() {
        let issued = app
            .keys
            .issue(
                "vector_db",
                KeySpec::new("admin")
                    .owner("vector_db")
                    .scope("*")
                    .resource("*"),
            )
            .await?;
        println!("no keys yet: created an admin key (scope *, every collection).");
        println!(
            "admin key (shown once, store it now): {}",
            issued.key.expose_secret()
        );
        eprintln!(
            "warning: this key is not stored in plaintext anywhere and will not be shown again"
        );
    }
    println!(
        "another admin key (if this one is lost): keygate --database-url {} keys create --name admin --scope '*' --collection '*'",
        shell_word(&redact(&args.database_url))
    );
    println!("ready");

    axum::serve(
        listener,
        app.router
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await?;

    // In-flight requests are done: flush what they counted and recorded.
    println!("shutting down: flushing quota usage and the audit log");
    if let Err(e) = app.quota.flush().await {
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
