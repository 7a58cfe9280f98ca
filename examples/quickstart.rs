//! The smallest keygate service: one protected route, one open route, one key.
//!
//! ```text
//! cargo run --example quickstart --all-features            # listens on 127.0.0.1:3000
//! cargo run --example quickstart --all-features -- --listen 127.0.0.1:8080
//! ```
//!
//! It creates a key at start (kept in memory), prints it once with a `curl` line to try,
//! and shuts down gracefully on Ctrl-C.

use std::net::SocketAddr;

use axum::{routing::get, Json, Router};
use keygate::{Authenticated, KeyGate, KeyRecord, KeyStore, MemoryStore, Prefix, Verifier};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen = parse_listen()?;

    let store = MemoryStore::new();
    let gate = KeyGate::new(Verifier::new(store.clone()));
    let (key, mut record) = KeyRecord::generate(
        &Prefix::default(),
        gate.verifier().hasher(),
        "quickstart",
        gate.clock().now(),
    )?;
    record.owner = Some("you".into());
    record.attributes.insert("tenant".into(), "demo".into());
    store.insert(&record).await?;

    let app = Router::new()
        .route("/whoami", get(whoami))
        .layer(gate.auth_layer().strip_credentials(true))
        .route("/healthz", get(|| async { "ok" }));

    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    println!("keygate quickstart listening on http://{addr}");
    println!("your API key (shown once): {}", key.expose_secret());
    println!(
        "try:  curl -H 'Authorization: Bearer {}' http://{addr}/whoami",
        key.expose_secret()
    );
    println!("      curl -i http://{addr}/whoami    # 401 missing_key");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn whoami(Authenticated(p): Authenticated) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "key_id": p.key_id(),
        "name": p.name(),
        "subject": p.subject(),
        "tenant": p.tenant(),
        "scopes": p.scopes(),
    }))
}

fn parse_listen() -> Result<SocketAddr, String> {
    let mut args = std::env::args().skip(1);
    let mut listen: SocketAddr = ([127, 0, 0, 1], 3000).into();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                let v = args
                    .next()
                    .ok_or("--listen needs an address, e.g. 127.0.0.1:3000")?;
                listen = v.parse().map_err(|_| {
                    format!("--listen: {v:?} is not an address like 127.0.0.1:3000")
                })?;
            }
            "-h" | "--help" => {
                println!("usage: quickstart [--listen ADDR]   (default 127.0.0.1:3000)");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}; try --help")),
        }
    }
    Ok(listen)
}
