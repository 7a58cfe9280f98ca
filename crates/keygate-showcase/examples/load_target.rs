//! The target of `scripts/load.sh`: one trivial route, the showcase's `GET /`, served on two
//! loopback ports by one process, bare on the first and behind keygate's full stack on the
//! second, so a load generator can measure what the layers cost over HTTP.
//!
//! ```text
//! cargo run --release -p keygate-showcase --example load_target -- [--bare ADDR] [--stack ADDR]
//!     [--audit-dir DIR] [--layers LIST] [--fused]
//! ```
//!
//! The stack, outermost first: audit (hash-chained JSON Lines file written by the
//! background writer of a queued `Auditor`, lossless: a full queue makes requests wait),
//! auth, IP allow list (loopback), scope (`GET /` needs `collections:read`), rate limit and
//! quota (both per key, generous enough never to refuse during a run, but counted on every
//! request). The key is created at start and printed; every request of a run must carry it.
//!
//! `--fused` serves the six as one fused stack (`KeyGate::stack`: audit around one service
//! running the five checks) instead of six layers.
//!
//! `--layers audit,auth,ip,scope,rate,quota` (the default: all six) serves a subset on the
//! stack port, to see what each layer costs; layers built from the hub resolve the key
//! themselves, so every subset still authenticates.
//!
//! It prints, one per line: `bare URL`, `stack URL`, `key KEY`, `ready`. On SIGINT or
//! SIGTERM it stops accepting, finishes open requests, flushes the quota counts and the audit
//! queue, and prints `audit written=N dropped=N failed=N`.

// The showcase's accept loop (bounded connections, header and idle timeouts).
use keygate_showcase::serve;

use std::error::Error;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::routing::get;
use axum::{Json, Router};
use keygate::core::audit::{Auditor, FileSink};
use keygate::core::usage::MemoryUsageStore;
use keygate::ip::{IpAllowLayer, IpPolicy};
use keygate::quota::{QuotaConfig, QuotaLayer};
use keygate::rate_limit::{RateLimitConfig, RateLimitLayer};
use keygate::scope::{RouteScopes, ScopeLayer};
use keygate::{
    KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, QuotaPolicy, QuotaWindow, RateLimitPolicy,
    Verifier,
};
use tokio::net::TcpListener;

/// The showcase's root document (Qdrant answers `GET /` with its title and version).
async fn root() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "title": "keygate vector_db",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

struct Args {
    bare: SocketAddr,
    stack: SocketAddr,
    audit_dir: Option<PathBuf>,
    layers: Vec<String>,
    fused: bool,
}

const LAYERS: [&str; 6] = ["audit", "auth", "ip", "scope", "rate", "quota"];

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut out = Args {
        bare: ([127, 0, 0, 1], 0).into(),
        stack: ([127, 0, 0, 1], 0).into(),
        audit_dir: None,
        layers: LAYERS.iter().map(|l| l.to_string()).collect(),
        fused: false,
    };
    while let Some(arg) = args.next() {
        let mut value = |what: &str| args.next().ok_or(format!("{arg} needs {what}"));
        match arg.as_str() {
            "--bare" | "--stack" => {
                let v = value("an address like 127.0.0.1:8081")?;
                let addr = v
                    .parse()
                    .map_err(|_| format!("{arg}: {v:?} is not an address like 127.0.0.1:8081"))?;
                if arg == "--bare" {
                    out.bare = addr;
                } else {
                    out.stack = addr;
                }
            }
            "--fused" => out.fused = true,
            "--audit-dir" => out.audit_dir = Some(PathBuf::from(value("a folder")?)),
            "--layers" => {
                let list = value("a list like auth,scope")?;
                out.layers = Vec::new();
                for l in list.split(',').filter(|l| !l.is_empty()) {
                    if !LAYERS.contains(&l) {
                        return Err(format!("--layers: {l:?} is none of {}", LAYERS.join(",")));
                    }
                    out.layers.push(l.to_owned());
                }
            }
            "-h" | "--help" => {
                println!(
                    "usage: load_target [--bare ADDR] [--stack ADDR] [--audit-dir DIR] [--layers LIST]\n\
                     (addresses default to 127.0.0.1:0, an ephemeral port; the audit folder\n\
                     to a new one under the system's temporary folder; the layers to all six:\n\
                     audit,auth,ip,scope,rate,quota)"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok(out)
}

/// Resolves when SIGINT (Ctrl-C) or, on Unix, SIGTERM arrives.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let args = parse_args()?;
    let audit_dir = args.audit_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("keygate-load-audit-{}", std::process::id()))
    });

    let store = MemoryStore::new();
    let gate = KeyGate::new(Verifier::new(store.clone()));
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "load",
        gate.clock().now(),
    )?;
    record.scopes = vec!["collections:read".into()];
    record.resources = vec!["*".into()];
    record.allowed_ips = vec!["127.0.0.0/8".parse()?, "::1/128".parse()?];
    // Counted on every request, never reached in a bounded run.
    record.rate_limits = vec![RateLimitPolicy::per_second("load", 1_000_000)];
    record.quotas = vec![QuotaPolicy::new(
        "daily",
        1_000_000_000_000,
        QuotaWindow::Day,
    )];
    store.insert(&record).await?;

    let auditor = Auditor::spawn(FileSink::builder(&audit_dir).open()?)?;
    let rules = RouteScopes::builder()
        .route("GET", "/", "collections:read")
        .build()?;
    let quota = QuotaLayer::new(QuotaConfig::new(MemoryUsageStore::new()))?.with_gate(&gate);
    let usage = quota.handle();
    let fused = args.fused && args.layers.len() == LAYERS.len();
    let on = |name: &str| !fused && args.layers.iter().any(|l| l == name);
    let bare_app = Router::new().route("/", get(root));
    // In axum the layer added last is outermost: innermost (quota) first.
    let mut stack_app = Router::new().route("/", get(root));
    if fused {
        // The same six, fused: one service and one response future for the five checks,
        // the audit layer around it.
        let ip = IpAllowLayer::new(IpPolicy::new().allow(["127.0.0.0/8", "::1"])?);
        let rate = RateLimitLayer::new(RateLimitConfig::new())?.with_gate(&gate);
        stack_app = stack_app.layer(
            gate.stack()
                .auth()
                .ip(&ip)
                .scope(&ScopeLayer::table(rules.clone()))
                .rate(&rate)
                .quota(&quota)
                .audit(auditor.clone()),
        );
    }
    if on("quota") {
        stack_app = stack_app.layer(quota);
    }
    if on("rate") {
        stack_app = stack_app.layer(RateLimitLayer::new(RateLimitConfig::new())?.with_gate(&gate));
    }
    if on("scope") {
        stack_app = stack_app.layer(ScopeLayer::table(rules).with_gate(&gate));
    }
    if on("ip") {
        let policy = IpPolicy::new().allow(["127.0.0.0/8", "::1"])?;
        stack_app = stack_app.layer(IpAllowLayer::new(policy).with_gate(&gate));
    }
    if on("auth") {
        stack_app = stack_app.layer(gate.auth_layer());
    }
    if on("audit") {
        stack_app = stack_app.layer(gate.audit_layer(auditor.clone()));
    }

    let bare = TcpListener::bind(args.bare).await?;
    let stacked = TcpListener::bind(args.stack).await?;
    println!("bare http://{}/", bare.local_addr()?);
    println!("stack http://{}/", stacked.local_addr()?);
    println!("key {}", key.expose_secret());
    println!("audit-dir {}", audit_dir.display());
    println!(
        "layers {}{}",
        args.layers.join(","),
        if fused { " (fused)" } else { "" }
    );
    println!("ready");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let stopped = |mut rx: tokio::sync::watch::Receiver<()>| async move {
        let _ = rx.changed().await;
    };
    // The showcase's accept loop: a connection cap, a header read timeout and an idle
    // timeout (the defaults of `vector_db`), the same on both ports.
    let limits = serve::ConnLimits::default();
    let bare_server = serve::serve(bare, bare_app, limits, stopped(stop_rx.clone()), None);
    let stack_server = serve::serve(stacked, stack_app, limits, stopped(stop_rx), None);
    let signal = async move {
        stop_signal().await;
        let _ = stop_tx.send(());
        Ok::<(), std::io::Error>(())
    };
    let (a, b, _) = tokio::join!(bare_server, stack_server, signal);
    a?;
    b?;
    usage.flush().await?;
    let stats = auditor.shutdown().await;
    println!(
        "audit written={} dropped={} failed={}",
        stats.written, stats.dropped, stats.failed
    );
    Ok(())
}
